"""Rough edges a new user hit (issue 28): abbreviated and mistyped flags, options without help, `textinv serve` on a
busy port, and the Python API (progress of textinv.train, the public functions' signatures and docstrings)."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import textinv
from conftest import REPO, read_terminal
from textinv import cli


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    env.pop("TEXTINV_DEBUG", None)
    env.update(extra)
    return env


# --- abbreviated and mistyped flags -------------------------------------------------------------------------
def _train(scene: Path, *extra: str) -> list[str]:
    """A `textinv train` command line that would fail on its missing images if its flags were accepted."""
    return [
        "--pretrained_model_name_or_path=" + str(scene / "model"),
        "--train_data_dir=" + str(scene / "images"),
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--output_dir=" + str(scene / "out"),
        *extra,
    ]


def _existing(scene: Path, name: str) -> str:
    path = scene / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "keep.txt").write_text("mine")
    return str(path)


def _a_file(scene: Path, name: str) -> str:
    (scene / name).write_text("mine")
    return str(scene / name)


# (id, argv from the scratch folder, the one error line). Without the fix each was accepted (abbreviations) and went
# on to another error or to work, or was refused without a suggestion (typos).
FLAG_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "train-abbreviated",
        lambda s: ["train", *_train(s, "--max_train_step", "5")],
        "textinv: error: unrecognized arguments: --max_train_step 5; did you mean --max_train_steps? "
        "(see `textinv train --help`)",
    ),
    (
        "train-abbreviated-dashes",
        lambda s: ["train", *_train(s, "--max-train-step=5")],
        "textinv: error: unrecognized arguments: --max_train_step=5; did you mean --max_train_steps? "
        "(see `textinv train --help`)",
    ),
    (
        "train-typo",
        lambda s: ["train", *_train(s, "--resolutoin", "64")],
        "textinv: error: unrecognized arguments: --resolutoin 64; did you mean --resolution? "
        "(see `textinv train --help`)",
    ),
    (
        "train-no-close-flag",
        lambda s: ["train", *_train(s, "--frobnicate")],
        "textinv: error: unrecognized arguments: --frobnicate (see `textinv train --help`)",
    ),
    (
        "generate-abbreviated",
        lambda s: ["generate", "--model", str(s / "model"), "--prompt", "a toy", "--num_image", "2"],
        "textinv: error: unrecognized arguments: --num_image 2; did you mean --num_images? "
        "(see `textinv generate --help`)",
    ),
    (
        "generate-typo-of-a-required-flag",
        lambda s: ["generate", "--model", str(s / "model"), "--promt", "a toy"],
        "textinv: error: unrecognized arguments: --promt; did you mean --prompt? (see `textinv generate --help`)",
    ),
    (
        "tiny-abbreviated",
        lambda s: ["tiny", _existing(s, "tiny"), "--fam", "sdxl"],
        "textinv: error: unrecognized arguments: --fam sdxl; did you mean --family? (see `textinv tiny --help`)",
    ),
    (
        "tiny-typo",
        lambda s: ["tiny", _existing(s, "tiny"), "--sed", "1"],
        "textinv: error: unrecognized arguments: --sed 1; did you mean --seed? (see `textinv tiny --help`)",
    ),
    (
        "inspect-abbreviated",
        lambda s: ["inspect", str(s / "missing.safetensors"), "--js"],
        "textinv: error: unrecognized arguments: --js; did you mean --json? (see `textinv inspect --help`)",
    ),
    (
        "convert-abbreviated",
        lambda s: ["convert", str(s / "missing.pt"), str(s / "out.safetensors"), "--overw"],
        "textinv: error: unrecognized arguments: --overw; did you mean --overwrite? (see `textinv convert --help`)",
    ),
    (
        "eval-abbreviated",
        lambda s: ["eval", "--model", str(s / "model"), "--embeddings", "e.pt", "--batch_siz", "2"],
        "textinv: error: unrecognized arguments: --batch_siz 2; did you mean --batch_size? (see `textinv eval --help`)",
    ),
    (
        "demo-abbreviated",
        lambda s: ["demo", "--output_dir", _a_file(s, "demo"), "--step", "3"],
        "textinv: error: unrecognized arguments: --step 3; did you mean --steps? (see `textinv demo --help`)",
    ),
    (
        "serve-abbreviated",
        lambda s: ["serve", "--host", "0.0.0.0", "--por", "7999"],
        "textinv: error: unrecognized arguments: --por 7999; did you mean --port? (see `textinv serve --help`)",
    ),
    (
        "top-level-abbreviated",
        lambda s: ["--verb", "inspect", str(s / "missing.safetensors")],
        "textinv: error: unrecognized arguments: --verb; did you mean --verbose? (see `textinv inspect --help`)",
    ),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, argv_for, line", FLAG_CASES, ids=[case[0] for case in FLAG_CASES])
def test_abbreviated_and_mistyped_flags_are_one_line_with_a_suggestion(
    name: str, argv_for: Callable[[Path], list[str]], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = argv_for(tmp_path)
    before = _snapshot(tmp_path)
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert (code, captured.err.splitlines(), captured.out) == (2, [line], "")
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize(
    "extra, line",
    [
        (
            ["--resolutoin", "64"],
            "train_textual_inversion.py: error: unrecognized arguments: --resolutoin 64; did you mean --resolution? "
            "(see `train_textual_inversion.py --help`)",
        ),
        (
            ["--max_train_step=5"],
            "train_textual_inversion.py: error: unrecognized arguments: --max_train_step=5; did you mean "
            "--max_train_steps? (see `train_textual_inversion.py --help`)",
        ),
    ],
    ids=["typo", "abbreviated"],
)
def test_the_root_script_refuses_them_too(extra: list[str], line: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "train_textual_inversion.py"), *_train(tmp_path, *extra)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
    )
    assert (run.returncode, run.stderr.splitlines(), run.stdout) == (2, [line], "")
    assert list(tmp_path.iterdir()) == []


# --- every option has help, and shows its default ----------------------------------------------------------
def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every subcommand of `textinv`, and of the root script (`train` with its own defaults)."""
    found = []
    for prog, defaults in (("textinv", None), ("train_textual_inversion.py", cli.SCRIPT_DEFAULTS)):
        root = cli.build_parser(defaults)
        found.append((prog, root))
        commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
        found += [(f"{prog} {name}", parser) for name, parser in commands.choices.items()]
    return found


def _shown(default: object) -> str:
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default() -> None:
    missing_help, missing_default = [], []
    for name, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing_help.append(flag)
                continue
            default = action.default
            if action.required or default in (None, False, [], argparse.SUPPRESS):
                continue
            if f"(default: {_shown(default)}" not in action.help:
                missing_default.append(f"{flag}: {action.help!r} (default {default!r})")
    assert missing_help == [] and missing_default == []


def test_generate_demo_and_tiny_help_show_each_options_text_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no help text wrapped
    expected = {
        "generate": [
            "--prompt PROMPT what to draw; name the learned word in it, e.g. '<cat-toy> on a beach'",
            "--num_images NUM_IMAGES images to generate (default: 1)",
            "--num_inference_steps NUM_INFERENCE_STEPS denoising steps per image (default: 50)",
            "--guidance_scale GUIDANCE_SCALE classifier-free guidance (default: the pipeline's own: SD 7.5, SD3 7.0, "
            "Flux 3.5)",
            "--height HEIGHT image height, a multiple of 8 (default: the model's size)",
            "--width WIDTH image width, a multiple of 8 (default: the model's size)",
            "--output_dir OUTPUT_DIR folder the PNG images go to, never over a file (default: textinv-images)",
        ],
        "demo": ["--steps STEPS training steps (default: 200)"],
        "tiny": ["--seed SEED the random weights' seed (default: 0)"],
    }
    for command, entries in expected.items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        shown = re.sub(r"\s+", " ", capsys.readouterr().out)
        for entry in entries:
            assert entry in shown, (command, entry, shown)


# --- textinv serve on a busy port -----------------------------------------------------------------------------
def test_serve_on_a_busy_port_says_so_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"  # the server's temporary work folder would be made here
    temp.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "textinv.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(TMPDIR=str(temp)),
            cwd=tmp_path,
        )
        given = tmp_path / "work"
        with_work_dir = subprocess.run(
            [sys.executable, "-m", "textinv.cli", "serve", "--port", str(port), "--work_dir", str(given)],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(TMPDIR=str(temp)),
            cwd=tmp_path,
        )
    for result in (run, with_work_dir):
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr[-2000:]
        match = re.fullmatch(
            rf"textinv: error: port {port} on 127\.0\.0\.1 is in use; choose another with --port (\d+)", lines[0]
        )
        assert match and int(match.group(1)) > port, lines[0]
        assert "serving" not in result.stderr + result.stdout and "launch()" not in lines[0]
    assert list(temp.iterdir()) == [] and not given.exists()  # no work folder left, made or given


# --- the Python API -------------------------------------------------------------------------------------------
TRAIN_TWICE = """
import sys
sys.path.insert(0, {tests!r})
import textinv
from conftest import train_config
from textinv.tiny import build_tiny_pipeline
model = build_tiny_pipeline({root!r} + "/model", seed=0)
for name, shown in (("shown", True), ("quiet", False)):
    print(f"--- show_progress={{shown}}", file=sys.stderr, flush=True)
    config = train_config(model, {images!r}, {root!r} + "/" + name, max_train_steps=3, eval_steps=0, report_to="none")
    textinv.train(config, show_progress=shown)
print("--- done", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_the_api_shows_progress_lines_off_a_terminal_and_nothing_when_asked(train_images: Path, tmp_path: Path) -> None:
    script = TRAIN_TWICE.format(tests=str(REPO / "tests"), root=str(tmp_path), images=str(train_images))
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=_env(OMP_NUM_THREADS="1")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shown = run.stderr.split("--- show_progress=True\n", 1)[1].split("--- show_progress=False\n")[0]
    quiet = run.stderr.split("--- show_progress=False\n", 1)[1].split("--- done")[0]
    steps = [line for line in shown.splitlines() if line.startswith("step ")]
    assert [line.split(" loss ")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"], shown
    assert all(re.search(r"loss \d+\.\d{4} lr \S+ [\d.]+ s/step ETA \d+:\d\d:\d\d", line) for line in steps), steps
    assert "\r" not in shown and not [line for line in shown.splitlines() if line.startswith("train ")]  # no bar
    assert not [line for line in quiet.splitlines() if line.startswith(("step ", "train "))], quiet
    assert (tmp_path / "quiet" / "learned_embeds.safetensors").is_file()


TRAIN_ONCE = """
import sys
sys.path.insert(0, {tests!r})
import textinv
from conftest import train_config
from textinv.tiny import build_tiny_pipeline
model = build_tiny_pipeline({root!r} + "/model", seed=0)
textinv.train(train_config(model, {images!r}, {root!r} + "/out", max_train_steps=3, eval_steps=0, report_to="none"))
"""


@pytest.mark.slow
def test_the_api_shows_a_bar_on_a_terminal_that_reports_no_size(train_images: Path, tmp_path: Path) -> None:
    # A pseudo-terminal nobody sized (`script`, `docker run -t` in a pipeline) says 0 rows, 0 columns: tqdm drew nothing.
    script = TRAIN_ONCE.format(tests=str(REPO / "tests"), root=str(tmp_path), images=str(train_images))
    shown = read_terminal([sys.executable, "-c", script], _env(OMP_NUM_THREADS="1"), rows=0, columns=0)
    frames = [frame.strip() for frame in re.split(r"[\r\n]+", shown) if frame.strip().startswith("train ")]
    assert frames and re.match(r"train 100%\|█+\| 3/3, loss \d", frames[-1]), shown[-2000:]
    assert not re.search(r"^step \d", shown, re.MULTILINE)  # the bar, not the lines


def _implementations() -> dict[str, Callable[..., object]]:
    from textinv.embeddings import load_embeddings
    from textinv.inference.generation import generate
    from textinv.tiny import build_tiny_pipeline

    return {"generate": generate, "load_embeddings": load_embeddings, "build_tiny_pipeline": build_tiny_pipeline}


def test_the_public_functions_have_their_real_signatures_and_docstrings() -> None:
    functions = [name for name in textinv.__all__ if inspect.isfunction(getattr(textinv, name))]
    assert sorted(functions) == ["build_tiny_pipeline", "generate", "load_embeddings", "train"]
    for name, implementation in _implementations().items():
        public = getattr(textinv, name)
        assert inspect.signature(public) == inspect.signature(implementation), name
        assert inspect.getdoc(public) == inspect.getdoc(implementation), name
    # train adds show_progress to textinv.training.train's parameters (the observers its config asks for).
    from textinv.training import train as run_training

    public, inner = inspect.signature(textinv.train), inspect.signature(run_training)
    assert {n: p for n, p in public.parameters.items() if n != "show_progress"} == dict(inner.parameters)
    assert public.parameters["show_progress"].default is True
    assert public.return_annotation == inner.return_annotation
    doc = inspect.getdoc(textinv.train) or ""
    for behaviour in ("on a terminal", "progress bar", "otherwise", "written to stderr", "``show_progress=False``"):
        assert behaviour in doc, behaviour


def test_help_shows_the_parameters_and_import_alone_needs_no_torch() -> None:
    code = (
        "import sys, textinv; print('torch imported' if 'torch' in sys.modules else 'torch not imported'); "
        "help(textinv.generate); help(textinv.build_tiny_pipeline)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode == 0, run.stderr
    text = re.sub(r"\s+", " ", run.stdout)
    assert "generate(model: 'str | Any', prompt: 'str', embeddings: 'Sequence[str | Path]' = ()" in text
    assert "Generate ``num_images`` images; image ``i`` uses seed ``seed + i``" in text
    assert "build_tiny_pipeline(output_dir: 'str | Path', family: 'str' = 'sd1', seed: 'int' = 0" in text
    assert "*args" not in text and run.stdout.startswith("torch not imported")
