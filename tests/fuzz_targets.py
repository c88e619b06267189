"""Every reader of untrusted input as a fuzz target: a hypothesis strategy of inputs, and a run that feeds one input
to the reader under the property of tests/fuzz_harness.py and checks what a returned result holds.

``TARGETS`` maps a name to a :class:`Target`; tests/test_fuzz.py runs each with CI's seeded settings and bench/fuzz.py
for a set time. A case's input is written to a fresh folder (``work``) first, as a person's file would be.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fuzz_harness import (
    CAPTION_SEED,
    CONCEPT_SEED,
    TEMPLATE_SEED,
    UPLOAD_NAMES,
    Violation,
    check_property,
    json_values,
    mutated,
    pickle_edited,
    reset_folder,
    toml_values,
)


@dataclass
class Seeds:
    embeddings: list[bytes]  # whole files, every format
    pickles: list[bytes]  # raw pickles: .pdparams files and the data.pkl of torch zips
    zips: list[bytes]  # torch zip files (their data.pkl is edited and the zip packed again)
    images: list[bytes]
    model_files: dict[str, bytes]  # a pipeline folder's JSON files by relative path


@dataclass
class Target:
    strategy: Callable[[Seeds], st.SearchStrategy[Any]]
    run: Callable[[Any, Path], str]  # "ok" or "refused"; raises Violation/AssertionError otherwise


def load_seeds(embedding_files: list[Path], image_bytes: list[bytes], model_dir: Path) -> Seeds:
    files = [path.read_bytes() for path in embedding_files]
    zips = [data for data in files if data.startswith(b"PK\x03\x04")]
    pickles = [data for data in files if data[:1] == b"\x80"]
    for data in zips:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles += [archive.read(name) for name in archive.namelist() if name.endswith("data.pkl")]
    model_files = {f"{part.name}/.folder": b"" for part in model_dir.iterdir() if part.is_dir()}  # every part's folder
    model_files |= {
        str(path.relative_to(model_dir)): path.read_bytes()
        for path in sorted(model_dir.rglob("*.json"))
        if path.name in ("model_index.json", "config.json", "scheduler_config.json")
    }
    return Seeds(files, pickles, zips, image_bytes, model_files)


# --- embeddings ----------------------------------------------------------------------------------------
def _repacked(zip_bytes: bytes, pickle_bytes: bytes) -> bytes:
    """A torch zip with its data.pkl replaced (stored, as torch writes; the CRC is right, so the pickle is read)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, pickle_bytes if info.filename.endswith("data.pkl") else source.read(info))
    return out.getvalue()


def embedding_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[str, bytes]]:
    files = st.sampled_from(seeds.embeddings)
    pickles = st.sampled_from(seeds.pickles)
    in_zip = st.tuples(st.sampled_from(seeds.zips), pickle_edited(pickles)).map(lambda pair: _repacked(*pair))
    data = st.one_of(mutated(files), pickle_edited(pickles), in_zip, st.binary(max_size=64))
    return st.tuples(st.sampled_from([".safetensors", ".pt", ".bin", ".pdparams", ".png", ""]), data)


def run_embedding(case: tuple[str, bytes], work: Path) -> str:
    import torch

    from textinv.embeddings import describe, read_embeddings

    suffix, data = case
    path = reset_folder(work) / f"word{suffix}"
    path.write_bytes(data)
    outcome, result = check_property(lambda: (read_embeddings(path), describe(path)))
    if outcome == "ok":
        embeddings, info = result
        assert embeddings and len(info["tokens"]) == len(embeddings)
        for embedding in embeddings:
            assert isinstance(embedding.token, str) and embedding.token
            for vectors in embedding.vectors.values():
                assert vectors.dtype == torch.float32 and vectors.dim() == 2 and bool(torch.isfinite(vectors).all())
    return outcome


# --- captions and template files -----------------------------------------------------------------------
def caption_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[bytes, bytes, str, int]]:
    captions = mutated(st.sampled_from([CAPTION_SEED, b"", "标签，猫，[name]".encode()])) | st.binary(max_size=64)
    templates = mutated(st.sampled_from([TEMPLATE_SEED.encode("utf-8"), "[name]".encode("utf-16")]))
    tokens = st.text(min_size=1, max_size=12) | st.sampled_from(["<cat-toy>", "(.*)", "\\1", "{}", "[name]"])
    return st.tuples(captions, templates, tokens, st.integers(0, 3))


def run_captions(case: tuple[bytes, bytes, str, int], work: Path) -> str:
    import numpy as np

    from textinv.data.captions import Captioner, TagRules, read_caption_file
    from textinv.data.options import read_template_file

    caption_bytes, template_bytes, token, keep = case
    folder = reset_folder(work)
    (folder / "cat.txt").write_bytes(caption_bytes)
    (folder / "templates.txt").write_bytes(template_bytes)
    rules = TagRules(shuffle=True, keep_tokens=keep, tag_dropout_rate=0.5, caption_dropout_rate=0.2)

    def read() -> list[str]:
        caption = read_caption_file(folder / "cat.txt")
        templates = read_template_file(str(folder / "templates.txt"))
        rng = np.random.default_rng(0)
        filled = Captioner(templates, token, token, [caption], True, rules).caption(0, 0, rng)
        placed = Captioner(("a photo of a {}",), token, token, [caption], False, rules).caption(0, 0, rng)
        return [caption, filled, placed]

    outcome, result = check_property(read)
    if outcome == "ok":
        assert all(isinstance(text, str) for text in result)
    return outcome


# --- the concepts file (TOML) ---------------------------------------------------------------------------
_KEYS = st.sampled_from(
    [
        "placeholder_token",
        "initializer_token",
        "num_vectors",
        "init_embeddings",
        "train_data_dir",
        "learnable_property",
        "repeats",
        "caption_extension",
        "template_file",
        "keep_tokens",
        "caption_dropout_rate",
        "resolution",
        "concept",
        "x",
    ]
)


def concept_inputs(seeds: Seeds) -> st.SearchStrategy[bytes]:
    line = st.tuples(_KEYS, toml_values()).map(lambda kv: f"{kv[0]} = {kv[1]}")
    table = st.lists(line, max_size=6).map(lambda lines: "[[concept]]\n" + "\n".join(lines) + "\n")
    generated = st.lists(table, min_size=1, max_size=3).map(lambda tables: "".join(tables).encode())
    deep = st.integers(1, 5000).map(lambda n: f"[[concept]]\nplaceholder_token = {'[' * n}1{']' * n}\n".encode())
    return st.one_of(mutated(st.just(CONCEPT_SEED.encode())), generated, deep)


def run_concepts(data: bytes, work: Path) -> str:
    from textinv.config import TrainConfig
    from textinv.data.concepts import concept_configs

    folder = reset_folder(work)
    (folder / "cat").mkdir()
    (folder / "concepts.toml").write_bytes(data)
    config = TrainConfig(pretrained_model_name_or_path=str(folder), concepts=str(folder / "concepts.toml"))
    outcome, result = check_property(lambda: concept_configs(config))
    if outcome == "ok":
        assert result and all(isinstance(one.placeholder_token, str) for one in result)
    return outcome


# --- image folders: images, masks, buckets -----------------------------------------------------------------
def image_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[list[bytes], bytes, bool]]:
    images = st.sampled_from(seeds.images)
    one = mutated(images, max_edits=3)
    return st.tuples(st.lists(one, min_size=1, max_size=3), one, st.booleans())


def run_images(case: tuple[list[bytes], bytes, bool], work: Path) -> str:
    from textinv.data.buckets import assign_buckets
    from textinv.data.images import discover_images, load_rgb, upright_size
    from textinv.data.masks import load_masks

    images, mask, alpha = case
    folder = reset_folder(work)
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    for index, data in enumerate(images):
        (folder / "images" / f"{index}.png").write_bytes(data)
        (folder / "masks" / f"{index}.png").write_bytes(mask)

    def read() -> list[tuple[int, int]]:
        found = discover_images(folder / "images")
        sizes = [upright_size(path) for path in found]
        for path in found:
            load_rgb(path)
        load_masks(found, None if alpha else str(folder / "masks"), alpha)
        return assign_buckets(sizes, 64 * 64, 32, 128, 8)

    outcome, result = check_property(read)
    if outcome == "ok":
        assert all(32 <= h <= 128 and 32 <= w <= 128 for h, w in result)
    return outcome


# --- a model folder's JSON files -------------------------------------------------------------------------
@st.composite
def model_folder_inputs(draw: st.DrawFn, seeds: Seeds) -> dict[str, bytes]:
    files = dict(seeds.model_files)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(files)))
        kind = draw(st.sampled_from(["value", "bytes", "delete", "replace"]))
        if kind == "bytes":
            files[name] = draw(mutated(st.just(files[name]), max_edits=2))
        elif kind == "delete":
            files.pop(name)
            if not files:
                break
        elif kind == "replace":
            files[name] = json.dumps(draw(json_values())).encode()
        else:
            try:
                document = json.loads(files[name])
            except ValueError:
                continue
            if isinstance(document, dict) and document:
                document[draw(st.sampled_from(sorted(document)))] = draw(json_values())
                files[name] = json.dumps(document).encode()
    return files


def run_model_folder(files: dict[str, bytes], work: Path) -> str:
    from textinv.models.loading import inspect_pipeline, local_model_dir
    from textinv.serve.checks import check_model_folder
    from textinv.serve.state import native_resolution

    folder = reset_folder(work) / "model"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    outcome, result = check_property(
        lambda: (local_model_dir(str(folder)), check_model_folder(str(folder)), inspect_pipeline(folder))
    )
    resolution_outcome, resolution = check_property(lambda: native_resolution(folder))
    assert resolution_outcome == "ok" and isinstance(resolution, int) and 8 <= resolution <= 8192, resolution
    if outcome == "ok":
        assert result[0] == folder and result[1] == folder.resolve() and result[2].family.name
    return outcome


# --- the web page's uploads --------------------------------------------------------------------------------
def upload_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[list[tuple[bytes, str]], tuple[bytes, str], str]]:
    image = st.tuples(mutated(st.sampled_from(seeds.images), max_edits=2), UPLOAD_NAMES)
    caption = st.tuples(mutated(st.just(CAPTION_SEED), max_edits=2), UPLOAD_NAMES.map(lambda n: n + ".txt"))
    embedding = st.tuples(mutated(st.sampled_from(seeds.embeddings), max_edits=2), UPLOAD_NAMES)
    box = st.text(max_size=80) | st.just("cat.png: a red car\n../x: y")
    return st.tuples(st.lists(image | caption, min_size=1, max_size=4), embedding, box)


_STORED = re.compile(r"\d\d-[A-Za-z0-9_-]{1,40}\.(png|jpg|webp|bmp)")


def run_uploads(case: tuple[list[tuple[bytes, str]], tuple[bytes, str], str], work: Path) -> str:
    from textinv.serve.captions import gather_captions, split_uploads, write_captions
    from textinv.serve.uploads import store_embedding_file, store_images

    files, (embedding, embedding_name), box = case
    folder = reset_folder(work)
    (folder / "browser").mkdir()
    uploads = []
    for index, (data, name) in enumerate(files):  # where the web framework would have put each upload
        (folder / "browser" / str(index)).write_bytes(data)
        uploads.append((str(folder / "browser" / str(index)), name))
    (folder / "browser" / "embedding").write_bytes(embedding)
    server = folder / "server"

    def store() -> tuple[Any, ...]:
        images, caption_uploads = split_uploads(uploads)
        captions = gather_captions(caption_uploads, box, [name for _, name in images])
        stored = store_images(images, server / "images")
        return stored, write_captions(stored, captions)

    outcome, result = check_property(store, allowed=server)
    if outcome == "ok":
        stored, written = result
        for entry in stored:
            assert _STORED.fullmatch(entry.path.name) and entry.path.parent == (server / "images").resolve()
        assert all(path.parent == (server / "images").resolve() for path in written)
    word = check_property(
        lambda: store_embedding_file(folder / "browser" / "embedding", embedding_name, server / "words"),
        allowed=server,
    )
    if word[0] == "ok":
        assert word[1].parent == (server / "words").resolve()
    outside = [p for p in folder.rglob("*") if not (p == server or server in p.parents or "browser" in p.parts)]
    if outside:
        raise Violation(f"files outside the server folder: {outside[:3]}")
    return outcome


TARGETS: dict[str, Target] = {
    "embeddings": Target(embedding_inputs, run_embedding),
    "captions": Target(caption_inputs, run_captions),
    "concepts": Target(concept_inputs, run_concepts),
    "images": Target(image_inputs, run_images),
    "model-folder": Target(lambda seeds: model_folder_inputs(seeds), run_model_folder),
    "uploads": Target(upload_inputs, run_uploads),
}
