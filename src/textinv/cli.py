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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from textinv.cli_parsers import (  # noqa: F401 (CONVERT_FORMATS: tests/test_sd3_flux.py reaches it through cli)
    CONVERT_FORMATS,
    VERBOSE_HELP,
    ArgParser,
    add_convert_arguments,
    add_demo_arguments,
    add_eval_arguments,
    add_generate_arguments,
    add_inspect_arguments,
    add_serve_arguments,
    add_tiny_arguments,
    option_strings,
    subcommand,
    unrecognized_message,
)
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


# --- commands ------------------------------------------------------------------------------------
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
        cpu_threads=args.cpu_threads,
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

    parser = ArgParser(prog="textinv", description="Textual Inversion for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"textinv {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgParser)

    train_parser = commands.add_parser("train", help="learn a new token from a few images")
    add_train_arguments(train_parser, train_defaults)
    train_parser.set_defaults(handler=cmd_train)

    gen = commands.add_parser("generate", help="generate images with a model and embeddings")
    add_generate_arguments(gen)
    gen.set_defaults(handler=cmd_generate)

    from textinv.tiny import FAMILIES as TINY_FAMILIES

    tiny = commands.add_parser("tiny", help="write a tiny random-weight pipeline folder for trying things out")
    add_tiny_arguments(tiny, TINY_FAMILIES)
    tiny.set_defaults(handler=cmd_tiny)

    show = commands.add_parser("inspect", help="show an embedding's format, tokens, shapes, family and metadata")
    add_inspect_arguments(show)
    show.set_defaults(handler=cmd_inspect)

    conv = commands.add_parser("convert", help="convert an embedding file to another format")
    add_convert_arguments(conv)
    conv.set_defaults(handler=cmd_convert)

    from textinv.inference.evaluation import DEFAULT_CLIP_MODEL

    ev = commands.add_parser(
        "eval", help="score a learned word: CLIP image and text similarity (Textual Inversion paper)"
    )
    add_eval_arguments(ev, DEFAULT_CLIP_MODEL)
    ev.set_defaults(handler=cmd_eval)

    demo = commands.add_parser("demo", help="train and generate on the built-in tiny pipeline and images")
    add_demo_arguments(demo)
    demo.set_defaults(handler=cmd_demo)

    web = commands.add_parser("serve", help="a local web page to train, watch, download and generate")
    add_serve_arguments(web)
    web.set_defaults(handler=cmd_serve)
    for command in commands.choices.values():  # `textinv --verbose train` and `textinv train --verbose`
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


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
        if prog != "textinv":  # the root script is `textinv train`: its errors and usage name the script
            subcommand(parser, "train").prog = prog
        given = normalise_flags(sys.argv[1:] if argv is None else argv)
        args, unknown = parser.parse_known_args(given)
        # The formats an entry point writes unasked may be left out where a model cannot have them (SDXL: pdparams).
        args.default_embedding_formats = not any(arg.split("=")[0] == "--embedding_formats" for arg in given)
        if unknown:
            where = prog if prog != "textinv" else f"{prog} {args.command}"
            raise UserError(unrecognized_message(unknown, option_strings([subcommand(parser, args.command)]), where))
        _configure_logging(bool(getattr(args, "verbose", False)))
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
