"""How much memory a training run will take, estimated from the architecture before anything is loaded.

The models are built on the meta device (no weights allocated) from the base's own configs, or from the
published full-size configs (`archs.py`) for a single-file checkpoint. The UNet is then run forward on meta
tensors at the run's batch and bucket size, and every leaf module's output is counted: what autograd keeps
for the backward pass. The parts are the frozen weights that stay on the device, the LoRA's weights,
gradients and optimizer state, those activations, and the caches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig

BYTES = {"no": 4, "fp16": 2, "bf16": 2}
QUANT_BYTES = {"": None, "int8": 1.0, "nf4": 0.5625}  # nf4: 4 bits plus one fp16 scale per 64 weights (about)
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # bytes per trainable parameter (fp32 states)


@dataclass
class Estimate:
    parts: dict[str, int]  # what -> bytes
    basis: str  # which architecture, at which size

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        lines = [f"estimated training memory: {self.total / 2**30:.2f} GiB ({self.basis})"]
        lines += [f"  {k}: {v / 2**20:,.1f} MiB" for k, v in self.parts.items() if v]
        return "\n".join(lines)


def _configs(cfg: TrainConfig) -> tuple[str, dict, list[dict], dict | None] | None:
    """(family, UNet config, text-encoder configs, VAE config or None for the standard SD VAE) of the base."""
    base = str(cfg.base)
    if base == "toy":
        from .toy.base import UNET_CONFIG, VAE_CONFIG, text_config

        return "sd1", UNET_CONFIG, [text_config().to_dict()], VAE_CONFIG
    from . import models

    if base in models.TINY_UNETS:
        tes = [models._clip_config(32).to_dict()] + ([models._clip_config(48, 32).to_dict()]
                                                     if base == "tiny-sdxl" else [])
        return ("sdxl" if base == "tiny-sdxl" else "sd1"), models.TINY_UNETS[base], tes, models.TINY_VAE
    path = Path(base).expanduser()
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        def read(part):
            f = path / part / "config.json"
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

        tes = [c for c in (read("text_encoder"), read("text_encoder_2")) if c]
        return models._folder_family(path), read("unet"), tes, read("vae")
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from safetensors import safe_open

        from .archs import TEXT_ENCODERS, UNETS

        with safe_open(str(path), "pt") as f:
            family = models.checkpoint_family(f.keys())
        return family, UNETS[family], TEXT_ENCODERS[family], None
    return None


def _meta_models(unet_cfg: dict, te_cfgs: list[dict], vae_cfg: dict | None, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .archs import SD_VAE

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        for p in unet.parameters():  # (on meta: no copy; `.to` would warn about fp32 modules)
            p.data = p.data.to(dtype)
        tes = [CLIPTextModel(CLIPTextConfig(**{k: v for k, v in c.items() if not k.startswith("_")})) for c in te_cfgs]
        vae = AutoencoderKL.from_config(vae_cfg or SD_VAE)
    return unet, tes, vae


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_params(model: torch.nn.Module, cfg: TrainConfig, component: str) -> int:
    from .lora import targeted_modules

    n = 0
    for name in targeted_modules(model, cfg.adapter.preset, component):
        m = model.get_submodule(name)
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            n += cfg.adapter.rank * (m.in_channels * k + m.out_channels)
        elif isinstance(m, torch.nn.Linear):
            n += cfg.adapter.rank * (m.in_features + m.out_features)
    return n


def _checkpointed(unet) -> list[torch.nn.Module]:
    """The blocks gradient checkpointing recomputes one at a time: each resnet and transformer."""
    groups = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for g in groups for m in [*getattr(g, "resnets", []), *(getattr(g, "attentions", None) or [])]]


def _activations(unet, batch: int, width: int, height: int, dtype, checkpointing: bool, sdxl: bool,
                 factor: int) -> int:
    """Bytes of every leaf module's output in one UNet forward on meta tensors. With gradient checkpointing, only
    the checkpointed blocks' outputs are kept, plus the insides of one block at a time while it is recomputed."""
    out_bytes: dict[torch.nn.Module, int] = {}

    def hook(module, _inputs, output):
        for t in output if isinstance(output, tuple | list) else [output]:
            if isinstance(t, torch.Tensor):
                out_bytes[module] = out_bytes.get(module, 0) + t.numel() * t.element_size()

    leaves = [m for m in unet.modules() if not list(m.children())]
    blocks = _checkpointed(unet)
    handles = [m.register_forward_hook(hook) for m in {*leaves, *blocks}]
    try:
        lat = torch.zeros(batch, unet.config.in_channels, height // factor, width // factor, device="meta",
                          dtype=dtype)
        ctx = torch.zeros(batch, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)
        extra = {}
        if sdxl:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, pooled, device="meta", dtype=dtype),
                                           "time_ids": torch.zeros(batch, 6, device="meta", dtype=dtype)}}
        with torch.no_grad():
            unet(lat, torch.zeros(batch, device="meta", dtype=torch.long), ctx, **extra)
    finally:
        for h in handles:
            h.remove()
    total = sum(out_bytes.get(m, 0) for m in leaves)
    if not checkpointing:
        return total
    inside = [sum(out_bytes.get(m, 0) for m in b.modules() if m in out_bytes and not list(m.children()))
              for b in blocks]
    return total - sum(inside) + sum(out_bytes.get(b, 0) for b in blocks) + max(inside, default=0)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), where bf16 trains full-size bases faster."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


BF16_HINT_PARAMS = 100_000_000  # a base this large gains from bf16 on such a CPU (README: 2.1x on SD 1.5's UNet)


def training_precision(asked: str) -> tuple[str, str]:
    """The mixed precision a run gets on this machine, and why when it is not what was asked: as asked on CUDA; on
    the CPU, bf16 where the CPU computes in it (AVX-512 BF16 or AMX), else fp32 (fp16, and bf16 without those
    instructions, compute slower than fp32 on a CPU)."""
    if torch.cuda.is_available() or asked == "no":
        return asked, ""
    if asked == "bf16" and cpu_computes_bf16():
        return "bf16", ""
    why = ("fp16 needs CUDA" if asked == "fp16" else
           "bf16 on the CPU needs AVX-512 BF16 or AMX, which this CPU lacks (it would be slower than fp32)")
    return "no", f"mixed precision {asked}: {why}; training in fp32"


def estimate(cfg: TrainConfig, images: int = 0, bucket: tuple[int, int] | None = None) -> Estimate | None:
    """The memory a run of `cfg` needs on its device at its largest bucket (`bucket`, else resolution²) with
    `images` cached; None when the base's architecture cannot be read without loading it."""
    found = _configs(cfg)
    if found is None:
        return None
    family, unet_cfg, te_cfgs, vae_cfg = found
    on_cuda = torch.cuda.is_available()
    precision = training_precision(cfg.mixed_precision)[0]
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet, tes, vae = _meta_models(unet_cfg, te_cfgs, vae_cfg, dtype)
    width, height = bucket or (cfg.data.resolution, cfg.data.resolution)
    weight_bytes = QUANT_BYTES[cfg.quantize_base] or BYTES[precision]
    latents_cached = cfg.cache_latents and not cfg.data.augments_images
    text_cached = (cfg.cache_text and not cfg.adapter.train_text_encoder and not cfg.adapter.train_embedding
                   and not cfg.data.varies_captions)
    te_params = sum(_params(t) for t in tes)
    lora = _lora_params(unet, cfg, "unet")
    if cfg.adapter.train_text_encoder:
        lora += sum(_lora_params(t, cfg, "text_encoder") for t in tes)
    hidden = [t.config.hidden_size for t in tes]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent pixel (8 in every SD model)
    act = _activations(unet, cfg.batch_size, width, height, dtype, cfg.gradient_checkpointing, family == "sdxl",
                       factor)
    parts = {
        "UNet weights": int(_params(unet) * weight_bytes),
        "text encoder weights": 0 if text_cached and not cfg.sample_prompt else int(te_params * weight_bytes),
        "VAE weights (fp32)": 0 if latents_cached and not cfg.sample_prompt else _params(vae) * 4,
        "LoRA weights, gradients and optimizer state": lora * (4 + 4 + OPTIMIZER_STATE[cfg.optimizer]),
        "activations kept for the backward pass": act,
        "latent cache": (images * unet.config.in_channels * (width // factor) * (height // factor) * 4
                         if latents_cached and not cfg.cache_dir else 0),
        "text cache": images * 77 * sum(hidden) * 4 if text_cached else 0,
    }
    where = (f"{family} architecture of {Path(str(cfg.base)).name}, batch {cfg.batch_size} at {width}x{height}, "
             f"{'fp32' if precision == 'no' else precision} on {'CUDA' if on_cuda else 'the CPU'}")
    return Estimate(parts, where)
