"""`sdlora inspect` and `sdlora convert`: what a LoRA file is, and the same LoRA in another layout."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from . import formats
from .archs import TITLES, meta_models
from .config import BUILTINS
from .embeddings import bundle_raw
from .errors import FormatError
from .lorafile import EMBEDDING_KEYS, Fit, LoraFile, dora_axis, fit, read_lora, trigger_words
from .metadata import data_hash
from .safefiles import atomic_write_bytes, read_header, read_safetensors_bytes

log = logging.getLogger("sdlora")

TRAINING_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution",
                 "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                 "ss_optimizer", "ss_lr_scheduler", "ss_min_snr_gamma", "ss_noise_offset", "ss_seed",
                 "ss_sd_model_name", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
                 "sdlora_train_weight", "sdlora_train_weight_min", "sdlora_preferred_weight", "sdlora_ema_decay",
                 "sdlora_quantized_base", "sdlora_quantize_backend")


def reference(lf: LoraFile, base: str | None):
    """The models whose module names a file is read against: a given base; else the built-in base (toy, tiny-sd,
    tiny-sdxl) the file's metadata says it was trained on, which is always at hand; else the full-size family
    layout."""
    if not base and lf.metadata.get("sdlora_builtin_base") in BUILTINS:
        base = lf.metadata["sdlora_builtin_base"]
        log.info(f"{lf.path.name} was trained on the built-in base {base!r}: read against it (--base to change)")
    if base:
        from .models import load_base

        b = load_base(base)
        return b.modules(), b.family, b.name
    if lf.family is None:
        raise FormatError(f"{lf.path}: cannot tell which model family this LoRA is for (no metadata, unfamiliar "
                          "shapes); pass --base with the model it was trained on")
    return meta_models(lf.family), lf.family, f"the {TITLES[lf.family]} layout"


def info(path: Path) -> dict:
    header, meta = read_header(path)
    if set(header) in EMBEDDING_KEYS:
        return _embedding_info(Path(path), header, meta)
    lf = read_lora(path)
    components = Counter()
    for name in lf.modules:
        if name.startswith("lora_unet_") or name.startswith("unet."):
            components["unet"] += 1
        elif name.startswith(("lora_te2_", "text_encoder_2.")):
            components["text_encoder_2"] += 1
        else:
            components["text_encoder"] += 1
    ranks = Counter(m.rank or "full" for m in lf.modules.values())  # (0: a LoKr factor not split in two)
    alphas = Counter(m.alpha if m.alpha is not None else float(m.rank) for m in lf.modules.values())
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for k, t in lf.raw.items() if not k.endswith("alpha"))
    meta = lf.metadata
    digest = lf.sha256
    triggers = trigger_words(path, meta, lf.bundles)
    tags = Counter()
    try:
        for folder in json.loads(meta.get("ss_tag_frequency", "{}")).values():
            tags.update(folder)
    except (json.JSONDecodeError, AttributeError, TypeError):
        pass
    return {
        "file": Path(path).name,
        "format": lf.layout if lf.kind == "lora" else f"{lf.layout} ({lf.kind})",
        "kind": lf.kind,
        "family": lf.family,
        "family_source": lf.family_source,
        "modules": dict(components),
        "ranks": {str(k): v for k, v in sorted(ranks.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "parameters": sum(t.numel() for k, t in lf.raw.items() if not k.endswith("alpha")),
        "file_bytes": Path(path).stat().st_size,
        "precision": dict(dtypes),
        "trigger_words": triggers,
        "bundled_embeddings": {t: {k: list(v.shape) for k, v in parts.items()} for t, parts in lf.bundles.items()},
        "top_tags": [t for t, _ in tags.most_common(10)],
        "training": {k: meta[k] for k in TRAINING_KEYS if k in meta},
        "effective_learning_rate": _effective_lr(meta, lf),
        "sshs_model_hash": meta.get("sshs_model_hash", ""),
        "computed_hash": digest,
        "short_hash": digest[:12],
        "hash_matches_metadata": meta.get("sshs_model_hash") in (None, digest),
    }


EMBEDDING_FAMILIES = {(768,): "sd1", (1024,): "sd2", (768, 1280): "sdxl"}  # by the widths of the vectors, sorted


def _embedding_info(path: Path, header: dict, meta: dict[str, str]) -> dict:
    """A textual-inversion file (`--embedding-only` writes one): its vectors, per text encoder."""
    shapes = {k: v["shape"] for k, v in sorted(header.items())}
    family = EMBEDDING_FAMILIES.get(tuple(sorted(s[-1] for s in shapes.values())))
    digest = data_hash(read_safetensors_bytes(path)[2])
    return {
        "file": path.name, "format": "textual-inversion embedding", "kind": "embedding", "family": family,
        "family_source": "vector widths" if family else "unknown",
        "vectors": {k: {"count": s[0] if len(s) > 1 else 1, "width": s[-1]} for k, s in shapes.items()},
        "file_bytes": path.stat().st_size,
        "precision": dict(Counter(v["dtype"] for v in header.values())),
        "trigger_words": [path.stem],  # A1111 and ComfyUI: the file name in the prompt
        "training": {k: meta[k] for k in TRAINING_KEYS if k in meta},
        "computed_hash": digest, "short_hash": digest[:12],
    }


def _effective_lr(meta: dict, lf) -> float | None:
    """The UNet learning rate as it acted, lr x alpha / rank, when the metadata gives it and one scale holds (LoRA
    and DoRA: LoHa's and LoKr's updates are products, so alpha / rank does not scale them the same way)."""
    if not set(lf.kinds) <= {"lora", "dora"}:
        return None
    scales = {m.scale for m in lf.modules.values()}
    try:
        lr = float(meta.get("ss_unet_lr") or meta.get("ss_learning_rate") or "nan")
    except ValueError:
        return None
    return lr * scales.pop() if len(scales) == 1 and lr == lr else None


KIND_TITLES = {"lora": "LoRA", "dora": "DoRA", "loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}


def format_info(d: dict) -> str:
    if d["kind"] == "embedding":
        return "\n".join([
            f"{d['file']}: textual-inversion embedding for {TITLES.get(d['family'], 'an unknown family')}"
            + (f" (family from {d['family_source']})" if d["family"] else ""),
            "vectors: " + ", ".join(f"{k} {v['count']} x {v['width']}" for k, v in d["vectors"].items()),
            f"file {d['file_bytes'] / 1e6:.2f} MB; precision {', '.join(d['precision'])}",
            f"use: write {d['trigger_words'][0]} in the prompt (A1111, ComfyUI), or diffusers' "
            "load_textual_inversion(path, token=...)",
            *(f"{k}: {v}" for k, v in d["training"].items()),
            f"hash: {d['computed_hash']} (short {d['short_hash']})"])
    kinds = " + ".join(KIND_TITLES.get(k, k) for k in d["kind"].split("+"))
    lines = [f"{d['file']}: {d['format'].split(' ')[0]} {kinds} for {TITLES.get(d['family'], 'an unknown family')} "
             f"(family from {d['family_source']})",
             "modules: " + ", ".join(f"{k} {v}" for k, v in d["modules"].items()),
             "rank: " + ", ".join(f"{k} ({v} modules)" for k, v in d["ranks"].items()),
             "alpha: " + ", ".join(f"{k} ({v} modules)" for k, v in d["alphas"].items()),
             f"parameters: {d['parameters']:,}; file {d['file_bytes'] / 1e6:.2f} MB; precision "
             + ", ".join(d["precision"]),
             f"trigger words: {', '.join(d['trigger_words']) or '(none)'}"]
    for token, parts in d["bundled_embeddings"].items():
        lines.append(f"bundled embedding {token}: " + ", ".join(f"{k} {v[0]} x {v[-1]}" for k, v in parts.items()))
    if d["top_tags"]:
        lines.append(f"top tags: {', '.join(d['top_tags'])}")
    for k, v in d["training"].items():
        lines.append(f"{k}: {v}")
    if d["effective_learning_rate"] is not None:
        lines.append(f"effective learning rate (lr x alpha / rank): {d['effective_learning_rate']:.3g}")
    note = "" if d["hash_matches_metadata"] else " (metadata hash differs: the file was changed after saving)"
    lines.append(f"hash: {d['computed_hash']} (A1111 short hash {d['short_hash']}){note}")
    return "\n".join(lines)


def _peft_magnitude(src: Path, t) -> torch.Tensor:
    """A DoRA module's magnitude in peft's shape ((out,) for Linear, (1, out, 1, 1) for Conv2d)."""
    magnitude, weight = t.module.tensors["dora_scale"], t.layer.weight
    if dora_axis(t.module.name, tuple(magnitude.shape), tuple(weight.shape)) != "out":
        raise FormatError(f"{src}: module {t.module.name} scales DoRA per input channel (A1111's reading); peft and "
                          "diffusers scale per output channel, so it has no equivalent there")
    return magnitude.reshape(-1) if weight.dim() == 2 else magnitude.reshape(1, -1, 1, 1)


def convert(src: Path, dst: Path, to: str, *, base: str | None = None, overwrite: bool = False) -> tuple[Path, Fit]:
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise FormatError(f"output {dst} must end in .safetensors")
    if dst.exists() and not overwrite:
        raise FormatError(f"{dst} already exists; choose another name or pass --overwrite")
    lf = read_lora(src)
    if not set(lf.kinds) <= {"lora", "dora"}:
        raise FormatError(f"{src}: {lf.kind} modules cannot be written as plain LoRA; sdlora reads them for "
                          "generation only")
    if any("mid" in m.tensors for m in lf.modules.values()):
        raise FormatError(f"{src}: LoCon modules with a Tucker core (lora_mid) have no diffusers equivalent")
    models, family, ref_name = reference(lf, base)
    result = fit(lf, models, family, ref_name)
    if result.unmatched:
        raise FormatError(f"{src}: {result.report()}; conversion must be total (pass --base for a custom model)")
    states: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, dict[str, int]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for t in result.targets:
        states.setdefault(t.component, {})[f"{t.path}.lora_A.weight"] = t.module.tensors["down"]
        states[t.component][f"{t.path}.lora_B.weight"] = t.module.tensors["up"]
        if t.module.kind == "dora":
            states[t.component][f"{t.path}.lora_magnitude_vector"] = _peft_magnitude(src, t)
        ranks.setdefault(t.component, {})[t.path] = t.module.rank
        alphas.setdefault(t.component, {})[t.path] = t.module.alpha if t.module.alpha is not None else float(t.module.rank)
    meta = {k: v for k, v in lf.metadata.items() if k not in ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")}
    if to == "kohya":
        tensors = formats.peft_to_kohya(states, alphas, family, models["unet"].config)
    elif to == "diffusers":
        tensors = formats.peft_to_diffusers(states)
        targets = {c: sorted(p.rsplit(".lora_", 1)[0] for p in s if p.endswith("lora_A.weight")) for c, s in states.items()}
        meta["lora_adapter_metadata"] = formats.diffusers_adapter_metadata(ranks, alphas, targets,
                                                                           use_dora="dora" in lf.kinds)
    else:
        raise FormatError(f"unknown target layout {to!r}; choose kohya or diffusers")
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in (tensors | bundle_raw(lf.bundles)).items()}  # bundled tokens kept
    blob = save(tensors, metadata=meta)
    blob = save(tensors, metadata={**meta, "sshs_model_hash": data_hash(blob)})
    atomic_write_bytes(dst, blob)
    return dst, result
