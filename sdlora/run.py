"""One training run: the state its steps share, and everything it writes (adapters, resumable state, samples,
A1111 sidecars). `train.py` holds the loop; this module is what the loop leaves behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import lora
from .adapters import adapter_bytes, safetensors_bytes, write_adapter
from .config import BUILTINS, TrainConfig, anchored
from .embeddings import bundle_tensors, textual_inversion_tensors
from .logs import write_csv
from .metadata import training_metadata
from .models import Base
from .safefiles import atomic_save_image, atomic_write_bytes
from .state import save_state, state_path

COMPONENT_NAMES = ("text_encoder", "text_encoder_2")


@dataclass
class Run:
    """What one run's helpers share. Filled in as the run is set up: data first, then the base, then the
    optimizer; `step`, `epoch`, `rows` (step, loss, lr), `pending` and `samples` move as it trains."""

    cfg: TrainConfig
    accelerator: Any
    report: Any  # the scanned data folder (sdlora.data.ScanReport)
    name: str
    reg: Any = None  # the scanned regularisation folder, when there is one
    pivot: Any = None  # the new tokens of --train-embedding (sdlora.embeddings.Installed)
    fixed_vectors: list | None = None  # their vectors once --embedding-steps have passed
    params: list = field(default_factory=list)  # the trainable tensors (LoRA, then new tokens' vectors)
    ema: Any = None  # their moving average (diffusers' EMAModel), with --ema-decay
    text_cache: dict | None = None  # caption -> text embeddings, when they are fixed
    skipped: int = 0  # steps passed over for a loss or gradient that was not finite (--nan-policy skip)
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that asked the run to save and stop
    started: float = field(default_factory=time.time)
    loop_started: float = 0.0  # when the training loop began
    first_step_seconds: float | None = None  # with --compile: the first step, compilation included
    base: Base | None = None
    quantize_backend: str = ""  # the library that quantized the base (--quantize-backend resolved for the device)
    trained_tes: list[int] = field(default_factory=list)  # indices of the text encoders that get LoRA
    targets: dict[str, list[str]] = field(default_factory=dict)  # component -> module paths with LoRA
    adapted: list = field(default_factory=list)  # those modules (lora.adapted_layers), to set their weight
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0
    epoch: int = 0
    rows: list[tuple[int, float, float]] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)  # steps whose loss is not read yet
    samples: list[Path] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def final_path(self) -> Path:
        return self.out / f"{self.name}.safetensors"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def items(self) -> list:
        """Training images, then regularisation images: what the dataset and the epoch plan index."""
        return self.report.items + (self.reg.items if self.reg else [])

    @property
    def new_tokens(self) -> dict[str, int]:
        """--train-embedding's tokens and their vector counts."""
        from .embeddings import parse_spec

        return dict(parse_spec(s) for s in self.cfg.adapter.train_embedding)

    @property
    def text_models(self) -> list[int]:
        """Indices of the text encoders that train: LoRA on them, or new tokens in them."""
        return list(range(len(self.base.text_encoders))) if self.pivot else self.trained_tes

    @property
    def trains_text(self) -> bool:
        """Whether this step's loss reaches into the text encoders."""
        return bool(self.trained_tes) or (self.pivot is not None and self.fixed_vectors is None)

    @property
    def trigger(self) -> str:
        """--trigger and the new tokens, else the one-word tags every caption shares (recorded so users and UIs
        know what to type)."""
        words = [w.strip() for w in self.cfg.data.trigger.split(",") if w.strip()]
        words += [t for t in self.new_tokens if t not in words]
        return ", ".join(words or self.report.trigger_words())


def flat_config(cfg: TrainConfig) -> dict:
    """Every option by its flag name, one level deep (for the state file, resume checks and TensorBoard)."""
    d = asdict(cfg)
    flat = {k: v for k, v in d.items() if k not in ("data", "adapter")}
    flat.update(d["data"])
    flat.update(d["adapter"])
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in flat.items() if not isinstance(v, list) or v}


def lora_states(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    states = {"unet": lora.lora_state(run.base.unet)} if "unet" in run.targets else {}
    for i in run.trained_tes:
        states[COMPONENT_NAMES[i]] = lora.lora_state(run.base.text_encoders[i])
    return states


def untrained(run: Run) -> dict[str, str]:
    """The layers of trained text encoders left without LoRA because the loss never reaches them."""
    out = {}
    for i in run.trained_tes:
        exclude = lora.unreachable(run.base.text_encoders[i], run.base.family, COMPONENT_NAMES[i])
        if exclude:
            out[COMPONENT_NAMES[i]] = f"{exclude} (SDXL reads the penultimate layer of this encoder)"
    return out


@contextlib.contextmanager
def averaged(run: Run):
    """With --ema-decay, the moving average in place of the raw weights for the duration (then put back)."""
    if run.ema is None:
        yield
        return
    run.ema.store(run.params)
    run.ema.copy_to(run.params)
    try:
        yield
    finally:
        run.ema.restore(run.params)


def adapter_blob(run: Run) -> bytes:
    """The adapter at this step as safetensors bytes (the moving average with --ema-decay), with kohya/ModelSpec
    metadata and hashes."""
    with averaged(run):
        return _adapter_blob(run)


def _adapter_blob(run: Run) -> bytes:
    cfg, base, report = run.cfg, run.base, run.report
    dirs = {}
    for item in report.items:
        d = dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        d["img_count"] += 1
    meta = training_metadata(
        name=run.name, family=base.family, prediction_type=base.prediction_type, base_name=Path(cfg.base).name,
        rank=cfg.adapter.rank, alpha=cfg.adapter.lora_alpha, preset=cfg.adapter.preset,
        train_text_encoder=cfg.adapter.train_text_encoder, resolution=cfg.data.resolution, steps=run.step,
        epoch=run.epoch + 1, lr=cfg.lr, text_encoder_lr=cfg.text_encoder_lr, num_images=len(report.items),
        tag_frequency=report.tag_frequency(), dataset_dirs=dirs, dataset_dir=Path(report.root).name,
        buckets=dict(report.buckets()), trigger=run.trigger, seed=cfg.seed, started=run.started,
        finished=time.time(), optimizer=cfg.optimizer, lr_scheduler=cfg.lr_scheduler,
        min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset, untrained=untrained(run),
        quantized_base=cfg.quantize_base, quantize_backend=run.quantize_backend, kind=cfg.adapter.kind, factor=cfg.adapter.factor,
        decompose_both=cfg.adapter.decompose_both,
    )
    meta["ss_mixed_precision"] = run.accelerator.mixed_precision  # what ran ("no" for fp32), as kohya records it
    if cfg.base in BUILTINS:  # (exactly: ss_sd_model_name is a folder's or Hub id's last part, which may read alike)
        meta["sdlora_builtin_base"] = cfg.base
    if run.reg:  # kohya's keys for regularisation images
        reg_dirs: dict = {}
        for item in run.reg.items:
            d = reg_dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
            d["img_count"] += 1
        meta |= {"ss_num_reg_images": str(len(run.reg.items)), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
                 "ss_prior_loss_weight": str(cfg.prior_loss_weight)}
    if run.ema is not None:
        meta["sdlora_ema_decay"] = str(cfg.ema_decay)
    if cfg.train_weight != 1 or cfg.train_weight_min is not None:  # applied at this weight, it gives what it learned
        meta |= {"sdlora_train_weight": f"{cfg.train_weight:g}", "sdlora_preferred_weight": f"{cfg.train_weight:g}"}
        if cfg.train_weight_min is not None:
            meta["sdlora_train_weight_min"] = f"{cfg.train_weight_min:g}"
    if cfg.adapter.embedding_only:  # a textual inversion: A1111's and ComfyUI's embedding files
        (token, vectors), = run.pivot.vectors().items()
        meta = {k: v for k, v in meta.items() if not k.startswith("ss_network_")}  # (no network was trained)
        return safetensors_bytes(textual_inversion_tensors(vectors, base.family),
                               {**meta, "sdlora_token": token, "sdlora_vectors": str(vectors[0].shape[0])})
    bundles = bundle_tensors(run.pivot.vectors(), base.family) if run.pivot else {}
    return adapter_bytes(lora_states(run), family=base.family, rank=cfg.adapter.rank, alpha=cfg.adapter.lora_alpha,
                         targets=run.targets, layout=cfg.format, precision=cfg.save_precision, metadata=meta,
                         unet_config=base.unet.config, extra=bundles, kind=cfg.adapter.kind)


def checkpoint(run: Run) -> None:
    """An intermediate adapter `NAME-stepNNNNNN.safetensors` plus the state `--resume` continues from."""
    blob = adapter_blob(run)
    if run.main:
        path = run.out / f"{run.name}-step{run.step:06d}.safetensors"
        write_adapter(path, blob)
        save_run_state(run, path, blob)
        write_csv(run.out / "logs" / "loss.csv", run.rows)
    run.accelerator.wait_for_everyone()


def listing_hash(run: Run) -> str:
    """What the run's images are: each file's path (resolved: a resume may spell the folder another way), size,
    modification time and repeats."""
    rows = [(str(Path(i.path).resolve()), *(lambda st: (st.st_size, st.st_mtime_ns))(Path(i.path).stat()), i.repeats, i.reg)
            for i in run.items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def save_run_state(run: Run, adapter: Path | None = None, blob: bytes | None = None) -> None:
    """The resumable state at this step (the config goes with it, so a resume can refuse changed settings), with
    a manifest: the adapter saved beside it and its hash, and hashes of the config and the dataset listing."""
    config = flat_config(anchored(run.cfg))  # (absolute paths: a resume from another folder finds them)
    manifest = {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
                "data_sha256": listing_hash(run)}
    if adapter is not None:
        manifest["adapter"] = {"file": Path(adapter).name, "sha256": hashlib.sha256(blob).hexdigest()}
    states = lora_states(run)
    if run.pivot:
        states["embeddings"] = {str(i): p.detach() for i, p in enumerate(run.pivot.parameters())}
    extra: dict = {"config": config}
    if run.ema is not None:
        states["ema"] = {str(i): t for i, t in enumerate(run.ema.shadow_params)}
        extra["ema_step"] = run.ema.optimization_step
    save_state(state_path(run.out, run.name, run.step), step=run.step, lora=states, optimizer=run.optimizer,
               scheduler=run.scheduler, extra=extra, manifest=manifest)


@torch.no_grad()
def write_samples(run: Run) -> list[Path]:
    """One image per --sample-prompt at this step, in `samples/`; the encoders go back where they were."""
    if not run.main:
        return []
    base, cfg = run.base, run.cfg
    encoders = [base.vae, *base.text_encoders]
    homes = [next(m.parameters()).device for m in encoders]  # where the caches left them
    for m in encoders:
        m.to(run.accelerator.device)
    pipe = base.pipeline()
    lora.set_weight(run.adapted, cfg.train_weight)  # (a step of a weight range may have moved it)
    was_training = base.unet.training
    base.unet.eval()
    paths = []
    try:
        for k, prompt in enumerate(cfg.sample_prompt):
            g = torch.Generator(device="cpu").manual_seed(cfg.seed + k)
            with run.accelerator.autocast():
                latents = pipe(prompt, num_inference_steps=cfg.sample_steps, height=cfg.data.resolution,
                               width=cfg.data.resolution, generator=g, output_type="latent").images
            path = run.out / "samples" / f"{run.name}-step{run.step:06d}-{k}.png"
            atomic_save_image(decode(pipe, latents)[0], path)
            paths.append(path)
    finally:
        base.unet.train(was_training)
        for m, home in zip(encoders, homes, strict=True):
            m.to(home)
    return paths


def decode(pipe, latents: torch.Tensor) -> list:
    """Latents to PIL images with the fp32 VAE outside autocast: under fp16 autocast the VAE would decode in fp16,
    where SDXL's overflows (black or NaN previews)."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        z = latents.to(vae.device, torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:  # as the SDXL pipeline decodes for VAEs that declare them
            shape = (1, -1, 1, 1)
            z = z * torch.tensor(std).view(shape).to(z) / vae.config.scaling_factor + torch.tensor(mean).view(shape).to(z)
        else:
            z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        pixels = vae.decode(z).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def write_sidecars(run: Run) -> None:
    """A1111's `NAME.json` (activation text, preferred weight, sd version) and `NAME.preview.png`."""
    adapter, cfg = run.final_path, run.cfg
    info = {"description": f"Trained with sdlora on {Path(cfg.base).name}", "sd version": run.base.family.upper(),
            "activation text": run.trigger, "preferred weight": cfg.train_weight, "negative text": "", "notes": ""}
    atomic_write_bytes(adapter.with_suffix(".json"), json.dumps(info, indent=2).encode())
    if run.samples:
        atomic_write_bytes(adapter.with_name(adapter.stem + ".preview.png"), run.samples[-1].read_bytes())
