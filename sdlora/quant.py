"""Frozen base weights in 8 or 4 bits (QLoRA): the LoRA trains in full precision on top.

One backend on every device: torchao. `int8` is its weight-only int8 (one scale per output channel); `nf4` is its
NF4Tensor, the QLoRA paper's 4-bit NormalFloat with double quantization of the block scales (blocks of 64 weights,
as bitsandbytes and the paper use). Both quantize the Linear layers of the UNet and the text encoders; convolutions
and the VAE stay in their precision. peft puts its LoRA layers on the quantized layers (its torchao LoRA layer for
int8; its plain LoRA layer over a weight that dequantizes itself in the matmul for nf4), so the adapter trains and
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


def quantize(model: torch.nn.Module, kind: str) -> int:
    """Quantize the Linear layers of a frozen model in place (before LoRA is added); returns how many."""
    q = _torchao()
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    if kind == "int8":
        names = {name for name, _ in linears}
        q.quantize_(model, q.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
        return len(names)
    count = 0
    for _, m in linears:
        n = m.weight.numel()
        if n % NF4_BLOCK:
            continue  # too odd a shape for 4-bit blocks: kept as it is
        scalers = n // NF4_BLOCK
        scaler_block = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if scalers % b == 0)
        nf4 = q.to_nf4(m.weight.detach(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)
        m.weight = torch.nn.Parameter(nf4, requires_grad=False)
        count += 1
    return count


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take, quantized tensors counted by what they store (data and scales)."""
    total = 0
    for p in model.parameters():
        total += _stored_bytes(p.data if isinstance(p, torch.nn.Parameter) else p)
    return total


def _stored_bytes(t: torch.Tensor) -> int:
    if not is_quantized(t):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(_stored_bytes(getattr(t, name)) for name in inner)
