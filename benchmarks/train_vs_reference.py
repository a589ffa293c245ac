"""sdlora against a reference trainer written the way the common example scripts train, on the same base, data
and settings (rank 4 on the attention projections, batch 1, lr 1e-4, AdamW).

    .venv/bin/python benchmarks/train_vs_reference.py [--repeats 3] [--out benchmarks/results/train_vs_reference_cpu.json]
    .venv/bin/python benchmarks/train_vs_reference.py --shapes compute --variants sdlora "sdlora, --compile" \
        --repeats 1 --out benchmarks/results/train_compile_cpu.json

Each trainer runs as its own process, interleaved with the others and repeated, at two lengths: the step time is
the difference of the long and short runs' wall times over the difference of their steps, and the fixed cost
(process start, imports, loading, caching, saving) is what the short run took beyond its steps. Peak RSS comes from
the kernel's accounting of each process (wait4). Medians over the repeats; these machines are noisy, so only
differences above 5% within one run mean anything.

Variants: sdlora with its defaults (latents and text embeddings cached), sdlora with caching off, on request
(`--variants`) sdlora with `--compile` (after one run that fills inductor's cache; its extra time is `compile_s`),
and the reference loop (`--reference`, below): VAE and text encoder on every step, a torchvision-style transform per
image, LoRA through peft on to_q/to_k/to_v/to_out.0, AdamW, accelerate, a fresh `.item()` every step.

Shapes, built seeded here and saved as diffusers folders both trainers load:
- overhead: UNet 32/64 channels, 4x VAE, 64 px (the tiny-sd shape: framework overhead dominates);
- compute: SD-shaped UNet 64/128/256 with cross-attention in the first two levels, 8x VAE, 128 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = {"rank": 4, "lr": 1e-4, "batch_size": 1, "seed": 0}
SHAPES = {"overhead": {"resolution": 64}, "compute": {"resolution": 128}}


# ---------------------------------------------------------------- the bases and the data


def build_base(shape: str, folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdlora.models import _clip_config, _tiny_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    if shape == "overhead":
        from sdlora.models import build_tiny

        pipe = build_tiny("tiny-sd").pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=16, sample_size=128)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(64, 128, 256), cross_attention_dim=64, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    norm_num_groups=32)
        te = CLIPTextModel(_clip_config(64))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet,
                                       scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)


def make_data(folder: Path, resolution: int, n: int = 8) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (resolution, resolution), (255, 255 - 20 * i, 255))
        r = resolution
        ImageDraw.Draw(img).ellipse([r // 5 + i, r // 5, 4 * r // 5, 4 * r // 5 - i], fill=(30 * i % 255, 80, 200))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"bench, a shape number {i}", encoding="utf-8")


# ---------------------------------------------------------------- the reference trainer


def reference(base: Path, data: Path, out: Path, steps: int, resolution: int) -> None:
    """Trains as the common example scripts do (diffusers' train_text_to_image_lora.py and its kin)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(COMMON["seed"])
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=COMMON["rank"], lora_alpha=COMMON["rank"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=COMMON["lr"], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    files = sorted(data.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8") for f in files]

    def transform(path):  # torchvision's Resize, CenterCrop, ToTensor, Normalize([0.5], [0.5]), written out
        img = Image.open(path).convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            ids = tokenizer(captions[i], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids[0]
            return {"pixel_values": transform(files[i]), "input_ids": ids}

    loader = torch.utils.data.DataLoader(Data(), batch_size=COMMON["batch_size"], shuffle=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    step = 0
    while step < steps:
        unet.train()
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
                noisy = noise_scheduler.add_noise(latents, noise, t)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, t, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.gather(loss.repeat(COMMON["batch_size"])).mean().item()  # the examples' per-step log
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            if step >= steps:
                break
    state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "reference.safetensors"))


# ---------------------------------------------------------------- measuring


def run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def variant_argv(variant: str, base: Path, data: Path, out: Path, steps: int, resolution: int) -> list[str]:
    if variant == "reference":
        return [sys.executable, __file__, "--reference", str(base), str(data), str(out), str(steps), str(resolution)]
    argv = [sys.executable, "-m", "sdlora", "-q", "train", "--base", str(base), "--data", str(data),
            "--output-dir", str(out), "--name", "bench", "--overwrite", "--steps", str(steps),
            "--resolution", str(resolution), "--rank", str(COMMON["rank"]), "--lr", str(COMMON["lr"]),
            "--batch-size", str(COMMON["batch_size"]), "--seed", str(COMMON["seed"])]
    if variant == "sdlora, no caching":
        argv += ["--no-cache-latents", "--no-cache-text"]
    if variant == "sdlora, --compile":
        argv += ["--compile"]
    return argv


VARIANTS = ("sdlora", "sdlora, no caching", "reference")
OPTIONAL = ("sdlora, --compile",)  # minutes of compilation in every run: only when asked for (--variants)


def measure(shape: str, tmp: Path, repeats: int, short: int, long: int, variants=VARIANTS) -> dict:
    base, data = tmp / f"{shape}-base", tmp / f"{shape}-data" / "1_bench"
    build_base(shape, base)
    res = SHAPES[shape]["resolution"]
    make_data(data, res)
    times: dict = {v: {short: [], long: []} for v in variants}
    rss: dict = {v: [] for v in variants}
    # --compile: a first run fills inductor's on-disk cache, so the measured runs all load the compiled code alike
    # and the difference of their walls is the step time again; what compiling costs is that first run's extra.
    cold = {v: run(variant_argv(v, base, data.parent, tmp / "out", short, res))[0] for v in variants if v in OPTIONAL}
    for r in range(repeats):
        for v in variants if r % 2 == 0 else reversed(variants):  # interleaved, alternating order
            for steps in (short, long):
                wall, peak = run(variant_argv(v, base, data.parent, tmp / "out", steps, res))
                times[v][steps].append(wall)
                rss[v].append(peak)
                print(f"{shape} {v} {steps} steps: {wall:.2f} s, {peak:.0f} MiB", flush=True)
    out = {}
    for v in variants:
        step_s = [(b - a) / (long - short) for a, b in zip(times[v][short], times[v][long], strict=True)]
        fixed = [a - short * s for a, s in zip(times[v][short], step_s, strict=True)]
        out[v] = {"step_s": statistics.median(step_s), "fixed_s": statistics.median(fixed),
                  "peak_rss_mib": statistics.median(rss[v]), "step_s_each": step_s}
        if v in cold:
            out[v]["compile_s"] = cold[v] - statistics.median(times[v][short])
    ref = out["reference"]
    for v in variants:
        out[v]["step_vs_reference"] = out[v]["step_s"] / ref["step_s"]
        out[v]["rss_vs_reference"] = out[v]["peak_rss_mib"] / ref["peak_rss_mib"]
    return out


FLOOR = ("import torch, accelerate, peft; from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel; "
         "from transformers import CLIPTextModel, CLIPTokenizer")


def import_floor(repeats: int, hidden: bool = False) -> dict:
    """What importing the libraries both trainers need costs, alone: the part of the fixed cost and of the memory
    that no trainer built on them can avoid. With `hidden`, as the sdlora command imports them: bitsandbytes and
    torchao, which those libraries import whenever they are installed, left out (sdlora.optional)."""
    code = f"from sdlora import optional; optional.hide(); {FLOOR}" if hidden else FLOOR
    runs = [run([sys.executable, "-c", code]) for _ in range(repeats)]
    return {"seconds": statistics.median(w for w, _ in runs), "peak_rss_mib": statistics.median(m for _, m in runs)}


def cpu() -> str:
    """The CPU's name and the instruction sets that change which kernels torch and bitsandbytes run."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(have) if have else 'no AVX-512'})"


def targets(shapes: dict) -> dict:
    """Issue 11's CPU targets, for the shapes measured."""
    out = {}
    for shape, limit in (("compute", 0.55), ("overhead", 0.7)):
        if "sdlora" in shapes.get(shape, {}):
            out[f"{shape}: step at most {limit}x the reference"] = shapes[shape]["sdlora"]["step_vs_reference"] <= limit
    measured = [s["sdlora"] for s in shapes.values() if "sdlora" in s]
    if measured:
        out["peak RSS at most 0.75x"] = all(s["rss_vs_reference"] <= 0.75 for s in measured)
        out["fixed cost at most 4 s"] = all(s["fixed_s"] <= 4 for s in measured)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_vs_reference_cpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=105)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS + OPTIONAL,
                    help="Which trainers to run (the reference always runs).")
    ap.add_argument("--reference", nargs=5, metavar=("BASE", "DATA", "OUT", "STEPS", "RESOLUTION"),
                    help="Run the reference trainer (what the benchmark calls itself with).")
    args = ap.parse_args()
    if args.reference:
        base, data, out, steps, res = args.reference
        folder = next(Path(data).iterdir())  # the one `1_bench` folder
        Path(out).mkdir(parents=True, exist_ok=True)
        reference(Path(base), folder, Path(out), int(steps), int(res))
        return

    import torch

    from sdlora import optional
    from sdlora.safefiles import atomic_write_bytes

    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads", "settings": COMMON,
              "runs": {"short": args.short, "long": args.long, "repeats": args.repeats}, "shapes": {},
              "installed": {name: optional.installed(name) for name in optional.QUANTIZERS}}
    report["import_floor"] = import_floor(args.repeats)
    report["import_floor_without_quantizers"] = import_floor(args.repeats, hidden=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            variants = tuple(dict.fromkeys([*args.variants, "reference"]))
            report["shapes"][shape] = measure(shape, Path(tmp), args.repeats, args.short, args.long, variants)
    report["targets"] = targets(report["shapes"])
    print(json.dumps(report, indent=2))
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
