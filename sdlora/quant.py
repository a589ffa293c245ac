"""Frozen base weights in 8 or 4 bits (QLoRA): the LoRA trains in full precision on top.

Two backends, one format each way: `int8` is weight-only 8 bits with one scale per output row; `nf4` is the QLoRA
paper's 4-bit NormalFloat with double quantization of the block scales (blocks of 64 weights).
- bitsandbytes (the QLoRA paper's own library; the default where it is installed): Linear layers become its
  Linear4bit / Linear8bitLt, computing in the model's dtype (bf16 under bf16 mixed precision), and peft puts its
  bitsandbytes LoRA layers on them.
- torchao (the default without bitsandbytes): Linear weights become its NF4Tensor / Int8Tensor, which dequantize themselves;
  peft's torchao LoRA layer wraps the int8 ones, its plain layers the rest.
Convolutions (60% of SD 1.x's UNet) are held quantized by either backend in `QuantizedConv2d` and dequantized for each
forward. The UNet and text encoders are quantized; the VAE stays in its precision. The adapter trains and saves
exactly as on a full-precision base.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import optional
from .config import QUANTIZE, QUANTIZE_BACKENDS
from .errors import ConfigError, MissingDependencyError

KINDS = tuple(k for k in QUANTIZE if k)
BACKENDS = QUANTIZE_BACKENDS  # auto, then the libraries
NF4_BLOCK = 64  # weights per NF4 block (QLoRA, Dettmers et al. 2023, §3)


def backend_for(choice: str) -> str:
    """`auto`: bitsandbytes when it is installed (the QLoRA paper's library, with CUDA kernels; on the CPU it trained
    nf4 faster than torchao and int8 as fast, at the same quality: README, QLoRA), else torchao when that is. With
    neither, bitsandbytes, so that `require` names it."""
    if choice != "auto":
        return choice
    return "torchao" if _installed("torchao") and not _installed("bitsandbytes") else "bitsandbytes"


def _installed(name: str) -> bool:
    return optional.installed(name)


def require(kind: str, backend: str) -> None:
    """Fail before any model loads when the backend is missing."""
    if kind not in KINDS:
        raise ConfigError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    if backend not in BACKENDS[1:]:
        raise ConfigError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        torchao() if backend == "torchao" else bitsandbytes()
    except ImportError:
        other = "torchao" if backend == "bitsandbytes" else "bitsandbytes"
        instead = (f"or --quantize-backend {other}, which is installed" if _installed(other) else
                   f"{other}, the other backend, is not installed either; pip install 'sdlora[quant]' installs both")
        raise MissingDependencyError(f"--quantize-base {kind} with the {backend} backend needs {backend}: pip install "
                                     f"{backend} ({instead})") from None


@functools.cache  # (once: the filter below is added to a logger)
def bitsandbytes():
    # LLM.int8 multiplies in fp16 by design; bitsandbytes logs that for every fp32 forward (the README says it once).
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: not record.getMessage().startswith("MatMul8bitLt: inputs will be cast"))
    # On CPUs with AVX-512 BF16 it tries a faster nf4 kernel from the Hub through the `kernels` package, and warns
    # when it cannot: its own fallback is what sdlora measured (README, QLoRA), and nothing should be fetched.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return optional.load("bitsandbytes")


def torchao():
    # torchao logs a line for each optional CUDA kernel library it cannot load, and torch a deprecation about one
    # of torchao's registrations: advice for their developers, not for a user quantizing on the CPU.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return optional.load("torchao.quantization")


class QuantizedConv2d(torch.nn.Conv2d):
    """A Conv2d whose weight is held quantized in `qweight`, as a 2-D matrix (out, in·kh·kw) both backends quantize,
    and dequantized for each forward: convolutions are most of SD 1.x's UNet (60% of its weights). `weight` stays a
    4-D tensor of the right shape, dtype and device that stores nothing (one zero, expanded), so peft puts its
    ordinary conv LoRA layer on it and every shape check sees the real layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "qweight" not in self._buffers:  # peft makes its LoRA convs of the base layer's class: plain ones
            return super().forward(x)
        w = dequantize(self.qweight).reshape(self.weight.shape).to(x.dtype)
        return self._conv_forward(x, w, None if self.bias is None else self.bias.to(x.dtype))


def quantize(model: torch.nn.Module, kind: str, backend: str) -> int:
    """Quantize the Linear and Conv2d layers of a frozen model in place (before LoRA is added; bitsandbytes computes in
    the dtype the weights had); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) not in (torch.nn.Linear, torch.nn.Conv2d):
                continue
            matrix = m.weight.detach().flatten(1)
            if kind == "nf4" and matrix.numel() % NF4_BLOCK:
                continue  # too odd a shape for 4-bit blocks: kept as it is
            if isinstance(m, torch.nn.Conv2d):
                m.__class__ = QuantizedConv2d
                m.register_buffer("qweight", _pack(matrix, kind, backend), persistent=False)
                placeholder = torch.zeros((), dtype=m.weight.dtype, device=m.weight.device).expand(m.weight.shape)
                m.weight = torch.nn.Parameter(placeholder, requires_grad=False)
            elif backend == "bitsandbytes":
                setattr(parent, name, _bnb_linear(m, _pack(matrix, kind, backend)))
            else:
                m.weight = torch.nn.Parameter(_pack(matrix, kind, backend), requires_grad=False)
            count += 1
    if backend == "bitsandbytes" and count:  # so peft puts its bitsandbytes LoRA layers on them
        setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return count


def _pack(matrix: torch.Tensor, kind: str, backend: str) -> torch.Tensor:
    """One weight matrix (out, in) quantized where it lies."""
    if backend == "bitsandbytes":
        nn = bitsandbytes().nn
        if kind == "int8":
            packed = nn.Int8Params(matrix, requires_grad=False, has_fp16_weights=False)
        else:
            packed = nn.Params4bit(matrix, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=True,
                                   quant_type="nf4")
        return packed._quantize(matrix.device)  # (its .to() quantizes too, but an int8 one only from the CPU)
    q = torchao()
    if kind == "int8":
        return q.Int8Tensor.from_hp(matrix, q.PerRow())
    scalers = matrix.numel() // NF4_BLOCK
    scaler_block = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if scalers % b == 0)
    return q.to_nf4(matrix, block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def _bnb_linear(linear: torch.nn.Linear, packed: torch.Tensor) -> torch.nn.Module:
    nn = bitsandbytes().nn
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    if hasattr(packed, "quant_state"):  # nf4
        new = nn.Linear4bit(*shape, compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
        packed.module, new.quant_state = new, packed.quant_state
        # On CPUs with AVX-512 BF16, bitsandbytes repacks the weight in place on its first forward without
        # gradients, for a faster kernel that needs in_features a multiple of 64 (the tiny bases' 32 fail) and leaves
        # a layout other code cannot dequantize: one format throughout, as on every other CPU and on CUDA.
        new.support_avx512bf16_for_cpu = False
    else:
        new = nn.Linear8bitLt(*shape, has_fp16_weights=False, device="meta")
    new.weight = packed
    new.bias = linear.bias
    return new.train(linear.training)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # torchao's NF4Tensor
        return weight.get_original_weight()
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes' Params4bit
        return bitsandbytes().functional.dequantize_4bit(weight, weight.quant_state)
    if getattr(weight, "SCB", None) is not None:  # bitsandbytes' Int8Params: int8 rows and their scales
        return bitsandbytes().functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    return weight.dequantize() if is_quantized(weight) else weight


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take, quantized tensors counted by what they store (data and scales)."""
    tensors = [p if _is_bnb(p) else p.data for p in model.parameters()]
    tensors += [b for n, b in model.named_buffers() if n.endswith("qweight")]
    return sum(_stored_bytes(t) for t in tensors)


def _is_bnb(t: torch.Tensor) -> bool:
    return hasattr(t, "quant_state") or hasattr(t, "SCB")


def _stored_bytes(t: torch.Tensor) -> int:
    if not is_quantized(t):
        return t.untyped_storage().nbytes() if 0 in t.stride() else t.numel() * t.element_size()
    if _is_bnb(t):  # the packed data, and the scales beside it
        scales = t.quant_state.as_dict().values() if hasattr(t, "quant_state") else [t.SCB]
        return t.numel() * t.element_size() + sum(_stored_bytes(v) for v in scales if isinstance(v, torch.Tensor))
    inner, _ = t.__tensor_flatten__()
    return sum(_stored_bytes(getattr(t, name)) for name in inner)
