"""QLoRA on the toy world: the demo's style LoRA trained on a full-precision base and on int8 and nf4 bases (each
quantized by torchao and by bitsandbytes) with the demo's settings, each measured as the demo measures it (on the
full-precision base, where LoRAs are used), with the loss curves drawn together.

    .venv/bin/python benchmarks/qlora_toy.py [--out benchmarks/results/qlora_toy.json] [--backends torchao bitsandbytes]

Writes the JSON and `qlora_loss.png` beside it. About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from options import add_sampler
from PIL import Image, ImageDraw

from sdlora import quant
from sdlora.config import DemoConfig
from sdlora.demo import measure, train_style
from sdlora.engine import BlendItem, Engine
from sdlora.safefiles import atomic_save_image, atomic_write_bytes

COLOURS = {"full precision": (40, 40, 40), "int8 (torchao)": (40, 110, 220), "nf4 (torchao)": (220, 80, 40),
           "int8 (bitsandbytes)": (40, 170, 90), "nf4 (bitsandbytes)": (170, 60, 170)}


def plot(curves: dict[str, list[float]], path: Path) -> None:
    w, h, pad = 640, 360, 44
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    smooth = {k: [sum(v[max(0, i - 9): i + 1]) / len(v[max(0, i - 9): i + 1]) for i in range(len(v))]
              for k, v in curves.items()}
    lo = min(min(v) for v in smooth.values())
    hi = max(max(v) for v in smooth.values())
    n = max(len(v) for v in smooth.values())
    d.rectangle([pad, 10, w - 10, h - pad], outline=(160, 160, 160))
    for k, v in smooth.items():
        pts = [(pad + (w - 10 - pad) * i / max(1, n - 1), h - pad - (h - pad - 10) * (y - lo) / max(1e-9, hi - lo))
               for i, y in enumerate(v)]
        d.line(pts, fill=COLOURS[k], width=2)
    for row, k in enumerate(smooth):
        d.text((pad + 8, 16 + 14 * row), f"{k} (moving average of 10 steps)", fill=COLOURS[k])
    d.text((pad, h - pad + 6), f"step 1 ... {n}", fill="black")
    d.text((4, 12), f"{hi:.3f}", fill="black")
    d.text((4, h - pad - 12), f"{lo:.3f}", fill="black")
    atomic_save_image(img, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qlora_toy.json")
    ap.add_argument("--backends", nargs="+", default=list(quant.BACKENDS[1:]), choices=quant.BACKENDS[1:])
    add_sampler(ap)
    args = ap.parse_args()
    cfg = DemoConfig(sampler=args.sampler)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": " ".join(["python benchmarks/qlora_toy.py", *sys.argv[1:]]), "style": cfg.style, "sampler": cfg.sampler,
                    "runs": {}}
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("full precision", "", "auto")]
        runs += [(f"{kind} ({backend})", kind, backend) for backend in args.backends for kind in quant.KINDS]
        for name, kind, backend in runs:
            started = time.time()
            result = train_style(cfg.style, cfg, Path(tmp) / name.replace(" ", "_"), quantize_base=kind,
                                 options={"quantize_backend": backend})
            seconds = time.time() - started
            engine = Engine("toy", lora_files=[result.adapter])
            m = measure(engine, lambda w, r=result: [BlendItem(r.adapter.stem, w)] if w else [], [cfg.style], cfg,
                        cfg.weights)
            report["runs"][name] = {"style_score": m["style_score"][cfg.style], "color_accuracy": m["color_accuracy"],
                                    "shape_accuracy": m["shape_accuracy"], "weights": m["weights"],
                                    "train_seconds": round(seconds, 1), "final_loss_mean_20": sum(result.losses[-20:]) / 20}
            curves[name] = result.losses
            print(name, json.dumps(report["runs"][name]), flush=True)
    full = report["runs"]["full precision"]["style_score"][-1]
    report["targets"] = {f"{k}: style at weight 1 within 0.1 of full precision": abs(v["style_score"][-1] - full) <= 0.1
                         for k, v in report["runs"].items() if k != "full precision"}
    plot(curves, args.out.with_name("qlora_loss.png"))
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(json.dumps(report["targets"]))


if __name__ == "__main__":
    main()
