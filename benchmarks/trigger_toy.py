"""Does the style stay tied to its trigger? The demo's rim LoRA trained without and with regularisation images
(the same scenes, unstyled, captioned without the trigger: `sdlora.toy.examples` renders them), each measured at
weight 1 with the trigger in every prompt and with no trigger at all. Regularisation images fill half of every
epoch, so that run trains twice the steps: both see the style's images equally often.

    .venv/bin/python benchmarks/trigger_toy.py [--out benchmarks/results/trigger_toy.json]

About 8 minutes on 2 CPU cores.
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
from sdlora.toy.examples import write_examples
from sdlora.toy.render import STYLES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trigger_toy.json")
    args = ap.parse_args()
    cfg = DemoConfig()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": "python benchmarks/trigger_toy.py", "style": cfg.style, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_examples(Path(tmp) / "reg", plain=True)
        reg = Path(tmp) / "reg" / f"{cfg.style}-plain"
        for name, reg_data in (("without regularisation", None), ("with regularisation", reg)):
            steps = cfg.steps * (2 if reg_data else 1)
            result = train_style(cfg.style, replace(cfg, steps=steps), Path(tmp) / name.replace(" ", "-"),
                                 reg_data=reg_data)
            engine = Engine("toy", lora_files=[result.adapter])
            row = {}
            for prompt, trigger in (("with the trigger", STYLES[cfg.style]), ("without the trigger", "")):
                m = measure(engine, lambda w, r=result: [BlendItem(r.adapter.stem, w)] if w else [], [cfg.style],
                            cfg, [0.0, 1.0], trigger=trigger)
                row[prompt] = {"style_score": m["style_score"][cfg.style], "color_accuracy": m["color_accuracy"],
                               "shape_accuracy": m["shape_accuracy"], "weights": [0.0, 1.0]}
            report["runs"][name] = row | {"steps": steps}
            print(name, json.dumps(row), flush=True)
    r = report["runs"]["with regularisation"]
    report["targets"] = {"with regularisation: style with the trigger at least 0.8": r["with the trigger"]["style_score"][1] >= 0.8,
                         "with regularisation: style without the trigger at most 0.2": r["without the trigger"]["style_score"][1] <= 0.2}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(json.dumps(report["targets"]))


if __name__ == "__main__":
    main()
