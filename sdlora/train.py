"""The training loop: scan the data, load and freeze the base, add LoRA, then noise → predict → loss → step.

Read top to bottom: `train()` is the story; set-up, caching, SDXL conditioning and resuming are named helpers
below it, and what a run writes (adapters, state, samples, sidecars) is in `run.py`. Randomness per image use comes from `dataset.seeded`, so
a resumed or multi-process run sees exactly the noise and timesteps a single uninterrupted run sees.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import embeddings, lora
from .adapters import write_adapter
from .config import TrainConfig, anchored, dump_toml
from .data.dataset import EpochPlan, Slot, TrainDataset, collate, latent_cache_key, seeded, to_training_image
from .doctor import diagnose, learning_rate_notes
from .errors import ConfigError, DataError, FormatError, MissingDependencyError
from .logs import plot_loss, read_csv, write_csv
from .loss import batch_loss, encode_text, sample_latents
from .memory import BF16_HINT_PARAMS, cpu_computes_bf16, training_precision
from .models import Base, load_base
from .run import (
    COMPONENT_NAMES,
    Run,
    adapter_blob,
    checkpoint,
    flat_config,
    listing_hash,
    save_run_state,
    write_samples,
    write_sidecars,
)
from .safefiles import atomic_write_bytes, read_safetensors, write_safetensors
from .safety import optimizer_step, save_and_stop, signals
from .state import earlier_run, load_state, states

log = logging.getLogger("sdlora")


@dataclass
class TrainResult:
    adapter: Path
    name: str
    steps: int
    loop_seconds: float
    trainable_params: int
    base_params: int
    adapter_bytes: int
    seconds: float
    losses: list[float]
    samples: list[Path]
    skipped: int = 0  # steps passed over for a non-finite loss (--nan-policy skip)

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(1, self.base_params)
        skipped = f" ({self.skipped} skipped: loss not finite)" if self.skipped else ""
        return (f"saved {self.adapter} ({self.adapter_bytes / 1e6:.2f} MB) after {self.steps} steps{skipped} in "
                f"{self.seconds:.1f}s; trainable parameters {self.trainable_params:,} ({pct:.3f}% of the base's "
                f"{self.base_params:,})")


def train(cfg: TrainConfig, *, progress: bool = False) -> TrainResult:
    run = _start(cfg)  # the data checked and the options fitted to the base, before any model is loaded
    cfg = run.cfg
    resume_from = _resume_path(cfg, run.out, run.name)
    if run.final_path.exists() and not cfg.overwrite:
        raise ConfigError(f"{run.final_path} already exists; pass another --name or --output-dir, or --overwrite to "
                          "replace it" if resume_from is None else f"{run.final_path} already exists and the resumed "
                          "run would replace it; pass --overwrite to allow that, or copy it away first")
    if resume_from is None:
        _earlier_run(run)
    optimizer_cls = _optimizer_class(cfg.optimizer)
    base_params, params = _load_and_inject(run)
    dataset, plan = _dataset_and_caches(run)
    total_steps = cfg.steps or math.ceil(cfg.epochs * plan.batches_per_epoch / cfg.grad_accum)
    unet, text_encoders, models = _optimizer_and_prepare(run, optimizer_cls, params, total_steps)
    run.params = params
    if cfg.ema_decay is not None:  # fp32 copies on the device, as the LoRA weights are
        from diffusers.training_utils import EMAModel

        run.ema = EMAModel(params, decay=cfg.ema_decay)
    if resume_from is not None:
        _resume(run, resume_from, total_steps)
    if run.pivot and cfg.embedding_steps and run.step >= cfg.embedding_steps:
        _fix_embeddings(run, dataset)
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        # The options as run: to repeat it (--config NAME.toml, from any folder) or to report on it (`sdlora report`).
        atomic_write_bytes(run.out / f"{run.name}.toml", dump_toml(anchored(cfg)).encode())
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(cfg).items()}
        run.accelerator.init_trackers("tensorboard", config=hparams)

    loop_seconds = _loop(run, dataset, plan, unet, text_encoders, models, total_steps, progress)

    blob = _finish(run)
    return TrainResult(run.final_path, run.name, run.step, loop_seconds, sum(p.numel() for p in params), base_params,
                       len(blob), time.time() - run.started, [r[1] for r in run.rows], run.samples, run.skipped)


def _loop(run: Run, dataset: TrainDataset, plan: EpochPlan, unet, text_encoders, models, total_steps: int,
          progress: bool) -> float:
    """noise -> predict -> loss -> step, over this process's share of each epoch's global batches, until
    `total_steps` or an interrupt (which saves); returns the loop's seconds."""
    from tqdm.auto import tqdm

    cfg, accelerator, base = run.cfg, run.accelerator, run.base
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_scheduler = base.noise_scheduler()
    bar = tqdm(total=total_steps, initial=run.step, disable=not (progress and run.main), unit="step", dynamic_ncols=True)
    micro = run.step * cfg.grad_accum
    loop_started = run.loop_started = time.time()
    accum_losses: list[torch.Tensor] = []
    step_items: list[int] = []  # the images of this step's batches, to name them if it goes wrong
    for m in models:
        m.train()
    # One loader for the whole run, so that its workers (--num-workers) start once, not every epoch (and none when a
    # resumed run is at its last step already). Pinned memory on CUDA: the batches copy while the GPU computes.
    rank = accelerator.process_index
    sampled, seen = itertools.tee(_batches(plan, micro, rank))  # (the loader runs ahead; the loop names each batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampled, collate_fn=collate,
                                         num_workers=cfg.num_workers, pin_memory=accelerator.device.type == "cuda",
                                         worker_init_fn=_worker_ignores_signals)
    steps = zip(seen, loader, strict=True) if run.step < total_steps else ()
    with signals(run):
        for slots, batch in steps:
            run.epoch = micro // plan.batches_per_epoch
            torch.manual_seed(seeded(cfg.seed, "step", micro, rank))  # LoRA dropout
            if cfg.train_weight_min is not None:
                lora.set_weight(run.adapted, step_weight(cfg, run.step))
            with accelerator.accumulate(*models):
                loss = batch_loss(batch, base, unet, text_encoders, noise_scheduler, cfg, accelerator.device,
                                  weight_dtype, run.text_cache, run.trains_text)
                accelerator.backward(loss)
                accum_losses.append(loss.detach())
                step_items += [s.item for s in slots]
                if accelerator.sync_gradients:
                    optimizer_step(run, run.params, accum_losses, step_items)
            micro += 1
            if accelerator.sync_gradients:
                _end_of_step(run, accum_losses, bar, total_steps)
                step_items.clear()
                if run.pivot and run.step == cfg.embedding_steps:
                    _fix_embeddings(run, dataset)
                if run.step >= total_steps:
                    break
                if run.interrupted:
                    save_and_stop(run)
    del steps, loader  # (its workers stop)
    bar.close()
    return time.time() - loop_started


def _finish(run: Run) -> bytes:
    """The final samples, adapter, state and logs, and the selection report; returns the adapter's bytes."""
    cfg = run.cfg
    if cfg.sample_prompt:
        run.samples += write_samples(run)
    blob = adapter_blob(run)
    if run.main:
        write_adapter(run.final_path, blob)
        if cfg.adapter.embedding_only:
            log.info(f"{run.final_path} is a textual-inversion embedding: A1111 and ComfyUI use it when the prompt "
                     f"holds its file name ({run.name}); diffusers: pipe.load_textual_inversion(path, token=...)")
        if cfg.save_every:  # the end is resumable too: `--resume latest --steps MORE` trains on from here
            save_run_state(run, run.final_path, blob)
        write_sidecars(run)
        write_csv(run.out / "logs" / "loss.csv", run.rows)
        plot_loss(run.out / "loss.png", run.rows)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if cfg.report and run.main:
        from .report import make_report

        rec = make_report(run.out, run.name)["recommended"]
        log.info(f"selection report: {run.out / 'report.html'}; recommended {rec['file']} at weight {rec['weight']:g}")
    return blob


def _earlier_run(run: Run) -> None:
    """A fresh run into a folder that holds checkpoints or states of an earlier run of the same name (one that was
    interrupted, say) would mix the two runs' files and lose the earlier one's resume point: refused, unless
    --overwrite, which removes them so that the folder holds one run."""
    earlier = earlier_run(run.out, run.name)
    if not earlier:
        return
    if not run.cfg.overwrite:
        raise ConfigError(f"{run.out} holds checkpoints or saved states of an earlier run named {run.name!r} "
                          f"({', '.join(p.name for p in earlier[:2])}{' ...' if len(earlier) > 2 else ''}): pass "
                          "--resume latest to continue it, another --name or --output-dir to keep both, or "
                          "--overwrite to replace that run")
    if run.main:
        for p in earlier:
            p.unlink()
        log.info(f"--overwrite: removed the {len(earlier)} checkpoints and states of the earlier run {run.name!r}")


def _worker_ignores_signals(_worker: int) -> None:
    """A data loader worker leaves Ctrl-C and SIGTERM to the main process, which saves at the end of the step (a
    terminal sends Ctrl-C to every process of the group: a worker that stopped would leave the step without data)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _batches(plan: EpochPlan, micro: int, rank: int):
    """This process's batches from micro-step `micro` on, epoch after epoch, for as long as the loop takes them."""
    epoch, pos = divmod(micro, plan.batches_per_epoch)
    while True:
        yield from plan.local_batches(epoch, rank)[pos:]
        epoch, pos = epoch + 1, 0


LOG_EVERY = 10  # steps between reading losses back from the device (each read waits for the device to finish)


def _end_of_step(run: Run, accum_losses: list[torch.Tensor], bar, total_steps: int) -> None:
    """After an optimizer step: schedule, keep the step's loss (read back every LOG_EVERY steps, so the host does
    not wait for the device each step), and write samples and checkpoints when due."""
    cfg = run.cfg
    run.scheduler.step()
    run.step += 1
    if cfg.compile and run.first_step_seconds is None:
        run.first_step_seconds = time.time() - run.loop_started
        log.info(f"first step, with torch.compile's compilation: {run.first_step_seconds:.1f}s")
    run.pending.append((run.step, torch.stack(accum_losses).mean(), run.scheduler.get_last_lr()[0]))
    accum_losses.clear()
    if run.main:
        bar.update(1)
    sample = cfg.sample_prompt and cfg.sample_every and run.step % cfg.sample_every == 0 and run.step < total_steps
    save = cfg.save_every and run.step % cfg.save_every == 0 and run.step < total_steps
    if run.step % LOG_EVERY == 0 or run.step >= total_steps or sample or save:
        _log_losses(run, bar)
    if sample:
        run.samples += write_samples(run)
    if save:
        checkpoint(run)


def _log_losses(run: Run, bar) -> None:
    """The pending steps' losses, averaged over the processes in one reduction, into the log and TensorBoard."""
    if not run.pending:
        return
    losses = run.accelerator.reduce(torch.stack([loss for _, loss, _ in run.pending]), "mean").tolist()
    for (step, _, lr), loss in zip(run.pending, losses, strict=True):
        run.rows.append((step, loss, lr))
        if run.main:
            run.accelerator.log({"loss": loss, "lr": lr}, step=step)
    run.pending.clear()
    if run.main:
        lr, scale = run.rows[-1][2], run.cfg.adapter.lora_alpha / run.cfg.adapter.rank
        extra = {} if scale == 1 else {"effective lr": f"{lr * scale:.2e}"}  # lr x alpha / rank, as it acts
        bar.set_postfix({"loss": f"{run.rows[-1][1]:.4f}", "lr": f"{lr:.2e}", **extra})


def _start(cfg: TrainConfig) -> Run:
    """The run's accelerator and its data, checked by the dataset doctor and reported before any model is loaded."""
    backend = ""
    if cfg.quantize_base:  # before the data is scanned and anything loads: say what to install
        from . import quant

        backend = quant.backend_for(cfg.quantize_backend)
        quant.require(cfg.quantize_base, backend)
    accelerator = _accelerator(cfg)
    doctor = diagnose(cfg, processes=accelerator.num_processes, require=True, thorough=accelerator.is_main_process)
    report = doctor.scan
    run = Run(doctor.cfg, accelerator, report, adapter_name(doctor.cfg), reg=doctor.reg, quantize_backend=backend)
    for flag, folder in (("--output-dir", run.out), ("--cache-dir", run.cfg.cache_dir)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ConfigError(f"{flag} {folder} is a file; give a folder (it is made if missing)")
    for token in run.new_tokens:
        if not any(token in item.caption for item in report.items):
            raise DataError(f"--train-embedding {token}: no caption in {report.root} holds {token!r}, so its "
                            f"embedding would never train; write it in the captions, or pass --trigger {token}")
    if run.main:
        for w in report.warnings + (doctor.reg.warnings if doctor.reg else []):
            log.warning(w)
        lr_line, lr_warning = learning_rate_notes(doctor.cfg)
        if lr_warning:
            log.warning(lr_warning)
        log.info(doctor.text() + f"\n{lr_line}")
    return run


def _load_and_inject(run: Run) -> tuple[int, list[torch.nn.Parameter]]:
    """The base, frozen, on the device; LoRA on the UNet and, when asked, the text encoders. Returns the base's
    parameter count and the trainable LoRA parameters (kept in fp32 under mixed precision)."""
    cfg, device = run.cfg, run.accelerator.device
    backend = run.quantize_backend
    base = run.base = load_base(cfg.base, seed=cfg.seed, prediction_type=cfg.prediction_type or None,
                                config=cfg.base_config or None)
    torch.manual_seed(cfg.seed)  # after loading, so the LoRA's initial weights follow --seed whatever the base did
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(run.accelerator.mixed_precision, torch.float32)
    base_params = sum(p.numel() for m in [base.unet, *base.text_encoders] for p in m.parameters())
    if (run.main and device.type == "cpu" and weight_dtype == torch.float32 and base_params >= BF16_HINT_PARAMS
            and cpu_computes_bf16()):
        log.info("this CPU computes in bf16 (AVX-512 BF16 or AMX): --mixed-precision bf16 may train a base of this "
                 "size up to twice as fast (2.1x for SD 1.5 on an AMX CPU: README, Training against a reference "
                 "trainer)")
    for m in base.modules().values():
        m.requires_grad_(False)
    if cfg.quantize_base:  # before LoRA goes on, in the compute dtype: peft wraps the quantized layers
        from . import quant

        for m in [base.unet, *base.text_encoders]:
            m.to(device, dtype=weight_dtype)
            quant.quantize(m, cfg.quantize_base, backend)
    run.targets = {} if cfg.adapter.embedding_only else {"unet": lora.inject(base.unet, cfg.adapter, "unet")}
    run.trained_tes = list(range(len(base.text_encoders))) if cfg.adapter.train_text_encoder else []
    for i in run.trained_tes:
        exclude = lora.unreachable(base.text_encoders[i], base.family, COMPONENT_NAMES[i])
        run.targets[COMPONENT_NAMES[i]] = lora.inject(base.text_encoders[i], cfg.adapter, "text_encoder", exclude)
    for m in [] if cfg.quantize_base else [base.unet, *base.text_encoders]:  # (quantized ones were placed first)
        m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    base.vae.to(device)  # kept in fp32: fp16 VAEs overflow (notably SDXL's), and it only encodes
    params = lora.lora_parameters(base.unet) + [p for i in run.trained_tes
                                                for p in lora.lora_parameters(base.text_encoders[i])]
    for p in params:
        p.data = p.data.float()
    if run.new_tokens:  # pivotal tuning: the new tokens' vectors (fp32, on the device) train with the LoRA
        run.pivot = embeddings.install(base, {t: embeddings.initial_vectors(base, n, cfg.adapter.embedding_init)
                                              for t, n in run.new_tokens.items()}, "--train-embedding")
        for p in run.pivot.parameters():
            p.requires_grad_(True)
        params += run.pivot.parameters()
    run.adapted = lora.adapted_layers([base.unet, *base.text_encoders])
    if cfg.train_weight != 1:
        lora.set_weight(run.adapted, cfg.train_weight)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for i in run.text_models:
            _checkpoint_text_encoder(base.text_encoders[i])
    return base_params, params


def step_weight(cfg: TrainConfig, step: int) -> float:
    """The adapter's weight at optimizer step `step`: --train-weight, or with --train-weight-min drawn evenly from
    the range, seeded by the step (so a resumed run draws the same weights)."""
    if cfg.train_weight_min is None:
        return cfg.train_weight
    u = random.Random(seeded(cfg.seed, "weight", step)).random()
    return cfg.train_weight_min + (cfg.train_weight - cfg.train_weight_min) * u


def _dataset_and_caches(run: Run):
    """The dataset, its epoch plan, and the latent and text caches where the settings allow them."""
    cfg, base, items = run.cfg, run.base, run.items
    dataset = TrainDataset(items, cfg.data, cfg.seed, cfg.prior_loss_weight)
    if run.main:
        _warn_long_captions(dataset, base)
    plan = EpochPlan(items, cfg.batch_size, run.accelerator.num_processes, cfg.seed)
    if cfg.cache_latents and not cfg.data.augments_images:
        dataset.latents = _cache_latents(dataset, base, cfg, run.accelerator)
    elif cfg.cache_dir is not None and run.main:
        log.warning(f"--cache-dir {cfg.cache_dir} is not used: --flip or --crop random change the pixels every epoch, "
                    "so the images are encoded at every step" if cfg.cache_latents else
                    f"--cache-dir {cfg.cache_dir} is not used: latent caching is off")
    if not run.pivot:  # (while embeddings train, the text changes every step: cached once they stop)
        run.text_cache = _text_cache(run, dataset)
    _release_encoders(base, dataset.latents is not None, run.text_cache is not None, bool(cfg.sample_prompt),
                      bool(cfg.quantize_base))
    return dataset, plan


def _warn_long_captions(dataset: TrainDataset, base: Base) -> None:
    """Captions the text encoder cuts (CLIP reads 75 tokens between its start and end tokens): say which, and what
    is lost, as the pipelines do at generation time."""
    tok = base.tokenizers[0]
    cut = []
    for i, item in enumerate(dataset.items):
        text = embeddings.expand(dataset.caption(Slot(i, 0, 0)), embeddings.tokenizer_vectors(tok))
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) > tok.model_max_length - 2:
            cut.append((item, tok.decode(ids[tok.model_max_length - 2:])))
    if cut:
        item, lost = cut[0]
        log.warning(f"{len(cut)} caption(s) are longer than the text encoder's {tok.model_max_length - 2} tokens "
                    f"and are cut: {Path(item.path).name} loses {lost!r}" + (" ..." if len(cut) > 1 else ""))


def _text_cache(run: Run, dataset: TrainDataset) -> dict | None:
    """Every caption's text embeddings, computed once, when the settings let them stay fixed."""
    cfg, base = run.cfg, run.base
    if not cfg.cache_text or run.trained_tes or cfg.data.varies_captions:
        return None
    captions = sorted({dataset.caption(Slot(i, 0, 0)) for i in range(len(dataset.items))})
    with torch.no_grad():
        return {c: tuple(None if t is None else t[0]
                         for t in encode_text(base, base.text_encoders, [c], run.accelerator.device))
                for c in captions}


def _fix_embeddings(run: Run, dataset: TrainDataset) -> None:
    """--embedding-steps reached: the new tokens keep their vectors from here on, and the text cache comes on."""
    run.fixed_vectors = [p.detach().clone() for p in run.pivot.parameters()]
    for p in run.pivot.parameters():
        p.grad = None
    run.text_cache = _text_cache(run, dataset)
    if run.text_cache is not None:
        _release_encoders(run.base, False, True, True)
    if run.main:
        log.info(f"step {run.step}: the new tokens' embeddings are fixed from here on"
                 + (" (text embeddings cached)" if run.text_cache is not None else ""))


def _optimizer_and_prepare(run: Run, optimizer_cls, params, total_steps: int):
    """Optimizer (the text encoders' LoRA with its own learning rate) and schedule; the trained models and the
    optimizer handed to accelerate. Returns the UNet and text encoders to call, and the trained models."""
    cfg, base = run.cfg, run.base
    n_unet = len(lora.lora_parameters(base.unet))
    n_emb = len(run.pivot.parameters()) if run.pivot else 0
    groups = [{"params": params[:n_unet], "lr": cfg.lr}] if n_unet else []
    if params[n_unet:len(params) - n_emb]:
        groups.append({"params": params[n_unet:len(params) - n_emb],
                       "lr": cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr})
    if n_emb:
        groups.append({"params": params[len(params) - n_emb:], "lr": cfg.embedding_lr, "weight_decay": 0.0})
    # torch's fused AdamW: the same update in one kernel over all LoRA tensors instead of a Python loop over them
    # (on 2 CPU cores, 128 small tensors: 1.5 ms a step against 7.4 ms).
    fused = {"fused": True} if optimizer_cls is torch.optim.AdamW else {}
    optimizer = optimizer_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    from diffusers.optimization import get_scheduler

    run.scheduler = get_scheduler(cfg.lr_scheduler if cfg.lr_scheduler != "constant" or not cfg.warmup_steps
                                  else "constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=total_steps)
    models = ([] if cfg.adapter.embedding_only else [base.unet]) + [base.text_encoders[i] for i in run.text_models]
    if run.accelerator.num_processes > 1:
        # Every process loaded the same frozen base, so DDP need not broadcast it at start (gigabytes for SDXL), and
        # cannot for a quantized one (torchao's tensors have no view for the broadcast): it syncs the LoRA only.
        from torch.nn.parallel import DistributedDataParallel

        for m in models:
            frozen = [n for n, p in m.named_parameters() if not p.requires_grad] + [n for n, _ in m.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(m, frozen)
    *models, run.optimizer = run.accelerator.prepare(*models, optimizer)
    unet = base.unet if cfg.adapter.embedding_only else models[0]
    if cfg.compile and not cfg.adapter.embedding_only:  # (the wrapper only: saving and accelerate see the module)
        unet = torch.compile(unet)
        log.info("--compile: the UNet compiles during the first step (minutes on a CPU), then runs compiled")
    text_encoders = list(base.text_encoders)
    for i, m in zip(run.text_models, models[len(models) - len(run.text_models):], strict=True):
        text_encoders[i] = m
    return unet, text_encoders, models


def adapter_name(cfg: TrainConfig) -> str:
    name = cfg.name or (Path(cfg.data.data).resolve().name if cfg.data.data else "lora")
    if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith("."):
        raise ConfigError(f"adapter name {name!r} must be letters, digits, spaces, '.', '-' or '_' (pass --name)")
    return name


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps its settings in a process-wide singleton that refuses a second run with another
        # precision; in a single process (tests, benchmarks, the web UI) each run starts from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    mixed, why = training_precision(cfg.mixed_precision)
    if why:
        log.info(why)
    elif mixed == "bf16" and not torch.cuda.is_available():
        log.info("mixed precision bf16 on the CPU (it has AVX-512 BF16 or AMX): the base in bf16, the LoRA in fp32")
    logs = Path(cfg.output_dir) / "logs"
    # cpu=True on a machine without CUDA is what makes accelerate use gloo under torchrun.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed,
                       gradient_accumulation_steps=cfg.grad_accum, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(logs)))


def _optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        from .quant import bitsandbytes

        try:
            return bitsandbytes().optim.AdamW8bit
        except ImportError:
            raise MissingDependencyError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise MissingDependencyError("--optimizer prodigy needs prodigyopt: pip install prodigyopt "
                                     "(and use --lr 1, as Prodigy sets the step size itself)") from None
    return Prodigy


def _resume_path(cfg: TrainConfig, out: Path, name: str) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":  # the newest state that reads back whole; a damaged one is passed over, and said
        found = states(out, name)
        if not found:
            raise ConfigError(f"--resume latest: no saved state for {name!r} in {out / 'state'} (use --save-every N)")
        for path in found:
            try:
                load_state(path)
                return path
            except FormatError as e:
                log.warning(f"--resume latest: {e}; trying the state before it")
        raise ConfigError(f"--resume latest: every saved state of {name!r} in {out / 'state'} is damaged "
                          "(see the warnings); start afresh without --resume")
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"--resume: state file not found: {path}")
    return path


RESUME_KEYS = ("base", "data", "reg_data", "prior_loss_weight", "seed", "batch_size", "grad_accum", "rank", "alpha",
               "kind", "factor", "decompose_both", "preset", "train_text_encoder", "train_embedding", "embedding_only",
               "resolution", "lr", "lr_scheduler", "warmup_steps", "optimizer", "ema_decay",
               "train_weight", "train_weight_min")


def _resume(run: Run, path: Path, total_steps: int) -> None:
    """LoRA weights, optimizer, schedule, step and loss log from a saved state, after checking that the settings
    that shape the run have not changed."""
    state = load_state(path)
    flat = flat_config(run.cfg)
    saved = state["extra"].get("config", {})
    if state["manifest"].get("data_sha256", listing_hash(run)) != listing_hash(run) and run.main:
        log.warning(f"the images in {run.cfg.data.data} changed since {path} was saved (added, removed or edited "
                    "files): the run continues on them as they are now, so it will not match an uninterrupted one")

    def same(k):
        if k in ("data", "reg_data", "base") and saved[k] and flat.get(k) and saved[k] != flat[k]:
            # the same folder or file however it was spelled (the run's TOML holds absolute paths)
            return Path(saved[k]).expanduser().resolve() == Path(flat[k]).expanduser().resolve()
        return saved[k] == flat.get(k)

    changed = [k for k in RESUME_KEYS if k in saved and not same(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot resume from {path}: {k} was {saved[k]!r} and is now {flat.get(k)!r}")
    if "unet" in run.targets:
        lora.set_lora_state(run.base.unet, state["lora"]["unet"])
    if run.pivot:
        for i, p in enumerate(run.pivot.parameters()):
            p.data.copy_(state["lora"]["embeddings"][str(i)])
    for i in run.trained_tes:
        lora.set_lora_state(run.base.text_encoders[i], state["lora"][COMPONENT_NAMES[i]])
    if run.ema is not None:
        if "ema" not in state["lora"]:
            raise ConfigError(f"cannot resume from {path} with --ema-decay: it was saved without a moving average")
        for i, shadow in enumerate(run.ema.shadow_params):
            shadow.copy_(state["lora"]["ema"][str(i)])
        run.ema.optimization_step = state["extra"]["ema_step"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = state["step"]
    if run.step >= total_steps:
        raise ConfigError(f"{path} is at step {run.step} and this run has {total_steps} steps, so there is "
                          "nothing left to train; pass a larger --steps to train on")
    run.rows = read_csv(run.out / "logs" / "loss.csv", run.step)
    if run.main:
        log.info(f"resumed from {path} at step {run.step}")


def _checkpoint_text_encoder(te) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _vae_fingerprint(vae) -> str:
    """What the cached latents depend on: every encoder weight (a fine-tuned VAE may differ only in its deeper
    layers) and the scaling and shift factors baked into the latents."""
    import hashlib

    h = hashlib.sha1()
    h.update(f"{vae.config.scaling_factor}/{getattr(vae.config, 'shift_factor', None)}".encode())
    modules = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]
    for module in modules:
        for name, p in module.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _cache_latents(dataset: TrainDataset, base: Base, cfg: TrainConfig, accelerator) -> dict[int, torch.Tensor]:
    """Encode every image once (deterministic crop, no flip). On disk with --cache-dir, keyed by file and setting."""
    import random

    fingerprint = _vae_fingerprint(base.vae)
    cache: dict[int, torch.Tensor] = {}
    for idx, item in enumerate(dataset.items):
        file = None
        if cfg.cache_dir is not None:
            key = latent_cache_key(item, cfg.data, f"{fingerprint}-{cfg.seed}")
            file = Path(cfg.cache_dir) / f"{key}.safetensors"
            if file.is_file():
                cache[idx] = read_safetensors(file)[0]["latents"]
                continue
        pixels, _ = to_training_image(item, cfg.data, random.Random(0))
        dist = base.vae.encode(pixels[None].to(accelerator.device, torch.float32)).latent_dist
        cache[idx] = sample_latents(dist, [seeded(cfg.seed, "latent", idx)], base)[0].cpu()
        if file is not None and accelerator.is_main_process:
            write_safetensors(file, {"latents": cache[idx]})
    return cache


def _release_encoders(base: Base, latents_cached: bool, text_cached: bool, sampling: bool,
                      quantized: bool = False) -> None:
    """Once everything is cached, the VAE and text encoders leave the accelerator: for the CPU when sample images
    still need them, else for good. Then their weights go at once: the models sit in reference cycles (a library
    keeps a traceback whose frames reach the loader's locals) that only a garbage collection would free, which
    takes a tenth of a second or more, so the weights move to the meta device (a quantized base's, which may not,
    wait for the collection)."""
    leaving = ([base.vae] if latents_cached else []) + (list(base.text_encoders) if text_cached else [])
    if sampling:
        for m in leaving:
            m.to("cpu")
    else:
        if latents_cached:
            base.vae = None
        if text_cached:
            base.text_encoders = [None] * len(base.text_encoders)
        if quantized:
            import gc

            gc.collect()
        else:
            for m in leaving:
                m.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
