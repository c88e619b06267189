"""What textinv writes for ppdiffusers users, checked without Paddle (issue 15); tests/test_ppdiffusers.py
loads the same files in real ppdiffusers.

- the root train_textual_inversion.py writes learned_embeds(-steps-N).pdparams beside the safetensors files,
  at each --save_steps and only there, atomically (a kill -9 mid-write leaves no torn .pdparams);
- `textinv train` and the Python API keep writing diffusers' file alone unless --embedding_formats says more;
- the saved pipeline's tokenizer holds paddlenlp's files and its text encoder ppdiffusers' weight names,
  while transformers loads it exactly as before;
- --noise_offset: 0 changes nothing, another value adds the documented per-channel offset.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

import textinv
from conftest import REPO, train_config
from textinv.cli import SCRIPT_DEFAULTS, build_parser, config_from_args, main
from textinv.config import UserError
from textinv.data.examples import Example
from textinv.data.latents import LatentCache
from textinv.embeddings import read_embeddings
from textinv.models.families import get_family
from textinv.models.objectives import DenoisingDiffusion
from textinv.training import paddle_layout, run_dir
from textinv.training.export import check_embedding_formats
from textinv.training.loss import LossSettings, denoising_loss, example_draws

TOKEN = "<cat-toy>"
REQUIRED = [
    "--pretrained_model_name_or_path=m",
    "--train_data_dir=d",
    f"--placeholder_token={TOKEN}",
    "--initializer_token=toy",
]


# --- which files, per entry point ---------------------------------------------------------------
def test_root_script_also_writes_pdparams_and_textinv_train_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    script = config_from_args(build_parser(SCRIPT_DEFAULTS).parse_args(["train", *REQUIRED]))
    plain = config_from_args(build_parser().parse_args(["train", *REQUIRED]))
    assert script.embedding_formats == ["diffusers", "pdparams"]
    assert plain.embedding_formats == ["diffusers"] == textinv.TrainConfig("m", "d", TOKEN).embedding_formats
    chosen = build_parser(SCRIPT_DEFAULTS).parse_args(["train", *REQUIRED, "--embedding_formats", "a1111", "diffusers"])
    config = config_from_args(chosen)
    config.validate()
    assert config.embedding_formats == ["diffusers", "a1111"]  # each once, diffusers (the main result) first
    with pytest.raises(SystemExit):
        build_parser(SCRIPT_DEFAULTS).parse_args(["train", "--help"])
    assert "(default: diffusers pdparams)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "(default: diffusers)" in " ".join(capsys.readouterr().out.split())


def test_a_bad_embedding_format_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *REQUIRED, "--embedding_formats", "ckpt"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--embedding_formats" in error and "ckpt" in error and len(error.splitlines()) == 1
    for formats in ([], ["pdparams"]):
        with pytest.raises(UserError, match="embedding_formats"):
            textinv.TrainConfig("m", "d", TOKEN, initializer_token="toy", embedding_formats=formats).validate()
    assert main(["train", *REQUIRED, "--embedding_formats", "pdparams"]) == 2
    error = capsys.readouterr().err.strip()
    assert "must include diffusers" in error and len(error.splitlines()) == 1


def test_two_encoder_models_refuse_one_encoder_formats_before_training() -> None:
    sdxl = SimpleNamespace(text_encoders=[object(), object()], family=get_family("sdxl"))
    check_embedding_formats(["diffusers"], sdxl)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="pdparams holds one text encoder's vectors, but this SDXL model has 2"):
        check_embedding_formats(["diffusers", "pdparams"], sdxl)  # type: ignore[arg-type]


# --- snapshots, and a kill -9 in the middle of writing one ---------------------------------------
# Runs the root script with the .pdparams writer patched to write half its bytes and then SIGKILL its own
# process: a real kill -9, at the worst moment, every time.
KILL_DRIVER = """
import os, pickle, signal, sys
import textinv.embeddings.write as write

real_dump, calls = pickle.dump, {"count": 0}

class KillMidWrite:
    @staticmethod
    def dump(obj, handle, protocol=None):
        calls["count"] += 1
        if calls["count"] == int(os.environ["TEXTINV_TEST_KILL_AT"]):
            data = pickle.dumps(obj, protocol=protocol)
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real_dump(obj, handle, protocol=protocol)

write.pickle = KillMidWrite
from textinv.cli import train_script_main
sys.exit(train_script_main(sys.argv[1:]))
"""
SAVE_STEPS, MAX_STEPS = 2, 6


def _script_flags(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={images}", f"--placeholder_token={TOKEN}",
        "--initializer_token=toy", "--resolution=64", "--train_batch_size=1", "--learning_rate=5e-3",
        "--lr_warmup_steps=0", "--seed=5", f"--output_dir={out}", f"--max_train_steps={MAX_STEPS}",
        f"--save_steps={SAVE_STEPS}", f"--checkpointing_steps={SAVE_STEPS}", "--only_save_embeds", "--report_to=none",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def killed_then_resumed(
    tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("killed") / "out"
    # The second .pdparams write is step 4's snapshot (step 2's was the first).
    env = dict(os.environ, TEXTINV_TEST_KILL_AT="2")
    command = [sys.executable, "-c", KILL_DRIVER, *_script_flags(tiny_model, train_images, out)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    after_kill = sorted(path.name for path in out.iterdir())
    pdparams_after_kill = {path.name: read_embeddings(path)[0] for path in out.glob("*.pdparams")}
    resume = [sys.executable, str(REPO / "train_textual_inversion.py")]
    resumed = subprocess.run(
        [*resume, *_script_flags(tiny_model, train_images, out, "--resume_from_checkpoint=latest")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "killed": killed, "after_kill": after_kill, "pdparams_after_kill": pdparams_after_kill}


@pytest.mark.slow
def test_a_kill_mid_write_leaves_no_torn_pdparams(killed_then_resumed: dict[str, Any]) -> None:
    assert killed_then_resumed["killed"].returncode == -9, killed_then_resumed["killed"].stderr[-2000:]
    names = killed_then_resumed["after_kill"]
    # The half-written bytes are in a hidden temporary, never under the real name.
    assert "learned_embeds-steps-4.pdparams" not in names
    assert any(name.startswith(".learned_embeds-steps-4.pdparams.") and name.endswith(".tmp") for name in names)
    # Every .pdparams there is whole: it reads back as the safetensors file of the same step.
    assert set(killed_then_resumed["pdparams_after_kill"]) == {"learned_embeds-steps-2.pdparams"}
    out = killed_then_resumed["out"]
    read_back = killed_then_resumed["pdparams_after_kill"]["learned_embeds-steps-2.pdparams"]
    assert torch.equal(
        read_back.vectors["text_encoder"], load_file(str(out / "learned_embeds-steps-2.safetensors"))[TOKEN]
    )


@pytest.mark.slow
def test_pdparams_snapshot_at_each_save_step_and_only_there(killed_then_resumed: dict[str, Any]) -> None:
    out = killed_then_resumed["out"]
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]  # the resume cleared the temporary
    for suffix in (".pdparams", ".safetensors"):
        snapshots = sorted(path.name for path in out.glob(f"learned_embeds-steps-*{suffix}"))
        assert snapshots == [
            f"learned_embeds-steps-{step}{suffix}" for step in range(SAVE_STEPS, MAX_STEPS, SAVE_STEPS)
        ]
    for stem in ("learned_embeds", "learned_embeds-steps-2", "learned_embeds-steps-4"):
        with open(out / f"{stem}.pdparams", "rb") as handle:
            raw = pickle.load(handle)  # what paddle.load reads: {token: float32 [1, dim]}
        assert list(raw) == [TOKEN] and raw[TOKEN].dtype == np.float32 and raw[TOKEN].shape == (1, 32)
        assert np.array_equal(raw[TOKEN], load_file(str(out / f"{stem}.safetensors"))[TOKEN].numpy())
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and record["config"]["embedding_formats"] == ["diffusers", "pdparams"]
    assert {"learned_embeds.pdparams", "learned_embeds-steps-4.pdparams"} <= set(record["outputs"])


# --- the pipeline folder: paddlenlp's tokenizer files, ppdiffusers' weight names ------------------
def _clip_tokenizer_with(words: list[str]) -> Any:
    from transformers import CLIPTokenizer

    from textinv.tiny import clip_tokenizer_dir

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    tokenizer.add_tokens(words)
    return tokenizer


def test_tokenizer_folder_holds_paddlenlp_files_and_loads_in_transformers_as_before(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    words = [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]  # a 3-vector token
    tokenizer = _clip_tokenizer_with(words)
    tokenizer.save_pretrained(tmp_path / "plain")
    paddle_layout.save_tokenizer(tokenizer, tmp_path / "both")
    assert (tmp_path / "both" / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    vocab = json.loads((tmp_path / "both" / "vocab.json").read_text(encoding="utf-8"))
    added = json.loads((tmp_path / "both" / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {word: len(vocab) + i for i, word in enumerate(words)}  # consecutive after the vocabulary
    plain, both = CLIPTokenizer.from_pretrained(tmp_path / "plain"), CLIPTokenizer.from_pretrained(tmp_path / "both")
    prompt = f"a photo of {' '.join(words)}, a Toy"
    assert len(both) == len(plain) == len(tokenizer)
    assert both(prompt).input_ids == plain(prompt).input_ids == tokenizer(prompt).input_ids
    assert both.get_added_vocab() == plain.get_added_vocab()


def _tiny_clip_text_model() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49409, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return CLIPTextModel(config).eval()


def test_text_encoder_is_saved_with_ppdiffusers_names_and_transformers_loads_it_identically(tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    encoder = _tiny_clip_text_model()
    encoder.save_pretrained(tmp_path / "plain")  # transformers 5, from scratch: no prefix
    paddle_layout.save_text_encoder(encoder, tmp_path / "prefixed")
    with safe_open(str(tmp_path / "prefixed" / "model.safetensors"), "pt") as handle:
        assert all(key.startswith("text_model.") for key in handle.keys())
    ids = torch.tensor([[49406, 320, 1125, 539, 49408, 49407]])
    with torch.no_grad():
        hidden = [CLIPTextModel.from_pretrained(tmp_path / n)(ids).last_hidden_state for n in ("plain", "prefixed")]
    assert torch.equal(hidden[0], hidden[1]) and torch.equal(hidden[1], encoder(ids).last_hidden_state)


def test_paddle_weights_are_the_transposed_linears_beside_what_transformers_reads(tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    encoder = _tiny_clip_text_model()
    paddle_layout.save_text_encoder(encoder, tmp_path, paddle_weights=True)
    torch_layout = load_file(str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / paddle_layout.PADDLE_TEXT_WEIGHTS), "np") as handle:
        assert handle.metadata() == {"format": "np"}
        paddle_arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    assert set(paddle_arrays) == set(torch_layout)
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert np.array_equal(paddle_arrays[fc1], torch_layout[fc1].numpy().T)  # Paddle's Linear is [in, out]
    embeddings = "text_model.embeddings.token_embedding.weight"
    assert np.array_equal(paddle_arrays[embeddings], torch_layout[embeddings].numpy())
    index = json.loads((tmp_path / paddle_layout.PADDLE_TEXT_INDEX).read_text())
    assert set(index["weight_map"]) == set(torch_layout)
    assert (tmp_path / paddle_layout.TORCH_TEXT_ALIAS).read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    ids = torch.tensor([[49406, 320, 49408, 49407]])
    with torch.no_grad():
        assert torch.equal(CLIPTextModel.from_pretrained(tmp_path)(ids)[0], encoder(ids)[0])


def test_diffusers_model_folder_gets_an_index_naming_its_own_weights(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_model / "unet", tmp_path / "unet")
    assert paddle_layout.write_paddle_model_index(tmp_path / "unet")
    index = json.loads((tmp_path / "unet" / paddle_layout.PADDLE_MODEL_INDEX).read_text())
    with safe_open(str(tmp_path / "unet" / paddle_layout.DIFFUSERS_WEIGHTS), "pt") as handle:
        assert set(index["weight_map"]) == set(handle.keys())
    assert set(index["weight_map"].values()) == {paddle_layout.DIFFUSERS_WEIGHTS}
    assert not paddle_layout.write_paddle_model_index(tmp_path)  # no weights there: nothing written


# --- --noise_offset -------------------------------------------------------------------------------
class _ZeroUNet(torch.nn.Module):
    """Predicts zeros (the loss is the target's mean square) and keeps the noisy latents it was given."""

    dtype = torch.float32

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        self.seen = sample.clone()
        return SimpleNamespace(sample=torch.zeros_like(sample) + 0 * encoder_hidden_states.sum())


class _Tokenizer:
    model_max_length = 4

    def __call__(self, captions: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(input_ids=torch.zeros(len(captions), 4, dtype=torch.long))


def _cache() -> LatentCache:
    torch.manual_seed(0)
    return LatentCache(mean=torch.randn(1, 1, 4, 3, 3), std=torch.rand(1, 1, 4, 3, 3), scaling_factor=0.5)


EXAMPLE = Example(index=0, image_index=0, flipped=False, caption="x", noise_seed=321)
# The DDPM objective of a 1000-step schedule, for every latent shape (textinv.training.loss.ObjectiveFor's interface).
_DDPM = DenoisingDiffusion(DDPMScheduler(num_train_timesteps=1000))
DDPM_1000 = lambda shape: _DDPM  # noqa: E731


def test_noise_offset_zero_draws_exactly_what_was_drawn_before() -> None:
    cache = _cache()
    generator = torch.Generator().manual_seed(EXAMPLE.noise_seed)  # the documented order: latent, noise, timestep
    latent = cache.sample(0, False, generator)
    expected = (
        latent,
        torch.randn(latent.shape, generator=generator),
        torch.randint(0, 1000, (1,), generator=generator),
    )
    for settings in (LossSettings(), LossSettings(noise_offset=0.0)):
        drawn = example_draws(EXAMPLE, cache, DDPM_1000, settings)
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))


def test_noise_offset_adds_one_draw_per_channel_after_the_others() -> None:
    cache, offset = _cache(), 0.1
    plain_latent, plain_noise, plain_t = example_draws(EXAMPLE, cache, DDPM_1000, LossSettings())
    latent, noise, t = example_draws(EXAMPLE, cache, DDPM_1000, LossSettings(noise_offset=offset))
    assert torch.equal(latent, plain_latent) and torch.equal(t, plain_t)
    # The offset is drawn from the example's generator after its other draws: randn(c, 1, 1).
    generator = torch.Generator().manual_seed(EXAMPLE.noise_seed)
    cache.sample(0, False, generator)
    torch.randn(plain_noise.shape, generator=generator)
    torch.randint(0, 1000, (1,), generator=generator)
    channel_offset = torch.randn((4, 1, 1), generator=generator)
    assert torch.allclose(noise - plain_noise, (offset * channel_offset).expand_as(noise), atol=1e-7)
    assert torch.allclose(noise, plain_noise + offset * channel_offset)

    # The loss sees that noise: the UNet's input is add_noise(latent, noise, t) and the epsilon target is the noise.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = _ZeroUNet()
    parts = SimpleNamespace(noise_scheduler=scheduler, denoiser=unet, family=get_family("sd1"), vae_scale_factor=8)
    model = lambda ids: torch.zeros(ids.shape[0], 4, 8)  # noqa: E731
    settings = LossSettings(noise_offset=offset)
    loss = denoising_loss(model, parts, _Tokenizer(), cache, [EXAMPLE], torch.device("cpu"), settings)  # type: ignore[arg-type]
    assert torch.allclose(unet.seen, scheduler.add_noise(latent[None], noise[None], t))
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


@pytest.mark.slow
def test_noise_offset_zero_trains_bit_identically_and_another_value_does_not(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    def vectors(name: str, **overrides: Any) -> torch.Tensor:
        config = train_config(tiny_model, train_images, tmp_path / name, max_train_steps=3, only_save_embeds=True,
                              checkpointing_steps=None, report_to="none", **overrides)  # fmt: skip
        return textinv.train(config, show_progress=False).embedding.vectors["text_encoder"]

    default = vectors("default")
    assert torch.equal(default, vectors("zero", noise_offset=0.0))
    assert not torch.equal(default, vectors("offset", noise_offset=0.1))


def test_noise_offset_is_part_of_the_run_identity(tmp_path: Path) -> None:
    assert "noise_offset" in run_dir.IDENTITY_KEYS and run_dir.IDENTITY_DEFAULTS["noise_offset"] == 0.0
    identity = {key: f"same {key}" for key in run_dir.IDENTITY_KEYS} | {"language": "en", "noise_offset": 0.0}
    before = {key: value for key, value in identity.items() if key != "noise_offset"}  # a run.json from before issue 15
    (tmp_path / "run.json").write_text(json.dumps({"identity": before}))
    run_dir.check_resume_identity(tmp_path, identity)  # resumes: its absence meant 0
    with pytest.raises(UserError, match="noise_offset was 0.0, now 0.1"):
        run_dir.check_resume_identity(tmp_path, identity | {"noise_offset": 0.1})
