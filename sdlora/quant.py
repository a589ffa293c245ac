"""Frozen base weights in 8 or 4 bits (QLoRA): the LoRA trains in full precision on top.

One backend on every device: torchao. `int8` is its Int8Tensor (weight-only, one scale per output row); `nf4` is its
NF4Tensor, the QLoRA paper's 4-bit NormalFloat with double quantization of the block scales (blocks of 64 weights,
as bitsandbytes and the paper use). Both quantize the Linear and Conv2d layers of the UNet and the text encoders;
the VAE stays in its precision. peft puts its LoRA layers on the quantized layers (its torchao LoRA layer for int8
Linear layers, its plain layers otherwise, over weights that dequantize themselves), so the adapter trains and
saves exactly as on a full-precision base.
"""

from __future__ import annotations

import logging

import torch

from .errors import MissingDependencyError

KINDS = ("int8", "nf4")
NF4_BLOCK = 64  # weights per NF4 block (QLoRA, Dettmers et al. 2023, §3)


def require(kind: str) -> None:
    """Fail before any model loads when the backend is missing."""
    if kind not in KINDS:
        from .errors import ConfigError

        raise ConfigError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        _torchao()
    except ImportError:
        raise MissingDependencyError(f"--quantize-base {kind} needs torchao: pip install torchao "
                                     "(or pip install 'sdlora[quant]')") from None


def _torchao():
    # torchao logs a line for each optional CUDA kernel library it cannot load, and torch a deprecation about one
    # of torchao's registrations: advice for their developers, not for a user quantizing on the CPU.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


class QuantizedConv2d(torch.nn.Conv2d):
    """A Conv2d whose weight is held quantized in `qweight`, as the 2-D matrix (out, in·kh·kw) torchao can quantize,
    and dequantized for each forward: convolutions are most of SD 1.x's UNet (60% of its weights). `weight` stays a
    4-D tensor of the right shape, dtype and device that stores nothing (one zero, expanded), so peft puts its
    ordinary conv LoRA layer on it and every shape check sees the real layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "qweight" not in self._buffers:  # peft makes its LoRA convs of the base layer's class: plain ones
            return super().forward(x)
        w = dequantize(self.qweight).reshape(self.weight.shape).to(x.dtype)
        return self._conv_forward(x, w, None if self.bias is None else self.bias.to(x.dtype))


def quantize(model: torch.nn.Module, kind: str) -> int:
    """Quantize the Linear and Conv2d layers of a frozen model in place (before LoRA is added); returns how many."""
    q = _torchao()
    count = 0
    for m in list(model.modules()):
        if type(m) not in (torch.nn.Linear, torch.nn.Conv2d):
            continue
        matrix = m.weight.detach().flatten(1)
        if kind == "int8":
            packed = q.Int8Tensor.from_hp(matrix, q.PerRow())
        elif matrix.numel() % NF4_BLOCK == 0:
            scalers = matrix.numel() // NF4_BLOCK
            scaler_block = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if scalers % b == 0)
            packed = q.to_nf4(matrix, block_size=NF4_BLOCK, scaler_block_size=scaler_block)
        else:
            continue  # too odd a shape for 4-bit blocks: kept as it is
        if isinstance(m, torch.nn.Conv2d):
            m.__class__ = QuantizedConv2d
            m.register_buffer("qweight", packed, persistent=False)
            placeholder = torch.zeros((), dtype=m.weight.dtype, device=m.weight.device).expand(m.weight.shape)
            m.weight = torch.nn.Parameter(placeholder, requires_grad=False)
        else:
            m.weight = torch.nn.Parameter(packed, requires_grad=False)
        count += 1
    return count


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize() if is_quantized(weight) else weight


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take, quantized tensors counted by what they store (data and scales)."""
    tensors = [p.data for p in model.parameters()] + [b for n, b in model.named_buffers() if n.endswith("qweight")]
    return sum(_stored_bytes(t) for t in tensors)


def _stored_bytes(t: torch.Tensor) -> int:
    if not is_quantized(t):
        return t.untyped_storage().nbytes() if 0 in t.stride() else t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(_stored_bytes(getattr(t, name)) for name in inner)
