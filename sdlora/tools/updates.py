"""A LoRA as what it does to each layer, and back to a file.

`Update` is one module's ΔW, kept as its low-rank factors when it has them (ΔW = alpha/rank · up @ down; a LoCon
Tucker core is folded into `down`, exactly) and as the full update otherwise (DoRA, LoHa, LoKr). Everything is fp32.
`low_rank` is the one SVD every tool uses; `lora_bytes` writes updates in the kohya or diffusers layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import formats
from ..errors import FormatError
from ..lorafile import FileModule, LoraFile, fit, read_lora
from ..metadata import data_hash
from ..safefiles import atomic_write_bytes


@dataclass
class Update:
    component: str  # unet, text_encoder, text_encoder_2
    path: str  # the module's path in that component
    shape: tuple[int, ...]  # the layer's weight shape
    down: torch.Tensor | None = None  # (rank, in) or (rank, in, kh, kw); None when only `full` is known
    up: torch.Tensor | None = None  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None = None  # None: scale 1
    full: torch.Tensor | None = None  # ΔW itself, for updates without factors

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or not self.rank else self.alpha / self.rank

    @property
    def max_rank(self) -> int:
        return min(self.shape[0], int(torch.Size(self.shape[1:]).numel()))

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the layer's weight."""
        if self.down is None:
            return self.full
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.shape) * self.scale


def from_module(component: str, path: str, shape: tuple[int, ...], m: FileModule,
                base: torch.Tensor | None = None) -> Update:
    """`base`: the layer's weight, which a DoRA module's update depends on."""
    t = {k: v.float() for k, v in m.tensors.items() if k != "alpha"}
    if m.kind != "lora":
        return Update(component, path, shape, full=m.delta(shape, base=base))
    down, up = t["down"], t["up"]
    if "mid" in t:  # Tucker LoCon: ΔW[o,i,h,w] = Σ up[o,m] mid[m,n,h,w] down[n,i], so down'[m,i,h,w] = Σ_n mid·down
        down = torch.einsum("mnhw,ni->mihw", t["mid"], down.flatten(1))
    rank = down.shape[0]
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    else:
        down, up = down.reshape(rank, -1), up.reshape(shape[0], rank)
    return Update(component, path, shape, down, up, m.alpha)


def read_updates(path: Path, models: dict, family: str, base_name: str) -> tuple[LoraFile, list[Update]]:
    """Every module of a LoRA file as an Update, matched against `models`. Conversion is total: a module that
    matches no layer is an error."""
    lf = read_lora(path)
    result = fit(lf, models, family, base_name)
    if result.unmatched:
        raise FormatError(f"{path}: {result.report()}; pass --base with the model it was made for")
    return lf, [from_module(t.component, t.path, tuple(t.layer.weight.shape), t.module, t.layer.weight.detach())
                for t in result.targets]


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """The best rank-r approximation of ΔW (Eckart-Young): r given, or the smallest keeping `energy` of the
    squared Frobenius norm. Returns (down, up, singular values, r, relative error), down/up shaped for the layer
    (conv: down (r, in, kh, kw), up (out, r, 1, 1)) with the singular values in `up`."""
    shape = tuple(delta.shape)
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        total = float((s**2).sum())
        kept = torch.cumsum(s**2, 0) / total if total > 0 else torch.ones_like(s)
        rank = int((kept < energy - 1e-12).sum()) + 1
    rank = max(1, min(rank, s.numel()))
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    norm = float(matrix.norm())
    error = float((matrix - up @ down).norm()) / norm if norm > 0 else 0.0
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    return down.contiguous(), up.contiguous(), s, rank, error


def check_rank(u: Update, rank: int) -> None:
    if rank > u.max_rank:
        raise FormatError(f"rank {rank} is larger than module {u.component}.{u.path} {u.shape} allows "
                          f"({u.max_rank}); choose a rank of at most {u.max_rank}")


def lora_bytes(updates: list[Update], family: str, unet_config, metadata: dict[str, str],
               layout: str = "kohya", extra: dict[str, torch.Tensor] | None = None, precision: str = "fp32") -> bytes:
    """Updates with factors as one LoRA file (the factors in `precision`, alphas in fp32), per-module ranks and
    alphas kept, hashes filled in; `extra` tensors (bundled embeddings) as they are."""
    from safetensors.torch import save

    states: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, dict[str, int]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for u in updates:
        if u.down is None:
            raise FormatError(f"module {u.component}.{u.path} has no low-rank factors; give a rank")
        states.setdefault(u.component, {})[f"{u.path}.lora_A.weight"] = u.down.float().contiguous()
        states[u.component][f"{u.path}.lora_B.weight"] = u.up.float().contiguous()
        ranks.setdefault(u.component, {})[u.path] = u.rank
        alphas.setdefault(u.component, {})[u.path] = float(u.alpha if u.alpha is not None else u.rank)
    meta = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "sshs_model_hash",
                                                           "sshs_legacy_hash")}
    if layout == "kohya":
        tensors = formats.peft_to_kohya(states, alphas, family, unet_config)
    elif layout == "diffusers":
        tensors = formats.peft_to_diffusers(states)
        targets = {c: sorted(ranks[c]) for c in states}
        meta["lora_adapter_metadata"] = formats.diffusers_adapter_metadata(ranks, alphas, targets)
    else:
        raise FormatError(f"unknown layout {layout!r}; choose kohya or diffusers")
    tensors = {k: v.contiguous() for k, v in (formats.cast(tensors, precision) | (extra or {})).items()}
    blob = save(tensors, metadata=meta)
    return save(tensors, metadata={**meta, "sshs_model_hash": data_hash(blob)})


def write_new(path: Path, blob: bytes, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise FormatError(f"output {path} must end in .safetensors")
    if path.exists() and not overwrite:
        raise FormatError(f"{path} already exists; choose another name or pass --overwrite")
    atomic_write_bytes(path, blob)
    return path


def summary_metadata(source: dict[str, str], updates: list[Update], **extra) -> dict[str, str]:
    """The first input's descriptive metadata, with the network size rewritten and sdlora's notes added."""
    keep = {k: v for k, v in source.items() if k.startswith(("modelspec.", "ss_base_model_version", "ss_v2",
                                                                "ss_v_parameterization", "ss_sd_model_name",
                                                                "ss_tag_frequency", "ss_output_name"))}
    rank = max((u.rank for u in updates), default=0)
    keep |= {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
             "ss_network_alpha": str(rank)}
    return keep | {k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}
