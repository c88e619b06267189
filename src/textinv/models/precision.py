"""Speed and memory settings for the frozen model: precision, TF32, attention, checkpointing, compilation,
and what its frozen layers keep for backward (:func:`keep_less_for_backward`).

The trainable state is the placeholder vectors alone (tokens.TrainableTokens), so nothing here
touches it: the vectors and the optimizer stay float32 whatever the frozen weights use. The frozen
parts load directly in :func:`frozen_dtype` on their device (textinv.models.loading), never in fp32
first. fp16 needs loss scaling: :func:`grad_scaler` makes textinv's own ``torch.amp.GradScaler``
(accelerate is never asked for mixed precision, so its process-wide state never has to change
between two ``train()`` calls in one process).

Defaults on CUDA (when the flags are not given): frozen weights in bf16 on GPUs that have it (Ampere
and newer; fp32 on the others: fp16 only when asked, it needs loss scaling), TF32 for matmuls and
convolutions, PyTorch's scaled-dot-product attention (flash / memory-efficient kernels). The CPU
keeps fp32. :func:`choose_precision` says in one line what a run uses.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from typing import Any, Optional

import torch

from textinv.config import TrainConfig, UserError

logger = logging.getLogger(__name__)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# How closely the vectors of two runs with the same seed agree (an uninterrupted run and one resumed
# from a checkpoint too): the largest absolute difference over the largest absolute value. On the CPU
# with the same torch thread count every run is bit-identical (measured: separate processes, a kill -9
# resume); another thread count sums in another order: 1.0-1.3e-6 after 12 steps at batch 4, up to 2.5e-5 at batch
# 4 x 2 (`python bench/threads.py --vectors`, 2026-12-02, AMD EPYC, 2 cores; seeds 1-3). On CUDA some kernels are
# nondeterministic (atomic adds in backward passes); these bounds are not yet measured on a GPU.
REPRODUCIBILITY = {"cpu": 0.0, "cpu-other-threads": 1e-4, "cuda": 1e-3, "cuda-half": 2e-2}


def vector_tolerance(device_type: str, mixed_precision: str = "no", same_threads: bool = True) -> float:
    """The bound of :data:`REPRODUCIBILITY` for runs on ``device_type`` in ``mixed_precision``."""
    if device_type == "cpu":
        return REPRODUCIBILITY["cpu" if same_threads else "cpu-other-threads"]
    return REPRODUCIBILITY["cuda" if mixed_precision in (None, "no") else "cuda-half"]


def vectors_agree(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """``a`` and ``b`` within ``tolerance`` (relative to the largest entry); bit-identical for 0."""
    if tolerance == 0.0:
        return torch.equal(a, b)
    scale = max(float(b.abs().max()), 1e-12)
    return float((a.float() - b.float()).abs().max()) <= tolerance * scale


def bf16_supported(device: torch.device) -> bool:
    """CUDA: the GPU computes in bf16 natively (Ampere and newer; not T4 or V100). Other devices: True."""
    if device.type != "cuda":
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def choose_precision(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, str]:
    """Fill in ``--mixed_precision`` when it was not given; returns the config and the line that says what
    the run uses. (``accelerate launch --mixed_precision`` is not read: the launcher exports its default
    "no" too, so it cannot tell a choice from a default; textinv's own flag decides.)"""
    asked = config.mixed_precision
    chosen = asked
    if chosen is None:
        chosen = "bf16" if device.type == "cuda" and bf16_supported(device) else "no"
    config = dataclasses.replace(config, mixed_precision=chosen)
    check_precision(config, device)
    weights = {"no": "fp32", "fp16": "fp16 (with loss scaling)", "bf16": "bf16"}[chosen]
    if asked is None and device.type == "cuda":
        weights += " (chosen: this GPU has bf16)" if chosen == "bf16" else " (chosen: this GPU has no bf16)"
    if device.type != "cuda":
        return config, f"on {device.type}: frozen weights {weights}; the vectors and AdamW fp32"
    properties = torch.cuda.get_device_properties(device)
    tf32 = "on" if config.allow_tf32 else "off"
    return config, (
        f"on {device} ({properties.name}, {properties.total_memory / 2**30:.0f} GiB): frozen weights {weights}, "
        f"TF32 {tf32}, attention {attention_name(config, device)}; the vectors and AdamW fp32"
    )


def check_precision(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings the device cannot run, before any model is loaded."""
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"--mixed_precision fp16 needs a CUDA GPU, and this run is on {device.type}; "
            "use --mixed_precision no (or bf16 where the CPU supports it)"
        )
    if config.mixed_precision == "bf16" and not bf16_supported(device):
        raise UserError(
            f"--mixed_precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; "
            "use --mixed_precision fp16 (with loss scaling) or no"
        )


def frozen_dtype(config: TrainConfig) -> torch.dtype:
    return HALF_DTYPES.get(config.mixed_precision or "no", torch.float32)


def grad_scaler(config: TrainConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16's loss scaler (None in fp32 and bf16, whose range needs none)."""
    if config.mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, process-wide.

    torch >= 2.9: through the ``fp32_precision`` settings only (writing the legacy ``allow_tf32`` flags
    too would mix the APIs, which raises), and ``torch.set_float32_matmul_precision`` to match, which keeps
    ``torch.get_float32_matmul_precision()`` readable (inductor reads it; a tf32 ``fp32_precision`` alone
    makes it raise in torch 2.13).
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"  # type: ignore[attr-defined]
        torch.set_float32_matmul_precision("high" if enabled else "highest")
    else:  # torch < 2.9
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def attention_name(config: TrainConfig, device: torch.device) -> str:
    asked = config.enable_xformers_memory_efficient_attention
    if asked and device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
        return "xformers"
    return "PyTorch SDPA"


def apply_to_unet(config: TrainConfig, unet: Any, device: torch.device) -> Any:
    """TF32, attention, checkpointing and compilation for the frozen UNet; returns the UNet to call.

    The UNet arrives in its final dtype on ``device`` (textinv.models.loading.load_model_parts).
    """
    if device.type == "cuda":
        set_tf32(config.allow_tf32)
    if config.enable_xformers_memory_efficient_attention:
        if attention_name(config, device) == "xformers":
            unet.enable_xformers_memory_efficient_attention()
            logger.info("attention: xformers")
        else:
            on = device.type
            why = "xformers is not installed" if on == "cuda" else f"xformers needs CUDA (this run is on {on})"
            logger.warning("%s; using PyTorch's scaled-dot-product attention, the default anyway", why)
    if config.gradient_checkpointing:
        # diffusers checkpoints whenever gradients are on, in eval mode too (the UNet stays frozen).
        unet.enable_gradient_checkpointing()
    if not config.compile:  # inductor chooses what to save itself
        keep_less_for_backward(unet)
    if config.compile:
        logger.info("compiling the UNet with torch.compile (the first steps are slow)")
        return torch.compile(unet)
    return unet


class _FrozenConv2d(torch.autograd.Function):
    """``F.conv2d`` with a frozen weight, keeping only the weight for backward.

    PyTorch's own convolution keeps its input for backward whether or not the weight needs a gradient
    (``ConvolutionBackward0`` saves ``input`` and ``weight``; a linear layer's ``addmm`` saves its input only
    when the weight needs one). The gradient of the input needs the weight alone, so here the input is not
    kept: the same ``aten.convolution_backward`` call, asked for the input's gradient only, gets a stand-in
    of the input's shape. Same kernels, so the same bits (tests/test_speed.py checks the vectors).
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv: Any) -> Any:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.conv = input.shape, conv
        return torch.nn.functional.conv2d(input, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        (weight,) = ctx.saved_tensors
        conv = ctx.conv
        stand_in = grad_output.new_empty(1).expand(ctx.input_shape)  # only its shape is read
        grad_input = torch.ops.aten.convolution_backward(
            grad_output,
            stand_in,
            weight,
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            False,
            [0, 0],
            conv.groups,
            (True, False, False),
        )[0]
        return grad_input, None, None, None


def _frozen_conv_forward(conv: torch.nn.Conv2d, input: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
    if input.requires_grad and torch.is_grad_enabled() and not weight.requires_grad and input.is_contiguous():
        return _FrozenConv2d.apply(input, weight, bias, conv)
    return torch.nn.Conv2d._conv_forward(conv, input, weight, bias)


class _GatedGelu(torch.autograd.Function):
    """GEGLU's gate, ``hidden * gelu(gate)`` of the two halves of its projection, keeping only the projection.

    Autograd would keep the projection (for ``gelu`` and the product) and ``gelu(gate)`` too; backward
    recomputes ``gelu(gate)`` instead (elementwise, the same bits), and computes both halves' gradients as
    autograd's ``MulBackward0``, ``GeluBackward0`` and ``SplitBackward0`` do."""

    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * torch.nn.functional.gelu(gate)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad_output * torch.nn.functional.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad_output * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


def _frozen_geglu_forward(geglu: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    projected = geglu.proj(hidden_states)
    if projected.requires_grad and torch.is_grad_enabled() and projected.device.type in ("cpu", "cuda"):
        return _GatedGelu.apply(projected)
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * geglu.gelu(gate)


def keep_less_for_backward(module: Any) -> dict[str, int]:
    """Make ``module``'s frozen layers keep less for backward, computing the same bits: 2-d convolutions
    keep no input (:class:`_FrozenConv2d`), GEGLU feed-forwards only their projection (:class:`_GatedGelu`).
    At SD 1.5, 512 px, a step's saved activations go from 1.41 to 1.02 GiB (docs/speed.md).
    A convolution whose weight needs a gradient, or whose input is not contiguous (channels_last), runs as
    before. Returns how many layers of each kind changed."""
    from diffusers.models.activations import GEGLU

    changed = {"conv2d": 0, "geglu": 0}
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            layer._conv_forward = functools.partial(_frozen_conv_forward, layer)  # type: ignore[method-assign]
            changed["conv2d"] += 1
        elif type(layer) is GEGLU and not any(p.requires_grad for p in layer.parameters()):
            layer.forward = functools.partial(_frozen_geglu_forward, layer)  # type: ignore[method-assign]
            changed["geglu"] += 1
    return changed


def uncompiled(module: Any) -> Any:
    """The module ``torch.compile`` wrapped (sampling with it would compile again), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def apply_to_text_encoders(config: TrainConfig, trainable: Any) -> None:
    """Gradient checkpointing in the text encoders that learn the word (T5-XXL's activations are the largest part of
    an SD3/Flux step's memory once the denoiser checkpoints). transformers checkpoints only in training mode, so the
    encoder is put in it with every dropout off, the modules' and the functional ones' rates (T5's attention reads
    ``self.dropout`` and ``self.training``): the frozen encoder then computes exactly what it does in eval mode."""
    if not config.gradient_checkpointing:
        return
    for trainable_tokens in trainable.tokens.values():
        encoder = trainable_tokens.text_encoder
        if not getattr(encoder, "supports_gradient_checkpointing", False):
            continue
        enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
            for name in ("dropout", "attention_dropout", "dropout_rate"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
