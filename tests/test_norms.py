"""The size of the learned vectors (issue 27): --preserve_embedding_norm holds every vector at its encoder's median
vocabulary-row norm, --max_embedding_norm X caps it at X times that median; both recorded in run.json, the run
identity and the model card; bad values are one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import textinv
from conftest import train_config
from textinv import cli
from textinv.training.norms import apply_norm_rule, vocabulary_medians

REQUIRED = [
    "--pretrained_model_name_or_path=m",
    "--train_data_dir=d",
    "--placeholder_token=<t>",
    "--initializer_token=toy",
]
FAST = dict(max_train_steps=4, num_vectors=2, only_save_embeds=True, report_to="none")


def _vocabulary(model: Path) -> torch.Tensor:
    """The base text encoder's vocabulary rows (the placeholder is added after them)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    rows = CLIPTextModel.from_pretrained(model / "text_encoder").get_input_embeddings().weight.detach()
    return rows[: len(CLIPTokenizer.from_pretrained(model / "tokenizer"))]


def _saved_vectors(out: Path) -> dict[str, torch.Tensor]:
    """Every embedding file the run wrote: the last, snapshots, the best, the checkpoints'."""
    files = [*out.glob("learned_embeds*.safetensors"), *out.glob("checkpoint-*/learned_embeds.safetensors")]
    return {str(path.relative_to(out)): load_file(str(path))["<cat-toy>"] for path in files}


@pytest.mark.slow
def test_preserve_embedding_norm_holds_every_saved_vector_at_the_vocabulary_median(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    rows = _vocabulary(tiny_model)
    median = float(rows.norm(dim=1).median())
    settings = {**FAST, "save_steps": 2, "checkpointing_steps": 3, "eval_steps": 2, "eval_samples": 2}
    config = train_config(tiny_model, train_images, tmp_path / "out", preserve_embedding_norm=True, **settings)
    textinv.train(config, show_progress=False)
    out = tmp_path / "out"
    saved = _saved_vectors(out)
    names = {"learned_embeds.safetensors", "learned_embeds-steps-2.safetensors", "learned_embeds-best.safetensors"}
    assert names | {"checkpoint-3/learned_embeds.safetensors"} == set(saved)
    for name, vectors in saved.items():
        assert vectors.shape == (2, rows.shape[1])
        assert torch.allclose(vectors.norm(dim=1), torch.full((2,), median), atol=1e-5, rtol=0), name
    # Without the rule the same run's vectors are not at the median: the test could fail.
    free = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "free", **FAST, eval_steps=0), show_progress=False
    )
    assert (free.embedding.vectors["text_encoder"].norm(dim=1) - median).abs().min() > 1e-3

    record = json.loads((out / "run.json").read_text())
    assert record["config"]["preserve_embedding_norm"] is True and record["config"]["max_embedding_norm"] is None
    assert record["identity"]["embedding_norm"] == record["embedding_norm"]
    assert record["embedding_norm"]["rule"] == "preserve" and record["embedding_norm"]["multiple"] == 1.0
    card = (out / "README.md").read_text()
    assert "| vector norm | held at its text encoder's median vocabulary-row norm, after every step |" in card


@pytest.mark.slow
def test_max_embedding_norm_caps_at_a_multiple_of_the_median_and_only_scales_down(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    median = float(_vocabulary(tiny_model).norm(dim=1).median())
    # A high learning rate makes the vectors outgrow the vocabulary, so a cap at 1.2x the median binds.
    fast = {**FAST, "learning_rate": 5e-2, "eval_steps": 0}
    free = textinv.train(train_config(tiny_model, train_images, tmp_path / "free", **fast), show_progress=False)
    free_norms = free.embedding.vectors["text_encoder"].norm(dim=1)
    assert (free_norms > 1.2 * median + 1e-3).all()
    capped = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "capped", max_embedding_norm=1.2, **fast), show_progress=False
    )
    norms = capped.embedding.vectors["text_encoder"].norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 1.2 * median), atol=1e-5, rtol=0)
    # A cap the vectors never reach changes nothing, bit for bit.
    loose = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "loose", max_embedding_norm=1000.0, **fast),
        show_progress=False,
    )
    assert torch.equal(loose.embedding.vectors["text_encoder"], free.embedding.vectors["text_encoder"])
    record = json.loads((tmp_path / "capped" / "run.json").read_text())
    assert record["config"]["max_embedding_norm"] == 1.2
    assert record["identity"]["embedding_norm"] == {"rule": "max", "multiple": 1.2, "of": "median vocabulary-row norm"}
    assert "| vector norm | at most 1.2 x its text encoder's median" in (tmp_path / "capped" / "README.md").read_text()
    assert json.loads((tmp_path / "free" / "run.json").read_text())["identity"]["embedding_norm"] is None


class _Encoder(torch.nn.Module):
    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding.from_pretrained(rows)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embeddings


class _Trainable(torch.nn.Module):
    """The parts of TrainableTextEncoders the rule reads: two encoders of very different row sizes (CLIP-L, T5)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.encoders = {
            "text_encoder": _Encoder(torch.randn(50, 8, generator=generator) * 0.02),
            "text_encoder_3": _Encoder(torch.randn(60, 16, generator=generator) * 3.0),
        }
        # The placeholder's rows were added at the end: 48 and 57 rows are the vocabulary.
        self.tokens = {"text_encoder": SimpleNamespace(first_id=48), "text_encoder_3": SimpleNamespace(first_id=57)}
        self.parts = SimpleNamespace(
            text_encoders=[SimpleNamespace(name=name, text_encoder=e) for name, e in self.encoders.items()]
        )
        self.vectors = {
            "text_encoder": torch.nn.Parameter(torch.randn(2, 8, generator=generator)),
            "text_encoder_3": torch.nn.Parameter(torch.randn(3, 16, generator=generator) * 0.01),
        }

    def vectors_by_encoder(self) -> dict[str, Any]:
        return dict(self.vectors)


def test_each_encoder_has_its_own_median_from_its_vocabulary_rows_only() -> None:
    trainable = _Trainable()
    expected = {
        name: float(encoder.embeddings.weight[: trainable.tokens[name].first_id].norm(dim=1).median())
        for name, encoder in trainable.encoders.items()
    }
    assert vocabulary_medians(trainable) == pytest.approx(expected, rel=1e-6)
    assert expected["text_encoder_3"] > 100 * expected["text_encoder"]
    directions = {name: v.detach() / v.detach().norm(dim=1, keepdim=True) for name, v in trainable.vectors.items()}
    apply_norm_rule({"rule": "preserve", "multiple": 1.0}, trainable)
    for name, vectors in trainable.vectors.items():
        assert torch.allclose(vectors.norm(dim=1), torch.full((len(vectors),), expected[name]), rtol=1e-6, atol=0)
        assert torch.allclose(vectors / vectors.norm(dim=1, keepdim=True), directions[name], atol=1e-6)  # only scaled
    # The cap leaves short vectors as they are and brings long ones down.
    trainable.vectors["text_encoder"].data[0] *= 0.5
    trainable.vectors["text_encoder"].data[1] *= 4.0
    before = trainable.vectors["text_encoder"].detach().clone()
    apply_norm_rule({"rule": "max", "multiple": 2.0}, trainable)
    after = trainable.vectors["text_encoder"].detach()
    assert torch.equal(after[0], before[0])
    assert after[1].norm().item() == pytest.approx(2.0 * expected["text_encoder"], rel=1e-6)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max_embedding_norm", "0"], "--max_embedding_norm 0.0 must be a number > 0"),
        (["--max_embedding_norm", "-1.5"], "--max_embedding_norm -1.5 must be a number > 0"),
        (["--max_embedding_norm", "nan"], "--max_embedding_norm nan must be a number > 0"),
        (["--max_embedding_norm", "inf"], "--max_embedding_norm inf must be a number > 0"),
        (["--preserve_embedding_norm", "--max_embedding_norm", "1.5"], "give one of them"),
    ],
)
def test_bad_norm_options_are_one_line_exit_2(
    flags: list[str], fragment: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    assert cli.main(["train", *REQUIRED, f"--output_dir={tmp_path}", *flags]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("textinv: error: ") and fragment in lines[0], lines


def test_the_norm_flags_reach_the_config_from_the_cli_and_the_root_script() -> None:
    for defaults in (None, cli.SCRIPT_DEFAULTS):
        parser = cli.build_parser(defaults)
        config = cli.config_from_args(parser.parse_args(["train", *REQUIRED, "--max_embedding_norm=1.5"]))
        assert (config.preserve_embedding_norm, config.max_embedding_norm) == (False, 1.5)
        config = cli.config_from_args(parser.parse_args(["train", *REQUIRED, "--preserve_embedding_norm"]))
        assert config.embedding_norm_settings == {
            "rule": "preserve",
            "multiple": 1.0,
            "of": "median vocabulary-row norm",
        }
