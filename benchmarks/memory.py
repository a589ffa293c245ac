"""Memory of a quantized base (QLoRA): weight bytes for fp32, bf16, int8 and nf4, each quantized by torchao and by
bitsandbytes, on full-size SD 1.5 and SDXL architectures (random weights, built here; weights only on the CPU) and,
with training, on an SD-shaped tiny base (peak RSS and step time of a real `sdlora train` process).

    .venv/bin/python benchmarks/memory.py [--out benchmarks/results/memory_cpu.json] [--short]
        [--backends torchao bitsandbytes]

Rows are named `int8 (torchao)`, `nf4 (bitsandbytes)` and so on. `--short` measures only the tiny base (what the test
suite runs). Weight bytes count what each tensor stores: quantized data and their scales.
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

sys.path.insert(0, str(Path(__file__).parent))

from train_vs_reference import build_base, make_data, run  # noqa: E402

from sdlora import quant  # noqa: E402
from sdlora.safefiles import atomic_write_bytes  # noqa: E402

KINDS = ("int8", "nf4")
MOST = {"int8": 0.55, "nf4": 0.3}  # issue 12's targets: weight bytes at most this fraction of bf16's


def quantized(backends: list[str]) -> list[tuple[str, str, str]]:
    """(row name, kind, backend) of every quantized row."""
    return [(f"{kind} ({backend})", kind, backend) for backend in backends for kind in KINDS]


def full_size(family: str, kind: str, backend: str) -> dict:
    """One full-size architecture's UNet and text encoders in bf16 with random weights, quantized as asked."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.archs import TEXT_ENCODERS, UNETS

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: SDXL in fp32 would take 14 GB
    try:
        models = [UNet2DConditionModel(**UNETS[family])]
        for i, cfg in enumerate(TEXT_ENCODERS[family]):
            cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
            models.append(cls(CLIPTextConfig(**cfg)))
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for m in models for p in m.parameters())
    started = time.perf_counter()
    layers = sum(quant.quantize(m.requires_grad_(False), kind, backend) for m in models) if kind != "bf16" else 0
    return {"parameters": params, "weight_bytes": sum(quant.weight_bytes(m) for m in models), "layers_quantized": layers,
            "quantize_seconds": round(time.perf_counter() - started, 1)}


def tiny_training(tmp: Path, steps: tuple[int, int], backends: list[str]) -> dict:
    from sdlora.models import load_base

    base, data = tmp / "base", tmp / "data" / "1_bench"
    build_base("compute", base)
    make_data(data, 128)
    out = {}
    for row, kind, backend in [("fp32", "", ""), *quantized(backends)]:
        walls, rss = [], []
        for n in steps:
            argv = [sys.executable, "-m", "sdlora", "-q", "train", "--base", str(base), "--data", str(data.parent),
                    "--output-dir", str(tmp / "out"), "--name", "q", "--overwrite", "--steps", str(n),
                    "--resolution", "128", "--rank", "4", "--preset", "full"]
            wall, peak = run(argv + (["--quantize-base", kind, "--quantize-backend", backend] if kind else []))
            walls.append(wall)
            rss.append(peak)
        b = load_base(str(base))
        for m in (b.unet, *b.text_encoders):
            m.requires_grad_(False)
            if kind:
                quant.quantize(m, kind, backend)
        out[row] = {"weight_bytes": sum(quant.weight_bytes(m) for m in (b.unet, *b.text_encoders)),
                    "step_s": (walls[1] - walls[0]) / (steps[1] - steps[0]), "peak_rss_mib": max(rss)}
        print("tiny", row, json.dumps(out[row]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_cpu.json")
    ap.add_argument("--short", action="store_true", help="Only the tiny base, few steps (for the tests).")
    ap.add_argument("--backends", nargs="+", default=list(quant.BACKENDS[1:]), choices=quant.BACKENDS[1:])
    args = ap.parse_args()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}", "device": "cpu",
                    "command": " ".join(["python benchmarks/memory.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        report["tiny_sd_shaped"] = tiny_training(Path(tmp), (2, 4) if args.short else (5, 25), args.backends)
    if not args.short:
        report["full_size_weights_only"] = {}
        for family in ("sd1", "sdxl"):
            rows = {"bf16": full_size(family, "bf16", "")}
            rows |= {row: full_size(family, kind, backend) for row, kind, backend in quantized(args.backends)}
            bf16 = rows["bf16"]["weight_bytes"]
            rows["fp32"] = {"parameters": rows["bf16"]["parameters"], "weight_bytes": 2 * bf16}
            for kind in rows:
                rows[kind]["vs_bf16"] = round(rows[kind]["weight_bytes"] / bf16, 3)
            report["full_size_weights_only"][family] = rows
            print(family, json.dumps(rows), flush=True)
        sizes = report["full_size_weights_only"]
        report["targets"] = {f"{row} at most {MOST[kind]}x bf16": all(s[row]["vs_bf16"] <= MOST[kind] for s in sizes.values())
                             for row, kind, _ in quantized(args.backends)}
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(json.dumps(report.get("targets", {})))


if __name__ == "__main__":
    main()
