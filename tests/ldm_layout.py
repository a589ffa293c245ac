"""Test helper: write a diffusers-layout tiny model as an original (LDM) single-file checkpoint, the way
A1111 and Civitai distribute models, so single-file loading is tested without any download."""

import re

import torch

from sdlora.formats import canonical_path, unet_sgm_path

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, n_blocks: int) -> str:
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    module, _, leaf = rest.rpartition(".")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", module)
    if m:
        kind, i, sub, j, inner = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        idx = i if kind == "down" else n_blocks - 1 - i
        if sub == "resnets":
            return f"{part}.{kind}.{idx}.block.{j}.{_VAE_RESNET.get(inner, inner)}.{leaf}"
        return f"{part}.{kind}.{idx}.{'downsample' if kind == 'down' else 'upsample'}.conv.{leaf}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", module)
    if m:
        inner = m.group(2)
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{_VAE_RESNET.get(inner, inner)}.{leaf}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", module)
    if m:
        return f"{part}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{leaf}"
    return f"{part}.{ {'conv_norm_out': 'norm_out'}.get(module, module)}.{leaf}"


def ldm_checkpoint(base) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in base.unet.state_dict().items():
        module, _, leaf = name.rpartition(".")
        out[f"model.diffusion_model.{unet_sgm_path(module, base.unet.config)}.{leaf}"] = p.clone()
    n = len(base.vae.config.block_out_channels)
    for name, p in base.vae.state_dict().items():
        key = _vae_key(name, n)
        if ".mid.attn_1." in key and p.dim() == 2:
            p = p[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[f"first_stage_model.{key}"] = p.clone()
    for name, p in base.text_encoders[0].state_dict().items():
        out[f"cond_stage_model.transformer.{canonical_path('text_encoder', name)}"] = p.clone()
    return out
