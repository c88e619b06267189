"""The ``textinv`` subcommands' flags (all but ``train``'s, which come from TrainConfig: textinv.flags) and the
one-line message for a flag no parser knows, with the closest real one (``did you mean --resolution?``).

Every parser refuses abbreviations (``--max_train_step`` is not ``--max_train_steps``): a flag is spelled out
or it is an error. Every option has help text, with its default shown as ``(default: ...)``.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import sys
import typing
from collections.abc import Iterable, Sequence

from textinv.config import UserError
from textinv.flags import _typed

CONVERT_FORMATS = ("diffusers", "a1111", "sdxl", "comfyui", "onetrainer", "diffusers-advanced", "pdparams")
VERBOSE_HELP = "also show the libraries' info lines and loading bars (transformers, diffusers, httpx...)"
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: best available)"


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (not a usage dump), and no flag may be abbreviated."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.given: list[str] = []

    def parse_known_args(self, args: typing.Any = None, namespace: typing.Any = None) -> typing.Any:
        self.given = list(sys.argv[1:] if args is None else args)  # for error(): what this parser was given
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        # A mistyped required flag (--promt) is "required: --prompt" to argparse: say what was mistyped instead.
        unknown = self.unknown_flags() if message.startswith("the following arguments are required") else []
        if unknown:
            raise UserError(unrecognized_message(unknown, option_strings([self]), self.prog))
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def unknown_flags(self) -> list[str]:
        """The flags this parser was given that it has not (none for a parser of subcommands: theirs are theirs)."""
        if self._subparsers is not None:
            return []
        known, unknown = set(option_strings([self])), []
        for arg in itertools.takewhile(lambda arg: arg != "--", self.given):
            flag = arg.split("=", 1)[0]
            if flag.startswith("-") and flag not in known and not _is_number(flag):
                unknown.append(flag)
        return unknown


def _numeric(parser: argparse.ArgumentParser, flag: str, kind: type, help: str, default: typing.Any = None) -> None:
    """A number flag: its type check names the flag in the one-line error (``_typed``)."""
    parser.add_argument(flag, type=_typed(kind, flag), default=default, help=help)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def option_strings(parsers: Iterable[argparse.ArgumentParser]) -> list[str]:
    """Every ``--flag`` the parsers accept (their own, not their subcommands')."""
    return sorted({flag for parser in parsers for action in parser._actions for flag in action.option_strings})


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``train``, ``generate``...) of ``parser``."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return typing.cast(argparse.ArgumentParser, commands.choices[name])


def unrecognized_message(unknown: Sequence[str], known: Sequence[str], where: str) -> str:
    """``unrecognized arguments: --resolutoin 64; did you mean --resolution? (see `textinv train --help`)``: each
    unknown flag with a close match among ``known`` (the parser's own flags) gets it; a flag with none, none."""
    suggestions = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        if close:
            suggestions.append((flag, close[0]))
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if len(suggestions) == 1:
        message += f"; did you mean {suggestions[0][1]}?"
    elif suggestions:
        message += "; did you mean " + ", ".join(f"{right} (for {wrong})" for wrong, right in suggestions) + "?"
    return f"{message} (see `{where} --help`)"


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", required=True, help="pipeline folder or hub id (a training output_dir works)")
    gen.add_argument("--embeddings", action="append", metavar="FILE", help="embedding file to load (repeatable)")
    gen.add_argument(
        "--prompt", required=True, help="what to draw; name the learned word in it, e.g. '<cat-toy> on a beach'"
    )
    gen.add_argument("--negative_prompt", help="what to steer away from (default: none)")
    _numeric(gen, "--num_images", int, "images to generate (default: 1)", default=1)
    _numeric(gen, "--num_inference_steps", int, "denoising steps per image (default: 50)", default=50)
    _numeric(
        gen,
        "--guidance_scale",
        float,
        "classifier-free guidance (default: the pipeline's own: SD 7.5, SD3 7.0, Flux 3.5)",
    )
    _numeric(gen, "--seed", int, "image i uses seed+i (default: a random seed)")
    _numeric(
        gen,
        "--cpu_threads",
        int,
        "torch threads on a CPU (default: OMP_NUM_THREADS, else the cores free of other jobs)",
    )
    _numeric(gen, "--height", int, "image height, a multiple of 8 (default: the model's size)")
    _numeric(gen, "--width", int, "image width, a multiple of 8 (default: the model's size)")
    gen.add_argument("--device", help=DEVICE_HELP)
    gen.add_argument(
        "--output_dir",
        default="textinv-images",
        help="folder the PNG images go to, never over a file (default: textinv-images)",
    )
    gen.add_argument("--replace", action="store_true", help="let an embedding replace a token the model already has")
    gen.add_argument(
        "--token", help="load the (one) --embeddings file's token under this name, e.g. when the model has it already"
    )
    gen.add_argument(
        "--lora",
        help="a LoRA to add (pivotal tuning): a run folder (its pytorch_lora_weights.safetensors and word), "
        "pytorch_lora_weights.safetensors, or learned_embeds_lora.safetensors (kohya's layout, the word inside)",
    )
    _numeric(gen, "--lora_scale", float, "the LoRA's weight (default: 1.0)", default=1.0)


def add_tiny_arguments(tiny: argparse.ArgumentParser, families: Sequence[str]) -> None:
    tiny.add_argument("output_dir", help="the new folder to write (it must not exist, or be empty)")
    tiny.add_argument(
        "--family",
        default="sd1",
        choices=families,
        help="model family: sd1, sd2 (512 epsilon), sd2-v (768 v_prediction), sdxl (two text encoders), "
        "sd3 (CLIP-L, CLIP-G, T5; MMDiT), flux (CLIP-L, T5; Flux.1-dev layout), "
        "zh-bert (Taiyi: BERT), zh-xlmr (AltDiffusion: XLM-R) (default: sd1)",
    )
    _numeric(tiny, "--seed", int, "the random weights' seed (default: 0)", default=0)
    tiny.add_argument(
        "--clip",
        action="store_true",
        help="write a tiny random-weight CLIP model instead, for `textinv eval --clip_model DIR`",
    )


def add_inspect_arguments(show: argparse.ArgumentParser) -> None:
    show.add_argument("file", help="embedding file (any format) or a folder holding learned_embeds.*")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_convert_arguments(conv: argparse.ArgumentParser) -> None:
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


def add_eval_arguments(ev: argparse.ArgumentParser, default_clip_model: str) -> None:
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
        "--clip_model", default=default_clip_model, help=f"CLIP model folder or hub id (default: {default_clip_model})"
    )
    _numeric(ev, "--num_images", int, "images per prompt (default: 8; the paper: 64)", default=8)
    _numeric(ev, "--num_inference_steps", int, "denoising steps per image (default: 50)", default=50)
    _numeric(ev, "--guidance_scale", float, "classifier-free guidance (default: 7.5)", default=7.5)
    _numeric(ev, "--seed", int, "image i of every prompt uses seed+i (default: 0)", default=0)
    _numeric(ev, "--batch_size", int, "images generated at once (default: 4)", default=4)
    ev.add_argument("--device", help=DEVICE_HELP)
    ev.add_argument("--json", metavar="OUT", help="also write every score to this JSON file")


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--output_dir", default="demo-output", help="folder for the run and its images (default: demo-output)"
    )
    _numeric(demo, "--steps", int, "training steps (default: 200)", default=200)


def add_serve_arguments(web: argparse.ArgumentParser) -> None:
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    _numeric(web, "--port", int, "port to listen on (default: 7860)", default=7860)
    web.add_argument(
        "--model", help="default model: a local diffusers pipeline folder (default: the tiny demo pipeline)"
    )
    web.add_argument(
        "--allow_remote",
        action="store_true",
        help="allow a --host other machines can reach (there is no login: anyone reaching it can train)",
    )
    web.add_argument("--work_dir", help="folder for uploads, runs and downloads (default: a new temporary folder)")
