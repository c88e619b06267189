"""Pivotal tuning (issue 26, in progress): the word and a LoRA of the denoiser trained together (--lora_rank)."""

from __future__ import annotations

import json
import shutil
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

    recipe_instance = _keep_recipes(monkeypatch)
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
    # Once frozen, the backward pass no longer runs through the text encoder, and nothing else changes for that.
    assert not recipe_instance[0].trainable.vectors.requires_grad
    seen.clear()
    real_freeze = recipe.freeze_embedding_past
    monkeypatch.setattr(recipe, "freeze_embedding_past", lambda t, s, f, stop: real_freeze(t, s, f, False))
    textinv.train(
        train_config(tiny_model, train_images, tmp_path / "kept", **PIVOTAL, embedding_train_frac=0.5),
        show_progress=False,
        observers=[Watch()],
    )
    assert recipe_instance[1].trainable.vectors.requires_grad  # the gradient was kept this time
    assert torch.equal(seen[-1][0], vectors[-1])
    assert all(torch.equal(seen[-1][1][k], adapters[-1][k]) for k in adapters[-1])


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


# --- the best step's and the snapshots' LoRA files --------------------------------------------------------------------
# 6 steps, eval_loss at 0, 2, 4, 6 (scripted below), a snapshot at 2 and 4.
TAGGED = {**PIVOTAL, "eval_steps": 2, "eval_samples": 4, "save_steps": 2}
BEST_LORA_FILES = ["pytorch_lora_weights-best.safetensors", "learned_embeds_lora-best.safetensors"]


def _script_eval_loss(monkeypatch: pytest.MonkeyPatch, values: list[float], samples: int) -> None:
    """Each evaluation's eval_loss, in order (the held-out sum is the mean times the samples)."""
    from textinv.training import held_out

    curve = iter(values)
    monkeypatch.setattr(held_out, "held_out_sum", lambda *args, **kwargs: next(curve) * samples)


def _keep_recipes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    kept: list[Any] = []
    real_init = recipe.TrainingRecipe.__init__

    def keep(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        kept.append(self)

    monkeypatch.setattr(recipe.TrainingRecipe, "__init__", keep)
    return kept


class _EachStep(textinv.events.TrainObserver):
    """The UNet's adapters (PEFT's names) and the word after each step; at the start, what the run starts from."""

    def __init__(self, recipes: list[Any]) -> None:
        self.recipes = recipes
        self.adapters: dict[int, dict[str, torch.Tensor]] = {}
        self.words: dict[int, torch.Tensor] = {}

    def on_start(self, run: Any) -> None:
        self.keep(run, run.start_step)

    def on_step(self, run: Any, state: Any) -> None:
        self.keep(run, state.step)

    def keep(self, run: Any, step: int) -> None:
        self.adapters[step] = self.recipes[-1].lora.state_dict()["unet"]
        self.words[step] = run.trainable.vectors.detach().clone()


def _diffusers_adapters(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def _bundle(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A kohya bundle's down/up matrices in PEFT's names (lora_A/lora_B), and its word."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    word = state.pop("bundle_emb.<cat-toy>.string_to_param.*")
    matrices = {}
    for key, value in state.items():
        if not key.endswith(".alpha"):
            module, kind = key.removeprefix("lora_unet_").split(".", 1)
            matrices[(module, "lora_A" if kind == "lora_down.weight" else "lora_B")] = value
    return matrices, word


def _as_kohya(adapters: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (key.rsplit(".lora_", 1)[0].replace(".", "_"), "lora_" + key.rsplit(".lora_", 1)[1][0]): value
        for key, value in adapters.items()
    }


def _same_bundle(path: Path, adapters: dict[str, torch.Tensor], word: torch.Tensor) -> bool:
    matrices, bundled = _bundle(path)
    expected = _as_kohya(adapters)
    same_matrices = set(matrices) == set(expected) and all(torch.equal(matrices[k], expected[k]) for k in matrices)
    return same_matrices and torch.equal(bundled, word)


@pytest.mark.slow
def test_the_best_step_and_each_snapshot_leave_their_own_lora(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from textinv.inference.generation import load_lora

    _script_eval_loss(monkeypatch, [1.0, 0.5, 0.7, 0.6], TAGGED["eval_samples"])  # steps 0, 2, 4, 6: best at 2
    watch = _EachStep(_keep_recipes(monkeypatch))
    result = textinv.train(
        train_config(tiny_model, train_images, tmp_path / "out", **TAGGED), show_progress=False, observers=[watch]
    )
    out = result.output_dir
    record = json.loads((out / "run.json").read_text())
    assert record["eval"]["best_step"] == 2 and record["eval"]["best_lora_files"] == BEST_LORA_FILES
    assert set(BEST_LORA_FILES) <= set(record["outputs"])
    # The best word's adapters are step 2's, not the run's last ones.
    best = _diffusers_adapters(out / "pytorch_lora_weights-best.safetensors")
    assert _same(best, watch.adapters[2])
    assert _same(_diffusers_adapters(out / "pytorch_lora_weights.safetensors"), watch.adapters[6])
    assert not _same(best, watch.adapters[6])
    assert torch.equal(load_file(str(out / "learned_embeds-best.safetensors"))["<cat-toy>"], watch.words[2])
    assert _same_bundle(out / "learned_embeds_lora-best.safetensors", watch.adapters[2], watch.words[2])
    # Each snapshot's LoRA files are its step's, the word bundled the snapshot's; none for the last step.
    for step in (2, 4):
        assert _same(_diffusers_adapters(out / f"pytorch_lora_weights-steps-{step}.safetensors"), watch.adapters[step])
        word = load_file(str(out / f"learned_embeds-steps-{step}.safetensors"))["<cat-toy>"]
        assert torch.equal(word, watch.words[step])
        assert _same_bundle(out / f"learned_embeds_lora-steps-{step}.safetensors", watch.adapters[step], word)
        assert {
            f"pytorch_lora_weights-steps-{step}.safetensors",
            f"learned_embeds_lora-steps-{step}.safetensors",
        } <= set(record["outputs"])
    assert not any("steps-6" in path.name for path in out.iterdir())
    # diffusers loads the best one by its name; textinv's --lora loads the best bundle with the best adapters.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights-best.safetensors")
    assert _same(get_peft_model_state_dict(pipe.unet, adapter_name="default_0"), watch.adapters[2])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert load_lora(pipe, out / "learned_embeds_lora-best.safetensors") == ["<cat-toy>"]
    assert _same(get_peft_model_state_dict(pipe.unet, adapter_name="textinv"), watch.adapters[2])


class _StopAfter(textinv.events.TrainObserver):
    """Asks the run to stop after ``step`` (as SIGINT does): it writes a checkpoint and its files there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Any, state: Any) -> None:
        if state.step == self.step:
            run.request_stop()


class _CopyBestFilesAtStart(textinv.events.TrainObserver):
    """Copies the best step's files as they are when the run starts (after a resume has read its checkpoint)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_start(self, run: Any) -> None:
        self.folder.mkdir()
        for name in ["learned_embeds-best.safetensors", *BEST_LORA_FILES]:
            shutil.copyfile(run.output_dir / name, self.folder / name)


@pytest.mark.slow
def test_a_resume_puts_the_best_lora_back_to_the_checkpoints_best_step(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    settings = {**PIVOTAL, "eval_steps": 1, "eval_samples": 4, "checkpointing_steps": 2}
    out = tmp_path / "out"
    # Steps 0-5: the best at step 2 until step 5 beats it; the run stops after step 5.
    _script_eval_loss(monkeypatch, [1.0, 0.9, 0.5, 0.8, 0.7, 0.4], 4)
    watch = _EachStep(_keep_recipes(monkeypatch))
    with pytest.raises(TrainingInterrupted):
        textinv.train(
            train_config(tiny_model, train_images, out, **settings),
            show_progress=False,
            observers=[watch, _StopAfter(5)],
        )
    assert _same_bundle(out / "learned_embeds_lora-best.safetensors", watch.adapters[5], watch.words[5])
    assert not _same(watch.adapters[5], watch.adapters[2])
    # Resumed from checkpoint-4, whose best is step 2: the best files go back to step 2's word and adapters, and
    # stay so to the end (steps 5 and 6 again, no new best).
    _script_eval_loss(monkeypatch, [0.6, 0.55], 4)
    at_start = _CopyBestFilesAtStart(tmp_path / "at_start")
    textinv.train(
        train_config(tiny_model, train_images, out, **settings, resume_from_checkpoint=str(out / "checkpoint-4")),
        show_progress=False,
        observers=[at_start],
    )
    for folder in (at_start.folder, out):
        assert _same(_diffusers_adapters(folder / "pytorch_lora_weights-best.safetensors"), watch.adapters[2])
        assert _same_bundle(folder / "learned_embeds_lora-best.safetensors", watch.adapters[2], watch.words[2])
        assert torch.equal(load_file(str(folder / "learned_embeds-best.safetensors"))["<cat-toy>"], watch.words[2])
    assert json.loads((out / "run.json").read_text())["eval"]["best_step"] == 2
    assert not _same(_diffusers_adapters(out / "pytorch_lora_weights.safetensors"), watch.adapters[2])


@pytest.mark.slow
def test_lora_rank_0_writes_no_lora_file_and_keeps_the_checkpoint_layout(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    settings = {**TAGGED, "lora_rank": 0, "checkpointing_steps": 2}
    settings.pop("lora_learning_rate")
    result = textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **settings), show_progress=False)
    out = result.output_dir
    written = [path.relative_to(out).as_posix() for path in out.rglob("*")]
    assert "learned_embeds-best.safetensors" in written and "learned_embeds-steps-4.safetensors" in written
    assert [name for name in written if "lora" in name] == []
    state = torch.load(out / "checkpoint-4" / "state.pt", weights_only=True)
    assert set(state["held_out"]) == {"samples", "history", "best_step", "best_loss", "best_vectors"}
    assert state["lora"] == {}
    assert "best_lora_files" not in json.loads((out / "run.json").read_text())["eval"]


@pytest.mark.slow
def test_overwriting_a_pivotal_run_without_lora_leaves_no_old_adapter(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    textinv.train(train_config(tiny_model, train_images, out, **{**PIVOTAL, "max_train_steps": 2}), show_progress=False)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "learned_embeds_lora.safetensors").is_file()
    textinv.train(
        train_config(tiny_model, train_images, out, max_train_steps=2, overwrite_output_dir=True), show_progress=False
    )
    # generate --lora <folder> would otherwise pair the old run's adapters with the new word.
    assert sorted(path.name for path in out.glob("*lora*")) == []
    assert (out / "learned_embeds.safetensors").is_file()
