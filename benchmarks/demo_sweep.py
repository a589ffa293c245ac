"""The measurements behind the demo's defaults: presets, learning rates and rank on the rim style, and the
stripes style at the defaults. Each run is `sdlora demo` with one setting changed (train, then 36 images per
weight read back by the analyser).

    .venv/bin/python benchmarks/demo_sweep.py [--out benchmarks/results/demo_sweep.json]

About 2.5 minutes a run on 2 CPU cores; the README's tables quote the JSON this writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sdlora.config import DemoConfig
from sdlora.demo import run_demo
from sdlora.safefiles import atomic_write_bytes

RUNS = {  # name -> changes to DemoConfig
    "defaults": {},
    "preset attn-mlp": {"preset": "attn-mlp"},
    "preset attn": {"preset": "attn"},
    "lr 2e-3": {"lr": 2e-3},
    "lr 3e-3": {"lr": 3e-3},
    "rank 16": {"rank": 16},
    "stripes at the defaults": {"style": "stripes"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_sweep.json")
    ap.add_argument("--only", nargs="*", help="Run only these (names as in RUNS).")
    args = ap.parse_args()
    results = {}
    for name, change in RUNS.items():
        if args.only and name not in args.only:
            continue
        cfg = dataclasses.replace(DemoConfig(), **change)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.time()
            metrics = run_demo(Path(tmp), cfg)
        results[name] = {"config": dataclasses.asdict(cfg), "metrics": metrics,
                         "wall_seconds": round(time.time() - started, 1)}
        print(name, json.dumps(metrics), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": "python benchmarks/demo_sweep.py", "runs": results}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
