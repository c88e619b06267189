"""Reading, writing, converting and loading every textual-inversion embedding format, safely."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures_embeddings as lookalike
import textinv
from textinv.config import UserError
from textinv.embeddings import (
    CLIP_G,
    CLIP_L,
    TEXT_ENCODER,
    Embedding,
    convert,
    describe,
    detect_format,
    load_embeddings,
    read_embeddings,
    write_embedding,
)

REPO = Path(__file__).resolve().parents[1]
TINY_DIM = 32  # text encoder width of textinv.tiny's pipeline

# Files made by other tools. Each test that reads them runs twice: "standalone" on the committed
# originals (tests/data/embeddings) plus look-alikes written in the same layout for the ones that may
# not be committed (tests/fixtures_embeddings.py), and "interop" on all the real originals.
# file -> (format, token, {encoder: shape}, step)
REAL_FILES = {
    "fastai_diffusion-nbs_learned_embeds.bin": ("diffusers", "<birb-style>", {TEXT_ENCODER: (1, 768)}, None),
    "padmanabh_pop_art.bin": ("diffusers", "<pop-art>", {TEXT_ENCODER: (1, 768)}, None),
    "cloneofsimo_lora_kiriko2.ti.pt": ("diffusers", "<krk>", {TEXT_ENCODER: (1, 768)}, None),
    "ttekcor_learned_embeds.safetensors": ("diffusers", "<detail-schemas>", {TEXT_ENCODER: (1, 768)}, None),
    "bad-hands-5.pt": ("a1111", "bad-hands-5", {TEXT_ENCODER: (2, 768)}, 1364),
    "EasyNegative.pt": ("a1111-emb_params", "EasyNegative", {TEXT_ENCODER: (8, 768)}, None),
    "test_embedding.png": ("a1111-png", "rick", {TEXT_ENCODER: (8, 768)}, 60),
    "Kaleidia_SDXL-Detail.safetensors": (
        "sdxl",
        "Kaleidia_SDXL-Detail",
        {CLIP_L: (2, 768), CLIP_G: (2, 1280)},
        None,
    ),
}
SINGLE_ENCODER_FILES = [name for name, spec in REAL_FILES.items() if TEXT_ENCODER in spec[2]]
# (suffix, format to ask for or None for "by suffix", the format the written file is detected as)
SINGLE_ENCODER_TARGETS = [
    (".safetensors", None, "diffusers"),
    (".bin", None, "diffusers"),
    (".pt", None, "a1111"),
    (".safetensors", "a1111", "a1111-emb_params"),
    (".pdparams", None, "pdparams"),
]


class _RunsShell:
    """Unpickling this runs a shell command: what a malicious embedding file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def _embedding(token: str = "<thing>", num_vectors: int = 3, dim: int = 768, seed: int = 0) -> Embedding:
    generator = torch.Generator().manual_seed(seed)
    return Embedding(token=token, vectors={TEXT_ENCODER: torch.randn(num_vectors, dim, generator=generator)})


def _one(path: Path) -> Embedding:
    embeddings = read_embeddings(path)
    assert len(embeddings) == 1
    return embeddings[0]


def _assert_one_line_error(error: pytest.ExceptionInfo[UserError], path: Path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert path.name in message, message
    for word in words:
        assert word.lower() in message.lower(), message


# --- real files ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def standalone_embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed third-party files plus same-layout look-alikes of the others, under their names."""
    return lookalike.write_lookalikes(tmp_path_factory.mktemp("third-party-embeddings"))


@pytest.fixture(params=["standalone", pytest.param("interop", marks=pytest.mark.interop)])
def embeddings(request: pytest.FixtureRequest) -> Path:
    """The folder of third-party embedding files: standalone copies and look-alikes, or the originals."""
    if request.param == "standalone":
        return request.getfixturevalue("standalone_embeddings")
    return request.getfixturevalue("interop_data") / "embeddings"


@pytest.mark.interop
def test_lookalike_builders_write_the_originals_byte_for_byte(interop_data: Path, tmp_path: Path) -> None:
    """Given an original's contents, each builder the standalone tests use writes the original's bytes."""
    originals = interop_data / "embeddings"
    for name in lookalike.VENDORED:  # and the committed copies are the originals
        assert (lookalike.VENDORED_DIR / name).read_bytes() == (originals / name).read_bytes(), name
    diffusers_bins = {"fastai_diffusion-nbs_learned_embeds.bin": "archive", "padmanabh_pop_art.bin": "learned_embeds"}
    for name, archive in diffusers_bins.items():  # torch names the zip's folder after the file (older) or "archive"
        ((token, vector),) = torch.load(originals / name, weights_only=True).items()
        made = lookalike.diffusers_bin(tmp_path / name, token, vector, archive)
        assert made.read_bytes() == (originals / name).read_bytes()
    hands = torch.load(originals / "bad-hands-5.pt", weights_only=True, map_location="cpu")
    made = lookalike.a1111_pt(
        tmp_path / "bad-hands-5.pt",
        hands["name"],
        hands["string_to_param"]["*"],
        hands["step"],
        hands["sd_checkpoint"],
        hands["sd_checkpoint_name"],
    )
    assert made.read_bytes() == (originals / "bad-hands-5.pt").read_bytes()
    easy = torch.load(originals / "EasyNegative.pt", weights_only=True)["emb_params"]
    made = lookalike.emb_params_pt(tmp_path / "e.pt", easy)
    assert made.read_bytes() == (originals / "EasyNegative.pt").read_bytes()
    assert lookalike.empty_pt(tmp_path / "empty.pt").read_bytes() == (originals / "empty.pt").read_bytes()
    ((token, vectors),) = load_file(str(originals / "ttekcor_learned_embeds.safetensors")).items()
    made = lookalike.diffusers_safetensors(tmp_path / "t.safetensors", token, vectors)
    assert made.read_bytes() == (originals / "ttekcor_learned_embeds.safetensors").read_bytes()
    sdxl = load_file(str(originals / "Kaleidia_SDXL-Detail.safetensors"))
    made = lookalike.sdxl_safetensors(tmp_path / "k.safetensors", sdxl["clip_l"], sdxl["clip_g"])
    assert made.read_bytes() == (originals / "Kaleidia_SDXL-Detail.safetensors").read_bytes()
    # The PNG: the same chunks before the pixels and the same text chunk, byte for byte.
    chunks = lookalike.png_chunks((originals / "test_embedding.png").read_bytes())
    (text,) = [body for kind, body in chunks if kind == b"tEXt"]
    data = json.loads(base64.b64decode(text.split(b"\0", 1)[1]))
    rick = torch.tensor(data["string_to_param"]["*"]["TORCHTENSOR"], dtype=torch.float32)
    made = lookalike.a1111_png(tmp_path / "rick.png", data["name"], rick, data["step"])
    made_chunks = lookalike.png_chunks(made.read_bytes())
    assert [kind for kind, _ in made_chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert [kind for kind, _ in chunks[:3]] == [b"IHDR", b"tEXt", b"IDAT"] and chunks[-1][0] == b"IEND"
    assert made_chunks[1] == (b"tEXt", text)


def test_committed_third_party_files_are_the_ones_attributed() -> None:
    committed = REPO / "tests" / "data" / "embeddings"
    assert sorted(p.name for p in committed.iterdir()) == sorted(lookalike.VENDORED)
    attribution = (REPO / "tests" / "data" / "ATTRIBUTION.md").read_text()
    assert all(f"`{name}`" in attribution for name in lookalike.VENDORED)
    assert set(REAL_FILES) | {"empty.pt"} == set(lookalike.VENDORED) | set(lookalike.NOT_COMMITTED)


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files_read_with_their_token_names_and_shapes(embeddings: Path, name: str) -> None:
    fmt, token, shapes, step = REAL_FILES[name]
    path = embeddings / name
    embedding = _one(path)
    assert detect_format(path) == fmt
    assert embedding.token == token
    assert {encoder: tuple(t.shape) for encoder, t in embedding.vectors.items()} == shapes
    assert embedding.step == step
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in embedding.vectors.values())


def test_real_file_vectors_match_the_raw_file(embeddings: Path) -> None:
    hands = torch.load(embeddings / "bad-hands-5.pt", weights_only=True, map_location="cpu")
    assert torch.equal(_one(embeddings / "bad-hands-5.pt").vectors[TEXT_ENCODER], hands["string_to_param"]["*"])
    sdxl = load_file(str(embeddings / "Kaleidia_SDXL-Detail.safetensors"))
    embedding = _one(embeddings / "Kaleidia_SDXL-Detail.safetensors")
    assert list(embedding.vectors) == [CLIP_L, CLIP_G]
    assert torch.equal(embedding.vectors[CLIP_L], sdxl["clip_l"])
    assert torch.equal(embedding.vectors[CLIP_G], sdxl["clip_g"])
    birb_file = embeddings / "fastai_diffusion-nbs_learned_embeds.bin"
    birb = torch.load(birb_file, weights_only=True, map_location="cpu")["<birb-style>"]
    assert torch.equal(_one(birb_file).vectors[TEXT_ENCODER][0], birb)


def test_file_that_holds_no_embedding_is_a_clear_error(embeddings: Path) -> None:
    with pytest.raises(UserError) as error:
        read_embeddings(embeddings / "empty.pt")
    _assert_one_line_error(error, embeddings / "empty.pt", "holds no embedding")


def test_format_is_detected_by_content_not_by_name(embeddings: Path, tmp_path: Path) -> None:
    diffusers_as_pt = tmp_path / "renamed.pt"
    shutil.copyfile(embeddings / "ttekcor_learned_embeds.safetensors", diffusers_as_pt)
    a1111_as_bin = tmp_path / "renamed.bin"
    shutil.copyfile(embeddings / "bad-hands-5.pt", a1111_as_bin)
    assert detect_format(diffusers_as_pt) == "diffusers"
    assert detect_format(a1111_as_bin) == "a1111"
    assert _one(a1111_as_bin).token == "bad-hands-5"  # the name field wins over the file name


def test_describe_reports_family_dims_dtype_and_norms(embeddings: Path) -> None:
    info = describe(embeddings / "Kaleidia_SDXL-Detail.safetensors")
    assert info["format"] == "sdxl"
    (entry,) = info["tokens"]
    assert entry["family"] == "sdxl"
    assert entry["dims"] == {CLIP_L: 768, CLIP_G: 1280}
    assert entry["counts"] == {CLIP_L: 2, CLIP_G: 2}
    assert entry["dtype"] == {CLIP_L: "float32", CLIP_G: "float32"}
    clip_g = load_file(str(embeddings / "Kaleidia_SDXL-Detail.safetensors"))["clip_g"]
    assert entry["norms"][CLIP_G] == pytest.approx(clip_g.norm(dim=1).tolist(), rel=1e-5)
    hands = describe(embeddings / "bad-hands-5.pt")["tokens"][0]
    assert (hands["family"], hands["num_vectors"], hands["step"]) == ("sd1", 2, 1364)
    sd2 = Embedding("<x>", {TEXT_ENCODER: torch.ones(1, 1024)})
    assert sd2.family == "sd2" and _embedding(dim=TINY_DIM).family == "unknown"


# --- writing and round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix,fmt,detected", SINGLE_ENCODER_TARGETS)
@pytest.mark.parametrize("name", SINGLE_ENCODER_FILES)
def test_real_files_round_trip_bit_exact(
    embeddings: Path, tmp_path: Path, name: str, suffix: str, fmt: str, detected: str
) -> None:
    source = _one(embeddings / name)
    source.step = 123
    target = write_embedding(source, tmp_path / f"out{suffix}", fmt)
    assert detect_format(target) == detected
    back = _one(target)
    assert back.token == source.token
    assert torch.equal(back.vectors[TEXT_ENCODER], source.vectors[TEXT_ENCODER])
    if detected in ("a1111", "a1111-emb_params"):
        assert back.step == 123


@pytest.mark.parametrize("num_vectors", [1, 5])
def test_synthetic_round_trip_through_every_format_in_turn(tmp_path: Path, num_vectors: int) -> None:
    original = _embedding("<chain>", num_vectors, dim=1024, seed=num_vectors)
    current = original
    for index, (suffix, fmt, _) in enumerate(SINGLE_ENCODER_TARGETS * 2):
        current = _one(write_embedding(current, tmp_path / f"step{index}{suffix}", fmt))
        assert current.token == "<chain>"
        assert torch.equal(current.vectors[TEXT_ENCODER], original.vectors[TEXT_ENCODER])


def test_sdxl_round_trip_and_single_encoder_formats_refuse_it(embeddings: Path, tmp_path: Path) -> None:
    sdxl = _one(embeddings / "Kaleidia_SDXL-Detail.safetensors")
    written = write_embedding(sdxl, tmp_path / "detail.safetensors")  # chosen by content: two encoders
    assert detect_format(written) == "sdxl"
    assert set(load_file(str(written))) == {"clip_l", "clip_g"}
    back = _one(written)
    for encoder in (CLIP_L, CLIP_G):
        assert torch.equal(back.vectors[encoder], sdxl.vectors[encoder])
    # `textinv convert --to sdxl` still writes the web UI's keys (ComfyUI's layout, under its old name).
    named = load_file(
        str(convert(embeddings / "Kaleidia_SDXL-Detail.safetensors", tmp_path / "xl.safetensors", "sdxl"))
    )
    assert set(named) == {"clip_l", "clip_g"} and torch.equal(named["clip_g"], sdxl.vectors[CLIP_G])
    for target, fmt in (("x.pt", None), ("x.bin", None), ("x.pdparams", None), ("x.safetensors", "diffusers")):
        with pytest.raises(UserError) as error:
            write_embedding(sdxl, tmp_path / target, fmt)
        _assert_one_line_error(error, tmp_path / target, "clip_l + clip_g", "comfyui", ".safetensors")
        assert not (tmp_path / target).exists()
    with pytest.raises(UserError) as error:
        write_embedding(_embedding(), tmp_path / "one.safetensors", "sdxl")
    _assert_one_line_error(error, tmp_path / "one.safetensors", "both")


def test_a1111_export_is_what_the_web_ui_writes(tmp_path: Path) -> None:
    embedding = _embedding("<style>", 2)
    embedding.step = 500
    data = torch.load(write_embedding(embedding, tmp_path / "style.pt"), weights_only=True, map_location="cpu")
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], embedding.vectors[TEXT_ENCODER])
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "<style>",
        500,
        None,
        None,
    )
    emb_params = load_file(str(write_embedding(embedding, tmp_path / "style.safetensors", "a1111")))
    assert set(emb_params) == {"emb_params"}


def test_export_of_a_view_writes_only_its_rows(tmp_path: Path) -> None:
    matrix = torch.randn(5000, 64)
    path = write_embedding(Embedding("<v>", {TEXT_ENCODER: matrix[10:12]}), tmp_path / "v.bin")
    assert path.stat().st_size < 10_000  # not the whole 1.2 MB matrix the view lives in
    assert torch.equal(_one(path).vectors[TEXT_ENCODER], matrix[10:12])


def test_write_refuses_unknown_suffix_and_format(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot tell the format"):
        write_embedding(_embedding(), tmp_path / "x.txt")
    with pytest.raises(UserError, match="cannot write format"):
        write_embedding(_embedding(), tmp_path / "x.pt", "a1111-png")
    nan = _embedding()
    nan.vectors[TEXT_ENCODER][0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        write_embedding(nan, tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_pdparams_written_by_paddle_are_read_without_paddle(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    # paddle.save of a {name: tensor} dict: tensors become ndarrays, plus a name table
    # (paddle/framework/io.py, _build_saved_state_dict); protocol 2 spells bytes via _codecs.encode.
    for protocol in (2, 3, 4):
        path = tmp_path / f"learned_embeds-{protocol}.pdparams"
        state = {"<paddle>": vectors, "StructuredToParameterName@@": {"<paddle>": "embedding_0.w_0"}}
        path.write_bytes(pickle.dumps(state, protocol=protocol))
        embedding = _one(path)
        assert detect_format(path) == "pdparams"
        assert embedding.token == "<paddle>"
        assert torch.equal(embedding.vectors[TEXT_ENCODER], torch.from_numpy(vectors))
    # Older ppdiffusers saved one [dim] vector; Paddle's generic pickling stores (name, ndarray).
    old = tmp_path / "old.pdparams"
    old.write_bytes(pickle.dumps({"<old>": vectors[0].astype(np.float16)}, protocol=2))
    assert _one(old).vectors[TEXT_ENCODER].shape == (1, 768)
    assert describe(old)["tokens"][0]["dtype"] == {TEXT_ENCODER: "float16"}
    pair = tmp_path / "pair.pdparams"
    pair.write_bytes(pickle.dumps({"<pair>": ("tensor_0", vectors)}, protocol=4))
    assert torch.equal(_one(pair).vectors[TEXT_ENCODER], torch.from_numpy(vectors))
    # Our writer: a plain pickle of {token: float32 ndarray}, which plain pickle (so Paddle) reads.
    ours = write_embedding(_embedding("<ours>", 2), tmp_path / "ours.pdparams")
    raw = pickle.loads(ours.read_bytes())
    assert list(raw) == ["<ours>"] and raw["<ours>"].dtype == np.float32 and raw["<ours>"].shape == (2, 768)


# --- safety ---------------------------------------------------------------------------------------
def _write_malicious(kind: str, path: Path, command: str) -> None:
    payload = {"<evil>": torch.zeros(1, 768), "x": _RunsShell(command)}
    if kind == "torch-zip":
        torch.save(payload, path)
    elif kind == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle-4":
        path.write_bytes(pickle.dumps({"<evil>": np.zeros((1, 768), np.float32), "x": _RunsShell(command)}, 4))
    else:  # protocol 0: a text pickle
        path.write_bytes(pickle.dumps(_RunsShell(command), 0))


@pytest.mark.parametrize(
    "kind,name",
    [
        ("torch-zip", "evil.pt"),
        ("torch-legacy", "evil.pt"),
        ("pickle-4", "evil.bin"),
        ("pickle-4", "learned_embeds.pdparams"),
        ("pickle-4", "evil.pt"),
        ("pickle-0", "evil.bin"),
    ],
)
def test_malicious_pickles_never_run(tmp_path: Path, kind: str, name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_malicious(kind, path, f"touch {marker}")
    for action in (read_embeddings, detect_format, describe):
        with pytest.raises(UserError) as error:
            action(path)
        assert "\n" not in str(error.value) and path.name in str(error.value)
        assert not marker.exists(), "loading the file ran its code"
    if kind != "pickle-0":
        assert "refusing" in str(error.value) and "system" in str(error.value)


def test_the_malicious_payload_is_real(tmp_path: Path) -> None:
    """Control for the test above: plain pickle does run the payload."""
    marker = tmp_path / "control"
    _write_malicious("pickle-4", tmp_path / "control.bin", f"touch {marker}")
    pickle.loads((tmp_path / "control.bin").read_bytes())
    assert marker.exists()


def _cut_in_half(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _bad_file(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A bad embedding file of ``kind`` and a word its error message must contain."""
    if kind == "empty":
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
        return path, "empty"
    if kind.startswith("truncated"):
        whole = tmp_path / "whole"  # a sound file in the layout of a real one, then cut in half
        whole.mkdir(exist_ok=True)
        rows = _embedding(num_vectors=8).vectors[TEXT_ENCODER]
        source = {
            "truncated-zip": lambda: lookalike.a1111_pt(whole / "bad-hands-5.pt", "bad", rows[:2], 1364, None, None),
            "truncated-safetensors": lambda: lookalike.diffusers_safetensors(whole / "l.safetensors", "<t>", rows[:1]),
            "truncated-png": lambda: lookalike.a1111_png(whole / "test_embedding.png", "rick", rows, 60),
            "truncated-pdparams": lambda: write_embedding(_embedding(), whole / "learned_embeds.pdparams"),
        }[kind]()
        return _cut_in_half(source, tmp_path / f"cut{source.suffix}"), "truncated"
    if kind == "text":
        path = tmp_path / "notes.pt"
        path.write_text("these are my notes, not an embedding\n")
        return path, "text file"
    if kind == "html":
        path = tmp_path / "download.safetensors"
        path.write_text("<!DOCTYPE html><html><body>Not found</body></html>")
        return path, "HTML"
    if kind == "jpeg":
        path = tmp_path / "photo.pt"
        shutil.copyfile(REPO / "src" / "textinv" / "assets" / "demo_images" / "00.jpg", path)
        return path, "JPEG"
    if kind == "nan":
        path = tmp_path / "nan.safetensors"
        save_file({"<nan>": torch.full((2, 768), float("nan"))}, str(path))
        return path, "NaN"
    if kind == "inf-a1111":
        path = tmp_path / "inf.pt"
        torch.save({"string_to_param": {"*": torch.full((1, 768), float("inf"))}, "name": "inf"}, path)
        return path, "infinite"
    if kind == "oversized":
        path = tmp_path / "huge.safetensors"
        with open(path, "wb") as handle:
            handle.truncate(65 * 2**20)  # sparse: costs no disk
        return path, "MiB"
    if kind == "too-many-rows":
        path = tmp_path / "matrix.safetensors"
        save_file({"<m>": torch.zeros(1001, 768)}, str(path))
        return path, "1001 vectors"
    if kind == "int-tensor":
        path = tmp_path / "ints.bin"
        torch.save({"<i>": torch.zeros(1, 768, dtype=torch.int64)}, path)
        return path, "int64"
    if kind == "3d-tensor":
        path = tmp_path / "cube.safetensors"
        save_file({"<c>": torch.zeros(2, 2, 768)}, str(path))
        return path, "shape"
    if kind == "png-without-embedding":
        from PIL import Image

        path = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(path)
        return path, "sd-ti-embedding"
    raise AssertionError(kind)


BAD_KINDS = [
    "empty",
    "truncated-zip",
    "truncated-safetensors",
    "truncated-png",
    "truncated-pdparams",
    "text",
    "html",
    "jpeg",
    "nan",
    "inf-a1111",
    "oversized",
    "too-many-rows",
    "int-tensor",
    "3d-tensor",
    "png-without-embedding",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_give_one_clear_error(tmp_path: Path, kind: str) -> None:
    path, word = _bad_file(kind, tmp_path)
    with pytest.raises(UserError) as error:
        read_embeddings(path)
    _assert_one_line_error(error, path, word)


# --- loading into pipelines -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textinv.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("embeddings-models") / "tiny-sd1", seed=0)


def _pipeline(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hidden_states(pipe: Any, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def test_our_exports_load_in_diffusers_and_match_our_loader(tiny_sd1: Path, tmp_path: Path) -> None:
    embedding = _embedding("<tiny-thing>", 3, dim=TINY_DIM, seed=7)
    embedding.vectors[TEXT_ENCODER] *= 5  # far from the base vocabulary, so the token clearly matters
    prompt = "a photo of <tiny-thing> on a beach"
    exports = {
        "diffusers": write_embedding(embedding, tmp_path / "learned_embeds.safetensors"),
        "diffusers-bin": write_embedding(embedding, tmp_path / "learned_embeds.bin"),
        "a1111": write_embedding(embedding, tmp_path / "tiny-thing.pt"),
    }
    ours = _pipeline(tiny_sd1)
    assert load_embeddings(ours, exports["a1111"]) == ["<tiny-thing>"]
    expected = _hidden_states(ours, prompt)
    assert (expected - _hidden_states(_pipeline(tiny_sd1), prompt)).abs().max() > 1e-3
    for name, path in exports.items():
        theirs = _pipeline(tiny_sd1)
        theirs.load_textual_inversion(str(path), token="<tiny-thing>")
        assert torch.equal(_hidden_states(theirs, prompt), expected), name
    for name in ("diffusers", "diffusers-bin"):
        again = _pipeline(tiny_sd1)
        load_embeddings(again, exports[name])
        assert torch.equal(_hidden_states(again, prompt), expected), name


def test_load_refuses_other_families_and_leaves_the_pipeline_alone(embeddings: Path, tiny_sd1: Path) -> None:
    pipe = _pipeline(tiny_sd1)
    size = len(pipe.tokenizer)
    with pytest.raises(UserError) as error:
        load_embeddings(pipe, embeddings / "bad-hands-5.pt")
    _assert_one_line_error(error, embeddings / "bad-hands-5.pt", "768", str(TINY_DIM))
    with pytest.raises(UserError) as error:
        load_embeddings(pipe, embeddings / "Kaleidia_SDXL-Detail.safetensors")
    _assert_one_line_error(
        error, embeddings / "Kaleidia_SDXL-Detail.safetensors", "clip_l 768+clip_g 1280", "2 text encoder", "family"
    )
    assert len(pipe.tokenizer) == size


def test_load_replaces_a_present_token_only_when_asked(tiny_sd1: Path, tmp_path: Path) -> None:
    first = write_embedding(_embedding("<rep>", 2, dim=TINY_DIM, seed=1), tmp_path / "first.safetensors")
    second_embedding = _embedding("<rep>", 2, dim=TINY_DIM, seed=2)
    second = write_embedding(second_embedding, tmp_path / "second.pt")
    pipe = _pipeline(tiny_sd1)
    load_embeddings(pipe, first)
    size = len(pipe.tokenizer)
    with pytest.raises(UserError, match="already in the pipeline"):
        load_embeddings(pipe, second)
    assert load_embeddings(pipe, second, replace=True) == ["<rep>"]
    assert len(pipe.tokenizer) == size
    ids = pipe.tokenizer.convert_tokens_to_ids(["<rep>", "<rep>_1"])
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids].detach(), second_embedding.vectors[TEXT_ENCODER])
    three = write_embedding(_embedding("<rep>", 3, dim=TINY_DIM), tmp_path / "three.bin")
    with pytest.raises(UserError, match="different number of vectors"):
        load_embeddings(pipe, three, replace=True)
    assert load_embeddings(pipe, three, token="<rep-3>") == ["<rep-3>"]
    # The web UI names tokens after files, often plain words: never overwrite a word of the model.
    rick = write_embedding(_embedding("rick", 1, dim=TINY_DIM), tmp_path / "rick.pt")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    with pytest.raises(UserError, match="own vocabulary"):
        load_embeddings(pipe, rick, replace=True)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach(), before)
    assert load_embeddings(pipe, rick, token="<rick>") == ["<rick>"]


def test_generate_passes_replace_through(tiny_sd1: Path, tmp_path: Path) -> None:
    from textinv import generate

    path = write_embedding(_embedding("<gen>", 1, dim=TINY_DIM), tmp_path / "gen.safetensors")
    pipe = _pipeline(tiny_sd1)
    load_embeddings(pipe, path)
    options = dict(embeddings=[path], num_inference_steps=1, height=64, width=64, seed=0)
    with pytest.raises(UserError, match="already in the pipeline"):
        generate(pipe, "a <gen>", **options)
    assert len(generate(pipe, "a <gen>", replace=True, **options).images) == 1


def test_sdxl_pipeline_gets_both_vectors_and_refuses_one_encoder_embeddings(tmp_path: Path) -> None:
    from textinv.models.families.sdxl import build_tiny
    from textinv.models.families.tiny_parts import TinySpec

    spec = TinySpec()
    pipe = build_tiny(spec, lambda: torch.manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    embedding = Embedding(
        "<xl>",
        {
            CLIP_L: torch.randn(2, spec.text_hidden_size, generator=generator),
            CLIP_G: torch.randn(2, spec.text_hidden_size_2, generator=generator),
        },
    )
    path = write_embedding(embedding, tmp_path / "xl.safetensors")
    assert set(load_file(str(path))) == {"clip_l", "clip_g"}
    assert load_embeddings(pipe, path) == ["<xl>"]
    for tokenizer, encoder, name in (
        (pipe.tokenizer, pipe.text_encoder, CLIP_L),
        (pipe.tokenizer_2, pipe.text_encoder_2, CLIP_G),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<xl>", "<xl>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), embedding.vectors[name])
    one = write_embedding(_embedding("<one>", 1, dim=spec.text_hidden_size), tmp_path / "one.safetensors")
    with pytest.raises(UserError) as error:
        load_embeddings(pipe, one)
    _assert_one_line_error(error, one, "1 text encoder", "SDXL pipeline has 2", "another model family")
    assert "<one>" not in pipe.tokenizer.get_vocab()


# --- convert --------------------------------------------------------------------------------------
def test_convert_renames_picks_format_and_refuses_to_overwrite(embeddings: Path, tmp_path: Path) -> None:
    out = convert(embeddings / "EasyNegative.pt", tmp_path / "easy.safetensors", token="<easy>")
    assert detect_format(out) == "diffusers" and _one(out).token == "<easy>"
    with pytest.raises(UserError, match="already exists"):
        convert(embeddings / "bad-hands-5.pt", out)
    assert _one(out).token == "<easy>"
    convert(embeddings / "bad-hands-5.pt", out, to="a1111", overwrite=True)
    assert detect_format(out) == "a1111-emb_params" and _one(out).token == "bad-hands-5"
    png = convert(embeddings / "test_embedding.png", tmp_path / "rick.pdparams")
    assert torch.equal(_one(png).vectors[TEXT_ENCODER], _one(embeddings / "test_embedding.png").vectors[TEXT_ENCODER])


# --- command line ---------------------------------------------------------------------------------
def _start(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, TEXTINV_DEBUG="0")
    command = [sys.executable, "-m", "textinv.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_cli_inspect_and_convert(standalone_embeddings: Path, tmp_path: Path) -> None:
    embeddings = standalone_embeddings  # the command line's plumbing; the formats are tested above
    bad = {kind: _bad_file(kind, tmp_path)[0] for kind in ("empty", "truncated-zip", "jpeg")}
    evil = tmp_path / "evil.pt"
    _write_malicious("torch-zip", evil, f"touch {tmp_path / 'pwned'}")
    bad["malicious"] = evil
    exists = tmp_path / "exists.pt"
    exists.write_bytes(b"keep me")
    replaced = tmp_path / "replaced.pt"
    replaced.write_bytes(b"old")
    # All processes at once: each pays the torch import, in parallel.
    runs = {kind: _start("inspect", str(path)) for kind, path in bad.items()}
    runs["json"] = _start("inspect", str(embeddings / "Kaleidia_SDXL-Detail.safetensors"), "--json")
    runs["table"] = _start("inspect", str(embeddings / "bad-hands-5.pt"))
    runs["refuse"] = _start("convert", str(embeddings / "bad-hands-5.pt"), str(exists))
    runs["overwrite"] = _start(
        "convert",
        str(embeddings / "ttekcor_learned_embeds.safetensors"),
        str(replaced),
        "--overwrite",
        "--token",
        "<t>",
    )
    results = {kind: (process.communicate(timeout=120), process.returncode) for kind, process in runs.items()}

    for kind, path in bad.items():
        (stdout, stderr), code = results[kind]
        lines = stderr.strip().splitlines()
        assert code == 2, (kind, stderr)
        assert len(lines) == 1 and "Traceback" not in stderr, (kind, stderr)
        assert lines[0].startswith("textinv: error:") and path.name in lines[0], (kind, stderr)
    assert not (tmp_path / "pwned").exists()

    (stdout, stderr), code = results["json"]
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["format"] == "sdxl" and info["tokens"][0]["family"] == "sdxl"
    assert info["tokens"][0]["dims"] == {CLIP_L: 768, CLIP_G: 1280}

    (stdout, stderr), code = results["table"]
    assert code == 0, stderr
    assert "a1111" in stdout and "bad-hands-5" in stdout and "sd1" in stdout and "1364" in stdout

    (stdout, stderr), code = results["refuse"]
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr, stderr
    assert exists.read_bytes() == b"keep me"

    (stdout, stderr), code = results["overwrite"]
    assert code == 0, stderr
    assert detect_format(replaced) == "a1111" and _one(replaced).token == "<t>"


def test_cli_parser_has_the_new_flags() -> None:
    from textinv.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--replace"])
    assert args.replace is True
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "p"]).replace is False
    args = parser.parse_args(["convert", "a.pt", "b.safetensors", "--to", "sdxl", "--token", "<x>", "--overwrite"])
    assert (args.to, args.token, args.overwrite) == ("sdxl", "<x>", True)
    with pytest.raises(UserError):
        parser.parse_args(["convert", "a.pt", "b.pt", "--to", "png"])
    assert parser.parse_args(["inspect", "f.pt", "--json"]).json is True


# --- training from an existing embedding (--init_embeddings) -------------------------------------


def test_training_starts_from_an_embedding_file_of_another_format(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    from conftest import train_config

    start = torch.randn(3, TINY_DIM, generator=torch.Generator().manual_seed(3))
    source = write_embedding(Embedding("their-token", {TEXT_ENCODER: start}, step=900), tmp_path / "theirs.pt")
    assert detect_format(source) == "a1111"
    # A tiny learning rate: the result must be the file's vectors (3 of them, as the file says), barely moved.
    config = train_config(
        tiny_model,
        train_images,
        tmp_path / "out",
        init_embeddings=str(source),
        initializer_token=None,
        learning_rate=1e-9,
        max_train_steps=2,
        only_save_embeds=True,
    )
    result = textinv.train(config, show_progress=False)
    learned = result.embedding.vectors[TEXT_ENCODER]
    assert learned.shape == (3, TINY_DIM)
    assert (learned - start).abs().max().item() < 1e-5
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["identity"]["init_embeddings"] == str(source)


def test_init_embeddings_vector_count_and_token_choice_are_checked(tmp_path: Path) -> None:
    from textinv.training.builders import starting_vectors_by_encoder as starting_vectors

    two_tokens = tmp_path / "two.safetensors"
    save_file({"<a>": torch.ones(2, TINY_DIM), "<b>": torch.zeros(1, TINY_DIM)}, str(two_tokens))
    with pytest.raises(UserError, match="several tokens"):
        starting_vectors(str(two_tokens), "<cat-toy>", 1)
    assert torch.equal(starting_vectors(str(two_tokens), "<a>", 1)[TEXT_ENCODER], torch.ones(2, TINY_DIM))
    with pytest.raises(UserError, match="has 2 vectors but --num_vectors is 4"):
        starting_vectors(str(two_tokens), "<a>", 4)
