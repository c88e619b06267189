"""One definition per option: TrainConfig's field metadata makes the flags, their help and their checks."""

from __future__ import annotations

import dataclasses

import pytest

from textinv import cli
from textinv.config import TrainConfig, UserError

REQUIRED = {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "placeholder_token": "<t>"}


def test_every_config_field_is_an_option_with_help() -> None:
    not_options = {"extra"}  # what the CLI learned about how a config was given
    missing = [
        spec.name
        for spec in dataclasses.fields(TrainConfig)
        if spec.name not in not_options and not spec.metadata.get("help", "").strip()
    ]
    assert missing == []


def test_the_parser_has_a_flag_per_option_with_its_help_and_choices() -> None:
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    actions = {action.option_strings[0]: action for action in train_parser._actions if action.option_strings}
    for spec in cli.train_options():
        action = actions[f"--{spec.name}"]
        assert spec.metadata["help"] in (action.help or ""), spec.name
        if spec.metadata.get("choices"):
            assert tuple(action.choices) == tuple(spec.metadata["choices"]), spec.name


def test_validation_checks_the_choices_the_metadata_declares() -> None:
    choices = {spec.name: spec.metadata["choices"] for spec in cli.train_options() if spec.metadata.get("choices")}
    assert "lr_scheduler" in choices
    for name, allowed in choices.items():
        config = TrainConfig(**REQUIRED, initializer_token="toy", **{name: "not-a-choice"})
        with pytest.raises(UserError) as refused:
            config.validate()
        message = str(refused.value)
        assert f"--{name}" in message and "not-a-choice" in message and allowed[0] in message, message


@pytest.mark.parametrize(
    ("spelling", "field", "value"),
    [
        ("--learning_rate=0.003", "learning_rate", 0.003),
        ("--learning-rate=0.003", "learning_rate", 0.003),
        ("--no_random_flip", "random_flip", False),
        ("--no-random-flip", "random_flip", False),
        ("--train-batch-size=3", "train_batch_size", 3),
    ],
)
def test_each_flag_takes_underscores_or_dashes(spelling: str, field: str, value: object) -> None:
    argv = cli.normalise_flags(
        ["train", "--pretrained_model_name_or_path=m", "--train-data-dir=d", "--placeholder_token=<t>", spelling]
    )
    args = cli.build_parser().parse_args(argv)
    config = cli.config_from_args(args)
    assert getattr(config, field) == value
    assert config.train_data_dir == "d"


def test_a_value_that_looks_like_a_flag_is_left_alone() -> None:
    assert cli.normalise_flags(["--validation_prompt", "a-b c", "--x-y=a-b"]) == [
        "--validation_prompt",
        "a-b c",
        "--x_y=a-b",
    ]


def test_an_unknown_flag_points_to_the_subcommand_help(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["train", *[f"--{k}={v}" for k, v in REQUIRED.items()], "--frobnicate"])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(stderr) == 1 and "--frobnicate" in stderr[0] and "`textinv train --help`" in stderr[0]
