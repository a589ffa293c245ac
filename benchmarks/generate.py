"""Blend-studio speed on a tiny base: base vs 3 LoRAs (exact, fast), weight changes, adapter loading.

    python benchmarks/generate.py [--base tiny-sd] [--out benchmarks/results/generate_cpu.json]

Targets (issue 4): fast mode within 1.03x the base; changing blend weights within one UNet forward;
loading one more LoRA bounded however many are loaded. Loading grows with the peft adapters live in the pipeline
(peft walks every module for each), which the engine caps at MAX_LIVE_ADAPTERS, so it stops growing there:
measured with 1, 5, 8, 20 and 50 LoRAs loaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdlora import lora
from sdlora.adapters import adapter_bytes
from sdlora.config import AdapterConfig
from sdlora.engine import MAX_LIVE_ADAPTERS, BlendItem, Engine, Params
from sdlora.models import build_tiny
from sdlora.safefiles import atomic_write_bytes

LOADED = (1, 5, 8, 20, 50)


def make_lora(folder: Path, name: str, base_name: str, seed: int) -> None:
    base = build_tiny(base_name)
    cfg = AdapterConfig(rank=8, preset="attn-mlp", train_text_encoder=True)
    targets = {"unet": lora.inject(base.unet, cfg, "unet"), "text_encoder": lora.inject(base.text_encoders[0], cfg, "text_encoder")}
    g = torch.Generator().manual_seed(seed)
    for m in (base.unet, base.text_encoders[0]):
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.05
    states = {"unet": lora.lora_state(base.unet), "text_encoder": lora.lora_state(base.text_encoders[0])}
    blob = adapter_bytes(states, family=base.family, rank=8, alpha=8, targets=targets, layout="kohya", precision="fp16",
                         metadata={"ss_base_model_version": "sd_v1"}, unet_config=base.unet.config)
    atomic_write_bytes(folder / f"{name}.safetensors", blob)


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="tiny-sd")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generate_cpu.json"))
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(LOADED[-1] + len(LOADED)):
            make_lora(folder, f"l{i:02d}", args.base, i)
        engine = Engine(args.base, folder)
        params = Params(prompt="a red circle", seed=1, steps=10, width=64, height=64, scheduler="Euler")
        three = [BlendItem("l00", 0.7), BlendItem("l01", 0.5, te=0.3), BlendItem("l02", -0.4)]

        def gen(blend, mode):
            return lambda: engine.generate(params, blend, mode)

        base_s = timed(gen([], "exact"), args.repeat)
        exact_s = timed(gen(three, "exact"), args.repeat)
        fast_s = timed(gen(three, "fast"), args.repeat)
        engine.clear()

        # One UNet forward at the generation size, the yardstick for a weight change.
        latents = torch.randn(2, 4, 16, 16)
        hidden = torch.randn(2, 77, engine.base.unet.config.cross_attention_dim)
        with torch.no_grad():
            unet_s = timed(lambda: engine.base.unet(latents, 10, hidden), args.repeat)

        weights = iter([0.1 * k for k in range(1, 1000)])

        def change(mode):
            def run():
                w = next(weights) % 2
                engine.apply([BlendItem("l00", w), BlendItem("l01", 0.5), BlendItem("l02", -0.4)], mode)
            return run

        change_exact = timed(change("exact"), args.repeat)
        change_fast = timed(change("fast"), args.repeat)
        engine.clear()

        # Load one more LoRA (a new file: read, checked, injected) with more and more others already loaded.
        fresh = Engine(args.base, folder)
        load_times = {}
        names = sorted(fresh.library.entries)
        extra = iter(names[LOADED[-1]:])
        for loaded in range(1, LOADED[-1] + 1):
            fresh.apply([BlendItem(names[loaded - 1], 1.0)], "exact")
            if loaded in LOADED:
                t = time.perf_counter()
                fresh.apply([BlendItem(next(extra), 1.0)], "exact")
                load_times[str(loaded)] = time.perf_counter() - t

    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "base": args.base, "steps": params.steps, "size": "64x64",
        "latency_s": {"base": base_s, "three_loras_exact": exact_s, "three_loras_fast": fast_s},
        "fast_over_base": fast_s / base_s, "exact_over_base": exact_s / base_s,
        "unet_forward_s": unet_s,
        "weight_change_s": {"exact": change_exact, "fast": change_fast},
        "load_one_more_s": load_times,
        "max_live_adapters": MAX_LIVE_ADAPTERS,
        "targets": {"fast_within_1.03x": fast_s / base_s <= 1.03,
                    "weight_change_within_one_unet_forward": change_exact <= unet_s,
                    "load_bounded_50_vs_8_within_1.2x": load_times["50"] <= 1.2 * load_times["8"]},
    }
    print(json.dumps(report, indent=2))
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
