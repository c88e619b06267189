"""Every training option, its default and its validation, in one place.

Defaults follow PaddlePaddle ppdiffusers' ``examples/textual_inversion/train_textual_inversion.py``
(``parse_args``) where that script has the flag; where textinv deliberately differs, the field's comment
says so, and the root script passes ppdiffusers' value (textinv.flags.PPDIFFUSERS_DEFAULTS).

This module must not import torch: the CLI validates a config before paying for torch's import.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from textinv.data.options import DataOptions
from textinv.errors import (  # noqa: F401 (the exceptions' old home)
    TrainingInterrupted,
    UserError,
    check_at_least,
    check_choice,
    first_line,
    require_text,
    require_unless_concepts,
)
from textinv.fields import option  # noqa: F401 (re-exported: TrainConfig fields are declared with it)
from textinv.held_out_options import HeldOutOptions
from textinv.lora_options import LoraOptions
from textinv.loss_options import TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES, LossOptions  # noqa: F401 (re-exported)
from textinv.optimizer_options import OPTIMIZER_DEFAULTS, OptimizerOptions

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
LANGUAGES = ("en", "zh", "zh_en")  # caption template languages (issue 7); textinv.data.templates holds the lists
# Embedding files training writes (issue 15), by textinv.embeddings' format names: diffusers
# learned_embeds.safetensors (SDXL: the clip_l/clip_g layout), ppdiffusers learned_embeds.pdparams,
# the A1111 web UI's learned_embeds.pt. textinv.training.export names the files.
EMBEDDING_FORMATS = ("diffusers", "pdparams", "a1111")
# Text encoders of multi-encoder models by role (textinv.models.families.base; issue 25).
ENCODER_ROLES = ("clip_l", "clip_g", "t5xxl")
DEFAULT_VALIDATION_STEPS = 100
_HUB_REPO_ID = re.compile(r"^([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


@dataclass
class TrainConfig(DataOptions, LossOptions, LoraOptions, OptimizerOptions, HeldOutOptions):
    """Every training option. The training-data options (captions, buckets, masks) are DataOptions' fields
    (textinv.data.options) and the loss's (timesteps, weighting, offset noise, flow matching) LossOptions'
    (textinv.loss_options), keyword-only, so the positional order here stays as it was; so are the LoRA's
    (textinv.lora_options) and the optimizer's (textinv.optimizer_options)."""

    # --- what to train on ------------------------------------------------------------------
    pretrained_model_name_or_path: str = option(help="diffusers pipeline folder or hub id of the base model")
    # Both required, unless --concepts gives them per concept (flags.py says so in --help).
    train_data_dir: str = option("", help="folder with the 3-5 training images")
    placeholder_token: str = option("", help="the new word, e.g. '<cat-toy>'")
    # A word whose embedding starts the vectors; not needed with init_embeddings.
    initializer_token: Optional[str] = option(
        None, help="a one-token word the vectors start from, e.g. 'toy' (not needed with --init_embeddings)"
    )
    # Start from an existing embedding file of any format (e.g. to refine another tool's embedding).
    init_embeddings: Optional[str] = option(
        None, help="start the vectors from an embedding file of any format (diffusers, A1111, pdparams...)"
    )
    revision: Optional[str] = option(None, help="hub revision (branch, tag or commit) of the base model")
    tokenizer_name: Optional[str] = option(None, help="tokenizer folder or hub id, if not the model's own")
    learnable_property: str = option(
        "object", help="what the token learns: an object or a style", choices=LEARNABLE_PROPERTIES
    )
    # A token of N vectors (new in ppdiffusers' later versions; default 1).
    num_vectors: int = option(1, help="vectors in the new token (more = more capacity)")
    # Issue 25: which encoders of a multi-encoder model (SDXL, SD3, Flux) learn the word, by role (the keys of their
    # files). Default: every encoder that conditions the model. textinv.models.families checks the names.
    text_encoders: list[str] = option(
        default_factory=list,
        help="text encoders that learn the word, by role: clip_l clip_g (SDXL), clip_l clip_g t5xxl (SD3), "
        "clip_l t5xxl (Flux); default: all of the model's",
        choices=ENCODER_ROLES,
    )
    # T5's vocabulary rows are tens of times larger than CLIP's, and AdamW moves a vector by about the rate each
    # step whatever its size: at CLIP's rate T5's vectors barely move (bench/encoders.py, docs/encoders.md).
    t5_learning_rate: Optional[float] = option(
        None,
        help="learning rate of T5's vectors (SD3, Flux); by default the word's learning rate times the ratio of T5's "
        "and CLIP-L's median vocabulary-row norms",
    )

    # --- images ------------------------------------------------------------------------------
    resolution: int = option(512, help="training image size in pixels (multiple of 8)")
    height: Optional[int] = option(None, help="training image height; overrides --resolution")
    width: Optional[int] = option(None, help="training image width; overrides --resolution")
    center_crop: bool = option(False, help="crop the image centre to the target aspect ratio before resizing")
    # ppdiffusers always flips with p=0.5; diffusers and kohya make it a switch. On by default.
    random_flip: bool = option(True, help="mirror images at random (p=0.5); --no_random_flip turns it off")
    # ppdiffusers' training dataset is built with interpolation="bilinear".
    interpolation: str = option("bilinear", help="resampling filter for resizing", choices=INTERPOLATIONS)
    repeats: int = option(100, help="times each image appears per epoch")

    # --- optimisation ------------------------------------------------------------------------
    # textinv's recipe (issue 20, docs/quality.md "How many steps"); ppdiffusers': batch 16, lr 1e-4, constant, 500 warm-up.
    train_batch_size: int = option(4, help="examples per process per micro-batch")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    num_train_epochs: int = option(100, help="epochs to train when --max_train_steps is not given")
    # Overrides num_train_epochs when set; None means "derive from num_train_epochs".
    max_train_steps: Optional[int] = option(5000, help="optimizer steps to train (overrides --num_train_epochs)")
    # None: the --optimizer's default (textinv.optimizer_options.OPTIMIZER_DEFAULTS; adamw's is textinv's 1e-3).
    learning_rate: Optional[float] = option(
        None,
        help="peak learning rate (before --scale_lr); if not given, the optimizer's own: "
        + ", ".join(f"{name} {spec.learning_rate:g}" for name, spec in OPTIMIZER_DEFAULTS.items()),
    )
    scale_lr: bool = option(False, help="multiply the learning rate by batch size x accumulation x processes")
    lr_scheduler: str = option("cosine", help="learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, help="warm-up steps of the schedule")
    lr_num_cycles: int = option(1, help="restarts of cosine_with_restarts")
    lr_power: float = option(1.0, help="power of the polynomial schedule")
    # None (these three): the --optimizer's default; AdamW's are 0.9, 0.999 and 1e-2 (lion: 0.9, 0.99, 3e-2).
    adam_beta1: Optional[float] = option(None, help="beta1 of the optimizer; if not given, the optimizer's: 0.9")
    adam_beta2: Optional[float] = option(
        None, help="beta2 of the optimizer; if not given, the optimizer's: 0.999 (lion: 0.99)"
    )
    adam_weight_decay: Optional[float] = option(
        None,
        help="decoupled weight decay on the token vectors (and LoRA adapters); if not given, the optimizer's: 1e-2 "
        "(lion: 3e-2)",
    )
    adam_epsilon: float = option(1e-8, help="epsilon of the optimizer (not lion's)")
    max_grad_norm: float = option(-1.0, help="clip the gradient norm to this; <= 0 turns clipping off")
    seed: Optional[int] = option(None, help="seed for a reproducible run (random when not given, recorded in run.json)")
    dataloader_num_workers: int = option(
        0, help="worker processes decoding and resizing images (once, before training)"
    )
    cpu_threads: Optional[int] = option(
        None, help="torch threads on a CPU (default: OMP_NUM_THREADS, else the free cores)"
    )

    # --- outputs -----------------------------------------------------------------------------
    output_dir: str = option("text-inversion-model", help="where the embedding (and the full pipeline) are written")
    save_steps: int = option(500, help="also write learned_embeds-steps-N.safetensors (and .pdparams...) every N steps")
    # The root train_textual_inversion.py defaults to diffusers + pdparams (textinv.cli.SCRIPT_DEFAULTS).
    embedding_formats: list[str] = option(
        default_factory=lambda: ["diffusers"],
        help="embedding files to write: diffusers (.safetensors; always), and beside it pdparams (ppdiffusers), a1111 (.pt)",
        choices=EMBEDDING_FORMATS,
    )
    # ppdiffusers needs from_diffusers=True for PyTorch weights; this also writes its own layout
    # (textinv.training.paddle_layout), so a plain from_pretrained(output_dir) works there.
    ppdiffusers_weights: bool = option(
        False,
        help="also write ppdiffusers' weight layout in the pipeline, so it loads without from_diffusers=True (text encoder stored twice)",
    )
    # ppdiffusers declares this store_true with default=True (so it can never be False there);
    # textinv saves the full pipeline unless asked not to, as diffusers' example does.
    only_save_embeds: bool = option(False, help="write only the embedding files, not the full pipeline")
    overwrite_output_dir: bool = option(False, help="replace another run's results in --output_dir")
    # Resumable checkpoints (diffusers' example's flags and defaults: every 500 steps, no limit).
    checkpointing_steps: Optional[int] = option(500, help="write a resumable checkpoint-N folder every N steps")
    checkpoints_total_limit: Optional[int] = option(
        None, help="keep at most this many checkpoints (the oldest go first)"
    )
    resume_from_checkpoint: Optional[str] = option(None, help="resume a stopped run: 'latest' or a checkpoint-N folder")

    # --- Speed and memory (issue 3) ------------------------------------------------------------
    # Each view goes through the VAE once; off, every step encodes again (the reference's way).
    cache_latents: bool = option(
        True, help="encode each training view with the VAE once (--no_cache_latents: every step)"
    )
    # recompute UNet (and text encoder) activations in backward
    gradient_checkpointing: bool = option(
        False, help="save memory by recomputing activations in the backward pass (slower steps)"
    )
    enable_xformers_memory_efficient_attention: bool = option(
        False, help="use xformers attention when installed (else PyTorch's SDPA)"
    )
    # frozen weights in fp16/bf16; the vectors and optimizer stay fp32. ppdiffusers defaults to "no";
    # textinv leaves it unset and chooses per device (textinv.models.precision.choose_precision, issue 16).
    mixed_precision: Optional[str] = option(
        None,
        help="frozen weights in fp16 (CUDA only, with loss scaling) or bf16; the learned vectors stay fp32; if not given: bf16 on CUDA GPUs that have it, else no",
        choices=MIXED_PRECISIONS,
    )
    # TF32 matmuls and convolutions on Ampere+ GPUs; on by default (ppdiffusers: off), no effect elsewhere
    allow_tf32: bool = option(
        True, help="allow TF32 matmuls and convolutions on Ampere or newer NVIDIA GPUs (--no_allow_tf32: full fp32)"
    )
    # torch.compile the UNet (slow first steps, then faster on some machines)
    compile: bool = option(False, help="torch.compile the UNet (minutes of compiling first; pays on long GPU runs)")

    # --- Validation, logs, hub (issue 6) --------------------------------------------------------
    # Prompts to sample while training (repeatable flag); none turns validation off.
    validation_prompt: list[str] = option(
        default_factory=list,
        help="prompt to sample while training, with the placeholder in it (repeatable); none = no validation",
    )
    # per prompt; image i uses seed + i at every round
    num_validation_images: int = option(
        4, help="images per validation prompt; image i uses seed+i at every round, so rounds compare"
    )
    # Every N steps; diffusers' example defaults to 100. --validation_epochs (ppdiffusers' flag)
    # counts epochs of the example stream instead; --validation_steps wins when both are given.
    validation_steps: Optional[int] = option(
        None,
        help=f"sample the validation prompts every N steps; if neither this nor --validation_epochs is given: {DEFAULT_VALIDATION_STEPS}",
    )
    validation_epochs: Optional[int] = option(
        None, help="sample the validation prompts every N epochs (--validation_steps wins when both are given)"
    )
    # diffusers' example samples validation images in 25 steps
    validation_num_inference_steps: int = option(25, help="denoising steps per validation image")
    validation_guidance_scale: float = option(7.5, help="classifier-free guidance scale of validation images")
    # ppdiffusers defaults to visualdl; textinv to tensorboard (a dependency, so it always works).
    report_to: str = option(
        "tensorboard", help="where to log loss, learning rate, vector norms and validation images", choices=REPORT_TO
    )
    # relative to output_dir unless absolute
    logging_dir: str = option(
        "logs", help="log folder, relative to --output_dir unless absolute (`tensorboard --logdir OUTPUT_DIR/logs`)"
    )
    push_to_hub: bool = option(False, help="upload --output_dir to the Hugging Face Hub after training (needs a token)")
    # never printed or written to run.json
    hub_token: Optional[str] = option(
        None,
        help="Hub token for --push_to_hub; if not given: HF_TOKEN, or the token saved by `hf auth login`",
        repr=False,
    )
    # default: the output_dir's folder name
    hub_model_id: Optional[str] = option(
        None, help="Hub repository for --push_to_hub, 'name' or 'user/name'; if not given: the output_dir's folder name"
    )

    # --- Model families and languages (issue 7) -------------------------------------------------
    # Caption templates: en, zh (ppdiffusers' Chinese lists) or zh_en (both). None picks one from the
    # model: ppdiffusers' rule on its name ("chinese-en" -> zh_en, "chinese" -> zh), else by its text
    # encoder (Taiyi's BERT -> zh, AltDiffusion's XLM-R -> zh_en, CLIP -> en). ppdiffusers defaults to
    # "en" and applies the name rule even to an explicit --language en; textinv keeps an explicit value.
    language: Optional[str] = option(
        None,
        help="caption templates: en, zh (Chinese) or zh_en (both); if not given: zh/zh_en for Chinese models (by name, as ppdiffusers, or by text encoder), else en",
        choices=LANGUAGES,
    )

    # Things the CLI learned about how the config was given (not options).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------
    @property
    def image_height(self) -> int:
        return self.height if self.height is not None else self.resolution

    @property
    def image_width(self) -> int:
        return self.width if self.width is not None else self.resolution

    def examples_per_update(self, num_processes: int) -> int:
        """Examples one optimizer step sees: batch x accumulation x processes."""
        return self.train_batch_size * self.gradient_accumulation_steps * num_processes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra", None)
        return data

    def validate(self) -> None:
        """Raise UserError naming the first bad value and how to fix it."""
        for spec in dataclasses.fields(self):
            allowed = spec.metadata.get("choices")
            value = getattr(self, spec.name)
            if allowed and isinstance(value, (list, tuple)):  # a list option: every entry is a choice
                for entry in value:
                    check_choice(f"--{spec.name}", entry, allowed)
            elif allowed and value is not None:
                check_choice(f"--{spec.name}", value, allowed)
        require_text("--pretrained_model_name_or_path", self.pretrained_model_name_or_path)
        if self.concepts is None:  # else textinv.data.concepts checks each word (validate_word)
            self.validate_word()
        self._validate_run()

    def validate_word(self) -> None:
        """The options of the word: its images, token and where its vectors start."""
        if self.concepts is None:
            require_unless_concepts("--train_data_dir", self.train_data_dir, "the folder of training images")
            require_unless_concepts("--placeholder_token", self.placeholder_token, "the new word, e.g. '<cat-toy>'")
        else:
            for name, value in (("train_data_dir", self.train_data_dir), ("placeholder_token", self.placeholder_token)):
                if not str(value or "").strip():
                    raise UserError(f"{name} is required: give it in the [[concept]] table (or --{name} for all)")
        if self.init_embeddings is None:
            if self.initializer_token is None or not self.initializer_token.strip():
                raise UserError(
                    "--initializer_token is required: a one-token word the vectors start from, e.g. 'toy' "
                    "(or start from an embedding file with --init_embeddings FILE)"
                )
        else:
            require_text("--init_embeddings", self.init_embeddings)
        if any(ch.isspace() for ch in self.placeholder_token):
            raise UserError(
                f"--placeholder_token {self.placeholder_token!r} contains white space; use one word such as '<cat-toy>'"
            )

    def _validate_run(self) -> None:
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
            check_at_least(name, value, 1)
        for name, value in (
            ("--max_train_steps", self.max_train_steps),
            ("--checkpointing_steps", self.checkpointing_steps),
            ("--cpu_threads", self.cpu_threads),
        ):
            if value is not None:
                check_at_least(name, value, 1)
        if self.checkpoints_total_limit is not None:
            check_at_least("--checkpoints_total_limit", self.checkpoints_total_limit, 1)
        if self.resume_from_checkpoint is not None and not self.resume_from_checkpoint.strip():
            raise UserError("--resume_from_checkpoint is empty; give 'latest' or a checkpoint-N folder")
        check_at_least("--lr_warmup_steps", self.lr_warmup_steps, 0)
        check_at_least("--dataloader_num_workers", self.dataloader_num_workers, 0)
        self.validate_optimizer_options()  # issue 27: rates, betas, decay, the package, the norm options
        if self.lr_power <= 0:
            raise UserError(f"--lr_power {self.lr_power} must be > 0, e.g. 1.0")
        if self.t5_learning_rate is not None and not self.t5_learning_rate > 0:
            raise UserError(
                f"--t5_learning_rate {self.t5_learning_rate} must be > 0, e.g. 4e-2; leave it out for the scaled default"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed} must be in [0, 2**63)")
        require_text("--output_dir", self.output_dir)
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
            check_at_least(name, value, 1)
        for name, optional in (
            ("--validation_steps", self.validation_steps),
            ("--validation_epochs", self.validation_epochs),
        ):
            if optional is not None:
                check_at_least(name, optional, 1)
        if not self.validation_guidance_scale >= 0:
            raise UserError(f"--validation_guidance_scale {self.validation_guidance_scale} must be >= 0, e.g. 7.5")
        if self.report_to in ("tensorboard", "visualdl", "wandb"):
            import importlib.util

            if importlib.util.find_spec(self.report_to) is None:
                raise UserError(
                    f"--report_to {self.report_to}: the {self.report_to} package is not installed; "
                    f"`pip install {self.report_to}`, or use --report_to tensorboard (or none)"
                )
        require_text("--logging_dir", self.logging_dir)
        if self.hub_model_id is not None and not _HUB_REPO_ID.match(self.hub_model_id):
            raise UserError(
                f"--hub_model_id {self.hub_model_id!r} is not a repository id; give 'name' or 'user/name' "
                "(letters, digits, '-', '_', '.')"
            )

        # Model families and languages (issue 7)

        self.validate_loss_options()  # issues 8, 15, 25
        self.validate_lora_options()  # issue 26
        if isinstance(self.text_encoders, str):  # one encoder given as text from Python
            self.text_encoders = [self.text_encoders]

        # Embedding formats and offset noise (issue 15)
        if isinstance(self.embedding_formats, str):  # one format given as text from Python
            self.embedding_formats = [self.embedding_formats]
        if not self.embedding_formats:
            raise UserError(f"--embedding_formats is empty; give one or more of: {', '.join(EMBEDDING_FORMATS)}")
        if "diffusers" not in self.embedding_formats:  # the model card, the web page, diffusers' loaders read it
            raise UserError(
                "--embedding_formats must include diffusers (learned_embeds.safetensors, the run's main result); "
                f"the others are written beside it, e.g. --embedding_formats diffusers {self.embedding_formats[0]}"
            )
        # Each once, diffusers first (TrainResult.embedding_path is the first format's file).
        self.embedding_formats = list(dict.fromkeys(["diffusers", *self.embedding_formats]))

        self.validate_data_options(self.image_height, self.image_width)  # issue 17

        self.validate_held_out_options()  # issue 20
