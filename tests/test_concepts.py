"""Several words in one run (--concepts, issue 27): one model load, each word its own rows, files, curve, best file and
stop; resume continues every word exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import textinv
from conftest import sigint_on_loss_call, train_config
from textinv.config import TrainingInterrupted

FAST = dict(max_train_steps=4, only_save_embeds=True, report_to="none", max_grad_norm=0.0)


@pytest.fixture(scope="module")
def style_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second word's images: the fourth demo image and two crops of it (96 px)."""
    from textinv.tiny import demo_images_dir

    folder = tmp_path_factory.mktemp("style")
    with Image.open(demo_images_dir() / "03.jpg") as image:
        image = image.convert("RGB")
        width, height = image.size
        image.resize((96, 96)).save(folder / "a.png")
        image.crop((0, 0, width // 2, height // 2)).resize((96, 96)).save(folder / "b.png")
        image.crop((width // 2, height // 2, width, height)).resize((96, 96)).save(folder / "c.png")
    return folder


def _concepts_file(folder: Path, train_images: Path, style_images: Path) -> Path:
    path = folder / "concepts.toml"
    path.write_text(
        f"""
[[concept]]
placeholder_token = "<cat-toy>"
initializer_token = "toy"
train_data_dir = "{train_images}"

[[concept]]
placeholder_token = "<my-style>"
initializer_token = "painting"
num_vectors = 2
learnable_property = "style"
train_data_dir = "{style_images}"
repeats = 7
""",
        encoding="utf-8",
    )
    return path


def _vectors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.slow
def test_two_words_learn_as_each_would_alone_in_their_own_files_and_rows(
    tiny_model: Path, train_images: Path, style_images: Path, tmp_path: Path
) -> None:
    concepts = _concepts_file(tmp_path, train_images, style_images)
    settings = dict(FAST, only_save_embeds=False, save_steps=2, eval_steps=2, eval_samples=2)
    both = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "both", concepts=str(concepts), **settings),
        show_progress=False,
    )
    out = tmp_path / "both"
    names = sorted(path.name for path in out.glob("learned_embeds*"))
    assert names == [
        "learned_embeds-cat-toy-best.safetensors",
        "learned_embeds-cat-toy-steps-2.safetensors",
        "learned_embeds-cat-toy.safetensors",
        "learned_embeds-my-style-best.safetensors",
        "learned_embeds-my-style-steps-2.safetensors",
        "learned_embeds-my-style.safetensors",
    ]
    cat, style = (
        _vectors(out / "learned_embeds-cat-toy.safetensors"),
        _vectors(out / "learned_embeds-my-style.safetensors"),
    )
    assert set(cat) == {"<cat-toy>"} and set(style) == {"<my-style>"} and style["<my-style>"].shape[0] == 2
    with safe_open(str(out / "learned_embeds-my-style.safetensors"), "pt") as handle:
        assert handle.metadata()["modelspec.trigger_phrase"] == "<my-style>"

    # Each word alone, with the seed its stream has in the two-word run (the run's seed + its place in the file).
    alone_cat = textinv.train(train_config(tiny_model, train_images, tmp_path / "cat", **settings), show_progress=False)
    alone_style = textinv.train(
        train_config(
            tiny_model,
            style_images,
            tmp_path / "style",
            placeholder_token="<my-style>",
            initializer_token="painting",
            num_vectors=2,
            learnable_property="style",
            repeats=7,
            seed=43,
            **settings,
        ),
        show_progress=False,
    )
    assert torch.equal(cat["<cat-toy>"], alone_cat.embedding.vectors["text_encoder"])
    assert torch.equal(style["<my-style>"], alone_style.embedding.vectors["text_encoder"])
    assert both.losses == pytest.approx([(a + b) / 2 for a, b in zip(alone_cat.losses, alone_style.losses)], rel=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert [word["eval"]["losses"] for word in record["concepts"]] == [
        json.loads((tmp_path / name / "run.json").read_text())["eval"]["losses"] for name in ("cat", "style")
    ]

    # The saved pipeline: every base row as it was, each word's rows its file's vectors.
    from transformers import CLIPTextModel, CLIPTokenizer

    base = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").get_input_embeddings().weight
    saved = CLIPTextModel.from_pretrained(out / "text_encoder").get_input_embeddings().weight
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert torch.equal(saved[: base.shape[0]], base)
    assert saved.shape[0] == base.shape[0] + 3
    ids = tokenizer.convert_tokens_to_ids(["<cat-toy>", "<my-style>", "<my-style>_1"])
    assert torch.equal(saved[ids[0]], cat["<cat-toy>"][0])
    assert torch.equal(saved[ids[1:]], style["<my-style>"])


@pytest.mark.slow
def test_each_words_file_loads_alone_in_diffusers(
    tiny_model: Path, train_images: Path, style_images: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    concepts = _concepts_file(tmp_path, train_images, style_images)
    textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", concepts=str(concepts), eval_steps=0, **FAST),
        show_progress=False,
    )
    for name, tokens in (("cat-toy", ["<cat-toy>"]), ("my-style", ["<my-style>", "<my-style>_1"])):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        file = tmp_path / "out" / f"learned_embeds-{name}.safetensors"
        pipe.load_textual_inversion(str(file))
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
        rows = pipe.text_encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, _vectors(file)[tokens[0]])
        other = "<my-style>" if name == "cat-toy" else "<cat-toy>"
        assert other not in pipe.tokenizer.get_vocab()  # the file holds its own word only


@pytest.mark.slow
def test_resume_with_two_words_equals_the_uninterrupted_run(
    tiny_model: Path, train_images: Path, style_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concepts = _concepts_file(tmp_path, train_images, style_images)
    settings = dict(
        FAST, max_train_steps=5, checkpointing_steps=2, eval_steps=2, eval_samples=2, concepts=str(concepts)
    )
    full = textinv.train(train_config(tiny_model, train_images, tmp_path / "full", **settings), show_progress=False)
    sigint_on_loss_call(monkeypatch, 7)  # step 4's first word (two loss calls a step)
    with pytest.raises(TrainingInterrupted) as stopped:
        textinv.train(train_config(tiny_model, train_images, tmp_path / "cut", **settings), show_progress=False)
    monkeypatch.undo()
    assert stopped.value.step == 4
    resumed = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "cut", resume_from_checkpoint="latest", **settings),
        show_progress=False,
    )
    assert resumed.losses == full.losses
    for name in ("cat-toy", "my-style"):
        for tag in ("", "-best"):
            file = f"learned_embeds-{name}{tag}.safetensors"
            assert _vectors(tmp_path / "cut" / file).keys() == _vectors(tmp_path / "full" / file).keys()
            for token, vectors in _vectors(tmp_path / "cut" / file).items():
                assert torch.equal(vectors, _vectors(tmp_path / "full" / file)[token]), file


@pytest.mark.slow
def test_a_converged_word_freezes_while_the_other_goes_on(
    tiny_model: Path, train_images: Path, style_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textinv.training.held_out import HeldOutEvaluation

    # The style word's curve "converges" at its step-2 evaluation; the cat word's never does.
    def scripted(self: Any) -> bool:
        return "my-style" in self.best_file and self.history[-1][0] >= 2

    monkeypatch.setattr(HeldOutEvaluation, "converged", scripted)
    concepts = _concepts_file(tmp_path, train_images, style_images)
    settings = dict(FAST, max_train_steps=6, eval_steps=2, eval_samples=2, save_steps=2, checkpointing_steps=2)
    result = textinv.train(
        train_config(
            tiny_model, train_images, tmp_path / "out", concepts=str(concepts), stop_when_converged=True, **settings
        ),
        show_progress=False,
    )
    out = tmp_path / "out"
    assert result.steps == 6 and result.stop_reason == "max_train_steps"
    record = json.loads((out / "run.json").read_text())
    assert [word.get("stop_step") for word in record["concepts"]] == [None, 2]
    at_two = _vectors(out / "checkpoint-2" / "learned_embeds-my-style.safetensors")["<my-style>"]
    assert torch.equal(_vectors(out / "learned_embeds-my-style.safetensors")["<my-style>"], at_two)
    assert not (out / "learned_embeds-my-style-steps-4.safetensors").exists()  # a frozen word writes no snapshots
    cat_at_two = _vectors(out / "checkpoint-2" / "learned_embeds-cat-toy.safetensors")["<cat-toy>"]
    assert not torch.equal(_vectors(out / "learned_embeds-cat-toy.safetensors")["<cat-toy>"], cat_at_two)
    assert [step for step, _ in record["concepts"][1]["eval"]["losses"]] == [0, 2]
    assert [step for step, _ in record["concepts"][0]["eval"]["losses"]] == [0, 2, 4, 6]
    assert "<my-style>: wrote" in result.summary and "stopped at step 2" in result.summary


@pytest.mark.slow
def test_validation_prompts_may_name_every_word_and_an_unnamed_word_is_warned_of(
    tiny_model: Path, train_images: Path, style_images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    concepts = _concepts_file(tmp_path, train_images, style_images)
    validation = dict(validation_steps=2, num_validation_images=1, validation_num_inference_steps=1, eval_steps=0)
    prompts = ["a <cat-toy> in <my-style>", "a <cat-toy>"]
    with caplog.at_level("WARNING"):
        textinv.train(
            train_config(
                tiny_model,
                train_images,
                tmp_path / "out",
                concepts=str(concepts),
                validation_prompt=prompts,
                **validation,
                **dict(FAST, max_train_steps=2),
            ),
            show_progress=False,
        )
    assert not [r for r in caplog.records if "no --validation_prompt names" in r.getMessage()]
    assert sorted(p.name for p in (tmp_path / "out" / "validation" / "step-000002").glob("*.png")) == [
        "prompt0-seed42.png",
        "prompt1-seed42.png",
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        textinv.train(
            train_config(
                tiny_model,
                train_images,
                tmp_path / "one",
                concepts=str(concepts),
                validation_prompt=prompts[1:],
                **validation,
                **dict(FAST, max_train_steps=2),
            ),
            show_progress=False,
        )
    assert [r.getMessage() for r in caplog.records if "no --validation_prompt" in r.getMessage()] == [
        "no --validation_prompt names <my-style>: its progress is not shown"
    ]
