"""``textinv serve`` without a browser: uploads, the one-job rule, stop/resume, exports, generation, host rules.

The page is a thin layer over ServerState (tests/test_serve_browser.py drives the page itself);
here the same objects are called directly, training for real on the tiny pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from textinv.config import UserError
from textinv.data.captions import image_captions
from textinv.embeddings import read_embeddings
from textinv.events import RUN_FILE
from textinv.serve.captions import gather_captions, split_uploads, write_captions
from textinv.serve.checks import check_host, check_model_folder, is_loopback
from textinv.serve.errors import render_error
from textinv.serve.jobs import TrainRequest
from textinv.serve.state import EXPORT_FORMATS, GenerateRequest, ServerState
from textinv.serve.uploads import UploadLimits, safe_stem, store_embedding_file, store_images
from textinv.tiny import demo_images_dir


def wait_for(condition: Callable[[], bool], timeout: float = 300.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def png_file(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    Image.new(mode, size, "red" if mode == "RGB" else 0).save(path, format="PNG")
    return path


def demo_uploads() -> list[tuple[str, str]]:
    return [(str(path), path.name) for path in sorted(demo_images_dir().glob("*.jpg"))]


# --- uploads ---------------------------------------------------------------------------------------
def test_a_text_file_named_png_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture\n")
    good = png_file(tmp_path / "good.png")
    folder = tmp_path / "server" / "images"
    with pytest.raises(UserError, match=r"'holiday.png' is not an image"):
        store_images([(str(good), "good.png"), (str(fake), "holiday.png")], folder)
    # All or nothing: the good image was not stored either.
    assert not folder.exists() or not any(folder.iterdir())


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    # 8200 x 8200 is just over the CLI's limit (8192 x 8192); mode "1" keeps the file tiny.
    big = png_file(tmp_path / "big.png", (8200, 8200), mode="1")
    assert big.stat().st_size < 1_000_000
    with pytest.raises(UserError, match=r"8200x8200 pixels, more than the limit of 67108864"):
        store_images([(str(big), "big.png")], tmp_path / "images")
    # Far beyond Pillow's own bomb limit: refused as well (by Pillow, before any pixel is decoded).
    bomb = png_file(tmp_path / "bomb.png", (13500, 13500), mode="1")
    with pytest.raises(UserError, match=r"'bomb.png' claims a size far beyond the limit"):
        store_images([(str(bomb), "bomb.png")], tmp_path / "images")
    # A limit set lower applies as given.
    small = png_file(tmp_path / "small.png", (40, 40))
    with pytest.raises(UserError, match=r"more than the limit of 1000 pixels"):
        store_images([(str(small), "small.png")], tmp_path / "images", UploadLimits(max_image_pixels=1000))


def test_file_size_count_and_damage_limits(tmp_path: Path) -> None:
    image = png_file(tmp_path / "a.png", (64, 64))
    with pytest.raises(UserError, match=r"'a.png' is .* MiB; the limit is 0 MiB"):
        store_images([(str(image), "a.png")], tmp_path / "one", UploadLimits(max_image_bytes=100))
    with pytest.raises(UserError, match=r"3 images is too many; give at most 2"):
        store_images([(str(image), "a.png")] * 3, tmp_path / "two", UploadLimits(max_images=2))
    with pytest.raises(UserError, match=r"no images"):
        store_images([], tmp_path / "three")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:-40])
    with pytest.raises(UserError, match=r"'cut.png' is a damaged image"):
        store_images([(str(truncated), "cut.png")], tmp_path / "four")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    with pytest.raises(UserError, match=r"'anim.gif' is a GIF image; upload PNG, JPEG, WEBP, BMP images"):
        store_images([(str(gif), "anim.gif")], tmp_path / "five")


def test_path_like_file_names_are_sanitised_inside_the_server_folder(tmp_path: Path) -> None:
    png = png_file(tmp_path / "upload-1")
    jpeg = tmp_path / "upload-2"
    Image.new("RGB", (32, 32), "blue").save(jpeg, format="JPEG")
    server = tmp_path / "server"
    folder = server / "jobs" / "job-1" / "images"
    stored = store_images(
        [
            (str(png), "../../etc/passwd.png"),
            (str(jpeg), "C:\\Users\\me\\..\\my photo!.PNG"),  # a JPEG whatever its name says
            (str(png), "/.."),
        ],
        folder,
    )
    assert [s.path.name for s in stored] == ["00-passwd.png", "01-my-photo.jpg", "02-image.png"]
    for entry in stored:
        assert entry.path.parent == folder.resolve()
        assert entry.path.read_bytes() in (png.read_bytes(), jpeg.read_bytes())
    assert stored[0].original_name == "../../etc/passwd.png"  # kept for display only
    assert not (tmp_path / "etc").exists() and not (server / "etc").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["00-passwd.png", "01-my-photo.jpg", "02-image.png"]
    assert safe_stem("..") == "file" and safe_stem(".bashrc") == "bashrc" and safe_stem("a/b\\c d.tar.gz") == "c-d-tar"


def test_an_uploaded_embedding_file_is_read_before_it_is_kept(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"<html>not found</html>")
    folder = tmp_path / "embeddings"
    with pytest.raises(UserError) as caught:
        store_embedding_file(junk, "../x/cat.pt", folder, name="upload-001")
    # The person's name for the file, not the server's copy; and the copy is gone.
    assert "'cat.pt' is an HTML page" in str(caught.value) and str(folder) not in str(caught.value)
    assert list(folder.iterdir()) == []


# --- captions ---------------------------------------------------------------------------------------
def text_file(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_captions_from_files_and_the_box_are_stored_beside_their_images_and_train(
    tmp_path: Path, tiny_model: Path
) -> None:
    images = demo_uploads()[:3]  # 00.jpg, 01.jpg, 02.jpg
    files = [
        (str(text_file(tmp_path / "a", "\ufeff{} on a red sofa\n")), "00.txt"),  # a BOM, as Notepad writes
        (str(text_file(tmp_path / "b", "blurry, from a file")), "01.caption"),
    ]
    box = "\n01.jpg: in the garden\n"  # over 01.caption; 02.jpg has no caption at all
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(
        images=[files[0], *images, files[1]],  # caption files anywhere in the upload
        captions=box,
        placeholder_token="<cat-toy>",
        initializer_token="toy",
        max_train_steps=2,
        validation_prompt="",
    )
    job = state.start(request)
    assert job.join(300) and state.snapshot().status == "done", state.snapshot().message
    folder = Path(job.config.train_data_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["00-00.jpg", "00-00.txt", "01-01.jpg", "01-01.txt", "02-02.jpg"]
    assert job.num_images == 3 and job.num_captions == 2
    assert job.config.caption_extension == ".txt"
    # What training reads back from the stored files, and what it recorded using.
    stored = sorted(folder.glob("*.jpg"))
    assert image_captions(stored, ".txt") == ["{} on a red sofa", "in the garden", None]
    recorded = json.loads((job.output_dir / RUN_FILE).read_text(encoding="utf-8"))["identity"]["data"]["captions"]
    assert recorded["source"] == ".txt caption files" and recorded["images_with_caption"] == 2

    # Only empty captions (an empty file, an emptied box line): no caption, so the config of a plain upload.
    empty = (str(text_file(tmp_path / "c", " \n")), "00.txt")
    plain = state.start(dataclasses.replace(request, images=[empty, *images], captions="01:  "))
    assert plain.join(300) and state.snapshot().status == "done", state.snapshot().message
    assert plain.config.caption_extension is None and plain.num_captions == 0
    assert not list(Path(plain.config.train_data_dir).glob("*.txt"))
    same_folders = {"train_data_dir": plain.config.train_data_dir, "output_dir": plain.config.output_dir}
    assert dataclasses.replace(job.config, caption_extension=None, **same_folders) == plain.config


@pytest.mark.parametrize(
    ("files", "box", "error"),
    [
        ([(b"caf\xe9 au lait", "00.txt")], "", r"^caption file '00.txt' is not UTF-8 text \(invalid .* at byte 3\)"),
        ([(b"a dog", "dog.txt")], "", r"^caption file 'dog.txt' matches no uploaded image"),
        ([(b"x" * 4097, "00.caption")], "", r"^caption file '00.caption' is 4097 bytes; the limit is 4096 bytes$"),
        (
            [(b"a cat", "00.caption"), (b"a toy", "00.txt")],
            "",
            r"^two caption files for '00.jpg': '00.caption' and '00.txt'; keep one$",
        ),
        ([], "02.jpg: a toy\ndog.png: a dog", r"^captions box line 2: 'dog.png' is not an uploaded image"),
        ([], "a toy on a sofa", r"^captions box line 1 'a toy on a sofa' names no image; write one line per"),
        ([], "00: a\n00.jpg: b", r"^captions box lines 1 and 2 both caption '00.jpg'$"),
    ],
)
def test_a_bad_caption_is_refused_in_one_line_and_nothing_is_kept(
    tmp_path: Path, tiny_model: Path, files: list[tuple[bytes, str]], box: str, error: str
) -> None:
    uploads = demo_uploads()[:3]
    uploads += [(str(text_file(tmp_path / f"upload-{i}", data)), name) for i, (data, name) in enumerate(files)]
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    with pytest.raises(UserError) as caught:
        state.start(TrainRequest(images=uploads, captions=box, placeholder_token="<t>", initializer_token="toy"))
    shown = render_error(caught.value)
    assert re.search(error, str(caught.value)), shown
    assert shown == "error: " + str(caught.value) and "\n" not in shown  # one line, as the page shows it
    assert state.snapshot() is None and not (state.work_dir / "jobs").exists()  # refused before anything is kept


def test_path_like_caption_file_names_stay_inside_the_image_folder(tmp_path: Path) -> None:
    png = png_file(tmp_path / "upload-1")
    text = text_file(tmp_path / "upload-2", "a red square")
    uploads = [
        (str(png), "../../etc/passwd.png"),
        (str(text), "../../etc/passwd.txt"),
        (str(png), "C:\\Users\\me\\my photo.png"),
        (str(text), "C:\\Users\\..\\..\\my photo.CAPTION"),
    ]
    images, captions = split_uploads(uploads)
    assert [name for _, name in images] == ["../../etc/passwd.png", "C:\\Users\\me\\my photo.png"]
    found = gather_captions(captions, "", [name for _, name in images])
    assert found == {0: "a red square", 1: "a red square"}
    folder = tmp_path / "server" / "images"
    written = write_captions(store_images(images, folder), found)
    assert [p.name for p in written] == ["00-passwd.txt", "01-my-photo.txt"]
    assert all(p.parent == folder.resolve() and p.read_text(encoding="utf-8") == "a red square\n" for p in written)
    assert sorted(p.name for p in folder.iterdir()) == [
        "00-passwd.png",
        "00-passwd.txt",
        "01-my-photo.png",
        "01-my-photo.txt",
    ]
    assert not (tmp_path / "etc").exists() and not (tmp_path / "server" / "etc").exists()


# --- host, model folder, errors ------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"])
def test_loopback_hosts_are_served_without_a_flag(host: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="textinv.serve.checks"):
        assert check_host(host, allow_remote=False) is None  # no UserError: served as asked
        assert check_host(host, allow_remote=True) is None
    assert is_loopback(host)
    assert caplog.records == []  # and no "reachable from other machines" warning, with or without the flag


def test_a_non_loopback_host_needs_allow_remote(caplog: pytest.LogCaptureFixture) -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::", "myhost.example"):
        with pytest.raises(UserError, match="--allow_remote") as caught:
            check_host(host, allow_remote=False)
        assert "\n" not in str(caught.value)
    with caplog.at_level(logging.WARNING, logger="textinv.serve.checks"):
        check_host("0.0.0.0", allow_remote=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("warning: serving on 0.0.0.0") and "no login" in m for m in warnings), warnings


def test_serve_command_refuses_a_remote_host_in_one_line_and_other_commands_do_not_load_gradio() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "textinv.cli", "serve", "--host", "0.0.0.0", "--port", "7999"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("textinv: error: --host 0.0.0.0"), run.stderr
    check = "import sys; from textinv.cli import build_parser; build_parser(); assert 'gradio' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=120).returncode == 0


def test_serve_without_the_web_extra_names_it_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import importlib.util

    from textinv.cli import main

    # Gradio looks not installed: find_spec does not find it and importing it fails.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **kw: None if name == "gradio" else real_find_spec(name, *a, **kw)
    )
    monkeypatch.setitem(sys.modules, "gradio", None)
    work = tmp_path / "work"
    assert main(["serve", "--port", "7999", "--work_dir", str(work)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("textinv: error:") and "textinv[web]" in lines[0], lines
    assert "ModuleNotFoundError" not in lines[0]
    assert not work.exists()  # refused before the work folder (or the demo model) was made


def test_model_folder_must_be_a_pipeline(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(UserError, match="does not exist; give a local diffusers pipeline folder"):
        check_model_folder(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no model_index.json"):
        check_model_folder(str(tmp_path))
    assert check_model_folder(str(tiny_model)) == tiny_model.resolve()
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(
        images=demo_uploads(), placeholder_token="<t>", initializer_token="toy", model=str(tmp_path / "x")
    )
    with pytest.raises(UserError, match="does not exist"):
        state.start(request)
    assert state.snapshot() is None and not (state.work_dir / "jobs").exists()


def test_errors_are_rendered_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    assert (
        render_error(UserError("model folder 'x' is missing\n  unet, vae"))
        == "error: model folder 'x' is missing unet, vae"
    )
    try:
        raise RuntimeError("boom\nsecond line\nthird")
    except RuntimeError as error:
        with caplog.at_level(logging.ERROR, logger="textinv.serve.errors"):
            shown = render_error(error)
    assert shown == "internal error: RuntimeError: boom (the server log has the details)"
    # The traceback goes to the server's log, not to the page.
    assert any(record.exc_info and record.exc_info[0] is RuntimeError for record in caplog.records)
    assert len(render_error(UserError("x" * 5000))) <= 400


def test_a_failing_job_shows_one_line(tmp_path: Path, tiny_model: Path) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    # Two tokens: refused by the training code after the model loads, in the training thread.
    state.start(
        TrainRequest(images=demo_uploads(), placeholder_token="<t>", initializer_token="toy car", validation_prompt="")
    )
    wait_for(lambda: not state.snapshot().active, what="the job to fail")
    snap = state.snapshot()
    assert snap.status == "failed"
    assert snap.message.startswith("error: ") and "toy car" in snap.message and "\n" not in snap.message
    assert "\n" not in snap.progress_line() and "Traceback" not in snap.progress_line()
    with pytest.raises(UserError, match="nothing to resume: job-001 failed"):
        state.resume()


# --- training jobs ---------------------------------------------------------------------------------
def test_a_second_job_is_refused_while_one_runs(tmp_path: Path, tiny_model: Path) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(
        images=demo_uploads(),
        placeholder_token="<cat-toy>",
        initializer_token="toy",
        max_train_steps=5000,
        validation_prompt="",
    )
    first = state.start(request)
    try:
        with pytest.raises(UserError, match=r"a training job is already running \(job-001, step \d+/5000\)"):
            state.start(request)
        wait_for(lambda: state.snapshot().step >= 1, what="the first step")
        with pytest.raises(UserError, match="already running"):
            state.start(request)
        # No second run: one job folder, and the first job is still the one running.
        assert len(list((state.work_dir / "jobs").iterdir())) == 1
        assert state.snapshot().job_id == "job-001" and state.snapshot().active
    finally:
        state.stop()
        assert first.join(300)
    assert state.snapshot().status == "stopped"
    with pytest.raises(UserError, match="no training is running"):
        state.stop()


@pytest.mark.slow
def test_stop_resume_export_and_generate(tmp_path: Path, tiny_model: Path) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    job = state.start(
        TrainRequest(
            images=demo_uploads(),
            placeholder_token="<cat-toy>",
            initializer_token="toy",
            max_train_steps=24,
            validation_prompt="a {token} on the beach",
            validation_steps=8,
            num_validation_images=1,
            validation_num_inference_steps=4,
        )
    )
    with pytest.raises(UserError, match="still training"):
        state.export("diffusers")
    wait_for(lambda: state.snapshot().step >= 3, what="step 3")
    state.stop()
    assert job.join(300)
    stopped = state.snapshot()
    assert stopped.status == "stopped" and 3 <= stopped.step < 24, stopped
    checkpoint = job.output_dir / f"checkpoint-{stopped.step}"
    assert (checkpoint / "learned_embeds.safetensors").is_file()
    assert stopped.embedding is not None  # the stopped run's vectors can be downloaded already

    state.resume()
    assert job.join(300)
    done = state.snapshot()
    assert done.status == "done", done.message
    assert done.step == 24 and len(done.losses) == 24  # the resumed steps continue the curve, none twice
    assert done.losses[: stopped.step] == stopped.losses
    # Validation rounds at 8, 16, 24 (across the stop) drawn into one grid.
    assert done.grid is not None and done.grid.is_file()
    rounds = sorted(p.name for p in (job.output_dir / "validation").glob("step-*"))
    assert rounds == ["step-000008", "step-000016", "step-000024"]
    assert "done · step 24/24" in done.progress_line()

    trained = read_embeddings(done.embedding)[0]
    written = {}
    for key in EXPORT_FORMATS:
        if EXPORT_FORMATS[key].two_encoders:  # sdxl, comfyui, onetrainer: role-keyed layouts of several encoders
            with pytest.raises(UserError, match="does not fit this sd1|does not fit this unknown"):
                state.export(key)
            continue
        path = state.export(key)
        assert path.is_relative_to(state.downloads_dir) and path.suffix == EXPORT_FORMATS[key].suffix
        back = read_embeddings(path)
        assert len(back) == 1 and torch.equal(back[0].vectors["text_encoder"], trained.vectors["text_encoder"])
        written[key] = path
    assert written["a1111"].name == "cat-toy.pt"  # the web UI's word is the file's name
    assert read_embeddings(written["a1111"])[0].token == "<cat-toy>"

    outcome = state.generate(GenerateRequest(prompt="a {token} backpack", num_inference_steps=3, num_images=2))
    assert len(outcome.images) == 2 and all(p.is_file() for p in outcome.paths)
    assert "a <cat-toy> backpack" in outcome.message and "with <cat-toy>" in outcome.message

    # An uploaded file of another format, loaded under another name.
    loaded = state.load_embedding(written["pdparams"], "../../elsewhere/cat.pdparams")
    assert loaded.path.parent == state.work_dir / "embeddings" and loaded.format == "pdparams"
    assert loaded.tokens == ("<cat-toy>",)
    other = state.generate(
        GenerateRequest(prompt="a {token}", embedding=loaded, token="<my-toy>", num_inference_steps=2)
    )
    assert len(other.images) == 1 and "with <my-toy>" in other.message


@pytest.mark.slow
def test_the_lora_switch_trains_a_lora_and_generation_uses_it(tmp_path: Path, tiny_model: Path) -> None:
    """Issue 26: "also train a small LoRA" with its rank; the page's generation loads the adapters with the word."""
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    common = dict(images=demo_uploads(), initializer_token="toy", max_train_steps=3, validation_prompt="")
    job = state.start(TrainRequest(placeholder_token="<cat-toy>", lora_rank=2, **common))  # type: ignore[arg-type]
    assert job.join(300)
    assert state.snapshot().status == "done"
    assert (job.output_dir / "pytorch_lora_weights.safetensors").is_file()
    request = GenerateRequest(prompt="a {token} backpack", num_inference_steps=2, num_images=1)
    with_lora = state.generate(request)
    assert "peft_config" in vars(state._pipeline.unet) or hasattr(state._pipeline.unet, "peft_config")
    plain_state = ServerState(tmp_path / "plain", default_model=tiny_model)
    plain_job = plain_state.start(TrainRequest(placeholder_token="<cat-toy>", **common))  # type: ignore[arg-type]
    assert plain_job.join(300)
    plain_state.generate(request)
    assert not hasattr(plain_state._pipeline.unet, "peft_config")
    assert with_lora.images
