"""`sdlora merge`: several LoRAs at their weights as one LoRA.

Without a rank the factors are concatenated, which is exact: Σ w_i·s_i·up_i·down_i = [w_1 s_1 up_1 | ...] @
[down_1; ...]. With a rank, each module's summed update is reduced by SVD to that rank and the relative error is
reported. LoHa and LoKr have no factors to concatenate, so a merge that includes them needs a rank. A
concatenation is written in fp32 (the scaled factors w·alpha/rank·up are often too small for fp16 to hold exactly), a
reduction in the sources' precision (fp32 when they differ), unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..convert import reference
from ..embeddings import bundle_raw
from ..errors import FormatError
from ..formats import precision_of
from ..lorafile import read_lora
from .updates import Update, check_rank, lora_bytes, low_rank, read_updates, summary_metadata, write_new


@dataclass
class Item:
    path: Path
    unet: float = 1.0
    te: float | None = None  # None: as the UNet's

    @property
    def te_weight(self) -> float:
        return self.unet if self.te is None else self.te


@dataclass
class MergeResult:
    updates: list[Update]
    errors: dict[str, float]  # module -> relative error of the rank reduction (empty when exact)
    family: str
    unet_config: object
    metadata: dict[str, str]
    bundles: dict = field(default_factory=dict)  # every file's bundled embeddings
    precision: str = "fp32"  # fp32 for a concatenation; else the sources' (fp32 when they differ)


def merge(items: list[Item], rank: int | None = None, base: str | None = None, models=None) -> MergeResult:
    """`models`: (modules, family, name) of a base already loaded (the studio's), instead of loading `base`."""
    if not items:
        raise FormatError("give at least one LoRA to merge")
    first = read_lora(items[0].path)
    models, family, ref_name = models or reference(first, base)
    per_module: dict[tuple[str, str], list[tuple[float, Update]]] = {}
    sources, bundles, bundled_by, precisions = [], {}, {}, set()
    for item in items:
        lf, updates = read_updates(item.path, models, family, ref_name)
        if lf.family not in (None, family):
            raise FormatError(f"{item.path} is for {lf.family}, {items[0].path} for {family}: mixed families "
                              "cannot be merged")
        for token in lf.bundles:
            if token in bundled_by:
                raise FormatError(f"{bundled_by[token]} and {item.path} both bundle an embedding for {token!r}; "
                                  "merge them without one of the two, or rename the token in one")
            bundled_by[token] = item.path
        bundles |= bundle_raw(lf.bundles)
        precisions.add(precision_of(lf.raw))
        sources.append({"file": Path(item.path).name, "short_hash": lf.sha256[:12], "unet": item.unet,
                        "te": item.te_weight})
        for u in updates:
            w = item.unet if u.component == "unet" else item.te_weight
            per_module.setdefault((u.component, u.path), []).append((w, u))
    merged, errors = [], {}
    for (component, path), parts in per_module.items():
        shape = parts[0][1].shape
        if rank is None:
            if any(u.down is None for _, u in parts):
                raise FormatError(f"module {component}.{path} comes from a LoHa/LoKr file, which has no low-rank "
                                  "factors to concatenate; give --rank to merge it by SVD")
            down = torch.cat([u.down for _, u in parts])
            up = torch.cat([w * u.scale * u.up for w, u in parts], dim=1)
            merged.append(Update(component, path, shape, down, up, float(down.shape[0])))
        else:
            total = sum(w * u.delta() for w, u in parts)
            check_rank(parts[0][1], rank)
            down, up, _, r, err = low_rank(total, rank)
            merged.append(Update(component, path, shape, down, up, float(r)))
            errors[f"{component}.{path}"] = err
    meta = summary_metadata(first.metadata, merged, sdlora_merged_from=sources,
                            sdlora_merge_rank="concatenated (exact)" if rank is None else str(rank))
    return MergeResult(merged, errors, family, models["unet"].config, meta, bundles,
                       precisions.pop() if len(precisions) == 1 and rank is not None else "fp32")


def write_merge(result: MergeResult, out: Path, overwrite: bool = False, layout: str = "kohya",
                precision: str | None = None) -> Path:
    """`precision`: fp16, bf16 or fp32 (default: the sources')."""
    return write_new(out, lora_bytes(result.updates, result.family, result.unet_config, result.metadata, layout,
                                     result.bundles, precision or result.precision), overwrite)
