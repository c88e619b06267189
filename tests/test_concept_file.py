"""``--concepts FILE`` (textinv.data.concepts): several words in one run, each from a [[concept]] table.

The reader's every refusal is pinned to its exact one-line message (file, concept, value, fix); the CLI tests
run ``textinv.cli.main`` with a model folder that does not exist, so a concept error can only be reported if it
comes before any model is looked at, let alone loaded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import REPO
from textinv import cli
from textinv.config import TrainConfig
from textinv.data.concepts import CONCEPT_KEYS, concept_configs, concept_name
from textinv.errors import UserError

TWO = """
[[concept]]
placeholder_token = "<a>"
train_data_dir = "a"
[[concept]]
placeholder_token = "<b>"
train_data_dir = "b"
"""


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder (the current directory) with image folders a/ and b/ (their contents are not read here)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def base(concepts: Optional[str] = "concepts.toml", **values: Any) -> TrainConfig:
    """The flags' config: the model, an initializer, an output folder; no word or images of its own."""
    flags: dict[str, Any] = dict(pretrained_model_name_or_path="m", initializer_token="toy", output_dir="out")
    return TrainConfig(concepts=concepts, **{**flags, **values})


def refusal(config: TrainConfig) -> str:
    with pytest.raises(UserError) as refused:
        concept_configs(config)
    message = str(refused.value)
    assert "\n" not in message
    return message


# --- what a good file gives ---------------------------------------------------------------------------


def test_without_a_concepts_file_the_config_is_returned_itself() -> None:
    config = base(None, train_data_dir="x", placeholder_token="<x>", repeats=0)  # not validated: left to the caller
    configs = concept_configs(config)
    assert len(configs) == 1 and configs[0] is config


def test_the_flags_are_every_concepts_defaults_and_a_table_overrides_them(folder: Path) -> None:
    (folder / "concepts.toml").write_text(
        TWO.replace('train_data_dir = "a"', 'train_data_dir = "a"\nrepeats = 7\ninitializer_token = "cat"').replace(
            'train_data_dir = "b"',
            'train_data_dir = "b"\nlearnable_property = "style"\nnum_vectors = 3\ncaption_extension = "txt"\n'
            "caption_dropout_rate = 1",  # a TOML integer where a float goes
        ),
        encoding="utf-8",
    )
    config = base(repeats=50, caption_tag_dropout_rate=0.25, caption_extension=".caption", validation_prompt=["a <a>"])
    config.extra["from_cli"] = True
    first, second = concept_configs(config)
    assert (first.placeholder_token, first.repeats, first.initializer_token, first.num_vectors) == ("<a>", 7, "cat", 1)
    assert (second.placeholder_token, second.repeats, second.initializer_token, second.num_vectors) == (
        "<b>",
        50,
        "toy",
        3,
    )
    assert (first.learnable_property, second.learnable_property) == ("object", "style")
    assert second.caption_dropout_rate == 1.0 and isinstance(second.caption_dropout_rate, float)
    assert second.caption_extension == ".txt"  # validated: validate() normalises the extension
    assert first.caption_extension == ".caption"
    assert first.caption_tag_dropout_rate == second.caption_tag_dropout_rate == 0.25  # a flag neither table sets
    assert first.concepts == second.concepts == "concepts.toml"
    assert first.extra == {"from_cli": True}
    # Each concept's config is its own: nothing mutable is shared with the flags' config or the other concept.
    first.extra["mine"] = 1
    first.validation_prompt.append("another")
    assert "mine" not in second.extra and "mine" not in config.extra
    assert second.validation_prompt == config.validation_prompt == ["a <a>"]


def test_a_table_may_set_every_concept_key(folder: Path) -> None:
    (folder / "t.txt").write_text("a photo of [name], [filewords]\n", encoding="utf-8")
    (folder / "start.safetensors").write_bytes(b"not read here")
    values = {
        "placeholder_token": '"<every>"',
        "initializer_token": '"dog"',
        "num_vectors": "2",
        "init_embeddings": '"start.safetensors"',
        "train_data_dir": '"a"',
        "learnable_property": '"style"',
        "repeats": "3",
        "caption_extension": '".caption"',
        "template_file": '"t.txt"',
        "shuffle_caption": "true",
        "keep_tokens": "1",
        "caption_tag_dropout_rate": "0.5",
        "caption_dropout_rate": "0.125",
    }
    assert set(values) == set(CONCEPT_KEYS)
    (folder / "concepts.toml").write_text(
        "[[concept]]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()), encoding="utf-8"
    )
    (config,) = concept_configs(base())
    assert config.placeholder_token == "<every>" and config.initializer_token == "dog"
    assert (config.num_vectors, config.repeats, config.keep_tokens) == (2, 3, 1)
    assert (config.init_embeddings, config.train_data_dir, config.template_file) == (
        "start.safetensors",
        "a",
        "t.txt",
    )  # relative to the file's folder, here the current directory
    assert config.learnable_property == "style" and config.caption_extension == ".caption"
    assert config.shuffle_caption is True
    assert (config.caption_tag_dropout_rate, config.caption_dropout_rate) == (0.5, 0.125)


def test_every_concept_key_is_a_train_config_field() -> None:
    fields = {spec.name for spec in dataclasses.fields(TrainConfig)}
    assert set(CONCEPT_KEYS) <= fields and len(set(CONCEPT_KEYS)) == len(CONCEPT_KEYS) == 13


def test_relative_paths_in_the_file_are_read_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = tmp_path / "kit"
    for name in ("cat", "wave"):
        (kit / "images" / name).mkdir(parents=True)
    (kit / "templates.txt").write_text("a painting in the style of [name]\n", encoding="utf-8")
    (kit / "start.pt").write_bytes(b"not read here")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "flag-images").mkdir(parents=True)
    absolute = tmp_path / "absolute"
    absolute.mkdir()
    (kit / "concepts.toml").write_text(
        '[[concept]]\nplaceholder_token = "<cat>"\ntrain_data_dir = "images/cat"\ninit_embeddings = "start.pt"\n'
        '[[concept]]\nplaceholder_token = "<wave>"\ntrain_data_dir = "images/wave"\ntemplate_file = "templates.txt"\n'
        f'[[concept]]\nplaceholder_token = "<abs>"\ntrain_data_dir = "{absolute.as_posix()}"\n'
        '[[concept]]\nplaceholder_token = "<flag>"\n',  # --train_data_dir's folder: relative to the current directory
        encoding="utf-8",
    )
    monkeypatch.chdir(elsewhere)
    cat, wave, fixed, flagged = concept_configs(base(str(kit / "concepts.toml"), train_data_dir="flag-images"))
    assert Path(cat.train_data_dir) == kit / "images" / "cat" and Path(cat.init_embeddings or "") == kit / "start.pt"
    assert Path(wave.train_data_dir) == kit / "images" / "wave"
    assert Path(wave.template_file or "") == kit / "templates.txt"
    assert Path(fixed.train_data_dir) == absolute
    assert flagged.train_data_dir == "flag-images"

    # The file and its folders move together: the same file, moved, reads the moved folders.
    moved = tmp_path / "moved"
    shutil.move(str(kit), moved)
    cat, wave, _, _ = concept_configs(base(str(moved / "concepts.toml"), train_data_dir="flag-images"))
    assert Path(cat.train_data_dir) == moved / "images" / "cat"
    assert Path(wave.template_file or "") == moved / "templates.txt"


def test_the_flags_word_serves_one_concept_that_has_none(folder: Path) -> None:
    (folder / "concepts.toml").write_text('[[concept]]\ntrain_data_dir = "a"\n', encoding="utf-8")
    (config,) = concept_configs(base(placeholder_token="<flagged>"))
    assert config.placeholder_token == "<flagged>" and config.train_data_dir == "a"


def test_unicode_words_and_a_byte_order_mark_are_fine(folder: Path) -> None:
    text = TWO.replace("<a>", "<猫-toy>").replace("<b>", "<東京.style_2>")
    (folder / "concepts.toml").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [config.placeholder_token for config in concept_configs(base())] == ["<猫-toy>", "<東京.style_2>"]


# --- every refusal, to the letter ------------------------------------------------------------------------

ALL_KEYS = ", ".join(CONCEPT_KEYS)
IN_A = 'placeholder_token = "<a>"\ntrain_data_dir = "a"\n'
CASES: list[tuple[str, Optional[str], dict[str, Any], str]] = [
    # (id, the file's text (None: no file), flags, the message)
    (
        "file-missing",
        None,
        {},
        "--concepts 'concepts.toml' does not exist; give a TOML file with one [[concept]] table per word",
    ),
    (
        "toml-syntax",
        "[[concept]]\nplaceholder_token = <a>\n",
        {},
        "--concepts 'concepts.toml' is not valid TOML: Invalid value (at line 2, column 21); write one [[concept]] "
        'table per word with key = value lines, e.g. placeholder_token = "<cat-toy>"',
    ),
    (
        "no-concept-table",
        "# nothing yet\n",
        {},
        "concepts.toml: no [[concept]] table; add one per word, each with placeholder_token, initializer_token and "
        "train_data_dir",
    ),
    (
        "empty-array",
        "concept = []\n",
        {},
        "concepts.toml: no [[concept]] table; add one per word, each with "
        "placeholder_token, initializer_token and train_data_dir",
    ),
    (
        "single-brackets",
        "[concept]\n" + IN_A,
        {},
        "concepts.toml: [concept] is a single table; write [[concept]] (double brackets), one per word",
    ),
    (
        "top-level-key",
        "resolution = 512\n[[concept]]\n" + IN_A,
        {},
        "concepts.toml: top-level key 'resolution' is not allowed; the file holds only [[concept]] tables (a run-wide "
        "option is a command-line flag, a concept's goes inside its [[concept]] table)",
    ),
    (
        "top-level-typo",
        "[[concepts]]\n" + IN_A,
        {},
        "concepts.toml: top-level key 'concepts' is not allowed; did you mean [[concept]]? (a run-wide option is a "
        "command-line flag, a concept's goes inside its [[concept]] table)",
    ),
    (
        "not-tables",
        'concept = ["<a>", "<b>"]\n',
        {},
        'concepts.toml: concept = ["<a>", "<b>"] is not an array of tables; write a [[concept]] table per word',
    ),
    (
        "string-for-integer",
        TWO + 'num_vectors = "2"\n',
        {},
        'concepts.toml, concept 2 (<b>): num_vectors = "2" is a string; write an integer: num_vectors = 2',
    ),
    (
        "table-for-string",
        '[[concept]]\ntrain_data_dir = "a"\nplaceholder_token = { name = "<a>" }\n',
        {},
        'concepts.toml, concept 1: placeholder_token = { name = "<a>" } is a table; write a string: '
        'placeholder_token = "<cat-toy>"',
    ),
    (
        "float-for-integer",
        "[[concept]]\n" + IN_A + "repeats = 10.0\n",
        {},
        "concepts.toml, concept 1 (<a>): repeats = 10.0 is a float; write an integer: repeats = 10",
    ),
    (
        "string-for-boolean",
        "[[concept]]\n" + IN_A + 'shuffle_caption = "true"\n',
        {},
        'concepts.toml, concept 1 (<a>): shuffle_caption = "true" is a string; write true or false: '
        "shuffle_caption = true",
    ),
    (
        "boolean-for-number",
        "[[concept]]\n" + IN_A + "caption_dropout_rate = false\n",
        {},
        "concepts.toml, concept 1 (<a>): caption_dropout_rate = false is a boolean; write a number: "
        "caption_dropout_rate = 0.05",
    ),
    (
        "unknown-key-close",
        '[[concept]]\nplaceholder_tokn = "<a>"\ntrain_data_dir = "a"\n',
        {},
        "concepts.toml, concept 1: unknown key 'placeholder_tokn'; did you mean 'placeholder_token'?",
    ),
    (
        "unknown-key-far",
        TWO + "colour = 3\n",
        {},
        f"concepts.toml, concept 2 (<b>): unknown key 'colour'; a [[concept]] table holds: {ALL_KEYS}",
    ),
    (
        "run-wide-key",
        "[[concept]]\n" + IN_A + "learning_rate = 0.01\n",
        {},
        "concepts.toml, concept 1 (<a>): learning_rate is a run-wide option, not a concept's; give it on the command "
        "line as --learning_rate",
    ),
    (
        "no-placeholder-token",
        TWO + '[[concept]]\ntrain_data_dir = "a"\n',
        {},
        'concepts.toml, concept 3: placeholder_token is missing; add placeholder_token = "<cat-toy>" (the new word) '
        "to this [[concept]] table",
    ),
    (
        "no-train-data-dir",
        '[[concept]]\nplaceholder_token = "<a>"\n',
        {},
        'concepts.toml, concept 1 (<a>): train_data_dir is missing; add train_data_dir = "cat-images" (the folder of '
        "its images) to this [[concept]] table",
    ),
    (
        "no-initializer",
        TWO.replace('"b"', '"b"\ninitializer_token = "dog"'),
        {"initializer_token": None},
        'concepts.toml, concept 1 (<a>): initializer_token is missing; add initializer_token = "toy" (a one-token '
        'word the vectors start from) or init_embeddings = "FILE" to this [[concept]] table, or give '
        "--initializer_token",
    ),
    (
        "same-token",
        TWO.replace("<b>", "<a>"),
        {},
        "concepts.toml: concepts 1 and 2 both have placeholder_token '<a>'; give each concept its own word",
    ),
    (
        "same-token-from-the-flag",
        '[[concept]]\ntrain_data_dir = "a"\n[[concept]]\ntrain_data_dir = "b"\n',
        {"placeholder_token": "<flag>"},
        "concepts.toml: concepts 1 and 2 both have placeholder_token '<flag>' (from --placeholder_token: set it in "
        "each [[concept]]); give each concept its own word",
    ),
    (
        "same-file-name",
        TWO.replace("<b>", "A"),
        {},
        "concepts.toml: concepts 1 (<a>) and 2 (A) would both write learned_embeds-A.* (words that differ only in "
        "angle brackets or case give one file name); give them different words",
    ),
    (
        "a-vector-name",
        TWO.replace('"a"', '"a"\nnum_vectors = 3').replace("<b>", "<a>_2"),
        {},
        "concepts.toml: concept 2's placeholder_token '<a>_2' is the name of a vector of concept 1 (<a>, num_vectors "
        "3: <a> <a>_1 <a>_2); choose another word, e.g. '<a-2>'",
    ),
    (
        "path-in-token",
        TWO.replace("<b>", "<cat/toy>"),
        {},
        "concepts.toml, concept 2 (<cat/toy>): placeholder_token '<cat/toy>' cannot name its files "
        "(learned_embeds-cat/toy.*): it holds '/'; use letters, digits, '.', '_' or '-' only, e.g. '<cat-toy>'",
    ),
    (
        "empty-in-brackets",
        TWO.replace("<b>", "<>"),
        {},
        "concepts.toml, concept 2 (<>): placeholder_token '<>' cannot name its files (learned_embeds-.*): nothing is "
        "left without the angle brackets; give a word, e.g. '<cat-toy>'",
    ),
    (
        "repeats-zero",
        TWO + "repeats = 0\n",
        {},
        "concepts.toml, concept 2 (<b>): repeats 0 must be >= 1",
    ),
    (
        "not-a-property",
        TWO + 'learnable_property = "styl"\n',
        {},
        "concepts.toml, concept 2 (<b>): learnable_property 'styl' is not one of: object, style",
    ),
    (
        "a-flags-bad-value-is-the-flags-error",
        TWO,
        {"repeats": 0},
        "--repeats 0 must be >= 1",
    ),
    (
        "images-folder-missing",
        TWO.replace('"b"', '"missing"'),
        {},
        "concepts.toml, concept 2 (<b>): train_data_dir 'missing' does not exist; give the folder of this concept's "
        "images (a relative path in the file is read from the file's folder)",
    ),
    (
        "images-folder-is-a-file",
        TWO.replace('"b"', '"concepts.toml"'),
        {},
        "concepts.toml, concept 2 (<b>): train_data_dir 'concepts.toml' is a file; give the folder of this "
        "concept's images (a relative path in the file is read from the file's folder)",
    ),
    (
        "init-embeddings-missing",
        TWO + 'init_embeddings = "start.safetensors"\n',
        {},
        "concepts.toml, concept 2 (<b>): init_embeddings 'start.safetensors' is not a file; give an embedding file "
        "(a relative path in the file is read from the file's folder)",
    ),
    (
        "template-file-missing",
        TWO + 'template_file = "t.txt"\n',
        {},
        "concepts.toml, concept 2 (<b>): template_file 't.txt' does not exist; give a text file of templates, one a "
        "line",
    ),
]


@pytest.mark.parametrize("name, text, flags, expected", CASES, ids=[case[0] for case in CASES])
def test_each_mistake_is_one_line_naming_the_file_the_concept_the_value_and_the_fix(
    name: str, text: Optional[str], flags: dict[str, Any], expected: str, folder: Path
) -> None:
    if text is not None:
        (folder / "concepts.toml").write_text(text, encoding="utf-8")
    assert refusal(base(**flags)) == expected


def test_the_case_ids_are_distinct() -> None:
    assert len({case[0] for case in CASES}) == len(CASES)


def test_a_file_that_cannot_be_read_as_text(folder: Path) -> None:
    (folder / "concepts.toml").write_bytes(b'[[concept]]\nplaceholder_token = "<\xff>"\n')
    assert refusal(base()) == "--concepts 'concepts.toml' is not UTF-8 text (invalid start byte); save it as UTF-8"
    assert refusal(base("a")) == "--concepts 'a' is a folder; give a TOML file with one [[concept]] table per word"
    assert refusal(base("")) == "--concepts is empty; give a TOML file with one [[concept]] table per word"


@pytest.mark.parametrize(
    "token, name",
    [("<cat-toy>", "cat-toy"), ("cat", "cat"), ("<猫>", "猫"), ("<a.b_c-1>", "a.b_c-1"), ("<Straße2>", "Straße2")],
)
def test_concept_name_drops_the_angle_brackets(token: str, name: str) -> None:
    assert concept_name(token) == name


@pytest.mark.parametrize(
    "token, why",
    [
        ("<a/b>", "it holds '/'"),
        ("<a\\b>", "it holds '\\\\'"),
        ("<a b>", "it holds ' '"),
        ("<a:b>", "it holds ':'"),
        ("<<a>>", "it holds '<'"),
        ("<.hidden>", "'.hidden' starts with '.' (a hidden file)"),
        ("<a..b>", "'a..b' holds '..'"),
        ("<>", "nothing is left without the angle brackets"),
        ("", "nothing is left without the angle brackets"),
        ("<" + "x" * 121 + ">", "it is longer than 120 bytes"),
    ],
)
def test_concept_name_refuses_a_word_that_cannot_be_a_file_name(token: str, why: str) -> None:
    with pytest.raises(UserError) as refused:
        concept_name(token)
    message = str(refused.value)
    assert message.startswith(f"placeholder_token {token!r} cannot name its files") and why in message, message
    assert "\n" not in message


def test_the_reader_does_not_import_torch() -> None:
    code = "import sys, textinv.data.concepts, textinv.flags; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


# --- through the command line ------------------------------------------------------------------------------


def run_train(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str, script: bool = False) -> tuple[int, str]:
    """`textinv train` (or the root train_textual_inversion.py) with a model folder that does not exist."""
    argv = [f"--pretrained_model_name_or_path={tmp_path / 'no-model'}", f"--output_dir={tmp_path / 'out'}", *flags]
    code = cli.train_script_main(argv) if script else cli.main(["train", *argv])
    return code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, prog: str = "textinv") -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0][len(f"{prog}: error: ") :]


@pytest.mark.parametrize(
    "text, expected",
    [
        (TWO.replace("<b>", "<a>"), "{file}: concepts 1 and 2 both have placeholder_token '<a>'"),
        (TWO + "placeholder_tokn = 1\n", "{file}, concept 2 (<b>): unknown key 'placeholder_tokn'; did you mean"),
        (TWO.replace('"b"', '"nowhere"'), "{file}, concept 2 (<b>): train_data_dir '{folder}/nowhere' does not exist"),
    ],
    ids=["same-token", "unknown-key", "no-images-folder"],
)
def test_a_bad_concepts_file_stops_the_command_before_any_model(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = tmp_path / "kit"
    for name in ("a", "b"):
        (kit / name).mkdir(parents=True)
    file = kit / "concepts.toml"
    file.write_text(text, encoding="utf-8")
    for script, prog in ((False, "textinv"), (True, "train_textual_inversion.py")):
        code, stderr = run_train(tmp_path, capsys, f"--concepts={file}", "--initializer_token=toy", script=script)
        message = assert_one_line(code, stderr, prog)
        assert message.startswith(expected.format(file=file, folder=kit)), message
        assert "model" not in message  # the model folder does not exist: checking it would have been the error
        assert not (tmp_path / "out").exists()


def test_a_good_concepts_file_needs_no_word_or_images_flags(
    train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "concepts.toml"
    file.write_text(f'[[concept]]\nplaceholder_token = "<one>"\ntrain_data_dir = "{train_images.as_posix()}"\n')
    code, stderr = run_train(tmp_path, capsys, f"--concepts={file}", "--initializer_token=toy")
    # Past the concepts: the next check, the model folder, is what stops it.
    assert assert_one_line(code, stderr).startswith(f"model folder '{tmp_path / 'no-model'}' does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, prog", [(False, "textinv"), (True, "train_textual_inversion.py")])
def test_without_concepts_the_word_and_the_images_are_required(
    script: bool, prog: str, train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stderr = run_train(tmp_path, capsys, "--initializer_token=toy", "--placeholder_token=<x>", script=script)
    assert assert_one_line(code, stderr, prog) == (
        "--train_data_dir is required: the folder of training images; or give --concepts FILE, a TOML file of "
        "[[concept]] tables that each set train_data_dir"
    )
    code, stderr = run_train(
        tmp_path, capsys, "--initializer_token=toy", f"--train_data_dir={train_images}", script=script
    )
    assert assert_one_line(code, stderr, prog) == (
        "--placeholder_token is required: the new word, e.g. '<cat-toy>'; or give --concepts FILE, a TOML file of "
        "[[concept]] tables that each set placeholder_token"
    )


@pytest.mark.parametrize("defaults", [None, cli.SCRIPT_DEFAULTS], ids=["textinv", "root-script"])
def test_the_help_says_the_two_flags_are_required_unless_concepts(defaults: Optional[dict[str, Any]]) -> None:
    parser = cli.build_parser(defaults)
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    actions = {action.option_strings[0]: action for action in train_parser._actions if action.option_strings}
    for flag in ("--train_data_dir", "--placeholder_token"):
        assert actions[flag].required is False
        assert (actions[flag].help or "").endswith(" (required unless --concepts)"), actions[flag].help
        assert "(default:" not in (actions[flag].help or "")
    assert "--concepts" in actions


def test_a_real_process_exits_2_with_one_line(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "concepts.toml").write_text(TWO.replace("<b>", "<a>"), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "textinv.cli",
            "train",
            "--pretrained_model_name_or_path=no-model",
            "--concepts=concepts.toml",
            "--initializer_token=toy",
            "--output_dir=out",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src")),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "textinv: error: concepts.toml: concepts 1 and 2 both have placeholder_token '<a>'; give each concept its own "
        "word"
    )
    assert not (tmp_path / "out").exists()
