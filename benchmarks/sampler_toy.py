"""Which sampler draws the example styles? The demo's rim and stripes LoRAs (its settings) measured at weight 1 with
several samplers, the mean for each starting seed beside the overall score; then the stripes LoRA's weight curve and
uneven rim + stripes blends (with the demo's sampler).

    .venv/bin/python benchmarks/sampler_toy.py [--out benchmarks/results/sampler_toy.json]

About 7 minutes on 2 CPU cores.
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

from sdlora.config import DemoConfig
from sdlora.demo import measure, train_style
from sdlora.engine import BlendItem, Engine
from sdlora.safefiles import atomic_write_bytes
from sdlora.toy.analyse import analyse

SEEDS = 4
CASES = [("stripes", "Euler", 5.0), ("stripes", "Euler", 1.0), ("stripes", "Euler a", 5.0),
         ("stripes", "DPM++ 2M", 5.0), ("stripes", "DDIM", 5.0), ("rim", "Euler", 5.0), ("rim", "Euler a", 5.0)]
BLENDS = [(0.5, 0.5), (0.5, 0.7), (0.5, 0.8), (0.5, 1.0), (0.4, 0.8)]


def _summary(m: dict) -> dict:
    return {k: m[k] for k in ("weights", "style_score", "color_accuracy", "shape_accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler_toy.json")
    args = ap.parse_args()
    cfg = DemoConfig()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": "python benchmarks/sampler_toy.py", "seeds": SEEDS, "samplers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {s: train_style(s, cfg, Path(tmp) / s).adapter for s in ("rim", "stripes")}
        for style, sampler, guidance in CASES:
            c = replace(cfg, sampler=sampler, cfg_scale=guidance, seeds=SEEDS)
            m = measure(Engine("toy", lora_files=[files[style]]), lambda w, s=style: [BlendItem(s, w)], [style], c,
                        [1.0])
            per_seed: dict[int, list[float]] = {}
            for (_, _, _, k), img in m.pop("images").items():
                per_seed.setdefault(k, []).append(getattr(analyse(img), style))
            row = {**_summary(m), "per_seed": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_seed.items())}}
            report["samplers"][f"{style}, {sampler}, CFG {guidance:g}"] = row
            print(style, sampler, guidance, json.dumps(row), flush=True)
        m = measure(Engine("toy", lora_files=[files["stripes"]]), lambda w: [BlendItem("stripes", w)], ["stripes"], cfg,
                    [0.5, 0.6, 0.7, 0.8, 1.0])
        m.pop("images")
        report["stripes_weight_curve"] = _summary(m)
        print("curve", json.dumps(report["stripes_weight_curve"]), flush=True)
        engine = Engine("toy", lora_files=[files["rim"], files["stripes"]])
        report["blends"] = {}
        for rim, stripes in BLENDS:
            m = measure(engine, lambda w, r=rim, s=stripes: [BlendItem("rim", r), BlendItem("stripes", s)],
                        ["rim", "stripes"], cfg, [1.0])
            m.pop("images")
            report["blends"][f"rim {rim:g} + stripes {stripes:g}"] = {k: v for k, v in _summary(m).items()
                                                                       if k != "weights"}
            print(rim, stripes, json.dumps(report["blends"][f"rim {rim:g} + stripes {stripes:g}"]), flush=True)
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
