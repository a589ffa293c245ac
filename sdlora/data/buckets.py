"""Aspect-ratio buckets: each image trains at a size near its own shape with about resolution² pixels."""

from __future__ import annotations

import math
from typing import NamedTuple


class Bucket(NamedTuple):
    width: int
    height: int


def bucket_list(resolution: int, step: int) -> list[Bucket]:
    """Sizes with sides in multiples of `step`, area at most resolution², aspect up to 4:1."""
    lo, hi = max(step, resolution // 2 // step * step), resolution * 2
    out = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (resolution * resolution // w) // step * step)
        if h >= lo:
            out.add(Bucket(w, h))
            out.add(Bucket(h, w))
    return sorted(out)


def assign_bucket(width: int, height: int, resolution: int, step: int, *, bucket: bool, upscale: bool) -> Bucket | None:
    """The bucket an image of this size trains in, or None when it is too small for even one step."""
    if not bucket:
        side = resolution
        if not upscale:
            side = min(side, min(width, height) // step * step)
        return Bucket(side, side) if side >= step else None
    if not upscale and width * height < resolution * resolution:
        # Too small for the standard buckets: shrink nothing, upscale nothing, round down to the step.
        w, h = width // step * step, height // step * step
        return Bucket(w, h) if w >= step and h >= step else None
    ratio = math.log(width / height)
    return min(bucket_list(resolution, step), key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.width * b.height))
