"""Training speed and memory: seconds per step, peak RSS and start-up time, as one table.

    python bench/train_step.py                     # tiny 64 px and SD1.5 architecture at 256 / 512 px
    python bench/train_step.py --only tiny         # just the tiny pipeline (seconds)
    python bench/train_step.py --steps 6 --settings sd15-512 sd15-512-gc

Each setting runs in a fresh process (so peak RSS is that setting's alone) that trains with
textinv's own ``train()`` for warm-up + N steps; s/step is the median of the steady steps. The
``*-eval`` settings also time the held-out evaluation (``--eval_steps``): s/eval per evaluation and
s/triple per (view, timestep, noise) triple, forward passes only (the others turn it off).
Pipelines are built once, with seeded random weights, into ``--cache`` (outside the repository):
the SD1.5-architecture one is about 4 GB on disk. Nothing is downloaded.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "textinv-bench"

# name -> (model, resolution, extra TrainConfig fields)
SETTINGS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "tiny-64": ("tiny", 64, {}),
    "sd15-256": ("sd15", 256, {}),
    "sd15-512": ("sd15", 512, {}),
    "sd15-512-gc": ("sd15", 512, {"gradient_checkpointing": True}),
    # The held-out evaluation (issue 20): its own time per evaluation, beside a step's. The other settings
    # turn it off (eval_steps=0), so their wall time is the steps'.
    "tiny-64-eval": ("tiny", 64, {"eval_steps": 1, "eval_samples": 32}),
    "sd15-512-eval": ("sd15", 512, {"eval_steps": 2, "eval_samples": 8}),
}


def build_sd15_architecture(output_dir: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights (the real sizes, ~1.07 B parameters).

    Sizes are those of runwayml/stable-diffusion-v1-5's configs (UNet 320/640/1280/1280 with
    768-d cross-attention and 8 heads; VAE 128/256/512/512; CLIP ViT-L/14 text encoder: 12 layers,
    768 wide, quick_gelu); the scheduler is its PNDM with scaled_linear betas 0.00085..0.012.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from textinv.files import atomic_dir
    from textinv.tiny import clip_tokenizer_dir, sd_pipeline, sd_scheduler

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    pipeline = sd_pipeline(tokenizer, text_encoder, unet, vae, sd_scheduler())
    with atomic_dir(output_dir) as tmp:
        pipeline.save_pretrained(tmp)
    return output_dir


def ensure_models(cache: Path, wanted: set[str]) -> dict[str, Path]:
    from textinv.tiny import build_tiny_pipeline

    models = {"tiny": cache / "tiny-sd1", "sd15": cache / "sd15-architecture"}
    if "tiny" in wanted and not (models["tiny"] / "model_index.json").exists():
        build_tiny_pipeline(models["tiny"], seed=0)
    if "sd15" in wanted and not (models["sd15"] / "model_index.json").exists():
        print(f"building the SD1.5-architecture pipeline in {models['sd15']} (once; ~4 GB)", file=sys.stderr)
        build_sd15_architecture(models["sd15"])
    return models


def run_child(
    model: Path, resolution: int, steps: int, warmup: int, extra: dict[str, Any], launched_at: float
) -> dict[str, Any]:
    """Train warmup + steps steps in this process and report timings (called in a fresh process)."""
    import torch

    from textinv import train
    from textinv.config import TrainConfig
    from textinv.events import TrainObserver
    from textinv.tiny import demo_images_dir

    step_times: list[float] = []
    first_step_at: list[float] = []
    evaluations: dict[str, float] = {}

    class Timer(TrainObserver):
        def on_step(self, run: Any, state: Any) -> None:
            if not first_step_at:
                first_step_at.append(time.time())
            step_times.append(state.step_seconds)

        def on_end(self, run: Any, result: Any) -> None:
            held_out = run.record.get("eval")
            if held_out:  # run.json's eval_seconds covers every evaluation (the one before step 1 too)
                count = len(held_out["losses"])
                evaluations.update(
                    s_per_eval=run.record["timings"]["eval_seconds"] / count, samples=held_out["samples"]
                )

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            pretrained_model_name_or_path=str(model),
            train_data_dir=str(demo_images_dir()),
            placeholder_token="<bench>",
            initializer_token="toy",
            resolution=resolution,
            train_batch_size=1,
            max_train_steps=warmup + steps,
            learning_rate=5e-4,
            lr_warmup_steps=0,
            seed=42,
            only_save_embeds=True,
            checkpointing_steps=None,
            save_steps=10**9,
            output_dir=str(Path(scratch) / "out"),
            **{"eval_steps": 0, **extra},
        )
        train(config, show_progress=False, observers=[Timer()])
    steady = step_times[warmup:] or step_times
    return {
        "s_per_step": statistics.median(steady),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "startup_s": first_step_at[0] - launched_at - step_times[0] if first_step_at else float("nan"),
        "threads": torch.get_num_threads(),
        **evaluations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--only", choices=["tiny", "sd15"], help="run only the settings of this model")
    parser.add_argument("--steps", type=int, default=None, help="steady steps to time (default: 20 tiny, 4 sd15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--extra", default="{}", help='JSON of more TrainConfig fields, e.g. \'{"mixed_precision": "bf16"}\''
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one setting, in its own process, set up as the textinv command sets itself up
        from textinv.training.memory import return_freed_memory_promptly

        return_freed_memory_promptly()
        spec = json.loads(args.child)
        print(
            json.dumps(
                run_child(
                    Path(spec["model"]),
                    spec["resolution"],
                    spec["steps"],
                    spec["warmup"],
                    spec["extra"],
                    spec["launched_at"],
                )
            )
        )
        return

    names = [name for name in args.settings if args.only is None or SETTINGS[name][0] == args.only]
    models = ensure_models(args.cache, {SETTINGS[name][0] for name in names})
    rows = []
    for name in names:
        model_key, resolution, extra = SETTINGS[name]
        steps = args.steps or (20 if model_key == "tiny" else 4)
        spec = {
            "model": str(models[model_key]),
            "resolution": resolution,
            "steps": steps,
            "warmup": args.warmup,
            "extra": {**extra, **json.loads(args.extra)},
            "launched_at": time.time(),
        }
        child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{name}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"setting": name, **result, "extra": spec["extra"]})
        print(f"{name}: {result['s_per_step']:.3f} s/step", file=sys.stderr)

    print(f"{'setting':<14} {'s/step':>8} {'peak RSS':>10} {'start-up':>9} {'s/eval':>8} {'s/triple':>9}  extra")
    for row in rows:
        per_eval = (
            f"{row['s_per_eval']:>8.2f} {row['s_per_eval'] / row['samples']:>9.3f}"
            if "s_per_eval" in row
            else f"{'':>8} {'':>9}"
        )
        print(
            f"{row['setting']:<14} {row['s_per_step']:>8.3f} {row['peak_rss_gib']:>8.2f} G {row['startup_s']:>8.1f}s {per_eval}  "
            f"{json.dumps(row['extra']) if row['extra'] else ''}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
