"""`sdlora extract`: a LoRA approximating the difference between two models of one family (a full fine-tune and
its base, say), module by module: ΔW = W_tuned - W_base, reduced by SVD to the rank asked for.

The modules are those LoRA training targets (kohya's set: attention, projections and feed-forward of the UNet's
transformers, attention and MLP of the text encoders) and, with a conv rank, the resnet and sampler convolutions
(LoCon). 1x1 convolutions (SD 1.x's transformer projections) are matrices and take the rank of the linear layers.
A module the fine-tune left unchanged is left out; a fine-tune stored in fp16 or bf16 is compared with the base
rounded the same way, so that rounding is not extracted as a change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import lora
from ..errors import ConfigError, ModelError
from ..metadata import BASE_VERSION
from ..models import load_base
from .updates import Update, check_rank, lora_bytes, low_rank, summary_metadata, write_new

UNCHANGED = 1e-6  # a module whose ||ΔW|| is below this fraction of ||W|| was not tuned


@dataclass
class ExtractResult:
    updates: list[Update]
    rows: list[dict]  # per module: name, rank, relative error
    family: str
    unet_config: object
    metadata: dict[str, str]


@torch.no_grad()
def extract(base: str, tuned: str, rank: int, conv_rank: int | None = None, base_config: str | None = None) -> ExtractResult:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ConfigError(f"ranks must be at least 1, got --rank {rank} --conv-rank {conv_rank}")
    a, b = load_base(base, config=base_config), load_base(tuned, config=base_config)
    if a.family != b.family:
        raise ModelError(f"{base} is {a.family} and {tuned} is {b.family}: extract needs two models of one family")
    models_a, models_b = a.modules(), b.modules()
    updates, rows = [], []
    for component in [c for c in models_a if c != "vae"]:
        kind = "unet" if component == "unet" else "text_encoder"
        paths = lora.targeted_modules(models_a[component], "attn-mlp", kind)
        if conv_rank is not None and component == "unet":
            paths += [p for p in lora.targeted_modules(models_a[component], "full", kind)
                      if isinstance(models_a[component].get_submodule(p), torch.nn.Conv2d) and p not in paths]
        for path in paths:
            w_a = models_a[component].get_submodule(path).weight.float()
            w_b = models_b[component].get_submodule(path).weight.float()
            if w_a.shape != w_b.shape:
                raise ModelError(f"{component}.{path} is {tuple(w_a.shape)} in {base} and {tuple(w_b.shape)} in "
                                 f"{tuned}: not the same architecture")
            stored = _stored_precision(w_b)
            delta = w_b - (w_a if stored is None else w_a.to(stored).float())
            if float(delta.norm()) <= UNCHANGED * float(w_a.norm()):
                continue
            r = conv_rank if w_a.dim() == 4 and w_a.shape[-2:] != (1, 1) else rank
            probe = Update(component, path, tuple(w_a.shape))
            check_rank(probe, r)
            down, up, _, r, err = low_rank(delta, r)
            updates.append(Update(component, path, tuple(w_a.shape), down, up, float(r)))
            rows.append({"module": f"{component}.{path}", "rank": r, "relative_error": err})
    if not updates:
        raise ModelError(f"{tuned} and {base} have the same weights in every module a LoRA can hold; nothing to extract")
    meta = summary_metadata({}, updates, sdlora_extracted_from={"base": Path(base).name, "tuned": Path(tuned).name},
                            sdlora_extract_rank=str(rank), sdlora_extract_conv_rank=str(conv_rank or 0))
    meta["ss_base_model_version"] = BASE_VERSION.get((a.family, a.prediction_type), a.family)
    return ExtractResult(updates, rows, a.family, a.unet.config, meta)


def _stored_precision(w: torch.Tensor) -> torch.dtype | None:
    """fp16 or bf16 when every value of `w` is one of theirs (a model saved in that precision), else None."""
    for dtype in (torch.bfloat16, torch.float16):  # (bf16 first: most bf16 values are fp16 values too)
        if torch.equal(w.to(dtype).float(), w):
            return dtype
    return None


def write_extract(result: ExtractResult, out: Path, overwrite: bool = False) -> Path:
    return write_new(out, lora_bytes(result.updates, result.family, result.unet_config, result.metadata), overwrite)
