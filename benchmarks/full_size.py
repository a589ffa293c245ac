"""Training at the sizes people train: full SD 1.5 at 512 px and SDXL at 1024 px on a GPU (issue 11's GPU figures).

    .venv/bin/python benchmarks/full_size.py [--out benchmarks/results/full_size_gpu.json] [--family sd1 sdxl]
    .venv/bin/python benchmarks/full_size.py --short      # tiny bases on the CPU: checks that the benchmark runs

The architectures of `sdlora/archs.py` with random weights, saved as diffusers folders that `sdlora train` loads
(with the tiny byte tokenizer: no vocabulary can be downloaded here; the text encoders are full size). Settings as
issue 11 states them: rank 16, preset `attn-mlp`, bf16 mixed precision, batch 1, latents and text embeddings
cached (sdlora's defaults), with and without gradient checkpointing. Per row:

- step time: the difference of a long and a short run's training-loop time over their difference in steps;
- peak memory: allocated and reserved on the GPU (peak RSS on the CPU);
- the largest batch (1, 2, 4, ... 16) that trains within 24, 12 and 8 GiB with gradient checkpointing, the budget
  simulated with `torch.cuda.set_per_process_memory_fraction`, and its samples per second (`--budgets`, and
  `--family` run alone, split the work into runs under 10 minutes);
- with `--quantize-base nf4|int8`, the same on a quantized frozen base (issue 12's target: SDXL at 1024 px, batch 1,
  gradient checkpointing, within 8 GiB with nf4);
- utilisation: FLOPs of one forward and backward of the UNet with its LoRA (counted by torch's FlopCounterMode)
  per step time, over the bf16 matrix-multiply rate measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_vs_reference import make_data  # noqa: E402

from sdlora import quant  # noqa: E402
from sdlora.safefiles import atomic_write_bytes  # noqa: E402

RESOLUTION = {"sd1": 512, "sdxl": 1024}
BUDGETS_GIB = (24, 12, 8)
TARGETS = {"sd1": {"step_ms": 60, "peak_gib": 2.5}, "sdxl": {"step_ms": 200, "peak_gib": 10}}  # batch 1, issue 11


def build_full_size(family: str, folder: Path) -> None:
    """A full-size base of `family` with random weights (bf16 on disk), as a diffusers folder."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.archs import SD_VAE, TEXT_ENCODERS, UNETS
    from sdlora.models import _tiny_scheduler, tiny_tokenizer
    from sdlora.vocab import byte_vocab

    n = len(byte_vocab())
    ids = dict(bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)  # the tiny tokenizer's
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # SDXL in fp32 would be 14 GB to build and save
    try:
        unet = UNet2DConditionModel(**UNETS[family])
        vae = AutoencoderKL(**SD_VAE)
        tes = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**cfg, **ids))
               for i, cfg in enumerate(TEXT_ENCODERS[family])]
    finally:
        torch.set_default_dtype(default)
    common = dict(vae=vae, unet=unet, scheduler=_tiny_scheduler(), tokenizer=tiny_tokenizer(), text_encoder=tes[0])
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=tes[1], tokenizer_2=tiny_tokenizer())
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)


def train_once(base: str, data: Path, out: Path, steps: int, batch: int, resolution: int, checkpointing: bool,
               cuda: bool, quantize: str = "") -> dict:
    from sdlora.config import AdapterConfig, DataConfig, TrainConfig
    from sdlora.train import train

    cfg = TrainConfig(base=base, output_dir=out, name="bench", steps=steps, batch_size=batch, lr=1e-4, overwrite=True,
                      mixed_precision="bf16" if cuda else "no", gradient_checkpointing=checkpointing,
                      save_precision="bf16", quantize_base=quantize,
                      data=DataConfig(data=data, resolution=resolution, bucket=False),
                      adapter=AdapterConfig(rank=16, preset="attn-mlp"))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    row = {"loop_s": result.loop_seconds, "trainable_parameters": result.trainable_params,
           "loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)]}
    if cuda:
        row |= {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process so far
    return row


def step_time(base, data, out, steps, batch, resolution, checkpointing, cuda, quantize="") -> dict:
    short, long = (train_once(base, data, out, n, batch, resolution, checkpointing, cuda, quantize) for n in steps)
    row = {"step_ms": 1000 * (long["loop_s"] - short["loop_s"]) / (steps[1] - steps[0]), **long}
    row["samples_per_s"] = batch * 1000 / row["step_ms"]
    return row


def out_of_memory(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def largest_batch(base, data, out, steps, resolution, budget_gib: float, limit: int, quantize: str = "") -> dict:
    """The largest power-of-two batch (up to `limit`) whose short run trains within `budget_gib`, with gradient
    checkpointing, and its step time."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))
    fits, batch = 0, 1
    try:
        while batch <= limit:
            try:
                train_once(base, data, out, steps[0], batch, resolution, True, True, quantize)
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not out_of_memory(e):
                    raise
                break
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            fits, batch = batch, batch * 2
        return {"batch": fits, **step_time(base, data, out, steps, fits, resolution, True, True, quantize)} if fits \
            else {"batch": 0}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def unet_flops(base: str, resolution: int, cuda: bool) -> float:
    """FLOPs of one forward and backward of the UNet with the benchmark's LoRA, batch 1, as the trainer runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlora import lora
    from sdlora.config import AdapterConfig
    from sdlora.models import load_base

    b = load_base(base)
    unet = b.unet
    lora.inject(unet, AdapterConfig(rank=16, preset="attn-mlp"), "unet")
    device = "cuda" if cuda else "cpu"
    unet.to(device, dtype=torch.bfloat16 if cuda else torch.float32)
    for p in lora.lora_parameters(unet):
        p.data = p.data.float()
    size = resolution // (2 ** (len(b.vae.config.block_out_channels) - 1))
    x = torch.randn(1, unet.config.in_channels, size, size, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    extra = {}
    if b.family == "sdxl":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, width, device=device),
                                       "time_ids": torch.randn(1, 6, device=device)}}
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        unet(x, torch.tensor([500], device=device), text, **extra).sample.float().square().mean().backward()
    del b, unet
    gc.collect()
    return float(counter.get_total_flops())


def matmul_rate(cuda: bool) -> float:
    """Measured FLOP/s of a large matrix multiply: bf16 on the GPU, fp32 on the CPU (what each trains in)."""
    n, device = (8192, "cuda") if cuda else (1024, "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if cuda else 5
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - started)


def targets(family: str, quantize: str, rows: dict) -> dict:
    """Issue 11's targets at batch 1 (12's for a quantized SDXL: within 8 GiB with nf4 and checkpointing)."""
    peak = min(r["peak_allocated_gib"] for r in rows.values())
    if quantize:
        return {"SDXL with nf4 within 8 GiB peak": peak <= 8} if (family, quantize) == ("sdxl", "nf4") else {}
    target = TARGETS[family]
    best = max([r["utilisation"] for r in rows.values()]
               + [b.get("utilisation", 0) for r in rows.values() for b in r.get("largest_batch", {}).values()])
    return {f"at most {target['step_ms']} ms per step": min(r["step_ms"] for r in rows.values()) <= target["step_ms"],
            f"at most {target['peak_gib']} GiB peak": peak <= target["peak_gib"],
            "at least 35% of the matmul rate at the best batch": best >= 0.35}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--family", nargs="+", default=["sd1", "sdxl"], choices=list(RESOLUTION))
    ap.add_argument("--short", action="store_true", help="Tiny bases on whatever device there is, few steps.")
    ap.add_argument("--max-batch", type=int, default=16, help="Largest batch tried per memory budget.")
    ap.add_argument("--quantize-base", default="", choices=["", "int8", "nf4"],
                    help="Train on a quantized base (QLoRA, issue 12: SDXL with nf4 within 8 GiB).")
    ap.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS_GIB),
                    help="Memory budgets in GiB for the largest-batch search (GPU only; none: skip it).")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    machine = (torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{machine}, torch {torch.__version__}",
                    "command": "python benchmarks/full_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "settings": {"rank": 16, "preset": "attn-mlp", "precision": "bf16" if cuda else "fp32",
                                 "cached": "latents and text", "quantize_base": args.quantize_base or "none",
                                 "quantize_backend": quant.backend_for("auto") if args.quantize_base else "none"},
                    "rows": {}}
    rate = matmul_rate(cuda)
    report["matmul_tflops"] = rate / 1e12
    steps = (2, 4) if args.short else (10, 40)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in args.family:
            resolution = 64 if args.short else RESOLUTION[family]
            if args.short:
                base = {"sd1": "tiny-sd", "sdxl": "tiny-sdxl"}[family]
            else:
                base = str(tmp / family)
                build_full_size(family, Path(base))
            data = tmp / f"data-{family}" / "1_bench"
            make_data(data, resolution, n=max(8, args.max_batch))  # every batch full
            flops = unet_flops(base, resolution, cuda)
            rows, q = {}, f" {args.quantize_base}" if args.quantize_base else ""
            for checkpointing in (False, True):
                name = f"{family}{q}, gradient checkpointing {'on' if checkpointing else 'off'}"
                row = {"batch": 1, **step_time(base, data.parent, tmp / "out", steps, 1, resolution, checkpointing,
                                               cuda, args.quantize_base)}
                row["unet_tflop_per_sample"] = flops / 1e12
                row["utilisation"] = flops / (row["step_ms"] / 1000) / rate
                rows[name] = row
                print(name, json.dumps(row), flush=True)
            if cuda and args.budgets:  # with gradient checkpointing: the lean setting a small card would use
                search = rows[f"{family}{q}, gradient checkpointing on"]["largest_batch"] = {}
                for budget in args.budgets:
                    best = largest_batch(base, data.parent, tmp / "out", steps, resolution, budget, args.max_batch,
                                         args.quantize_base)
                    if best["batch"]:
                        best["utilisation"] = best["batch"] * flops / (best["step_ms"] / 1000) / rate
                    search[f"{budget:g} GiB"] = best
                    print(family, f"{budget:g} GiB", json.dumps(best), flush=True)
            report["rows"] |= rows
            if cuda and not args.short:
                report.setdefault("targets", {})[family + q] = targets(family, args.quantize_base, rows)
    if args.out:
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    return report


if __name__ == "__main__":
    main()
