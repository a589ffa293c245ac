"""Load a base model and say what it is.

A base is a diffusers folder, a single-file checkpoint (`.safetensors`, as A1111 and Civitai ship
them), a Hugging Face Hub id, or a built-in: `tiny-sd` and `tiny-sdxl` are tiny, seeded, randomly
initialised models of the real SD 1.x / SDXL classes, for tests. The family (sd1, sd2, sdxl) and
prediction type (epsilon, v_prediction) are detected here and used everywhere else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BUILTINS
from .errors import ModelError
from .vocab import byte_vocab

log = logging.getLogger("sdlora")

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class Base:
    """The separate components of a Stable Diffusion model, plus what kind it is."""

    name: str
    family: str
    prediction_type: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object  # the sampling scheduler; training derives a DDPM scheduler from its config
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config, prediction_type=self.prediction_type)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline sharing this base's modules (no copies)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = scheduler if scheduler is not None else self.scheduler
        if self.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=sched,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
                scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        return out


def load_base(spec: str, *, prediction_type: str | None = None, seed: int = 0, config: str | None = None) -> Base:
    """Load the base named by `spec`: a built-in, a diffusers folder, a .safetensors file or a Hub id.
    `config` (a diffusers folder or Hub id) gives a single-file checkpoint its component configs and tokenizer."""
    spec = str(spec)
    kind = base_kind(spec)
    if kind == "toy":
        from .toy.base import load_toy

        base = Base("toy", "sd1", "epsilon", *load_toy())
    elif kind == "tiny":  # (the default --base: say so, or a user who forgot --base trains on noise unawares)
        log.warning(f"base {spec}: a tiny model with random weights, for trying sdlora out and for tests; what is "
                    "trained or generated on it is of no use on a real model: pass --base with your model")
        base = build_tiny(spec, seed=seed)
    elif kind == "folder":
        base = _load_folder(Path(spec).expanduser())
    elif kind == "file":
        base = _load_single_file(Path(spec).expanduser(), config, prediction_type)
    else:
        base = _load_hub(spec)
    if prediction_type and prediction_type != base.prediction_type:
        base.prediction_type = prediction_type
        # The sampling scheduler too: samples, the studio and every sampler are built from its config.
        base.scheduler = type(base.scheduler).from_config(base.scheduler.config, prediction_type=prediction_type)
    return base


FAMILY_SIZES = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # SD 2.x: 768 for the v models, 512 for 2.x-base


def base_kind(spec: str) -> str:
    """What `spec` names, found without loading anything: "toy", "tiny" (a built-in test model), "folder" (a
    diffusers folder), "file" (a single-file .safetensors checkpoint) or "hub" (a Hub id). Raises ModelError,
    saying what to give, when it names none of them, so that a mistyped --base stops a run before its data is
    scanned."""
    if spec == "toy":
        return "toy"
    if spec in BUILTINS:
        return "tiny"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(f"{path}: {path.suffix} checkpoints are pickled and can run code when loaded; sdlora only "
                         "reads .safetensors. Convert it with a trusted tool, or download the .safetensors version.")
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelError(f"base model file not found: {path}")
        return "file"
    if _looks_like_hub_id(spec) and not path.exists():
        return "hub"
    raise ModelError(f"base model {spec!r} not found: give a diffusers folder (with model_index.json), a .safetensors "
                     "checkpoint, a Hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', or one of "
                     f"{', '.join(BUILTINS)}")


def native_size(spec: str, *, prediction_type: str | None = None, download: bool = False,
                config: str | None = None) -> tuple[int, str]:
    """The size the base was trained at (diffusers' default: the UNet's sample size x the VAE's scale), read from
    configs or a checkpoint's header without loading any weights, and how it was found. A Hub id that is not in
    the local cache is downloaded when `download` is true, else the size is assumed (and said so). A single file
    with `config` (--base-config) takes that folder's or Hub id's configs, as loading it does."""
    spec = str(spec)
    if config and Path(spec).suffix.lower() == ".safetensors":
        return native_size(config, prediction_type=prediction_type, download=download)

    def from_configs(unet: dict, vae: dict) -> int:
        size = unet.get("sample_size", 64)
        size = size[0] if isinstance(size, list | tuple) else size
        return int(size) * 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)

    if spec == "toy":
        from .toy.base import UNET_CONFIG, VAE_CONFIG

        return from_configs(UNET_CONFIG, VAE_CONFIG), "the toy base's native size"
    if spec in TINY_UNETS:
        return from_configs(TINY_UNETS[spec], TINY_VAE), f"{spec}'s native size"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        unet, vae = (json.loads((path / c / "config.json").read_text(encoding="utf-8")) for c in ("unet", "vae"))
        return from_configs(unet, vae), f"{path.name}'s unet/config.json"
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from safetensors import safe_open

        from .safefiles import check_safetensors

        check_safetensors(path)
        with safe_open(str(path), "pt") as f:
            family = checkpoint_family(f.keys())
        if family == "sd2":
            kind = prediction_type or sd2_prediction_type(path)[0] or "v_prediction"
            return SD2_SETUP[kind][1], f"SD 2.x {'v' if kind == 'v_prediction' else 'base'} checkpoint"
        return FAMILY_SIZES[family], f"{'SDXL' if family == 'sdxl' else 'SD 1.x'} checkpoint"
    if _looks_like_hub_id(spec) and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(spec, f"{c}/config.json") for c in ("unet", "vae")]
        if all(isinstance(c, str) for c in cached):
            unet, vae = (json.loads(Path(c).read_text(encoding="utf-8")) for c in cached)
            return from_configs(unet, vae), f"{spec}'s unet/config.json"
        if download:  # what loading it would do first anyway
            return native_size(str(_hub_folder(spec)))
    return 512, "assumed (the base's configs could not be read; pass --resolution)"


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


# ---------------------------------------------------------------- built-in tiny models


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


def _clip_config(hidden: int, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(byte_vocab()), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection, hidden_act="quick_gelu",
        bos_token_id=len(byte_vocab()) - 2, eos_token_id=len(byte_vocab()) - 1, pad_token_id=len(byte_vocab()) - 1,
    )


TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_UNETS = {
    "tiny-sd": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16),
    "tiny-sdxl": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48,
                      norm_num_groups=16),
}


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE)


def _tiny_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )


def build_tiny(name: str, seed: int = 0) -> Base:
    """Build `tiny-sd` or `tiny-sdxl`: the real classes at a tiny size, identical for the same seed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = _tiny_vae()
        unet = UNet2DConditionModel(**TINY_UNETS[name])
        if name == "tiny-sd":
            text_encoders = [CLIPTextModel(_clip_config(32))]
            tokenizers = [tiny_tokenizer()]
        elif name == "tiny-sdxl":
            # Two encoders of different widths, as in SDXL (768 and 1280): tools that tell them apart by width (such
            # as diffusers' single-file loader) would mix up two of the same width.
            text_encoders = [CLIPTextModel(_clip_config(32)), CLIPTextModelWithProjection(_clip_config(48, 32))]
            tokenizers = [tiny_tokenizer(), tiny_tokenizer()]
        else:  # pragma: no cover - guarded by load_base
            raise ModelError(f"unknown built-in {name!r}; choose one of {', '.join(BUILTINS)}")
    finally:
        torch.random.set_rng_state(gen_state)
    family = "sdxl" if name == "tiny-sdxl" else "sd1"
    base = Base(name, family, "epsilon", unet, vae, text_encoders, tokenizers, _tiny_scheduler())
    for m in base.modules().values():
        m.eval()
    return base


# ---------------------------------------------------------------- user models


def _from_pipeline(name: str, pipe, family: str) -> Base:
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    base = Base(name, family, pred, pipe.unet, pipe.vae, tes, toks, pipe.scheduler)
    for m in base.modules().values():
        m.eval()
    return base


def _folder_family(path: Path) -> str:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if "text_encoder_2" in index and index.get("text_encoder") not in (None, [None, None]):
        return "sdxl"
    unet_cfg = path / "unet" / "config.json"
    if unet_cfg.is_file():
        cross = json.loads(unet_cfg.read_text(encoding="utf-8")).get("cross_attention_dim")
        if cross == 1024:
            return "sd2"
        if cross == 2048:
            return "sdxl"
    return "sd1"


def _load_folder(path: Path) -> Base:
    """Each component by its own class, as model_index.json names it: the pipeline classes are not imported
    (seconds of start-up a training run does not need; `Base.pipeline()` builds one when sampling)."""
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json)")
    family = _folder_family(path)
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    import diffusers
    import transformers

    def component(name: str):
        library, cls = index[name]
        module = diffusers if library == "diffusers" else transformers
        if not hasattr(module, cls):
            raise ModelError(f"{path}: model_index.json names {library}.{cls} for {name}, which sdlora cannot load")
        if name.startswith("tokenizer") or name == "scheduler":
            return getattr(module, cls).from_pretrained(path, subfolder=name)
        if library == "transformers":  # fp32 whatever the files hold; training and the engine cast from there
            return getattr(module, cls).from_pretrained(path / name, use_safetensors=True, dtype=torch.float32)
        return getattr(module, cls).from_pretrained(path, subfolder=name, use_safetensors=True,
                                                    torch_dtype=torch.float32)

    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    names += ["text_encoder_2", "tokenizer_2"] if family == "sdxl" else []
    try:
        parts = {n: component(n) for n in names}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: cannot load the diffusers model: {e}") from e
    tes = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if family == "sdxl" else [])
    toks = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if family == "sdxl" else [])
    base = Base(path.name, family, parts["scheduler"].config.get("prediction_type", "epsilon"), parts["unet"],
                parts["vae"], tes, toks, parts["scheduler"])
    for m in base.modules().values():
        m.eval()
    return base


def checkpoint_family(keys) -> str:
    """Family of an original-layout (LDM/SGM) single-file checkpoint, from its tensor names."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelError("this looks like the SDXL refiner, which is not supported as a training base")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelError(
        "not a Stable Diffusion checkpoint: found none of the text-encoder keys of SD 1.x "
        "(cond_stage_model.transformer.*), SD 2.x (cond_stage_model.model.*) or SDXL (conditioner.embedders.*)"
    )


# ComfyUI's test for SD 2.x checkpoints (model_detection / supported_models): the 768-v models have a wider spread
# in this one LayerNorm bias than the 512 epsilon ones. Some tools also mark v-prediction with a `v_pred` key.
SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09
SD2_SETUP = {"v_prediction": ("stabilityai/stable-diffusion-2-1", 768),
             "epsilon": ("stabilityai/stable-diffusion-2-1-base", 512)}


def sd2_prediction_type(path: Path) -> tuple[str | None, str]:
    """The prediction type of an SD 2.x single-file checkpoint and how it was found: (None, why) when the file
    does not say. The 2.x models share one architecture, so this is all that tells 768-v from 512-base."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if "v_pred" in keys:
            return "v_prediction", "its v_pred marker"
        if SD2_V_PROBE not in keys:
            return None, f"it has no {SD2_V_PROBE} to tell 768-v from 512-base by"
        std = float(f.get_tensor(SD2_V_PROBE).float().std(unbiased=False))
    kind = "v_prediction" if std > SD2_V_STD else "epsilon"
    return kind, f"its weights (the spread of one LayerNorm bias, {std:.3f}, is {'above' if std > SD2_V_STD else 'below'} {SD2_V_STD})"


def _load_single_file(path: Path, config: str | None = None, prediction_type: str | None = None) -> Base:
    from safetensors import safe_open

    from .safefiles import check_safetensors

    check_safetensors(path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    try:
        family = checkpoint_family(keys)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    if family == "sd2":
        if prediction_type:
            how = "--prediction-type"
        else:
            prediction_type, how = sd2_prediction_type(path)
            if prediction_type is None:
                prediction_type = "v_prediction"
                log.warning(f"{path}: SD 2.x checkpoint, but {how}; assumed v_prediction at 768 px (as diffusers "
                            "does). If images come out as noise or grey, pass --prediction-type epsilon (512-base).")
        log.info(f"{path}: SD 2.x, {prediction_type} (from {how})")
        if not config:
            config = SD2_SETUP[prediction_type][0]
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict = {}
    if config:
        if not Path(config).is_dir() and not _looks_like_hub_id(config):
            raise ModelError(f"--base-config {config!r} is neither a diffusers folder nor a Hub id")
        kwargs = {"config": str(config), "local_files_only": Path(config).is_dir()}
    try:
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), safety_checker=None, requires_safety_checker=False, **kwargs
            )
    except Exception as e:  # diffusers raises many kinds here; all mean "cannot use this file"
        raise ModelError(
            f"{path}: detected {family}, but diffusers could not build the pipeline: {e}. A single file holds the "
            "weights only: the configs and tokenizer come from the Hugging Face cache or the Hub, or from "
            "--base-config DIR (a diffusers folder of the same model family)."
        ) from e
    base = _from_pipeline(path.stem, pipe, family)
    if family == "sd2":
        base.unet.register_to_config(sample_size=SD2_SETUP[prediction_type][1] // base.vae_scale_factor)
        base.prediction_type = prediction_type
        base.scheduler = type(base.scheduler).from_config(base.scheduler.config, prediction_type=prediction_type)
    return base


def _load_hub(repo: str) -> Base:
    return _load_folder(_hub_folder(repo))


def _hub_folder(repo: str) -> Path:
    """The local folder of a Hub model, downloaded into the Hugging Face cache if it is not there yet."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(repo)
    except Exception as e:
        raise ModelError(
            f"Hub model {repo!r} is not in the local Hugging Face cache and could not be downloaded ({type(e).__name__}). "
            f"On a connected machine run `hf download {repo}` (it fills the cache), or pass a local diffusers "
            "folder or .safetensors checkpoint with --base."
        ) from e
    try:
        # diffusers picks each component's own safetensors (no root single-file checkpoints, fp16 or non-EMA copies,
        # which a bare "*.safetensors" pattern would fetch: tens of GB for SD 1.5 instead of about 4).
        folder = Path(DiffusionPipeline.download(repo, use_safetensors=True))
    except Exception as e:
        raise ModelError(f"Hub model {repo!r}: download failed: {e}") from e
    del index
    return folder
