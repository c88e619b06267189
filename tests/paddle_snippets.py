"""Run by tests/test_ppdiffusers.py with the Paddle venv's python (`make paddle-venv`), never by pytest itself.

It runs, in real ppdiffusers, the two ways the seed's README uses a textual-inversion result:

1. ``pipe = StableDiffusionPipeline.from_pretrained(output_dir)`` then ``pipe("A <cat-toy> backpack")``;
2. load the base model, then for each ``token, embeds`` of ``paddle.load("learned_embeds-steps-N.pdparams")``:
   ``add_tokens``, ``resize_token_embeddings``, and write ``embeds`` into the token's row.

Usage: ``python paddle_snippets.py JOBS.json``. JOBS holds ``prompt`` (with the token in it), ``token``,
``snippet1`` (a list of ``{"folder", "from_diffusers"}``), ``snippet2`` (a list of ``{"base", "embeds"}``) and,
optionally, ``arrays`` (a list of ``{"embeds", "folder"}``: what ``paddle.load`` reads, saved as .npy files).
The last stdout line is ``RESULT <json>``: per job the prompt's pieces and ids, the token's id and row, the
text encoder's last hidden state for the prompt, and (snippet 1) whether a 2-step 64 px image is finite;
per ``arrays`` job each tensor's name and .npy file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AISTUDIO_BOS_OFFLINE", "1")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from ppdiffusers import StableDiffusionPipeline  # noqa: E402


def text_facts(pipe: Any, prompt: str, token: str) -> dict[str, Any]:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pd").input_ids
    token_id = tokenizer.convert_tokens_to_ids(token)
    with paddle.no_grad():
        hidden = encoder(ids)[0].numpy()[0]
    return {
        "pieces": tokenizer.tokenize(prompt),
        "input_ids": ids.numpy()[0].tolist(),
        "token_id": int(token_id),
        "vocab_size": len(tokenizer),
        "row": encoder.get_input_embeddings().weight[token_id].numpy().tolist(),
        "hidden": hidden.tolist(),
    }


def snippet1(folder: str, from_diffusers: bool, prompt: str, token: str) -> dict[str, Any]:
    started = time.perf_counter()
    kwargs = {"from_diffusers": True} if from_diffusers else {}
    pipe = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    facts = text_facts(pipe, prompt, token)
    generator = paddle.Generator().manual_seed(0)
    images = pipe(
        f"A {token} backpack", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator
    ).images
    facts.update(image_shape=list(images.shape), image_finite=bool(np.isfinite(images).all()))
    facts["seconds"] = round(time.perf_counter() - started, 2)
    return facts


def snippet2(base: str, embeds_file: str, prompt: str, token: str) -> dict[str, Any]:
    pipe = StableDiffusionPipeline.from_pretrained(base, from_diffusers=True)  # the tiny base holds PyTorch weights
    loaded = paddle.load(embeds_file)
    for name, embeds in loaded.items():
        pipe.tokenizer.add_tokens(name)
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        token_id = pipe.tokenizer.convert_tokens_to_ids(name)
        with paddle.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[token_id] = embeds
    facts = text_facts(pipe, prompt, token)
    facts["file_tokens"] = sorted(loaded)
    facts["file_shapes"] = [list(value.shape) for value in loaded.values()]
    return facts


def arrays(embeds_file: str, folder: str) -> list[dict[str, Any]]:
    """What ``paddle.load`` reads from a .pdparams, each tensor written as ``<folder>/<index>.npy`` (exact values)."""
    found = []
    for index, (name, tensor) in enumerate(paddle.load(embeds_file).items()):
        path = os.path.join(folder, f"{index}.npy")
        np.save(path, tensor.numpy())
        found.append({"token": name, "npy": path})
    return found


def main(jobs_file: str) -> int:
    with open(jobs_file, encoding="utf-8") as handle:
        jobs = json.load(handle)
    prompt, token = jobs["prompt"], jobs["token"]
    result = {
        "versions": {"paddle": paddle.__version__, "ppdiffusers": __import__("ppdiffusers").__version__},
        "snippet1": [snippet1(job["folder"], job["from_diffusers"], prompt, token) for job in jobs["snippet1"]],
        "snippet2": [snippet2(job["base"], job["embeds"], prompt, token) for job in jobs["snippet2"]],
        "arrays": [arrays(job["embeds"], job["folder"]) for job in jobs.get("arrays", [])],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
