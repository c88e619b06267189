"""LoRA files with bundled embeddings (issue 26): kohya's layout with ``bundle_emb.<word>.*`` keys, as A1111
(stable-diffusion-webui PR #13568) and ComfyUI read them, and what ``textinv train --lora_rank`` writes as
``learned_embeds_lora.safetensors``.

- ``bundle_emb.<word>.string_to_param.*``: a single-encoder family's vectors ``[n, dim]``;
- ``bundle_emb.<word>.clip_l`` / ``.clip_g`` / ``.t5xxl`` (or OneTrainer's ``.t5``): one tensor per encoder role;
- ``lora_unet_…`` / ``lora_transformer_…`` / ``lora_te1_…``: ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
"""

from __future__ import annotations

from typing import Any

BUNDLE_PREFIX = "bundle_emb."
ROLE_ALIASES = {"t5": "t5xxl"}  # OneTrainer's and diffusers' advanced scripts' name for T5's vectors


def is_bundle(state: dict[str, Any]) -> bool:
    return any(isinstance(key, str) and key.startswith(BUNDLE_PREFIX) for key in state)


def bundled_words(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{word: {role: tensor}}`` of the bundled embeddings (role ``text_encoder`` for ``string_to_param``)."""
    words: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name = key[len(BUNDLE_PREFIX) :]
        if name.endswith(".string_to_param.*"):  # A1111's layout of a single-encoder word
            word, rest = name[: -len(".string_to_param.*")], "text_encoder"
        else:
            word, _, rest = name.rpartition(".")
        role = ROLE_ALIASES.get(rest, rest)
        words.setdefault(word, {})[role] = value
    return words


def lora_summary(state: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    """Rank, alpha, the adapted modules and components of the LoRA part of a bundled file (for ``inspect``)."""
    downs = {
        key[: -len(".lora_down.weight")]: value for key, value in state.items() if key.endswith(".lora_down.weight")
    }
    ranks = sorted({int(value.shape[0]) for value in downs.values()})
    alphas = sorted({round(float(state[f"{name}.alpha"]), 6) for name in downs if f"{name}.alpha" in state})
    components = sorted({name.split("_", 2)[1] if name.startswith("lora_") else name for name in downs})
    return {
        "modules": len(downs),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "components": components,
        "targets": metadata.get("textinv_lora_targets", ""),
    }


def _load(path: Any) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    from textinv.errors import UserError, first_line

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except Exception as error:
        raise UserError(f"{str(path)!r} is not a safetensors LoRA file ({first_line(error)})") from None


def split_lora(bundle: Any, lora_out: Any) -> Any:
    """Write the LoRA part of a bundled file (its adapters and metadata, without the words) to ``lora_out``."""
    from safetensors.torch import save_file

    from textinv.errors import UserError
    from textinv.files import atomic_write

    state, metadata = _load(bundle)
    adapters = {key: value for key, value in state.items() if not key.startswith(BUNDLE_PREFIX)}
    if not adapters or len(adapters) == len(state) and not is_bundle(state):
        raise UserError(f"--lora_out: {str(bundle)!r} is not a LoRA with bundled words; nothing to split")
    metadata.pop("textinv_token", None)
    return atomic_write(lora_out, lambda tmp: save_file(adapters, str(tmp), metadata))


def join_bundle(embedding: Any, lora: Any, output: Any) -> Any:
    """Write ``lora`` (a kohya-layout LoRA file) with ``embedding``'s word bundled (``bundle_emb.<word>.*``)."""
    from safetensors.torch import save_file

    from textinv.errors import UserError
    from textinv.files import atomic_write

    state, metadata = _load(lora)
    if not any(key.endswith(".lora_down.weight") for key in state):
        raise UserError(f"--lora {str(lora)!r} has no kohya-layout adapters (*.lora_down.weight); give such a file")
    words = {f"{BUNDLE_PREFIX}{embedding.token}.{role}": tensor for role, tensor in embedding.vectors.items()}
    if set(embedding.vectors) == {"text_encoder"}:
        words = {f"{BUNDLE_PREFIX}{embedding.token}.string_to_param.*": embedding.vectors["text_encoder"]}
    joined = {**{k: v for k, v in state.items() if not k.startswith(BUNDLE_PREFIX)}, **words}
    contiguous = {key: value.contiguous() for key, value in joined.items()}
    return atomic_write(
        output, lambda tmp: save_file(contiguous, str(tmp), {**metadata, "textinv_token": embedding.token})
    )
