"""Shared fixtures: a tiny SD1 pipeline (seeded random weights, real CLIP vocabulary) and images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The team's folder of real third-party files (../shared/data beside the clone).

    TEXTINV_SHARED_DATA overrides it for clones kept elsewhere; its absence fails the tests that
    need it (with the paths tried) rather than skipping them.
    """
    candidates = [Path(os.environ["TEXTINV_SHARED_DATA"])] if os.environ.get("TEXTINV_SHARED_DATA") else []
    candidates += [REPO.parent / "shared" / "data", Path("/work/shared/data")]
    for candidate in candidates:
        if (candidate / "SOURCES.md").is_file():
            return candidate
    return candidates[0]


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textinv.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the demo images, shrunk to 96 px so decoding costs nothing."""
    from textinv.tiny import demo_images_dir

    folder = tmp_path_factory.mktemp("images")
    for source in sorted(demo_images_dir().glob("*.jpg"))[:3]:
        with Image.open(source) as image:
            image.convert("RGB").resize((96, 96)).save(folder / f"{source.stem}.png")
    return folder


def train_config(model: Path, images: Path, output_dir: Path, **overrides):
    """A fast training config on the tiny pipeline (64 px, batch 1)."""
    from textinv.config import TrainConfig

    values = dict(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(images),
        placeholder_token="<cat-toy>",
        initializer_token="toy",
        resolution=64,
        train_batch_size=1,
        max_train_steps=20,
        learning_rate=5e-3,
        lr_warmup_steps=0,
        seed=42,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)
