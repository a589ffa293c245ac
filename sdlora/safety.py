"""A run's safety at each step: a loss or gradient that is not finite never reaches the weights, and a signal
saves a checkpoint at the step's end before the run stops. Used by the loop in `train.py`."""

from __future__ import annotations

import contextlib
import logging
from glob import escape as glob_escape
from pathlib import Path

import torch

from .errors import Interrupted, TrainingError
from .run import Run, checkpoint
from .state import latest_state

log = logging.getLogger("sdlora")


def optimizer_step(run: Run, params: list[torch.nn.Parameter], losses: list[torch.Tensor], items: list[int]) -> None:
    """Clip, check and step. A loss or gradient that is not finite never reaches the weights: the run stops there
    (naming the step, learning rate and images), or with --nan-policy skip the step is passed over and counted.
    All processes take the same decision, from one read per step (the only per-step wait for the device)."""
    cfg, accelerator = run.cfg, run.accelerator
    bad = ~torch.isfinite(torch.stack(losses)).all()
    if accelerator.scaler is None:  # (under fp16 the grad scaler owns overflowing gradients: it skips and rescales)
        norm = (accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else
                torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        bad = bad | ~torch.isfinite(norm)
    elif cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    flags = torch.stack([bad.float(), torch.tensor(float(run.interrupted), device=bad.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags).reshape(-1, 2).amax(0)
    bad, run.interrupted = bool(flags[0] > 0), int(flags[1])
    if bad:
        non_finite(run, items)
    else:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.step(params)
    run.optimizer.zero_grad(set_to_none=True)
    if run.fixed_vectors is not None:  # the embeddings' steps are over: they stay as they were then
        for p, v in zip(run.pivot.parameters(), run.fixed_vectors, strict=True):
            p.data.copy_(v)


def non_finite(run: Run, items: list[int]) -> None:
    cfg = run.cfg
    names = ", ".join(sorted({Path(run.items[i].path).name for i in items}))
    what = (f"step {run.step + 1}: the loss or the gradients are not finite (NaN or Inf) at learning rate "
            f"{run.scheduler.get_last_lr()[0]:.3g}; this step's images: {names}")
    if cfg.nan_policy == "skip":
        run.skipped += 1
        if run.main:
            log.warning(f"{what}; step skipped (--nan-policy skip), {run.skipped} so far")
        return
    state = latest_state(run.out, run.name)
    adapters = sorted(run.out.glob(f"{glob_escape(run.name)}-step*.safetensors"))
    kept = (f"the last good adapter is {adapters[-1]} and state {state} (continue with --resume latest)"
            if state else "nothing was saved before it (use --save-every N to keep checkpoints)")
    raise TrainingError(f"{what}. The run stopped there and wrote nothing for it; {kept}. Lower --lr, keep "
                        "--max-grad-norm above 0, or pass --nan-policy skip to pass over such steps")


@contextlib.contextmanager
def signals(run: Run):
    """Ctrl-C or SIGTERM during the loop: save an adapter and a resumable state at the end of the step, then stop
    (exit 130 or 143); a second one stops at once, leaving the last checkpoint as it was."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
        yield
        return

    def handler(signum, frame):
        if run.interrupted:
            raise KeyboardInterrupt
        run.interrupted = signum
        if run.main:
            log.warning(f"{signal.Signals(signum).name}: saving at the end of this step; press Ctrl-C again to stop "
                        "at once without saving")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save_and_stop(run: Run) -> None:
    import signal

    checkpoint(run)
    name = signal.Signals(run.interrupted).name
    raise Interrupted(run.interrupted, f"{name}: stopped after step {run.step}; saved "
                      f"{run.out / f'{run.name}-step{run.step:06d}.safetensors'} and its state; continue with "
                      "--resume latest")
