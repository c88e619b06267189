"""Pivotal tuning (issue 26, in progress): the word and a LoRA of the denoiser trained together (--lora_rank)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import textinv
from conftest import REPO, train_config
from textinv.config import TrainingInterrupted, UserError
from textinv.training import loss as loss_module
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
    real = loss_module.denoising_loss
    calls = {"count": 0}

    def loss_with_signal(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "denoising_loss", loss_with_signal)
    with pytest.raises(TrainingInterrupted):
        textinv.train(train_config(tiny_model, train_images, tmp_path / "cut", **settings), show_progress=False)
    monkeypatch.undo()
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
