"""The reference training scripts, run as a user runs them, timed from outside (issue 29's reference columns).

- ``run_seed_script``: ppdiffusers' ``train_textual_inversion.py`` (the seed's own script) in the Paddle venv, on a
  Paddle-format copy of the pipeline (reference_env.paddle_format_copy: converted once, cached beside it);
- ``run_diffusers_script``: diffusers' ``textual_inversion.py`` in our venv, through the tv_shim its SOURCE.md
  describes (a copy of the script whose torchvision import reads ``from tv_shim import transforms``).

Each runs in a process of its own, with its own defaults, under bench/reference_wrapper.py, which hooks the framework
(never the script) and writes the times of step 1's start and of each optimizer step. The settings are the bench's:
placeholder ``<bench>``, initializer ``toy``, learning rate 5e-4, constant schedule without warm-up, batch 1, seed 42.

What the flags turn off: snapshots (``--save_steps`` beyond the run; diffusers: ``--checkpointing_steps`` too, its
accelerate state) and validation (no ``--validation_prompt``: both scripts' default). What stays on, as it does for a
user: both scripts write only the learned embedding at the end (ppdiffusers' ``--only_save_embeds`` is always true;
diffusers' ``--save_as_full_pipeline`` is off unless given), both log every step (VisualDL / TensorBoard, their
defaults), and diffusers' repeats its images 100 times in its dataset. So a whole run with the defaults needs no other
flags: the scripts' defaults already skip the pipeline save; only the snapshot interval (500 in both) and the
diffusers script's checkpoint interval (500) would add files after step 500.

Definitions (``ReferenceRun``): wall seconds from launch to exit, measured here; start-up from launch (just before
the process starts) to the start of step 1, which is the first forward call of any model in the process (the VAE
encoding step 1's batch: both scripts run none before their loop); step 1 lasts from there to its optimizer step,
step k from step k-1's optimizer step to its own (data loading and logging included); peak RSS is the child's
``ru_maxrss``; ``cores_used`` is the CPU time the process spent per wall second over the steps after the first (on a
busy machine it stays below the thread count); ``framework_threads`` is the thread count the framework took.

    python bench/reference_scripts.py --tool ppdiffusers --model tiny --resolution 64 --steps 3
    python bench/reference_scripts.py --tool both --model sd15 --resolution 256 --steps 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from reference_env import (
    DIFFUSERS_SCRIPT,
    SEED_SCRIPT,
    find_paddle_python,
    paddle_environment,
    paddle_format_copy,
    reference_dir,
)

WRAPPER = Path(__file__).resolve().parent / "reference_wrapper.py"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
TORCHVISION_IMPORT = "from torchvision import transforms"
SHIM_IMPORT = "from tv_shim import transforms"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ReferenceRun:
    """One run of a reference script, measured from outside (the module docstring defines each figure)."""

    tool: str
    exit_code: int
    wall_seconds: float
    startup_seconds: Optional[float]
    step_seconds: list[float]
    peak_rss_bytes: int
    threads: Optional[int]  # what was asked: None = the tool's own default
    cores_used: Optional[float]
    framework_threads: Optional[int]  # what the framework used (reference_wrapper.py says how it is read)
    output_dir: str
    stderr_tail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and bool(self.step_seconds)

    @property
    def threads_applied(self) -> bool:
        """The framework ran with the asked count (always true for the tool's own default)."""
        return self.threads is None or self.framework_threads == self.threads

    @property
    def steady_seconds_per_step(self) -> Optional[float]:
        """The median step after the first (the first also pays for the first batch's lazy set-up)."""
        later = self.step_seconds[1:] or self.step_seconds
        return statistics.median(later) if later else None


def common_arguments(model: Path, images: Path, resolution: int, steps: int, output_dir: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={images}", "--learnable_property=object",
        "--placeholder_token=<bench>", "--initializer_token=toy", f"--resolution={resolution}",
        "--train_batch_size=1", f"--max_train_steps={steps}", "--learning_rate=5e-4", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--seed=42", f"--output_dir={output_dir}", f"--save_steps={steps + 1}",
    ]  # fmt: skip


def thread_environment(base: dict[str, str], threads: Optional[int]) -> dict[str, str]:
    """None: the variables removed, so the tool picks its own count; a number: each variable set to it."""
    environment = {name: value for name, value in base.items() if name not in THREAD_VARIABLES}
    if threads is not None:
        environment.update({name: str(threads) for name in THREAD_VARIABLES})
    return environment


def run_wrapped(
    tool: str,
    python: Path,
    framework: str,
    script: Path,
    argv: list[str],
    environment: dict[str, str],
    threads: Optional[int],
    output_dir: Path,
    sys_path: tuple[str, ...] = (),
    timeout: float = 7200,
) -> ReferenceRun:
    """Run ``script argv`` under the wrapper in ``python``; wait for it with wait4 to read its own peak RSS."""
    output_dir.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = output_dir / "wrapper-spec.json", output_dir / "wrapper-result.json"
    spec: dict[str, Any] = {"framework": framework, "script": str(script), "argv": argv, "result": str(result_file)}
    spec.update(sys_path=list(sys_path), threads=threads)
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    log = output_dir / "stderr.txt"
    with open(log, "wb") as stderr, open(output_dir / "stdout.txt", "wb") as stdout:
        launched = time.time()
        command = [str(python), str(WRAPPER), str(spec_file)]
        child = subprocess.Popen(command, env=environment, cwd=output_dir, stdout=stdout, stderr=stderr)
        status, usage = wait_for(child.pid, launched + timeout)  # reaped here: Popen.wait would not give rusage
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - launched
    events = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    code = os.waitstatus_to_exitcode(status)
    ends, start = events.get("step_ends", []), events.get("first_forward")
    steps = [b - a for a, b in zip([start, *ends], ends)] if start is not None else []
    return ReferenceRun(
        tool=tool,
        exit_code=code,
        wall_seconds=round(wall, 3),
        startup_seconds=None if start is None else round(start - launched, 3),
        step_seconds=[round(s, 4) for s in steps],
        peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
        threads=threads,
        cores_used=cores_used(events),
        framework_threads=events.get("framework_threads"),
        output_dir=str(output_dir),
        stderr_tail="" if code == 0 else log.read_text(encoding="utf-8", errors="replace")[-3000:],
        facts={k: events[k] for k in ("framework_version", "os_threads") if k in events},
    )


def wait_for(pid: int, deadline: float) -> tuple[int, Any]:
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if time.time() > deadline:
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            return status, usage
        time.sleep(0.05)


def cores_used(events: dict[str, Any]) -> Optional[float]:
    """CPU seconds per wall second over the steps after the first (over step 1 when there is only one)."""
    ends, cpu = events.get("step_ends", []), events.get("step_cpu", [])
    if len(ends) >= 2:
        return round((cpu[-1] - cpu[0]) / max(ends[-1] - ends[0], 1e-9), 2)
    if len(ends) == 1 and "first_forward" in events:
        return round((cpu[0] - events["first_forward_cpu"]) / max(ends[0] - events["first_forward"], 1e-9), 2)
    return None


def find_reference() -> Path:
    folder, why = reference_dir()
    if folder is None:
        raise SystemExit(why)
    return folder


def run_seed_script(
    model: Path,
    images: Path,
    resolution: int,
    steps: int,
    threads: Optional[int] = None,
    output_dir: Optional[Path] = None,
    paddle_python: Optional[Path] = None,
    reference: Optional[Path] = None,
) -> ReferenceRun:
    """ppdiffusers' script on the Paddle-format copy of ``model`` (a diffusers folder, converted once; a folder that
    already holds Paddle weights, with a ``.textinv-complete`` marker from reference_env, is used as it is)."""
    if paddle_python is None:
        paddle_python, why = find_paddle_python()
        if paddle_python is None:
            raise SystemExit(why)
    paddle_model = model if (model / ".textinv-complete").is_file() else paddle_format_copy(model, paddle_python)
    script = (reference or find_reference()) / SEED_SCRIPT
    output_dir = output_dir or Path(tempfile.mkdtemp(prefix="textinv-seed-script-"))
    argv = common_arguments(paddle_model, images, resolution, steps, output_dir / "out")
    environment = thread_environment(paddle_environment(), threads)
    return run_wrapped("ppdiffusers", paddle_python, "paddle", script, argv, environment, threads, output_dir)


def run_diffusers_script(
    model: Path,
    images: Path,
    resolution: int,
    steps: int,
    threads: Optional[int] = None,
    output_dir: Optional[Path] = None,
    reference: Optional[Path] = None,
) -> ReferenceRun:
    """diffusers' example script in this venv, through its SOURCE.md's tv_shim (a patched copy in ``output_dir``)."""
    folder = (reference or find_reference()) / DIFFUSERS_SCRIPT.parent
    output_dir = output_dir or Path(tempfile.mkdtemp(prefix="textinv-diffusers-script-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    text = (folder / DIFFUSERS_SCRIPT.name).read_text(encoding="utf-8")
    if f"\n{TORCHVISION_IMPORT}\n" not in text:
        raise SystemExit(f"{folder / DIFFUSERS_SCRIPT.name} has no line `{TORCHVISION_IMPORT}` for the tv_shim")
    script = output_dir / DIFFUSERS_SCRIPT.name
    script.write_text(text.replace(f"\n{TORCHVISION_IMPORT}\n", f"\n{SHIM_IMPORT}\n"), encoding="utf-8")
    argv = [
        *common_arguments(model, images, resolution, steps, output_dir / "out"),
        f"--checkpointing_steps={steps + 1}",
    ]
    environment = thread_environment({**os.environ, "HF_HUB_OFFLINE": "1"}, threads)
    return run_wrapped(
        "diffusers", Path(sys.executable), "torch", script, argv, environment, threads, output_dir, (str(folder),)
    )


def images_only(folder: Path, cache: Path) -> Path:
    """``folder``'s images alone, copied into ``cache`` when it holds anything else: diffusers' script opens every
    file in its folder as an image (textinv's demo folder holds an ATTRIBUTION.md)."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) == sum(1 for _ in folder.iterdir()):
        return folder
    destination = cache / f"{folder.name}-images-only"
    destination.mkdir(parents=True, exist_ok=True)
    for image in images:
        if not (destination / image.name).is_file():
            shutil.copyfile(image, destination / image.name)
    return destination


def describe(run: ReferenceRun) -> str:
    if not run.ok:
        return f"{run.tool}: exit code {run.exit_code}\n{run.stderr_tail}"
    startup = f"{run.startup_seconds:.1f}" if run.startup_seconds is not None else "?"
    steady = run.steady_seconds_per_step
    return (
        f"{run.tool:<12} threads {run.threads if run.threads is not None else 'default':<8} wall {run.wall_seconds:7.1f} s"
        f"  start-up {startup:>6} s  steady {steady:.3f} s/step  peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB"
        f"  threads used {run.framework_threads}{'' if run.threads_applied else ' (NOT the asked count)'}"
        f"  cores used {run.cores_used}  steps {run.step_seconds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=("ppdiffusers", "diffusers", "both"), default="both")
    parser.add_argument("--model", default="tiny", help="tiny, sd15 (bench/bench_models.py's) or a diffusers folder")
    parser.add_argument("--images", default=None, help="default: textinv's demo images")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: each tool's own thread count")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    from bench_models import DEFAULT_CACHE, ensure_models
    from textinv.tiny import demo_images_dir

    if args.model in ("tiny", "sd15"):
        model = ensure_models(DEFAULT_CACHE, {args.model})[args.model]
    else:
        model = Path(args.model)
    images = images_only(Path(args.images) if args.images else demo_images_dir(), DEFAULT_CACHE)
    tools = ("ppdiffusers", "diffusers") if args.tool == "both" else (args.tool,)
    runners: dict[str, Callable[..., ReferenceRun]] = {
        "ppdiffusers": run_seed_script,
        "diffusers": run_diffusers_script,
    }
    runs = [runners[tool](model, images, args.resolution, args.steps, args.threads) for tool in tools]
    for run in runs:
        print(json.dumps(asdict(run)) if args.json else describe(run))


if __name__ == "__main__":
    main()
