"""`textinv eval`: the Textual Inversion paper's CLIP image and text similarity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from textinv.cli import main
from textinv.config import UserError
from textinv.embeddings import Embedding, write_embedding
from textinv.inference.evaluation import ClipScorer, load_reference_images, read_prompts, text_without_word


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textinv.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_clip: Path) -> ClipScorer:
    return ClipScorer(str(tiny_clip))


def _unrelated_images() -> list[Image.Image]:
    paintings = sorted((SHARED_DATA / "images" / "style_vangogh").glob("*.jpg"))[:3]
    return [Image.open(path).convert("RGB").resize((96, 96)) for path in paintings]


def _noise_images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(count)]


def test_training_images_score_higher_than_unrelated_images(scorer: ClipScorer, train_images: Path) -> None:
    references = load_reference_images(train_images)
    itself = scorer.image_similarity(references, references)
    assert itself > scorer.image_similarity(_unrelated_images(), references)
    assert itself > scorer.image_similarity(_noise_images(), references)
    assert -1.0 <= scorer.image_similarity(_noise_images(), references) <= 1.0


def test_both_scores_equal_clipmodels_own_cosines(scorer: ClipScorer, tiny_clip: Path, train_images: Path) -> None:
    """CLIP-I and CLIP-T as the paper defines them, computed here with transformers' CLIPModel and CLIPProcessor
    alone: CLIPModel's forward returns unit-length image/text embeddings and logits_per_image = exp(logit_scale) x
    their cosine, so neither number passes through ClipScorer."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    references = load_reference_images(train_images)
    generated = _noise_images(2)
    text = "a toy on the beach"
    with torch.no_grad():
        out = model(**processor(text=[text], images=[*generated, *references], return_tensors="pt", padding=True))
    image_embeds = out.image_embeds  # generated rows first, then the references
    pairwise = image_embeds[:2] @ image_embeds[2:].T
    assert pairwise.shape == (2, 3)
    cosines = out.logits_per_image[:2, 0] / model.logit_scale.detach().exp()
    assert scorer.image_similarity(generated, references) == pytest.approx(float(pairwise.mean()), abs=1e-6)
    assert scorer.text_similarity(generated, text) == pytest.approx(float(cosines.mean()), abs=1e-6)
    # Which text is scored matters: another caption gives another number (0.305 against 0.190 with the tiny CLIP).
    assert scorer.text_similarity(generated, "an oil painting") != pytest.approx(float(cosines.mean()), abs=1e-4)


def test_prompt_files_and_the_text_clip_reads(tmp_path: Path) -> None:
    assert text_without_word("a {} on the beach") == "a on the beach"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# edits\na {} on the beach\n\nan oil painting of {}\n")
    assert read_prompts(prompts) == ["a {} on the beach", "an oil painting of {}"]
    prompts.write_text("a photo on the beach\n")
    with pytest.raises(UserError, match="line 1"):
        read_prompts(prompts)


@pytest.mark.slow
def test_eval_command_prints_both_scores_and_writes_json(
    tiny_model: Path, train_images: Path, tiny_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    embedding_file = write_embedding(
        Embedding(
            token="<cat-toy>", vectors={"text_encoder": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}
        ),
        tmp_path / "learned_embeds.safetensors",
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\na {} in the snow\n")
    out = tmp_path / "scores.json"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model),
            "--embeddings",
            str(embedding_file),
            "--train_data_dir",
            str(train_images),
            "--clip_model",
            str(tiny_clip),
            "--prompts",
            str(prompts),
            "--num_images",
            "2",
            "--num_inference_steps",
            "2",
            "--json",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    scores = json.loads(out.read_text())
    assert f"image similarity {scores['image_similarity']:.4f}" in stdout
    assert f"text similarity  {scores['text_similarity']:.4f}" in stdout
    assert scores["token"] == "<cat-toy>" and scores["num_images"] == 2
    assert [p["prompt"] for p in scores["prompts"]] == ["a <cat-toy> on the beach", "a <cat-toy> in the snow"]
    assert [p["text"] for p in scores["prompts"]] == ["a on the beach", "a in the snow"]
    per_prompt = [p["text_similarity"] for p in scores["prompts"]]
    assert scores["text_similarity"] == pytest.approx(sum(per_prompt) / 2)
    assert all(-1.0 <= value <= 1.0 for value in [scores["image_similarity"], *per_prompt])


def test_eval_with_a_folder_that_is_not_clip_is_one_line(
    tiny_model: Path, train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model),
            "--embeddings",
            str(tmp_path / "x.safetensors"),
            "--train_data_dir",
            str(train_images),
            "--clip_model",
            str(tiny_model),
        ]
    )
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--clip_model" in lines[0] and str(tiny_model) in lines[0], stderr


def _two_word_run(tmp_path: Path, train_images: Path) -> tuple[Path, Path, Path]:
    """A --concepts run's files (random vectors), its TOML and the second word's images (a crop of another photo)."""
    from textinv.tiny import demo_images_dir

    style = tmp_path / "style"
    style.mkdir()
    with Image.open(demo_images_dir() / "03.jpg") as image:
        image.convert("RGB").resize((96, 96)).save(style / "a.png")
        image.convert("RGB").crop((0, 0, 200, 200)).resize((96, 96)).save(style / "b.png")
    run = tmp_path / "run"
    run.mkdir()
    for index, (token, count) in enumerate((("<cat-toy>", 1), ("<my-style>", 2))):
        vectors = torch.randn(count, 32, generator=torch.Generator().manual_seed(index))
        name = token.strip("<>")
        write_embedding(
            Embedding(token=token, vectors={"text_encoder": vectors}), run / f"learned_embeds-{name}.safetensors"
        )
    concepts = tmp_path / "concepts.toml"
    concepts.write_text(
        f'[[concept]]\nplaceholder_token = "<cat-toy>"\ntrain_data_dir = "{train_images}"\n\n'
        f'[[concept]]\nplaceholder_token = "<my-style>"\nnum_vectors = 2\ntrain_data_dir = "style"\n'
    )
    return run, concepts, style


@pytest.mark.slow
def test_eval_scores_every_word_of_a_concepts_run_against_its_own_images(
    tiny_model: Path, train_images: Path, tiny_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from textinv.inference.evaluation import evaluate

    run, concepts, style = _two_word_run(tmp_path, train_images)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\n")
    out = tmp_path / "scores.json"
    settings = [
        "--clip_model",
        str(tiny_clip),
        "--prompts",
        str(prompts),
        "--num_images",
        "1",
        "--num_inference_steps",
        "2",
    ]
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model),
            "--concepts",
            str(concepts),
            "--embeddings",
            str(run),
            *settings,
            "--json",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    scores = json.loads(out.read_text())
    assert list(scores) == ["<cat-toy>", "<my-style>"]
    for token, images in (("<cat-toy>", train_images), ("<my-style>", style)):
        alone = evaluate(
            str(tiny_model),
            run / f"learned_embeds-{token.strip('<>')}.safetensors",
            images,
            prompts=["a {} on the beach"],
            clip_model=str(tiny_clip),
            num_images=1,
            num_inference_steps=2,
        )
        assert scores[token]["image_similarity"] == alone.image_similarity
        assert scores[token]["text_similarity"] == alone.text_similarity
        assert scores[token]["prompts"][0]["prompt"] == f"a {token} on the beach"
        assert f"{token}: image similarity {alone.image_similarity:.4f}" in stdout
    assert scores["<cat-toy>"]["image_similarity"] != scores["<my-style>"]["image_similarity"]


def test_eval_of_a_concepts_run_without_a_words_file_is_one_line(
    tiny_model: Path, train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, concepts, _ = _two_word_run(tmp_path, train_images)
    (run / "learned_embeds-my-style.safetensors").unlink()
    code = main(["eval", "--model", str(tiny_model), "--concepts", str(concepts), "--embeddings", str(run)])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"textinv: error: {run / 'learned_embeds-my-style.safetensors'} does not exist: <my-style> was not trained into "
        f"{str(run)!r}; train with --concepts {concepts} --output_dir {run}"
    ]
