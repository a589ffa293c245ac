"""`sdlora resize`: a LoRA at a lower rank, by SVD of each module's update.

To a fixed rank, or per module to the smallest rank keeping a fraction of the update's squared Frobenius norm
(`energy`). The scale alpha/rank of each module is kept (alpha is rewritten), so a resized LoRA behaves like its
source at the same weight and trains on with the same learning rate. A module never grows: one at or below the rank
asked for keeps its own (a file whose every module is below it is refused). Written in the source's precision unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..convert import reference
from ..embeddings import bundle_raw
from ..errors import ConfigError
from ..formats import precision_of
from ..lorafile import read_lora
from .updates import Update, check_rank, lora_bytes, low_rank, read_updates, summary_metadata, write_new


@dataclass
class ResizeResult:
    updates: list[Update]
    rows: list[dict]  # per module: name, rank before and after, relative error
    family: str
    unet_config: object
    metadata: dict[str, str]
    bytes_before: int
    bundles: dict = field(default_factory=dict)  # the file's bundled embeddings, kept as they are
    precision: str = "fp32"  # the source's


def resize(path: Path, rank: int | None = None, energy: float | None = None, base: str | None = None) -> ResizeResult:
    if (rank is None) == (energy is None):
        raise ConfigError("give either --rank R or --energy F")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")
    lf = read_lora(path)
    models, family, ref_name = reference(lf, base)
    _, updates = read_updates(path, models, family, ref_name)
    if rank is not None and all(u.rank and u.rank < rank for u in updates):
        raise ConfigError(f"{path} is of rank {max(u.rank for u in updates)} at most; --rank {rank} would only pad "
                          "it with zeros. Choose a lower rank.")
    out, rows = [], []
    for u in updates:
        if rank is not None:
            check_rank(u, rank)
        scale = u.scale
        down, up, _, r, err = low_rank(u.delta(), min(rank, u.rank) if rank and u.rank else rank, energy)
        out.append(Update(u.component, u.path, u.shape, down, up / scale, scale * r))
        rows.append({"module": f"{u.component}.{u.path}", "rank_before": u.rank or None, "rank_after": r,
                     "relative_error": err})
    decisions = f"rank {rank}" if rank is not None else f"energy {energy:g}"
    meta = summary_metadata(lf.metadata, out, sdlora_resized_from={"file": Path(path).name,
                                                                   "short_hash": lf.sha256[:12]},
                            sdlora_resize=decisions)
    return ResizeResult(out, rows, family, models["unet"].config, meta, Path(path).stat().st_size,
                        bundle_raw(lf.bundles), precision_of(lf.raw))


def write_resize(result: ResizeResult, out: Path, overwrite: bool = False, precision: str | None = None) -> Path:
    """`precision`: fp16, bf16 or fp32 (default: the source's)."""
    return write_new(out, lora_bytes(result.updates, result.family, result.unet_config, result.metadata,
                                     extra=result.bundles, precision=precision or result.precision), overwrite)
