"""A new user's first hour (issue 19): what they see first — errors, exit codes, the progress line, file modes."""

from __future__ import annotations

import json
import os
import re
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import textinv
from conftest import REPO, read_terminal, train_config
from textinv import cli, events
from textinv.config import TrainingInterrupted, UserError
from textinv.data import latents
from textinv.data.images import discover_images, load_views
from textinv.events import StepState
from textinv.observers.progress import Progress, progress_text
from textinv.training import builders

FAST = dict(eval_steps=0, checkpointing_steps=None, report_to="none")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TEXTINV_DEBUG", None)
    env.update(extra)
    return env


def _cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "textinv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
        cwd=REPO,
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def embedding_file(tmp_path: Path) -> Path:
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<thing>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


# --- errors: what the arguments alone show comes first, fast, and the same with TEXTINV_DEBUG=1 ----------------
CHECK_IN_PROCESS = """
import sys
from textinv.cli import main
code = main(sys.argv[1:])
print("torch imported" if "torch" in sys.modules else "torch not imported", code)
"""


def _train_without_torch(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    args = ["train", f"--train_data_dir={tmp_path}", "--placeholder_token=<x>", "--initializer_token=toy", *flags]
    return subprocess.run(
        [sys.executable, "-c", CHECK_IN_PROCESS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "case, flags, first_line",
    [
        (
            "a mistyped folder, no ./",
            ["--pretrained_model_name_or_path=tiny-modle"],
            "textinv: error: model folder 'tiny-modle' does not exist",
        ),
        (
            "a path under a local folder",
            ["--pretrained_model_name_or_path=models/tiny-modle"],
            "textinv: error: model folder 'models/tiny-modle' does not exist",
        ),
        (
            "a used output_dir",
            ["--output_dir=used"],
            "textinv: error: --output_dir 'used' already holds another run's results",
        ),
        (
            "a token with a space",
            ["--placeholder_token=<a b>"],
            "textinv: error: --placeholder_token '<a b>' contains white space",
        ),
    ],
)
def test_errors_the_arguments_show_come_before_torch(
    tiny_model: Path, tmp_path: Path, case: str, flags: list[str], first_line: str
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "learned_embeds.safetensors").write_bytes(b"another run")
    if not any(flag.startswith("--pretrained") for flag in flags):
        flags = [f"--pretrained_model_name_or_path={tiny_model}", *flags]
    result = _train_without_torch(tmp_path, *flags)
    # Fast because neither torch nor a model is loaded before the error: that is what is asserted, not a wall time
    # (a wall-time bound loose enough for a loaded CI machine, 20 s against ~0.3 s, would not catch a regression).
    assert result.stdout.split() == ["torch", "not", "imported", "2"], (result.stdout, result.stderr)
    assert result.stderr.splitlines()[0].startswith(first_line), result.stderr
    assert "HF_TOKEN" not in result.stderr


def test_a_hub_id_still_gets_the_hub_message(tmp_path: Path) -> None:
    from textinv.models.loading import local_model_dir, resolve_model_dir

    assert local_model_dir("someone/some-model") is None  # owner/name: may be on the hub
    with pytest.raises(UserError, match=r"^could not get model 'someone/some-model' from the hub"):
        resolve_model_dir("someone/some-model")  # HF_HUB_OFFLINE=1 in tests: no network


def test_a_placeholder_the_tokenizer_knows_is_refused_before_the_unet_loads(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    loaded = []
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    config = train_config(tiny_model, train_images, tmp_path / "out", placeholder_token="cat", **FAST)
    with pytest.raises(UserError, match=r"^--placeholder_token 'cat': 'cat' is already in the tokenizer's vocabulary"):
        textinv.train(config, show_progress=False)
    assert loaded == []


def test_debug_adds_the_traceback_and_keeps_exit_code_2(tmp_path: Path) -> None:
    args = ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]
    plain = _cli(*args)
    debug = _cli(*args, TEXTINV_DEBUG="1")
    assert plain.returncode == 2 and debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert _error_lines(debug) == _error_lines(plain) == [plain.stderr.strip()]
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()  # the one line still ends it


def test_debug_keeps_exit_code_1_for_an_internal_fault(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    monkeypatch.setenv("TEXTINV_DEBUG", "1")
    assert cli.main(["inspect", "whatever.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "textinv: internal error: RuntimeError: a bug"


@pytest.mark.slow
def test_generate_names_a_flag_it_has(tiny_model: Path, embedding_file: Path, tmp_path: Path) -> None:
    common = [
        "generate",
        "--model",
        str(tiny_model),
        "--num_inference_steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "1",
    ]
    twice = _cli(
        *common, "--prompt", "a <thing>", "--embeddings", str(embedding_file), "--embeddings", str(embedding_file)
    )
    assert twice.returncode == 2 and "is already in the pipeline" in twice.stderr and "--token NAME" in twice.stderr
    renamed = _cli(
        *common,
        "--prompt",
        "a <other>",
        "--embeddings",
        str(embedding_file),
        "--token",
        "<other>",
        "--output_dir",
        str(tmp_path / "images"),
    )
    assert renamed.returncode == 0, renamed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["a-other-seed1.png"]
    assert renamed.stdout.split() == [str(tmp_path / "images" / "a-other-seed1.png")]  # no second "wrote" line


# --- file modes: results get the umask, whoever wrote them ----------------------------------------------------
@pytest.mark.slow
def test_every_result_gets_the_umask_modes(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        output_dir = tmp_path / "out"
        output_dir.mkdir()
        stale = output_dir / "learned_embeds.safetensors"
        stale.write_bytes(b"x")
        stale.chmod(0o644)  # safetensors' writer made even an existing 0644 file 0600
        config = train_config(
            tiny_model,
            train_images,
            output_dir,
            max_train_steps=4,
            save_steps=2,
            checkpointing_steps=2,
            overwrite_output_dir=True,
            eval_steps=0,
        )
        textinv.train(config, show_progress=False)
        tiny = textinv.build_tiny_pipeline(tmp_path / "tiny")
    finally:
        os.umask(previous)
    for root in (output_dir, tiny):
        for path in [root, *root.rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            assert _mode(path) == expected, f"{path.relative_to(tmp_path)}: {oct(_mode(path))}"
    names = {p.name for p in output_dir.rglob("*.safetensors")}
    assert {
        "learned_embeds.safetensors",
        "learned_embeds-steps-2.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.safetensors",
    } <= names


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_writer_that_replaces_the_file_still_gives_the_umask_modes(tmp_path: Path, umask: int) -> None:
    from textinv.files import atomic_write

    def private_writer(tmp: Path) -> None:  # what safetensors' save_file does: its own 0600 file renamed over
        own = tmp.with_name("own")
        own.write_bytes(b"data")
        own.chmod(0o600)
        os.replace(own, tmp)

    previous = os.umask(umask)
    try:
        written = atomic_write(tmp_path / "weights.safetensors", private_writer)
    finally:
        os.umask(previous)
    assert _mode(written) == 0o666 & ~umask


# --- the progress line --------------------------------------------------------------------------------------
class _SlowValidation(events.TrainObserver):
    """Stands in for a validation round: 1.5 s of observer time after step 3, booked as validation."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.called_at: list[float] = []  # this observer's own clock, independent of the step timer under test

    def on_step(self, run: events.RunContext, state: StepState) -> None:
        self.called_at.append(time.perf_counter())
        self.step_seconds.append(state.step_seconds)
        if state.step == 3:
            time.sleep(1.5)
            events.add_timing(run, "validation_seconds", 1.5)


@pytest.mark.slow
def test_the_rate_after_a_slow_validation_round_is_the_steps_own(
    tiny_model: Path, train_images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = train_config(tiny_model, train_images, tmp_path / "out", max_train_steps=20, only_save_embeds=True, **FAST)
    validation = _SlowValidation()
    with caplog.at_level("INFO", logger="textinv.observers.progress"):
        textinv.train(config, show_progress=True, observers=[validation])
    lines = {
        int(m.group(1)): m
        for m in (re.match(r"step (\d+)/20 .* ([\d.]+) s/step ETA (\S+)(.*)", r.getMessage()) for r in caplog.records)
        if m
    }
    assert set(lines) == set(range(1, 21))
    after = lines[4]
    # The median of the steps' own time (a running mean of wall time said >= 1.5 s / 4 here).
    assert after.group(2) == f"{statistics.median(validation.step_seconds[:4]):.3f}", after.group(0)
    # Step 4's own time leaves the 1.5 s round out: measured apart, it fits in what the wall clock shows between the
    # two calls once the round's sleep is taken off (with the round in it, it would be >= 1.5 s, more than that).
    between = validation.called_at[3] - validation.called_at[2]
    assert validation.step_seconds[3] <= between - 1.5, (validation.step_seconds[3], between)
    assert "validation 1.5 s so far" in after.group(4)
    assert "validation" not in lines[3].group(4)


def test_the_rate_is_the_recent_steps_median(caplog: pytest.LogCaptureFixture) -> None:
    run = SimpleNamespace(is_main_process=True, max_steps=20, record={"timings": {}})
    progress = Progress(True)
    progress.on_start(run)
    with caplog.at_level("INFO", logger="textinv.observers.progress"):
        for step in range(1, 21):
            progress.on_step(run, StepState(step, 20, 0.5, 1e-4, 9.0 if step == 1 else 0.1))  # a slow first step
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 20
    assert "9.000 s/step" in lines[0]
    assert " 0.100 s/step ETA 0:00:02" in lines[2]  # step 3: the median already leaves the warm-up out
    assert lines[-1].startswith("step 20/20 loss 0.5000 lr 1.00e-04 0.100 s/step ETA 0:00:00")


def test_the_line_says_the_first_epoch_fills_the_cache() -> None:
    filling = progress_text(StepState(2, 10, 0.5, 1e-4, 0.2, views_encoded=(3, 8)), 0.2, {})
    assert filling.endswith("(the first epoch also fills the latent cache: 3/8 views)")
    full = progress_text(StepState(9, 10, 0.5, 1e-4, 0.2), 0.2, {"validation": 3.14, "eval_loss": 0.8})
    assert full == "loss 0.5000 lr 1.00e-04 0.200 s/step ETA 0:00:00; validation 3.1 s, eval_loss 0.8 s so far"


@pytest.mark.slow
def test_a_terminal_run_shows_one_bar_then_one_summary_line(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "textinv.cli",
        "train",
        f"--pretrained_model_name_or_path={tiny_model}",
        f"--train_data_dir={train_images}",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        "--train_batch_size=1",
        "--max_train_steps=12",
        "--seed=1",
        "--eval_steps=0",
        f"--output_dir={tmp_path / 'out'}",
    ]
    shown = read_terminal(command, _env())
    lines = [line.strip() for line in re.split(r"[\r\n]+", shown) if line.strip()]
    bar = [index for index, line in enumerate(lines) if line.startswith("train ")]
    assert bar, shown
    before, after = lines[: bar[0]], lines[bar[-1] + 1 :]
    assert any(line.startswith("logging to ") for line in before)  # said before the bar, not through it
    assert not any(line.startswith(("logging to", "step ")) for line in lines[bar[0] :])
    assert len(after) == 1 and re.fullmatch(
        r"learned <cat-toy> in 12 steps \([\d.]+ s in all: loading [\d.]+ s, steps [\d.]+ s\); wrote .*learned_embeds\.safetensors",
        after[0],
    ), after


@pytest.mark.slow
def test_after_a_resume_the_summary_says_both_counts(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    class StopAtStep(events.TrainObserver):
        def on_step(self, run: events.RunContext, state: StepState) -> None:
            if state.step == 3:
                run.request_stop()

    settings = dict(max_train_steps=8, only_save_embeds=True, **FAST)
    with pytest.raises(TrainingInterrupted):
        textinv.train(
            train_config(tiny_model, train_images, tmp_path / "out", **settings),
            show_progress=False,
            observers=[StopAtStep()],
        )
    resumed = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", resume_from_checkpoint="latest", **settings),
        show_progress=False,
    )
    assert re.match(r"learned <cat-toy> in 8 steps \(5 this run, [\d.]+ s in all: .*\); wrote ", resumed.summary), (
        resumed.summary
    )
    fresh = textinv.train(train_config(tiny_model, train_images, tmp_path / "fresh", **settings), show_progress=False)
    assert re.match(r"learned <cat-toy> in 8 steps \([\d.]+ s in all: .*\); wrote ", fresh.summary), fresh.summary


@pytest.mark.slow
def test_the_closing_lines_times_add_up_to_the_whole_run(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    """Issue 28: a 10-step run said "evaluation 34.5 s so far", then "learned <q> in 10 steps (30.6 s)"."""
    import time

    settings = dict(FAST, max_train_steps=6, eval_steps=2, eval_samples=4, only_save_embeds=True)
    started = time.perf_counter()
    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **settings), show_progress=False)
    wall = time.perf_counter() - started
    times = re.search(
        r"\(([\d.]+) s in all: loading ([\d.]+) s, steps ([\d.]+) s, evaluation ([\d.]+) s\)", result.summary
    )
    assert times, result.summary
    total, loading, steps, evaluation = (float(value) for value in times.groups())
    assert abs(loading + steps + evaluation - total) <= 0.25  # each part rounded to 0.1 s
    assert evaluation < total <= wall + 0.05
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert evaluation == pytest.approx(record["timings"]["eval_seconds"], abs=0.051)


# --- library chatter -------------------------------------------------------------------------------------
CHATTER = """
import logging, sys
from textinv.cli import _configure_logging
_configure_logging(verbose=sys.argv[1] == "1")
logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:7860 200")
logging.getLogger("textinv.serve.server").info("textinv's own line")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_info_lines_only_with_verbose(verbose: bool) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHATTER, "1" if verbose else "0"], capture_output=True, text=True, env=_env()
    )
    assert "textinv's own line" in result.stderr
    assert ("HTTP Request" in result.stderr) is verbose


def test_verbose_is_accepted_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--verbose", "inspect", "x"]).verbose is True
    assert parser.parse_args(["inspect", "x", "--verbose"]).verbose is True
    assert parser.parse_args(["inspect", "x"]).verbose is False


API_SNIPPET = """
import textinv
result = textinv.train(textinv.TrainConfig(
    pretrained_model_name_or_path=r"{model}", train_data_dir=r"{images}", placeholder_token="<cat-toy>",
    initializer_token="toy", resolution=64, max_train_steps=2, train_batch_size=1, eval_steps=0, output_dir=r"{out}"))
textinv.generate(r"{out}", "A <cat-toy> backpack", num_images=1, seed=1, num_inference_steps=2, output_dir=r"{samples}")
from diffusers import StableDiffusionPipeline
print("done")
"""


@pytest.mark.slow
def test_the_python_api_keeps_library_chatter_quiet(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    code = API_SNIPPET.format(model=tiny_model, images=train_images, out=tmp_path / "out", samples=tmp_path / "samples")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
    for chatter in ("Loading weights", "Loading pipeline components", "Writing model shards", "torchvision"):
        assert chatter not in result.stderr, result.stderr[-2000:]


def test_quiet_loading_restores_the_libraries_settings() -> None:
    import transformers.utils.logging as transformers_logging

    from textinv.models.quiet import quiet_loading

    before = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled())
    with quiet_loading():
        assert not transformers_logging.is_progress_bar_enabled()
    assert (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()) == before


# --- eval without a download ----------------------------------------------------------------------------
def test_eval_offline_fails_fast_and_points_to_a_tiny_clip(
    tiny_model: Path, embedding_file: Path, train_images: Path
) -> None:
    started = time.perf_counter()
    result = _cli(
        "eval", "--model", str(tiny_model), "--embeddings", str(embedding_file), "--train_data_dir", str(train_images)
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "textinv: error: --clip_model 'openai/clip-vit-base-patch32' is not a folder, "
        "HF_HUB_OFFLINE is set and it is not in the local cache"
    ), result.stderr
    assert "textinv tiny --clip DIR" in result.stderr and "Retrying" not in result.stderr
    assert time.perf_counter() - started < 60  # no retries: ~5 s of imports


def test_an_unreachable_hub_fails_at_the_first_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    from textinv.inference import evaluation

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(UserError, match=r"the hub did not answer \(ConnectionError\) and it is not in the local cache"):
        evaluation.ClipScorer("someone/no-such-clip")
    assert calls == ["someone/no-such-clip"]


@pytest.mark.slow
def test_tiny_clip_from_the_cli_works_for_eval(
    tiny_model: Path, embedding_file: Path, train_images: Path, tmp_path: Path
) -> None:
    made = _cli("tiny", "--clip", str(tmp_path / "clip"))
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "clip" / "vocab.json").read_bytes() == (
        REPO / "src/textinv/assets/clip-tokenizer/vocab.json"
    ).read_bytes()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\n")
    scored = _cli(
        "eval",
        "--model",
        str(tiny_model),
        "--embeddings",
        str(embedding_file),
        "--train_data_dir",
        str(train_images),
        "--clip_model",
        str(tmp_path / "clip"),
        "--prompts",
        str(prompts),
        "--num_images",
        "1",
        "--num_inference_steps",
        "2",
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert scored.stdout.startswith("image similarity ")


# --- the demo, the README and docs ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_demo_replaces_its_own_outputs(tmp_path: Path) -> None:
    from textinv.demo import run_demo

    threads = torch.get_num_threads()
    first, first_images = run_demo(tmp_path / "demo", steps=2)
    second, second_images = run_demo(tmp_path / "demo", steps=2)
    assert torch.get_num_threads() == threads  # one thread while it runs (see textinv.demo), then as before
    assert [p.name for p in first_images] == [p.name for p in second_images] == ["a-red-cartoon-on-the-beach-seed1.png"]
    assert sorted(p.name for p in (tmp_path / "demo" / "samples").iterdir()) == ["a-red-cartoon-on-the-beach-seed1.png"]
    assert second.summary.startswith("learned <red-cartoon> in 2 steps")


def test_the_docs_api_example_keeps_generated_images_out_of_the_training_images() -> None:
    """docs/embeddings.md's Python API example: every call binds to the API's real signature, the TrainConfig it
    builds is valid, and the images it generates land in a folder apart from the training images (not inside)."""
    import ast
    import inspect

    page = (REPO / "docs" / "embeddings.md").read_text(encoding="utf-8")  # "Use the result", the Python API
    start = page.index("```python\nimport textinv\n\nresult = textinv.train(") + len("```python\n")
    tree = ast.parse(page[start : page.index("```", start)])
    calls = {
        ast.unparse(node.func): node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("textinv.")
    }
    assert sorted(calls) == ["textinv.TrainConfig", "textinv.generate", "textinv.load_embeddings", "textinv.train"]

    def arguments(call: ast.Call) -> tuple[list, dict]:
        args = [a.id if isinstance(a, ast.Name) else ast.literal_eval(a) for a in call.args]  # `pipe`: a name
        return args, {k.arg: ast.literal_eval(k.value) for k in call.keywords}

    _, train_kwargs = arguments(calls["textinv.TrainConfig"])
    config = textinv.TrainConfig(**train_kwargs)  # a field the API lost would fail here
    generate_args, generate_kwargs = arguments(calls["textinv.generate"])
    inspect.signature(textinv.generate).bind(*generate_args, **generate_kwargs)
    load_args, _ = arguments(calls["textinv.load_embeddings"])
    inspect.signature(textinv.load_embeddings).bind(*load_args)
    assert generate_args[0] == config.output_dir  # it generates with the embedding it trained
    train_dir, generate_dir = Path(config.train_data_dir).resolve(), Path(generate_kwargs["output_dir"]).resolve()
    assert not generate_dir.is_relative_to(train_dir) and not train_dir.is_relative_to(generate_dir)


def test_the_docs_say_what_make_test_needs() -> None:
    """What docs/development.md and the README's Quick start say `make test` needs is what the Makefile does."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    page = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    tests = page[page.index("## Running the tests") : page.index("## Lint and types")]
    readme = (REPO / "README.md").read_text(encoding="utf-8")  # the Quick start says it in a line, and links the page
    quick = readme[readme.index("## Quick start") : readme.index("## Train your own images")]
    # "make test also installs Debian's chromium package with apt-get when /usr/bin/chromium is missing ... so it
    # needs root or sudo": the test target depends on that file, and its rule runs apt-get as root or through sudo.
    assert "CHROMIUM ?= /usr/bin/chromium" in makefile and "`/usr/bin/chromium`" in tests
    assert re.search(r"^test: .*\$\(CHROMIUM\)", makefile, re.M)
    rule = makefile[makefile.index("$(CHROMIUM):") : makefile.index("chromium: $(CHROMIUM)")]
    assert 'if [ "$$(id -u)" = 0 ]' in rule and 'sudo="sudo -n"' in rule and "apt-get install" in rule
    assert "apt-get" in tests and "root or `sudo`" in tests
    assert "`chromium`" in quick and "root or `sudo`" in quick and "(docs/development.md)" in quick
    # "make test-fast ... leaves out the slow, browser, multiprocess and interop tests": the Makefile's -m expression
    # and pyproject's markers.
    markers = ["slow", "browser", "multiprocess", "interop"]
    assert '-m "' + " and ".join(f"not {m}" for m in markers) + '"' in makefile
    assert "leaves out the slow, browser, multiprocess and interop tests" in tests
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.findall(r'^    "(\w+): ', pyproject[pyproject.index("markers = [") :], re.M)
    assert declared == markers


# --- the latent cache: filled as training draws, the same latents ------------------------------------------
def test_the_lazy_cache_equals_the_eager_cache_bit_for_bit(tiny_model: Path, train_images: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval().requires_grad_(False)
    views = load_views(discover_images(str(train_images)), 64, 64, False, "bilinear", 0)
    eager = latents.encode_latent_cache(vae, views, random_flip=True)
    lazy = latents.LazyLatentCache(vae, views, random_flip=True)
    assert lazy.views_encoded == (0, 6) and (lazy.num_images, lazy.num_flips) == (eager.num_images, eager.num_flips)
    order = [(2, True), (0, False), (2, True), (1, True), (0, True), (1, False), (2, False)]
    for draw, (image, flipped) in enumerate(order):
        a = eager.sample(image, flipped, torch.Generator().manual_seed(draw))
        b = lazy.sample(image, flipped, torch.Generator().manual_seed(draw))
        assert torch.equal(a, b)
    assert lazy.views_encoded is None and lazy.vae is None  # full: the VAE is let go
    for (image, flip), (mean, std) in lazy.encoded.items():
        assert torch.equal(mean, eager.mean[image, flip]) and torch.equal(std, eager.std[image, flip])


@pytest.mark.slow
def test_training_with_the_lazy_cache_learns_the_eager_caches_vectors(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FirstStep(events.TrainObserver):
        def on_step(self, run: events.RunContext, state: StepState) -> None:
            self.seen = getattr(self, "seen", state.views_encoded)

    settings = dict(max_train_steps=6, repeats=2, only_save_embeds=True, **FAST)
    first = FirstStep()
    lazy = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "lazy", **settings), show_progress=False, observers=[first]
    )
    assert first.seen is not None and first.seen[0] < first.seen[1] == 6  # step 1 came before every view was encoded

    real = builders.load_latents
    monkeypatch.setattr(
        builders,
        "load_latents",
        lambda config, parts, paths, device, data: _eager(real(config, parts, paths, device, data)),
    )
    eager = textinv.train(train_config(tiny_model, train_images, tmp_path / "eager", **settings), show_progress=False)
    assert torch.equal(lazy.embedding.vectors["text_encoder"], eager.embedding.vectors["text_encoder"])
    assert lazy.losses == eager.losses


def _eager(lazy: latents.LazyLatentCache) -> latents.LatentCache:
    assert lazy.views is not None
    return latents.encode_latent_cache(lazy.vae, lazy.views, lazy.num_flips == 2)


# --- the batch on a CPU -------------------------------------------------------------------------------------
def test_a_cpu_run_says_what_a_step_will_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    from textinv.config import TrainConfig

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    sd15 = SimpleNamespace(
        unet=SimpleNamespace(parameters=lambda: [torch.empty(860_000_000, device="meta")]), vae_scale_factor=8
    )
    config = TrainConfig(  # the root script's (ppdiffusers') defaults: batch 16 at 512 px
        pretrained_model_name_or_path="m",
        train_data_dir="d",
        placeholder_token="<t>",
        initializer_token="toy",
        train_batch_size=16,
        resolution=512,
    )
    line = builders.cpu_step_estimate(config, sd15, torch.device("cpu"))
    assert line == (
        "on this CPU a step of 16 example(s) at 512x512 px will take about 3 min (estimated from the UNet's size); "
        "--train_batch_size 1 makes a step about 16x cheaper"
    )
    one = builders.cpu_step_estimate(
        TrainConfig(**{**config.to_dict(), "train_batch_size": 1}), sd15, torch.device("cpu")
    )
    assert (
        one == "on this CPU a step of 1 example(s) at 512x512 px will take about 11 s (estimated from the UNet's size)"
    )
    # textinv train's defaults (5000 steps at 512 px, issue 28): the whole run's time too, 10.95 s x 5000 = 15.2 h.
    whole = builders.cpu_step_estimate(
        TrainConfig(**{**config.to_dict(), "train_batch_size": 1}), sd15, torch.device("cpu"), max_steps=5000
    )
    assert whole == (
        "on this CPU a step of 1 example(s) at 512x512 px will take about 11 s, 5000 steps about 15.2 h "
        "(estimated from the UNet's size)"
    )
    assert builders.cpu_step_estimate(config, sd15, torch.device("cuda")) is None
    tiny = SimpleNamespace(
        unet=SimpleNamespace(parameters=lambda: [torch.empty(1_000_000, device="meta")]), vae_scale_factor=8
    )
    assert (
        builders.cpu_step_estimate(TrainConfig(**{**config.to_dict(), "resolution": 64}), tiny, torch.device("cpu"))
        is None
    )
