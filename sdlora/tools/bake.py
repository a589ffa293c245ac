"""`sdlora bake`: a base with a blend of LoRAs merged into its weights, as a model of its own.

The blend is merged exactly as the studio's fast mode merges it (`generate --fuse`), then written either as a
single-file checkpoint in the original layout A1111 and ComfyUI load (LDM names for SD 1.x, SGM names with the
OpenCLIP second text encoder for SDXL) or, with `layout="diffusers"`, as a diffusers folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..engine import BlendItem, Engine
from ..errors import ConfigError, FormatError
from ..formats import PRECISIONS, unet_sgm_path
from ..models import Base
from ..safefiles import write_safetensors
from .merge import Item

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("self_attn.", "attn."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def vae_key(key: str, n_blocks: int) -> str:
    """A diffusers AutoencoderKL state-dict key in the original LDM layout."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    module, _, leaf = rest.rpartition(".")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", module)
    if m:
        kind, i, sub, j, inner = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        idx = i if kind == "down" else n_blocks - 1 - i  # LDM numbers the decoder's levels from the bottom
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


def _clip_key(name: str) -> str:
    """transformers' CLIP names, with the `text_model.` level some versions leave out put back."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def _open_clip(te: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection as OpenCLIP names it (SGM's second SDXL encoder): q/k/v in one in_proj."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in te.state_dict().items():
        name = _clip_key(name)
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            qkv.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = t
            continue
        fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
        if name in fixed:
            out[prefix + fixed[name]] = t
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()  # OpenCLIP multiplies x @ P
        else:
            for old, new in _OPENCLIP:
                name = name.replace(old, new)
            out[prefix + name] = t
    for key, parts in qkv.items():
        layer, kind = key.split(".")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def checkpoint_tensors(base: Base) -> dict[str, torch.Tensor]:
    """The base's weights in the original single-file layout (SD 1.x: LDM; SDXL: SGM)."""
    if base.family == "sd2":
        raise FormatError("SD 2.x single-file checkpoints keep a text-encoder layer diffusers drops, so one cannot "
                          "be rebuilt exactly; bake with --format diffusers instead")
    out = {}
    for name, t in base.unet.state_dict().items():
        module, _, leaf = name.rpartition(".")
        out[f"model.diffusion_model.{unet_sgm_path(module, base.unet.config)}.{leaf}"] = t
    n = len(base.vae.config.block_out_channels)
    for name, t in base.vae.state_dict().items():
        key = vae_key(name, n)
        out[f"first_stage_model.{key}"] = t[:, :, None, None] if ".mid.attn_1." in key and t.dim() == 2 else t
    if base.family == "sdxl":
        for name, t in base.text_encoders[0].state_dict().items():
            out[f"conditioner.embedders.0.transformer.{_clip_key(name)}"] = t
        out |= _open_clip(base.text_encoders[1], "conditioner.embedders.1.model.")
    else:
        for name, t in base.text_encoders[0].state_dict().items():
            out[f"cond_stage_model.transformer.{_clip_key(name)}"] = t
    return out


def bake(base: str, items: list[Item], out: Path, *, layout: str = "single", precision: str = "fp16",
         base_config: str | None = None, overwrite: bool = False) -> Path:
    out = Path(out)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if layout == "single" and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out {out}: a single-file checkpoint ends in .safetensors (or use --format diffusers "
                          "for a folder)")
    if layout == "diffusers" and out.suffix.lower() == ".safetensors":
        raise ConfigError(f"--out {out}: --format diffusers writes a folder; give a folder name (no .safetensors), "
                          "or leave --format at single for one file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if not items:
        raise ConfigError("give at least one --lora to bake in")
    engine = Engine(base, lora_files=[i.path for i in items], base_config=base_config, device="cpu",
                    dtype=torch.float32)
    engine.apply([BlendItem(engine.library.name_of(i.path), i.unet, i.te) for i in items], "fast")
    if layout == "diffusers":
        _save_folder(engine, out, PRECISIONS[precision])
    elif layout == "single":
        tensors = {k: v.to(PRECISIONS[precision]) for k, v in checkpoint_tensors(engine.base).items()}
        meta = {"sdlora_baked": ", ".join(f"{Path(i.path).name}:{i.te_weight:g}:{i.unet:g}" for i in items),
                "modelspec.sai_model_spec": "1.0.0", "modelspec.title": out.stem}
        write_safetensors(out, tensors, meta)
    else:
        raise ConfigError(f"unknown format {layout!r}; choose single or diffusers")
    return out


def _save_folder(engine: Engine, out: Path, dtype: torch.dtype) -> None:
    """The pipeline saved into a temporary folder beside `out`, then moved into place in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe = engine.base.pipeline()
        pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # (mkdtemp makes it private; the model is as readable as any file the user writes)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
