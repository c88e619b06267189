"""Multi-encoder embeddings keyed by encoder role (clip_l, clip_g, t5xxl): ComfyUI, OneTrainer and diffusers'
advanced-script files for SDXL, SD3 and Flux, and loading them into those pipelines.

Third-party layouts are written here with safetensors' own ``save_file``, never with textinv's writer, so what is
read is what those tools write: ComfyUI ``clip_l``/``clip_g``/``t5xxl``; OneTrainer ``clip_l``/``clip_g``/``t5``
(OneTrainer#514) and its output embeddings ``*_out``; diffusers' advanced_diffusion_training
``<name>_emb.safetensors`` with ``clip_l``/``t5`` and no metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from textinv.embeddings import (
    Embedding,
    convert,
    describe,
    description_table,
    detect_format,
    load_embeddings,
    read_embeddings,
    save_diffusers,
    write_embedding,
)
from textinv.errors import UserError
from textinv.models.families.base import CLIP_G, CLIP_L, SINGLE, T5XXL
from textinv.models.families.tiny_parts import TinySpec

SPEC = TinySpec()


def _rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> Path:
    """A file as another tool writes it: safetensors' save_file, the given keys and metadata only."""
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def _one(path: Path) -> Embedding:
    (embedding,) = read_embeddings(path)
    return embedding


def _one_line(error: pytest.ExceptionInfo[UserError], *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


# --- reading ComfyUI files ------------------------------------------------------------------------
def test_comfyui_sd3_file_reads_each_role_with_its_own_count(tmp_path: Path) -> None:
    clip_l, clip_g, t5 = _rows(2, 768, 1), _rows(2, 1280, 2), _rows(5, 4096, 3)
    path = _save(tmp_path / "sd3.safetensors", {"t5xxl": t5, "clip_g": clip_g, "clip_l": clip_l}, {"name": "<s>"})
    embedding = _one(path)
    assert detect_format(path) == "comfyui"
    assert embedding.token == "<s>"
    assert list(embedding.vectors) == [CLIP_L, CLIP_G, T5XXL]  # role order, whatever the file's key order
    for role, expected in ((CLIP_L, clip_l), (CLIP_G, clip_g), (T5XXL, t5)):
        assert torch.equal(embedding.vectors[role], expected)
    assert embedding.counts() == {CLIP_L: 2, CLIP_G: 2, T5XXL: 5}
    assert embedding.num_vectors == 2
    assert embedding.family == "sd3"


def test_comfyui_flux_and_partial_files_name_their_family(tmp_path: Path) -> None:
    flux = _save(tmp_path / "flux-thing.safetensors", {"clip_l": _rows(1, 768, 1), "t5xxl": _rows(4, 4096, 2)})
    embedding = _one(flux)
    assert (detect_format(flux), embedding.token, embedding.family) == ("comfyui", "flux-thing", "flux")
    assert embedding.counts() == {CLIP_L: 1, T5XXL: 4}
    # T5 alone fits SD3 and Flux; CLIP-L + CLIP-G fits SDXL exactly; CLIP-G + T5 only SD3.
    t5_only = _one(_save(tmp_path / "t5.safetensors", {"t5xxl": _rows(3, 4096, 3)}))
    assert (t5_only.family, t5_only.num_vectors, list(t5_only.vectors)) == ("sd3/flux", 3, [T5XXL])
    sdxl = _save(tmp_path / "xl.safetensors", {"clip_l": _rows(1, 768, 4), "clip_g": _rows(1, 1280, 5)})
    assert (detect_format(sdxl), _one(sdxl).family) == ("sdxl", "sdxl")
    partial_sd3 = _one(_save(tmp_path / "g.safetensors", {"clip_g": _rows(2, 1280, 6), "t5xxl": _rows(1, 4096, 7)}))
    assert partial_sd3.family == "sd3"


def test_clip_counts_must_match_but_t5_may_differ(tmp_path: Path) -> None:
    fine = {"clip_l": _rows(2, 768, 1), "clip_g": _rows(2, 1280, 2), "t5xxl": _rows(7, 4096, 3)}
    assert _one(_save(tmp_path / "fine.safetensors", fine)).counts()[T5XXL] == 7
    bad = _save(tmp_path / "bad.safetensors", {**fine, "clip_g": _rows(3, 1280, 4)})
    with pytest.raises(UserError) as error:
        read_embeddings(bad)
    _one_line(error, "bad.safetensors", "clip_l has 2", "clip_g has 3", "must match")


def test_extra_keys_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _save(
        tmp_path / "x.safetensors", {"clip_l": _rows(1, 768, 1), "t5xxl": _rows(1, 4096, 2), "misc": _rows(1, 4, 3)}
    )
    with caplog.at_level(logging.WARNING):
        embedding = _one(path)
    assert set(embedding.vectors) == {CLIP_L, T5XXL}
    assert "misc" in caplog.text and "ignoring" in caplog.text


# --- OneTrainer and diffusers' advanced scripts ---------------------------------------------------
@pytest.mark.parametrize(
    "keys",
    [
        {"clip_l": (2, 768), "t5": (6, 4096)},  # Flux
        {"clip_l": (1, 768), "clip_g": (1, 1280), "t5": (3, 4096)},  # SD3
        {"t5": (2, 4096)},  # Flux or SD3, T5 trained alone
    ],
)
def test_onetrainer_file_converts_to_comfyui_and_back_unchanged(
    tmp_path: Path, keys: dict[str, tuple[int, int]]
) -> None:
    original = {key: _rows(rows, dim, seed) for seed, (key, (rows, dim)) in enumerate(keys.items())}
    source = _save(tmp_path / "concept.safetensors", original)
    assert detect_format(source) == "onetrainer"
    embedding = _one(source)
    assert embedding.token == "concept"
    assert torch.equal(embedding.vectors[T5XXL], original["t5"])
    comfy = convert(source, tmp_path / "comfy.safetensors", to="comfyui")
    comfy_tensors = load_file(str(comfy))
    assert set(comfy_tensors) == {"t5xxl" if key == "t5" else key for key in original}
    assert torch.equal(comfy_tensors["t5xxl"], original["t5"])
    back = load_file(str(convert(comfy, tmp_path / "back.safetensors", to="onetrainer")))
    assert set(back) == set(original)
    assert all(torch.equal(back[key], original[key]) for key in original)
    assert _one(tmp_path / "back.safetensors").token == "concept"  # the name rode along in the metadata


@pytest.mark.parametrize(
    "keys,detected,family",
    [
        ({"clip_l": (3, 768), "t5": (3, 4096)}, "onetrainer", "flux"),
        ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "sdxl", "sdxl"),
    ],
)
def test_diffusers_advanced_file_reads_and_round_trips(
    tmp_path: Path, keys: dict[str, tuple[int, int]], detected: str, family: str
) -> None:
    original = {key: _rows(rows, dim, seed + 10) for seed, (key, (rows, dim)) in enumerate(keys.items())}
    source = _save(tmp_path / "my-lora_emb.safetensors", original)  # <output_name>_emb.safetensors, no metadata
    embedding = _one(source)
    assert (detect_format(source), embedding.token, embedding.family) == (detected, "my-lora", family)
    comfy = convert(source, tmp_path / "comfy.safetensors", to="comfyui")
    back_path = convert(comfy, tmp_path / "again_emb.safetensors", to="diffusers-advanced")
    back = load_file(str(back_path))
    assert set(back) == set(original)
    assert all(torch.equal(back[key], original[key]) for key in original)
    assert _one(back_path).token == "my-lora"


def test_onetrainer_output_embeddings_alone_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "out-only.safetensors", {"clip_l_out": _rows(1, 768, 1), "t5_out": _rows(1, 4096, 2)})
    for action in (read_embeddings, detect_format, describe):
        with pytest.raises(UserError) as error:
            action(path)
        _one_line(error, "out-only.safetensors", "'clip_l_out'", "output embeddings (*_out)", "does not support")


def test_onetrainer_output_embeddings_beside_plain_keys_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip_l, t5 = _rows(1, 768, 1), _rows(2, 4096, 2)
    tensors = {"clip_l": clip_l, "t5": t5, "clip_l_out": _rows(1, 768, 3), "t5_out": _rows(2, 4096, 4)}
    path = _save(tmp_path / "with-out.safetensors", tensors)
    with caplog.at_level(logging.WARNING):
        embedding = _one(path)
    assert detect_format(path) == "onetrainer"
    assert list(embedding.vectors) == [CLIP_L, T5XXL]
    assert torch.equal(embedding.vectors[CLIP_L], clip_l) and torch.equal(embedding.vectors[T5XXL], t5)
    assert "clip_l_out" in caplog.text and "t5_out" in caplog.text and "output embeddings" in caplog.text


def test_t5_under_both_spellings_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "both.safetensors", {"t5": _rows(1, 4096, 1), "t5xxl": _rows(1, 4096, 2)})
    with pytest.raises(UserError) as error:
        read_embeddings(path)
    _one_line(error, "both.safetensors", "'t5'", "'t5xxl'")


# --- writing --------------------------------------------------------------------------------------
def _flux_embedding(clip: int = 2, t5: int = 3, dims: tuple[int, int] = (768, 4096)) -> Embedding:
    return Embedding("<f>", {CLIP_L: _rows(clip, dims[0], 1), T5XXL: _rows(t5, dims[1], 2)}, step=40)


def test_multi_encoder_writers_use_each_tools_keys(tmp_path: Path) -> None:
    embedding = _flux_embedding()
    expected = {
        "comfyui": {"clip_l", "t5xxl"},
        "onetrainer": {"clip_l", "t5"},
        "diffusers-advanced": {"clip_l", "t5"},
    }
    for fmt, keys in expected.items():
        path = write_embedding(embedding, tmp_path / f"{fmt}.safetensors", fmt)
        tensors = load_file(str(path))
        assert set(tensors) == keys, fmt
        assert torch.equal(tensors["clip_l"], embedding.vectors[CLIP_L])
        assert _one(path).step == 40 and _one(path).token == "<f>"
    by_suffix = write_embedding(embedding, tmp_path / "auto.safetensors")
    assert set(load_file(str(by_suffix))) == {"clip_l", "t5xxl"} and detect_format(by_suffix) == "comfyui"
    # training's learned_embeds.safetensors: ComfyUI's keys for whatever roles were trained
    trained = save_diffusers(Embedding("<t>", {T5XXL: _rows(4, 64, 3)}), tmp_path / "learned_embeds.safetensors")
    assert set(load_file(str(trained))) == {"t5xxl"}
    assert torch.equal(_one(trained).vectors[T5XXL], _rows(4, 64, 3))


def test_writers_refuse_what_their_format_cannot_hold(tmp_path: Path) -> None:
    flux = _flux_embedding()
    for name, fmt in (
        ("x.pt", None),
        ("x.bin", None),
        ("x.pdparams", None),
        ("x.safetensors", "diffusers"),
        ("y.safetensors", "a1111"),
    ):
        with pytest.raises(UserError) as error:
            write_embedding(flux, tmp_path / name, fmt)
        _one_line(error, name, "clip_l + t5xxl", "comfyui", "onetrainer", ".safetensors")
    with pytest.raises(UserError) as error:
        write_embedding(flux, tmp_path / "flux.safetensors", "sdxl")
    _one_line(error, "flux.safetensors", "both clip_l and clip_g", "comfyui")
    with pytest.raises(UserError) as error:
        write_embedding(flux, tmp_path / "flux.pt", "comfyui")
    _one_line(error, "flux.pt", ".safetensors")
    single = Embedding("<s>", {SINGLE: _rows(1, 768, 4)})
    for fmt in ("comfyui", "onetrainer", "diffusers-advanced"):
        with pytest.raises(UserError) as error:
            write_embedding(single, tmp_path / f"{fmt}.safetensors", fmt)
        _one_line(error, f"{fmt}.safetensors", "single-encoder", "diffusers or a1111")
    mixed = Embedding("<m>", {SINGLE: _rows(1, 768, 5), CLIP_L: _rows(1, 768, 6)})
    with pytest.raises(UserError) as error:
        write_embedding(mixed, tmp_path / "m.safetensors")
    _one_line(error, "mixes")
    assert list(tmp_path.iterdir()) == []


# --- the Embedding type and describe --------------------------------------------------------------
def test_counts_and_num_vectors_follow_role_order() -> None:
    embedding = Embedding("<e>", {T5XXL: _rows(5, 4096, 1), CLIP_L: _rows(2, 768, 2)})  # T5 given first
    assert embedding.counts() == {CLIP_L: 2, T5XXL: 5}
    assert list(embedding.counts()) == [CLIP_L, T5XXL]
    assert embedding.num_vectors == 2
    assert embedding.dims() == {CLIP_L: 768, T5XXL: 4096}
    assert Embedding("<t>", {T5XXL: _rows(5, 4096, 1)}).num_vectors == 5
    assert Embedding("<s>", {SINGLE: _rows(1, 1024, 1)}).family == "sd2"


def test_describe_shows_each_role_with_its_own_count_dim_and_dtype(tmp_path: Path) -> None:
    clip_l, t5 = _rows(2, 768, 1), _rows(9, 4096, 2).to(torch.bfloat16)
    path = _save(tmp_path / "flux_emb.safetensors", {"clip_l": clip_l, "t5": t5})
    info = describe(path)
    assert info["format"] == "onetrainer"
    (entry,) = info["tokens"]
    assert (entry["token"], entry["family"]) == ("flux", "flux")
    assert entry["counts"] == {CLIP_L: 2, T5XXL: 9}
    assert entry["dims"] == {CLIP_L: 768, T5XXL: 4096}
    assert entry["dtype"] == {CLIP_L: "float32", T5XXL: "bfloat16"}
    assert len(entry["norms"][T5XXL]) == 9
    assert entry["norms"][T5XXL][0] == pytest.approx(float(t5.float()[0].norm()), rel=1e-5)
    rows = {line.split()[2]: line.split() for line in description_table(info).splitlines()[2:]}
    assert rows["clip_l"][:6] == ["flux", "2", "clip_l", "768", "float32", "flux"]
    assert rows["t5xxl"][:6] == ["flux", "9", "t5xxl", "4096", "bfloat16", "flux"]


# --- loading into pipelines -----------------------------------------------------------------------
def _tiny(kind: str) -> Any:
    seed: Callable[[], Any] = lambda: torch.manual_seed(0)  # noqa: E731
    if kind == "sdxl":
        from textinv.models.families.sdxl import build_tiny

        return build_tiny(SPEC, seed)
    from textinv.models.families.tiny_flow import build_tiny_flux, build_tiny_sd3

    return (build_tiny_flux if kind == "flux" else build_tiny_sd3)(SPEC, seed)


def _width(encoder: Any) -> int:
    return int(encoder.get_input_embeddings().weight.shape[1])


def _rows_of(tokenizer: Any, encoder: Any, token: str, count: int) -> torch.Tensor:
    names = [token] + [f"{token}_{i}" for i in range(1, count)]
    ids = tokenizer.convert_tokens_to_ids(names)
    return encoder.get_input_embeddings().weight[ids].detach()


def test_flux_file_loads_clip_l_and_t5_into_their_slots(tmp_path: Path) -> None:
    pipe = _tiny("flux")
    clip_l, t5 = _rows(2, _width(pipe.text_encoder), 1), _rows(3, _width(pipe.text_encoder_2), 2)
    path = _save(tmp_path / "flux.safetensors", {"clip_l": clip_l, "t5xxl": t5}, {"name": "<fx>"})
    assert load_embeddings(pipe, path) == ["<fx>"]
    assert torch.equal(_rows_of(pipe.tokenizer, pipe.text_encoder, "<fx>", 2), clip_l)
    assert torch.equal(_rows_of(pipe.tokenizer_2, pipe.text_encoder_2, "<fx>", 3), t5)  # text_encoder_2 is T5 here
    assert "<fx>_2" in pipe.tokenizer_2.get_vocab() and "<fx>_2" not in pipe.tokenizer.get_vocab()
    # The T5 tokenizer reads the new token as one piece, so a prompt reaches the new rows.
    fx_id = pipe.tokenizer_2.convert_tokens_to_ids("<fx>")
    assert fx_id in pipe.tokenizer_2("a photo of <fx> on a beach").input_ids


def test_t5_only_file_leaves_the_clip_tokenizers_untouched(tmp_path: Path) -> None:
    for kind, t5_slot, tokenizer_slot, clip_slots in (
        ("flux", "text_encoder_2", "tokenizer_2", ("tokenizer",)),
        ("sd3", "text_encoder_3", "tokenizer_3", ("tokenizer", "tokenizer_2")),
    ):
        pipe = _tiny(kind)
        clip_sizes = {slot: len(getattr(pipe, slot)) for slot in clip_slots}
        t5 = _rows(2, _width(getattr(pipe, t5_slot)), 3)
        path = _save(tmp_path / f"{kind}-t5_emb.safetensors", {"t5": t5})  # OneTrainer's spelling
        assert load_embeddings(pipe, path) == [f"{kind}-t5"]
        assert torch.equal(_rows_of(getattr(pipe, tokenizer_slot), getattr(pipe, t5_slot), f"{kind}-t5", 2), t5)
        assert {slot: len(getattr(pipe, slot)) for slot in clip_slots} == clip_sizes, kind


def test_sd3_file_loads_into_all_three_encoders_with_their_counts(tmp_path: Path) -> None:
    pipe = _tiny("sd3")
    slots = [
        ("clip_l", "tokenizer", "text_encoder", 1),
        ("clip_g", "tokenizer_2", "text_encoder_2", 1),
        ("t5xxl", "tokenizer_3", "text_encoder_3", 4),  # T5 with more vectors than the CLIP encoders
    ]
    tensors = {key: _rows(n, _width(getattr(pipe, enc)), i) for i, (key, _, enc, n) in enumerate(slots)}
    path = _save(tmp_path / "sd3.safetensors", tensors, {"name": "<sd3>"})
    assert load_embeddings(pipe, path) == ["<sd3>"]
    for key, tokenizer, encoder, count in slots:
        assert torch.equal(_rows_of(getattr(pipe, tokenizer), getattr(pipe, encoder), "<sd3>", count), tensors[key])
    assert "<sd3>_3" in pipe.tokenizer_3.get_vocab() and "<sd3>_1" not in pipe.tokenizer.get_vocab()


def test_loading_refuses_other_families_and_leaves_the_pipeline_alone(tmp_path: Path) -> None:
    flux, sdxl = _tiny("flux"), _tiny("sdxl")
    sizes = [len(flux.tokenizer), len(flux.tokenizer_2), len(sdxl.tokenizer), len(sdxl.tokenizer_2)]
    flux_file = _save(
        tmp_path / "f.safetensors", {"clip_l": _rows(1, SPEC.text_hidden_size, 1), "t5xxl": _rows(1, 64, 2)}
    )
    with pytest.raises(UserError) as error:
        load_embeddings(sdxl, flux_file)  # SDXL has no T5
    _one_line(error, "f.safetensors", "SDXL pipeline", "no t5xxl", "another model family")
    real_dims = _save(tmp_path / "real.safetensors", {"clip_l": _rows(1, 768, 3), "t5xxl": _rows(1, 4096, 4)})
    with pytest.raises(UserError) as error:
        load_embeddings(flux, real_dims)
    _one_line(
        error, "real.safetensors", "clip_l 768+t5xxl 4096 (flux)", str(SPEC.text_hidden_size), "another model family"
    )
    single = write_embedding(Embedding("<one>", {SINGLE: _rows(1, SPEC.text_hidden_size, 5)}), tmp_path / "one.pt")
    with pytest.raises(UserError) as error:
        load_embeddings(flux, single)
    _one_line(error, "one.pt", "Flux.1 pipeline", "no text_encoder", "another model family")
    assert [len(flux.tokenizer), len(flux.tokenizer_2), len(sdxl.tokenizer), len(sdxl.tokenizer_2)] == sizes


def test_replacing_a_token_adds_roles_it_lacked_and_replaces_the_rest(tmp_path: Path) -> None:
    pipe = _tiny("flux")
    t5_first = _save(tmp_path / "a.safetensors", {"t5xxl": _rows(2, 64, 1)}, {"name": "<r>"})
    load_embeddings(pipe, t5_first)
    both = {"clip_l": _rows(1, SPEC.text_hidden_size, 2), "t5xxl": _rows(2, 64, 3)}
    second = _save(tmp_path / "b.safetensors", both, {"name": "<r>"})
    with pytest.raises(UserError, match="already in the pipeline"):
        load_embeddings(pipe, second)
    assert "<r>" not in pipe.tokenizer.get_vocab()
    size_2 = len(pipe.tokenizer_2)
    assert load_embeddings(pipe, second, replace=True) == ["<r>"]
    assert len(pipe.tokenizer_2) == size_2
    assert torch.equal(_rows_of(pipe.tokenizer, pipe.text_encoder, "<r>", 1), both["clip_l"])
    assert torch.equal(_rows_of(pipe.tokenizer_2, pipe.text_encoder_2, "<r>", 2), both["t5xxl"])
    three = _save(tmp_path / "c.safetensors", {"t5xxl": _rows(3, 64, 4)}, {"name": "<r>"})
    with pytest.raises(UserError) as error:
        load_embeddings(pipe, three, replace=True)
    _one_line(error, "t5xxl", "different number of vectors")


def test_a_pipeline_class_no_family_names_gets_its_one_text_encoder(tmp_path: Path) -> None:
    sdxl = _tiny("sdxl")

    class CustomPipeline:  # not a diffusers class a family names: only text_encoder/tokenizer are used
        tokenizer, text_encoder = sdxl.tokenizer, sdxl.text_encoder
        tokenizer_2, text_encoder_2 = sdxl.tokenizer_2, sdxl.text_encoder_2

    single = write_embedding(Embedding("<c>", {SINGLE: _rows(2, SPEC.text_hidden_size, 1)}), tmp_path / "c.pt")
    size_2 = len(sdxl.tokenizer_2)
    assert load_embeddings(CustomPipeline(), single) == ["<c>"]
    assert torch.equal(_rows_of(sdxl.tokenizer, sdxl.text_encoder, "<c>", 2), _rows(2, SPEC.text_hidden_size, 1))
    assert len(sdxl.tokenizer_2) == size_2
    # A subclass of a family's pipeline class is that family's.
    subclass = type("MyFluxPipeline", (type(_tiny("flux")),), {})
    from textinv.embeddings.load import _pipeline_family

    assert _pipeline_family(object.__new__(subclass)).name == "flux"
