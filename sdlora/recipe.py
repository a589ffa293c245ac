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


MAX_PARAMETERS = 64 * 1024  # characters; A1111's recipes are a few hundred (a 1 MB text chunk is an attack, or junk)


def parse_parameters(text: str) -> dict:
    """Read A1111's `parameters` text back into a dict (prompt, negative_prompt, and the key/value line).
    Linear in the text's length, and texts over MAX_PARAMETERS characters are refused."""
    if len(text) > MAX_PARAMETERS:
        raise FormatError(f"the generation parameters are {len(text):,} characters long; sdlora reads at most "
                          f"{MAX_PARAMETERS:,} (A1111 writes a few hundred)")
    lines = text.strip().split("\n")
    if not lines or not re.search(r"(^|, )Steps: \d+", lines[-1]):
        raise FormatError("no A1111 generation parameters in this text")
    body = lines[:-1]
    neg_idx = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), None)
    prompt = "\n".join(body if neg_idx is None else body[:neg_idx])
    negative = "" if neg_idx is None else "\n".join(body[neg_idx:])[len("Negative prompt:"):].strip()
    out: dict = {"prompt": prompt, "negative_prompt": negative, **_settings(lines[-1])}
    if out.get("Schedule type") == "Karras" and "Sampler" in out:
        out["Sampler"] += " Karras"
    return out


def _settings(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, with \\" escapes", ...` in one left-to-right pass."""
    out, pos, n = {}, 0, len(line)
    while pos < n:
        colon = line.find(": ", pos)
        if colon < 0:
            break
        key = line[pos:colon].rsplit(",", 1)[-1].strip()
        pos = colon + 2
        if line.startswith('"', pos):
            end = pos + 1
            while end < n and line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            value = line[pos + 1 : min(end, n)]
            comma = line.find(",", end + 1)
        else:
            comma = line.find(",", pos)
            value = line[pos : n if comma < 0 else comma].strip()
        pos = n if comma < 0 else comma + 1
        if key:
            out[key] = value
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
