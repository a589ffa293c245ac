"""What the CPU-side switches do to one training step of the compute shape's UNet, on this machine.

    .venv/bin/python benchmarks/cpu_levers.py [--out benchmarks/results/cpu_levers.json] [--latents 16 64]
        [--sd15 32 64]

One step is the forward, backward and fused AdamW of the SD-shaped UNet of `train_vs_reference.py` (64/128/256
channels, cross-attention width 64, heads of width 8) with rank-4 LoRA through peft on the attention projections,
batch 1. Variants, interleaved and repeated: fp32; bf16 autocast over fp32 weights; bf16 autocast over a bf16 base
(LoRA weights fp32); channels_last in fp32. Beside them, the matrix-multiply and convolution rates in fp32 and bf16,
which say whether the CPU has bf16 hardware (AVX-512 BF16, AMX) at all. Medians.

`--sd15`: the same step on the full-size SD 1.5 UNet (random weights, rank 16 on the attention projections) in fp32
and in bf16 as `--mixed-precision bf16` trains on such a CPU (the base in bf16, the LoRA in fp32, autocast), at the
latent sizes given (32 = 256 px, 64 = 512 px); two timed steps after one untimed, once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("fp32", "bf16 autocast", "bf16 autocast, bf16 base", "fp32, channels_last")


def unet_step(variant: str, latents: int, sd15: bool = False):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sdlora.archs import UNETS

    torch.manual_seed(0)
    if sd15:
        unet = UNet2DConditionModel.from_config(UNETS["sd1"]).requires_grad_(False)
    else:
        unet = UNet2DConditionModel(sample_size=latents, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(64, 128, 256), cross_attention_dim=64, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    norm_num_groups=32).requires_grad_(False)
    if variant == "bf16 autocast, bf16 base":
        unet.to(torch.bfloat16)
    rank = 16 if sd15 else 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    width = unet.config.cross_attention_dim
    x, context, t = torch.randn(1, 4, latents, latents), torch.randn(1, 77, width), torch.tensor([500])
    if variant == "fp32, channels_last":
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.startswith("bf16")):
            out = unet(x, t, context).sample
        torch.nn.functional.mse_loss(out.float(), x.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, n: int) -> float:
    fn()  # (first calls build kernels and caches)
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def rates() -> dict:
    """GFLOP/s of a 1024x1024 matrix product and of a 320-channel 3x3 convolution at 64x64, fp32 and bf16."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        x, w = torch.randn(1, 320, 64, 64, dtype=dtype), torch.randn(320, 320, 3, 3, dtype=dtype)
        name = str(dtype).removeprefix("torch.")
        out[f"matmul {name}"] = round(2 * 1024 ** 3 / timed(lambda a=a, b=b: a @ b, 10) / 1e9)
        conv = timed(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1), 5)
        out[f"conv {name}"] = round(2 * 320 * 320 * 9 * 64 * 64 / conv / 1e9)
    return out


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_vs_reference import cpu

    from sdlora.safefiles import atomic_write_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_levers.json")
    ap.add_argument("--latents", type=int, nargs="*", default=[16, 64], help="Latent sizes (16 = 128 px).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sd15", type=int, nargs="*", default=[32, 64],
                    help="Latent sizes for the full-size SD 1.5 UNet, fp32 against bf16 (none to skip).")
    args = ap.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", "gflops": rates(), "step_ms": {}}
    for latents in args.latents:
        steps = {v: unet_step(v, latents) for v in VARIANTS}
        n = 10 if latents <= 16 else 2
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                times[v].append(timed(steps[v], n))
        report["step_ms"][f"{latents}x{latents} latents"] = {v: round(statistics.median(t) * 1000, 1)
                                                             for v, t in times.items()}
        print(latents, report["step_ms"][f"{latents}x{latents} latents"], flush=True)
    report["sd15_step_s"] = {}
    for latents in args.sd15:
        row = {}
        for v in ("fp32", "bf16 autocast, bf16 base"):
            row[v] = round(timed(unet_step(v, latents, sd15=True), 2), 2)
        row["bf16 speed-up"] = round(row["fp32"] / row["bf16 autocast, bf16 base"], 2)
        report["sd15_step_s"][f"{latents}x{latents} latents ({latents * 8} px)"] = row
        print(latents, row, flush=True)
    print(json.dumps(report, indent=2))
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
