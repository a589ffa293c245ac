"""One training step's loss: latents (encoded or cached), noise and timesteps from the sample's seed, the text
conditioning (SDXL's pooled embedding and size ids too), the UNet's prediction against the epsilon or v target,
and Min-SNR weighting. Shared by the training loop and the selection report's validation loss."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import embeddings
from .config import TrainConfig
from .data.dataset import seeded
from .errors import ConfigError
from .models import Base


def sample_latents(dist, seeds: list[int], base: Base) -> torch.Tensor:
    mean, std = dist.mean, dist.std
    eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (mean + std * eps.to(mean.device, mean.dtype)) * base.vae.config.scaling_factor


def encode_text(base: Base, text_encoders, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the pipelines make them: SD1/2 last hidden state; SDXL both encoders' penultimate
    layers concatenated, and the second encoder's pooled projection."""
    hidden, pooled = [], None
    for tok, te in zip(base.tokenizers, text_encoders, strict=True):
        texts = [embeddings.expand(c, embeddings.tokenizer_vectors(tok)) for c in captions]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        if base.is_sdxl:
            outputs = te(ids, output_hidden_states=True)
            hidden.append(outputs.hidden_states[-2])
            pooled = outputs[0]
        else:
            hidden.append(te(ids)[0])
    return torch.cat(hidden, dim=-1), pooled


def batch_loss(batch, base: Base, unet, text_encoders, noise_scheduler, cfg: TrainConfig, device, weight_dtype,
                text_cache, train_text: bool) -> torch.Tensor:
    slots = batch["slot"].tolist()
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
    else:
        with torch.no_grad():
            dist = base.vae.encode(batch["pixels"].to(device, torch.float32, non_blocking=True)).latent_dist
            latents = sample_latents(dist, [seeded(cfg.seed, "latent-slot", s) for s in slots], base)
    noise, timesteps = noise_and_timesteps(latents, slots, cfg, noise_scheduler.config.num_train_timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    if text_cache is not None:
        hidden = torch.stack([text_cache[c][0] for c in batch["caption"]]).to(device)
        pooled = torch.stack([text_cache[c][1] for c in batch["caption"]]).to(device) if base.is_sdxl else None
    else:
        ctx = contextlib.nullcontext() if train_text else torch.no_grad()
        with ctx:
            hidden, pooled = encode_text(base, text_encoders, batch["caption"], device)
    added = None
    if base.is_sdxl:
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}

    pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), added_cond_kwargs=added).sample
    if base.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        # Min-SNR weighting, Hang et al. 2023 (arXiv 2303.09556), §3.4: w = min(SNR, γ)/SNR for ε-prediction,
        # min(SNR, γ)/(SNR + 1) for v-prediction.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
        loss = loss * (clipped / (snr + 1 if base.prediction_type == "v_prediction" else snr))
    return (loss * batch["share"].to(loss.device)).sum()  # the batch mean, or this process's part of it


def noise_and_timesteps(latents: torch.Tensor, slots: list[int], cfg: TrainConfig, num_timesteps: int):
    low, high = cfg.min_timestep, num_timesteps if cfg.max_timestep is None else cfg.max_timestep
    if not low < high <= num_timesteps:
        raise ConfigError(f"timesteps {low} to {high}: the base's scheduler has {num_timesteps}; keep min_timestep "
                          f"below max_timestep and max_timestep at most {num_timesteps}")
    noises, steps = [], []
    for s in slots:
        g = torch.Generator().manual_seed(seeded(cfg.seed, "noise", s))
        n = torch.randn(latents.shape[1:], generator=g)
        if cfg.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
            n = n + cfg.noise_offset * torch.randn((latents.shape[1], 1, 1), generator=g)
        noises.append(n)
        steps.append(torch.randint(low, high, (1,), generator=g))
    return (torch.stack(noises).to(latents.device, latents.dtype), torch.cat(steps).to(latents.device))
