"""Speed and memory settings change the cost of a step, not what is learned."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import textinv
from conftest import same_vectors, train_config
from textinv import events
from textinv.config import UserError
from textinv.data import latents
from textinv.training.checkpoints import list_checkpoints

# eval_steps=0: no held-out evaluation passes, so every UNet and VAE call below is a training step's.
SETTINGS = dict(max_train_steps=6, repeats=2, only_save_embeds=True, seed=9, checkpointing_steps=3, eval_steps=0)


class _Capture(events.TrainObserver):
    """Keeps the run so a test can look at the frozen modules after training, and counts the forward
    calls with gradients on of each of the UNet's ResNet blocks (the modules diffusers' gradient
    checkpointing wraps): training forwards and their recomputation in backward, no inference."""

    def on_start(self, run: events.RunContext) -> None:
        from diffusers.models.resnet import ResnetBlock2D

        self.run = run
        self.block_calls: Counter[str] = Counter()
        for name, module in run.parts.unet.named_modules():
            if isinstance(module, ResnetBlock2D):  # not a forward hook: recomputation skips those
                module.forward = self._counted(name, module.forward)

    def _counted(self, name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                self.block_calls[name] += 1
            return forward(*args, **kwargs)

        return counted


def _train(tiny_model: Path, train_images: Path, output_dir: Path, **overrides) -> tuple[torch.Tensor, _Capture]:
    capture = _Capture()
    config = train_config(tiny_model, train_images, output_dir, **{**SETTINGS, **overrides})
    result = textinv.train(config, show_progress=False, observers=[capture])
    return result.embedding.vectors["text_encoder"], capture


@pytest.fixture(scope="module")
def baseline_run(
    tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.Tensor, _Capture]:
    return _train(tiny_model, train_images, tmp_path_factory.mktemp("baseline") / "out")


@pytest.fixture(scope="module")
def baseline(baseline_run: tuple[torch.Tensor, _Capture]) -> torch.Tensor:
    return baseline_run[0]


@pytest.mark.slow
def test_latent_cache_changes_nothing_but_the_time(
    tiny_model: Path, train_images: Path, tmp_path: Path, baseline: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached latents train bit-identically to encoding every step the way diffusers' reference script
    does, ``vae.encode(pixels).latent_dist.sample(generator) * scaling_factor``, from the same generator."""
    encoded = []

    @torch.no_grad()
    def reference_sample(self: latents.LatentsEachStep, image_index: int, flipped: bool, generator: torch.Generator):
        encoded.append(image_index)
        view = self.views[image_index]
        pixels = view.flip(-1) if flipped and self.random_flip else view
        latent = self.vae.encode(pixels.unsqueeze(0)).latent_dist.sample(generator=generator)[0]
        return (latent - self.shift_factor) * self.scaling_factor

    monkeypatch.setattr(latents.LatentsEachStep, "sample", reference_sample)
    uncached, _ = _train(tiny_model, train_images, tmp_path / "out", cache_latents=False)
    assert len(encoded) == SETTINGS["max_train_steps"]  # one VAE pass per example (batch 1)
    assert same_vectors(uncached, baseline)  # bit-identical on the CPU


def test_gradient_checkpointing_recomputes_unet_blocks_and_gives_the_same_vectors(
    tiny_model: Path, train_images: Path, tmp_path: Path, baseline_run: tuple[torch.Tensor, _Capture]
) -> None:
    baseline, plain = baseline_run
    vectors, checkpointed = _train(tiny_model, train_images, tmp_path / "out", gradient_checkpointing=True)
    steps = SETTINGS["max_train_steps"]
    # Without checkpointing every ResNet block runs once a step (batch 1, no guidance).
    assert plain.block_calls and set(plain.block_calls.values()) == {steps}
    # With it, backward runs again the checkpointed blocks whose activations it needs but did not
    # keep: at least every block of the up path, which the token's vectors reach through cross-attention.
    assert checkpointed.block_calls.keys() == plain.block_calls.keys()
    assert set(checkpointed.block_calls.values()) <= {steps, 2 * steps}
    recomputed = {name for name, calls in checkpointed.block_calls.items() if calls == 2 * steps}
    up_path = {name for name in plain.block_calls if name.startswith("up_blocks.")}
    assert up_path and up_path <= recomputed
    assert (vectors - baseline).abs().max().item() < 1e-6


def test_only_the_vectors_train_and_the_optimizer_state_is_their_size(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    _, capture = _train(tiny_model, train_images, tmp_path / "out", num_vectors=2)
    parts = capture.run.parts
    for module in (parts.unet, parts.text_encoder):
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    state = torch.load(list_checkpoints(tmp_path / "out")[-1] / "state.pt", weights_only=True)
    moments = [tensor for slot in state["optimizer"]["state"].values() for tensor in slot.values() if tensor.dim() == 2]
    assert moments and all(tuple(t.shape) == (2, 32) for t in moments)


def test_bf16_keeps_the_vectors_and_optimizer_in_fp32(
    tiny_model: Path, train_images: Path, tmp_path: Path, baseline: torch.Tensor
) -> None:
    vectors, capture = _train(tiny_model, train_images, tmp_path / "out", mixed_precision="bf16")
    assert capture.run.parts.unet.dtype == torch.bfloat16
    assert capture.run.parts.text_encoder.dtype == torch.bfloat16
    assert capture.run.trainable.vectors.dtype == torch.float32 and vectors.dtype == torch.float32
    assert torch.isfinite(vectors).all()
    # bf16 keeps ~3 significant digits: the update is the fp32 one's direction, not bit-equal to it.
    parts = capture.run.parts
    (toy,) = parts.tokenizer.encode("toy", add_special_tokens=False)
    start = parts.text_encoder.get_input_embeddings().weight[toy].float()
    update, fp32_update = (vectors - start).flatten(), (baseline - start).flatten()
    assert not torch.equal(vectors, baseline)
    assert torch.nn.functional.cosine_similarity(update, fp32_update, dim=0) > 0.9


def test_fp16_on_cpu_is_refused_before_loading(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--mixed_precision fp16 needs a CUDA GPU"):
        _train(tiny_model, train_images, tmp_path / "out", mixed_precision="fp16")
    assert not (tmp_path / "out" / "run.json").exists()


def test_xformers_without_cuda_says_so_and_uses_sdpa(
    tiny_model: Path, train_images: Path, tmp_path: Path, baseline: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="textinv.models.precision"):
        vectors, _ = _train(tiny_model, train_images, tmp_path / "out", enable_xformers_memory_efficient_attention=True)
    messages = [record.getMessage() for record in caplog.records if record.name == "textinv.models.precision"]
    assert len(messages) == 1 and "scaled-dot-product attention" in messages[0]
    assert same_vectors(vectors, baseline)


def _saved_bytes_and_text_gradient(unet: Any, text_encoder: Any) -> tuple[int, torch.Tensor]:
    """What a step's forward keeps for backward (bytes of activations, weights not counted), and the gradient
    at the token embeddings."""
    weights = {p.untyped_storage().data_ptr() for m in (unet, text_encoder) for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    leaf: list[torch.Tensor] = []  # the token embeddings, where the gradient stops

    def token_embeddings(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf.append(output.detach().requires_grad_(True))
        return leaf[0]

    hook = text_encoder.get_input_embeddings().register_forward_hook(token_embeddings)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = text_encoder(torch.arange(77).unsqueeze(0))[0]
        prediction = unet(latents, torch.tensor([500]), hidden).sample
    prediction.square().mean().backward()
    hook.remove()
    return sum(saved.values()), leaf[0].grad


def test_frozen_layers_keep_less_for_backward_and_compute_the_same_bits(
    tiny_model: Path, train_images: Path, tmp_path: Path, baseline: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Convolutions keep no input and GEGLU feed-forwards only their projection (precision.keep_less_for_backward):
    less memory, the same gradient bit for bit, so the same vectors as training without it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from textinv.models import precision

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").requires_grad_(False).eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").requires_grad_(False).eval()
    plain_bytes, plain_gradient = _saved_bytes_and_text_gradient(unet, text_encoder)
    changed = precision.keep_less_for_backward(unet)
    assert changed["conv2d"] > 0 and changed["geglu"] > 0
    lean_bytes, lean_gradient = _saved_bytes_and_text_gradient(unet, text_encoder)
    assert lean_bytes < 0.9 * plain_bytes
    assert torch.equal(lean_gradient, plain_gradient)

    # Training with it (the default) and without it learns the same vectors.
    monkeypatch.setattr(precision, "keep_less_for_backward", lambda module: {})
    vectors, _ = _train(tiny_model, train_images, tmp_path / "out")
    assert same_vectors(vectors, baseline)
