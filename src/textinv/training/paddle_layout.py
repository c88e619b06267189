"""A saved pipeline folder that ppdiffusers (PaddlePaddle) loads as well as diffusers, written without Paddle.

Facts about the readers (ppdiffusers 0.29.0 with paddlenlp 2.8.1; diffusers 0.42 with transformers 5),
learned by loading folders in both; tests/test_ppdiffusers.py checks them in real ppdiffusers:

- Tokenizer: paddlenlp's ``CLIPTokenizer`` reads ``vocab.json`` and ``merges.txt`` (its
  ``resource_files_names``; the first line of merges.txt, ``#version: 0.2``, is skipped) and takes the
  added words from ``added_tokens.json`` (``{"<cat-toy>": 49408}``, ids consecutive after the vocabulary);
  it ignores ``tokenizer.json``. transformers 5 reads ``tokenizer.json`` and ignores the other files.
- CLIP text encoder: ppdiffusers' ``CLIPTextModel`` names its weights ``text_model.embeddings...`` (the
  layout of Stable Diffusion checkpoints on the Hub). transformers 5 saves a ``CLIPTextModel`` made from
  scratch without the prefix, and loads either (transformers/conversion_mapping.py:
  ``"CLIPTextModel": [PrefixChange(prefix_to_remove="text_model")]``), so the prefixed layout serves both.
- PyTorch weights load in ppdiffusers only with ``from_diffusers=True``. Without it, ppdiffusers' models
  look for ``diffusion_paddle_model.safetensors(.index.json)`` and convert a shard whose metadata says
  ``format: pt`` (ppdiffusers/models/modeling_utils.py); paddlenlp's models look for
  ``model.safetensors.index.json`` *before* ``model.safetensors`` (transformers looks the other way round)
  and read shards of ``format: np`` in Paddle's layout, where ``nn.Linear`` weights are ``[in, out]``
  (PyTorch: ``[out, in]``). With ``from_diffusers=True`` and such an index, paddlenlp converts the files
  named ``model-*`` in the folder instead (paddlenlp/transformers/conversion_utils.py ``convert``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Text encoder classes whose checkpoints ppdiffusers reads with a key prefix transformers 5 may leave out.
LEGACY_KEY_PREFIXES = {"CLIPTextModel": "text_model."}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PADDLE_MODEL_INDEX = "diffusion_paddle_model.safetensors.index.json"
PADDLE_TEXT_INDEX = "model.safetensors.index.json"
PADDLE_TEXT_WEIGHTS = "paddle_model.safetensors"  # not "model-*": see the module docstring
TORCH_TEXT_ALIAS = "model-pytorch.safetensors"  # what paddlenlp converts under from_diffusers=True


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, plus the files paddlenlp's CLIPTokenizer reads (BPE tokenizers only)."""
    tokenizer.save_pretrained(folder)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if model is None or type(model).__name__ != "BPE":
        return  # WordPiece / Unigram (the Chinese families): ppdiffusers reads other files; not written
    model.save(str(folder))  # vocab.json and merges.txt (first line "#version: 0.2")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    added = sorted((index, word) for word, index in tokenizer.get_added_vocab().items() if word not in vocab)
    if [index for index, _ in added] != list(range(len(vocab), len(vocab) + len(added))):
        logger.warning("the tokenizer's added words do not follow its vocabulary; ppdiffusers may not load it")
    text = json.dumps({word: index for index, word in added}, ensure_ascii=False)
    (folder / "added_tokens.json").write_text(text, encoding="utf-8")


def legacy_state_dict(encoder: Any) -> dict[str, Any]:
    """The encoder's weights under the names ppdiffusers reads (and transformers 5 loads as well)."""
    prefix = LEGACY_KEY_PREFIXES.get(type(encoder).__name__, "")
    return {_prefixed(key, prefix): value for key, value in encoder.state_dict().items()}


def _prefixed(key: str, prefix: str) -> str:
    return key if key.startswith(prefix) else prefix + key


def save_text_encoder(encoder: Any, folder: Path, paddle_weights: bool = False) -> None:
    """``save_pretrained`` in the layout both libraries load; ``paddle_weights`` adds ppdiffusers' own."""
    state = legacy_state_dict(encoder)
    encoder.save_pretrained(folder, state_dict=dict(state))  # a copy: transformers may empty the one it is given
    if paddle_weights:
        write_paddle_text_encoder(encoder, state, folder)


def write_paddle_text_encoder(encoder: Any, state: dict[str, Any], folder: Path) -> None:
    """Paddle's layout of the text encoder beside the PyTorch one (the module docstring says why these names)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    if not (folder / "model.safetensors").is_file():  # sharded (over transformers' 50 GB default): not handled
        logger.warning("--ppdiffusers_weights: a sharded text encoder stays PyTorch-only (from_diffusers=True)")
        return
    prefix = LEGACY_KEY_PREFIXES.get(type(encoder).__name__, "")
    linear = {
        _prefixed(f"{name}.weight", prefix)
        for name, module in encoder.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    arrays = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bfloat16
        arrays[key] = np.ascontiguousarray(array.T if key in linear else array)
    save_file(arrays, str(folder / PADDLE_TEXT_WEIGHTS), metadata={"format": "np"})
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
        "weight_map": dict.fromkeys(arrays, PADDLE_TEXT_WEIGHTS),
    }
    (folder / PADDLE_TEXT_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    _link_or_copy(folder / "model.safetensors", folder / TORCH_TEXT_ALIAS)


def write_paddle_model_index(folder: Path) -> bool:
    """Let ppdiffusers load a diffusers model folder (UNet, VAE) without from_diffusers=True: an index
    naming the PyTorch shards, which ppdiffusers converts as it loads them (no weights are copied)."""
    torch_index = folder / (DIFFUSERS_WEIGHTS + ".index.json")
    if torch_index.is_file():
        index = json.loads(torch_index.read_text(encoding="utf-8"))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / DIFFUSERS_WEIGHTS), framework="np") as handle:
            keys = list(handle.keys())
        index = {
            "metadata": {"total_size": (folder / DIFFUSERS_WEIGHTS).stat().st_size},
            "weight_map": dict.fromkeys(keys, DIFFUSERS_WEIGHTS),
        }
    else:
        return False
    (folder / PADDLE_MODEL_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no extra disk where the file system allows hard links
    except OSError:
        shutil.copyfile(source, target)
