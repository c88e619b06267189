"""Training speed and memory against the floor: s/step, textinv/floor, peak RSS, start-up, as one table.

    python bench/train_step.py                     # tiny 64 px and SD1.5 architecture at 256 / 512 px
    python bench/train_step.py --only tiny         # just the tiny pipeline (seconds)
    python bench/train_step.py --settings sd15-256 --runs 3 --threads 2
    python bench/train_step.py --compare lora --settings sd15-256-lora4 --threads 1   # pivotal vs plain TI
    python bench/train_step.py --user [user_speed.py's options]   # each side in its own process, the scripts too

**The floor** is what a textual-inversion step cannot go below: the text encoder's and the UNet's own
forward and backward passes with frozen weights and the gradient taken only at the token embeddings
(a leaf the size of the caption's embeddings, ``[1, 77, 768]`` at SD1.5), from pre-computed latents
(no VAE in the step), written here with plain transformers/diffusers calls (``CLIPTextModel``,
``UNet2DConditionModel``, an MSE loss, ``backward``), none of textinv's code. Gradient checkpointing
is the UNet's own ``enable_gradient_checkpointing()`` when the setting asks for it.

**Speed: interleaved, in one process** (``--runs`` of them, each fresh). The process runs
``textinv.train()`` with the CLI's defaults except three, turned off: the held-out evaluation, snapshots and
checkpoints (progress line and TensorBoard logs stay on; ``--user`` times whole runs with all the defaults), from a
ready latent cache of the training latents' shape (random latents: no step pays a VAE pass), with an observer, last in line, that runs one floor step
before step 1 and one after every textinv step: floor, textinv, floor, textinv, ... A textinv step is
timed from the end of the floor step before it to the start of the floor step after it: the whole loop
iteration (divergence and signal checks, optimizer, the other observers, the saving checks). The floor's
UNet is a plain ``UNet2DConditionModel`` built on the weight tensors textinv loaded (the same memory, no
copy; none of textinv's changes to the modules, checkpointing when textinv's has it) and it loads its own
copy of the text encoder (textinv's carries its hook). After ``--warmup`` pairs, each run gives the median of its
floor steps and of its textinv steps, and their ratio; the table shows the median over the runs and each run's ratio.

**Memory: one process per component.** Peak RSS (``ru_maxrss``, the process's high-water mark) is
that of a fresh process doing one thing: textinv's ``train()`` as the CLI runs it (images from the
demo folder through the lazy latent cache, so the VAE and its passes count), or the floor alone (text
encoder and UNet loaded with ``from_pretrained``, the same number of steps). Every child keeps glibc's and
Python's defaults, as the ``textinv`` command does (issue 29: bench/memory_options.py chose them).

**As a user measures it** (issue 29): ``--user`` runs bench/user_speed.py instead, where every side is a process of
its own with its own defaults: the floor (which never imports textinv), textinv's steps, diffusers' example script
and the seed's own script (ppdiffusers in real PaddlePaddle, at 1 thread and at its default) run as they are, and
whole ``textinv train`` runs with the defaults; those are the reference figures (nothing here is a constant).

Pipelines are built once (bench/bench_models.py), with seeded random weights, into ``--cache`` (outside
the repository): the SD1.5-architecture one is about 4 GB on disk. Nothing is downloaded. The children run
with ``OMP_NUM_THREADS=--threads`` (default: this process's torch thread count). The ``*-eval`` settings
also time the held-out evaluation (``--eval_steps``): s/eval per evaluation (no floor for those).

**Pivotal tuning** (issue 26): the ``*-lora4`` settings train a rank-4 LoRA with the word (textinv's LoRA
defaults otherwise); they run only when named. Against the floor their textinv step is pivotal tuning's and the
floor stays textual inversion's (its twin UNet takes the base weights, without the adapters). ``--compare lora``
instead runs plain TI and pivotal tuning in fresh processes by turns, TI, pivotal, TI, ..., and prints their
s/step and peak RSS as ratios (bench/train_step_compare.py's docstring); its sd15 default is 1 warm-up step and
5 more, of which the 3 that pay no VAE pass are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench_models import DEFAULT_CACHE, build_sd15_architecture, ensure_models  # noqa: F401 (gpu_check's)
from train_step_compare import compare_setting, is_pivotal, print_comparison, trained_elements

REPO = Path(__file__).resolve().parents[1]

# name -> (model, resolution, extra TrainConfig fields)
SETTINGS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "tiny-64": ("tiny", 64, {}),
    "sd15-256": ("sd15", 256, {}),
    "sd15-512": ("sd15", 512, {}),
    "sd15-512-gc": ("sd15", 512, {"gradient_checkpointing": True}),
    # Pivotal tuning (issue 26): a rank-4 LoRA with the word; run when named, or with --compare lora.
    "tiny-64-lora4": ("tiny", 64, {"lora_rank": 4}),
    "sd15-256-lora4": ("sd15", 256, {"lora_rank": 4}),
    "sd15-512-lora4": ("sd15", 512, {"lora_rank": 4}),
    "sd15-512-gc-lora4": ("sd15", 512, {"gradient_checkpointing": True, "lora_rank": 4}),
    # The held-out evaluation (issue 20): its own time per evaluation, beside a step's. The other settings
    # turn it off (eval_steps=0), so their wall time is the steps'.
    "tiny-64-eval": ("tiny", 64, {"eval_steps": 1, "eval_samples": 32}),
    "sd15-512-eval": ("sd15", 512, {"eval_steps": 2, "eval_samples": 8}),
}


CAPTION = "a photo of a toy"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def latent_shape(model: Path, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the UNet's latents at ``resolution`` px, from the pipeline's configs."""
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return int(unet["in_channels"]), side, side


class Floor:
    """The floor's step: text encoder + UNet forward and backward, frozen, gradient at the token embeddings only.

    Plain transformers/diffusers calls. The token embeddings' output is replaced by a leaf (a forward hook on
    the embedding module) so backward stops there: the gradient a textual-inversion step needs, and no more.
    """

    def __init__(self, model: Path, resolution: int, unet: Any = None, gradient_checkpointing: bool = False) -> None:
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
        self.input_ids = tokenizer(
            [CAPTION], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        self.text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").requires_grad_(False).eval()
        if unet is None:
            unet = UNet2DConditionModel.from_pretrained(model / "unet")
        else:  # textinv's UNet: a plain twin of it, on the same weight tensors (no copy), without textinv's changes
            gradient_checkpointing = unet.is_gradient_checkpointing
            with torch.device("meta"):
                twin = UNet2DConditionModel.from_config(unet.config)
            # With --lora_rank, PEFT's layers hold the base weights as "<name>.base_layer.weight": the twin takes those.
            state = {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items()}
            twin.load_state_dict({key: value for key, value in state.items() if ".lora_" not in key}, assign=True)
            unet = twin
        self.unet = unet.requires_grad_(False).eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((1, *latent_shape(model, resolution)), generator=generator)
        self.noise = torch.randn(latents.shape, generator=generator)
        self.timesteps = torch.tensor([500])
        self.noisy = scheduler.add_noise(latents, self.noise, self.timesteps)
        self.leaf: Any = None
        self.text_encoder.get_input_embeddings().register_forward_hook(self._leaf)

    def _leaf(self, module: Any, inputs: Any, output: Any) -> Any:
        self.leaf = output.detach().requires_grad_(True)
        return self.leaf

    def step(self) -> float:
        """One step; returns its seconds."""
        import torch.nn.functional as F

        started = time.perf_counter()
        hidden = self.text_encoder(self.input_ids)[0]
        prediction = self.unet(self.noisy, self.timesteps, hidden).sample
        F.mse_loss(prediction, self.noise).backward()
        assert self.leaf.grad is not None
        self.leaf = None
        return time.perf_counter() - started


def bench_config(model: Path, resolution: int, steps: int, scratch: str, extra: dict[str, Any]) -> Any:
    from textinv.config import TrainConfig
    from textinv.tiny import demo_images_dir

    return TrainConfig(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(demo_images_dir()),
        placeholder_token="<bench>",
        initializer_token="toy",
        resolution=resolution,
        train_batch_size=1,
        max_train_steps=steps,
        learning_rate=5e-4,
        lr_warmup_steps=0,
        seed=42,
        only_save_embeds=True,
        checkpointing_steps=None,
        save_steps=10**9,
        output_dir=str(Path(scratch) / "out"),
        **{"eval_steps": 0, **extra},
    )


def run_interleaved(model: Path, resolution: int, steps: int, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Floor and textinv steps in turn in this process (see the module's docstring)."""
    import torch

    from textinv import train
    from textinv.events import TrainObserver

    floor_times: list[float] = []
    textinv_times: list[float] = []
    own_times: list[float] = []  # textinv's StepState.step_seconds: its step without observers and loop bookkeeping

    class Interleave(TrainObserver):
        def on_start(self, run: Any) -> None:
            self.floor = Floor(model, resolution, unet=run.parts.unet)
            floor_times.append(self.floor.step())
            self.mark = time.perf_counter()

        def on_step(self, run: Any, state: Any) -> None:
            textinv_times.append(time.perf_counter() - self.mark)
            own_times.append(state.step_seconds)
            floor_times.append(self.floor.step())
            self.mark = time.perf_counter()

    cache = ready_latents(model, resolution)
    with tempfile.TemporaryDirectory() as scratch:
        train(
            bench_config(model, resolution, warmup + steps, scratch, extra),
            observers=[Interleave()],
            latent_cache=cache,
        )
    floor, textinv, own = floor_times[warmup:], textinv_times[warmup:], own_times[warmup:]
    ratios = [t / statistics.mean(pair) for t, pair in zip(textinv, zip(floor, floor[1:]))]
    return {
        "floor_s": statistics.median(floor),
        "textinv_s": statistics.median(textinv),
        "textinv_own_s": statistics.median(own),
        "ratio": statistics.median(textinv) / statistics.median(floor),
        "pair_ratios": ratios,  # each textinv step over the mean of the floor steps either side
        "threads": torch.get_num_threads(),
    }


def run_floor_alone(model: Path, resolution: int, steps: int, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The floor in a process of its own: its peak RSS."""
    floor = Floor(model, resolution, gradient_checkpointing=bool(extra.get("gradient_checkpointing")))
    high_water = [peak_rss_gib()]
    times = []
    for _ in range(warmup + steps):
        times.append(floor.step())
        high_water.append(peak_rss_gib())
    return {
        "s_per_step": statistics.median(times[warmup:] or times),
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_gib_at_start_and_after_each_step": high_water,
    }


def ready_latents(model: Path, resolution: int) -> Any:
    """A full latent cache of the demo folder's shape (4 images x 2 flips), random: no VAE pass needed."""
    import torch

    from textinv.data.latents import LatentCache

    generator = torch.Generator().manual_seed(1)
    shape = (4, 2, *latent_shape(model, resolution))
    return LatentCache(torch.randn(shape, generator=generator), torch.full(shape, 0.05), 0.18215)


def run_textinv_alone(
    model: Path, resolution: int, steps: int, warmup: int, extra: dict[str, Any], launched_at: float, ready: bool
) -> dict[str, Any]:
    """textinv's train() as the CLI runs it (lazy latent cache from the demo images), alone: peak RSS, start-up,
    s/step (also without the steps that paid a VAE pass), what trains. ``ready``: with a full latent cache handed
    over instead (``--ready-latents``: the VAE never runs)."""
    from textinv import train
    from textinv.events import TrainObserver

    step_times: list[float] = []
    first_step_at: list[float] = []
    evaluations: dict[str, float] = {}
    trained: dict[str, int] = {}
    vae_steps: list[int] = []  # steps that encoded a view into the lazy latent cache

    high_water: list[float] = []  # peak RSS so far: at the start, then after each step (where it grows)

    class Timer(TrainObserver):
        def on_start(self, run: Any) -> None:
            high_water.append(peak_rss_gib())
            trained.update(trained_elements(run))
            self.encoded: Optional[int] = None if ready else 0

        def on_step(self, run: Any, state: Any) -> None:
            if not first_step_at:
                first_step_at.append(time.time())
            step_times.append(state.step_seconds)
            high_water.append(peak_rss_gib())
            encoded = state.views_encoded[0] if state.views_encoded else None  # None: the cache is full
            if encoded != self.encoded:
                vae_steps.append(state.step)
            self.encoded = encoded

        def on_end(self, run: Any, result: Any) -> None:
            held_out = run.record.get("eval")
            if held_out:  # run.json's eval_seconds covers every evaluation (the one before step 1 too)
                count = len(held_out["losses"])
                evaluations.update(
                    s_per_eval=run.record["timings"]["eval_seconds"] / count, samples=held_out["samples"]
                )

    with tempfile.TemporaryDirectory() as scratch:
        config = bench_config(model, resolution, warmup + steps, scratch, extra)
        train(config, observers=[Timer()], latent_cache=ready_latents(model, resolution) if ready else None)
    steady = step_times[warmup:] or step_times
    timed = [step for step in range(warmup + 1, len(step_times) + 1) if step not in vae_steps]
    return {
        "s_per_step": statistics.median(steady),
        "s_per_step_without_vae": statistics.median(step_times[step - 1] for step in timed) if timed else float("nan"),
        "timed_steps": timed,
        "vae_steps": vae_steps,
        "step_seconds": step_times,
        "trained": trained,
        "peak_rss_gib": peak_rss_gib(),
        "startup_s": first_step_at[0] - launched_at - step_times[0] if first_step_at else float("nan"),
        "peak_rss_gib_at_start_and_after_each_step": high_water,
        **evaluations,
    }


def run_in_child(mode: str, spec: dict[str, Any], threads: int) -> Optional[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    spec = {**spec, "mode": mode, "launched_at": time.time()}
    child = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if child.returncode != 0:
        print(f"{mode}: failed: {child.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def child_main(spec: dict[str, Any]) -> None:
    """One measurement, in a fresh process (glibc's and Python's defaults, as the ``textinv`` command leaves them)."""
    args = (Path(spec["model"]), spec["resolution"], spec["steps"], spec["warmup"], spec["extra"])
    if spec["mode"] == "interleaved":
        result = run_interleaved(*args)
    elif spec["mode"] == "floor":
        result = run_floor_alone(*args)
    else:
        result = run_textinv_alone(*args, spec["launched_at"], spec.get("ready_latents", False))
    print(json.dumps(result))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), help="default: all without LoRA (with --compare: with it)"
    )
    parser.add_argument("--only", choices=["tiny", "sd15"], help="run only the settings of this model")
    parser.add_argument(
        "--compare", choices=["lora"], help="plain TI against pivotal tuning, fresh processes by turns (no floor)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps to time after warm-up (default: 20 tiny; sd15 3, compare 5)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (default: 3 tiny, 1 sd15)")
    parser.add_argument(
        "--runs", type=int, default=3, help="runs per setting (fresh processes; --compare: TI/pivotal pairs)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP_NUM_THREADS of the children")
    parser.add_argument("--no-rss", action="store_true", help="skip the one-component processes (peak RSS, start-up)")
    parser.add_argument("--no-interleave", action="store_true", help="only the one-component processes")
    parser.add_argument(
        "--ready-latents", action="store_true", help="textinv's own process gets a full latent cache (no VAE pass)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--extra", default="{}", help='JSON of more TrainConfig fields, e.g. \'{"mixed_precision": "bf16"}\''
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--user", action="store_true", help="run bench/user_speed.py with the options after it")
    if sys.argv[1:2] == ["--user"]:
        import user_speed

        sys.argv = [user_speed.__file__, *sys.argv[2:]]
        user_speed.main()
        return
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    pivotal = [name for name in SETTINGS if is_pivotal(SETTINGS[name][2])]
    names = args.settings or (pivotal if args.compare else [name for name in SETTINGS if name not in pivotal])
    names = [name for name in names if args.only is None or SETTINGS[name][0] == args.only]
    if args.compare and set(names) - set(pivotal):
        parser.error(f"--compare lora compares the settings with a LoRA: {', '.join(pivotal)}")
    models = ensure_models(args.cache, {SETTINGS[name][0] for name in names})
    rows = []
    for name in names:
        model_key, resolution, extra = SETTINGS[name]
        tiny = model_key == "tiny"
        spec = {
            "model": str(models[model_key]),
            "resolution": resolution,
            "steps": args.steps or (20 if tiny else 5 if args.compare else 3),
            "warmup": args.warmup if args.warmup is not None else (3 if tiny else 1),
            "extra": {**extra, **json.loads(args.extra)},
            "ready_latents": args.ready_latents,
        }
        if args.compare:
            rows.append(compare_setting(name, spec, args.runs, args.threads, run_in_child))
            continue
        row: dict[str, Any] = {"setting": name, "threads": args.threads, "extra": spec["extra"], "runs": []}
        if not args.no_interleave and "eval_steps" not in extra:
            for run in range(args.runs):
                result = run_in_child("interleaved", spec, args.threads)
                if result is not None:
                    row["runs"].append(result)
                    print(
                        f"{name} run {run + 1}: floor {result['floor_s']:.3f} s, textinv {result['textinv_s']:.3f} s, "
                        f"ratio {result['ratio']:.3f}",
                        file=sys.stderr,
                    )
        if not args.no_rss:
            row["textinv"] = run_in_child("textinv", spec, args.threads)
            if "eval_steps" not in extra:
                row["floor"] = run_in_child("floor", spec, args.threads)
            print(f"{name}: peak RSS measured", file=sys.stderr)
        rows.append(row)

    if args.compare:
        print_comparison(rows, args.threads)
    else:
        print_table(rows, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def print_table(rows: list[dict[str, Any]], threads: int) -> None:
    print(f"OMP_NUM_THREADS={threads}")
    print(
        f"{'setting':<17} {'floor s':>8} {'textinv s':>9} {'ratio':>6}  {'runs':<20} {'RSS textinv':>11} "
        f"{'RSS floor':>9} {'start-up':>8} {'s/eval':>7}"
    )
    for row in rows:
        runs = row["runs"]
        speed = f"{'':>8} {'':>9} {'':>6}  {'':<20}"
        if runs:
            ratios = [run["ratio"] for run in runs]
            speed = (
                f"{statistics.median(run['floor_s'] for run in runs):>8.3f} "
                f"{statistics.median(run['textinv_s'] for run in runs):>9.3f} {statistics.median(ratios):>6.3f}  "
                f"{' '.join(f'{ratio:.3f}' for ratio in ratios):<20}"
            )
        own = row.get("textinv") or {}
        floor = row.get("floor") or {}
        print(
            f"{row['setting']:<17} {speed} {own.get('peak_rss_gib', float('nan')):>9.2f} G "
            f"{floor.get('peak_rss_gib', float('nan')):>7.2f} G "
            f"{own.get('startup_s', float('nan')):>7.1f}s {own.get('s_per_eval', float('nan')):>7.2f}"
        )


if __name__ == "__main__":
    main()
