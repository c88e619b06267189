"""The held-out evaluation (issue 20): eval_loss is a measurement, changes nothing learned, resumes,
keeps the best vectors, stops when converged; and each entry point has its own defaults."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import textinv
from conftest import train_config
from textinv.config import TrainConfig, TrainingInterrupted, UserError
from textinv.events import BEST_EMBEDDING_FILE, TrainObserver
from textinv.training import held_out
from textinv.training.held_out import build_held_out, convergence_step, has_converged, held_out_sum

TOKEN = "<cat-toy>"
# 12 steps, evaluated every 3 (and before the first): 5 points; a checkpoint at 6; a snapshot at every evaluation.
CURVE = dict(
    max_train_steps=12,
    eval_steps=3,
    eval_samples=8,
    save_steps=3,
    checkpointing_steps=6,
    only_save_embeds=True,
    report_to="none",
)


def _vectors(path: Path) -> torch.Tensor:
    return load_file(str(path))[TOKEN]


def _curve(output_dir: Path) -> list[list[float]]:
    return json.loads((output_dir / "run.json").read_text())["eval"]["losses"]


class _StopAt(TrainObserver):
    """Asks the run to stop after ``step`` (as SIGINT does): it writes a checkpoint there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run, state) -> None:
        if state.step == self.step:
            run.request_stop()


class _EvalLosses(TrainObserver):
    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def on_step(self, run, state) -> None:
        if state.eval_loss is not None:
            self.seen[state.step] = state.eval_loss


@pytest.fixture(scope="module")
def with_eval(tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory):
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    watcher = _EvalLosses()
    result = textinv.train(
        train_config(tiny_model, train_images, output_dir, **CURVE), show_progress=False, observers=[watcher]
    )
    return result, watcher


@pytest.mark.slow
def test_eval_loss_is_the_same_for_the_same_vectors(tiny_model: Path) -> None:
    from textinv.data.latents import LatentCache
    from textinv.models.conditioning import add_placeholder
    from textinv.models.loading import load_model_parts

    parts = load_model_parts(str(tiny_model))
    tokens = add_placeholder(parts, TOKEN, 1, "toy")
    generator = torch.Generator().manual_seed(0)
    latents = LatentCache(
        mean=torch.randn(3, 2, 4, 8, 8, generator=generator),
        std=torch.rand(3, 2, 4, 8, 8, generator=generator),
        scaling_factor=0.18,
    )
    templates = ["a photo of a {}", "a rendering of a {}"]
    held = build_held_out(latents, parts.noise_scheduler, templates, TOKEN, seed=5, count=12, random_flip=True)
    again = build_held_out(latents, parts.noise_scheduler, templates, TOKEN, seed=5, count=12, random_flip=True)
    assert (
        torch.equal(held.noisy, again.noisy)
        and torch.equal(held.timesteps, again.timesteps)
        and held.captions == again.captions
    )
    # Stratified: one timestep in each twelfth of [0, 1000) (less a rounding step).
    assert all(k * 1000 / 12 - 1 <= t < (k + 1) * 1000 / 12 for k, t in enumerate(sorted(held.timesteps.tolist())))
    state = torch.get_rng_state()
    first = held_out_sum(tokens, parts, held, torch.device("cpu"), batch_size=5)
    assert held_out_sum(tokens, parts, held, torch.device("cpu"), batch_size=5) == first  # a measurement, not a sample
    assert torch.equal(torch.get_rng_state(), state)  # and it drew nothing from the global generator
    with torch.no_grad():
        tokens.vectors.add_(0.5)
    assert held_out_sum(tokens, parts, held, torch.device("cpu"), batch_size=5) != first


@pytest.mark.slow
def test_eval_on_or_off_learns_identical_vectors(
    with_eval, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    result, watcher = with_eval
    plain = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "off", **{**CURVE, "eval_steps": 0}), show_progress=False
    )
    assert torch.equal(plain.embedding.vectors["text_encoder"], result.embedding.vectors["text_encoder"])
    assert plain.losses == result.losses
    assert not (tmp_path / "off" / BEST_EMBEDDING_FILE).exists()
    assert "eval" not in json.loads((tmp_path / "off" / "run.json").read_text())
    # The observers saw every evaluation after a step; run.json also has the one before the first.
    curve = _curve(result.output_dir)
    assert [step for step, _ in curve] == [0, 3, 6, 9, 12]
    assert watcher.seen == {step: value for step, value in curve if step > 0}


def test_best_file_holds_the_vectors_of_the_lowest_eval_loss(with_eval) -> None:
    result, _ = with_eval
    output_dir = result.output_dir
    curve = _curve(output_dir)
    best_step, best_loss = min(curve, key=lambda point: point[1])
    record = json.loads((output_dir / "run.json").read_text())
    assert record["eval"]["best_step"] == best_step and record["eval"]["best_loss"] == best_loss
    assert BEST_EMBEDDING_FILE in record["outputs"]
    at_best = output_dir / (
        "learned_embeds.safetensors" if best_step == 12 else f"learned_embeds-steps-{best_step}.safetensors"
    )
    if best_step > 0:
        assert torch.equal(_vectors(output_dir / BEST_EMBEDDING_FILE), _vectors(at_best))


def test_best_file_follows_a_scripted_curve_with_its_minimum_inside(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    values = iter([1.0, 0.7, 0.5, 0.6, 0.55])  # steps 0, 3, 6, 9, 12: the lowest at step 6
    monkeypatch.setattr(held_out, "held_out_sum", lambda *args, **kwargs: next(values) * 8)
    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **CURVE), show_progress=False)
    assert [value for _, value in _curve(result.output_dir)] == [1.0, 0.7, 0.5, 0.6, 0.55]
    assert torch.equal(
        _vectors(tmp_path / "out" / BEST_EMBEDDING_FILE),
        _vectors(tmp_path / "out" / "learned_embeds-steps-6.safetensors"),
    )
    assert not torch.equal(
        _vectors(tmp_path / "out" / BEST_EMBEDDING_FILE), _vectors(tmp_path / "out" / "learned_embeds.safetensors")
    )


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_curve(
    with_eval, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    result, _ = with_eval
    output_dir = tmp_path / "out"
    # Stop after step 9 (its own checkpoint), then resume from the earlier checkpoint-6: the best file
    # may hold step 9's vectors by then, and the resumed run must put it back to the checkpoint's best.
    with pytest.raises(TrainingInterrupted):
        textinv.train(
            train_config(tiny_model, train_images, output_dir, **CURVE), show_progress=False, observers=[_StopAt(9)]
        )
    assert [step for step, _ in _curve(output_dir)] == [0, 3, 6, 9]
    resumed = textinv.train(
        train_config(
            tiny_model, train_images, output_dir, **CURVE, resume_from_checkpoint=str(output_dir / "checkpoint-6")
        ),
        show_progress=False,
    )
    assert _curve(output_dir) == _curve(result.output_dir)  # the same points, bit for bit, none twice
    assert torch.equal(resumed.embedding.vectors["text_encoder"], result.embedding.vectors["text_encoder"])
    assert torch.equal(_vectors(output_dir / BEST_EMBEDDING_FILE), _vectors(result.output_dir / BEST_EMBEDDING_FILE))


@pytest.mark.parametrize(
    "values, margin, patience, stop_index",
    [
        ([1.0, 0.9, 0.8, 0.799, 0.7985, 0.798], 0.05, 3, 5),  # the last 3 gained 0.002 < 5 % of the 0.2 gained before
        ([1.0, 0.9, 0.8, 0.75, 0.7, 0.65, 0.6], 0.05, 3, None),  # steady progress never stops
        (
            [1.0, 0.8, 0.7, 0.65, 0.63, 0.62, 0.615, 0.613],
            0.05,
            3,
            7,
        ),  # slowing: 0.017 gained < 5 % of 0.37, only at the end
        ([1.0, 1.1, 1.2, 1.3], 0.05, 3, 3),  # worse from the start: no gain at all
        ([1.0, 0.5, 0.6, 0.7, 0.8], 0.0, 3, 4),  # margin 0: any gain keeps it going, none stops it
        ([1.0, 0.5, 0.6], 0.05, 3, None),  # fewer than patience + 1 evaluations
    ],
)
def test_stop_rule_on_scripted_curves(values: list[float], margin: float, patience: int, stop_index) -> None:
    history = [(10 * index, value) for index, value in enumerate(values)]
    expected = None if stop_index is None else 10 * stop_index
    assert convergence_step(history, margin, patience) == expected
    assert has_converged(history, margin, patience) == (stop_index == len(values) - 1)


@pytest.mark.slow
def test_stop_when_converged_ends_like_a_normal_run(
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
    train_images: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scripted = [
        1.0,
        0.9,
        0.8,
        0.799,
        0.7985,
        0.798,
        0.5,
        0.4,
        0.3,
        0.2,
        0.1,
    ]  # steps 0, 2, 4, ...: converged at step 10
    settings = dict(
        max_train_steps=20,
        eval_steps=2,
        eval_samples=4,
        save_steps=100,
        checkpointing_steps=4,
        only_save_embeds=False,
        report_to="tensorboard",
    )
    values = iter(scripted)
    monkeypatch.setattr(held_out, "held_out_sum", lambda *args, **kwargs: next(values) * 4)
    config = train_config(
        tiny_model,
        train_images,
        tmp_path / "stopped",
        **settings,
        stop_when_converged=True,
        convergence_margin=0.05,
        convergence_patience=3,
    )
    with caplog.at_level(logging.INFO, logger="textinv"):
        stopped = textinv.train(config, show_progress=True)
    assert stopped.stop_reason == "converged" and stopped.steps == 10 and len(stopped.losses) == 10
    record = json.loads((tmp_path / "stopped" / "run.json").read_text())
    assert record["status"] == "completed" and record["steps_done"] == 10 and record["stop_reason"] == "converged"
    assert record["max_train_steps"] == 20 and [step for step, _ in record["eval"]["losses"]] == [0, 2, 4, 6, 8, 10]
    # The run's closing line (the CLI prints it last) says why it stopped, and so did the log at the stop.
    assert stopped.summary.startswith(f"learned {TOKEN} in 10 steps"), stopped.summary
    assert "stopped at step 10: eval_loss gained less than 0.05 of its gain so far" in stopped.summary
    assert any(r.getMessage().startswith("stopped at step 10: eval_loss") for r in caplog.records)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 10/10 ")]
    assert progress and "eval_loss 0.7980" in progress[0]  # the progress line's last step is the stop step

    # Everything a run of 10 steps writes, and the same vectors: a run that stops is that run.
    monkeypatch.undo()
    normal = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "normal", **{**settings, "max_train_steps": 10}),
        show_progress=False,
    )
    assert normal.stop_reason == "max_train_steps"
    assert torch.equal(stopped.embedding.vectors["text_encoder"], normal.embedding.vectors["text_encoder"])
    outputs = set(json.loads((tmp_path / "normal" / "run.json").read_text())["outputs"])
    assert (
        set(record["outputs"]) == outputs
        and {"learned_embeds.safetensors", BEST_EMBEDDING_FILE, "model_index.json", "text_encoder"} <= outputs
    )
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "stopped" / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/eval_loss")] == [
        (s, round(v, 4)) for s, v in zip(range(2, 11, 2), scripted[1:6], strict=True)
    ]


def test_the_web_page_job_keeps_the_eval_curve() -> None:
    from types import SimpleNamespace

    from textinv.serve.jobs import TrainingJob

    job = TrainingJob(
        "job-1",
        TrainConfig(
            pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token=TOKEN, initializer_token="toy"
        ),
        Path("."),
    )
    job._attach(SimpleNamespace(max_steps=6, record={"eval": {"losses": [[0, 1.0]]}}, request_stop=lambda: None))
    for step in range(1, 7):
        job._record_step(step, 6, 1.5, 0.1, eval_loss=1.0 - step / 10 if step % 3 == 0 else None)
    job._record_step(4, 6, 1.5, 0.1)  # a resumed run redoes step 4 onwards
    job._record_step(6, 6, 1.5, 0.1, eval_loss=0.25)
    snap = job.snapshot()
    assert snap.eval_losses == ((0, 1.0), (3, 0.7), (6, 0.25))
    assert "eval_loss 0.2500" in snap.progress_line()


def test_stop_when_converged_needs_the_evaluation(tmp_path: Path) -> None:
    config = TrainConfig(
        pretrained_model_name_or_path="m",
        train_data_dir="d",
        placeholder_token=TOKEN,
        initializer_token="toy",
        output_dir=str(tmp_path / "out"),
        report_to="none",
        stop_when_converged=True,
        eval_steps=0,
    )
    with pytest.raises(UserError, match="--eval_steps"):
        config.validate()
    for field, value in (
        ("convergence_margin", 1.0),
        ("convergence_patience", 0),
        ("eval_samples", 0),
        ("eval_steps", -1),
    ):
        bad = TrainConfig(
            pretrained_model_name_or_path="m",
            train_data_dir="d",
            placeholder_token=TOKEN,
            initializer_token="toy",
            output_dir=str(tmp_path / "out"),
            report_to="none",
            **{field: value},
        )
        with pytest.raises(UserError, match=field):
            bad.validate()


# --- the entry points' defaults ------------------------------------------------------------------------
REQUIRED = [
    "--pretrained_model_name_or_path=m",
    "--train_data_dir=d",
    "--placeholder_token=<t>",
    "--initializer_token=toy",
]


def _parsed(defaults) -> TrainConfig:
    from textinv.cli import build_parser, config_from_args

    return config_from_args(build_parser(defaults).parse_args(["train", *REQUIRED]))


def _flag_help(defaults, name: str) -> str:
    """The help text of ``--name`` in ``textinv train --help`` built with ``defaults``, on one line."""
    from textinv.cli import build_parser

    parser = build_parser(defaults)
    train_parser = next(action for action in parser._subparsers._group_actions if action.dest == "command").choices[
        "train"
    ]
    lines = train_parser.format_help().split("options:", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().split(" ")[0] == f"--{name}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_the_root_script_keeps_ppdiffusers_defaults_and_textinv_train_has_its_own() -> None:
    from textinv.cli import PPDIFFUSERS_DEFAULTS, SCRIPT_DEFAULTS

    script, textinv_train, api = (
        _parsed(SCRIPT_DEFAULTS),
        _parsed(None),
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>"),
    )
    # ppdiffusers' parse_args: batch 16, lr 1e-4, constant, 500 warm-up steps; no held-out evaluation there.
    assert (script.train_batch_size, script.gradient_accumulation_steps, script.learning_rate) == (16, 1, 1e-4)
    assert (script.lr_scheduler, script.lr_warmup_steps, script.timestep_sampling, script.eval_steps) == (
        "constant",
        500,
        "uniform",
        0,
    )
    assert script.max_train_steps == 5000 and not script.stop_when_converged
    for name, value in PPDIFFUSERS_DEFAULTS.items():
        assert getattr(script, name) == value
        assert getattr(textinv_train, name) == getattr(api, name) != value, name  # textinv train = the API
    assert textinv_train.eval_steps > 0
    for name, value in PPDIFFUSERS_DEFAULTS.items():  # each --help shows its own entry point's default
        assert f"(default: {value})" in _flag_help(SCRIPT_DEFAULTS, name), name
        assert f"(default: {getattr(api, name)})" in _flag_help(None, name), name


# --- issue 28: the interval grows with the run --------------------------------------------------------------------
def test_the_interval_grows_with_the_step_past_eval_steps_over_eval_spacing() -> None:
    from textinv.held_out_options import HeldOutOptions

    options = HeldOutOptions(eval_steps=10, eval_spacing=0.1)
    # Every 10 steps up to step 100 (10 / 0.1), then 10 % of the step, rounded down to tens.
    assert [options.evaluation_interval(step) for step in (0, 90, 100, 199, 200, 1000, 4550)] == [
        10, 10, 10, 10, 20, 100, 450
    ]  # fmt: skip
    assert [HeldOutOptions(eval_steps=10, eval_spacing=0.0).evaluation_interval(s) for s in (0, 4550)] == [10, 10]
    steps, schedule = 0, [0]  # a default run of 5000 steps: 57 evaluations (the start and the end included), not 501
    while (steps := steps + options.evaluation_interval(steps)) < 5000:
        schedule.append(steps)
    assert len(schedule) + 1 == 57 and schedule[:12] == list(range(0, 120, 10)) and schedule[-1] == 4550


@pytest.mark.slow
def test_a_growing_interval_evaluates_where_it_says_and_a_resume_keeps_the_steps(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    settings = dict(CURVE, max_train_steps=25, eval_steps=2, eval_spacing=0.2, save_steps=100, checkpointing_steps=12)
    full = textinv.train(train_config(tiny_model, train_images, tmp_path / "full", **settings), show_progress=False)
    # Every 2 steps up to step 20 (2 / 0.2), then 20 % of the step rounded down to even: 24; and the end, 25.
    assert [step for step, _ in _curve(full.output_dir)] == [*range(0, 22, 2), 24, 25]
    with pytest.raises(TrainingInterrupted):
        textinv.train(
            train_config(tiny_model, train_images, tmp_path / "cut", **settings),
            show_progress=False,
            observers=[_StopAt(13)],
        )
    textinv.train(
        train_config(tiny_model, train_images, tmp_path / "cut", **settings, resume_from_checkpoint="checkpoint-12"),
        show_progress=False,
    )
    assert _curve(tmp_path / "cut") == _curve(full.output_dir)


def test_a_run_no_longer_than_eval_steps_skips_the_evaluation_and_says_so(
    tiny_model: Path, train_images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 3 steps with --eval_steps 3: the curve would be only its two ends, at the price of two evaluations.
    settings = dict(CURVE, max_train_steps=3, save_steps=100, checkpointing_steps=100)
    with caplog.at_level(logging.INFO, logger="textinv.training.held_out"):
        short = textinv.train(
            train_config(tiny_model, train_images, tmp_path / "short", **settings), show_progress=False
        )
    assert "eval" not in json.loads((short.output_dir / "run.json").read_text())
    assert not (short.output_dir / BEST_EMBEDDING_FILE).exists()
    assert "no held-out evaluation: 3 steps is not more than --eval_steps 3" in caplog.text
    assert "--eval_steps 2 or lower" in caplog.text
    # One step more and it has a point in between: evaluated at 0, 3 and the end.
    longer = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "longer", **{**settings, "max_train_steps": 4}),
        show_progress=False,
    )
    assert [step for step, _ in _curve(longer.output_dir)] == [0, 3, 4]
    assert (longer.output_dir / BEST_EMBEDDING_FILE).exists()


def test_eval_spacing_outside_zero_to_one_is_one_line(tmp_path: Path) -> None:
    config = train_config(tmp_path, tmp_path, tmp_path / "out", eval_spacing=1.5)
    with pytest.raises(UserError) as error:
        config.validate()
    assert str(error.value) == "--eval_spacing 1.5 must be in [0, 1), e.g. 0.1 (0 = a fixed interval)"
