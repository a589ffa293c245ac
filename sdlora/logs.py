"""Training records: the per-step loss CSV and the loss chart, both written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .safefiles import atomic_save_image, atomic_write_bytes


def write_csv(path: Path, rows: list[tuple[int, float, float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss", "lr"])
    for step, loss, lr in rows:
        w.writerow([step, repr(float(loss)), repr(float(lr))])
    atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: Path, up_to: int | None = None) -> list[tuple[int, float, float]]:
    """(step, loss, lr) rows, those up to step `up_to` (all when None); none when the file is missing."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]
    return [r for r in rows if up_to is None or r[0] <= up_to]


def plot_loss(path: Path, rows: list[tuple[int, float, float]], size=(640, 360)) -> None:
    """A plain line chart of the loss (light) and its moving average (dark), drawn with Pillow."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    W, H, pad = size[0], size[1], 40
    d.rectangle([pad, 10, W - 10, H - pad], outline=(160, 160, 160))
    if rows:
        steps = [r[0] for r in rows]
        losses = [r[1] for r in rows]
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s, v):
            return pad + (s - s0) / (s1 - s0) * (W - 10 - pad), H - pad - (v - lo) / (hi - lo) * (H - pad - 10)

        for series, colour in ((losses, (170, 200, 240)), (smooth, (20, 70, 160))):
            pts = [xy(s, v) for s, v in zip(steps, series, strict=True)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
        d.text((pad, H - pad + 5), f"step {s0}", fill="black")
        d.text((W - 90, H - pad + 5), f"step {steps[-1]}", fill="black")
        d.text((pad + 5, 12), f"loss {hi:.4g}", fill="black")
        d.text((pad + 5, H - pad - 14), f"{lo:.4g}", fill="black")
    atomic_save_image(img, path)
