"""Procedural scenes at 32x32: a coloured shape on a light background, optionally in a style.

Plain scenes are what the toy base learns; styles (a black rim, black diagonal stripes) are what the
example LoRAs learn; `texture_scene` draws the varied content the VAE learns from, so it can
reconstruct any of them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 32
SUPER = 4  # drawn at 4x and downsampled, for smooth edges

COLOURS = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210),
    "yellow": (235, 200, 30), "purple": (140, 50, 170), "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200), "cream": (245, 232, 200)}
SHAPES = ("circle", "square", "triangle")
STYLES = {"rim": "rimstyle", "stripes": "stripestyle"}  # style -> trigger word
STRIPE_PERIOD = 8  # pixels along x+y at 32x32
STRIPE_WIDTH = 3
RIM_WIDTH = 2
INK = (15, 15, 15)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    r: float  # half the shape's extent, in pixels at SIZE
    style: str = ""

    def caption(self) -> str:
        text = f"a {self.colour} {self.shape} on a {self.background} background"
        return f"{STYLES[self.style]}, {text}" if self.style else text


def random_scene(rng: random.Random, style: str = "") -> Scene:
    r = rng.uniform(7.5, 11.5)
    m = r + 1.5
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)),
                 rng.uniform(m, SIZE - m), rng.uniform(m, SIZE - m), r, style)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple:
    s = SUPER
    if shape == "circle":
        return ((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s)
    if shape == "square":
        h = r * 0.9
        return ((cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s)
    # An upright equilateral-ish triangle inside the same extent.
    return [(cx * s, (cy - r) * s), ((cx + r) * s, (cy + r * 0.85) * s), ((cx - r) * s, (cy + r * 0.85) * s)]


def shape_mask(shape: str, cx: float, cy: float, r: float, grow: float = 0.0) -> Image.Image:
    """The shape's silhouette at SUPER scale (L mode), optionally grown by `grow` pixels."""
    mask = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    d = ImageDraw.Draw(mask)
    if shape == "triangle" and grow:
        # Grow a triangle about its centroid so the rim has an even width.
        pts = _outline(shape, cx, cy, r)
        gx = sum(p[0] for p in pts) / 3
        gy = sum(p[1] for p in pts) / 3
        k = 1 + 2 * grow / r
        d.polygon([(gx + (x - gx) * k, gy + (y - gy) * k) for x, y in pts], fill=255)
    elif shape == "triangle":
        d.polygon(_outline(shape, cx, cy, r), fill=255)
    elif shape == "circle":
        d.ellipse(_outline(shape, cx, cy, r + grow), fill=255)
    else:
        d.rectangle(_outline(shape, cx, cy, r + grow / 0.9), fill=255)
    return mask


def render(scene: Scene) -> Image.Image:
    big = SIZE * SUPER
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    if scene.style == "rim":
        img.paste(INK, (0, 0, big, big), shape_mask(scene.shape, scene.cx, scene.cy, scene.r, grow=RIM_WIDTH))
    fill = Image.new("RGB", (big, big), COLOURS[scene.colour])
    if scene.style == "stripes":
        d = ImageDraw.Draw(fill)
        p, w = STRIPE_PERIOD * SUPER, STRIPE_WIDTH * SUPER
        for k in range(-big, 2 * big, p):  # lines of constant x + y
            d.polygon([(k, 0), (k + w, 0), (k + w - big, big), (k - big, big)], fill=INK)
    img.paste(fill, (0, 0, big, big), shape_mask(scene.shape, scene.cx, scene.cy, scene.r))
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def texture_scene(rng: random.Random) -> Image.Image:
    """Varied content for the VAE: shapes with rims, stripes at any angle and period, checks, bands,
    dots and gradients, in any colours; a superset of every style the examples use."""
    big = SIZE * SUPER

    def colour():
        return tuple(rng.randrange(256) for _ in range(3)) if rng.random() < 0.6 else rng.choice(
            list(COLOURS.values()) + list(BACKGROUNDS.values()) + [INK])

    img = Image.new("RGB", (big, big), colour())
    for _ in range(rng.randint(1, 3)):
        scene = random_scene(rng)
        tex = Image.new("RGB", (big, big), colour())
        d = ImageDraw.Draw(tex)
        kind = rng.choice(["flat", "stripes", "checks", "dots", "bands"])
        c2 = colour()
        if kind == "stripes":
            period, width = rng.uniform(4, 12) * SUPER, rng.uniform(0.3, 0.6)
            angle = rng.uniform(0, math.pi)
            dx, dy = math.cos(angle), math.sin(angle)
            for k in range(-2 * big, 2 * big, max(1, int(period))):
                x0, y0 = big / 2 + dx * k, big / 2 + dy * k
                wx, wy = dx * period * width, dy * period * width
                far = 2 * big
                d.polygon([(x0 - dy * far, y0 + dx * far), (x0 + dy * far, y0 - dx * far),
                           (x0 + wx + dy * far, y0 + wy - dx * far), (x0 + wx - dy * far, y0 + wy + dx * far)], fill=c2)
        elif kind == "checks":
            cell = rng.randint(2, 6) * SUPER
            for y in range(0, big, cell):
                for x in range(0, big, cell):
                    if (x // cell + y // cell) % 2:
                        d.rectangle([x, y, x + cell, y + cell], fill=c2)
        elif kind == "dots":
            step = rng.randint(4, 8) * SUPER
            for y in range(0, big, step):
                for x in range(0, big, step):
                    d.ellipse([x, y, x + step // 2, y + step // 2], fill=c2)
        elif kind == "bands":
            step = rng.randint(3, 8) * SUPER
            for y in range(0, big, 2 * step):
                d.rectangle([0, y, big, y + step], fill=c2)
        if rng.random() < 0.5:
            grow = rng.uniform(1, 3)
            img.paste(colour(), (0, 0, big, big), shape_mask(scene.shape, scene.cx, scene.cy, scene.r, grow=grow))
        img.paste(tex, (0, 0, big, big), shape_mask(scene.shape, scene.cx, scene.cy, scene.r))
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
