"""Is textinv right and fast on this NVIDIA machine? One command, a table and a verdict (issue 16).

    python bench/gpu_check.py                          # tiny, SD1.5 (512 px), SDXL (1024 px) x fp32/bf16/fp16
    python bench/gpu_check.py --only tiny sd15         # some of the models
    python bench/gpu_check.py --device cpu --quick     # the same checks on the tiny pipeline only (CI, < 1 min)

Each model and precision trains in a fresh process (so peak host RSS is that setting's alone) with
textinv's own ``train()``: warm-up + N steps at batch 1, saving the full pipeline, then the same run
stopped halfway (a checkpoint) and resumed. The pipelines have random weights and the real
architectures (the SD1.5 one is bench/train_step.py's builder; SDXL's is :func:`build_sdxl_architecture`),
built once into ``--cache`` (SD1.5 ~4 GB, SDXL ~14 GB; the first run pays for building them).

The table: s/step (median of the steady steps), peak GPU memory (``torch.cuda.max_memory_allocated``
over the full run), peak host RSS of the process, start-up (launch to the first step). The checks:

- ``finite``: every loss and the learned vectors are finite;
- ``dtype``: the frozen parts are in the precision asked for from the moment they load;
- ``base bytes``: the saved pipeline's text encoder(s) hold the base model's tensors exactly, but for
  the placeholder rows, which hold the learned vectors; the UNet and VAE files are the base's;
- ``resume``: stopped and resumed, the vectors match the uninterrupted run within
  ``textinv.models.precision.vector_tolerance`` (bit-identical on the CPU); fp16's loss scale is in the checkpoint.

With 2 or more GPUs it also trains through ``torchrun --nproc_per_node 2`` at batch 1 and compares
with one process at batch 2 (same examples per step). A setting that runs out of GPU memory is
reported as such and is not a failed check; any failed check makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_models import DEFAULT_CACHE, build_sd15_architecture, full_size_vae  # noqa: E402  (the real-size builders)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# model -> (resolution on a GPU, folder name in --cache)
MODELS = {"tiny": (64, "tiny-sd1"), "sd15": (512, "sd15-architecture"), "sdxl": (1024, "sdxl-architecture")}
PRECISIONS = ("no", "bf16", "fp16")
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
PLACEHOLDER = "<gpu-check>"


def build_sdxl_architecture(output_dir: Path, seed: int = 0, device: str = "cpu") -> Path:
    """An SDXL-base-shaped pipeline with random weights (the real sizes, ~3.5 B parameters).

    Sizes are stabilityai/stable-diffusion-xl-base-1.0's configs: UNet 320/640/1280 with 1/2/10
    transformer layers, 5/10/20 attention heads, 2048-d cross-attention and the "text_time" added
    conditioning (256-d time ids, 2816 inputs); CLIP ViT-L/14 (768 wide, 12 layers, quick_gelu) and
    OpenCLIP ViT-bigG/14 with projection (1280 wide, 32 layers, 20 heads, gelu; its tokenizer pads
    with "!"); VAE 128/256/512/512 with scaling factor 0.13025; the Euler scheduler of the base model.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from textinv.files import atomic_dir
    from textinv.tiny import clip_tokenizer_dir, sdxl_pipeline

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    tokenizer_2 = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), pad_token="!")

    def clip(tok: Any, width: int, layers: int, heads: int, act: str) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=width,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    with torch.device(device):  # initialising 2.6 B UNet weights is minutes on a CPU, seconds on a GPU
        text_encoder = CLIPTextModel(clip(tokenizer, 768, 12, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(clip(tokenizer_2, 1280, 32, 20, "gelu"))
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = full_size_vae(1024, scaling_factor=0.13025, force_upcast=True)
    pipeline = sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae)
    with atomic_dir(output_dir) as tmp:
        pipeline.save_pretrained(tmp)
    return output_dir


def ensure_model(cache: Path, name: str, device: str) -> Path:
    from textinv.tiny import build_tiny_pipeline

    folder = cache / MODELS[name][1]
    if not (folder / "model_index.json").exists():
        print(f"building the {name} pipeline in {folder} (once)", file=sys.stderr, flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        if name == "tiny":
            build_tiny_pipeline(folder, seed=0)
        elif name == "sd15":
            build_sd15_architecture(folder)
        else:
            build_sdxl_architecture(folder, device=device)
    return folder


# --- one setting, in its own process ------------------------------------------------------------------
def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model in one precision: the full run, then a stopped and resumed one; time it and check it."""
    import torch

    from textinv import train
    from textinv.config import TrainConfig, TrainingInterrupted, UserError
    from textinv.events import TrainObserver
    from textinv.models.precision import frozen_dtype, vector_tolerance, vectors_agree
    from textinv.tiny import demo_images_dir
    from textinv.training.checkpoints import list_checkpoints, read_checkpoint
    from textinv.training.stopping import TrainingOutOfMemory

    model, device = Path(spec["model"]), spec["device"]
    cuda = device.startswith("cuda")
    steps = spec["warmup"] + spec["steps"]
    checks: dict[str, str] = {}
    step_times: list[float] = []
    first_step_at: list[float] = []
    dtypes: dict[str, Any] = {}

    class Watch(TrainObserver):
        def on_start(self, run: Any) -> None:
            dtypes["unet"] = run.parts.unet.dtype
            dtypes.update({part.name: part.text_encoder.dtype for part in run.parts.text_encoders})

        def on_step(self, run: Any, state: Any) -> None:
            if not first_step_at:
                first_step_at.append(time.time())
            step_times.append(state.step_seconds)

    class StopHalfway(TrainObserver):
        def on_step(self, run: Any, state: Any) -> None:
            if state.step == steps // 2:
                run.request_stop()

    with tempfile.TemporaryDirectory() as scratch:

        def config(name: str, **extra: Any) -> TrainConfig:
            values: dict[str, Any] = dict(
                pretrained_model_name_or_path=str(model),
                train_data_dir=str(demo_images_dir()),
                placeholder_token=PLACEHOLDER,
                initializer_token="toy",
                resolution=spec["resolution"],
                train_batch_size=1,
                max_train_steps=steps,
                learning_rate=5e-3,
                lr_scheduler="linear",
                lr_warmup_steps=2,
                seed=42,
                checkpointing_steps=None,
                save_steps=10**9,
                eval_steps=0,
                report_to="none",
                mixed_precision=spec["precision"],
                output_dir=str(Path(scratch) / name),
            )
            values.update(extra)
            return TrainConfig(**values)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            full = train(config("full"), show_progress=False, observers=[Watch()])
        except TrainingOutOfMemory as error:
            return {"status": "out of memory", "detail": str(error), **_usage(cuda, spec, first_step_at, step_times)}
        usage = _usage(cuda, spec, first_step_at, step_times)
        vectors = full.embedding.vectors
        finite = all(map(math.isfinite, full.losses)) and all(bool(torch.isfinite(v).all()) for v in vectors.values())
        checks["finite"] = "ok" if finite else f"FAILED: losses {full.losses[-3:]}"
        wanted = frozen_dtype(config("x"))
        wrong = {name: str(dtype) for name, dtype in dtypes.items() if dtype != wanted}
        checks["dtype"] = "ok" if not wrong else f"FAILED: {wrong} (wanted {wanted})"
        checks["base bytes"] = _check_saved_pipeline(model, full.output_dir, vectors)

        try:
            halfway = config("resumed", only_save_embeds=True, checkpointing_steps=steps)
            train(halfway, show_progress=False, observers=[StopHalfway()])
            checks["resume"] = "FAILED: the run did not stop halfway"
        except TrainingInterrupted:
            checkpoint = list_checkpoints(Path(scratch) / "resumed")[-1]
            state, _ = read_checkpoint(checkpoint)
            resumed = train(
                config("resumed", only_save_embeds=True, checkpointing_steps=steps, resume_from_checkpoint="latest"),
                show_progress=False,
            )
            tolerance = vector_tolerance("cuda" if cuda else "cpu", spec["precision"])
            ends = resumed.embedding.vectors
            apart = {n: float((ends[n] - v).abs().max() / v.abs().max()) for n, v in vectors.items()}
            agree = all(vectors_agree(resumed.embedding.vectors[n], v, tolerance) for n, v in vectors.items())
            detail = f"max rel diff {max(apart.values()):.1e} (tolerance {tolerance:g})"
            checks["resume"] = ("ok, " if agree else "FAILED: ") + detail
            if spec["precision"] == "fp16" and not state.grad_scaler.get("scale"):
                checks["resume"] = "FAILED: the checkpoint holds no fp16 loss scale"
        except (UserError, RuntimeError) as error:
            checks["resume"] = f"FAILED: {type(error).__name__}: {str(error)[:200]}"
    usage["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"status": "ran", "checks": checks, **usage}


def _usage(cuda: bool, spec: dict[str, Any], first_step_at: list[float], step_times: list[float]) -> dict[str, Any]:
    import torch

    steady = step_times[spec["warmup"] :] or step_times
    return {
        "s_per_step": statistics.median(steady) if steady else float("nan"),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "startup_s": first_step_at[0] - spec["launched_at"] - step_times[0] if first_step_at else float("nan"),
    }


def _check_saved_pipeline(base: Path, saved: Path, vectors: dict[str, Any]) -> str:
    """The saved text encoder(s): the base's tensors but for the new rows (the learned vectors); the UNet and VAE:
    the base's files."""
    import filecmp

    import torch
    from safetensors.torch import load_file

    problems = []
    for name, learned in vectors.items():
        base_tensors = _by_name(load_file(str(base / name / "model.safetensors")))
        saved_tensors = _by_name(load_file(str(saved / name / "model.safetensors")))
        key = next(k for k in base_tensors if k.endswith("token_embedding.weight"))
        before, after = base_tensors[key], saved_tensors[key]
        rows = before.shape[0]
        if after.shape[0] != rows + learned.shape[0] or not torch.equal(after[:rows], before):
            problems.append(f"{name}: other rows changed")
        elif not torch.equal(after[rows:], learned.to(after.dtype)):
            problems.append(f"{name}: the new rows are not the learned vectors")
        changed = [
            k
            for k, t in base_tensors.items()
            if k != key and (k not in saved_tensors or not torch.equal(saved_tensors[k], t))
        ]
        if changed:
            problems.append(f"{name}: {len(changed)} tensors differ from the base's (e.g. {changed[0]})")
    for part in ("unet", "vae"):
        for file in (base / part).glob("*.safetensors"):
            copy = saved / part / file.name
            if (
                not copy.is_file()
                or copy.stat().st_size != file.stat().st_size
                or (file.stat().st_size < 2**30 and not filecmp.cmp(file, copy, shallow=False))
            ):
                problems.append(f"{part}/{file.name} is not the base's")
    return "ok" if not problems else "FAILED: " + "; ".join(problems)


def _by_name(tensors: dict[str, Any]) -> dict[str, Any]:
    """Tensors by name without transformers' ``text_model.`` prefix (saved files may spell it either way)."""
    return {key.removeprefix("text_model."): value for key, value in tensors.items()}


# --- many GPUs ----------------------------------------------------------------------------------------
def ddp_check(model: Path, resolution: int, precision: str, steps: int) -> str:
    """torchrun with 2 processes at batch 1 against 1 process at batch 2: the same examples per step."""
    import torch
    from safetensors.torch import load_file

    from textinv.models.precision import vector_tolerance, vectors_agree
    from textinv.tiny import demo_images_dir

    with tempfile.TemporaryDirectory() as scratch:

        def command(out: str, batch: int) -> list[str]:
            return [
                str(REPO / "train_textual_inversion.py"),
                f"--pretrained_model_name_or_path={model}",
                f"--train_data_dir={demo_images_dir()}",
                f"--placeholder_token={PLACEHOLDER}",
                "--initializer_token=toy",
                f"--resolution={resolution}",
                f"--train_batch_size={batch}",
                f"--max_train_steps={steps}",
                "--learning_rate=5e-3",
                "--lr_warmup_steps=0",
                "--seed=42",
                "--only_save_embeds",
                "--eval_steps=0",
                "--report_to=none",
                f"--mixed_precision={precision}",
                f"--output_dir={Path(scratch) / out}",
            ]

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
        for argv in (torchrun + command("two", 1), [sys.executable] + command("one", 2)):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                return f"FAILED: {' '.join(argv[:4])}...: {done.stderr.strip().splitlines()[-1:]}"
        two = load_file(str(Path(scratch) / "two" / "learned_embeds.safetensors"))[PLACEHOLDER]
        one = load_file(str(Path(scratch) / "one" / "learned_embeds.safetensors"))[PLACEHOLDER]
    tolerance = vector_tolerance("cuda", precision)
    apart = float((two - one).abs().max() / one.abs().max())
    verdict = "ok, " if vectors_agree(two, one, tolerance) and bool(torch.isfinite(two).all()) else "FAILED: "
    return f"{verdict}max rel diff {apart:.1e} (tolerance {tolerance:g})"


# --- the command --------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny pipeline only, few steps (what CI runs on the CPU)"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), help="these models only")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=None, help="steady steps to time (default: 6; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 2; --quick: 1)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where the random-weight pipelines are built once"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one setting, in its own process
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --device cpu --quick for the CPU checks", file=sys.stderr)
        return 2
    names = ["tiny"] if args.quick else (args.only or list(MODELS))
    steps, warmup = (
        args.steps or (3 if args.quick else 6),
        args.warmup if args.warmup is not None else (1 if args.quick else 2),
    )
    rows: list[dict[str, Any]] = []
    for name in names:
        model = ensure_model(args.cache, name, args.device)
        resolution = MODELS[name][0] if cuda else 64
        for precision in args.precisions:
            row: dict[str, Any] = {"model": name, "resolution": resolution, "precision": PRECISION_NAMES[precision]}
            why_not = _unsupported(precision, args.device)
            if why_not:
                rows.append({**row, "status": f"skipped: {why_not}"})
                continue
            spec = {
                "model": str(model),
                "resolution": resolution,
                "precision": precision,
                "device": args.device,
                "steps": steps,
                "warmup": warmup,
                "launched_at": time.time(),
            }
            # One CPU thread unless told otherwise: the tiny pipeline gains nothing from more, and a busy CI machine
            # makes several spinning OpenMP threads ten times slower.
            env = {**os.environ} if cuda or "OMP_NUM_THREADS" in os.environ else {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
            )
            if done.returncode != 0:
                rows.append(
                    {**row, "status": "ran", "checks": {"run": f"FAILED: {done.stderr.strip().splitlines()[-1:]}"}}
                )
            else:
                rows.append({**row, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"{name} {row['precision']}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    ddp: dict[str, str] = {}
    if cuda and not args.quick and torch.cuda.device_count() >= 2:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "no"
        for name in [n for n in names if n != "sdxl"]:
            ddp[f"{name} {PRECISION_NAMES[precision]}: torchrun 2 x batch 1 vs 1 x batch 2"] = ddp_check(
                ensure_model(args.cache, name, args.device), MODELS[name][0], precision, steps
            )
    return report(rows, ddp, args.json)


def _unsupported(precision: str, device: str) -> Optional[str]:
    import torch

    if precision == "fp16" and not device.startswith("cuda"):
        return "fp16 needs CUDA"
    if (
        precision == "bf16"
        and device.startswith("cuda")
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return "this GPU has no bf16"
    return None


def report(rows: list[dict[str, Any]], ddp: dict[str, str], json_path: Optional[Path]) -> int:
    """Print the table and the checks; 1 if any check failed."""

    def number(value: Any, unit: str = "") -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}{unit}"

    print(
        f"{'model':<6} {'px':>5} {'precision':<9} {'s/step':>8} {'peak GPU':>9} {'peak RSS':>9} {'start-up':>9}  checks"
    )
    failed = False
    for row in rows:
        checks = row.get("checks", {})
        failed = failed or any(text.startswith("FAILED") for text in checks.values())
        verdict = "; ".join(f"{name} {text}" for name, text in checks.items()) or row["status"]
        print(
            f"{row['model']:<6} {row['resolution']:>5} {row['precision']:<9} {number(row.get('s_per_step')):>8} "
            f"{number(row.get('peak_gpu_gib'), ' G'):>9} {number(row.get('peak_rss_gib'), ' G'):>9} "
            f"{number(row.get('startup_s'), ' s'):>9}  {verdict}"
        )
    for what, verdict in ddp.items():
        failed = failed or verdict.startswith("FAILED")
        print(f"{what}: {verdict}")
    if json_path:
        json_path.write_text(json.dumps({"rows": rows, "ddp": ddp}, indent=2) + "\n")
    print("gpu_check: FAILED" if failed else "gpu_check: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
