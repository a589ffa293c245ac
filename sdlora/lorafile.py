"""Reading LoRA files of every common layout, and fitting them onto a base.

Layouts: kohya (A1111/ComfyUI; LoCon conv modules, `lora_mid`, missing alpha), diffusers (current
`lora_A/lora_B`, older `lora.down/up`, `lora_linear_layer`, attention-processor keys) and peft
(`base_model.model.`), plus LyCORIS LoHa and LoKr, whose update ΔW is computed here since peft cannot
load them. Reading is total: a key that belongs to no module, or a kind sdlora cannot apply, is an
error naming it. Fitting onto a base refuses another family and a LoRA that matches nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .embeddings import split_bundles
from .errors import FormatError
from .formats import kohya_module
from .metadata import FAMILY_OF_VERSION, data_hash
from .safefiles import DTYPES, read_header, read_safetensors_bytes

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
                 "dora_scale": "dora_scale"}
LOHA_SUFFIXES = {f"hada_{w}": w for w in ("w1_a", "w1_b", "w2_a", "w2_b")}
LOKR_SUFFIXES = {f"lokr_{w}": w for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}
UNSUPPORTED = {"hada_t1": "LoHa with Tucker decomposition",
               "hada_t2": "LoHa with Tucker decomposition", "lokr_t2": "LoKr with Tucker decomposition",
               "diff": "full-difference (LyCORIS 'full')", "diff_b": "full-difference (LyCORIS 'full')",
               "w_norm": "LyCORIS GLoRA/IA3", "on_input": "LyCORIS IA3", "oft_blocks": "OFT", "oft_diag": "OFT",
               "b1": "LyCORIS GLoRA", "a1.weight": "LyCORIS GLoRA"}
DIFFUSERS_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                      "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                      "lora_linear_layer.up.weight": "up", "alpha": "alpha",
                      "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class FileModule:
    """One adapted module as the file names it, with its tensors by role (down/up/mid/alpha or w1_a...)."""

    name: str
    kind: str  # lora, dora, loha, lokr
    tensors: dict[str, torch.Tensor]  # a DoRA magnitude is `dora_scale`, shaped as kohya stores it (see `_dora`)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind in ("lora", "dora"):
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["w1_b"].shape[0]
        for k in ("w1_b", "w2_b"):
            if k in t:
                return t[k].shape[0]
        return 0  # LoKr without a low-rank factor

    @property
    def plain(self) -> bool:
        """A plain low-rank pair (down/up, optional alpha), which peft can hold as a LoRA layer; a LoCon Tucker
        core (`lora_mid`), LoHa and LoKr can only be merged, and so is DoRA (see `_dora` on why)."""
        return self.kind == "lora" and "mid" not in self.tensors

    @property
    def scale(self) -> float:
        rank, alpha = self.rank, self.alpha
        if not rank or alpha is None:
            return 1.0
        return alpha / rank

    def delta(self, weight_shape: tuple[int, ...], device: torch.device | str | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (scale included) in fp32, shaped like the module's weight, computed on `device` (default: where the
        file's tensors are; give the weight's device so a GPU base does its own arithmetic). DoRA's update depends
        on the layer's own weight: pass it as `base` (the unmodified base weight)."""
        t = {k: v.to(device, torch.float32) for k, v in self.tensors.items() if k not in ("alpha", "dora_scale")}
        if self.kind in ("lora", "dora"):
            up, down = t["up"].flatten(1), t["down"]
            if "mid" in t:  # LoCon with a Tucker core: ΔW[o,i,h,w] = Σ up[o,m] mid[m,n,h,w] down[n,i]
                d = torch.einsum("om,mnhw,ni->oihw", up, t["mid"], down.flatten(1))
            else:
                d = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        elif self.kind == "loha":
            d = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        else:
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            w2 = t["w2"] if "w2" in t else (t["w2_a"] @ t["w2_b"].flatten(1))
            if len(weight_shape) == 4 and w2.dim() == 2 and "w2_b" in t and t["w2_b"].dim() == 4:
                w2 = w2.reshape(w2.shape[0], *t["w2_b"].shape[1:])
            d = torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)
        if d.numel() != torch.Size(weight_shape).numel():
            raise FormatError(f"module {self.name}: the update has {tuple(d.shape)} values, the layer {tuple(weight_shape)}")
        d = d.reshape(weight_shape) * self.scale
        if self.kind == "dora":
            if base is None:
                raise FormatError(f"module {self.name} is DoRA: its update needs the base layer's weight")
            d = _dora(self.name, self.tensors["dora_scale"].to(device, torch.float32), base.to(device, torch.float32), d)
        return d


def _dora(name: str, magnitude: torch.Tensor, weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """DoRA's update: W' = m · (W + ΔW) / ‖W + ΔW‖, returned as W' - W. The magnitude is per output channel (peft,
    LyCORIS' default wd_on_out: kohya shape (out, 1, ...); diffusers' (out,) and (1, out, 1, 1) are read as
    (out, 1)) or per input channel (the DoRA paper's and A1111's reading: (1, in, ...)); the first dimension tells
    the two apart, as in ComfyUI. The norm is of the updated weight on both axes (as peft trains it; ComfyUI divides by the base's
    own norm on the output axis). A blend weight w gives W + w·(W' - W), as A1111 and ComfyUI apply a DoRA file;
    peft would weight only the direction, so DoRA is merged, never held as a live peft adapter."""
    updated = weight + d
    out, inp = weight.shape[0], weight.shape[1]
    ones = [1] * (weight.dim() - 1)
    if dora_axis(name, tuple(magnitude.shape), tuple(weight.shape)) == "out":
        norm = updated.flatten(1).norm(dim=1).reshape(out, *ones)
        scaled = magnitude.reshape(out, *ones) / norm
    else:
        norm = updated.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, inp, *ones[1:])
        scaled = magnitude.reshape(1, inp, *ones[1:]) / norm
    return updated * scaled - weight


def dora_axis(name: str, magnitude: tuple[int, ...], weight: tuple[int, ...]) -> str:
    out, inp, n = weight[0], weight[1], torch.Size(magnitude).numel()
    if n == out and magnitude[0] == out:
        return "out"
    if n == inp and magnitude[0] == 1:
        return "in"
    raise FormatError(f"module {name}: its DoRA magnitude has shape {list(magnitude)}, which fits neither the {out} "
                      f"outputs nor the {inp} inputs of the layer {weight}")


@dataclass
class LoraFile:
    path: Path
    layout: str  # kohya, diffusers, peft
    kinds: Counter
    modules: dict[str, FileModule]
    metadata: dict[str, str]
    family: str | None
    family_source: str  # metadata, shapes, unknown
    raw: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    sha256: str = ""  # of the tensor data (kohya's sshs_model_hash; A1111 shows the first 12 digits); "" when peeked
    bundles: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # bundled embeddings: token -> tensors

    @property
    def kind(self) -> str:
        return "+".join(sorted(self.kinds))

    @property
    def plain(self) -> bool:
        return all(m.plain for m in self.modules.values())


def read_lora(path: Path) -> LoraFile:
    """The whole file, read from disk once: tensors, metadata and the hash of its tensor data."""
    path = Path(path)
    tensors, meta, blob = read_safetensors_bytes(path)
    lf = _parsed(path, tensors, meta)
    lf.sha256 = data_hash(blob)
    return lf


def peek_lora(path: Path) -> LoraFile:
    """What a LoRA is (layout, kinds, family, ranks, metadata) from its header alone: no tensor is read, and the
    tensors are shape-only (`meta` device). For listing a library; read_lora before applying it."""
    path = Path(path)
    header, meta = read_header(path)
    tensors = {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta") for k, v in header.items()}
    return _parsed(path, tensors, meta)


def trigger_words(path: Path, meta: dict[str, str], bundles=()) -> list[str]:
    """The metadata's trigger phrase, else the A1111 sidecar's `activation text`; bundled tokens always."""
    triggers = [t.strip() for t in meta.get("modelspec.trigger_phrase", "").split(",") if t.strip()]
    sidecar = Path(path).with_suffix(".json")
    if not triggers and sidecar.is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            text = json.loads(sidecar.read_text(encoding="utf-8")).get("activation text", "")
            triggers = [t.strip() for t in str(text).split(",") if t.strip()]
    return triggers + [t for t in bundles if t not in triggers]


def _parsed(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LoraFile:
    if not tensors:
        raise FormatError(f"{path}: the file holds no tensors")
    try:
        return _read_lora(path, tensors, meta)
    except FormatError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        # A well-framed file whose contents are not a consistent LoRA (odd key names, empty or mis-shaped tensors,
        # malformed metadata): one clear error naming the file, never a traceback.
        raise FormatError(f"{path}: not a usable LoRA file ({type(e).__name__}: {e}); re-export it, or ask its "
                          "author for a file in kohya, diffusers or peft layout") from None


EMBEDDING_KEYS = ({"emb_params"}, {"clip_l", "clip_g"}, {"string_to_param.*"})  # textual-inversion files' tensors


def _read_lora(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LoraFile:
    if set(tensors) in EMBEDDING_KEYS:
        raise FormatError(f"{path}: a textual-inversion embedding, not a LoRA; put it where embeddings go "
                          "(A1111's and ComfyUI's embeddings folder, or diffusers' load_textual_inversion)")
    tensors, bundles = split_bundles(path, tensors)
    if not tensors:
        raise FormatError(f"{path}: the file holds bundled embeddings ({', '.join(bundles)}) and no LoRA module")
    keys = list(tensors)
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        layout, modules = "kohya", _group_kohya(path, tensors)
    elif all(k.split(".", 1)[0] in COMPONENTS for k in keys) or all(".processor." in k for k in keys):
        layout, modules = "diffusers", _group_diffusers(path, tensors)
    elif all(k.startswith("base_model.model.") for k in keys):
        layout, modules = "peft", _group_diffusers(path, {"unet." + k[len("base_model.model."):]: v for k, v in tensors.items()})
    else:
        odd = [k for k in keys if not k.startswith(KOHYA_PREFIXES)][:3]
        raise FormatError(f"{path}: not a LoRA layout sdlora knows (kohya, diffusers, peft, LyCORIS LoHa/LoKr); "
                          f"keys such as {odd}")
    _apply_diffusers_alphas(path, modules, meta, layout)
    family, source = _family(modules, meta)
    return LoraFile(path, layout, Counter(m.kind for m in modules.values()), modules, meta, family, source, tensors,
                    bundles=bundles)


def _group_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, FileModule]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = t
    out = {}
    for name, parts in groups.items():
        out[name] = _module(path, name, parts, {**LORA_SUFFIXES, **LOHA_SUFFIXES, **LOKR_SUFFIXES})
    return out


def _module(path: Path, name: str, parts: dict[str, torch.Tensor], roles: dict[str, str]) -> FileModule:
    for suffix in parts:
        base = suffix.removesuffix(".weight")
        if suffix in UNSUPPORTED or base in UNSUPPORTED:
            raise FormatError(f"{path}: module {name} is {UNSUPPORTED.get(suffix) or UNSUPPORTED[base]}, "
                              "which sdlora cannot apply")
        if suffix not in roles:
            raise FormatError(f"{path}: unknown tensor {name}.{suffix}")
    named = {roles[s]: t for s, t in parts.items()}
    if {"down", "up"} <= named.keys():
        kind = "dora" if "dora_scale" in named else "lora"
    elif set(LOHA_SUFFIXES.values()) <= named.keys():
        kind = "loha"
    elif any(k in named for k in ("w1", "w1_a")) and any(k in named for k in ("w2", "w2_a")):
        kind = "lokr"
    else:
        raise FormatError(f"{path}: module {name} is incomplete (has only {sorted(parts)})")
    if "alpha" in named and named["alpha"].numel() != 1:
        raise FormatError(f"{path}: module {name} has an alpha of shape {list(named['alpha'].shape)}; "
                          "alpha must be one number")
    if "dora_scale" in named and kind != "dora":
        raise FormatError(f"{path}: module {name} has a DoRA magnitude but is {kind}; sdlora applies DoRA on LoRA pairs")
    if kind in ("lora", "dora") and (named["down"].dim() not in (2, 4) or named["up"].dim() not in (2, 4)
                           or named["up"].shape[1] != named["down"].shape[0]):
        raise FormatError(f"{path}: module {name} has down {list(named['down'].shape)} and up "
                          f"{list(named['up'].shape)}, which do not make a low-rank pair")
    return FileModule(name, kind, named)


_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _group_diffusers(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, FileModule]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PROCESSOR.match(key)
        if m:
            proj = m.group(2) + (".0" if m.group(2) == "to_out" else "")
            groups.setdefault(f"unet.{m.group(1)}.{proj}", {})[f"lora.{m.group(3)}.weight"] = t
            continue
        for suffix in sorted(DIFFUSERS_SUFFIXES, key=len, reverse=True):
            if key.endswith("." + suffix):
                if suffix.startswith("lora_magnitude_vector"):  # peft's is always per output channel
                    t = t.reshape(-1, 1)
                groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
                break
        else:
            tail = key.rsplit(".", 2)[-2]
            if tail in UNSUPPORTED:
                raise FormatError(f"{path}: {key} is {UNSUPPORTED[tail]}, which sdlora cannot apply")
            raise FormatError(f"{path}: unknown tensor {key}")
    return {name: _module(path, name, parts, DIFFUSERS_SUFFIXES) for name, parts in groups.items()}


def _apply_diffusers_alphas(path: Path, modules: dict[str, FileModule], meta: dict[str, str], layout: str) -> None:
    """diffusers stores no alpha tensor; its header's `lora_adapter_metadata` may carry r/lora_alpha."""
    if layout == "kohya" or "lora_adapter_metadata" not in meta:
        return
    try:
        cfg = json.loads(meta["lora_adapter_metadata"])
    except json.JSONDecodeError:
        raise FormatError(f"{path}: lora_adapter_metadata in the header is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: lora_adapter_metadata in the header is not a JSON object")
    for name, m in modules.items():
        if "alpha" in m.tensors:
            continue
        component, _, module_path = name.partition(".")
        alpha = cfg.get(f"{component}.lora_alpha")
        pattern = cfg.get(f"{component}.alpha_pattern") or {}
        for pat, value in pattern.items():
            if module_path == pat or module_path.endswith("." + pat) or re.fullmatch(pat, module_path):
                alpha = value
        if alpha is not None:
            m.tensors["alpha"] = torch.tensor(float(alpha))


def _family(modules: dict[str, FileModule], meta: dict[str, str]) -> tuple[str | None, str]:
    version = meta.get("ss_base_model_version", "")
    for prefix, fam in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return fam, "metadata"
    arch = meta.get("modelspec.architecture", "")
    for marker, fam in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if arch.startswith(marker):
            return fam, "metadata"
    if version in FAMILY_OF_VERSION:
        return FAMILY_OF_VERSION[version], "metadata"
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names) or any(
            n.startswith("lora_unet_") and re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n)
            for n in names):
        return "sdxl", "shapes"
    for n, m in modules.items():
        if m.kind in ("lora", "dora") and re.search(r"attn2[._]to_k$", n):
            width = m.tensors["down"].shape[1]
            fam = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
            if fam:
                return fam, "shapes"
    for n, m in modules.items():
        if m.kind in ("lora", "dora") and re.search(r"self_attn[._]q_proj$", n):
            fam = {768: "sd1", 1024: "sd2"}.get(m.tensors["down"].shape[1])
            if fam:
                return fam, "shapes"
    return None, "unknown"


# ---------------------------------------------------------------- fitting onto a base


@dataclass
class Target:
    component: str
    path: str
    module: FileModule
    layer: torch.nn.Module


@dataclass
class Fit:
    targets: list[Target]
    unmatched: list[str]

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The matched modules as diffusers-layout tensors (`<component>.<path>.lora_A/lora_B.weight`, fp32), each
        module's alpha/rank folded into lora_B and shaped for its layer. diffusers gives every module of a state
        without alphas the scale 1 (alpha = rank, per module), so loading this builds exactly the update
        `FileModule.delta` computes, whatever the file's layout, key style, ranks or alphas were."""
        out = {}
        for t in self.targets:
            m = t.module
            if not m.plain:
                raise FormatError(f"module {m.name} is {m.kind}{' with a Tucker core' if 'mid' in m.tensors else ''}; "
                                  "it can only be merged")
            down, up = m.tensors["down"].float(), m.tensors["up"].float()
            shape = layer_shape(t.layer)
            rank = down.shape[0]
            if isinstance(t.layer, torch.nn.Conv2d):
                down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
            else:
                down, up = down.reshape(rank, -1), up.reshape(shape[0], rank)
            key = f"{t.component}.{t.path}"
            out[f"{key}.lora_A.weight"] = down.contiguous()
            out[f"{key}.lora_B.weight"] = (up * m.scale).contiguous()
        return out

    def report(self) -> str:
        if not self.unmatched:
            return f"all {len(self.targets)} modules matched"
        return (f"{len(self.targets)} modules matched, {len(self.unmatched)} did not; first unmatched: "
                f"{', '.join(self.unmatched[:5])}")


def name_lookup(models: dict[str, torch.nn.Module], family: str) -> dict[str, tuple[str, str]]:
    """Every name a file may use for a base module (kohya, SGM, diffusers, with or without `text_model.`)."""
    out: dict[str, tuple[str, str]] = {}
    unet_config = models["unet"].config if "unet" in models else None
    for component, model in models.items():
        if component not in COMPONENTS:
            continue
        for path, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in path:
                continue  # (a layer peft wrapped appears as `<path>.base_layer`)
            path = path.removesuffix(".base_layer")
            names = {kohya_module(component, path, family, unet_config),
                     f"{component}.{path}"}
            if component == "unet" and family == "sdxl":
                names.add(f"lora_unet_{path.replace('.', '_')}")  # diffusers-named SDXL kohya keys (A1111 reads them)
            if component.startswith("text_encoder"):
                short = path.removeprefix("text_model.")
                names |= {f"{component}.text_model.{short}", f"{component}.{short}"}
                if family == "sdxl" and component == "text_encoder":
                    names.add(f"lora_te_text_model_{short.replace('.', '_')}")
            for n in names:
                out.setdefault(n, (component, path))
    return out


def fit(lf: LoraFile, models: dict[str, torch.nn.Module], family: str, base_name: str = "the base") -> Fit:
    """Match a file's modules to the base's layers; refuse another family, zero matches and impossible shapes."""
    from .archs import TITLES

    if lf.family is not None and lf.family != family:
        how = "its metadata" if lf.family_source == "metadata" else "its tensor shapes"
        raise FormatError(f"{lf.path}: this LoRA is for {TITLES[lf.family]} (from {how}) but {base_name} is "
                          f"{TITLES.get(family, family)}; use a {TITLES.get(lf.family)} base or another LoRA")
    lookup = name_lookup(models, family)
    targets, unmatched = [], []
    for name, m in lf.modules.items():
        hit = lookup.get(name)
        if hit is None:
            unmatched.append(name)
            continue
        component, path = hit
        layer = models[component].get_submodule(path)
        layer = getattr(layer, "base_layer", layer)
        _check_shapes(lf.path, m, layer)
        targets.append(Target(component, path, m, layer))
    if not targets:
        raise FormatError(f"{lf.path}: none of its {len(lf.modules)} modules matches a layer of {base_name} "
                          f"(first: {', '.join(list(lf.modules)[:3])}); it was made for another model")
    return Fit(targets, sorted(unmatched))


def layer_shape(layer: torch.nn.Module) -> tuple[int, ...]:
    """The weight's shape as the layer computes with it (a bitsandbytes layer stores its weight packed)."""
    if isinstance(layer, torch.nn.Linear):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def _check_shapes(path: Path, m: FileModule, layer: torch.nn.Module) -> None:
    shape = layer_shape(layer)
    out_f, in_f = shape[0], shape[1]
    if m.kind in ("lora", "dora"):
        down, up = m.tensors["down"], m.tensors["up"]
        rank = down.shape[0]
        if down.shape[1] != in_f or up.shape[0] != out_f or up.shape[1] != rank:
            raise FormatError(f"{path}: module {m.name} has shapes down {tuple(down.shape)} / up {tuple(up.shape)}, "
                              f"which do not fit the layer {shape}; it was made for another model")
        if rank > min(out_f, in_f * math.prod(shape[2:])):
            raise FormatError(f"{path}: module {m.name} has rank {rank}, larger than its layer {shape} allows")
        if m.kind == "dora":
            dora_axis(m.name, tuple(m.tensors["dora_scale"].shape), shape)
    else:
        m.delta(shape)  # raises on a size mismatch
