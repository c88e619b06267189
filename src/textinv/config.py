"""Every training option, its default and its validation, in one place.

Defaults follow PaddlePaddle ppdiffusers' ``examples/textual_inversion/train_textual_inversion.py``
(``parse_args``) where that script has the flag, so its command lines behave the same here.
Where textinv deliberately differs, the field's comment says so.

This module must not import torch: the CLI validates a config before paying for torch's import.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file...). The CLI prints it as one line, exit 2."""


def first_line(error: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type name: what a one-line error quotes."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step, and a checkpoint was written."""

    def __init__(self, step: int, max_steps: int, signum: int, checkpoint: Optional[str]) -> None:
        import signal

        self.step, self.max_steps, self.signum, self.checkpoint = step, max_steps, signum, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step} of {max_steps}{where}; "
            "run the same command with --resume_from_checkpoint latest to continue"
        )


LEARNABLE_PROPERTIES = ("object", "style")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
INTERPOLATIONS = ("nearest", "linear", "bilinear", "bicubic", "lanczos")
REPORT_TO = ("tensorboard", "visualdl", "wandb", "all", "none")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # issue 8
LANGUAGES = ("en", "zh", "zh_en")  # caption template languages (issue 7); textinv.templates holds the lists
DEFAULT_VALIDATION_STEPS = 100
_HUB_REPO_ID = re.compile(r"^([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


@dataclass
class TrainConfig:
    # --- what to train on ------------------------------------------------------------------
    pretrained_model_name_or_path: str
    train_data_dir: str
    placeholder_token: str
    # A word whose embedding starts the vectors; not needed with init_embeddings.
    initializer_token: Optional[str] = None
    # Start from an existing embedding file of any format (e.g. to refine another tool's embedding).
    init_embeddings: Optional[str] = None
    revision: Optional[str] = None
    tokenizer_name: Optional[str] = None
    learnable_property: str = "object"
    # A token of N vectors (new in ppdiffusers' later versions; default 1).
    num_vectors: int = 1

    # --- images ------------------------------------------------------------------------------
    resolution: int = 512
    height: Optional[int] = None  # overrides resolution
    width: Optional[int] = None  # overrides resolution
    center_crop: bool = False
    # ppdiffusers always flips with p=0.5; diffusers and kohya make it a switch. On by default.
    random_flip: bool = True
    # ppdiffusers' training dataset is built with interpolation="bilinear".
    interpolation: str = "bilinear"
    repeats: int = 100

    # --- optimisation ------------------------------------------------------------------------
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 100
    # Overrides num_train_epochs when set; None means "derive from num_train_epochs".
    max_train_steps: Optional[int] = 5000
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = -1.0  # <= 0 turns clipping off
    seed: Optional[int] = None
    dataloader_num_workers: int = 0

    # --- outputs -----------------------------------------------------------------------------
    output_dir: str = "text-inversion-model"
    save_steps: int = 500
    # ppdiffusers declares this store_true with default=True (so it can never be False there);
    # textinv saves the full pipeline unless asked not to, as diffusers' example does.
    only_save_embeds: bool = False
    overwrite_output_dir: bool = False
    # Resumable checkpoints (diffusers' example's flags and defaults: every 500 steps, no limit).
    checkpointing_steps: Optional[int] = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint-N folder

    # --- Speed and memory (issue 3) ------------------------------------------------------------
    # Each view goes through the VAE once; off, every step encodes again (the reference's way).
    cache_latents: bool = True
    gradient_checkpointing: bool = False  # recompute UNet (and text encoder) activations in backward
    enable_xformers_memory_efficient_attention: bool = False  # else PyTorch SDPA, the default anyway
    mixed_precision: str = "no"  # frozen weights in fp16/bf16; the vectors and optimizer stay fp32
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs
    compile: bool = False  # torch.compile the UNet (slow first steps, then faster on some machines)

    # --- Validation, logs, hub (issue 6) --------------------------------------------------------
    # Prompts to sample while training (repeatable flag); none turns validation off.
    validation_prompt: list[str] = field(default_factory=list)
    num_validation_images: int = 4  # per prompt; image i uses seed + i at every round
    # Every N steps; diffusers' example defaults to 100. --validation_epochs (ppdiffusers' flag)
    # counts epochs of the example stream instead; --validation_steps wins when both are given.
    validation_steps: Optional[int] = None
    validation_epochs: Optional[int] = None
    validation_num_inference_steps: int = 25  # diffusers' example samples validation images in 25 steps
    validation_guidance_scale: float = 7.5
    # ppdiffusers defaults to visualdl; textinv to tensorboard (a dependency, so it always works).
    report_to: str = "tensorboard"
    logging_dir: str = "logs"  # relative to output_dir unless absolute
    push_to_hub: bool = False
    hub_token: Optional[str] = field(default=None, repr=False)  # never printed or written to run.json
    hub_model_id: Optional[str] = None  # default: the output_dir's folder name

    # --- Model families and languages (issue 7) -------------------------------------------------
    # Caption templates: en, zh (ppdiffusers' Chinese lists) or zh_en (both). None picks one from the
    # model: ppdiffusers' rule on its name ("chinese-en" -> zh_en, "chinese" -> zh), else by its text
    # encoder (Taiyi's BERT -> zh, AltDiffusion's XLM-R -> zh_en, CLIP -> en). ppdiffusers defaults to
    # "en" and applies the name rule even to an explicit --language en; textinv keeps an explicit value.
    language: Optional[str] = None

    # --- Loss weighting and timestep sampling (issue 8) -------------------------------------------
    # Not in ppdiffusers, which draws t uniformly and weights every example alike (what "uniform"
    # and snr_gamma=None give). bench/learning.py measures them; README "How well it learns".
    # logit_normal: t = sigmoid(N(mean, std)) * num_train_timesteps (SD3's rectified-flow sampler,
    # Esser et al. 2024, sec. 3.1), which draws the middle timesteps more often than the ends.
    timestep_sampling: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    # Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    # Strategy"): each example's loss x min(SNR(t), gamma) / SNR(t) (epsilon; / (SNR(t) + 1) for
    # v_prediction). None = unweighted MSE; 5.0 is the paper's value.
    snr_gamma: Optional[float] = None

    # Things the CLI learned about how the config was given (not options).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------
    @property
    def image_height(self) -> int:
        return self.height if self.height is not None else self.resolution

    @property
    def image_width(self) -> int:
        return self.width if self.width is not None else self.resolution

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra", None)
        return data

    def validate(self) -> None:
        """Raise UserError naming the first bad value and how to fix it."""
        _require_text("--pretrained_model_name_or_path", self.pretrained_model_name_or_path)
        _require_text("--train_data_dir", self.train_data_dir)
        _require_text("--placeholder_token", self.placeholder_token)
        if self.init_embeddings is None:
            if self.initializer_token is None or not self.initializer_token.strip():
                raise UserError(
                    "--initializer_token is required: a one-token word the vectors start from, e.g. 'toy' "
                    "(or start from an embedding file with --init_embeddings FILE)"
                )
        else:
            _require_text("--init_embeddings", self.init_embeddings)
        if any(ch.isspace() for ch in self.placeholder_token):
            raise UserError(
                f"--placeholder_token {self.placeholder_token!r} contains white space; "
                "use one word such as '<cat-toy>'"
            )
        _choice("--learnable_property", self.learnable_property, LEARNABLE_PROPERTIES)
        _choice("--lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("--interpolation", self.interpolation, INTERPOLATIONS)
        for name, value in (
            ("--resolution", self.resolution),
            ("--height", self.height),
            ("--width", self.width),
        ):
            if value is None:
                continue
            if value < 8 or value % 8:
                raise UserError(
                    f"{name} {value} must be a positive multiple of 8 (the VAE downsamples by 8); "
                    f"try {max(8, round(value / 8) * 8)}"
                )
        for name, value in (
            ("--num_vectors", self.num_vectors),
            ("--repeats", self.repeats),
            ("--train_batch_size", self.train_batch_size),
            ("--gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("--num_train_epochs", self.num_train_epochs),
            ("--save_steps", self.save_steps),
            ("--lr_num_cycles", self.lr_num_cycles),
        ):
            _at_least(name, value, 1)
        if self.max_train_steps is not None:
            _at_least("--max_train_steps", self.max_train_steps, 1)
        if self.checkpointing_steps is not None:
            _at_least("--checkpointing_steps", self.checkpointing_steps, 1)
        if self.checkpoints_total_limit is not None:
            _at_least("--checkpoints_total_limit", self.checkpoints_total_limit, 1)
        if self.resume_from_checkpoint is not None and not self.resume_from_checkpoint.strip():
            raise UserError("--resume_from_checkpoint is empty; give 'latest' or a checkpoint-N folder")
        _choice("--mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _at_least("--lr_warmup_steps", self.lr_warmup_steps, 0)
        _at_least("--dataloader_num_workers", self.dataloader_num_workers, 0)
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate {self.learning_rate} must be > 0, e.g. 5e-4")
        for name, value in (("--adam_beta1", self.adam_beta1), ("--adam_beta2", self.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"{name} {value} must be in [0, 1), e.g. 0.9")
        if not self.adam_epsilon > 0:
            raise UserError(f"--adam_epsilon {self.adam_epsilon} must be > 0, e.g. 1e-8")
        if not self.adam_weight_decay >= 0:
            raise UserError(f"--adam_weight_decay {self.adam_weight_decay} must be >= 0")
        if self.lr_power <= 0:
            raise UserError(f"--lr_power {self.lr_power} must be > 0, e.g. 1.0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed} must be in [0, 2**63)")
        _require_text("--output_dir", self.output_dir)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output_dir {self.output_dir!r} is a file; give a directory path")

        # Validation, logs, hub (issue 6)
        if isinstance(self.validation_prompt, str):  # one prompt given as text from Python
            self.validation_prompt = [self.validation_prompt]
        for prompt in self.validation_prompt:
            if not prompt.strip():
                raise UserError("--validation_prompt is empty; give a prompt such as 'a photo of <cat-toy>'")
        for name, value in (
            ("--num_validation_images", self.num_validation_images),
            ("--validation_num_inference_steps", self.validation_num_inference_steps),
        ):
            _at_least(name, value, 1)
        for name, optional in (("--validation_steps", self.validation_steps), ("--validation_epochs", self.validation_epochs)):
            if optional is not None:
                _at_least(name, optional, 1)
        if not self.validation_guidance_scale >= 0:
            raise UserError(f"--validation_guidance_scale {self.validation_guidance_scale} must be >= 0, e.g. 7.5")
        _choice("--report_to", self.report_to, REPORT_TO)
        if self.report_to in ("tensorboard", "visualdl", "wandb"):
            import importlib.util

            if importlib.util.find_spec(self.report_to) is None:
                raise UserError(
                    f"--report_to {self.report_to}: the {self.report_to} package is not installed; "
                    f"`pip install {self.report_to}`, or use --report_to tensorboard (or none)"
                )
        _require_text("--logging_dir", self.logging_dir)
        if self.hub_model_id is not None and not _HUB_REPO_ID.match(self.hub_model_id):
            raise UserError(
                f"--hub_model_id {self.hub_model_id!r} is not a repository id; give 'name' or 'user/name' "
                "(letters, digits, '-', '_', '.')"
            )

        # Model families and languages (issue 7)
        if self.language is not None:
            _choice("--language", self.language, LANGUAGES)

        # Loss weighting and timestep sampling (issue 8)
        _choice("--timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        if not self.timestep_logit_std > 0:
            raise UserError(f"--timestep_logit_std {self.timestep_logit_std} must be > 0, e.g. 1.0")
        if not -10.0 <= self.timestep_logit_mean <= 10.0:
            raise UserError(f"--timestep_logit_mean {self.timestep_logit_mean} must be in [-10, 10], e.g. 0.0")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr_gamma {self.snr_gamma} must be > 0 (5.0 is the min-SNR paper's value); leave it out for plain MSE")


def _require_text(name: str, value: Optional[str]) -> None:
    if value is None or not str(value).strip():
        raise UserError(f"{name} is required and must not be empty")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} {value!r} is not one of: {', '.join(choices)}")


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{name} {value} must be >= {minimum}")
