"""Generation with a base and LoRAs through diffusers' own LoRA loading (`load_lora_weights`, `set_adapters`).

This is the engine the CLI's `generate` calls; the blend studio (web UI, cache, fast mode) builds on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import ConfigError
from .models import load_base
from .safefiles import atomic_write_bytes, check_safetensors, read_metadata


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`PATH[:W]` to (path, weight); a Windows drive colon or a path without weight is handled."""
    m = re.match(r"^(.*\.safetensors):(-?[0-9.]+)$", arg)
    path, weight = (m.group(1), float(m.group(2))) if m else (arg, 1.0)
    if not -2.0 <= weight <= 2.0:
        raise ConfigError(f"LoRA weight {weight} for {path} is outside [-2, 2]")
    return Path(path), weight


def a1111_parameters(prompt: str, negative: str, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, model: str, loras: dict[str, str]) -> str:
    """A1111's `parameters` PNG text, so its PNG Info (and sdlora) can read the recipe back."""
    line = (f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg_scale:g}, Seed: {seed}, Size: {width}x{height}, "
            f"Model: {model}")
    if loras:
        line += ', Lora hashes: "' + ", ".join(f"{n}: {h}" for n, h in loras.items()) + '"'
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


def generate_image(*, base: str, loras: list[str], prompt: str, negative_prompt: str = "", seed: int = 0,
                   steps: int = 20, cfg_scale: float = 7.0, width: int = 512, height: int = 512,
                   out: Path = Path("outputs/image.png")) -> Path:
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ConfigError(f"width and height must be positive multiples of 8, got {width}x{height}")
    if steps <= 0:
        raise ConfigError(f"steps must be > 0, got {steps}")
    model = load_base(base)
    pipe = model.pipeline()
    names, weights, hashes, tags = [], [], {}, []
    for i, arg in enumerate(loras):
        path, weight = parse_lora_arg(arg)
        if not path.is_file():
            raise ConfigError(f"LoRA file not found: {path}")
        check_safetensors(path)
        name = f"l{i}"
        pipe.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
        weights.append(weight)
        hashes[path.stem] = read_metadata(path).get("sshs_model_hash", "")[:12]
        tags.append(f"<lora:{path.stem}:{weight:g}>")
    if names:
        pipe.set_adapters(names, weights)
    g = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=cfg_scale,
                 width=width, height=height, generator=g).images[0]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    full_prompt = " ".join([prompt, *tags])
    sampler = type(pipe.scheduler).__name__.replace("DiscreteScheduler", "").replace("Scheduler", "")
    info.add_text("parameters", a1111_parameters(full_prompt, negative_prompt, steps, sampler, cfg_scale, seed,
                                                 width, height, Path(base).name, {k: v for k, v in hashes.items() if v}))
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
