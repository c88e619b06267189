"""Where a textinv step's time goes, beside the floor's (issue 21): timers around each part, and torch.profiler.

    OMP_NUM_THREADS=1 python bench/profile_step.py --setting sd15-256 --steps 3
    python bench/profile_step.py --setting tiny-64 --steps 30 --profiler   # also torch.profiler's op tables

Runs the interleaved process of ``bench/train_step.py`` (floor, textinv, floor, ... in one process, ready
latents) with every part of textinv's loop wrapped in a timer: the loop's own lines, the example stream,
the draws, tokenizing, the text encoder (its hook's share measured separately), the UNet, the loss, backward,
the optimizer, the divergence check, each observer and the saving/signal check. The table gives each part's
median milliseconds per step over the steady steps; "rest" is the step's wall time not inside any timer
(the loop's Python). The floor's step is split the same way (text encoder, UNet, loss, backward).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402  (the bench next to this file)

# (module path, owner attribute, function name, label): the parts of textinv's step that get a timer.
PARTS = [
    ("textinv.training.recipe", "TrainingRecipe", "accumulate_gradients", "accumulate (all micro-batches)"),
    ("textinv.training.recipe", "TrainingRecipe", "optimizer_step", "optimizer step + schedule + zero_grad"),
    ("textinv.training.recipe", "TrainingRecipe", "save_if_due", "save/signal check"),
    ("textinv.training.recipe", "TrainingRecipe", "evaluate_if_due", "evaluation check"),
    ("textinv.training.recipe", "denoising_loss", None, "  loss forward (draws, noise, TE, UNet, mse)"),
    ("textinv.training.loss", "example_draws", None, "    example draws (latent, noise, timestep)"),
    ("textinv.models.conditioning", "tokenize", None, "    tokenize"),
    ("textinv.models.conditioning", "TrainableTextEncoders", "forward", "    text encoder forward (with hook)"),
    ("textinv.models.tokens", "TrainableTokens", "_swap_rows", "      the hook"),
    ("textinv.models.conditioning", "TrainableTextEncoders", "all_finite", "all_finite"),
    ("accelerate", "Accelerator", "backward", "  backward (TE + UNet)"),
]


class Timers:
    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.step[label] += time.perf_counter() - started

        return timed

    def end_step(self, **extra: float) -> None:
        self.step.update(extra)
        self.steps.append(dict(self.step))
        self.step.clear()


def install(timers: Timers) -> None:
    import importlib

    for module_name, owner, name, label in PARTS:
        module = importlib.import_module(module_name)
        target = getattr(module, owner)
        if name is None:  # a module-level function, patched where the caller looks it up
            setattr(module, owner, timers.wrap(label, target))
        else:
            setattr(target, name, timers.wrap(label, getattr(target, name)))


def per(ops: dict[str, list[float]], name: str, steps: int) -> float:
    return ops[name][0] / steps if name in ops else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(train_step.SETTINGS), default="sd15-256")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profiler", action="store_true", help="torch.profiler over the steady steps too")
    parser.add_argument("--cache", type=Path, default=train_step.DEFAULT_CACHE)
    args = parser.parse_args()

    import torch

    from textinv import train
    from textinv.events import TrainObserver

    model_key, resolution, extra = train_step.SETTINGS[args.setting]
    model = train_step.ensure_models(args.cache, {model_key})[model_key]
    timers, floor_timers = Timers(), Timers()
    install(timers)
    total = args.warmup + args.steps

    class Interleave(TrainObserver):
        def on_start(self, run: Any) -> None:
            self.profiler: Any = None
            self.floor = train_step.Floor(model, resolution, unet=run.parts.unet)
            self.floor_step()
            self.mark = time.perf_counter()

        def floor_step(self) -> None:
            floor = self.floor
            started = time.perf_counter()
            hidden = floor.text_encoder(floor.input_ids)[0]
            encoded = time.perf_counter()
            prediction = floor.unet(floor.noisy, floor.timesteps, hidden).sample
            predicted = time.perf_counter()
            loss = torch.nn.functional.mse_loss(prediction, floor.noise)
            lost = time.perf_counter()
            loss.backward()
            done = time.perf_counter()
            floor_timers.end_step(
                **{
                    "text encoder forward": encoded - started,
                    "UNet forward": predicted - encoded,
                    "loss": lost - predicted,
                    "backward": done - lost,
                    "step": done - started,
                }
            )

        def on_step(self, run: Any, state: Any) -> None:
            timers.end_step(step=time.perf_counter() - self.mark, step_seconds=state.step_seconds)
            steady = state.step > args.warmup
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                if steady:
                    add_ops(textinv_ops, self.profiler)
            self.profiler = start_profiler() if args.profiler and steady else None
            self.floor_step()
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                add_ops(floor_ops, self.profiler)
            self.profiler = start_profiler() if args.profiler and args.warmup <= state.step < total else None
            self.mark = time.perf_counter()

    textinv_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    floor_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def start_profiler() -> Any:
        profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profile.__enter__()
        return profile

    def add_ops(into: dict[str, list[float]], profile: Any) -> None:
        for event in profile.key_averages():
            into[event.key][0] += event.self_cpu_time_total / 1e3  # ms
            into[event.key][1] += event.count

    def observed(observer: Any) -> Any:
        label = f"observer {type(observer).__name__}"
        observer.on_step = timers.wrap(label, observer.on_step)
        return observer

    import textinv.observers as observers_package

    original = observers_package.observers_from_config
    observers_package.observers_from_config = lambda *a, **k: [observed(o) for o in original(*a, **k)]

    cache = train_step.ready_latents(model, resolution)
    with tempfile.TemporaryDirectory() as scratch:
        config = train_step.bench_config(model, resolution, total, scratch, extra)
        train(config, observers=[Interleave()], latent_cache=cache)

    def table(title: str, steps: list[dict[str, float]]) -> None:
        steady = steps[args.warmup :]
        labels = sorted({label for step in steady for label in step}, key=lambda s: (s != "step", s))
        print(f"\n{title} (median ms per step over {len(steady)} steps, OMP threads {torch.get_num_threads()})")
        for label in labels:
            print(f"  {label:<48} {statistics.median(step.get(label, 0.0) for step in steady) * 1e3:10.2f}")
        if "accumulate (all micro-batches)" in labels:
            top = ["accumulate (all micro-batches)", "optimizer step + schedule + zero_grad", "all_finite"]
            top += ["save/signal check", "evaluation check"] + [
                label for label in labels if label.startswith("observer")
            ]
            rest = [step["step"] - sum(step.get(label, 0.0) for label in top) for step in steady]
            print(f"  {'rest (the loop itself, outside every timer)':<48} {statistics.median(rest) * 1e3:10.2f}")

    table("textinv step", timers.steps[1:])  # the first entry is before any floor step pairs with it
    table("floor step", floor_timers.steps[1:])
    if args.profiler:
        steps = args.steps  # the steady steps, each profiled on its own, textinv's and the floor's
        print(f"\ntorch.profiler, self CPU ms per step over {steps} steady steps of each, by op")
        print(f"  {'op':<56} {'textinv':>9} {'floor':>9} {'above':>8} {'calls t/f':>11}")
        names = sorted(
            set(textinv_ops) | set(floor_ops),
            key=lambda n: -abs(per(textinv_ops, n, steps) - per(floor_ops, n, steps)),
        )
        for name in names[:25]:
            t, f = per(textinv_ops, name, steps), per(floor_ops, name, steps)
            calls = f"{textinv_ops[name][1] // steps}/{floor_ops[name][1] // steps}"
            print(f"  {name[:56]:<56} {t:9.2f} {f:9.2f} {t - f:8.2f} {calls:>11}")
        total_t = sum(v[0] for v in textinv_ops.values()) / steps
        total_f = sum(v[0] for v in floor_ops.values()) / steps
        print(f"  {'all ops':<56} {total_t:9.2f} {total_f:9.2f} {total_t - total_f:8.2f}")


if __name__ == "__main__":
    main()
