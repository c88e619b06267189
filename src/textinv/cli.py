"""The ``textinv`` command: argv to configs, friendly errors, exit codes.

Exit codes: 0 done, 2 a user error (one line on stderr, no traceback), 1 an internal fault,
130 (SIGINT) or 143 (SIGTERM) stopped after saving a checkpoint. ``TEXTINV_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from textinv.config import TrainConfig, TrainingInterrupted, UserError, first_line
from textinv.flags import (  # noqa: F401 (the tests and the root script reach them through cli)
    PPDIFFUSERS_DEFAULTS,
    SCRIPT_DEFAULTS,
    _typed,
    add_train_arguments,
    checked_configs,
    config_from_args,
    normalise_flags,
    train_options,
)

logger = logging.getLogger("textinv")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (not a usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


# --- commands ------------------------------------------------------------------------------------
CONVERT_FORMATS = ("diffusers", "a1111", "sdxl", "comfyui", "onetrainer", "diffusers-advanced", "pdparams")


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.extra["default_embedding_formats"] = args.default_embedding_formats
    checked_configs(config)  # validated (each --concepts word's) before importing torch: a typo costs no start-up
    _check_before_torch(config)

    from textinv import train

    result = train(config)
    if _launch_rank() == 0:
        print(result.summary)  # the one line after the progress bar
    return 0


def _check_before_torch(config: TrainConfig) -> None:
    """What the arguments alone show (a missing model folder, an output_dir holding another run), in a
    fraction of a second; training checks them again, for the Python API."""
    from textinv.files import refuse_another_runs_results
    from textinv.models.loading import local_model_dir
    from textinv.observers.hub import HubPush

    if config.push_to_hub:
        HubPush(config)  # the token first, in the order training checks
    if not config.resume_from_checkpoint:
        refuse_another_runs_results(Path(config.output_dir).expanduser(), config.overwrite_output_dir)
    folder = local_model_dir(config.pretrained_model_name_or_path)
    if folder is not None and config.text_encoders:
        from textinv.models.families import check_text_encoders
        from textinv.models.loading import detect_family

        check_text_encoders(detect_family(folder), config.text_encoders)


def _launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from textinv.models.loading import local_model_dir

    local_model_dir(args.model)  # before torch: a mistyped folder costs no start-up time
    from textinv.inference.generation import generate

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
        token=args.token,
        lora=args.lora,
        lora_scale=args.lora_scale,
    )
    for path in result.paths:
        print(path)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from textinv.tiny import build_tiny_pipeline
    from textinv.tiny_clip import build_tiny_clip

    if args.clip:
        print(build_tiny_clip(args.output_dir, seed=args.seed))
    else:
        print(build_tiny_pipeline(args.output_dir, family=args.family, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from textinv.demo import run_demo

    result, images = run_demo(Path(args.output_dir), args.steps)
    print(result.summary)
    for path in images:
        print(f"image: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The local web page; Gradio is imported here only, so the other commands never load it."""
    from textinv.serve import ServeOptions, serve
    from textinv.training.memory import return_freed_memory_promptly

    return_freed_memory_promptly()  # it trains like `textinv train`
    options = ServeOptions(
        host=args.host, port=args.port, model=args.model, allow_remote=args.allow_remote, work_dir=args.work_dir
    )
    serve(options)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what an embedding file holds: a short table, or JSON with ``--json``."""
    import json

    from textinv.embeddings import describe, description_table

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(description_table(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write an embedding file's token in another format."""
    from textinv.embeddings import convert, detect_format, read_embeddings
    from textinv.embeddings.bundle import join_bundle, split_lora

    if args.lora:  # join: the word in the input, the adapters in --lora, one bundled file out
        if Path(args.output).exists() and not args.overwrite:
            raise UserError(f"{args.output!r} already exists; pass --overwrite to replace it")
        embeddings = read_embeddings(args.input)
        if len(embeddings) != 1:
            raise UserError(f"{args.input!r} holds {len(embeddings)} tokens; --lora bundles one")
        if args.token:
            embeddings[0].token = args.token
        written = join_bundle(embeddings[0], args.lora, Path(args.output))
    else:
        written = convert(args.input, args.output, to=args.to, token=args.token, overwrite=args.overwrite)
    print(f"wrote {written} ({detect_format(written)})")
    if args.lora_out:  # split: the adapters of a bundled input into their own file
        print(f"wrote {split_lora(args.input, Path(args.lora_out))} (LoRA)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """The Textual Inversion paper's image and text similarity of a learned word."""
    from textinv.inference.evaluation import eval_targets, evaluate, read_prompts
    from textinv.models.loading import local_model_dir

    local_model_dir(args.model)  # before the CLIP model loads
    prompts = read_prompts(args.prompts) if args.prompts else None
    results = {}
    for token, embeddings, images in eval_targets(args.model, args.embeddings, args.train_data_dir, args.concepts):
        result = results[token] = evaluate(
            args.model,
            embeddings,
            images,
            prompts=prompts,
            clip_model=args.clip_model,
            num_images=args.num_images,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
        word, shown = f"{token}: " if token else "", f"'{result.details['image_prompt']}' vs the training images"
        print(f"{word}image similarity {result.image_similarity:.4f}  ({shown})")
        print(f"{word}text similarity  {result.text_similarity:.4f}  (mean over {len(result.prompts)} edit prompts)")
    if args.json:
        from textinv.files import atomic_write_json

        scores = results[""].to_dict() if "" in results else {token: r.to_dict() for token, r in results.items()}
        print(f"wrote {atomic_write_json(args.json, scores)}")
    return 0


def build_parser(train_defaults: Optional[dict[str, Any]] = None) -> argparse.ArgumentParser:
    from textinv import __version__

    parser = _Parser(prog="textinv", description="Textual Inversion for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"textinv {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train_parser = commands.add_parser("train", help="learn a new token from a few images")
    add_train_arguments(train_parser, train_defaults)
    train_parser.set_defaults(handler=cmd_train)

    gen = commands.add_parser("generate", help="generate images with a model and embeddings")
    gen.add_argument("--model", required=True, help="pipeline folder or hub id (a training output_dir works)")
    gen.add_argument("--embeddings", action="append", metavar="FILE", help="embedding file to load (repeatable)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative_prompt")
    gen.add_argument("--num_images", type=_typed(int, "--num_images"), default=1)
    gen.add_argument("--num_inference_steps", type=_typed(int, "--num_inference_steps"), default=50)
    gen.add_argument(
        "--guidance_scale",
        type=_typed(float, "--guidance_scale"),
        default=None,
        help="classifier-free guidance (default: the pipeline's own: SD 7.5, SD3 7.0, Flux 3.5)",
    )
    gen.add_argument("--seed", type=_typed(int, "--seed"), help="image i uses seed+i")
    gen.add_argument("--height", type=_typed(int, "--height"))
    gen.add_argument("--width", type=_typed(int, "--width"))
    gen.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    gen.add_argument("--output_dir", default="textinv-images")
    gen.add_argument("--replace", action="store_true", help="let an embedding replace a token the model already has")
    gen.add_argument(
        "--token", help="load the (one) --embeddings file's token under this name, e.g. when the model has it already"
    )
    gen.add_argument(
        "--lora",
        help="a LoRA to add (pivotal tuning): a run folder (its pytorch_lora_weights.safetensors and word), "
        "pytorch_lora_weights.safetensors, or learned_embeds_lora.safetensors (kohya's layout, the word inside)",
    )
    gen.add_argument(
        "--lora_scale", type=_typed(float, "--lora_scale"), default=1.0, help="the LoRA's weight (default: 1.0)"
    )
    gen.set_defaults(handler=cmd_generate)

    tiny = commands.add_parser("tiny", help="write a tiny random-weight pipeline folder for trying things out")
    tiny.add_argument("output_dir")
    from textinv.tiny import FAMILIES as TINY_FAMILIES

    tiny.add_argument(
        "--family",
        default="sd1",
        choices=TINY_FAMILIES,
        help="model family: sd1, sd2 (512 epsilon), sd2-v (768 v_prediction), sdxl (two text encoders), "
        "sd3 (CLIP-L, CLIP-G, T5; MMDiT), flux (CLIP-L, T5; Flux.1-dev layout), "
        "zh-bert (Taiyi: BERT), zh-xlmr (AltDiffusion: XLM-R) (default: sd1)",
    )
    tiny.add_argument("--seed", type=_typed(int, "--seed"), default=0)
    tiny.add_argument(
        "--clip",
        action="store_true",
        help="write a tiny random-weight CLIP model instead, for `textinv eval --clip_model DIR`",
    )
    tiny.set_defaults(handler=cmd_tiny)

    show = commands.add_parser("inspect", help="show an embedding's format, tokens, shapes, family and metadata")
    show.add_argument("file", help="embedding file (any format) or a folder holding learned_embeds.*")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(handler=cmd_inspect)

    conv = commands.add_parser("convert", help="convert an embedding file to another format")
    conv.add_argument("input", help="embedding file to read (any format)")
    conv.add_argument("output", help="file to write; its suffix picks the format unless --to is given")
    conv.add_argument(
        "--lora",
        metavar="FILE",
        help="join: write OUTPUT as this kohya-layout LoRA with the input's word bundled (A1111/ComfyUI's bundle_emb)",
    )
    conv.add_argument(
        "--lora_out", metavar="FILE", help="split: also write the input bundle's LoRA adapters, without the word"
    )
    conv.add_argument(
        "--to",
        # textinv.embeddings.WRITE_FORMATS (not imported here: it needs torch; tests/test_sd3_flux.py compares them)
        choices=CONVERT_FORMATS,
        help="output format: diffusers, a1111, pdparams (one text encoder); sdxl (clip_l + clip_g), comfyui "
        "(clip_l, clip_g, t5xxl: SDXL, SD3, Flux), onetrainer / diffusers-advanced (T5 under 't5')",
    )
    conv.add_argument("--token", help="write the token under this name")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    conv.set_defaults(handler=cmd_convert)

    from textinv.inference.evaluation import DEFAULT_CLIP_MODEL

    ev = commands.add_parser(
        "eval", help="score a learned word: CLIP image and text similarity (Textual Inversion paper)"
    )
    ev.add_argument("--model", required=True, help="base pipeline folder or hub id")
    ev.add_argument(
        "--embeddings",
        required=True,
        metavar="FILE",
        help="embedding file of the learned word (any format); with --concepts, the run's output folder",
    )
    ev.add_argument(
        "--train_data_dir",
        help="the word's training images (image similarity compares with them; required unless --concepts)",
    )
    ev.add_argument("--concepts", metavar="FILE", help="a --concepts run's TOML: score each word against its images")
    ev.add_argument(
        "--prompts", metavar="FILE", help="edit prompts, one a line with {} for the word (default: a built-in list)"
    )
    ev.add_argument(
        "--clip_model", default=DEFAULT_CLIP_MODEL, help=f"CLIP model folder or hub id (default: {DEFAULT_CLIP_MODEL})"
    )
    ev.add_argument(
        "--num_images", type=_typed(int, "--num_images"), default=8, help="images per prompt (the paper: 64)"
    )
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
    web.add_argument(
        "--model", help="default model: a local diffusers pipeline folder (default: the tiny demo pipeline)"
    )
    web.add_argument(
        "--allow_remote",
        action="store_true",
        help="allow a --host other machines can reach (there is no login: anyone reaching it can train)",
    )
    web.add_argument("--work_dir", help="folder for uploads, runs and downloads (default: a new temporary folder)")
    web.set_defaults(handler=cmd_serve)
    for command in commands.choices.values():  # `textinv --verbose train` and `textinv train --verbose`
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_HELP = "also show the libraries' info lines and loading bars (transformers, diffusers, httpx...)"


def _configure_logging(verbose: bool) -> None:
    """textinv's own lines at info, other libraries' at warning (transformers/diffusers at error) unless --verbose.
    Under a multi-process launch only rank 0 reports progress; the others speak up for problems."""
    main_rank = _launch_rank() == 0
    logging.basicConfig(
        level=logging.INFO if verbose and main_rank else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    logging.getLogger("textinv").setLevel(logging.INFO if main_rank else logging.WARNING)
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")  # textinv.models.quiet leaves them alone then
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "info")
        return
    for noisy in ("transformers", "diffusers", "accelerate", "huggingface_hub", "PIL", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(
    argv: Optional[Sequence[str]] = None, prog: str = "textinv", train_defaults: Optional[dict[str, Any]] = None
) -> int:
    debug = os.environ.get("TEXTINV_DEBUG") == "1"
    try:
        parser = build_parser(train_defaults)
        parser.prog = prog
        given = normalise_flags(sys.argv[1:] if argv is None else argv)
        args, unknown = parser.parse_known_args(given)
        # The formats an entry point writes unasked may be left out where a model cannot have them (SDXL: pdparams).
        args.default_embedding_formats = not any(arg.split("=")[0] == "--embedding_formats" for arg in given)
        if unknown:
            where = prog if prog != "textinv" else f"{prog} {args.command}"
            raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see `{where} --help`)")
        _configure_logging(bool(getattr(args, "verbose", False)))
        if args.command in ("train", "generate", "demo", "eval"):
            from textinv.training.memory import return_freed_memory_promptly

            return_freed_memory_promptly()
        return int(args.handler(args) or 0)
    except UserError as error:
        _traceback_if(debug)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(f"{prog}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        _traceback_if(debug)
        if error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            where = f" ({error.filename})" if error.filename else ""
            print(f"{prog}: error: {error.strerror}{where}; free space or choose another folder", file=sys.stderr)
            return 2
        print(
            f"{prog}: internal error: {error}{'' if debug else ' (TEXTINV_DEBUG=1 shows the traceback)'}",
            file=sys.stderr,
        )
        return 1
    except Exception as error:  # an internal fault: still one line, with a way to see more
        _traceback_if(debug)
        hint = "" if debug else " (TEXTINV_DEBUG=1 shows the traceback)"
        print(f"{prog}: internal error: {type(error).__name__}: {first_line(error)}{hint}", file=sys.stderr)
        return 1


def _traceback_if(debug: bool) -> None:
    """TEXTINV_DEBUG=1: the traceback before the one-line error; the exit code stays what it would be."""
    if debug:
        traceback.print_exc()


def train_script_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python train_textual_inversion.py --flags``: the ppdiffusers command line, unchanged."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)], "train_textual_inversion.py", SCRIPT_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
