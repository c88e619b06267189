"""Images in, views and examples out."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textinv.config import UserError
from textinv.data.examples import ExampleStream
from textinv.data.images import discover_images, load_rgb, make_view, to_tensor


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # A 40x20 landscape stored with EXIF orientation 6 (rotate 90 CW to view) must come out 20x40.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.jpg", image, exif=exif.tobytes(), quality=95)
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:5].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[0] < 60, "the left band should now be at the top"


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    image = Image.new("RGB", (16, 16), (10, 200, 30)).convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    loaded = load_rgb(_save(tmp_path / f"x{suffix}", image))
    assert loaded.mode == "RGB" and loaded.size == (16, 16)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    loaded = load_rgb(_save(tmp_path / "clear.png", image))
    assert np.asarray(loaded).min() == 255


def test_center_crop_keeps_the_middle_at_target_aspect() -> None:
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white square in the middle third
    view = make_view(image, 32, 32, center_crop=True, interpolation="bilinear")
    assert view.size == (32, 32) and np.asarray(view).min() > 200
    squashed = make_view(image, 32, 32, center_crop=False, interpolation="bilinear")
    assert np.asarray(squashed)[:, 0].max() < 30, "without crop the black edges stay"
    tall = make_view(image, 64, 32, center_crop=True, interpolation="nearest")
    assert tall.size == (32, 64)


def test_to_tensor_range_and_layout() -> None:
    image = Image.new("RGB", (4, 2), (255, 0, 128))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 4)
    assert tensor[0].eq(1).all() and tensor[1].eq(-1).all()
    assert torch.allclose(tensor[2], torch.full((2, 4), 128 / 127.5 - 1), atol=1e-6)


def test_discover_skips_unreadable_and_names_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "good.png", Image.new("RGB", (16, 16)))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    (tmp_path / "tiny.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found = discover_images(tmp_path)
    assert [p.name for p in found] == ["good.png"]
    assert "broken.jpg" in caplog.text and "tiny.png" in caplog.text


def test_no_readable_image_is_an_error_naming_files(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("text pretending to be a png")
    _save(tmp_path / "dot.png", Image.new("RGB", (1, 1)))
    with pytest.raises(UserError) as error:
        discover_images(tmp_path)
    assert "a.png" in str(error.value) and "dot.png" in str(error.value)


def test_example_stream_epoch_visits_each_image_repeats_times() -> None:
    stream = ExampleStream(
        num_images=3, repeats=4, templates=["a {}", "b {}"], placeholder_text="<t>", random_flip=True, seed=5
    )
    epoch = [stream[i] for i in range(12)]
    assert Counter(e.image_index for e in epoch) == {0: 4, 1: 4, 2: 4}
    assert {e.caption for e in epoch} <= {"a <t>", "b <t>"}
    assert 0 < sum(e.flipped for e in epoch) < 12
    second = [stream[i].image_index for i in range(12, 24)]
    assert Counter(second) == {0: 4, 1: 4, 2: 4}
    again = ExampleStream(3, 4, ["a {}", "b {}"], "<t>", True, seed=5)
    assert [again[i] for i in range(30)] == [stream[i] for i in range(30)]
    other = ExampleStream(3, 4, ["a {}", "b {}"], "<t>", True, seed=6)
    assert [other[i] for i in range(30)] != [stream[i] for i in range(30)]


def test_no_flip_when_turned_off() -> None:
    stream = ExampleStream(2, 50, ["{}"], "<t>", random_flip=False, seed=0)
    assert not any(stream[i].flipped for i in range(100))
