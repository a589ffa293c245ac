"""The LoRA paper's Section 7 on the toy world, and what resizing costs: the demo's rim LoRA (rank 8) and one of
rank 32 trained on the same data with the same settings, analysed and compared; the rank-8 one resized to
ranks 4 and 2, each measured as the demo measures (style score, colour and shape at weights 0.5 and 1).

    .venv/bin/python benchmarks/workshop_toy.py [--out benchmarks/results/workshop_toy.json]

About 4 minutes on 2 CPU cores.
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
from options import add_sampler

from sdlora.config import DemoConfig
from sdlora.demo import measure, train_style
from sdlora.engine import BlendItem, Engine
from sdlora.safefiles import atomic_write_bytes
from sdlora.tools.analyze import analyze
from sdlora.tools.resize import resize, write_resize


def scores(path: Path, cfg: DemoConfig) -> dict:
    engine = Engine("toy", lora_files=[path])
    m = measure(engine, lambda w: [BlendItem(path.stem, w)], [cfg.style], cfg, [0.5, 1.0])
    return {"weights": m["weights"], "style_score": m["style_score"][cfg.style],
            "color_accuracy": m["color_accuracy"], "shape_accuracy": m["shape_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "workshop_toy.json")
    add_sampler(ap)
    args = ap.parse_args()
    cfg = DemoConfig(sampler=args.sampler)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "command": "python benchmarks/workshop_toy.py", "settings": dataclasses.asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r8 = train_style(cfg.style, cfg, tmp / "r8").adapter
        r32 = train_style(cfg.style, dataclasses.replace(cfg, rank=32), tmp / "r32").adapter
        analysis = analyze([r8, r32], base="toy")
        report["analyze"] = {"summary": analysis["summary"],
                             "median_effective_rank": {f["file"] + f" ({d})": f["median_effective_rank"]
                                                       for f, d in zip(analysis["files"], ("rank 8", "rank 32"),
                                                                       strict=True)},
                             "phi_diagonal": analysis["similarity"]["phi_diagonal"],
                             "phi_mean_8x32": analysis["similarity"]["phi_mean"]}
        report["scores"] = {"rank 8": scores(r8, cfg), "rank 32": scores(r32, cfg)}
        for rank in (4, 2):
            result = resize(r8, rank=rank, base="toy")
            path = write_resize(result, tmp / f"rim-r{rank}.safetensors")
            errors = [r["relative_error"] for r in result.rows]
            report["scores"][f"rank 8 resized to {rank}"] = {
                **scores(path, cfg), "relative_error_median": sorted(errors)[len(errors) // 2],
                "relative_error_worst": max(errors), "bytes": path.stat().st_size}
        report["scores"]["rank 8"]["bytes"] = r8.stat().st_size
        report["scores"]["rank 32"]["bytes"] = r32.stat().st_size
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
