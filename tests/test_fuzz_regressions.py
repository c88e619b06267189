"""Every input the fuzz suite found a bug with (tests/data/fuzz-regressions/, listed in its README.md), replayed
under the property of tests/fuzz_harness.py, each with the exact outcome its fix gives. ~2 s in all."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fuzz_harness import REGRESSIONS, check_property, reset_folder

SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD3/3.5, Flux.1, Taiyi (BERT) and AltDiffusion (XLM-R) pipelines"
REFUSED = "it holds Python objects other than tensors ({}); loading it could run code. Get the embedding as .safetensors, or from a trusted source"
COMPONENTS = "scheduler: PNDMScheduler, text_encoder: {}, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel, vae: AutoencoderKL"
# file -> ("refused", message with W for the case's folder) or ("ok", the model family it reads as)
EXPECTED: dict[str, tuple[str, str]] = {
    "frame-overflow.pdparams": (
        "refused",
        "'W/frame-overflow.pdparams' is truncated or corrupt (ValueError: frame size > sys.maxsize: 9223372036854775813)",
    ),
    "dtype-forged-state.pdparams": (
        "refused",
        "refusing 'W/dtype-forged-state.pdparams': "
        + REFUSED.format("a numpy dtype state (3, '<', None, None, None, -1, -1, -1, 0)"),
    ),
    "long4-forged-length.pt": ("refused", "'W/long4-forged-length.pt' is truncated or corrupt (EOFError: EOFError)"),
    "zip-version-25.pt": (
        "refused",
        "'W/zip-version-25.pt' is not a torch file: its zip archive says zip file version 25.5",
    ),
    "protocol-88.bin": (
        "refused",
        "'W/protocol-88.bin' is corrupt: its pickle says protocol 88, and none above 5 exists",
    ),
    "concepts-nested-5000.toml": (
        "refused",
        "--concepts 'W/c.toml' nests arrays or tables too deeply; a concept's values are words, numbers and paths",
    ),
    "concepts-nested-700.toml": (
        "refused",
        "--concepts 'W/c.toml' nests arrays or tables too deeply; a concept's values are words, numbers and paths",
    ),
    "concepts-long-integer.toml": (
        "refused",
        "--concepts 'W/c.toml' is not valid TOML: Exceeds the limit (4300 digits) for integer string conversion: value "
        "has 5000 digits; use sys.set_int_max_str_digits() to increase the limit; write one [[concept]] table per word "
        'with key = value lines, e.g. placeholder_token = "<cat-toy>"',
    ),
    "model-config-null.json": (
        "refused",
        "'W/model/text_encoder/config.json' is not a JSON object; the model folder is damaged",
    ),
    "model-config-nested.json": (
        "refused",
        "'W/model/unet/config.json' nests its JSON too deeply to be a config; the model folder is damaged",
    ),
    "model-in-channels-text.json": (
        "refused",
        "model 'W/model' (StableDiffusionPipeline): unet/config.json has in_channels = \"four\", not a whole number; "
        "the model folder is damaged",
    ),
    "model-architectures-number.json": ("ok", "sd1"),  # not a list of names: model_index.json's class is used
    "model-encoder-class-list.json": (
        "refused",
        "model 'W/model' is a StableDiffusionPipeline without a first text encoder and tokenizer ("
        + COMPONENTS.format("['CLIPTextModel']")
        + f"; an SDXL refiner?); textinv trains {SUPPORTED}",
    ),
    "model-index-empty-spec.json": (
        "refused",
        "model 'W/model' is a StableDiffusionPipeline with no UNet or transformer (scheduler: PNDMScheduler, "
        f"text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, vae: AutoencoderKL); textinv trains {SUPPORTED}",
    ),
    "model-index-control-name.json": (
        "refused",  # a component named "\r" (make fuzz): shown as '?', the error stays one line
        "model 'W/model' is a nameless pipeline with no UNet or transformer (?: True); textinv trains " + SUPPORTED,
    ),
    "resolution-vae-no-blocks.json": ("ok", "8"),  # textinv serve's image size: the sample size, not 4.0
    "bytearray8-forged-length.pdparams": (
        "refused",
        "'W/bytearray8-forged-length.pdparams' is truncated or corrupt "
        "(UnpicklingError: pickle exhausted before end of frame)",  # read first: no 4.4e18-byte allocation
    ),
    "mask-broken-png.json": (
        "refused",
        "mask 'W/masks/0.png' is a damaged image: broken PNG file (bad header checksum in b'IDAT'); replace it",
    ),
    "image-bomb-header.json": (
        "refused",
        "--train_data_dir 'W/images' has no readable image: 0.png is 4353x32770 pixels, more than the limit of "
        "67108864 pixels; shrink it; replace these with valid images",
    ),
    "upload-newline-name.json": ("refused", "'?' is an HTML page (a failed download?), not an embedding file"),
    "captions-box-newline-name.json": (
        "refused",
        "captions box line 1: 'cat.png' is not an uploaded image (uploaded: upload, ?)",
    ),
}


def replay(file: Path, work: Path) -> tuple[str, Any]:
    """The file through the reader that failed on it, under the property."""
    from textinv.config import TrainConfig
    from textinv.data.concepts import concept_configs
    from textinv.embeddings import read_embeddings
    from textinv.models.loading import inspect_pipeline, local_model_dir
    from textinv.serve.captions import gather_captions
    from textinv.serve.state import native_resolution
    from textinv.serve.uploads import store_embedding_file

    if file.suffix in (".pdparams", ".pt", ".bin"):
        path = Path(shutil.copy(file, work / file.name))
        return check_property(lambda: read_embeddings(path))
    if file.suffix == ".toml":
        shutil.copy(file, work / "c.toml")
        config = TrainConfig(pretrained_model_name_or_path="x", concepts=str(work / "c.toml"))
        return check_property(lambda: concept_configs(config))
    case = json.loads(file.read_text(encoding="utf-8"))
    if file.name.startswith(("mask-", "image-")):
        from textinv.data.images import discover_images
        from textinv.data.masks import load_masks

        for folder, key in (("images", "image"), ("masks", "mask")):
            (work / folder).mkdir()
            (work / folder / "0.png").write_bytes(base64.b64decode(case[key]))
        return check_property(lambda: load_masks(discover_images(work / "images"), str(work / "masks"), False))
    if file.name.startswith(("model-", "resolution-")):
        for name, text in case.items():
            (work / "model" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "model" / name).write_text(text, encoding="utf-8")
        if file.name.startswith("resolution-"):
            return check_property(lambda: repr(native_resolution(work / "model")))
        return check_property(lambda: inspect_pipeline(local_model_dir(str(work / "model"))).family.name)
    if file.name.startswith("upload-"):
        (work / "upload").write_text(case["data"], encoding="utf-8")
        return check_property(
            lambda: store_embedding_file(work / "upload", case["name"], work / "server"), allowed=work / "server"
        )
    return check_property(lambda: gather_captions([], case["box"], case["image_names"]))


def test_every_regression_file_has_its_expected_outcome() -> None:
    found = sorted(p.name for p in REGRESSIONS.iterdir() if p.name != "README.md")
    assert found == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_fuzz_finding_stays_fixed(name: str, tmp_path: Path) -> None:
    work = reset_folder(tmp_path / "case")
    outcome, value = replay(REGRESSIONS / name, work)
    if outcome == "refused":
        value = value.replace(str(work), "W")
    assert (outcome, value) == EXPECTED[name]
