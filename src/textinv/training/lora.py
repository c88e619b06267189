"""Pivotal tuning (issue 26): LoRA adapters on the denoiser's attention projections (and, with
``--lora_text_encoder``, the CLIP encoders'), trained with the word's vectors.

The adapters are PEFT's, added the way diffusers' training scripts add them (``add_adapter(LoraConfig(...))`` on the
denoiser; transformers' ``add_adapter`` on a text encoder), on the modules the family names
(``ModelFamily.lora_targets``). The base weights stay frozen: only the adapters' low-rank matrices and the vectors
need gradients. The adapters start from PEFT's "gaussian" init drawn from the run's seed, in a forked RNG, so the
example stream's draws are the same with or without them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from textinv.config import TrainConfig, UserError

logger = logging.getLogger(__name__)

# CLIP's attention projections (diffusers' scripts' text-encoder LoRA targets).
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The adapters' weights by component, then by PEFT's key name (:meth:`LoraAdapters.state_dict`).
AdapterState = dict[str, dict[str, torch.Tensor]]


@dataclass
class LoraAdapters:
    """The run's adapters: each adapted component (the pipeline's name for it) and its module."""

    settings: dict[str, Any]
    components: dict[str, Any] = field(default_factory=dict)  # "unet"/"transformer"/"text_encoder"... -> module
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.components.values():
            yield from (p for p in module.parameters() if p.requires_grad)

    def state_dict(self) -> AdapterState:
        """Each component's adapter weights in PEFT's naming (``...lora_A.weight``), on the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {
            name: {key: value.detach().cpu().clone() for key, value in get_peft_model_state_dict(module).items()}
            for name, module in self.components.items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: AdapterState) -> None:
        """Set every adapter from :meth:`state_dict` (a checkpoint's)."""
        from peft.utils import set_peft_model_state_dict

        if set(state) != set(self.components):
            raise UserError(
                f"the checkpoint holds LoRA adapters for {', '.join(sorted(state)) or 'nothing'} but this run has "
                f"{', '.join(self.components)}; resume with the --lora_* settings it was trained with"
            )
        for name, module in self.components.items():
            set_peft_model_state_dict(module, state[name])


def add_lora(config: TrainConfig, parts: Any, trainable: Any, seed: int) -> Optional[LoraAdapters]:
    """The adapters ``--lora_rank`` asks for, added to the frozen modules (None when it is 0)."""
    settings = config.lora_settings
    if settings is None:
        return None
    from peft import LoraConfig, inject_adapter_in_model

    family = parts.family
    adapters = LoraAdapters(settings)
    components: list[tuple[str, Any, tuple[str, ...]]] = [(family.denoiser_slot, parts.denoiser, family.lora_targets)]
    if settings["text_encoder"]:
        for part in parts.text_encoders:
            if part.name in trainable.tokens and part.kind == "clip":
                components.append((part.name, part.text_encoder, CLIP_LORA_TARGETS))
        if len(components) == 1:
            raise UserError(
                f"--lora_text_encoder: this {family.title} run trains no CLIP text encoder to put adapters on; "
                "leave --lora_text_encoder out"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # PEFT's gaussian init draws from the global RNG: the same adapters for the same seed
        for name, module, targets in components:
            lora = LoraConfig(
                r=settings["rank"],
                lora_alpha=settings["alpha"],
                init_lora_weights="gaussian",
                target_modules=list(targets),
            )
            try:
                if name == family.denoiser_slot:
                    module.add_adapter(lora)  # diffusers' PeftAdapterMixin, as its training scripts do
                else:
                    # PEFT itself for a text encoder: transformers' add_adapter asks for a newer PEFT than PyPI has.
                    inject_adapter_in_model(lora, module)
            except ValueError as error:
                if "not found" not in str(error) and "Target modules" not in str(error):
                    raise
                raise UserError(
                    f"--lora_rank: this {family.title} model's {name} has none of the modules LoRA targets "
                    f"({', '.join(targets)}); it cannot take a LoRA, train without --lora_rank"
                ) from None
            for parameter in module.parameters():  # PEFT leaves the adapters trainable; keep them float32
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
            adapters.components[name] = module
            adapters.targets[name] = targets
    count = sum(p.numel() for p in adapters.parameters())
    logger.info(
        "pivotal tuning: LoRA rank %d, alpha %g on %s (%d trainable parameters), lr %g",
        settings["rank"],
        settings["alpha"],
        ", ".join(adapters.components),
        count,
        settings["learning_rate"],
    )
    return adapters


class PivotalModule(nn.Module):
    """The word's vectors and the LoRA adapters as one module, so that preparing it with accelerate makes DDP
    all-reduce both; ``forward`` encodes captions as :class:`~textinv.models.conditioning.TrainableTextEncoders`."""

    def __init__(self, trainable: nn.Module, adapters: LoraAdapters) -> None:
        super().__init__()
        self.trainable = trainable
        self.adapters = nn.ParameterList(list(adapters.parameters()))

    def caption_for(self, part: Any, caption: str) -> str:
        return self.trainable.caption_for(part, caption)  # type: ignore[operator]

    def forward(self, *input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.trainable(*input_ids, **kwargs)


def embedding_frozen_after(config: TrainConfig, max_steps: int) -> Optional[int]:
    """The last step the word's vectors train (``--embedding_train_frac``), or None when they train to the end."""
    settings = config.lora_settings
    if settings is None or settings["embedding_train_frac"] >= 1.0:
        return None
    return max(1, round(settings["embedding_train_frac"] * max_steps))


def freeze_embedding_past(trainable: Any, step: int, frozen_after: Optional[int], stop_gradients: bool) -> None:
    """Called before the optimizer step of ``step``: past ``frozen_after`` (--embedding_train_frac) the vectors'
    gradients are dropped, so AdamW leaves them (and their moments) as they are. From ``frozen_after`` on, with
    ``stop_gradients``, the vectors also stop asking for gradients, so the later backward passes no longer run through
    the text encoders. Callers pass False under DDP (its reducer expects the same parameters at every step) and with
    text-encoder adapters (they still need the backward pass through the encoders)."""
    if frozen_after is None or step < frozen_after:
        return
    for vectors in trainable.parameters():
        if step > frozen_after:
            vectors.grad = None
        if stop_gradients:
            vectors.requires_grad_(False)


LORA_DIFFUSERS_STEM = "pytorch_lora_weights"  # diffusers' save_lora_weights / load_lora_weights name
LORA_BUNDLE_STEM = "learned_embeds_lora"


def lora_file_names(tag: str = "") -> tuple[str, str]:
    """The diffusers file and the kohya bundle, tagged as the word's files are: ``""`` (the run's last),
    ``"-best"`` (beside ``learned_embeds-best.safetensors``) or ``"-steps-N"`` (beside a snapshot)."""
    return f"{LORA_DIFFUSERS_STEM}{tag}.safetensors", f"{LORA_BUNDLE_STEM}{tag}.safetensors"


LORA_DIFFUSERS_FILE, LORA_BUNDLE_FILE = lora_file_names()
# kohya's key prefix per adapted component (sd-scripts' networks/lora.py: lora_unet, lora_te1/lora_te2; ComfyUI also
# reads lora_transformer_ for diffusers-named transformer modules).
KOHYA_PREFIXES = {
    "unet": "lora_unet",
    "transformer": "lora_transformer",
    "text_encoder": "lora_te1",
    "text_encoder_2": "lora_te2",
}


def kohya_state_dict(
    adapters: LoraAdapters, weights_by_component: Optional[AdapterState] = None
) -> dict[str, torch.Tensor]:
    """The adapters (or ``weights_by_component``, a :meth:`LoraAdapters.state_dict` of theirs) in kohya's layout:
    ``<prefix>_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` and an ``.alpha`` each. diffusers'
    ``convert_state_dict_to_kohya`` writes alpha = rank whatever ``--lora_alpha`` is, and knows no transformer
    prefix, so the names are made here (the rule is kohya's: dots become underscores)."""
    state: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(adapters.settings["alpha"]))
    if weights_by_component is None:
        weights_by_component = adapters.state_dict()
    for component, weights in weights_by_component.items():
        prefix = KOHYA_PREFIXES[component]
        for key, value in weights.items():
            module, kind = key.rsplit(".lora_", 1)  # "down_blocks.0...to_q", "A.weight"
            if prefix.startswith("lora_te") and not module.startswith("text_model."):
                module = f"text_model.{module}"  # kohya names CLIP's modules as CLIPTextModel's text_model.* had them
            name = f"{prefix}_{module.replace('.', '_')}"
            state[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            state[f"{name}.alpha"] = alpha.clone()
    return state


def bundle_keys(token: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The word bundled in a LoRA file as A1111 and ComfyUI read it: ``bundle_emb.<token>.string_to_param.*`` for a
    single-encoder embedding, ``bundle_emb.<token>.clip_l`` / ``.clip_g`` / ``.t5xxl`` for the others."""
    if set(vectors) == {"text_encoder"}:
        return {f"bundle_emb.{token}.string_to_param.*": vectors["text_encoder"].contiguous()}
    return {f"bundle_emb.{token}.{role}": tensor.contiguous() for role, tensor in vectors.items()}


def save_lora_files(
    parts: Any,
    adapters: LoraAdapters,
    embedding: Any,
    output_dir: Any,
    tag: str = "",
    weights_by_component: Optional[AdapterState] = None,
) -> list[Any]:
    """``pytorch_lora_weights.safetensors`` (diffusers' layout: ``pipe.load_lora_weights(output_dir)``) and
    ``learned_embeds_lora.safetensors`` (kohya's, with the word bundled), each written atomically; with ``tag``
    (:func:`lora_file_names`) ``pytorch_lora_weights<tag>.safetensors`` (``load_lora_weights(output_dir,
    weight_name=...)``) and ``learned_embeds_lora<tag>.safetensors``. The adapters' current weights, or
    ``weights_by_component`` (a :meth:`LoraAdapters.state_dict` kept from an earlier step)."""
    import shutil
    import tempfile
    from pathlib import Path

    import diffusers
    from safetensors.torch import save_file

    from textinv.files import atomic_write

    output_dir = Path(output_dir)
    diffusers_file, bundle_file = lora_file_names(tag)
    if weights_by_component is None:
        weights_by_component = adapters.state_dict()
    pipeline_class = getattr(diffusers, parts.family.pipeline_class, None)
    if pipeline_class is None or not hasattr(pipeline_class, "save_lora_weights"):
        pipeline_class = diffusers.StableDiffusionPipeline
    layers: dict[str, Any] = {}
    for component, weights in weights_by_component.items():
        # PEFT's key names (lora_A/lora_B), as diffusers' SD3/Flux scripts save them; its older UNet names
        # (convert_state_dict_to_diffusers) turn only some of a transformer's modules and break their loading.
        layers[f"{component}_lora_layers"] = weights
        # The adapter's config (rank, alpha, targets) in the file's metadata: without it diffusers assumes
        # alpha = rank and a --lora_alpha run would load at the wrong scale.
        layers[f"{component}_lora_adapter_metadata"] = adapters.components[component].peft_config["default"].to_dict()
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        pipeline_class.save_lora_weights(staging, **layers)
        written = [
            atomic_write(output_dir / diffusers_file, lambda tmp: shutil.copyfile(staging / LORA_DIFFUSERS_FILE, tmp))
        ]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bundle = {**kohya_state_dict(adapters, weights_by_component), **bundle_keys(embedding.token, embedding.vectors)}
    metadata = {
        "ss_network_module": "networks.lora",  # kohya's metadata keys, which A1111 and ComfyUI show
        "ss_network_dim": str(adapters.settings["rank"]),
        "ss_network_alpha": str(adapters.settings["alpha"]),
        "textinv_lora_targets": ",".join(sorted({t for targets in adapters.targets.values() for t in targets})),
        "textinv_token": embedding.token,
    }
    written.append(atomic_write(output_dir / bundle_file, lambda tmp: save_file(bundle, str(tmp), metadata)))
    return written
