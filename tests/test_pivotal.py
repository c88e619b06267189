"""Pivotal tuning (issue 26, in progress): the word and a LoRA of the denoiser trained together (--lora_rank)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import textinv
from conftest import REPO, sigint_on_loss_call, train_config
from textinv.config import TrainingInterrupted, UserError
from textinv.training import recipe

PIVOTAL = dict(lora_rank=4, lora_learning_rate=1e-2, max_train_steps=6, only_save_embeds=True, eval_steps=0)


@pytest.mark.slow
def test_lora_rank_0_changes_nothing(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    """The default is plain textual inversion: the same vectors, bit for bit, with or without the LoRA flags' defaults."""
    plain = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "a", max_train_steps=4), show_progress=False
    )
    zero = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "b", max_train_steps=4, lora_rank=0), show_progress=False
    )
    assert torch.equal(plain.embedding.vectors["text_encoder"], zero.embedding.vectors["text_encoder"])
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((tmp_path / "b" / "run.json").read_text())["identity"]["lora"] is None


@pytest.mark.slow
def test_diffusers_load_lora_weights_gives_the_trained_denoiser(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from textinv.models.loading import load_model_parts

    captured: dict[str, Any] = {}

    class Keep(textinv.events.TrainObserver):
        def on_end(self, run: Any, result: Any) -> None:
            captured["unet"] = run.parts.denoiser

    # alpha != rank: the file must carry its scale (diffusers assumes alpha = rank without the adapter metadata).
    config = train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL, lora_alpha=2.0)
    result = textinv.train(config, show_progress=False, observers=[Keep()])
    out = result.output_dir
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out)  # reads pytorch_lora_weights.safetensors
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((2, 4, 8, 8), generator=generator)
    hidden = torch.randn((2, 77, 32), generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        theirs = pipe.unet(noisy, timesteps, hidden).sample
        ours = captured["unet"](noisy, timesteps, hidden).sample
        base = load_model_parts(str(tiny_model)).denoiser(noisy, timesteps, hidden).sample
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert not torch.allclose(base, ours, atol=1e-4)  # the adapters moved


@pytest.mark.slow
def test_the_bundled_file_holds_kohyas_keys_the_alpha_and_the_word(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    result = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL, lora_alpha=2.0), show_progress=False
    )
    with safe_open(str(result.output_dir / "learned_embeds_lora.safetensors"), "pt") as bundle:
        keys = set(bundle.keys())
        word = bundle.get_tensor("bundle_emb.<cat-toy>.string_to_param.*")
        alphas = {bundle.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
        metadata = bundle.metadata()
    assert torch.equal(word, result.embedding.vectors["text_encoder"])
    assert alphas == {2.0} and metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    downs = sorted(key for key in keys if key.endswith(".lora_down.weight"))
    # kohya's names: lora_unet_ + the diffusers module path with underscores; one pair and an alpha per module.
    assert downs and all(
        key.startswith("lora_unet_") and "." not in key.split(".")[0][len("lora_unet_") :] for key in downs
    )
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert len(keys) == 3 * len(downs) + 1


@pytest.mark.slow
def test_embedding_train_frac_freezes_the_word_while_the_lora_goes_on(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    class Watch(textinv.events.TrainObserver):
        def on_step(self, run: Any, state: Any) -> None:
            lora = recipe_instance[0].lora
            seen.append(
                (run.trainable.vectors.detach().clone(), {k: v.clone() for k, v in lora.state_dict()["unet"].items()})
            )

    recipe_instance: list[Any] = []
    real_init = recipe.TrainingRecipe.__init__

    def keep(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        recipe_instance.append(self)

    monkeypatch.setattr(recipe.TrainingRecipe, "__init__", keep)
    textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL, embedding_train_frac=0.5),
        show_progress=False,
        observers=[Watch()],
    )
    vectors = [v for v, _ in seen]
    adapters = [a for _, a in seen]
    assert not torch.equal(vectors[2], vectors[1])  # step 3 (the last of half of 6) still moves the word
    assert all(torch.equal(vectors[i], vectors[2]) for i in range(3, 6))  # steps 4-6 leave it
    assert all(any(not torch.equal(adapters[i][k], adapters[i - 1][k]) for k in adapters[i]) for i in range(3, 6))


@pytest.mark.slow
def test_resume_with_lora_equals_an_uninterrupted_run(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**PIVOTAL, "lr_scheduler": "cosine", "checkpointing_steps": 100, "seed": 5}
    full = textinv.train(train_config(tiny_model, train_images, tmp_path / "full", **settings), show_progress=False)
    sigint_on_loss_call(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        textinv.train(train_config(tiny_model, train_images, tmp_path / "cut", **settings), show_progress=False)
    monkeypatch.undo()
    # A stopped run leaves its LoRA beside its word, as it leaves the word.
    stopped = {p.name for p in (tmp_path / "cut").iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "learned_embeds_lora.safetensors",
        "learned_embeds.safetensors",
    } <= stopped
    resumed = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "cut", **settings, resume_from_checkpoint="latest"),
        show_progress=False,
    )
    assert torch.equal(resumed.embedding.vectors["text_encoder"], full.embedding.vectors["text_encoder"])
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds_lora.safetensors"):
        with safe_open(str(tmp_path / "full" / name), "pt") as a, safe_open(str(tmp_path / "cut" / name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())
    # Another LoRA setting is another run: a resume with it is refused.
    with pytest.raises(UserError, match="lora"):
        textinv.train(
            train_config(
                tiny_model,
                train_images,
                tmp_path / "cut",
                **{**settings, "lora_rank": 8},
                resume_from_checkpoint="latest",
            ),
            show_progress=False,
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank", "-1"], "textinv: error: --lora_rank -1 must be >= 0 (e.g. 4; 0 = plain textual inversion)"),
        (
            ["--lora_alpha", "8"],
            "textinv: error: --lora_alpha needs --lora_rank: add e.g. --lora_rank 4 to train a LoRA with the word",
        ),
        (
            ["--lora_rank", "4", "--embedding_train_frac", "0"],
            "textinv: error: --embedding_train_frac 0.0 must be in (0, 1], e.g. 0.5",
        ),
    ],
)
def test_bad_lora_flags_are_one_line_exit_2_and_nothing_written(
    flags: list[str], message: str, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "textinv.cli", "train", "--pretrained_model_name_or_path", str(tiny_model)]
    command += ["--train_data_dir", str(train_images), "--placeholder_token", "<x>", "--initializer_token", "toy"]
    done = subprocess.run(
        [*command, "--output_dir", str(out), *flags], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert (done.returncode, done.stderr.strip()) == (2, message)
    assert not out.exists()


def test_a_family_without_the_target_modules_is_refused_in_one_line(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from textinv.models import families

    family = dataclasses.replace(families.get_family("sd1"), lora_targets=("no_such_projection",))
    monkeypatch.setattr(families, "FAMILIES", {**families.FAMILIES, "sd1": family})
    monkeypatch.setattr(families, "SD1", family)
    with pytest.raises(UserError) as refused:
        textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL), show_progress=False)
    assert str(refused.value) == (
        "--lora_rank: this SD 1.x model's unet has none of the modules LoRA targets (no_such_projection); "
        "it cannot take a LoRA, train without --lora_rank"
    )


def _denoiser_inputs(family: Any, denoiser: Any) -> tuple[Any, Any]:
    """Random conditioning of the right shapes for the family's denoiser, and a call at two noise levels."""
    from textinv.models.families.base import DenoiserCall, TextConditioning

    generator = torch.Generator().manual_seed(0)
    config = denoiser.config
    if family.denoiser_slot == "unet":
        pooled_dim = (config.projection_class_embeddings_input_dim or 0) - 6 * (config.addition_time_embed_dim or 0)
        hidden = torch.randn((2, 77, config.cross_attention_dim), generator=generator)
        pooled = torch.randn((2, pooled_dim), generator=generator) if pooled_dim > 0 else None
        steps = torch.tensor([10, 700])
    else:
        hidden = torch.randn((2, 20, config.joint_attention_dim), generator=generator)
        pooled = torch.randn((2, config.pooled_projection_dim), generator=generator)
        steps = torch.tensor([100.0, 900.0])
    noisy = torch.randn((2, family.latent_channels, 8, 8), generator=generator)
    return TextConditioning(hidden, pooled), DenoiserCall(noisy, steps, 8)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["sdxl", "sd3", "flux"])
def test_every_family_saves_a_lora_diffusers_loads_to_the_trained_denoiser(
    family_name: str, train_images: Path, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from textinv.models.families import get_family
    from textinv.models.loading import load_pipeline_folder
    from textinv.tiny import build_tiny_pipeline

    family = get_family(family_name)
    model = build_tiny_pipeline(tmp_path / "model", family=family_name, seed=0)
    captured: dict[str, Any] = {}

    class Keep(textinv.events.TrainObserver):
        def on_end(self, run: Any, result: Any) -> None:
            captured["denoiser"] = run.parts.denoiser

    config = train_config(model, train_images, tmp_path / "out", **{**PIVOTAL, "max_train_steps": 3}, lora_alpha=2.0)
    result = textinv.train(config, show_progress=False, observers=[Keep()])
    pipe = load_pipeline_folder(model)
    pipe.load_lora_weights(result.output_dir)
    theirs = getattr(pipe, family.denoiser_slot)
    conditioning, call = _denoiser_inputs(family, theirs)
    with torch.no_grad():
        expected = family.denoise(SimpleNamespace(denoiser=captured["denoiser"]), conditioning, call)
        got = family.denoise(SimpleNamespace(denoiser=theirs), conditioning, call)
        plain = family.denoise(
            SimpleNamespace(denoiser=getattr(load_pipeline_folder(model), family.denoiser_slot)), conditioning, call
        )
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)
    with safe_open(str(result.output_dir / "learned_embeds_lora.safetensors"), "pt") as bundle:
        keys = list(bundle.keys())
    prefix = "lora_unet_" if family.denoiser_slot == "unet" else "lora_transformer_"
    assert any(key.startswith(prefix) for key in keys)
    assert {key for key in keys if key.startswith("bundle_emb.")} == {
        f"bundle_emb.<cat-toy>.{role}" for role in family.roles
    }


@pytest.mark.slow
def test_generate_loads_the_lora_and_the_word_together(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    from textinv.inference.generation import generate, load_pipeline

    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL), show_progress=False)
    settings: dict[str, Any] = dict(num_inference_steps=2, seed=0, height=64, width=64)
    prompt = "a photo of <cat-toy>"
    word_only = generate(load_pipeline(str(tiny_model), [result.embedding_path]), prompt, **settings).images[0]
    # The run folder: its pytorch_lora_weights.safetensors and its word.
    folder = load_pipeline(str(tiny_model), lora=result.output_dir)
    assert "<cat-toy>" in folder.tokenizer.get_vocab()
    full = generate(folder, prompt, **settings).images[0]
    off = generate(load_pipeline(str(tiny_model), lora=result.output_dir, lora_scale=0.0), prompt, **settings).images[0]
    assert off.tobytes() == word_only.tobytes()  # weight 0: the word alone
    assert full.tobytes() != word_only.tobytes()
    # The kohya bundle alone: the same adapters and the word inside.
    bundle = tmp_path / "elsewhere" / "learned_embeds_lora.safetensors"
    bundle.parent.mkdir()
    bundle.write_bytes((result.output_dir / "learned_embeds_lora.safetensors").read_bytes())
    from_bundle = generate(load_pipeline(str(tiny_model), lora=bundle), prompt, **settings).images[0]
    assert from_bundle.tobytes() == full.tobytes()
    with pytest.raises(UserError, match="no such LoRA file"):
        load_pipeline(str(tiny_model), lora=tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_convert_splits_a_bundle_and_joins_it_back_unchanged(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **PIVOTAL), show_progress=False)
    bundle = result.output_dir / "learned_embeds_lora.safetensors"
    word, lora, joined = tmp_path / "word.safetensors", tmp_path / "lora.safetensors", tmp_path / "joined.safetensors"
    run = [sys.executable, "-m", "textinv.cli", "convert"]
    split = subprocess.run(
        [*run, str(bundle), str(word), "--lora_out", str(lora)], capture_output=True, text=True, cwd=REPO
    )
    assert split.returncode == 0, split.stderr
    assert not any(key.startswith("bundle_emb.") for key in load_file(str(lora)))
    assert torch.equal(load_file(str(word))["<cat-toy>"], result.embedding.vectors["text_encoder"])
    join = subprocess.run([*run, str(word), str(joined), "--lora", str(lora)], capture_output=True, text=True, cwd=REPO)
    assert join.returncode == 0, join.stderr
    original, back = load_file(str(bundle)), load_file(str(joined))
    assert set(original) == set(back) and all(torch.equal(original[key], back[key]) for key in original)
    info = json.loads(
        subprocess.run([*run[:-1], "inspect", str(joined), "--json"], capture_output=True, text=True, cwd=REPO).stdout
    )
    assert info["format"] == "lora-bundle" and info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 4.0
    assert [entry["token"] for entry in info["tokens"]] == ["<cat-toy>"]
