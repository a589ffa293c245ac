"""X/Y grids: one image per pair of axis values, labelled, in one picture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .engine import BlendItem, Engine, Params
from .errors import ConfigError

AXIS_KINDS = ("lora", "seed", "steps", "cfg")


@dataclass
class Axis:
    kind: str  # lora, seed, steps, cfg
    values: list[float]
    lora: str = ""  # for kind == "lora": which LoRA's weight varies

    @property
    def title(self) -> str:
        return f"{self.lora} weight" if self.kind == "lora" else {"seed": "seed", "steps": "steps", "cfg": "CFG"}[self.kind]

    def __post_init__(self):
        if self.kind not in AXIS_KINDS:
            raise ConfigError(f"axis must be one of {', '.join(AXIS_KINDS)}, got {self.kind!r}")
        if not 1 <= len(self.values) <= 8:
            raise ConfigError(f"an axis takes 1 to 8 values, got {len(self.values)}")
        if self.kind == "lora" and not self.lora:
            raise ConfigError("a LoRA axis needs the LoRA's name")


def _cell(params: Params, blend: list[BlendItem], axis: Axis, value: float) -> tuple[Params, list[BlendItem]]:
    if axis.kind == "lora":
        others = [b for b in blend if b.name != axis.lora]
        return params, [*others, BlendItem(axis.lora, unet=float(value))]
    field = {"seed": "seed", "steps": "steps", "cfg": "cfg_scale"}[axis.kind]
    cast = float if axis.kind == "cfg" else int
    return dataclasses.replace(params, **{field: cast(value)}), blend


def xy_grid(engine: Engine, params: Params, blend: list[BlendItem], x: Axis, y: Axis, mode: str = "fast"):
    """Generate every (x, y) cell with one image each; return the labelled grid and the cells' infotexts. A seed of
    -1 is drawn here; the caller who names the file after it draws it first."""
    if (x.kind, x.lora) == (y.kind, y.lora):
        raise ConfigError(f"both axes vary {x.title}: the second would overwrite the first in every cell; give the "
                          "Y axis another LoRA or kind")
    if params.seed == -1:
        import random

        params = dataclasses.replace(params, seed=random.randrange(2**32))
    params = dataclasses.replace(params, batch_size=1, batch_count=1)
    images, texts = [], []
    for yv in y.values:
        row_params, row_blend = _cell(params, blend, y, yv)
        for xv in x.values:
            p, b = _cell(row_params, row_blend, x, xv)
            result = engine.generate(p, b, mode)
            images.append(result.images[0])
            texts.append(result.infotexts[0])
    return draw_grid(images, [f"{x.title}: {v:g}" for v in x.values], [f"{y.title}: {v:g}" for v in y.values]), texts


def draw_grid(images: list, x_labels: list[str], y_labels: list[str]):
    from PIL import Image, ImageDraw

    w, h = images[0].size
    left, top = 110, 24
    grid = Image.new("RGB", (left + w * len(x_labels), top + h * len(y_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for i, label in enumerate(x_labels):
        draw.text((left + i * w + 4, 6), label, fill="black")
    for j, label in enumerate(y_labels):
        draw.text((4, top + j * h + h // 2 - 6), label, fill="black")
    for k, img in enumerate(images):
        grid.paste(img, (left + (k % len(x_labels)) * w, top + (k // len(x_labels)) * h))
    return grid
