"""Writing a trained adapter to disk: tensors in kohya or diffusers layout, metadata and hashes, atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from . import formats
from .errors import TrainingError
from .metadata import data_hash
from .safefiles import atomic_write_bytes


def adapter_bytes(states: dict[str, dict[str, torch.Tensor]], *, family: str, rank: int, alpha: float,
                  targets: dict[str, list[str]], layout: str, precision: str, metadata: dict[str, str],
                  unet_config=None, extra: dict[str, torch.Tensor] | None = None, kind: str = "lora") -> bytes:
    """Serialise adapter states to safetensors bytes with metadata and the content hashes filled in; `extra`
    tensors (bundled embeddings) go in as they are, in fp32."""
    if kind == "lokr":
        states, alpha = formats.lokr_unit_scale(states, rank, alpha), float(rank)
    if layout == "kohya":
        tensors = formats.peft_to_kohya(states, {c: alpha for c in states}, family, unet_config)
    else:
        tensors = formats.peft_to_diffusers(states)
        metadata = {**metadata, "lora_adapter_metadata": formats.diffusers_adapter_metadata(
            {c: rank for c in states}, {c: alpha for c in states}, targets, use_dora=kind == "dora")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in formats.cast(tensors, precision).items()}
    return safetensors_bytes(tensors | (extra or {}), metadata)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Tensors to safetensors bytes with kohya's hash of the tensor data in the metadata. Nothing non-finite is
    ever written: such a file would only fail later, in every program that loads it."""
    from safetensors.torch import save

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"refusing to write an adapter with NaN or Inf values (in {bad[0]} and "
                            f"{len(bad) - 1} more); the training diverged, lower the learning rate")

    blob = save(tensors, metadata=metadata)
    # The tensor bytes do not depend on the metadata, so the hash of this blob holds for the final one.
    meta = {**metadata, "sshs_model_hash": data_hash(blob)}
    return save(tensors, metadata=meta)


def write_adapter(path: Path, blob: bytes) -> None:
    atomic_write_bytes(path, blob)
