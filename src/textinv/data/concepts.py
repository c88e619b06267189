"""``--concepts FILE``: several new words trained in one run (one model load), each with its own images.

The file is TOML, in the spirit of kohya-ss sd-scripts' dataset config (``--dataset_config``, whose
``[[datasets]]`` / ``[[datasets.subsets]]`` tables override ``[general]``): here the only top-level key is
the array of tables ``concept``, one per word::

    [[concept]]
    placeholder_token = "<cat-toy>"
    initializer_token = "toy"
    train_data_dir = "cat"            # read from this file's folder
    [[concept]]
    placeholder_token = "<wave-style>"
    initializer_token = "painting"
    learnable_property = "style"
    num_vectors = 2
    train_data_dir = "waves"

A table may set the keys in :data:`CONCEPT_KEYS`. The flags given on the command line (or a TrainConfig's
values from Python) are every concept's defaults, and a table's key overrides them for that concept, so
``--repeats 50`` with one table saying ``repeats = 200`` gives that concept 200 and the others 50.

Relative ``train_data_dir``, ``template_file`` and ``init_embeddings`` written in the file are read from the
file's own folder, not the current directory: a concepts file and its image folders move together. Paths
given as flags stay relative to the current directory, as without ``--concepts``.

Every mistake is a :class:`textinv.errors.UserError` of one line naming the file, the concept (numbered from
1, with its token when known), the bad value and the fix. This module must not import torch: the CLI reads
the file before torch's import, so a typo costs no start-up time and no model load. The images themselves
are found by the training recipe (``textinv.data.images.discover_images``, which needs torch); here a
concept's ``train_data_dir`` is only checked to be a folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import typing
from pathlib import Path
from typing import Any

from textinv.config import TrainConfig
from textinv.errors import UserError, first_line
from textinv.text_files import read_user_text

logger = logging.getLogger(__name__)

# The TrainConfig fields a [[concept]] table may set: what differs between words. Everything else (model,
# resolution, optimizer, steps...) is run-wide and stays a command-line flag.
CONCEPT_KEYS: tuple[str, ...] = (
    "placeholder_token",
    "initializer_token",
    "num_vectors",
    "init_embeddings",
    "train_data_dir",
    "learnable_property",
    "repeats",
    "caption_extension",
    "template_file",
    "shuffle_caption",
    "keep_tokens",
    "caption_tag_dropout_rate",
    "caption_dropout_rate",
)
PATH_KEYS = ("train_data_dir", "template_file", "init_embeddings")  # relative ones: from the file's folder
# A key's TOML example, for the messages that tell what to write.
_EXAMPLES = {
    "placeholder_token": '"<cat-toy>"',
    "initializer_token": '"toy"',
    "num_vectors": "2",
    "init_embeddings": '"start.safetensors"',
    "train_data_dir": '"cat-images"',
    "learnable_property": '"object"',
    "repeats": "100",
    "caption_extension": '".txt"',
    "template_file": '"templates.txt"',
    "shuffle_caption": "true",
    "keep_tokens": "1",
    "caption_tag_dropout_rate": "0.1",
    "caption_dropout_rate": "0.05",
}
_TYPES: dict[str, type] = {}  # key -> str, int, float or bool (filled from TrainConfig's hints on first use)
_NAME_PUNCTUATION = "._-"
_MAX_NAME_BYTES = 120  # learned_embeds-<name>-steps-N.safetensors must stay under common 255-byte name limits


def concept_configs(config: TrainConfig) -> list[TrainConfig]:
    """One validated TrainConfig per ``[[concept]]`` of ``config.concepts`` (``[config]`` itself, unchanged and
    not validated, when there is no concepts file). Each is ``dataclasses.replace(config, **table)``: the
    config's values are the defaults, the table's keys override them; ``concepts`` stays set in each."""
    if config.concepts is None:
        return [config]
    shown = config.concepts
    path = _concepts_path(shown)
    tables = _read_tables(shown)
    checked = [_concept_config(config, table, number, shown, path.parent) for number, table in enumerate(tables, 1)]
    configs = [concept for concept, _ in checked]
    _check_distinct(configs, [where for _, where in checked], tables, shown)
    logger.debug("--concepts %s: %s", shown, ", ".join(cfg.placeholder_token for cfg in configs))
    return configs


def file_names(configs: list[TrainConfig]) -> list[str]:
    """Each word's ``<name>`` in its files (``learned_embeds-<name>.*``): ``""`` for a run of one word, whose files
    keep the usual names (``learned_embeds.*``), with or without a concepts file."""
    return [concept_name(one.placeholder_token) if len(configs) > 1 else "" for one in configs]


def concept_name(token: str) -> str:
    """The token without its surrounding angle brackets (``<cat-toy>`` -> ``cat-toy``): the ``<name>`` of the
    concept's files ``learned_embeds-<name>.*``. Letters and digits of any script (Chinese models have Chinese
    words), ``.``, ``_`` and ``-`` only, so the name is one plain file name on every system."""
    name = token[1:-1] if len(token) >= 2 and token.startswith("<") and token.endswith(">") else token
    where = f"placeholder_token {token!r} cannot name its files (learned_embeds-{name}.*)"
    if not name:
        raise UserError(f"{where}: nothing is left without the angle brackets; give a word, e.g. '<cat-toy>'")
    bad = next((char for char in name if not (char.isalnum() or char in _NAME_PUNCTUATION)), None)
    if bad is not None:
        raise UserError(
            f"{where}: it holds {bad!r}; use letters, digits, '.', '_' or '-' only, e.g. {_plain_token(name)!r}"
        )
    if name.startswith("."):
        raise UserError(f"{where}: {name!r} starts with '.' (a hidden file); e.g. {_plain_token(name)!r}")
    if ".." in name:
        raise UserError(f"{where}: {name!r} holds '..'; e.g. {_plain_token(name)!r}")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise UserError(f"{where}: it is longer than {_MAX_NAME_BYTES} bytes; choose a shorter word")
    return name


def _plain_token(name: str) -> str:
    """A token like ``name`` that concept_name accepts: what a message suggests."""
    plain = re.sub(r"-{2,}", "-", re.sub(r"[^\w.-]+", "-", name)).replace("..", ".").strip("-.")
    return f"<{plain or 'my-word'}>"


# --- the file ----------------------------------------------------------------------------------------


def _concepts_path(shown: str) -> Path:
    if not shown.strip():
        raise UserError("--concepts is empty; give a TOML file with one [[concept]] table per word")
    return Path(shown).expanduser()


def _toml_parser() -> Any:
    """The standard library's tomllib (Python 3.11+); on 3.10, tomli, the same parser as a package."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UserError(
                "--concepts needs a TOML reader: Python 3.11 or newer has one (tomllib); on 3.10 `pip install tomli`"
            ) from None
    return tomllib


def _read_tables(shown: str) -> list[dict[str, Any]]:
    """The file's ``[[concept]]`` tables, after checking it is a TOML file of nothing else."""
    text = read_user_text(shown, "--concepts", "a TOML file with one [[concept]] table per word")
    toml = _toml_parser()
    try:
        document = toml.loads(text)
    except (toml.TOMLDecodeError, ValueError) as error:  # its message ends "(at line L, column C)"
        raise UserError(
            f"--concepts {shown!r} is not valid TOML: {first_line(error)}; write one [[concept]] table per word "
            'with key = value lines, e.g. placeholder_token = "<cat-toy>"'
        ) from None
    except RecursionError:  # found by fuzzing: tomllib recurses once per nested [ or {
        raise UserError(
            f"--concepts {shown!r} nests arrays or tables too deeply; a concept's values are words, numbers and paths"
        ) from None
    for key in document:
        if key != "concept":
            close = difflib.get_close_matches(key, ["concept"], n=1, cutoff=0.6)
            fix = "did you mean [[concept]]?" if close else "the file holds only [[concept]] tables"
            raise UserError(
                f"{shown}: top-level key {key!r} is not allowed; {fix} (a run-wide option is a command-line flag, "
                "a concept's goes inside its [[concept]] table)"
            )
    tables = document.get("concept")
    if isinstance(tables, dict):
        raise UserError(f"{shown}: [concept] is a single table; write [[concept]] (double brackets), one per word")
    if not tables:
        raise UserError(
            f"{shown}: no [[concept]] table; add one per word, each with placeholder_token, initializer_token "
            "and train_data_dir"
        )
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise UserError(
            f"{shown}: concept = {_toml(tables)} is not an array of tables; write a [[concept]] table per word"
        )
    return tables


# --- one concept --------------------------------------------------------------------------------------


def _concept_config(
    config: TrainConfig, table: dict[str, Any], number: int, shown: str, folder: Path
) -> tuple[TrainConfig, str]:
    """``config`` with ``table``'s keys, checked (but for what other concepts tell: _check_distinct), and how
    messages name the concept; errors name the file and the concept."""
    token = table.get("placeholder_token")
    if not (isinstance(token, str) and token.strip()):
        token = config.placeholder_token
    where = f"{shown}, concept {number}" + (f" ({token})" if token.strip() else "")
    values = {key: _typed_value(key, value, where) for key, value in table.items()}
    for key in PATH_KEYS:
        if key in values and values[key].strip():
            written = Path(values[key]).expanduser()
            values[key] = str(written if written.is_absolute() else folder / written)
    concept = dataclasses.replace(config, **values)
    for spec in dataclasses.fields(concept):  # no list or dict shared between concepts (extra, validation_prompt...)
        value = getattr(concept, spec.name)
        if isinstance(value, (list, dict)):
            setattr(concept, spec.name, type(value)(value))

    for key, what in (("placeholder_token", "the new word"), ("train_data_dir", "the folder of its images")):
        if not getattr(concept, key).strip():
            raise UserError(
                f"{where}: {key} is missing; add {key} = {_EXAMPLES[key]} ({what}) to this [[concept]] table"
            )
    if concept.init_embeddings is None and not (concept.initializer_token or "").strip():
        raise UserError(
            f'{where}: initializer_token is missing; add initializer_token = "toy" (a one-token word the vectors '
            'start from) or init_embeddings = "FILE" to this [[concept]] table, or give --initializer_token'
        )
    try:
        concept.validate()
    except UserError as error:
        message = str(error)
        named = re.match(r"--(\w+)", message)
        if named is None or named.group(1) not in table:
            raise  # a flag's value (not this concept's): the message it has without --concepts
        raise UserError(f"{where}: {message[2:]}") from None
    from_file = " (a relative path in the file is read from the file's folder)"
    images = Path(concept.train_data_dir).expanduser()
    if not images.is_dir():
        state = "is a file" if images.exists() else "does not exist"
        raise UserError(
            f"{where}: train_data_dir {str(images)!r} {state}; give the folder of this concept's images"
            + (from_file if "train_data_dir" in table else "")
        )
    if "init_embeddings" in table and not Path(concept.init_embeddings or "").expanduser().is_file():
        raise UserError(
            f"{where}: init_embeddings {concept.init_embeddings!r} is not a file; give an embedding file{from_file}"
        )
    return concept, where


def _typed_value(key: str, value: Any, where: str) -> Any:
    """``value`` as the TrainConfig field ``key`` takes it (a TOML integer where a float goes is that float)."""
    if key not in CONCEPT_KEYS:
        close = difflib.get_close_matches(key, CONCEPT_KEYS, n=1, cutoff=0.6)
        if close:
            raise UserError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}?")
        options = {spec.name for spec in dataclasses.fields(TrainConfig) if spec.metadata.get("help")}
        if key in options and key != "concepts":
            raise UserError(
                f"{where}: {key} is a run-wide option, not a concept's; give it on the command line as --{key}"
            )
        raise UserError(f"{where}: unknown key {key!r}; a [[concept]] table holds: {', '.join(CONCEPT_KEYS)}")
    kind = _types()[key]
    if kind is bool:
        fits = isinstance(value, bool)
    elif kind is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if fits else value
    else:
        fits = isinstance(value, str)
    if not fits:
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise UserError(
            f"{where}: {key} = {_toml(value)} is {_toml_kind(value)}; "
            f"write {wanted}: {key} = {_example(key, value, kind)}"
        )
    return value


def _types() -> dict[str, type]:
    """Each concept key's type, from TrainConfig's annotations (Optional[str] is str)."""
    if not _TYPES:
        hints = typing.get_type_hints(TrainConfig)
        for key in CONCEPT_KEYS:
            arguments = [a for a in typing.get_args(hints[key]) if a is not type(None)]
            _TYPES[key] = arguments[0] if arguments else hints[key]
    return _TYPES


def _example(key: str, value: Any, kind: type) -> str:
    """What to write instead of ``value``: the value itself converted when it converts ("2" -> 2), else an example."""
    if isinstance(value, str) and kind in (int, float):
        try:
            return _toml(kind(value))
        except ValueError:
            pass
    if isinstance(value, str) and kind is bool and value.lower() in ("true", "false"):
        return value.lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and kind is int and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and kind is str:
        return json.dumps(str(value))
    return _EXAMPLES[key]


def _toml(value: Any, depth: int = 0) -> str:
    """``value`` as TOML writes it (at most 60 characters, 3 levels deep: fuzzing nested 700), for messages."""
    if isinstance(value, (dict, list)) and depth >= 3:
        text = "{ ... }" if isinstance(value, dict) else "[...]"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "{ " + ", ".join(f"{key} = {_toml(item, depth + 1)}" for key, item in value.items()) + " }"
    elif isinstance(value, list):
        text = "[" + ", ".join(_toml(item, depth + 1) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _toml_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, dict):
        return "a table"
    return "an array" if isinstance(value, list) else "a date or time"


# --- between concepts --------------------------------------------------------------------------------


def _check_distinct(configs: list[TrainConfig], wheres: list[str], tables: list[dict[str, Any]], shown: str) -> None:
    """No two concepts share a word or a vector's name (``<a>`` of 3 vectors is spelled ``<a> <a>_1 <a>_2`` in
    prompts), and each word names its own files (learned_embeds-<name>.*, compared case-insensitively: one file on
    macOS and Windows). The word clashes come first: they say more than the file name a clashing word makes."""
    first_with: dict[str, int] = {}
    for number, (config, table) in enumerate(zip(configs, tables), 1):
        token = config.placeholder_token
        if token in first_with:
            flag = "" if "placeholder_token" in table else " (from --placeholder_token: set it in each [[concept]])"
            raise UserError(
                f"{shown}: concepts {first_with[token]} and {number} both have placeholder_token {token!r}{flag}; "
                "give each concept its own word"
            )
        first_with[token] = number
    for number, config in enumerate(configs, 1):
        token = config.placeholder_token
        for other_number, other in enumerate(configs, 1):
            names = _vector_names(other.placeholder_token, other.num_vectors)
            if other_number != number and token in names[1:]:
                instead = _plain_token(token.strip("<>").replace("_", "-"))
                raise UserError(
                    f"{shown}: concept {number}'s placeholder_token {token!r} is the name of a vector of concept "
                    f"{other_number} ({other.placeholder_token}, num_vectors {other.num_vectors}: {' '.join(names)}); "
                    f"choose another word, e.g. {instead!r}"
                )
    first_named: dict[str, int] = {}
    for number, (config, where) in enumerate(zip(configs, wheres), 1):
        try:
            name = concept_name(config.placeholder_token)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        if name.casefold() in first_named:
            earlier_number = first_named[name.casefold()]
            earlier = configs[earlier_number - 1].placeholder_token
            raise UserError(
                f"{shown}: concepts {earlier_number} ({earlier}) and {number} ({config.placeholder_token}) "
                f"would both write learned_embeds-{name}.* (words that differ only in angle brackets or case give one "
                "file name); give them different words"
            )
        first_named[name.casefold()] = number


def _vector_names(token: str, num_vectors: int) -> list[str]:
    """A token's names in the tokenizer, one per vector: diffusers' spelling (textinv.models.tokens.token_names,
    which imports torch, so it is not imported here)."""
    return [token] + [f"{token}_{index}" for index in range(1, num_vectors)]
