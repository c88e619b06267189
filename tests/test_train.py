"""End-to-end training on the tiny pipeline: what is written, what changes, what loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, same_vectors, train_config
from textinv import train

PROMPT = "a photo of <cat-toy>"


def _hidden_states(pipe, prompt: str) -> torch.Tensor:
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.fixture(scope="module")
def trained_run(tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory):
    """The seed's cat-toy command line, unchanged but for size, through the root script."""
    output_dir = tmp_path_factory.mktemp("run") / "textual_inversion_cat"
    command = [
        sys.executable,
        "-u",
        str(REPO / "train_textual_inversion.py"),
        f"--pretrained_model_name_or_path={tiny_model}",
        f"--train_data_dir={train_images}",
        "--learnable_property=object",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=4",
        "--max_train_steps=20",
        "--learning_rate=5.0e-04",
        "--scale_lr",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--save_steps=10",
        "--seed",
        "42",
        f"--output_dir={output_dir}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir


@pytest.mark.slow
def test_seed_command_line_writes_embedding_snapshots_and_pipeline(trained_run: Path) -> None:
    embeds = load_file(str(trained_run / "learned_embeds.safetensors"))
    assert list(embeds) == ["<cat-toy>"]
    assert embeds["<cat-toy>"].shape == (1, 32) and embeds["<cat-toy>"].dtype == torch.float32
    assert (trained_run / "learned_embeds-steps-10.safetensors").is_file()
    for part in ("model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (trained_run / part).exists(), part
    record = json.loads((trained_run / "run.json").read_text())
    assert record["status"] == "completed" and record["steps_done"] == 20
    # --scale_lr: 5e-4 x batch 1 x accumulation 4 x 1 process
    assert record["effective_learning_rate"] == pytest.approx(2e-3)


@pytest.mark.slow
def test_diffusers_loader_and_full_pipeline_agree(trained_run: Path, tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_ids = base.tokenizer("a photo of a toy").input_ids
    base.load_textual_inversion(str(trained_run))
    saved = StableDiffusionPipeline.from_pretrained(trained_run)
    from_file = _hidden_states(base, PROMPT)
    from_pipeline = _hidden_states(saved, PROMPT)
    assert (from_file - from_pipeline).abs().max() < 1e-5

    plain = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert plain.tokenizer("a photo of a toy").input_ids == base_ids
    # Without the token the prompt tokenizes to pieces of "<cat-toy>": a different conditioning.
    assert (_hidden_states(plain, PROMPT) - from_pipeline).abs().max() > 1e-3


@pytest.mark.slow
def test_textinv_loader_matches_diffusers_loader(trained_run: Path, tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from textinv.embeddings import load_embeddings

    ours = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert load_embeddings(ours, trained_run / "learned_embeds.safetensors") == ["<cat-toy>"]
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model)
    theirs.load_textual_inversion(str(trained_run / "learned_embeds.safetensors"))
    assert torch.equal(_hidden_states(ours, PROMPT), _hidden_states(theirs, PROMPT))


@pytest.mark.slow
def test_only_placeholder_rows_change(trained_run: Path, tiny_model: Path) -> None:
    base = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    # The saved text encoder names its weights text_model.* (ppdiffusers' names, issue 15); the tiny base does not.
    saved = load_file(str(trained_run / "text_encoder" / "model.safetensors"))
    trained = {name.removeprefix("text_model."): tensor for name, tensor in saved.items()}
    assert set(trained) == set(base) and all(name.startswith("text_model.") for name in saved)
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    before, after = base[key], trained[key]
    assert after.shape[0] == before.shape[0] + 1
    assert torch.equal(after[: before.shape[0]], before), "a row other than the placeholder changed"
    toy = 5988  # "toy</w>" in the CLIP vocabulary: the initializer
    assert not torch.equal(after[-1], before[toy]), "the placeholder row did not train"
    learned = load_file(str(trained_run / "learned_embeds.safetensors"))["<cat-toy>"][0]
    assert torch.equal(after[-1], learned)
    # Every other weight of the text encoder, and the other parts, are the base model's bytes.
    for name, tensor in base.items():
        if name != key:
            assert torch.equal(trained[name], tensor), name
    for part in ("unet", "vae"):
        assert (trained_run / part / "diffusion_pytorch_model.safetensors").read_bytes() == (
            tiny_model / part / "diffusion_pytorch_model.safetensors"
        ).read_bytes()


@pytest.mark.slow
def test_same_seed_same_vectors_other_seed_other_vectors(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        config = train_config(
            tiny_model, train_images, tmp_path / name, seed=seed, max_train_steps=8, only_save_embeds=True
        )
        runs[name] = train(config, show_progress=False).embedding.vectors["text_encoder"]
    assert same_vectors(runs["a"], runs["b"])  # bit-identical on the CPU
    assert not torch.equal(runs["a"], runs["c"])


@pytest.mark.slow
def test_multi_vector_token(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    config = train_config(tiny_model, train_images, tmp_path / "out", num_vectors=3, max_train_steps=6)
    result = train(config, show_progress=False)
    vectors = load_file(str(result.embedding_path))["<cat-toy>"]
    assert vectors.shape == (3, 32)
    assert not torch.equal(vectors[0], vectors[1]), "vectors should train apart"
    saved = StableDiffusionPipeline.from_pretrained(result.output_dir)
    assert {"<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"} <= set(saved.tokenizer.get_vocab())
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base.load_textual_inversion(str(result.embedding_path))
    assert (_hidden_states(base, PROMPT) - _hidden_states(saved, PROMPT)).abs().max() < 1e-5


@pytest.mark.slow
def test_only_save_embeds_skips_pipeline_and_snapshots_follow_save_steps(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    config = train_config(
        tiny_model, train_images, tmp_path / "out", max_train_steps=9, save_steps=4, only_save_embeds=True, eval_steps=5
    )
    result = train(config, show_progress=False)
    names = sorted(p.name for p in result.output_dir.iterdir())
    assert names == [
        "README.md",  # the model card
        "learned_embeds-best.safetensors",  # the lowest eval_loss (evaluated at 0, 5 and 9)
        "learned_embeds-steps-4.safetensors",
        "learned_embeds-steps-8.safetensors",
        "learned_embeds.safetensors",
        "logs",  # TensorBoard events (--report_to tensorboard is the default)
        "run.json",
    ]
    step4 = load_file(str(result.output_dir / "learned_embeds-steps-4.safetensors"))["<cat-toy>"]
    final = load_file(str(result.embedding_path))["<cat-toy>"]
    assert not torch.equal(step4, final)


@pytest.mark.slow
def test_epochs_decide_length_when_steps_not_given(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    # 3 images x 2 repeats = 6 examples an epoch; batch 2 -> 3 steps an epoch; 2 epochs -> 6 steps.
    config = train_config(
        tiny_model,
        train_images,
        tmp_path / "out",
        max_train_steps=None,
        num_train_epochs=2,
        repeats=2,
        train_batch_size=2,
        only_save_embeds=True,
    )
    assert train(config, show_progress=False).steps == 6


@pytest.mark.slow
def test_previous_run_is_not_overwritten(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    from textinv.config import UserError

    first = train(
        train_config(tiny_model, train_images, tmp_path / "out", max_train_steps=2, only_save_embeds=True),
        show_progress=False,
    )
    kept = first.embedding_path.read_bytes()
    with pytest.raises(UserError, match="already holds another run"):
        train(train_config(tiny_model, train_images, tmp_path / "out", max_train_steps=2, seed=1), show_progress=False)
    assert first.embedding_path.read_bytes() == kept
    again = train(
        train_config(
            tiny_model,
            train_images,
            tmp_path / "out",
            max_train_steps=2,
            seed=1,
            overwrite_output_dir=True,
            only_save_embeds=True,
        ),
        show_progress=False,
    )
    assert again.embedding_path.read_bytes() != kept


@pytest.mark.slow
def test_python_api_generate_full_pipeline_equals_base_plus_embedding(trained_run: Path, tiny_model: Path) -> None:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    import textinv

    kwargs = dict(num_images=1, num_inference_steps=3, seed=3, height=64, width=64)
    from_output = textinv.generate(str(trained_run), "a <cat-toy> backpack", **kwargs)
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base.set_progress_bar_config(disable=True)
    textinv.load_embeddings(base, trained_run / "learned_embeds.safetensors")
    from_file = textinv.generate(base, "a <cat-toy> backpack", **kwargs)
    a, b = np.asarray(from_output.images[0]), np.asarray(from_file.images[0])
    assert from_output.seeds == [3] and a.shape == (64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
