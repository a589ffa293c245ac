"""Read a toy image back: dominant shape colour, shape, and a score in [0, 1] for each style.

Deterministic and independent of how the image was made. The background is the most common border
colour; the silhouette is everything far from it; colours are voted among the silhouette's saturated
pixels; the shape comes from how much of its bounding box the silhouette fills; the rim score is the
share of ink in the silhouette's outer ring; the stripe score how well the ink inside follows diagonal
stripes of the style's period.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import COLOURS, STRIPE_PERIOD

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)
DARK = 90  # max channel below this: ink (rims, stripes)


@dataclass
class Reading:
    colour: str | None
    shape: str | None
    rim: float
    stripes: float


def _background(a: np.ndarray) -> np.ndarray:
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).reshape(-1, 3)
    return np.median(border, axis=0)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the border through non-mask pixels are inside."""
    h, w = mask.shape
    outside = np.zeros_like(mask)
    stack = [(y, x) for y in range(h) for x in (0, w - 1)] + [(y, x) for x in range(w) for y in (0, h - 1)]
    while stack:
        y, x = stack.pop()
        if 0 <= y < h and 0 <= x < w and not outside[y, x] and not mask[y, x]:
            outside[y, x] = True
            stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return ~outside


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(n):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(n):
        p = np.pad(m, 1)
        m = m | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def analyse(image) -> Reading:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg = _background(a)
    far = np.linalg.norm(a - bg, axis=-1) > 60
    silhouette = _fill_holes(far)
    if silhouette.sum() < 12:
        return Reading(None, None, 0.0, 0.0)
    dark = a.max(axis=-1) < DARK
    chroma = a.max(axis=-1) - a.min(axis=-1)
    core = silhouette & ~dark & (chroma > 60)  # the shape's own colour
    colour = None
    if core.sum() >= 6:
        d = np.linalg.norm(a[core][:, None, :] - PALETTE[None], axis=-1)
        colour = NAMES[int(np.bincount(d.argmin(axis=1), minlength=len(NAMES)).argmax())]
    ys, xs = np.nonzero(silhouette)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = silhouette.sum() / box
    # Where the area sits: a triangle has more of it in its lower half than its upper half.
    mid = (ys.max() + ys.min()) / 2
    lower = (ys > mid).sum() / max(1, (ys < mid).sum())
    if fill > 0.88:
        shape = "square"
    elif lower > 1.35 or fill < 0.62:
        shape = "triangle"
    else:
        shape = "circle"
    return Reading(colour, shape, rim_score(dark, silhouette), stripe_score(a, silhouette, dark))


def rim_score(dark: np.ndarray, silhouette: np.ndarray) -> float:
    """Ink in the silhouette's outer 2 pixels beyond the ink inside it: ~0 for plain or striped shapes, ~1 with
    a rim."""
    ring = silhouette & ~_erode(silhouette, 2)
    inner = _erode(silhouette, 4)
    if ring.sum() == 0:
        return 0.0
    frac = float(dark[ring].mean()) - (float(dark[inner].mean()) if inner.any() else 0.0)
    return float(np.clip((frac - 0.1) / 0.5, 0.0, 1.0))


def stripe_score(a: np.ndarray, silhouette: np.ndarray, dark: np.ndarray) -> float:
    """How well the darkness inside the shape follows diagonal stripes of the style's period (any phase)."""
    inner = _erode(silhouette, 2)
    if inner.sum() < 16:
        return 0.0
    lum = a.mean(axis=-1)[inner]
    ys, xs = np.nonzero(inner)
    t = 2 * np.pi * (xs + ys) / STRIPE_PERIOD
    if lum.std() < 1e-3:
        return 0.0
    z = (lum - lum.mean()) / lum.std()
    # Correlation with the best-phase sinusoid along x + y (project onto cos and sin).
    c, s = (z * np.cos(t)).mean(), (z * np.sin(t)).mean()
    corr = float(np.sqrt(c * c + s * s) * np.sqrt(2))
    ink = float(dark[inner].mean())
    return float(np.clip(corr / 0.7, 0, 1) * np.clip(ink / 0.15, 0, 1))
