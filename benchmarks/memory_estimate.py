"""What `sdlora doctor`'s memory estimate says for the full-size SD 1.5, SD 2.1-v and SDXL architectures (batch 1,
--preset attn-mlp, fp32 as on a CPU, with and without gradient checkpointing). Estimates, not measurements:
the check against a measured run is tests/test_doctor.py.

    .venv/bin/python benchmarks/memory_estimate.py [--out benchmarks/results/memory_estimate.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdlora.config import AdapterConfig, DataConfig, TrainConfig
from sdlora.memory import estimate
from sdlora.safefiles import atomic_write_bytes

# A single-file checkpoint is recognised by its text-encoder keys; these files hold only those keys.
MARKERS = {"sd1": ({"cond_stage_model.transformer.x"}, 512), "sd2-v": ({"cond_stage_model.model.x", "v_pred"}, 768),
           "sdxl": ({"conditioner.embedders.1.x"}, 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_estimate.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (keys, size) in MARKERS.items():
            path = Path(tmp) / f"{family}.safetensors"
            save_file({k: torch.zeros(1) for k in keys}, str(path))
            for checkpointing in (False, True):
                started = time.time()
                e = estimate(TrainConfig(base=str(path), gradient_checkpointing=checkpointing,
                                         adapter=AdapterConfig(preset="attn-mlp"),
                                         data=DataConfig(resolution=size, bucket_step=64)), images=20)
                rows.append({"architecture": family, "resolution": size, "gradient_checkpointing": checkpointing,
                             "total_gib": round(e.total / 2**30, 2),
                             "parts_gib": {k: round(v / 2**30, 3) for k, v in e.parts.items()},
                             "seconds": round(time.time() - started, 1)})
                print(json.dumps(rows[-1]))
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "batch_size": 1, "preset": "attn-mlp",
              "precision": "fp32 (no CUDA)", "rows": rows}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
