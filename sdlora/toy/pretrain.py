"""Pretrain the toy base: `python -m sdlora.toy.pretrain [--vae-steps 1500] [--unet-steps 2400]`.

1. The VAE learns varied content (plain and styled scenes, and stripes, checks, bands, dots and rims of
   any colour), so it can reconstruct what LoRAs will later teach.
2. The UNet and text encoder learn from plain scenes only, never from the example styles.
3. A fixed check (every colour x shape, two seeds) is scored by the analyser; the weights (fp16), the
   command, duration, machine and scores are written to sdlora/toy/weights/.
Everything is seeded and counted in steps, so a rerun gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..safefiles import atomic_write_bytes
from .analyse import analyse
from .base import WEIGHTS, build_components
from .render import BACKGROUNDS, COLOURS, SHAPES, random_scene, render, texture_scene


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def vae_pool(rng: random.Random, n: int) -> torch.Tensor:
    images = []
    for i in range(n):
        k = i % 8
        if k < 4:
            images.append(texture_scene(rng))
        elif k < 6:
            images.append(render(random_scene(rng)))
        else:
            images.append(render(random_scene(rng, "rim" if k == 6 else "stripes")))
    return to_tensor(images)


def train_vae(vae, steps: int, rng: random.Random, log, device="cpu", lr: float = 1e-3, batch: int = 64) -> dict:
    pool = vae_pool(rng, 12000)
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    start, step = time.time(), 0
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    while step < steps:
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = pool[idx].to(device)
        if step % 2:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.5f} ({time.time() - start:.0f}s)")
    vae.eval()
    return {"steps": step, "batch": batch, "lr": lr, "seconds": round(time.time() - start),
            **vae_errors(vae, random.Random(123))}


@torch.no_grad()
def vae_errors(vae, rng: random.Random) -> dict:
    """Mean absolute reconstruction error in 0..255 units, per kind of content."""
    out = {}
    for kind in ("plain", "rim", "stripes", "texture"):
        imgs = [texture_scene(rng) if kind == "texture" else render(random_scene(rng, "" if kind == "plain" else kind))
                for _ in range(128)]
        x = to_tensor(imgs).to(vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out[f"vae_error_{kind}"] = round(float((rec - x).abs().mean() * 127.5), 2)
    return out


def train_unet(vae, te, unet, tok, sched_config: dict, steps: int, rng: random.Random, log, device="cpu",
               lr: float = 3e-4) -> dict:
    from diffusers import DDPMScheduler

    scenes = [random_scene(rng) for _ in range(20000)]
    with torch.no_grad():
        moments = []
        for i in range(0, len(scenes), 500):
            d = vae.encode(to_tensor([render(s) for s in scenes[i:i + 500]]).to(device)).latent_dist
            moments.append((d.mean.cpu(), d.std.cpu()))
        mean = torch.cat([m for m, _ in moments])
        std = torch.cat([s for _, s in moments])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    captions = [s.caption() for s in scenes]
    ids_all = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    noise_sched = DDPMScheduler(**{k: v for k, v in sched_config.items() if k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")})
    params = list(unet.parameters()) + list(te.parameters())
    unet.to(device)
    te.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    unet.train()
    te.train()
    start, step = time.time(), 0
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    while step < steps:
        idx = torch.randint(0, len(scenes), (64,), generator=gen)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(64, generator=gen) < 0.1  # for classifier-free guidance
        ids[drop] = empty
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (64,), generator=gen)
        noisy = noise_sched.add_noise(lat, noise, t)
        pred = unet(noisy.to(device), t.to(device), te(ids.to(device))[0]).sample
        noise = noise.to(device)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"unet step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    unet.eval()
    te.eval()
    return {"steps": step, "lr": lr, "seconds": round(time.time() - start), "vae_scaling_factor": scale}


CHECK_BACKGROUNDS = list(BACKGROUNDS)


def check_prompts() -> list[tuple[str, str, str, int]]:
    """Every colour x shape, each on a background that cycles, with two seeds: 36 images."""
    out = []
    k = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for seed in (0, 1):
                out.append((colour, shape, CHECK_BACKGROUNDS[k % len(CHECK_BACKGROUNDS)], seed))
                k += 1
    return out


@torch.no_grad()
def check(base, steps: int = 25, cfg: float = 5.0) -> dict:
    """Draw every check prompt (one pipeline call) and read colour and shape back with the analyser."""
    from ..engine import Engine, Params

    rows = check_prompts()
    images = Engine(base).render([f"a {colour} {shape} on a {bg} background" for colour, shape, bg, _ in rows],
                                 [seed for *_, seed in rows], Params(prompt="", steps=steps, cfg_scale=cfg, width=32,
                                                                     height=32, scheduler="Euler"), mode="fast")
    readings = [(analyse(img), colour, shape) for img, (colour, shape, _, _) in zip(images, rows, strict=True)]
    return {"check_images": len(rows), "color_accuracy": sum(r.colour == c for r, c, _ in readings) / len(rows),
            "shape_accuracy": sum(r.shape == s for r, _, s in readings) / len(rows)}


def save(vae, te, unet, out: Path, record: dict) -> None:
    from safetensors.torch import save

    for name, module in (("vae", vae), ("text_encoder", te), ("unet", unet)):
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
        meta = {"scaling_factor": str(vae.config.scaling_factor)} if name == "vae" else {}
        atomic_write_bytes(out / f"{name}.safetensors", save(tensors, metadata=meta))
    atomic_write_bytes(out / "pretrain.json", json.dumps(record, indent=2).encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdlora.toy.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--vae-steps", type=int, default=1500, help="VAE steps (default: 1500)")
    ap.add_argument("--unet-steps", type=int, default=2400, help="UNet + text-encoder steps of batch 64 (default: 2400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cpu", help="cpu (the recorded reference) or cuda (for experiments)")
    ap.add_argument("--no-check", action="store_true", help="Skip the generation check.")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("sdlora.toy.pretrain").info

    started = time.time()
    rng = random.Random(args.seed)
    vae, te, unet, tok, sched = build_components(args.seed)
    vae_stats = train_vae(vae, args.vae_steps, rng, log, args.device, args.vae_lr, args.vae_batch)
    log(f"vae: {vae_stats}")
    vae.requires_grad_(False)
    unet_stats = train_unet(vae, te, unet, tok, dict(sched.config), args.unet_steps, rng, log, args.device,
                            args.unet_lr)
    log(f"unet: {unet_stats}")
    from ..models import Base

    base = Base("toy", "sd1", "epsilon", unet, vae, [te], [tok], sched)
    quality = {} if args.no_check else check(base)
    log(f"check: {quality}")
    record = {
        "command": "python -m sdlora.toy.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, device "
                   + (f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else "cpu"),
        "vae": vae_stats, "unet": unet_stats, "check": quality,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in (("vae", vae), ("text_encoder", te),
                                                                             ("unet", unet))},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save(vae, te, unet, args.out, record)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
