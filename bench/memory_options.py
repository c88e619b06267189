"""Memory settings for training: s/step, peak RSS and a step's saved activations, each option in a process of its own.

    python bench/memory_options.py                        # SD1.5 architecture at 256 and 512 px, 2 rounds
    python bench/memory_options.py --resolutions 256 --rounds 3 --options glibc mmap-1MiB
    python bench/memory_options.py --options glibc keep-all --resolutions 512      # "keep less for backward" A/B
    python bench/memory_options.py --model tiny --resolutions 64 --steps 20 --warmup 3   # seconds, for trying it out

Each option is a fresh process that sets the allocator up its way, then runs ``textinv.train()`` as
``textinv train`` does (images from the demo folder through the lazy latent cache, batch 1, the held-out
evaluation off, nothing saved but the vectors). Rounds are interleaved (A, B, C, A, B, C, ...), so a busy
spell of the machine falls on every option. Per option: the median steady s/step over rounds (after
``--warmup`` steps; steps that encoded a view into the latent cache are not counted), peak RSS
(``ru_maxrss``), and both as ratios to glibc's defaults measured in the same rounds.

The options (``OPTIONS``): glibc's defaults (the dynamic mmap threshold grows to the largest freed block,
at most 32 MiB, and large activations then live on the heap); a fixed mmap threshold of 1 MiB (what
textinv did up to issue 29: every activation over 1 MiB is mapped and unmapped, fresh zeroed pages each
step) or 32 MiB; ``malloc_trim(0)`` at phase ends (after loading and after the first step); two malloc arenas.
textinv keeps glibc's defaults (it sets nothing: the CLI and ``textinv.train()`` alike); the table and the
choice are in docs/speed.md.
``keep-all`` is glibc's defaults with ``precision.keep_less_for_backward`` turned off: the frozen convolutions keep
their inputs and the GEGLU feed-forwards their gate for backward, as plain PyTorch does.

Saved activations: the bytes of the distinct tensors autograd saves during step 2 (a
``torch.autograd.graph.saved_tensors_hooks`` pack hook, on for that step only, that returns the tensor itself, so
nothing is copied), without the models' own weights.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_models import DEFAULT_CACHE, ensure_models
from machine import cpu_name

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt option numbers (malloc.h)


def _libc() -> Any:
    return ctypes.CDLL("libc.so.6")


def _mmap_threshold(size: int) -> Callable[[], None]:
    return lambda: _libc().mallopt(M_MMAP_THRESHOLD, size)


def _keep_all_for_backward() -> None:
    import textinv.models.precision as precision

    precision.keep_less_for_backward = lambda module: {"conv2d": 0, "geglu": 0}


# name -> (what it does, set up at process start, trim at phase ends)
OPTIONS: dict[str, tuple[str, Callable[[], None], bool]] = {
    "glibc": ("glibc's defaults (dynamic mmap threshold)", lambda: None, False),
    "mmap-1MiB": ("mmap threshold 1 MiB (textinv before issue 29)", _mmap_threshold(1 << 20), False),
    "mmap-32MiB": ("mmap threshold fixed at 32 MiB", _mmap_threshold(32 << 20), False),
    "glibc+trim": ("glibc's defaults, malloc_trim(0) after loading and after step 1", lambda: None, True),
    "arenas-2+trim": (
        "2 malloc arenas, malloc_trim(0) after loading and after step 1",
        lambda: _libc().mallopt(M_ARENA_MAX, 2),
        True,
    ),
    "keep-all": ("glibc's defaults, frozen layers keep their inputs for backward (keep_less_for_backward off)",
                 _keep_all_for_backward, False),
}  # fmt: skip


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One option's run, in this fresh process."""
    _, set_up, trim = OPTIONS[spec["option"]]
    set_up()
    import torch

    from textinv import train
    from textinv.config import TrainConfig
    from textinv.events import TrainObserver
    from textinv.tiny import demo_images_dir

    step_times: list[float] = []
    vae_steps: list[int] = []
    weights: set[int] = set()  # the models' weight storages, not counted as activations
    saved: dict[int, int] = {}  # storage pointer -> bytes, saved for backward in the measured step

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    # Only step 2 runs with the hook (a Python call per saved tensor would slow every step it is on).
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    class Timer(TrainObserver):
        def on_start(self, run: Any) -> None:
            models = [run.parts.denoiser, run.parts.vae, *(part.text_encoder for part in run.parts.text_encoders)]
            for model in (model for model in models if model is not None):  # the VAE may be gone: cache full
                weights.update(p.untyped_storage().data_ptr() for p in model.parameters())
            if trim:
                _libc().malloc_trim(0)
            self.encoded: Any = 0

        def on_step(self, run: Any, state: Any) -> None:
            step_times.append(state.step_seconds)
            encoded = state.views_encoded[0] if state.views_encoded else None  # views in the cache; None: full
            if encoded != self.encoded:  # this step encoded a view (a VAE pass)
                vae_steps.append(state.step)
            self.encoded = encoded
            if trim and state.step == 1:
                _libc().malloc_trim(0)
            if state.step == 1:
                hooks.__enter__()
            elif state.step == 2:
                hooks.__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            pretrained_model_name_or_path=spec["model"],
            train_data_dir=str(demo_images_dir()),
            placeholder_token="<bench>",
            initializer_token="toy",
            resolution=spec["resolution"],
            train_batch_size=1,
            max_train_steps=spec["warmup"] + spec["steps"],
            eval_steps=0,
            only_save_embeds=True,
            output_dir=str(Path(scratch) / "out"),
        )
        train(config, observers=[Timer()])
    # Steps that encoded a view pay a VAE pass: the cache's cost, not the allocator's.
    steady = [t for step, t in enumerate(step_times, 1) if step > spec["warmup"] and step not in vae_steps]
    return {
        "s_per_step": statistics.median(steady or step_times),
        "peak_rss_gib": peak_rss_gib(),
        "saved_gib": sum(saved.values()) / 2**30,
    }


def run_option(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"{spec['option']}: failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--options", nargs="+", choices=sorted(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (a fresh process per option each)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    model = ensure_models(args.cache, {args.model})[args.model]
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for resolution in args.resolutions:
        per_option: dict[str, list[dict[str, Any]]] = {name: [] for name in args.options}
        for round_index in range(args.rounds):
            for name in args.options:
                spec = {"option": name, "model": str(model), "resolution": resolution}
                spec.update(steps=args.steps, warmup=args.warmup)
                result = run_option(spec, args.threads)
                per_option[name].append(result)
                print(
                    f"{resolution} px round {round_index + 1} {name}: {result['s_per_step']:.3f} s/step, "
                    f"peak RSS {result['peak_rss_gib']:.2f} GiB",
                    file=sys.stderr,
                )
        results[resolution] = per_option
    print(f"\nmemory options: {args.model}, {args.threads} threads, batch 1, {cpu_name()}, {started}")
    print(f"{args.rounds} interleaved rounds, median of {args.steps} steps after {args.warmup} each\n")
    print("| px | option | s/step | vs glibc | peak RSS GiB | vs glibc | saved for backward GiB |")
    print("|---|---|---|---|---|---|---|")
    for resolution, per_option in results.items():
        base = per_option.get("glibc") or next(iter(per_option.values()))
        base_step = statistics.median(r["s_per_step"] for r in base)
        base_rss = statistics.median(r["peak_rss_gib"] for r in base)
        for name, runs in per_option.items():
            step = statistics.median(r["s_per_step"] for r in runs)
            rss = statistics.median(r["peak_rss_gib"] for r in runs)
            print(
                f"| {resolution} | {name}: {OPTIONS[name][0]} | {step:.3f} | {step / base_step:.3f} | "
                f"{rss:.2f} | {rss / base_rss:.3f} | {statistics.median(r.get('saved_gib', 0) for r in runs):.3f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
