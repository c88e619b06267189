"""Watching training: validation images and their grid, TensorBoard logs, progress, run.json, model card."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, train_config
from textinv import train
from textinv.config import UserError
from textinv.events import StepState
from textinv.observers.progress import Progress
from textinv.observers.validation import (
    GRID_FILE,
    VALIDATION_DIR,
    Validation,
    grid_rows,
    list_rounds,
    progress_layout,
    validation_interval,
    write_progress_grid,
)

PROMPT = "a photo of <cat-toy>"
SEED = 42
STEPS = 50
EVERY = 10


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def watched(tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory):
    """50 steps with validation every 10 steps and TensorBoard logs, progress as log lines."""
    output_dir = tmp_path_factory.mktemp("watched") / "out"
    config = train_config(
        tiny_model,
        train_images,
        output_dir,
        max_train_steps=STEPS,
        seed=SEED,
        save_steps=20,
        checkpointing_steps=None,
        validation_prompt=[PROMPT],
        num_validation_images=2,
        validation_steps=EVERY,
        validation_num_inference_steps=2,
    )
    progress_log = logging.getLogger("textinv.observers.progress")
    handler, level = _Lines(), progress_log.level
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    try:
        result = train(config, show_progress=True)  # stderr is not a terminal under pytest: log lines
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(level)
    return SimpleNamespace(output_dir=output_dir, result=result, config=config, lines=handler.lines)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_every_round_writes_one_png_per_seed(watched) -> None:
    rounds = list_rounds(watched.output_dir)
    assert [step for step, _ in rounds] == [10, 20, 30, 40, 50]
    for _, folder in rounds:
        assert sorted(p.name for p in folder.iterdir()) == ["prompt0-seed42.png", "prompt0-seed43.png"]
        with Image.open(folder / "prompt0-seed42.png") as image:
            assert image.size == (64, 64)
    prompts = json.loads((watched.output_dir / VALIDATION_DIR / "prompts.json").read_text())
    assert prompts == {"0": PROMPT}


@pytest.mark.slow
def test_last_round_is_what_generate_makes_from_the_saved_pipeline(watched) -> None:
    """Same seeds, same sampler: a validation image can be made again with `textinv generate`."""
    from textinv.inference.generation import generate

    again = generate(
        str(watched.output_dir), PROMPT, num_images=2, num_inference_steps=2, seed=SEED, height=64, width=64
    )
    for image, seed in zip(again.images, again.seeds):
        saved = _pixels(watched.output_dir / VALIDATION_DIR / "step-000050" / f"prompt0-seed{seed}.png")
        assert np.abs(saved - np.asarray(image, dtype=np.int16)).max() <= 1


@pytest.mark.slow
def test_progress_grid_shows_each_round_and_seed_with_labels(watched) -> None:
    grid_path = watched.output_dir / VALIDATION_DIR / GRID_FILE
    layout, _ = progress_layout(watched.output_dir, 1)
    assert layout.steps == (10, 20, 30, 40, 50) and layout.seeds == (42, 43)
    with Image.open(grid_path) as image:
        grid = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert grid.shape[1::-1] == layout.size
    for row, step in enumerate(layout.steps):
        for column, seed in enumerate(layout.seeds):
            left, top, right, bottom = layout.tile_box(0, row, column)
            tile = grid[top:bottom, left:right]
            assert np.array_equal(tile, _pixels(grid_path.parent / f"step-{step:06d}" / f"prompt0-seed{seed}.png"))
    labels = []
    for row in range(len(layout.steps)):
        left, top, right, bottom = layout.row_label_box(0, row)
        labels.append(grid[top:bottom, left:right])
        assert (labels[-1] < 128).any(), f"row {row} has no label"
    assert not np.array_equal(labels[0], labels[1])  # "step 10" is not "step 20"
    left, top, right, bottom = layout.column_label_box(1)
    assert (grid[top:bottom, left:right] < 128).any()  # the seed above each column


@pytest.mark.slow
def test_tensorboard_events_hold_loss_lr_norms_and_images(watched) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(watched.output_dir / "logs"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert [e.value for e in losses] == pytest.approx(watched.result.losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx([5e-3] * STEPS)
    assert len(events.Scalars("train/step_seconds")) == STEPS
    final_norm = float(load_file(str(watched.output_dir / "learned_embeds.safetensors"))["<cat-toy>"][0].norm())
    assert events.Scalars("train/vector_norm/0")[-1].value == pytest.approx(final_norm, rel=1e-5)
    images = events.Images("validation/prompt0")
    assert [e.step for e in images] == [10, 20, 30, 40, 50]
    assert (images[-1].width, images[-1].height) == (2 * 64, 64)  # the round's two seeds side by side


@pytest.mark.slow
def test_run_json_lists_every_output_with_timings_and_losses(watched) -> None:
    record = json.loads((watched.output_dir / "run.json").read_text())
    losses = watched.result.losses
    assert record["status"] == "completed" and record["steps_done"] == STEPS
    assert record["final_loss"] == pytest.approx(losses[-1]) and record["lowest_train_loss"] == pytest.approx(
        min(losses)
    )
    assert record["seed"] == SEED and record["identity"]["placeholder_token"] == "<cat-toy>"  # resume keys stay
    assert record["device"] == "cpu" and {"torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["timings"]["train_seconds"] > 0 and record["timings"]["validation_seconds"] > 0
    assert record["config"]["validation_prompt"] == [PROMPT]
    outputs = set(record["outputs"])
    expected = {"README.md", "learned_embeds.safetensors", "logs", f"{VALIDATION_DIR}/{GRID_FILE}"}
    expected |= {
        f"{VALIDATION_DIR}/step-{s:06d}/prompt0-seed{seed}.png" for s in range(10, 51, 10) for seed in (42, 43)
    }
    assert expected <= outputs
    for name in outputs:
        assert (watched.output_dir / name).exists(), name


@pytest.mark.slow
def test_model_card_has_hub_metadata_usage_and_the_grid(watched) -> None:
    text = (watched.output_dir / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert "textual-inversion" in metadata["tags"]
    assert metadata["token"] == "<cat-toy>" and metadata["property"] == "object" and metadata["steps"] == STEPS
    assert "base_model" not in metadata  # a local folder is not a Hub id the Hub would accept
    assert f'load_textual_inversion("{watched.output_dir}")' in text
    assert "stable-diffusion-webui/embeddings/" in text
    assert "](validation/progress.png)" in text


def test_model_card_names_a_hub_base_model_and_its_license(tmp_path: Path) -> None:
    from textinv.config import TrainConfig
    from textinv.observers.model_card import render_model_card

    (tmp_path / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# base\n")
    config = TrainConfig("runwayml/stable-diffusion-v1-5", "images", "<my-style>", "style", learnable_property="style")
    record = {"model": {"source": str(tmp_path)}, "steps_done": 7, "identity": {"images": [["a.png", "x"]]}}
    metadata = yaml.safe_load(render_model_card(config, record, tmp_path, repo_id="me/my-style").split("---\n")[1])
    assert metadata["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert metadata["license"] == "creativeml-openrail-m"
    assert metadata["property"] == "style" and metadata["steps"] == 7
    assert 'load_textual_inversion("me/my-style")' in render_model_card(config, record, tmp_path, repo_id="me/my-style")


@pytest.mark.slow
def test_validation_leaves_training_unchanged(watched, tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    """Sampling draws no training randomness: 20 steps without it give the watched run's step-20 vectors."""
    config = train_config(
        tiny_model,
        train_images,
        tmp_path / "plain",
        max_train_steps=20,
        seed=SEED,
        checkpointing_steps=None,
        only_save_embeds=True,
        report_to="none",
    )
    plain = train(config, show_progress=False)
    watched_step_20 = load_file(str(watched.output_dir / "learned_embeds-steps-20.safetensors"))["<cat-toy>"]
    assert plain.embedding.vectors["text_encoder"].equal(watched_step_20)
    assert plain.losses == watched.result.losses[:20]
    assert not (tmp_path / "plain" / VALIDATION_DIR).exists() and not (tmp_path / "plain" / "logs").exists()


@pytest.mark.slow
def test_progress_lines_without_a_terminal(watched) -> None:
    lines = [line for line in watched.lines if line.startswith("step ")]
    assert 15 <= len(lines) <= 21  # about 20 a run, whatever its length
    assert lines[-1].startswith(f"step {STEPS}/{STEPS} loss ")
    for line in lines:
        assert " lr " in line and " s/step ETA " in line, line


def test_progress_bar_on_a_terminal_resumes_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run = SimpleNamespace(is_main_process=True, max_steps=10)
    progress = Progress(True)
    progress.on_start(run)
    for step in range(7, 11):  # a run resumed after step 6
        progress.on_step(run, StepState(step, 10, loss=0.25, lr=1e-3, step_seconds=0.01))
    progress.on_end(run, None)
    shown = terminal.getvalue()
    assert "10/10" in shown and "loss 0.2500" in shown and "lr 1.00e-03" in shown
    assert "s/step" in shown and "ETA 0:00:00" in shown
    assert "| 6/10" in shown  # the bar starts at the resumed step


def test_validation_epochs_become_steps() -> None:
    from textinv.config import TrainConfig

    config = TrainConfig("m", "d", "<t>", "t", validation_epochs=2)
    assert validation_interval(config, epoch_length=300, examples_per_step=4) == 150
    assert validation_interval(config, epoch_length=10, examples_per_step=4) == 5  # 2 x 10 / 4, rounded up
    config.validation_steps = 7
    assert validation_interval(config, epoch_length=300, examples_per_step=4) == 7
    assert validation_interval(TrainConfig("m", "d", "<t>", "t"), 300, 4) == 100


def test_resumed_run_drops_rounds_after_its_checkpoint_and_redraws_the_grid(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        folder = tmp_path / VALIDATION_DIR / f"step-{step:06d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (16, 16), (step, 0, 0)).save(folder / "prompt0-seed1.png")
    write_progress_grid(tmp_path, ["p"])
    config = SimpleNamespace(validation_prompt=["p"])
    validation = Validation(config)  # type: ignore[arg-type]
    validation._drop_rounds_from(tmp_path, first_step=21)  # resumed from the checkpoint of step 20
    assert [step for step, _ in list_rounds(tmp_path)] == [10, 20]
    layout, _ = progress_layout(tmp_path, 1)
    with Image.open(tmp_path / VALIDATION_DIR / GRID_FILE) as image:
        assert image.size == layout.size and layout.steps == (10, 20)


def test_grid_keeps_first_and_latest_rounds_when_there_are_many() -> None:
    steps = list(range(100, 10_001, 100))
    shown = grid_rows(steps)
    assert len(shown) == 12 and shown[0] == 100 and shown[-1] == 10_000
    assert shown == sorted(set(shown))


def test_bad_validation_and_log_settings_are_user_errors() -> None:
    from textinv.config import TrainConfig

    for changes, fragment in (
        ({"validation_prompt": ["  "]}, "--validation_prompt"),
        ({"num_validation_images": 0}, "--num_validation_images 0"),
        ({"validation_epochs": 0}, "--validation_epochs 0"),
        ({"report_to": "comet"}, "--report_to 'comet'"),
        ({"hub_model_id": "a/b/c"}, "--hub_model_id 'a/b/c'"),
    ):
        with pytest.raises(UserError, match=fragment):
            TrainConfig("m", "d", "<t>", "t", **changes).validate()


@pytest.mark.parametrize("tracker", ["visualdl", "wandb"])
def test_missing_tracker_is_one_line_before_the_model_loads(tracker: str, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    command = [
        sys.executable,
        "-m",
        "textinv.cli",
        "train",
        f"--pretrained_model_name_or_path={tmp_path / 'no-such-model'}",
        f"--train_data_dir={tmp_path}",
        "--placeholder_token=<t>",
        "--initializer_token=toy",
        f"--output_dir={tmp_path / 'out'}",
        f"--report_to={tracker}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ))
    assert completed.returncode == 2, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--report_to {tracker}" in lines[0] and f"pip install {tracker}" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_run_without_validation_clears_an_overwritten_runs_images(tmp_path: Path) -> None:
    folder = tmp_path / VALIDATION_DIR / "step-000010"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "prompt0-seed1.png")
    write_progress_grid(tmp_path, ["old prompt"])
    validation = Validation(SimpleNamespace(validation_prompt=[]))  # type: ignore[arg-type]
    run = SimpleNamespace(output_dir=tmp_path)
    validation.on_step(run, StepState(1, 5, loss=1.0, lr=1e-3, step_seconds=0.1))  # type: ignore[arg-type]
    assert not (tmp_path / VALIDATION_DIR).exists()


def _fake_tracker_module(name: str, calls: list) -> object:
    """A stand-in visualdl / wandb module that records what textinv sends it."""
    import importlib.machinery
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    if name == "visualdl":

        class LogWriter:
            def __init__(self, logdir: str) -> None:
                calls.append(("open", logdir))

            def add_scalar(self, tag: str, step: int, value: float) -> None:
                calls.append(("scalar", tag, step, value))

            def add_image(self, tag: str, img: np.ndarray, step: int) -> None:
                calls.append(("image", tag, step, img.shape))

            def close(self) -> None:
                calls.append(("close",))

        module.LogWriter = LogWriter
    else:

        class Run:
            def log(self, values: dict, step: int) -> None:
                for tag, value in values.items():
                    if isinstance(value, list):
                        calls.append(("image", tag, step, len(value)))
                    else:
                        calls.append(("scalar", tag, step, value))

            def finish(self) -> None:
                calls.append(("close",))

        def init(project: str, name: str, dir: str, config: dict) -> Run:
            calls.append(("open", dir))
            return Run()

        module.init = init
        module.Image = lambda image, caption: (image, caption)
    return module


@pytest.mark.parametrize("tracker", ["visualdl", "wandb"])
def test_other_trackers_get_the_same_numbers_and_images(
    tracker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from textinv.config import TrainConfig
    from textinv.observers.logs import TrainingLogs

    calls: list = []
    monkeypatch.setitem(sys.modules, tracker, _fake_tracker_module(tracker, calls))
    config = TrainConfig("m", "d", "<t>", "t", report_to=tracker, output_dir=str(tmp_path))
    config.validate()  # the package "is installed" now
    logs = TrainingLogs(config)
    vectors = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    run = SimpleNamespace(
        is_main_process=True, output_dir=tmp_path, record={"config": {}}, trainable=SimpleNamespace(vectors=vectors)
    )
    logs.on_start(run)
    logs.on_step(run, StepState(1, 2, loss=0.5, lr=1e-3, step_seconds=0.2))
    logs.log_images(1, 0, "a photo of <t>", [Image.new("RGB", (8, 8))] * 2, [1, 2])
    logs.on_end(run, None)
    scalars = {call[1]: call[3] for call in calls if call[0] == "scalar"}
    assert scalars == {
        "train/loss": 0.5,
        "train/learning_rate": 1e-3,
        "train/step_seconds": 0.2,
        "train/vector_norm/0": pytest.approx(5.0),
        "train/vector_norm/1": pytest.approx(2.0),
    }
    assert [call for call in calls if call[0] == "image"]
    assert calls[-1] == ("close",) and str(tmp_path / "logs") in calls[0][1]


def test_sdxl_model_card_code_loads_both_encoders(tmp_path: Path) -> None:
    """The card's diffusers lines for an SDXL embedding (clip_l + clip_g) run as printed."""
    import re

    import torch

    from textinv.config import TrainConfig
    from textinv.embeddings import CLIP_G, CLIP_L, Embedding, save_diffusers
    from textinv.observers.model_card import render_model_card
    from textinv.tiny import TinySpec, build_tiny_pipeline

    spec = TinySpec()
    base = build_tiny_pipeline(tmp_path / "tiny-sdxl", family="sdxl")
    out = tmp_path / "out"
    vectors = {
        CLIP_L: torch.ones(2, spec.text_hidden_size),
        CLIP_G: torch.full((2, spec.text_hidden_size_2), 2.0),
    }
    save_diffusers(Embedding("<cat-toy>", vectors), out / "learned_embeds.safetensors")
    config = TrainConfig(str(base), "images", "<cat-toy>", "toy", num_vectors=2)
    record = {"model": {"family": "sdxl", "source": str(base)}, "steps_done": 5, "identity": {"images": []}}
    card = render_model_card(config, record, out)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    scope: dict = {}
    exec(code, scope)  # the card's own lines, minus generating an image
    pipe = scope["pipe"]
    for tokenizer, encoder, expected in (
        (pipe.tokenizer, pipe.text_encoder, 1.0),
        (pipe.tokenizer_2, pipe.text_encoder_2, 2.0),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
        rows = encoder.get_input_embeddings().weight[ids]
        assert torch.all(rows == expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_concepts_model_card_lists_every_word_and_its_code_loads_each_file(tmp_path: Path, family: str) -> None:
    """With several words (--concepts) the card names each word and file, and its lines load every word."""
    import re

    import torch

    from textinv.config import TrainConfig
    from textinv.embeddings import CLIP_G, CLIP_L, TEXT_ENCODER, Embedding, save_diffusers
    from textinv.observers.model_card import render_model_card
    from textinv.tiny import TinySpec, build_tiny_pipeline

    spec = TinySpec()
    base = build_tiny_pipeline(tmp_path / f"tiny-{family}", family=family)
    out = tmp_path / "out"
    words = []
    for value, (token, count) in enumerate((("<cat-toy>", 1), ("<my-style>", 2)), start=1):
        if family == "sdxl":
            vectors = {
                CLIP_L: torch.full((count, spec.text_hidden_size), value),
                CLIP_G: torch.full((count, spec.text_hidden_size_2), -value),
            }
        else:
            vectors = {TEXT_ENCODER: torch.full((count, spec.text_hidden_size), float(value))}
        name = token.strip("<>")
        save_diffusers(Embedding(token, vectors), out / f"learned_embeds-{name}.safetensors")
        best = {"best_step": 4, "best_loss": 0.5 + value} if value == 1 else {}
        words.append(
            dict(
                name=name,
                placeholder_token=token,
                initializer_token="toy",
                num_vectors=count,
                learnable_property="object",
                images=3,
                eval=best,
                **({"stop_step": 6} if value == 2 else {}),
            )
        )
    config = TrainConfig(str(base), "images", "<cat-toy>", "toy", concepts="concepts.toml")
    record = {
        "model": {"family": family, "source": str(base)},
        "steps_done": 8,
        "identity": {"images": []},
        "concepts": words,
    }
    card = render_model_card(config, record, out)
    assert "# Textual Inversion: `<cat-toy>`, `<my-style>`" in card
    assert (
        "| `<cat-toy>` | `toy` | object | 1 | 3 | `learned_embeds-cat-toy.safetensors` | 1.50000 at step 4 | - |"
        in card
    )
    assert (
        "| `<my-style>` | `toy` | object | 2 | 3 | `learned_embeds-my-style.safetensors` | - | converged at step 6 |"
        in card
    )
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    scope: dict = {}
    exec(code, scope)  # the card's own lines, minus generating an image
    pipe = scope["pipe"]
    for value, tokens in ((1.0, ["<cat-toy>"]), (2.0, ["<my-style>", "<my-style>_1"])):
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
        assert torch.equal(
            pipe.text_encoder.get_input_embeddings().weight[ids], torch.full((len(ids), spec.text_hidden_size), value)
        )
