"""Pure conversions between peft/diffusers LoRA state and the kohya format that A1111, ComfyUI and Forge read.

Facts (key names, SGM block numbering, metadata keys) are in the team's shared docs/formats.md. Conversions never
mutate their input and are total: a key that cannot be placed is an error listing the leftovers.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from .errors import FormatError

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_TE_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def kohya_prefix(component: str, family: str) -> str:
    if family == "sdxl" and component in SDXL_TE_PREFIX:
        return SDXL_TE_PREFIX[component]
    return KOHYA_PREFIX[component]


def _layers(unet_config) -> int:
    lpb = unet_config["layers_per_block"]
    return lpb if isinstance(lpb, int) else lpb[0]


def unet_sgm_path(path: str, unet_config) -> str:
    """Map a diffusers UNet module path to the original SGM/LDM checkpoint's path."""
    per = _layers(unet_config) + 1
    for src, dst in _TOP_SGM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)(\..+)?$", path)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if part == "resnets":
            rest = _resnet_rest(rest)
        if kind == "down":
            if part == "downsamplers":
                return f"input_blocks.{(i + 1) * per}.0.op" + rest.removeprefix(".conv")
            return f"input_blocks.{1 + i * per + j}.{1 if part == 'attentions' else 0}{rest}"
        if part == "upsamplers":
            has_attn = "CrossAttn" in unet_config["up_block_types"][i]
            return f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}{rest}"
        return f"output_blocks.{i * per + j}.{1 if part == 'attentions' else 0}{rest}"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)(\..+)?$", path)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if part == "resnets":
            return f"middle_block.{2 * j}{_resnet_rest(rest)}"
        return f"middle_block.1{rest}"
    raise FormatError(f"no SGM name for UNet module {path!r}")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.lstrip(".").partition(".")
    if head in _RESNET_SGM:
        return "." + _RESNET_SGM[head] + ("." + tail if tail else "")
    return rest


def canonical_path(component: str, path: str) -> str:
    """Text-encoder paths are written as `text_model.<...>` whatever the transformers version nests."""
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path


def kohya_module(component: str, path: str, family: str, unet_config=None) -> str:
    """kohya's module name: prefix, then the module path with every '.' replaced by '_'."""
    if component == "unet" and family == "sdxl":
        path = unet_sgm_path(path, unet_config)
    return f"{kohya_prefix(component, family)}_{canonical_path(component, path).replace('.', '_')}"


# peft's tensor names within an adapted module -> kohya's (LyCORIS') names
KOHYA_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora_magnitude_vector": "dora_scale",
                 **{f"hada_{w}": f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
                 **{f"lokr_{w}": f"lokr_{w}" for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}}
_PEFT_TENSOR = re.compile(rf"(.+)\.({'|'.join(re.escape(k) for k in KOHYA_TENSORS)})$")


def peft_to_kohya(states: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float | dict[str, float]],
                  family: str, unet_config=None) -> dict[str, torch.Tensor]:
    """peft states per component ({'unet': {...}, 'text_encoder': {...}}) to one kohya state dict.
    `alphas` gives each component one alpha, or one per module path. LoRA, DoRA (its magnitude becomes
    `dora_scale` of shape (out, 1, ...), LyCORIS' per-output-channel layout), LoHa and LoKr (the same names)."""
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            m = _PEFT_TENSOR.match(key)
            if not m:
                raise FormatError(f"unexpected key {key!r} in the {component} LoRA state")
            modules.setdefault(m.group(1), {})[m.group(2)] = tensor
        for path, parts in modules.items():
            if ("lora_A.weight" in parts) != ("lora_B.weight" in parts):
                raise FormatError(f"{component} module {path!r} has only {', '.join(parts)}")
            name = kohya_module(component, path, family, unet_config)
            for key, tensor in parts.items():
                if key == "lora_magnitude_vector":  # peft: (out,) for Linear, (1, out, 1, 1) for Conv2d
                    tensor = tensor.reshape(-1, *[1] * (parts["lora_A.weight"].dim() - 1))
                out[f"{name}.{KOHYA_TENSORS[key]}"] = tensor.detach().clone()
            alpha = alphas[component]
            alpha = alpha[path] if isinstance(alpha, dict) else alpha
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def lokr_unit_scale(states: dict[str, dict[str, torch.Tensor]], rank: int, alpha: float) -> dict[str, dict[str, torch.Tensor]]:
    """peft scales every LoKr update by alpha / rank; A1111 and ComfyUI apply alpha / dim only when a factor is
    split into low-rank matrices (dim being their rank) and scale 1 otherwise. With the scale folded into the first
    factor and alpha written as the rank, every reader computes the same update."""
    scale = alpha / rank
    if scale == 1:
        return states
    out = {}
    for component, state in states.items():
        out[component] = {k: t * scale if re.search(r"\.lokr_w1(_a)?$", k) else t for k, t in state.items()}
    return out


def peft_to_diffusers(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers' layout: `<component>.<module path>.lora_A.weight`; DoRA's magnitude as
    `.lora_magnitude_vector.weight` (the name diffusers and transformers load into peft's DoRA layer)."""
    def name(key: str) -> str:
        return key + ".weight" if key.endswith(".lora_magnitude_vector") else key

    return {f"{component}.{name(key)}": t.detach().clone() for component, state in states.items()
            for key, t in state.items()}


def diffusers_adapter_metadata(ranks: dict[str, int | dict[str, int]], alphas: dict[str, float | dict[str, float]],
                               targets: dict[str, list[str]], use_dora: bool = False) -> str:
    """The `lora_adapter_metadata` header diffusers reads to rebuild each component's LoraConfig. Ranks and
    alphas are one per component, or one per module (then the most common is the default and the others
    go into peft's rank_pattern / alpha_pattern)."""
    meta: dict = {}
    for component in ranks:
        for key, pattern_key, value in (("r", "rank_pattern", ranks[component]),
                                        ("lora_alpha", "alpha_pattern", alphas[component])):
            if isinstance(value, dict):
                common = Counter(value.values()).most_common(1)[0][0]
                meta[f"{component}.{key}"] = common
                exceptions = {p: v for p, v in value.items() if v != common}
                if exceptions:
                    meta[f"{component}.{pattern_key}"] = exceptions
            else:
                meta[f"{component}.{key}"] = value
        meta[f"{component}.target_modules"] = sorted(targets[component])
        if use_dora:  # without it diffusers and transformers build plain LoRA layers and drop the magnitudes
            meta[f"{component}.use_dora"] = True
    return json.dumps(meta, indent=2, sort_keys=True)


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FULL_PRECISION = (".alpha", ".dora_scale", ".lora_magnitude_vector.weight")  # the keys `cast` leaves in fp32


def cast(tensors: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """Cast LoRA matrices to the save precision; alphas stay fp32 so the scale is exact, and so do DoRA
    magnitudes (a rounded magnitude rescales the whole weight row, an error as large as the update itself)."""
    dtype = PRECISIONS[precision]
    return {k: (t if k.endswith(FULL_PRECISION) else t.to(dtype)) for k, t in tensors.items()}


def precision_of(tensors: dict[str, torch.Tensor]) -> str:
    """The precision a LoRA file's matrices are stored in, as `cast` names it (fp32 when they mix)."""
    dtypes = {t.dtype for k, t in tensors.items()
              if t.is_floating_point() and not k.endswith(FULL_PRECISION) and not k.startswith("bundle_emb.")}
    return next((name for name, dtype in PRECISIONS.items() if dtypes == {dtype}), "fp32")
