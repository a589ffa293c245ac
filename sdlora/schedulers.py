"""Sampler names A1111 users know, mapped onto diffusers schedulers."""

from __future__ import annotations

from .errors import ConfigError

# name -> (diffusers class name, extra config). DDIM's own default clips the predicted sample to [-1, 1], right
# for pixels and wrong for latents; SD's shipped configs turn it off, configs without the key (the toy and tiny
# bases, some converted checkpoints) would leave it on and draw mush.
SCHEDULERS = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config):
    """A scheduler of the named kind built from the base's own config (betas, prediction type)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)
