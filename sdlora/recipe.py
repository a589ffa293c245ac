"""Images that carry their recipe: A1111's `parameters` PNG text, written and read back."""

from __future__ import annotations

import io
import re
from pathlib import Path

from .errors import FormatError
from .safefiles import atomic_write_bytes


def a1111_parameters(prompt: str, negative: str, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, model: str, loras: dict[str, str]) -> str:
    """A1111's `parameters` text: prompt line(s), `Negative prompt:` (when there is one), one `key: value` line."""
    pairs = [("Steps", steps), ("Sampler", sampler.replace(" Karras", "")),
             *([("Schedule type", "Karras")] if sampler.endswith("Karras") else []),
             ("CFG scale", f"{cfg_scale:g}"), ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", model)]
    if loras:
        pairs.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in loras.items()) + '"'))
    negative_line = f"Negative prompt: {negative}\n" if negative else ""  # A1111 leaves the line out when empty
    return f"{prompt}\n{negative_line}" + ", ".join(f"{k}: {v}" for k, v in pairs)


def parse_parameters(text: str) -> dict:
    """Read A1111's `parameters` text back into a dict (prompt, negative_prompt, and the key/value line)."""
    lines = text.strip().split("\n")
    if not lines or not re.search(r"(^|, )Steps: \d+", lines[-1]):
        raise FormatError("no A1111 generation parameters in this text")
    settings = lines[-1]
    body = lines[:-1]
    neg_idx = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), None)
    prompt = "\n".join(body if neg_idx is None else body[:neg_idx])
    negative = "" if neg_idx is None else "\n".join(body[neg_idx:])[len("Negative prompt:"):].strip()
    out: dict = {"prompt": prompt, "negative_prompt": negative}
    for m in re.finditer(r'\s*([\w ]+): ("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        key, value = m.group(1).strip(), m.group(2).strip()
        out[key] = value[1:-1] if value.startswith('"') else value
    if out.get("Schedule type") == "Karras" and "Sampler" in out:
        out["Sampler"] += " Karras"
    return out


def save_png(image, path: Path, parameters: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def read_png_parameters(path_or_image) -> dict:
    from PIL import Image

    if hasattr(path_or_image, "info"):
        text = path_or_image.info.get("parameters")
    else:
        with Image.open(path_or_image) as img:
            text = img.info.get("parameters")
    if not text:
        raise FormatError("this image carries no generation parameters (no A1111 'parameters' text)")
    return parse_parameters(text)


def next_output_path(folder: Path, seed: int) -> Path:
    """`00012-<seed>.png`, numbered after the highest existing number, as A1111 names its outputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d{5})-", p.name))]
    return folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"
