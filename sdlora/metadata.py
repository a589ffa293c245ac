"""The safetensors header metadata other tools read: kohya's `ss_*`, ModelSpec 1.0 and the A1111 hashes.

All values are strings (the safetensors header demands it). No absolute paths or user names are
ever written: folders appear by their own name only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct

BASE_VERSION = {("sd1", "epsilon"): "sd_v1", ("sd2", "epsilon"): "sd_v2", ("sd2", "v_prediction"): "sd_v2_v",
                ("sdxl", "epsilon"): "sdxl_base_v1-0", ("sdxl", "v_prediction"): "sdxl_base_v1-0"}
ARCHITECTURE = {("sd1", "epsilon"): "stable-diffusion-v1", ("sd1", "v_prediction"): "stable-diffusion-v1",
                ("sd2", "epsilon"): "stable-diffusion-v2-512", ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
                ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base", ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base"}
FAMILY_OF_VERSION = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sdxl_base_v1-0": "sdxl"}


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(microsecond=0).isoformat()


def training_metadata(*, name: str, family: str, prediction_type: str, base_name: str, rank: int, alpha: float,
                      preset: str, train_text_encoder: bool, resolution: int, steps: int, epoch: int, lr: float,
                      text_encoder_lr: float | None, num_images: int, tag_frequency: dict, dataset_dirs: dict, dataset_dir: str,
                      buckets: dict, trigger: str, seed: int, started: float, finished: float,
                      sample_image: str = "", optimizer: str = "", lr_scheduler: str = "",
                      min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                      untrained: dict[str, str] | None = None, quantized_base: str = "", quantize_backend: str = "",
                      kind: str = "lora", factor: int = -1, decompose_both: bool = False) -> dict[str, str]:
    """`untrained`: per component, the layers a preset names but that got no LoRA because the loss never
    reaches them (SDXL's text encoder 1 last layer), with the reason; written as `sdlora_untrained_layers`.
    DoRA, LoHa and LoKr are described as LyCORIS describes them (`lycoris.kohya` with `algo`)."""
    version = BASE_VERSION.get((family, prediction_type), f"{family}")
    args = {"preset": preset}
    if preset == "full":
        args.update(conv_dim=str(rank), conv_alpha=str(alpha))
    if kind != "lora":
        args["algo"] = "lora" if kind == "dora" else kind
    if kind == "dora":
        args.update(dora_wd="True", wd_on_output="True")
    if kind == "lokr":
        args.update(factor=str(factor), decompose_both=str(decompose_both))
    meta = {
        "ss_output_name": name,
        "ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": base_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": _num(lr),
        "ss_unet_lr": _num(lr),
        "ss_text_encoder_lr": _num(text_encoder_lr if text_encoder_lr is not None else lr) if train_text_encoder else "0",
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": lr_scheduler,
        "ss_min_snr_gamma": _num(min_snr_gamma),
        "ss_noise_offset": _num(noise_offset),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n}
                                                  for i, (b, n) in enumerate(sorted(buckets.items()))}}),
        "ss_training_started_at": str(int(started)),
        "ss_training_finished_at": str(int(finished)),
        "ss_seed": str(seed),
        "sdlora_dataset": dataset_dir,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE.get((family, prediction_type), family)}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
        "modelspec.date": _iso(finished),
    }
    if untrained:
        meta["sdlora_untrained_layers"] = json.dumps(untrained)
    if quantized_base:  # QLoRA: the base was held in this precision while the adapter trained
        meta["sdlora_quantized_base"] = quantized_base
        meta["sdlora_quantize_backend"] = quantize_backend
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if sample_image:
        meta["modelspec.thumbnail"] = sample_image
    return meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def data_hash(blob: bytes) -> str:
    """sha256 of the tensor data after the header: kohya's `sshs_model_hash`, A1111's LoRA hash."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()
