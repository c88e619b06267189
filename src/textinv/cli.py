"""The ``textinv`` command: argv to configs, friendly errors, exit codes.

Exit codes: 0 done, 2 a user error (one line on stderr, no traceback), 1 an internal fault,
130 (SIGINT) or 143 (SIGTERM) stopped after saving a checkpoint. ``TEXTINV_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from textinv.config import (
    DEFAULT_VALIDATION_STEPS,
    INTERPOLATIONS,
    LEARNABLE_PROPERTIES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    REPORT_TO,
    TIMESTEP_SAMPLINGS,
    TrainConfig,
    TrainingInterrupted,
    UserError,
)

logger = logging.getLogger("textinv")

TRAIN_HELP = {
    "pretrained_model_name_or_path": "diffusers pipeline folder or hub id of the base model",
    "revision": "hub revision (branch, tag or commit) of the base model",
    "tokenizer_name": "tokenizer folder or hub id, if not the model's own",
    "train_data_dir": "folder with the 3-5 training images",
    "learnable_property": "what the token learns: an object or a style",
    "placeholder_token": "the new word, e.g. '<cat-toy>'",
    "initializer_token": "a one-token word the vectors start from, e.g. 'toy' (not needed with --init_embeddings)",
    "init_embeddings": "start the vectors from an embedding file of any format (diffusers, A1111, pdparams...)",
    "num_vectors": "vectors in the new token (more = more capacity)",
    "resolution": "training image size in pixels (multiple of 8)",
    "height": "training image height; overrides --resolution",
    "width": "training image width; overrides --resolution",
    "center_crop": "crop the image centre to the target aspect ratio before resizing",
    "random_flip": "mirror images at random (p=0.5); --no_random_flip turns it off",
    "interpolation": "resampling filter for resizing",
    "repeats": "times each image appears per epoch",
    "train_batch_size": "examples per process per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "num_train_epochs": "epochs to train when --max_train_steps is not given",
    "max_train_steps": "optimizer steps to train (overrides --num_train_epochs)",
    "learning_rate": "peak learning rate (before --scale_lr)",
    "scale_lr": "multiply the learning rate by batch size x accumulation x processes",
    "lr_scheduler": "learning-rate schedule",
    "lr_warmup_steps": "warm-up steps of the schedule",
    "lr_num_cycles": "restarts of cosine_with_restarts",
    "lr_power": "power of the polynomial schedule",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_weight_decay": "AdamW decoupled weight decay on the token vectors",
    "adam_epsilon": "AdamW epsilon",
    "max_grad_norm": "clip the gradient norm to this; <= 0 turns clipping off",
    "seed": "seed for a reproducible run (random when not given, and recorded in run.json)",
    "dataloader_num_workers": "worker processes decoding and resizing images (once, before training)",
    "output_dir": "where the embedding (and the full pipeline) are written",
    "save_steps": "also write learned_embeds-steps-N.safetensors every N steps",
    "only_save_embeds": "write only the embedding files, not the full pipeline",
    "overwrite_output_dir": "replace another run's results in --output_dir",
    "cache_latents": "encode each training view with the VAE once (--no_cache_latents: every step)",
    "gradient_checkpointing": "save memory by recomputing activations in the backward pass (slower steps)",
    "enable_xformers_memory_efficient_attention": "use xformers attention when installed (else PyTorch's SDPA)",
    "mixed_precision": "frozen weights in fp16 (CUDA only) or bf16; the learned vectors stay fp32",
    "allow_tf32": "allow TF32 matmuls on Ampere or newer NVIDIA GPUs",
    "compile": "torch.compile the UNet (minutes of compiling first; pays on long GPU runs)",
    "checkpointing_steps": "write a resumable checkpoint-N folder every N steps",
    "checkpoints_total_limit": "keep at most this many checkpoints (the oldest go first)",
    "resume_from_checkpoint": "resume a stopped run: 'latest' or a checkpoint-N folder",
    # Validation, logs, hub (issue 6)
    "validation_prompt": "prompt to sample while training, with the placeholder in it (repeatable); none = no validation",
    "num_validation_images": "images per validation prompt; image i uses seed+i at every round, so rounds compare",
    "validation_steps": f"sample the validation prompts every N steps; if neither this nor --validation_epochs is given: {DEFAULT_VALIDATION_STEPS}",
    "validation_epochs": "sample the validation prompts every N epochs (--validation_steps wins when both are given)",
    "validation_num_inference_steps": "denoising steps per validation image",
    "validation_guidance_scale": "classifier-free guidance scale of validation images",
    "report_to": f"where to log loss, learning rate, vector norms and validation images: {', '.join(REPORT_TO)}",
    "logging_dir": "log folder, relative to --output_dir unless absolute (`tensorboard --logdir OUTPUT_DIR/logs`)",
    "push_to_hub": "upload --output_dir to the Hugging Face Hub after training (needs a token)",
    "hub_token": "Hub token for --push_to_hub; if not given: HF_TOKEN, or the token saved by `hf auth login`",
    "hub_model_id": "Hub repository for --push_to_hub, 'name' or 'user/name'; if not given: the output_dir's folder name",
    # Model families and languages (issue 7)
    "language": "caption templates: en, zh (Chinese) or zh_en (both); if not given: zh/zh_en for Chinese models "
    "(by name, as ppdiffusers, or by text encoder), else en",
    "timestep_sampling": "how training draws timesteps: uniform (ppdiffusers) or logit_normal (middle steps more often)",
    "timestep_logit_mean": "mean of the logit-normal timestep draw (0 = centred)",
    "timestep_logit_std": "spread of the logit-normal timestep draw",
    "snr_gamma": "min-SNR-gamma loss weighting, e.g. 5.0; leave out for plain MSE",
}
CHOICES = {
    "mixed_precision": MIXED_PRECISIONS,
    "learnable_property": LEARNABLE_PROPERTIES,
    "lr_scheduler": LR_SCHEDULERS,
    "interpolation": INTERPOLATIONS,
    "timestep_sampling": TIMESTEP_SAMPLINGS,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (not a usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named as in ppdiffusers' train_textual_inversion.py."""
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        if spec.name not in TRAIN_HELP:
            continue
        flag = f"--{spec.name}"
        kind = _base_type(hints[spec.name])
        has_factory = spec.default_factory is not dataclasses.MISSING
        required = spec.default is dataclasses.MISSING and not has_factory
        default_text = "" if required or has_factory else f" (default: {spec.default})"
        help_text = TRAIN_HELP[spec.name] + default_text
        if kind is bool and spec.default is True:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            # The BooleanOptionalAction spelling is --no-x; ppdiffusers-style flags use underscores.
            parser.add_argument(f"--no_{spec.name}", dest=spec.name, action="store_false", help=argparse.SUPPRESS)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag,
                # A list field (--validation_prompt) is a repeatable flag.
                action="append" if typing.get_origin(hints[spec.name]) is list else "store",
                type=_typed(kind, flag),
                default=None,
                required=required,
                choices=CHOICES.get(spec.name),
                metavar=None if spec.name in CHOICES else spec.name.upper(),
                help=help_text,
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(TrainConfig)
        if spec.name in TRAIN_HELP and getattr(args, spec.name, None) is not None
    }
    # --num_train_epochs alone means "train that many epochs", not the default step count.
    if "num_train_epochs" in given and "max_train_steps" not in given:
        given["max_train_steps"] = None
    return TrainConfig(**given)


def _base_type(hint: Any) -> type:
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint


def _typed(kind: type, flag: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None

    convert.__name__ = kind.__name__
    return convert


# --- commands ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.validate()  # before importing torch: a typo costs no start-up time

    from textinv.training import train

    _quiet_model_loading()
    result = train(config)
    if _launch_rank() == 0:
        print(f"learned {config.placeholder_token} -> {result.embedding_path}")
    return 0


def _launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from textinv.generation import generate

    _quiet_model_loading()
    result = generate(
        args.model,
        args.prompt,
        embeddings=args.embeddings or [],
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        output_dir=args.output_dir,
        device=args.device,
        replace=args.replace,
    )
    for path in result.paths:
        print(path)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from textinv.tiny import build_tiny_pipeline

    print(build_tiny_pipeline(args.output_dir, family=args.family, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from textinv.generation import generate
    from textinv.tiny import build_tiny_pipeline, demo_images_dir
    from textinv.training import RUN_FILE, train

    _quiet_model_loading()
    output_dir = Path(args.output_dir)
    images = demo_images_dir()
    previous = output_dir / RUN_FILE
    overwrite = False
    if previous.is_file():
        try:
            overwrite = json.loads(previous.read_text())["config"]["train_data_dir"] == str(images)
        except (ValueError, KeyError, TypeError):
            overwrite = False
    base_model = output_dir / "base-model"
    if base_model.exists() and overwrite:
        import shutil

        shutil.rmtree(base_model)
    build_tiny_pipeline(base_model, seed=0)
    config = TrainConfig(
        pretrained_model_name_or_path=str(base_model),
        train_data_dir=str(images),
        placeholder_token="<red-cartoon>",
        initializer_token="cartoon",
        resolution=64,
        train_batch_size=2,
        max_train_steps=args.steps,
        learning_rate=5e-3,
        lr_warmup_steps=0,
        save_steps=max(1, args.steps // 2),
        seed=42,
        output_dir=str(output_dir),
        overwrite_output_dir=overwrite,
    )
    result = train(config)
    images_out = generate(
        str(output_dir),
        "a <red-cartoon> on the beach",
        num_images=1,
        num_inference_steps=25,
        seed=1,
        output_dir=output_dir / "samples",
    )
    print(f"embedding: {result.embedding_path}")
    for path in images_out.paths:
        print(f"image:     {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The local web page; Gradio is imported here only, so the other commands never load it."""
    from textinv.memory import return_freed_memory_promptly
    from textinv.serve import ServeOptions, serve

    return_freed_memory_promptly()  # it trains like `textinv train`
    _quiet_model_loading()
    options = ServeOptions(
        host=args.host, port=args.port, model=args.model, allow_remote=args.allow_remote, work_dir=args.work_dir
    )
    serve(options)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what an embedding file holds: a short table, or JSON with ``--json``."""
    import json

    from textinv.embeddings import describe

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['format']}, {len(info['tokens'])} token(s)")
    rows = [("token", "vectors", "encoder", "dim", "dtype", "family", "step", "vector norms")]
    for entry in info["tokens"]:
        for encoder, dim in entry["dims"].items():
            norms = entry["norms"][encoder]
            shown = " ".join(f"{n:.3f}" for n in norms[:8]) + (f" ... ({len(norms)})" if len(norms) > 8 else "")
            step = "-" if entry["step"] is None else str(entry["step"])
            dtype = entry["dtype"].get(encoder, "?")
            rows.append(
                (entry["token"], str(entry["num_vectors"]), encoder, str(dim), dtype, entry["family"], step, shown)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write an embedding file's token in another format."""
    from textinv.embeddings import convert, detect_format

    written = convert(args.input, args.output, to=args.to, token=args.token, overwrite=args.overwrite)
    print(f"wrote {written} ({detect_format(written)})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """The Textual Inversion paper's image and text similarity of a learned word."""
    from textinv.evaluation import evaluate, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None
    _quiet_model_loading()
    result = evaluate(
        args.model,
        args.embeddings,
        args.train_data_dir,
        prompts=prompts,
        clip_model=args.clip_model,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"image similarity {result.image_similarity:.4f}  ('{result.details['image_prompt']}' vs the training images)")
    print(f"text similarity  {result.text_similarity:.4f}  (mean over {len(result.prompts)} edit prompts)")
    if args.json:
        from textinv.files import atomic_write_json

        print(f"wrote {atomic_write_json(args.json, result.to_dict())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from textinv import __version__

    parser = _Parser(prog="textinv", description="Textual Inversion for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"textinv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_parser = commands.add_parser("train", help="learn a new token from a few images")
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=cmd_train)

    gen = commands.add_parser("generate", help="generate images with a model and embeddings")
    gen.add_argument("--model", required=True, help="pipeline folder or hub id (a training output_dir works)")
    gen.add_argument("--embeddings", action="append", metavar="FILE", help="embedding file to load (repeatable)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative_prompt")
    gen.add_argument("--num_images", type=_typed(int, "--num_images"), default=1)
    gen.add_argument("--num_inference_steps", type=_typed(int, "--num_inference_steps"), default=50)
    gen.add_argument("--guidance_scale", type=_typed(float, "--guidance_scale"), default=7.5)
    gen.add_argument("--seed", type=_typed(int, "--seed"), help="image i uses seed+i")
    gen.add_argument("--height", type=_typed(int, "--height"))
    gen.add_argument("--width", type=_typed(int, "--width"))
    gen.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    gen.add_argument("--output_dir", default="textinv-images")
    gen.add_argument("--replace", action="store_true", help="let an embedding replace a token the model already has")
    gen.set_defaults(handler=cmd_generate)

    tiny = commands.add_parser("tiny", help="write a tiny random-weight pipeline folder for trying things out")
    tiny.add_argument("output_dir")
    from textinv.tiny import FAMILIES as TINY_FAMILIES

    tiny.add_argument(
        "--family",
        default="sd1",
        choices=TINY_FAMILIES,
        help="model family: sd1, sd2 (512 epsilon), sd2-v (768 v_prediction), sdxl (two text encoders), "
        "zh-bert (Taiyi: BERT), zh-xlmr (AltDiffusion: XLM-R) (default: sd1)",
    )
    tiny.add_argument("--seed", type=_typed(int, "--seed"), default=0)
    tiny.set_defaults(handler=cmd_tiny)

    show = commands.add_parser("inspect", help="show the format, tokens, shapes and model family of an embedding")
    show.add_argument("file", help="embedding file (any format) or a folder holding learned_embeds.*")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(handler=cmd_inspect)

    conv = commands.add_parser("convert", help="convert an embedding file to another format")
    conv.add_argument("input", help="embedding file to read (any format)")
    conv.add_argument("output", help="file to write; its suffix picks the format unless --to is given")
    conv.add_argument("--to", choices=["diffusers", "a1111", "sdxl", "pdparams"], help="output format")
    conv.add_argument("--token", help="write the token under this name")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    conv.set_defaults(handler=cmd_convert)

    from textinv.evaluation import DEFAULT_CLIP_MODEL

    ev = commands.add_parser("eval", help="score a learned word: CLIP image and text similarity (Textual Inversion paper)")
    ev.add_argument("--model", required=True, help="base pipeline folder or hub id")
    ev.add_argument("--embeddings", required=True, metavar="FILE", help="embedding file of the learned word (any format)")
    ev.add_argument("--train_data_dir", required=True, help="the word's training images (image similarity compares with them)")
    ev.add_argument("--prompts", metavar="FILE", help="edit prompts, one a line with {} for the word (default: a built-in list)")
    ev.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help=f"CLIP model folder or hub id (default: {DEFAULT_CLIP_MODEL})")
    ev.add_argument("--num_images", type=_typed(int, "--num_images"), default=8, help="images per prompt (the paper: 64)")
    ev.add_argument("--num_inference_steps", type=_typed(int, "--num_inference_steps"), default=50)
    ev.add_argument("--guidance_scale", type=_typed(float, "--guidance_scale"), default=7.5)
    ev.add_argument("--seed", type=_typed(int, "--seed"), default=0, help="image i of every prompt uses seed+i")
    ev.add_argument("--batch_size", type=_typed(int, "--batch_size"), default=4, help="images generated at once")
    ev.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    ev.add_argument("--json", metavar="OUT", help="also write every score to this JSON file")
    ev.set_defaults(handler=cmd_eval)

    demo = commands.add_parser("demo", help="train and generate on the built-in tiny pipeline and images")
    demo.add_argument("--output_dir", default="demo-output")
    demo.add_argument("--steps", type=_typed(int, "--steps"), default=200)
    demo.set_defaults(handler=cmd_demo)

    web = commands.add_parser("serve", help="a local web page to train, watch, download and generate")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    web.add_argument("--port", type=_typed(int, "--port"), default=7860, help="port to listen on (default: 7860)")
    web.add_argument("--model", help="default model: a local diffusers pipeline folder (default: the tiny demo pipeline)")
    web.add_argument(
        "--allow_remote",
        "--allow-remote",
        action="store_true",
        help="allow a --host other machines can reach (there is no login: anyone reaching it can train)",
    )
    web.add_argument(
        "--work_dir", "--work-dir", help="folder for uploads, runs and downloads (default: a new temporary folder)"
    )
    web.set_defaults(handler=cmd_serve)
    return parser


def _configure_logging() -> None:
    # Under a multi-process launch only rank 0 reports progress; the others speak up for problems.
    level = logging.INFO if _launch_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "diffusers", "accelerate", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_model_loading() -> None:
    """Loading bars of diffusers/transformers would drown textinv's own progress bar."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None, prog: str = "textinv") -> int:
    debug = os.environ.get("TEXTINV_DEBUG") == "1"
    try:
        parser = build_parser()
        parser.prog = prog
        args = parser.parse_args(argv)
        _configure_logging()
        if args.command in ("train", "generate", "demo", "eval"):
            from textinv.memory import return_freed_memory_promptly

            return_freed_memory_promptly()
        return int(args.handler(args) or 0)
    except UserError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(f"{prog}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if debug:
            raise
        if error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            where = f" ({error.filename})" if error.filename else ""
            print(f"{prog}: error: {error.strerror}{where}; free space or choose another folder", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {error} (TEXTINV_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except Exception as error:  # an internal fault: still one line, with a way to see more
        if debug:
            raise
        print(
            f"{prog}: internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
            "(TEXTINV_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def train_script_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python train_textual_inversion.py --flags``: the ppdiffusers command line, unchanged."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)], prog="train_textual_inversion.py")


if __name__ == "__main__":
    sys.exit(main())
