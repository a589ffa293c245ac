"""Which modules get LoRA, and putting it there through peft.

sdlora never defines a LoRA layer: peft does the maths. This module only names the targets
(presets as regular expressions over module paths) and reports what was injected.
"""

from __future__ import annotations

import re
import warnings

import torch

from .config import AdapterConfig
from .errors import ConfigError

ADAPTER = "default"

_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER_EXTRA = r"attentions\.\d+\.(proj_in|proj_out)|ff\.net\.(0\.proj|2)"
_CONV = r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv"
_TE_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_MLP = r"mlp\.(fc1|fc2)"

UNET_TARGETS = {
    "attn": _ATTN,
    "attn-mlp": f"{_ATTN}|{_TRANSFORMER_EXTRA}",
    "full": f"{_ATTN}|{_TRANSFORMER_EXTRA}|{_CONV}",
}
TEXT_TARGETS = {"attn": _TE_ATTN, "attn-mlp": f"{_TE_ATTN}|{_TE_MLP}", "full": f"{_TE_ATTN}|{_TE_MLP}"}


def target_regex(preset: str, component: str) -> str:
    table = UNET_TARGETS if component == "unet" else TEXT_TARGETS
    if preset not in table:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(table)}")
    return rf".*\.({table[preset]})"


def unreachable(model: torch.nn.Module, family: str, component: str) -> str | None:
    """A regex of the layers whose output never reaches the loss, or None. SDXL conditions on the penultimate
    hidden state of both text encoders; encoder 2's last layer still feeds the pooled embedding, but encoder 1's
    feeds nothing. LoRA there would stay at its initial zero update, and DDP refuses parameters without a
    gradient, so such layers get no LoRA (the adapter's metadata says so)."""
    if family == "sdxl" and component == "text_encoder":
        return rf"(.*\.)?encoder\.layers\.{model.config.num_hidden_layers - 1}\..*"
    return None


def targeted_modules(model: torch.nn.Module, preset: str, component: str, exclude: str | None = None) -> list[str]:
    """Paths of the Linear/Conv2d modules a preset puts LoRA on (what peft will match)."""
    pattern = re.compile(target_regex(preset, component))
    skip = re.compile(exclude) if exclude else None
    return [name for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.fullmatch(name)
            and not (skip and skip.fullmatch(name))]


def peft_config(cfg: AdapterConfig, component: str, exclude: str | None = None):
    """peft's config for the chosen kind on the preset's modules. LoHa and LoKr start as LyCORIS does (one factor
    zero, so the update starts at zero)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = dict(target_modules=target_regex(cfg.preset, component), exclude_modules=exclude)
    if cfg.kind in ("lora", "dora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, init_lora_weights=True,
                          use_dora=cfg.kind == "dora", **common)
    if cfg.kind == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.lora_alpha, init_weights=True, **common)
    return LoKrConfig(r=cfg.rank, alpha=cfg.lora_alpha, init_weights=True,
                      decompose_both=cfg.decompose_both, decompose_factor=cfg.factor, **common)


def inject(model: torch.nn.Module, cfg: AdapterConfig, component: str, exclude: str | None = None) -> list[str]:
    """Freeze `model` and add a LoRA adapter (not on modules matching `exclude`); returns the targeted paths."""
    targets = targeted_modules(model, cfg.preset, component, exclude)
    if not targets:
        raise ConfigError(f"preset {cfg.preset!r} matches no module of the {component}; this base is not supported")
    model.requires_grad_(False)
    with warnings.catch_warnings():
        # On an int8 (torchao) base peft warns that its LoRA layer cannot merge into the quantized weight; sdlora
        # never merges a training adapter in place.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        model.add_adapter(peft_config(cfg, component, exclude), adapter_name=ADAPTER)
    return targets


def adapted_layers(models) -> list[torch.nn.Module]:
    """The layers of `models` that carry an adapter (peft's LoRA and LyCORIS layers): walked once, since a walk of
    SD 1.5's UNet takes 40 times as long as setting the weight of all its layers."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    return [m for model in filter(None, models)  # (a text encoder released after caching is None)
            for m in model.modules() if isinstance(m, (LoraLayer, LycorisLayer))]


def set_weight(layers, weight: float) -> None:
    """Scale the adapter in each of `layers` (from `adapted_layers`) to `weight` x alpha/rank, as applying it at
    that weight does (peft's `set_scale`, absolute, not compounding)."""
    for m in layers:
        m.set_scale(ADAPTER, weight)


PARAMETER_MARKS = ("lora_", "hada_", "lokr_")  # peft's parameter names: LoRA and DoRA, LoHa, LoKr


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters, as a list (an iterator would be used up by the optimizer)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and any(m in n for m in PARAMETER_MARKS)]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-layout state: `<module path>.lora_A.weight` / `.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def set_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"state does not fit the adapter: unexpected keys {unexpected[:3]}")
