"""TrainConfig's fields as command-line flags: one flag per field, with the field's help and choices.

The root ``train_textual_inversion.py`` and ``textinv train`` share the flags; their defaults differ
where :data:`SCRIPT_DEFAULTS` says (ppdiffusers' values for the root script).

Not transformers.HfArgumentParser, which also makes flags from dataclass fields: tried 2026-12-02 (transformers 5.24),
HfArgumentParser(TrainConfig) fails to build (TypeError: _StoreFalseAction got 'choices', from option()'s metadata),
and it would add ``--no_X`` flags and ``--X True`` spellings, allow abbreviations, print argparse's usage block instead
of one error line, and has no ppdiffusers aliases or "did you mean" (issue 25): all of which this module keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import Any, Optional

from textinv.config import TrainConfig
from textinv.data.concepts import concept_configs
from textinv.data.options import data_option_names
from textinv.held_out_options import HeldOutOptions
from textinv.lora_options import LoraOptions
from textinv.loss_options import LossOptions
from textinv.optimizer_options import OptimizerOptions

# ppdiffusers' defaults where TrainConfig's (textinv train, API, web page) differ: docs/quality.md "How many steps" (issue 20).
PPDIFFUSERS_DEFAULTS: dict[str, Any] = {
    "train_batch_size": 16,
    "learning_rate": 1e-4,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "eval_steps": 0,
}
# The root train_textual_inversion.py's own defaults (else TrainConfig's): ppdiffusers', and it also writes .pdparams.
SCRIPT_DEFAULTS: dict[str, Any] = {"embedding_formats": ["diffusers", "pdparams"], **PPDIFFUSERS_DEFAULTS}
# An entry point's default for these is an AdamW value (ppdiffusers' lr 1e-4): it applies to --optimizer adamw and
# adamw8bit; the other optimizers keep their own default (textinv.optimizer_options) unless the flag is given.
ADAMW_VALUES = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay")
ADAMW_OPTIMIZERS = ("adamw", "adamw8bit")
# Required flags that each [[concept]] of --concepts FILE can give instead (TrainConfig's default is ""), with what
# the value is (for the message when neither is given).
REQUIRED_UNLESS_CONCEPTS = {
    "train_data_dir": "the folder of training images",
    "placeholder_token": "the new word, e.g. '<cat-toy>'",
}


def add_train_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict[str, Any]] = None) -> None:
    """One flag per TrainConfig field, named as in ppdiffusers' train_textual_inversion.py; help text and
    choices come from the field's metadata (textinv.fields.option). ``defaults`` ({field: value}) are this
    entry point's own defaults: they become the flags' defaults, so its --help and its config show them."""
    defaults = dict(defaults or {})
    hints = typing.get_type_hints(TrainConfig)
    assert set(defaults) <= set(hints), f"defaults for unknown TrainConfig fields: {sorted(set(defaults) - set(hints))}"
    parser.set_defaults(adamw_defaults={name: value for name, value in defaults.items() if name in ADAMW_VALUES})
    for spec in train_options():
        flag, override = f"--{spec.name}", defaults.get(spec.name)
        kind, is_list = _base_type(hints[spec.name]), typing.get_origin(hints[spec.name]) is list
        has_factory = spec.default_factory is not dataclasses.MISSING
        required = spec.default is dataclasses.MISSING and not has_factory and spec.name not in defaults
        shown: Any = override if spec.name in defaults else spec.default_factory() if has_factory else spec.default  # type: ignore[misc]
        help_text = spec.metadata["help"] + (
            "" if required or shown == [] else f" (default: {' '.join(shown) if is_list else shown})"
        )
        if spec.name in REQUIRED_UNLESS_CONCEPTS and not shown:  # "" (not "(default: )"): a word or --concepts
            help_text = spec.metadata["help"] + " (required unless --concepts)"
        if spec.name in ADAMW_VALUES and spec.name in defaults:
            help_text += " with adamw and adamw8bit"
        choices = spec.metadata.get("choices")
        if kind is bool and spec.default is True:
            parser.add_argument(flag, dest=spec.name, action="store_true", default=override, help=help_text)
            parser.add_argument(
                f"--no_{spec.name}", dest=spec.name, action="store_false", default=override, help=f"turn {flag} off"
            )
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=override, help=help_text)
        else:
            parser.add_argument(
                flag,
                # A list of choices takes several values (--embedding_formats diffusers pdparams);
                # a list of free text is a repeatable flag (--validation_prompt).
                action="append" if is_list and not choices else "store",
                nargs="+" if is_list and choices else None,
                type=_typed(kind, flag),
                default=None if spec.name in ADAMW_VALUES else override,  # config_from_args applies it
                required=required,
                choices=choices,
                metavar=None if choices else spec.name.upper(),
                help=help_text,
            )


def train_options() -> list[dataclasses.Field[Any]]:
    """The TrainConfig fields that are options (every field with help text): the training-data options
    (textinv.data.options, a base of TrainConfig) placed after the image options, the loss options
    (textinv.loss_options, another base) before the held-out evaluation's (textinv.held_out_options), the
    optimizer's (textinv.optimizer_options) before --learning_rate."""
    fields = [spec for spec in dataclasses.fields(TrainConfig) if "help" in spec.metadata]
    loss_names = {spec.name for spec in (*dataclasses.fields(LossOptions), *dataclasses.fields(LoraOptions))}
    optimizer_names = {spec.name for spec in dataclasses.fields(OptimizerOptions)}
    held_out_names = {spec.name for spec in dataclasses.fields(HeldOutOptions)}
    data = [spec for spec in fields if spec.name in data_option_names()]
    loss = [spec for spec in fields if spec.name in loss_names]
    optimizer = [spec for spec in fields if spec.name in optimizer_names]
    held_out = [spec for spec in fields if spec.name in held_out_names]
    based = data_option_names() | loss_names | optimizer_names | held_out_names
    own = [spec for spec in fields if spec.name not in based]
    after = next(index for index, spec in enumerate(own) if spec.name == "repeats") + 1
    rate = next(index for index, spec in enumerate(own) if spec.name == "learning_rate")
    return own[:after] + data + own[after:rate] + optimizer + own[rate:] + loss + held_out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {
        spec.name: getattr(args, spec.name) for spec in train_options() if getattr(args, spec.name, None) is not None
    }
    # The entry point's AdamW values (ADAMW_VALUES) for AdamW; the other optimizers' own defaults otherwise.
    if given.get("optimizer", "adamw") in ADAMW_OPTIMIZERS:
        given = {**getattr(args, "adamw_defaults", {}), **given}
    # --num_train_epochs alone means "train that many epochs", not the default step count.
    if "num_train_epochs" in given and "max_train_steps" not in given:
        given["max_train_steps"] = None
    return TrainConfig(**given)


def checked_configs(config: TrainConfig) -> list[TrainConfig]:
    """The run's configs, validated before torch is imported: ``config`` itself, or one per ``[[concept]]`` of
    ``--concepts FILE`` (textinv.data.concepts; the flags are their defaults), so a bad concepts file fails before
    any model loads. Without the file, --train_data_dir and --placeholder_token are required and the message
    names --concepts as the other way."""
    if config.concepts is not None:
        return concept_configs(config)  # validates each concept's config; `config` alone lacks their words
    config.validate()  # --train_data_dir and --placeholder_token are required here (TrainConfig.validate_word)
    return [config]


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """``--learning-rate`` means ``--learning_rate``: every flag is accepted with either separator
    (the help and the docs write underscores, as ppdiffusers does)."""
    normalised = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + sep + value
        normalised.append(arg)
    return normalised


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
