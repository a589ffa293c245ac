"""Which adapter kind learns a style best per megabyte? LoRA, DoRA, LoHa and LoKr trained on each example style
of the toy world at the demo's settings (rank 8, preset full, lr 1e-3, 200 steps of 18), and at two parameter
budgets (about 100 k and 400 k trainable parameters, the rank or LoKr factor chosen per kind to come closest).
Each run: the adapter file as users get it (fp16), its trainable parameters, training time, and the demo's
measurements (style score, colour and shape accuracy at weights 0, 0.5 and 1 over 36 images each).

    .venv/bin/python benchmarks/kinds_toy.py [--out benchmarks/results/kinds_toy.json] [--style stripes]
        [--only "loha rank 8"] [--set lr=2e-3]

About 90 seconds a run on 2 CPU cores, 10 runs a style.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from options import add_sampler, parse_sets

from sdlora.config import DemoConfig
from sdlora.demo import measure, train_style
from sdlora.engine import BlendItem, Engine
from sdlora.safefiles import atomic_write_bytes
from sdlora.toy.render import STYLES

# name -> (budget, train options); the counts are the toy UNet's trainable parameters with preset full
RUNS = {
    "lora rank 8": ("demo settings, large", {"kind": "lora", "rank": 8}),  # 392,704
    "dora rank 8": ("demo settings, large", {"kind": "dora", "rank": 8}),  # 409,280
    "loha rank 8": ("demo settings", {"kind": "loha", "rank": 8}),  # 785,408
    "lokr rank 8": ("demo settings", {"kind": "lokr", "rank": 8}),  # 57,024 (factor -1: w2 stays whole)
    "loha rank 4": ("large", {"kind": "loha", "rank": 4}),  # 392,704
    "lokr rank 16 factor 2": ("large", {"kind": "lokr", "rank": 16, "factor": 2}),  # 413,644
    "lora rank 2": ("small", {"kind": "lora", "rank": 2}),  # 98,176
    "dora rank 2": ("small", {"kind": "dora", "rank": 2}),  # 114,752
    "loha rank 1": ("small", {"kind": "loha", "rank": 1}),  # 98,176
    "lokr rank 4 factor 2": ("small", {"kind": "lokr", "rank": 4, "factor": 2}),  # 98,636
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kinds_toy.json")
    ap.add_argument("--style", action="append", choices=list(STYLES), help="Style(s) to train (default: all).")
    ap.add_argument("--only", action="append", help="Run just this row (its name), repeatable.")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="Any train option by name on top of every run, e.g. lr=2e-3 (repeatable).")
    ap.add_argument("--steps", type=int, help="Steps (default: the demo's).")
    add_sampler(ap)
    args = ap.parse_args()
    extra = parse_sets(args.set)
    cfg = DemoConfig(sampler=args.sampler)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": "python benchmarks/kinds_toy.py", "demo": {"steps": cfg.steps, "lr": cfg.lr,
                                                                         "batch_size": cfg.batch_size,
                                                                         "sampler": cfg.sampler},
                    "extra_options": extra, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for style in args.style or list(STYLES):
            for name, (budget, options) in RUNS.items():
                if args.only and name not in args.only:
                    continue
                started = time.time()
                result = train_style(style, cfg, Path(tmp) / style / name.replace(" ", "-"),
                                     options={**options, "save_precision": "fp16", **extra})
                seconds = time.time() - started
                engine = Engine("toy", lora_files=[result.adapter])
                m = measure(engine, lambda w, r=result: [BlendItem(r.adapter.stem, w)] if w else [], [style], cfg,
                            cfg.weights)
                row = {"style": style, "budget": budget, "options": {**options, **extra},
                       "trainable_parameters": result.trainable_params, "file_mb": round(
                           result.adapter.stat().st_size / 1e6, 3), "train_seconds": round(seconds, 1),
                       "weights": cfg.weights, "style_score": m["style_score"][style],
                       "color_accuracy": m["color_accuracy"], "shape_accuracy": m["shape_accuracy"]}
                row["style_per_mb_at_1"] = round(row["style_score"][-1] / row["file_mb"], 2)
                report["runs"][f"{style}: {name}"] = row
                print(f"{style}: {name}", json.dumps(row), flush=True)
                atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
