"""The flow-matching planted concept (bench/planted_flow.py): the teacher's encoder dropout does what it says, and a
briefly pre-trained teacher already scores the true word better than wrong ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the planted teachers live with the benches
from planted_flow import (  # noqa: E402
    INITIAL_WORD,
    FlowScorer,
    FlowTeacherRecipe,
    drop_encoders,
    encoder_outputs,
    plant,
    teacher,
)
from textinv.models.loading import load_model_parts  # noqa: E402
from textinv.tiny import build_tiny_pipeline  # noqa: E402

WRONG_WORDS = ("cat", "beach", "art")  # three of the teacher's other words


def test_encoder_dropout_swaps_in_the_empty_caption_per_encoder(tmp_path: Path) -> None:
    parts = load_model_parts(str(build_tiny_pipeline(tmp_path / "flux", family="flux", seed=0)))
    outputs = encoder_outputs(parts, ["a photo of a toy", "a photo of a dog"])
    empty = encoder_outputs(parts, [""])
    index = torch.tensor([1, 0, 1])
    kept = drop_encoders(parts, outputs, empty, index, {"clip_l": 0.0, "t5xxl": 0.0}, torch.Generator().manual_seed(0))
    assert torch.equal(kept.hidden_states, outputs["t5xxl"].sequence[index])
    assert torch.equal(kept.pooled, outputs["clip_l"].pooled[index])
    dropped = drop_encoders(
        parts, outputs, empty, index, {"clip_l": 1.0, "t5xxl": 1.0}, torch.Generator().manual_seed(0)
    )
    assert torch.equal(dropped.hidden_states, empty["t5xxl"].sequence.expand(3, -1, -1))
    assert torch.equal(dropped.pooled, empty["clip_l"].pooled.expand(3, -1))
    # Half the time: each encoder decides for itself, so some example keeps one encoder and drops the other.
    half = drop_encoders(
        parts,
        outputs,
        empty,
        torch.zeros(64, dtype=torch.long),
        {"clip_l": 0.5, "t5xxl": 0.5},
        torch.Generator().manual_seed(0),
    )
    t5_dropped = (half.hidden_states == empty["t5xxl"].sequence).flatten(1).all(1)
    clip_dropped = (half.pooled == empty["clip_l"].pooled).all(1)
    assert 10 < int(t5_dropped.sum()) < 54 and bool((t5_dropped != clip_dropped).any())


@pytest.mark.slow  # 10-15 s on 2 shared cores: over this file's 20 s budget together with the imports
def test_a_briefly_trained_teacher_scores_the_true_word_best(tmp_path: Path) -> None:
    """An untrained transformer scores the words within ~0.005 of each other, in any order (measured); 40 steps
    of pre-training on SD3 with its CLIP encoders always present put the true word ahead of every other by > 0.05."""
    torch.set_num_threads(1)
    recipe = FlowTeacherRecipe(family="sd3", steps=40, batch_size=16, learning_rate=1e-2, clip_dropout=0.0)
    model_dir, report = teacher(tmp_path, recipe)
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    # CLIP-L and CLIP-G learn the word here; T5 stays frozen (its outputs cached per caption): fast scoring.
    scorer = FlowScorer(plant(model_dir, recipe, seed=0, num_train=4, num_held_out=32), ["clip_l", "clip_g"])
    assert scorer.initial_loss == pytest.approx(scorer.word_loss(INITIAL_WORD))
    for loss in (scorer.initial_loss, *(scorer.word_loss(word) for word in WRONG_WORDS)):
        assert loss - scorer.target_loss > 0.05
