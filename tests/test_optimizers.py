"""--optimizer (issue 27): adamw, adamw8bit, prodigy, schedulefree_adamw and lion train the word, keep their state in
checkpoints (a resume equals an uninterrupted run), take their own defaults, and a missing package is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import textinv
from conftest import sigint_on_loss_call, train_config
from textinv import cli
from textinv.config import TrainConfig, TrainingInterrupted, UserError
from textinv.optimizer_options import OPTIMIZER_DEFAULTS, OPTIMIZERS
from textinv.training import builders, optimizers

REQUIRED = [
    "--pretrained_model_name_or_path=m",
    "--train_data_dir=d",
    "--placeholder_token=<t>",
    "--initializer_token=toy",
]
# learning_rate=None: each optimizer's own default rate (the fixture's train_config gives AdamW's 5e-3).
FAST = dict(max_train_steps=4, only_save_embeds=True, eval_steps=0, learning_rate=None, report_to="none")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _parsed(argv: list[str], defaults: Any = None) -> TrainConfig:
    return cli.config_from_args(cli.build_parser(defaults).parse_args(["train", *REQUIRED, *argv]))


# --- defaults and the flags --------------------------------------------------------------------------------------
def test_each_optimizer_has_its_default_rate_unless_the_flag_is_given() -> None:
    for name in OPTIMIZERS:
        config = _parsed(["--optimizer", name])
        assert config.learning_rate is None
        assert config.optimizer_hyperparameters()["lr"] == OPTIMIZER_DEFAULTS[name].learning_rate
        assert _parsed(["--optimizer", name, "--learning_rate", "0.02"]).resolved_learning_rate == 0.02
    assert _parsed([]).optimizer_hyperparameters() == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "weight_decay": 1e-2,
        "eps": 1e-8,
    }  # AdamW as textinv always built it
    prodigy = _parsed(["--optimizer", "prodigy"]).optimizer_hyperparameters()
    assert prodigy["lr"] == 1.0 and prodigy["safeguard_warmup"] and prodigy["use_bias_correction"]
    lion = _parsed(["--optimizer", "lion"]).optimizer_hyperparameters()
    assert lion == {"lr": 3e-4, "betas": (0.9, 0.99), "weight_decay": 3e-2}  # no epsilon: Lion has none
    assert _parsed(["--optimizer", "lion", "--adam_weight_decay", "0"]).optimizer_hyperparameters()["weight_decay"] == 0
    free = _parsed(["--optimizer", "schedulefree_adamw", "--lr_warmup_steps", "7"]).optimizer_hyperparameters()
    assert free["lr"] == 2.5e-3 and free["warmup_steps"] == 7


def test_the_root_scripts_ppdiffusers_rate_is_adamws_only() -> None:
    """ppdiffusers' lr 1e-4 is an AdamW rate: the root script keeps it for adamw, Prodigy keeps its 1.0."""
    assert _parsed([], cli.SCRIPT_DEFAULTS).resolved_learning_rate == 1e-4
    assert _parsed(["--optimizer", "adamw8bit"], cli.SCRIPT_DEFAULTS).resolved_learning_rate == 1e-4
    assert _parsed(["--optimizer", "prodigy"], cli.SCRIPT_DEFAULTS).resolved_learning_rate == 1.0
    assert _parsed(["--optimizer", "lion", "--learning_rate=1e-5"], cli.SCRIPT_DEFAULTS).resolved_learning_rate == 1e-5


@pytest.mark.parametrize(
    "name, module, extra",
    [
        ("adamw8bit", "bitsandbytes", "adamw8bit"),
        ("prodigy", "prodigyopt", "prodigy"),
        ("schedulefree_adamw", "schedulefree", "schedulefree"),
        ("lion", "lion_pytorch", "lion"),
    ],
)
def test_a_missing_package_is_one_line_naming_its_extra(
    name: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package has: no import
    argv = ["train", *REQUIRED, f"--output_dir={tmp_path / 'out'}", "--optimizer", name]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("textinv: error: --optimizer") and f"'textinv[{extra}]'" in line, line
    assert "--optimizer adamw" in line
    with pytest.raises(UserError, match=rf"textinv\[{extra}\]"):  # the import itself, past the check
        optimizers._library(name)


def test_prodigy_refuses_a_rate_of_its_own_for_a_group(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    argv = ["train", *REQUIRED, f"--output_dir={tmp_path}", "--optimizer=prodigy", "--lora_rank=4"]
    assert cli.main([*argv, "--lora_learning_rate=1e-4"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--lora_learning_rate does not apply to --optimizer prodigy" in line


# --- building each optimizer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameter_groups_keep_their_rates_with_every_optimizer(name: str) -> None:
    """T5's group (its own rate) and the LoRA's: each optimizer takes them; Prodigy gives every group its one rate,
    and the LoRA's default rate (an AdamW rate) scales like the word's."""
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>", optimizer=name)
    clip, t5, lora = (torch.nn.Parameter(torch.randn(shape)) for shape in ((2, 8), (2, 64), (80, 80)))
    groups = [
        {"params": [clip]},
        {"params": [t5], "lr": 0.04, "name": "t5"},
        {"params": [lora], "lr": 1e-4, "name": "lora"},
    ]
    optimizer = optimizers.make_optimizer(config, groups, num_processes=1)
    rates = {group.get("name", "word"): group["lr"] for group in optimizer.param_groups}
    default = OPTIMIZER_DEFAULTS[name].learning_rate
    if name == "prodigy":
        assert rates == {"word": 1.0, "t5": 1.0, "lora": 1.0}
    else:
        assert rates == pytest.approx({"word": default, "t5": 0.04, "lora": 1e-4 * default / 1e-3})
    before = [p.detach().clone() for p in (clip, t5, lora)]
    for _ in range(2):
        optimizers.before_gradients(optimizer)
        (clip.square().sum() + t5.square().sum() + lora.square().sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip((clip, t5, lora), before))
    assert "train_mode" not in optimizer.param_groups[0] or name == "schedulefree_adamw"


def test_adamw8bit_keeps_its_8bit_moments_through_a_checkpoint(tmp_path: Path) -> None:
    """bitsandbytes' 8-bit state (uint8 moments, their quantile maps and block maxima) reads back from state.pt with
    weights_only=True, and the resumed steps equal uninterrupted ones."""
    config = TrainConfig(
        pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>", optimizer="adamw8bit"
    )
    start = torch.randn(4096 * 2, generator=torch.Generator().manual_seed(0))

    def steps(parameter: torch.nn.Parameter, optimizer: Any, count: int) -> None:
        for _ in range(count):
            (parameter.square().sum() + parameter.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()

    whole = torch.nn.Parameter(start.clone())
    optimizer = optimizers.make_optimizer(config, [whole], 1)
    steps(whole, optimizer, 4)
    first = torch.nn.Parameter(start.clone())
    optimizer = optimizers.make_optimizer(config, [first], 1)
    steps(first, optimizer, 2)
    assert optimizer.state[first]["state1"].dtype == torch.uint8  # 8-bit moments on this device
    torch.save({"optimizer": optimizer.state_dict(), "vectors": first.detach()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    second = torch.nn.Parameter(saved["vectors"].clone())
    resumed = optimizers.make_optimizer(config, [second], 1)
    resumed.load_state_dict(saved["optimizer"])
    steps(second, resumed, 2)
    assert torch.equal(second, whole)


def test_adamw8bit_without_8bit_kernels_for_the_device_says_so_in_one_line(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Here bitsandbytes has CPU kernels (the other tests train with them); a device without them is simulated by an
    8-bit step that fails as bitsandbytes fails there."""
    import bitsandbytes

    real = bitsandbytes.optim.AdamW8bit

    class NoKernels(real):  # type: ignore[misc, valid-type]
        def step(self, closure: Any = None) -> Any:
            raise NotImplementedError("no kernel registered for 'bitsandbytes::optimizer_update_8bit_blockwise' on cpu")

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", NoKernels)
    argv = ["train", f"--pretrained_model_name_or_path={tiny_model}", f"--train_data_dir={train_images}"]
    argv += ["--placeholder_token=<cat-toy>", "--initializer_token=toy", "--resolution=64", "--max_train_steps=2"]
    argv += ["--optimizer=adamw8bit", "--eval_steps=0", "--report_to=none", f"--output_dir={tmp_path / 'out'}"]
    assert cli.main(argv) == 2
    line = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(line) == 1 and "--optimizer adamw8bit needs bitsandbytes' 8-bit optimizer kernels for cpu" in line[0]
    assert line[0].endswith("use --optimizer adamw")


# --- training with each ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_only_the_placeholder_rows(
    name: str, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    settings = {**FAST, "only_save_embeds": False}
    result = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", optimizer=name, **settings), show_progress=False
    )
    out = result.output_dir
    base = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").get_input_embeddings().weight.detach()
    trained = CLIPTextModel.from_pretrained(out / "text_encoder").get_input_embeddings().weight.detach()
    token_id = CLIPTokenizer.from_pretrained(out / "tokenizer").convert_tokens_to_ids("<cat-toy>")
    toy = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")("toy", add_special_tokens=False).input_ids[0]
    vector = load_file(str(out / "learned_embeds.safetensors"))["<cat-toy>"][0]
    assert token_id == base.shape[0] and torch.equal(trained[:token_id], base)  # every other row as it was
    assert torch.equal(trained[token_id], vector) and not torch.equal(vector, base[toy])  # the word moved
    record = json.loads((out / "run.json").read_text())
    assert record["optimizer"]["name"] == record["identity"]["optimizer"] == name
    assert record["optimizer"]["lr"] == record["effective_learning_rate"] == OPTIMIZER_DEFAULTS[name].learning_rate
    assert f"| optimizer | {name} |" in (out / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_with_each_optimizer_equals_an_uninterrupted_run(
    name: str, tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cosine (but for schedule-free, which has none): the schedule's state matters as the optimizer's does.
    settings = {**FAST, "max_train_steps": 6, "lr_scheduler": "cosine", "checkpointing_steps": 100, "seed": 5}
    full = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "full", optimizer=name, **settings), show_progress=False
    )
    sigint_on_loss_call(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as stopped:
        textinv.train(
            train_config(tiny_model, train_images, tmp_path / "cut", optimizer=name, **settings), show_progress=False
        )
    monkeypatch.undo()
    assert stopped.value.step == 3
    resumed = textinv.train(
        train_config(
            tiny_model, train_images, tmp_path / "cut", optimizer=name, **settings, resume_from_checkpoint="latest"
        ),
        show_progress=False,
    )
    assert torch.equal(resumed.embedding.vectors["text_encoder"], full.embedding.vectors["text_encoder"])
    assert resumed.losses == full.losses
    other = "lion" if name != "lion" else "adamw"  # another optimizer's state cannot continue this one's
    with pytest.raises(UserError, match=f"optimizer was '{name}', now '{other}'"):
        textinv.train(
            train_config(
                tiny_model, train_images, tmp_path / "cut", optimizer=other, **settings, resume_from_checkpoint="latest"
            ),
            show_progress=False,
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prodigy", "lion", "schedulefree_adamw"])
def test_pivotal_tuning_trains_the_lora_group_with_the_optimizer(
    name: str, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    captured: dict[str, Any] = {}
    real = builders.make_optimizer

    def keep(*args: Any) -> Any:
        captured["optimizer"] = real(*args)
        return captured["optimizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builders, "make_optimizer", keep)
        config = train_config(tiny_model, train_images, tmp_path / "out", optimizer=name, lora_rank=2, **FAST)
        textinv.train(config, show_progress=False)
    groups = {group.get("name", "word"): group for group in captured["optimizer"].param_groups}
    assert set(groups) == {"word", "lora"}
    state = captured["optimizer"].state
    assert all(len(state[p]) > 0 for group in groups.values() for p in group["params"])  # every group stepped
    adapters = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(key.endswith("lora_B.weight") and tensor.abs().sum() > 0 for key, tensor in adapters.items())


@pytest.mark.slow
def test_schedule_free_evaluates_and_saves_its_eval_mode_weights(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """schedulefree's x (optimizer.eval()) is what held-out evaluation, snapshots, checkpoints and the final file see;
    the gradient point y differs from it; and a run learns the same with or without evaluation."""
    from textinv.training import held_out, recipe

    seen: list[tuple[str, bool]] = []
    captured: dict[str, Any] = {}
    real_make, real_evaluate, real_checkpoint = (
        builders.make_optimizer,
        held_out.HeldOutEvaluation.evaluate,
        recipe.TrainingRecipe.save_checkpoint,
    )

    def make(*args: Any) -> Any:
        captured["optimizer"] = real_make(*args)
        return captured["optimizer"]

    def mode() -> bool:
        return captured["optimizer"].param_groups[0]["train_mode"]

    def evaluate(self: Any, run: Any, step: int) -> Any:
        seen.append(("eval", mode()))
        return real_evaluate(self, run, step)

    def save_checkpoint(self: Any, step: int) -> Any:
        seen.append(("checkpoint", mode()))
        return real_checkpoint(self, step)

    monkeypatch.setattr(builders, "make_optimizer", make)
    monkeypatch.setattr(held_out.HeldOutEvaluation, "evaluate", evaluate)
    monkeypatch.setattr(recipe.TrainingRecipe, "save_checkpoint", save_checkpoint)
    settings = {**FAST, "optimizer": "schedulefree_adamw", "eval_steps": 2, "eval_samples": 2, "checkpointing_steps": 2}
    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **settings), show_progress=False)
    assert [what for what, _ in seen] == ["eval", "eval", "checkpoint", "eval"]
    assert not any(train_mode for _, train_mode in seen)  # x, never the gradient point
    saved = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))["<cat-toy>"]
    assert torch.equal(saved, result.embedding.vectors["text_encoder"])
    optimizer = captured["optimizer"]
    vectors = optimizer.param_groups[0]["params"][0]
    assert torch.equal(vectors.detach().cpu(), saved)
    optimizer.train()  # the gradient point y: not what was saved
    assert not torch.allclose(vectors.detach().cpu(), saved, atol=1e-6)
    optimizer.eval()
    assert torch.allclose(vectors.detach().cpu(), saved, atol=1e-6)

    monkeypatch.undo()
    quiet = {**settings, "eval_steps": 0}
    without = textinv.train(train_config(tiny_model, train_images, tmp_path / "quiet", **quiet), show_progress=False)
    assert torch.equal(without.embedding.vectors["text_encoder"], saved)


@pytest.mark.slow
def test_the_default_run_builds_the_adamw_it_always_did(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the new flags: bit for bit the vectors of the AdamW construction textinv had before --optimizer."""

    def before(config: TrainConfig, parameters: Any, num_processes: int) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    settings = dict(max_train_steps=4, only_save_embeds=True, eval_steps=0, learning_rate=None, lr_scheduler="cosine")
    default = textinv.train(train_config(tiny_model, train_images, tmp_path / "a", **settings), show_progress=False)
    monkeypatch.setattr(builders, "make_optimizer", before)
    old = textinv.train(train_config(tiny_model, train_images, tmp_path / "b", **settings), show_progress=False)
    assert torch.equal(default.embedding.vectors["text_encoder"], old.embedding.vectors["text_encoder"])
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["identity"]["optimizer"] == "adamw" and record["identity"]["embedding_norm"] is None


def test_the_web_page_passes_the_optimizer_and_the_norm_switch(tmp_path: Path, tiny_model: Path) -> None:
    from textinv.serve.jobs import TrainRequest
    from textinv.serve.state import ServerState

    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(
        images=[],
        placeholder_token="<t>",
        initializer_token="toy",
        optimizer="lion",
        learning_rate=3e-4,
        preserve_embedding_norm=True,
    )
    config = state._train_config(request, "<t>", "toy", 3, tiny_model, tmp_path / "job")
    assert (config.optimizer, config.learning_rate, config.preserve_embedding_norm) == ("lion", 3e-4, True)
    assert TrainRequest(images=[], placeholder_token="<t>", initializer_token="toy").learning_rate == 1e-3
