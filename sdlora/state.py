"""Resumable training state in safetensors (no pickle): LoRA weights, optimizer moments, schedule, step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import FormatError
from .metadata import data_hash
from .safefiles import atomic_write_bytes, read_safetensors_bytes

STATE_RE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})\.state\.safetensors$")


def state_path(output_dir: Path, name: str, step: int) -> Path:
    return Path(output_dir) / "state" / f"{name}-step{step:06d}.state.safetensors"


def states(output_dir: Path, name: str) -> list[Path]:
    """The run's saved states, newest first."""
    folder = Path(output_dir) / "state"
    found = []
    for p in folder.glob("*.state.safetensors") if folder.is_dir() else []:
        m = STATE_RE.match(p.name)
        if m and m.group("name") == name:
            found.append((int(m.group("step")), p))
    return [p for _, p in sorted(found, reverse=True)]


def earlier_run(output_dir: Path, name: str) -> list[Path]:
    """The saved states and step checkpoints (`NAME-stepNNNNNN.safetensors`) of a run named `name` in a folder."""
    pattern = re.compile(rf"^{re.escape(name)}-step\d{{6,}}\.safetensors$")
    folder = Path(output_dir)
    checkpoints = sorted(p for p in folder.glob("*.safetensors") if pattern.match(p.name)) if folder.is_dir() else []
    return states(folder, name) + checkpoints


def latest_state(output_dir: Path, name: str) -> Path | None:
    found = states(output_dir, name)
    return found[0] if found else None


def save_state(path: Path, *, step: int, lora: dict[str, dict[str, torch.Tensor]], optimizer, scheduler,
               extra: dict, manifest: dict | None = None) -> None:
    """The state, with a manifest (step, a hash of the tensor data, and what the caller adds: the checkpoint
    adapter's hash, the config's and the dataset listing's) that load_state verifies."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for component, state in lora.items():
        for k, v in state.items():
            tensors[f"lora.{component}.{k}"] = v.float()
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, pstate in opt["state"].items():
        _split(pstate, f"optim.{pid}", tensors, scalars.setdefault(str(pid), {}))
    meta = {
        "step": str(step),
        "param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
        "extra": json.dumps(extra),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    seen: set[int] = set()
    for k, v in tensors.items():  # safetensors stores no shared memory (8-bit optimizers share their quantile maps)
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    digest = data_hash(save(tensors, metadata=meta))  # the tensor bytes do not depend on the metadata
    meta["manifest"] = json.dumps({"step": step, "tensors_sha256": digest, **(manifest or {})})
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _split(state: dict, prefix: str, tensors: dict, scalars: dict) -> None:
    """An optimizer's per-parameter state into tensors (`prefix.key`) and JSON scalars. Nested dicts keep their
    nesting in dotted keys (bitsandbytes' 8-bit optimizers keep their quantized states in one)."""
    for k, v in state.items():
        if torch.is_tensor(v):
            tensors[f"{prefix}.{k}"] = v
        elif isinstance(v, dict):
            _split(v, f"{prefix}.{k}", tensors, scalars.setdefault(k, {}))
        else:
            scalars[k] = v


def _merge(into: dict, more: dict) -> None:
    for k, v in more.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


def load_state(path: Path) -> dict:
    """Read a state file into {'step', 'lora', 'optimizer', 'scheduler', 'extra', 'manifest'}, after checking
    that its tensors are the ones that were written (a state from before manifests is taken as it is)."""
    tensors, meta, blob = read_safetensors_bytes(Path(path), check_finite=False)
    try:
        manifest = json.loads(meta.get("manifest", "{}"))
        if manifest and (manifest.get("tensors_sha256") != data_hash(blob) or manifest.get("step") != int(meta["step"])):
            raise FormatError(f"{path}: the state is damaged (its tensors do not match the hash it was saved "
                              "with); resume from an earlier state")
        step = int(meta["step"])
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["optim_scalars"])
        sched = json.loads(meta["scheduler"])
        extra = json.loads(meta["extra"])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: not an sdlora training state ({e})") from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    opt_state: dict[int, dict] = {}
    for key, t in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "lora":
            component, k = rest.split(".", 1)
            lora.setdefault(component, {})[k] = t
        elif kind == "optim":
            pid, *keys = rest.split(".")
            node = opt_state.setdefault(int(pid), {})
            for name in keys[:-1]:
                node = node.setdefault(name, {})
            node[keys[-1]] = t
    for pid, vals in scalars.items():
        _merge(opt_state.setdefault(int(pid), {}), vals)
    return {"step": step, "lora": lora, "optimizer": {"state": opt_state, "param_groups": groups},
            "scheduler": sched, "extra": extra, "manifest": manifest}
