"""The bad-input table: every mistake ends in one clear line, exit 2, no traceback, nothing lost.

Cases run ``textinv.cli.main`` in-process (the same code path as the command, minus interpreter
start-up); test_cli.py runs a few of them as real subprocesses to prove exit codes end to end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from textinv import cli

PRECIOUS = b"results of an earlier run"
TEMPLATES_WITHOUT_NAME = b"a photo of [name]\na photo of a cat\n"


@dataclass
class Scene:
    """What a case may use: the tiny model, good images, and a scratch folder."""

    model: Path
    images: Path
    root: Path
    precious: list[Path] = field(default_factory=list)  # files that must survive untouched

    def folder(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, content in (files or {}).items():
            (folder / file_name).write_bytes(content)
        return folder

    def keep(self, path: Path, content: bytes = PRECIOUS) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.precious.append(path)
        return path

    def train(
        self,
        *extra: str,
        images: Optional[Path] = None,
        output_dir: Optional[Path] = None,
        model: Optional[Path] = None,
    ) -> list[str]:
        return [
            "train",
            f"--pretrained_model_name_or_path={model or self.model}",
            f"--train_data_dir={images or self.images}",
            "--placeholder_token=<cat-toy>",
            "--initializer_token=toy",
            "--resolution=64",
            "--train_batch_size=1",
            "--max_train_steps=2",
            "--only_save_embeds",
            f"--output_dir={output_dir or self.root / 'out'}",
            *extra,
        ]

    def generate(self, *extra: str) -> list[str]:
        return [
            "generate",
            "--model",
            str(self.model),
            "--prompt",
            "a toy",
            "--num_inference_steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--output_dir",
            str(self.root / "images"),
            *extra,
        ]


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb's calling card)."""
    signature = b"\x89PNG\r\n\x1a\n"
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _image_bytes(size: tuple[int, int], suffix: str = "PNG") -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, suffix)
    return buffer.getvalue()


def _broken_model(scene: Scene, drop: str) -> Path:
    import shutil

    broken = scene.root / f"model-without-{drop}"
    shutil.copytree(scene.model, broken)
    shutil.rmtree(broken / drop)
    return broken


def _truncated_weights_model(scene: Scene) -> Path:
    import shutil

    broken = scene.root / "model-truncated"
    shutil.copytree(scene.model, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return broken


def _earlier_run(scene: Scene) -> Path:
    out = scene.root / "out"
    scene.keep(out / "learned_embeds.safetensors")
    return out


def _an_embedding(scene: Scene, dim: int, name: str = "emb.safetensors") -> Path:
    path = scene.root / name
    save_file({"<thing>": torch.ones(1, dim)}, str(path))
    return path


# (id, argv builder, fragments the one error line must contain)
Case = tuple[str, Callable[[Scene], list[str]], tuple[str, ...]]
CASES: list[Case] = [
    # --- train: flags out of range, wrong types, unknown names ---------------------------------
    ("resolution-not-multiple-of-8", lambda s: s.train("--resolution=100"), ("--resolution", "100", "multiple of 8")),
    ("height-not-multiple-of-8", lambda s: s.train("--height=60"), ("--height", "60", "multiple of 8")),
    ("max-train-steps-zero", lambda s: s.train("--max_train_steps=0"), ("--max_train_steps 0",)),
    ("learning-rate-negative", lambda s: s.train("--learning_rate=-1"), ("--learning_rate", "-1")),
    ("learning-rate-not-a-number", lambda s: s.train("--learning_rate=fast"), ("--learning_rate", "fast")),
    ("batch-size-float", lambda s: s.train("--train_batch_size=1.5"), ("--train_batch_size", "1.5")),
    ("num-vectors-zero", lambda s: s.train("--num_vectors=0"), ("--num_vectors", "0")),
    ("unknown-scheduler", lambda s: s.train("--lr_scheduler=steep"), ("--lr_scheduler", "steep")),
    ("unknown-property", lambda s: s.train("--learnable_property=color"), ("--learnable_property", "color")),
    ("unknown-flag", lambda s: s.train("--frobnicate"), ("--frobnicate",)),
    ("checkpoint-limit-zero", lambda s: s.train("--checkpoints_total_limit=0"), ("--checkpoints_total_limit", "0")),
    # --- train: tokens -------------------------------------------------------------------------
    ("placeholder-is-a-word", lambda s: s.train("--placeholder_token=toy"), ("--placeholder_token", "toy")),
    ("placeholder-is-special", lambda s: s.train("--placeholder_token=<|endoftext|>"), ("<|endoftext|>",)),
    (
        "placeholder-with-space",
        lambda s: s.train("--placeholder_token=<cat toy>"),
        ("--placeholder_token", "<cat toy>"),
    ),
    (
        "initializer-several-tokens",
        lambda s: s.train("--initializer_token=toy robot"),
        ("--initializer_token", "--num_vectors 2"),
    ),
    (
        "initializer-missing",
        lambda s: [a for a in s.train() if not a.startswith("--initializer_token")],
        ("--initializer_token", "--init_embeddings"),
    ),
    ("init-embeddings-missing", lambda s: s.train(f"--init_embeddings={s.root / 'gone.pt'}"), ("gone.pt",)),
    (
        "init-embeddings-wrong-dim",
        lambda s: s.train(f"--init_embeddings={_an_embedding(s, 768)}"),
        ("768", "32", "--init_embeddings"),
    ),
    # --- train: captions, buckets, masks (issue 17) ----------------------------------------------
    (
        "caption-file-not-utf8",
        lambda s: s.train(
            "--caption_extension=.txt",
            images=s.folder("latin1", {"a.png": _image_bytes((64, 64)), "a.txt": "café crème".encode("latin-1")}),
        ),
        ("a.txt", "not UTF-8"),
    ),
    (
        "mask-of-another-size",
        lambda s: s.train(
            f"--mask_dir={s.folder('masks', {'a.png': _image_bytes((32, 32))})}",
            images=s.folder("masked", {"a.png": _image_bytes((64, 64))}),
        ),
        ("a.png", "32x32", "64x64"),
    ),
    (
        "mask-missing-for-an-image",
        lambda s: s.train(
            f"--mask_dir={s.folder('few-masks', {'a.png': _image_bytes((64, 64))})}",
            images=s.folder("two", {"a.png": _image_bytes((64, 64)), "b.png": _image_bytes((64, 64))}),
        ),
        ("--mask_dir", "no mask for b.png"),
    ),
    (
        "template-file-without-name",
        lambda s: s.train(
            f"--template_file={s.folder('tpl', {'templates.txt': TEMPLATES_WITHOUT_NAME}) / 'templates.txt'}"
        ),
        ("templates.txt", "line 2", "[name]"),
    ),
    (
        "bucket-range-without-bucket",
        lambda s: s.train("--enable_bucket", "--min_bucket_reso=768", "--max_bucket_reso=1024"),
        ("--min_bucket_reso 768", "holds no bucket"),
    ),
    (
        "tag-rules-without-captions",
        lambda s: s.train("--shuffle_caption"),
        ("--shuffle_caption", "--caption_extension"),
    ),
    ("caption-dropout-above-one", lambda s: s.train("--caption_dropout_rate=1.5"), ("--caption_dropout_rate", "1.5")),
    # --- train: images -------------------------------------------------------------------------
    ("data-dir-missing", lambda s: s.train(images=s.root / "nope"), ("nope", "does not exist")),
    ("data-dir-empty-flag", lambda s: s.train("--train_data_dir="), ("--train_data_dir",)),
    ("data-dir-is-a-file", lambda s: s.train(images=s.keep(s.root / "notes.txt")), ("notes.txt", "is a file")),
    (
        "data-dir-without-images",
        lambda s: s.train(images=s.folder("docs", {"readme.txt": b"hi"})),
        ("no image files", "readme.txt"),
    ),
    ("zero-byte-image", lambda s: s.train(images=s.folder("zero", {"a.jpg": b""})), ("a.jpg",)),
    ("text-named-png", lambda s: s.train(images=s.folder("text", {"b.png": b"just some text"})), ("b.png",)),
    (
        "huge-image",
        lambda s: s.train(images=s.folder("huge", {"big.png": _png_claiming(60000, 60000)})),
        ("big.png", "3600000000 pixels"),
    ),
    (
        "one-pixel-image",
        lambda s: s.train(images=s.folder("dot", {"dot.png": _image_bytes((1, 1))})),
        ("dot.png", "1x1"),
    ),
    # --- train: model folder -------------------------------------------------------------------
    ("model-missing", lambda s: s.train(model=s.root / "no-model"), ("no-model", "does not exist")),
    ("model-not-a-pipeline", lambda s: s.train(model=s.images), ("model_index.json",)),
    ("model-missing-unet", lambda s: s.train(model=_broken_model(s, "unet")), ("unet",)),
    ("model-missing-tokenizer", lambda s: s.train(model=_broken_model(s, "tokenizer")), ("tokenizer",)),
    ("model-truncated-weights", lambda s: s.train(model=_truncated_weights_model(s)), ("model-truncated",)),
    # --- train: output_dir and resume ----------------------------------------------------------
    (
        "output-dir-holds-a-run",
        lambda s: s.train(output_dir=_earlier_run(s)),
        ("already holds another run", "--overwrite_output_dir"),
    ),
    ("output-dir-is-a-file", lambda s: s.train(output_dir=s.keep(s.root / "out.txt")), ("out.txt", "is a file")),
    (
        "resume-without-checkpoints",
        lambda s: s.train("--resume_from_checkpoint=latest"),
        ("--resume_from_checkpoint", "latest"),
    ),
    (
        "resume-from-missing-folder",
        lambda s: s.train(f"--resume_from_checkpoint={s.root / 'checkpoint-7'}"),
        ("checkpoint-7",),
    ),
    # --- generate ------------------------------------------------------------------------------
    (
        "generate-model-missing",
        lambda s: ["generate", "--model", str(s.root / "none"), "--prompt", "x"],
        ("none", "does not exist"),
    ),
    ("generate-empty-prompt", lambda s: s.generate("--prompt", " "), ("--prompt",)),
    ("generate-zero-images", lambda s: s.generate("--num_images", "0"), ("--num_images 0",)),
    ("generate-width-not-multiple", lambda s: s.generate("--width", "30"), ("--width 30", "multiple of 8")),
    (
        "generate-embedding-missing",
        lambda s: s.generate("--embeddings", str(s.root / "gone.safetensors")),
        ("gone.safetensors",),
    ),
    ("generate-embedding-wrong-dim", lambda s: s.generate("--embeddings", str(_an_embedding(s, 768))), ("768", "32")),
    ("generate-bad-device", lambda s: s.generate("--device", "tpu9"), ("--device", "tpu9")),
    # --- inspect and convert -------------------------------------------------------------------
    ("inspect-missing-file", lambda s: ["inspect", str(s.root / "absent.pt")], ("absent.pt",)),
    (
        "inspect-zero-byte-file",
        lambda s: ["inspect", str(s.folder("e", {"empty.pt": b""}) / "empty.pt")],
        ("empty.pt",),
    ),
    (
        "inspect-text-named-pt",
        lambda s: ["inspect", str(s.folder("t", {"words.pt": b"hello there"}) / "words.pt")],
        ("words.pt",),
    ),
    (
        "inspect-image-without-embedding",
        lambda s: ["inspect", str(s.folder("i", {"photo.png": _image_bytes((16, 16))}) / "photo.png")],
        ("photo.png",),
    ),
    (
        "convert-unknown-suffix",
        lambda s: ["convert", str(_an_embedding(s, 768)), str(s.root / "out.docx")],
        ("out.docx",),
    ),
    (
        "convert-would-overwrite",
        lambda s: ["convert", str(_an_embedding(s, 768)), str(s.keep(s.root / "mine.pt"))],
        ("mine.pt", "--overwrite"),
    ),
    (
        "convert-unknown-format",
        lambda s: ["convert", str(_an_embedding(s, 768)), str(s.root / "x.pt"), "--to", "comfy"],
        ("--to", "comfy"),
    ),
]


@pytest.fixture()
def scene(tiny_model: Path, train_images: Path, tmp_path: Path) -> Scene:
    return Scene(tiny_model, train_images, tmp_path)


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_one_clear_line(code: int, stderr: str, fragments: tuple[str, ...], expected_code: int = 2) -> None:
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_every_case_pins_its_message_and_the_check_rejects_unclear_errors() -> None:
    # Each case names the words of its own message (no fragments would accept any error line), and
    # no two cases share an id (pytest would silently number duplicates apart).
    assert all(fragments and all(f.strip() for f in fragments) for _, _, fragments in CASES)
    assert len({case[0] for case in CASES}) == len(CASES)
    # The check the table relies on: it passes one clear line and fails everything else.
    clear = "textinv: error: --resolution 100 is not a multiple of 8 (try 96 or 104)\n"
    assert_one_clear_line(2, clear, ("--resolution", "100", "multiple of 8"))
    unclear = [
        (1, clear, ()),  # an exit code other than 2
        (0, clear, ()),
        (2, "Traceback (most recent call last):\n  File ...\nValueError: 100\n" + clear, ()),
        (2, clear + "textinv: error: and a second one\n", ()),
        (2, "warning: something odd\n", ()),  # no error line at all
        (2, clear, ("--height",)),  # an error, but not about this mistake
    ]
    for code, stderr, fragments in unclear:
        with pytest.raises(AssertionError):
            assert_one_clear_line(code, stderr, fragments)


@pytest.mark.parametrize("name, argv_for, fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input(
    name: str,
    argv_for: Callable[[Scene], list[str]],
    fragments: tuple[str, ...],
    scene: Scene,
    capsys: pytest.CaptureFixture,
) -> None:
    argv = argv_for(scene)
    code, stderr = run_main(argv, capsys)
    assert_one_clear_line(code, stderr, fragments)
    for path in scene.precious:
        assert path.read_bytes() == PRECIOUS, f"{path} was changed"
    # A refused training run leaves no half-made results behind.
    out = scene.root / "out"
    if argv[0] == "train" and name != "output-dir-holds-a-run" and out.exists():
        assert not list(out.glob("learned_embeds*")) and not list(out.glob("checkpoint-*"))


# --- unicode and spaces: these are not mistakes, they must simply work ---------------------------


def test_unicode_and_spaces_in_paths_and_token(scene: Scene, capsys: pytest.CaptureFixture) -> None:
    images = scene.root / "mis imágenes 猫"
    images.mkdir()
    for image in scene.images.iterdir():
        (images / f"foto {image.name}").write_bytes(image.read_bytes())
    out = scene.root / "salida con espacios ü"
    argv = scene.train(images=images, output_dir=out)
    argv[3] = "--placeholder_token=<猫-toy>"
    code, stderr = run_main(argv, capsys)
    assert code == 0, stderr
    assert list(load_file(out / "learned_embeds.safetensors")) == ["<猫-toy>"]


# --- the file system fights back -----------------------------------------------------------------


# Root on this project's machines (and CI, the same kind) may mount a tmpfs: a real read-only or 256 KiB file system.
# Where mount is refused (a container without CAP_SYS_ADMIN), the tests raise the error such a file system raises
# (same errno, same text) at the call that meets it, and check the whole line textinv prints for it.


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return mounted.returncode == 0


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_read_only_output_dir(scene: Scene, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    target = scene.root / "read-only"
    mounted = False
    if os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o555)
        reason = os.strerror(errno.EACCES)
    else:
        # root ignores permission bits: a real read-only mount, else the error one gives (EROFS) at the write probe.
        mounted = _mount_tmpfs(target, "size=64k,ro")
        reason = os.strerror(errno.EROFS)
        if not mounted:
            import tempfile

            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    try:
        code, stderr = run_main(scene.train(output_dir=target / "out"), capsys)
        assert code == 2, stderr
        assert _error_line(stderr) == (
            f"textinv: error: --output_dir {str(target / 'out')!r} is not writable ({reason}); "
            "choose a directory you can write to"
        )
    finally:
        if mounted:
            _unmount(target)
        elif target.exists():
            target.chmod(0o755)


def test_disk_full_while_saving_keeps_the_embedding(
    scene: Scene, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline copy does not fit: one line, exit 2, and the embedding written before it is intact."""
    from textinv.training import export

    target = scene.root / "small-disk"
    # 256 KiB holds the embedding, run.json and checkpoints, not the tiny pipeline's weights.
    mounted = _mount_tmpfs(target, "size=256k")
    if not mounted:

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "out" / "unet"))

        monkeypatch.setattr(export, "save_pipeline", full_disk)
    try:
        argv = [arg for arg in scene.train(output_dir=target / "out") if arg != "--only_save_embeds"]
        code, stderr = run_main(argv, capsys)
        assert code == 2, stderr
        # The file that did not fit is the first large one the save reaches (on a real disk: whichever that is).
        folder = re.escape(str(target / "out"))
        assert re.fullmatch(
            rf"textinv: error: No space left on device \({folder}/[^()]+\); free space or choose another folder",
            _error_line(stderr),
        ), stderr
        embedding = load_file(target / "out" / "learned_embeds.safetensors")
        assert embedding["<cat-toy>"].shape == (1, 32) and torch.isfinite(embedding["<cat-toy>"]).all()
        assert not [p for p in (target / "out").rglob("*") if ".tmp" in p.name], "a temporary file was left"
        record = json.loads((target / "out" / "run.json").read_text())
        assert record["identity"]["placeholder_token"] == "<cat-toy>"
    finally:
        if mounted:
            _unmount(target)
