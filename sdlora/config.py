"""Options for training, with their defaults and help text in one place.

The CLI flags, TOML config keys and README option table are all derived from the dataclass
fields here. Names are flat and unique across groups so that `--rank 8` on the command line and
`rank = 8` in a TOML file mean the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, factory=None):
    """A dataclass field carrying its CLI help text and allowed values."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


OUTPUTS = Path("outputs")  # every command's default output folder
BUILTINS = ("tiny-sd", "tiny-sdxl", "toy")  # the bases sdlora makes itself (--base names them before any path)
PRESETS = ("attn", "attn-mlp", "full")
KINDS = ("lora", "dora", "loha", "lokr")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "cosine", "linear")
SAVE_PRECISION = ("fp16", "bf16", "fp32")
FORMATS = ("kohya", "diffusers")
CROPS = ("center", "random")
QUANTIZE = ("", "int8", "nf4")
QUANTIZE_BACKENDS = ("auto", "torchao", "bitsandbytes")


def check_quantize(kind: str, backend: str) -> None:
    """--quantize-backend means something only with --quantize-base (training and generation alike)."""
    if backend != "auto" and not kind:
        raise ConfigError(f"--quantize-backend {backend} picks how --quantize-base quantizes; pass --quantize-base "
                          "int8 or nf4 too, or drop it")


@dataclass
class DataConfig:
    data: Path | None = opt(None, "Folder of training images with caption files (searched recursively).")
    reg_data: Path | None = opt(None, "Folder of regularisation images (kohya's reg_data_dir, DreamBooth's prior preservation): the same scenes without the style, never given the trigger; as many are mixed into every epoch as there are training samples.")
    validation_split: float = opt(0.0, "Hold out this share of the training images (at least one) for the selection report's validation loss; they never train.")
    validation_data: Path | None = opt(None, "Folder of held-out images with captions for the selection report's validation loss (instead of --validation-split).")
    resolution: int = opt(0, "Training resolution; buckets hold about resolution² pixels (0: the base's native size: 512 for SD 1.x and 2.x-base, 768 for 2.x-v, 1024 for SDXL, 32 for the toy base).")
    default_caption: str = opt("", "Caption for images without a caption file (default: the folder's class token).")
    trigger: str = opt("", "Trigger word(s) put first in every caption.")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated caption tags each time an image is used.")
    keep_tags: int = opt(0, "With --shuffle-tags, keep this many leading tags in place.")
    caption_dropout: float = opt(0.0, "Probability of training an image with an empty caption.")
    bucket: bool = opt(True, "Aspect-ratio bucketing; off: every image is cropped to a square.")
    bucket_step: int = opt(0, "Bucket sides are multiples of this many pixels (0: 64, or the resolution when that is smaller).")
    upscale: bool = opt(False, "Allow buckets larger than the image (upscaling small images).")
    flip: bool = opt(False, "Random horizontal flip.")
    crop: str = opt("center", "How an image is cropped to its bucket.", choices=CROPS)

    def __post_init__(self):
        if self.data is not None:
            self.data = Path(self.data)
        if self.reg_data is not None:
            self.reg_data = Path(self.reg_data)
        if self.validation_data is not None:
            self.validation_data = Path(self.validation_data)
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_data is not None:
            raise ConfigError("pass --validation-split or --validation-data, not both")
        for name in ("resolution", "bucket_step"):  # 0: fitted to the base when the run starts (`fitted`)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be > 0 (or 0 for the default), got {getattr(self, name)}")
        if self.resolution and self.bucket_step > self.resolution:
            raise ConfigError(f"bucket_step ({self.bucket_step}) is larger than resolution ({self.resolution}), so no "
                              f"bucket fits; pass a --bucket-step of at most {self.resolution} (a multiple of 8)")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.bucket_step % 8:
            raise ConfigError(f"bucket_step must be a multiple of 8, got {self.bucket_step}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be between 0 and 1, got {self.caption_dropout}")
        if self.keep_tags < 0:
            raise ConfigError(f"keep_tags must be >= 0, got {self.keep_tags}")

    def fitted(self, native: int) -> DataConfig:
        """These options with a resolution and bucket step of 0 set for a base whose native size is `native`."""
        resolution = self.resolution or native
        return dataclasses.replace(self, resolution=resolution, bucket_step=self.bucket_step or min(64, resolution))

    @property
    def augments_images(self) -> bool:
        """True when the pixels an image gives differ between epochs (no latent caching then)."""
        return self.flip or self.crop == "random"

    @property
    def varies_captions(self) -> bool:
        return self.shuffle_tags or self.caption_dropout > 0


@dataclass
class AdapterConfig:
    preset: str = opt("attn", "Modules that get LoRA: attn (attention q/k/v/out), attn-mlp (kohya's default set), full (also convolutions: LoCon).", choices=PRESETS)
    kind: str = opt("lora", "Adapter kind: lora (LoRA; LoCon with --preset full), dora (weight-decomposed LoRA: a trained magnitude per output channel), loha (LyCORIS Hadamard product of two low-rank pairs), lokr (LyCORIS Kronecker product). Trained by peft; saved in the LyCORIS keys A1111, ComfyUI and Forge read.", choices=KINDS)
    rank: int = opt(16, "LoRA rank (network dim).")
    alpha: float | None = opt(None, "LoRA alpha; the update is scaled by alpha/rank (default: equal to rank).")
    dropout: float = opt(0.0, "Dropout on the LoRA path.")
    factor: int = opt(-1, "LoKr: size of the Kronecker factor (LyCORIS' factor); -1 splits each dimension as close to its square root as it allows.")
    decompose_both: bool = opt(False, "LoKr: also split the smaller Kronecker factor into two rank --rank matrices (LyCORIS' decompose_both).")
    train_text_encoder: bool = opt(False, "Also put LoRA on the text encoder(s).")
    train_embedding: list[str] = opt(help="Pivotal tuning: add a new token TOKEN (TOKEN:N for N vectors) to the tokenizer(s) and train its embedding with the LoRA; write TOKEN in the captions (repeatable).", factory=list)
    embedding_init: str = opt("", "Word whose embedding the new tokens start from (default: the vocabulary's mean).")
    embedding_only: bool = opt(False, "Train only the --train-embedding token (textual inversion, no LoRA) and save it as a textual-inversion file.")

    def __post_init__(self):
        from .embeddings import parse_spec

        _positive("rank", self.rank)
        tokens = [parse_spec(s)[0] for s in self.train_embedding]
        if len(set(tokens)) != len(tokens):
            raise ConfigError(f"--train-embedding names a token twice: {', '.join(tokens)}")
        if self.embedding_only and len(tokens) != 1:
            raise ConfigError("--embedding-only trains one new token: pass exactly one --train-embedding TOKEN")
        if self.embedding_init and not tokens:
            raise ConfigError("--embedding-init needs --train-embedding TOKEN")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.factor == 0 or self.factor < -1:
            raise ConfigError(f"factor must be -1 (automatic) or a positive size, got {self.factor}")
        if self.dropout and self.kind in ("loha", "lokr"):
            raise ConfigError(f"--dropout is the LoRA path's dropout; peft's {self.kind} has none (set it to 0)")
        if self.kind != "lokr" and (self.factor != -1 or self.decompose_both):
            raise ConfigError("--factor and --decompose-both shape a LoKr adapter; pass them with --kind lokr")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainConfig:
    base: str = opt("tiny-sd", "Base model: a diffusers folder, a single-file .safetensors checkpoint, a Hub id, or a built-in (tiny-sd, tiny-sdxl).")
    base_config: str = opt("", "For a single-file --base: a diffusers folder or Hub id holding the model's configs and tokenizer (lets it load offline).")
    prediction_type: str = opt("", "Override the detected prediction type of the base.", choices=("", "epsilon", "v_prediction"))
    quantize_base: str = opt("", "Keep the frozen base's linear and convolution layers in 8 or 4 bits (QLoRA; the LoRA trains in full precision; needs --quantize-backend's library).", choices=QUANTIZE)
    quantize_backend: str = opt("auto", "Library that quantizes the base: auto is bitsandbytes when installed, else torchao.", choices=QUANTIZE_BACKENDS)
    output_dir: Path = opt(OUTPUTS, "Folder for the adapter, checkpoints, samples and logs.")
    name: str = opt("", "Adapter name (default: the data folder's name).")
    overwrite: bool = opt(False, "Replace an existing adapter of the same name (and an earlier run's checkpoints and "
                                 "states) instead of refusing.")
    steps: int = opt(0, "Optimizer steps to train (0: use --epochs).")
    epochs: int = opt(1, "Epochs to train when --steps is 0.")
    batch_size: int = opt(1, "Images per batch per process.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    lr: float = opt(1e-4, "Learning rate of the UNet LoRA.")
    text_encoder_lr: float | None = opt(None, "Learning rate of the text-encoder LoRA (default: --lr).")
    embedding_lr: float = opt(5e-3, "Learning rate of the --train-embedding vectors (no weight decay).")
    embedding_steps: int = opt(0, "Train the embeddings for this many steps, then keep them fixed (0: the whole run).")
    optimizer: str = opt("adamw", "Optimizer (prodigy finds its own step size: give it --lr 1).", choices=OPTIMIZERS)
    weight_decay: float = opt(1e-2, "Weight decay.")
    lr_scheduler: str = opt("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    warmup_steps: int = opt(0, "Linear warmup steps.")
    ema_decay: float | None = opt(None, "Keep an exponential moving average of the trainable weights (fp32) with this decay, e.g. 0.999, and save it as the adapter (the raw weights stay in the resumable state). diffusers' EMAModel: it warms up as (1 + step) / (10 + step) until it reaches the decay. Off when not given.")
    train_weight: float = opt(1.0, "The weight the adapter trains at (kohya's --network_multiplier): its update is scaled by this while it learns, so applying it at this weight gives what it learned. Written as the file's preferred weight.")
    train_weight_min: float | None = opt(None, "Train each step at a weight drawn evenly between this and --train-weight, so the style holds across that range (for blends, where each adapter goes in below full weight); weights within the range then change the strength less. Off when not given.")
    nan_policy: str = opt("stop", "When a step's loss or gradients are not finite: stop the run there (keeping the last good checkpoint), or skip the step.", choices=("stop", "skip"))
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).")
    mixed_precision: str = opt("no", "Mixed precision: fp16 or bf16 on CUDA; on the CPU bf16 where it has AVX-512 BF16 or AMX (fp32 otherwise).", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory.")
    compile: bool = opt(False, "torch.compile the UNet (inductor): faster steps once it has compiled during the first step, which takes minutes (the log says how long); pays on long runs.")
    seed: int = opt(42, "Seed for everything random; runs with the same seed are identical on the CPU in fp32.")
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (0: off; 5 is the paper's value).")
    noise_offset: float = opt(0.0, "Noise offset (0: off; 0.05-0.1 helps very dark or bright images).")
    min_timestep: int = opt(0, "Train only timesteps from this one up (kohya's --min_timestep).")
    max_timestep: int | None = opt(None, "Train only timesteps below this one (kohya's --max_timestep; default: all of the base's scheduler, 1000). Low values weight fine detail, high values composition.")
    prior_loss_weight: float = opt(1.0, "Weight of the regularisation images' loss against the training images' (with --reg-data).")
    cache_latents: bool = opt(True, "Cache VAE latents when augmentations allow.")
    cache_text: bool = opt(True, "Cache text embeddings when the text encoders are frozen and captions fixed.")
    cache_dir: Path | None = opt(None, "Keep the latent cache on disk in this folder (default: in memory).")
    save_every: int = opt(0, "Write an intermediate adapter and resumable state every N steps (0: off).")
    report: bool = opt(False, "After training, write the selection report (report.html, report.json): every saved checkpoint at weights 0 to 1, scored, with a recommended checkpoint and weight (as `sdlora report`).")
    resume: str = opt("", "Continue a run: 'latest' or the path of a state file.")
    sample_prompt: list[str] = opt(help="Prompt for sample images (repeatable).", factory=list)
    sample_every: int = opt(0, "Write sample images every N steps (0: only at the end when prompts are given).")
    sample_steps: int = opt(20, "Denoising steps for sample images.")
    save_precision: str = opt("fp16", "Precision of the saved adapter.", choices=SAVE_PRECISION)
    format: str = opt("kohya", "Adapter file layout: kohya (A1111, ComfyUI, Forge) or diffusers.", choices=FORMATS)
    num_workers: int = opt(0, "Data loader worker processes.")
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        for name in ("batch_size", "grad_accum"):
            _positive(name, getattr(self, name))
        for name in ("steps", "save_every", "sample_every", "warmup_steps", "num_workers", "weight_decay",
                     "max_grad_norm", "min_snr_gamma", "noise_offset", "prior_loss_weight", "embedding_lr",
                     "embedding_steps", "min_timestep"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps == 0:
            _positive("epochs", self.epochs)
        _positive("sample_steps", self.sample_steps)
        if self.max_timestep is not None and not self.min_timestep < self.max_timestep:
            raise ConfigError(f"max_timestep ({self.max_timestep}) must be above min_timestep ({self.min_timestep})")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0.999 is usual), got {self.ema_decay}")
        if not 0 < self.train_weight <= 4:
            raise ConfigError(f"train_weight must be above 0 and at most 4, got {self.train_weight}")
        if self.train_weight_min is not None and not 0 < self.train_weight_min < self.train_weight:
            raise ConfigError(f"train_weight_min must be above 0 and below train_weight ({self.train_weight}), got "
                              f"{self.train_weight_min}")
        if self.compile and self.train_weight_min is not None:
            raise ConfigError("--compile and --train-weight-min do not go together: each new weight would compile the "
                              "UNet again; drop one of the two")
        if self.adapter.embedding_only and (self.train_weight != 1 or self.train_weight_min is not None):
            raise ConfigError("--train-weight and --train-weight-min scale an adapter; --embedding-only trains none")
        if self.text_encoder_lr is not None and self.text_encoder_lr < 0:
            raise ConfigError(f"text_encoder_lr must be >= 0, got {self.text_encoder_lr}")
        if self.adapter.kind in ("loha", "lokr") and self.format == "diffusers":
            raise ConfigError(f"diffusers cannot load a {self.adapter.kind} adapter; save it with --format kohya "
                              "(A1111, ComfyUI and Forge read it), or train --kind lora or dora")
        check_quantize(self.quantize_base, self.quantize_backend)
        if self.adapter.kind != "lora" and self.quantize_base:
            raise ConfigError(f"--quantize-base trains --kind lora only (peft's {self.adapter.kind} layers cannot wrap "
                              "a quantized layer); drop one of the two")
        for group in (self, self.data, self.adapter):  # NaN and Inf pass every comparison: refuse them here
            for f in dataclasses.fields(group):
                value = getattr(group, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        for group in (self.data, self.adapter):
            for f in dataclasses.fields(group):
                choices = f.metadata.get("choices")
                if choices and getattr(group, f.name) not in choices:
                    raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(group, f.name)!r}")


# ---------------------------------------------------------------- generation (CLI generate, web UI, engine)

@dataclass
class Params:
    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 0  # 0: the base's native size (512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL)
    height: int = 0
    batch_size: int = 1
    batch_count: int = 1
    scheduler: str = "Euler a"

    def check(self) -> None:
        from .schedulers import SCHEDULERS

        if self.width % 8 or self.height % 8 or not (8 <= self.width <= 2048 and 8 <= self.height <= 2048):
            raise ConfigError(f"width and height must be multiples of 8 between 8 and 2048, got {self.width}x{self.height}")
        if not 1 <= self.steps <= 150:
            raise ConfigError(f"steps must be between 1 and 150, got {self.steps}")
        if not 0 <= self.cfg_scale <= 30:
            raise ConfigError(f"CFG scale must be between 0 and 30, got {self.cfg_scale}")
        if not 1 <= self.batch_size <= 8 or not 1 <= self.batch_count <= 16:
            raise ConfigError(f"batch size must be 1-8 and batch count 1-16, got {self.batch_size} and {self.batch_count}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if not -1 <= self.seed < 2**32:
            raise ConfigError(f"seed must be -1 (random) or between 0 and {2**32 - 1}, got {self.seed}")


@dataclass
class StudioConfig:
    """Where `sdlora generate` and `sdlora webui` find their base and write images, and where the UI listens."""

    base: str = "tiny-sd"
    output_dir: Path = OUTPUTS
    host: str = "127.0.0.1"
    port: int = 7860


# ---------------------------------------------------------------- `sdlora demo` (tuned by measurement; see README)

@dataclass
class DemoConfig:
    style: str = "rim"
    steps: int = 200
    rank: int = 8
    preset: str = "full"
    lr: float = 1e-3
    batch_size: int = 18  # divides both example folders (18 images; 180 with rim repeats): no ragged batches
    weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    seeds: int = 2  # images per prompt and weight
    sample_steps: int = 25
    cfg_scale: float = 5.0
    # An ancestral sampler: with a deterministic one (Euler, DDIM, DPM++) the stripes' fine pattern emerges from
    # some starting noises and averages away in others (stripes at weight 1: 0.94 with Euler a, 0.64 with Euler).
    sampler: str = "Euler a"
    seed: int = 0
    # `--blend` trains both styles for blending: each step at a weight drawn from [blend_weight_min, 1]
    # (--train-weight-min), longer. Trained at weight 1 only, the stripes show from about 0.7 up, so a 0.5 + 0.5
    # blend came out rim-only (stripes 0.11); trained for the range, rim 0.56 / stripes 0.81 (README).
    blend_weight_min: float = 0.4
    blend_steps: int = 300


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


GROUPS = {"data": DataConfig, "adapter": AdapterConfig}
TOML_TABLES = ("dataset", "adapter", "train")


def option_fields() -> list[tuple[str | None, dataclasses.Field, Any]]:
    """Every user-facing option as (group or None, field, resolved type), in declaration order."""
    out = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            sub_hints = typing.get_type_hints(GROUPS[f.name])
            out.extend((f.name, sf, sub_hints[sf.name]) for sf in dataclasses.fields(GROUPS[f.name]))
        else:
            out.append((None, f, hints[f.name]))
    return out


def default_of(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Make a TrainConfig from flat option names (dashes or underscores); unknown names are errors."""
    known = {f.name: group for group, f, _ in option_fields()}
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"unknown option {raw_key!r}; see `sdlora train --help` for the list")
        group = known[key]
        (grouped[group] if group else top)[key] = value
    try:
        return TrainConfig(**top, data=DataConfig(**grouped["data"]), adapter=AdapterConfig(**grouped["adapter"]))
    except TypeError as e:  # a wrong type slipped through (e.g. from TOML)
        raise ConfigError(str(e)) from e


def dump_toml(cfg: TrainConfig) -> str:
    """The options as a TOML file `load_toml` reads back to the same TrainConfig ([dataset], [adapter], [train])."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    tables = {"dataset": cfg.data, "adapter": cfg.adapter, "train": cfg}
    out = []
    for table, obj in tables.items():
        out.append(f"[{table}]")
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if not (obj is cfg and f.name in GROUPS) and v is not None:
                out.append(f"{f.name} = {value(v)}")
        out.append("")
    return "\n".join(out)


def anchored_spec(spec: str) -> str:
    """A --base or --base-config made absolute when it is a local path (a built-in or Hub id stays as it is)."""
    if spec and spec not in BUILTINS and Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    return spec


def anchored(cfg: TrainConfig) -> TrainConfig:
    """The options with every local path made absolute (folders, and a --base or --base-config that is a local
    path), so that a run's saved TOML repeats it from any working folder."""
    def absolute(v):
        return v if v is None else Path(v).expanduser().resolve()

    data = dataclasses.replace(cfg.data, data=absolute(cfg.data.data), reg_data=absolute(cfg.data.reg_data),
                               validation_data=absolute(cfg.data.validation_data))
    return dataclasses.replace(cfg, data=data, output_dir=absolute(cfg.output_dir), cache_dir=absolute(cfg.cache_dir),
                               base=anchored_spec(cfg.base), base_config=anchored_spec(cfg.base_config))


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config: flat keys with the flag names, optionally grouped in [dataset]/[adapter]/[train] tables
    (`data` itself is the option naming the image folder, so its table is called `dataset`)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    flat: dict[str, Any] = {}
    types = {f.name: t for _, f, t in option_fields()}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) and key in TOML_TABLES else [(key, value)]
        for k, v in items:
            name = k.replace("-", "_")
            if name not in types:
                raise ConfigError(f"{path}: unknown option {k!r}; see `sdlora train --help` for the list")
            flat[name] = _check_type(path, k, v, types[name])
    return flat


def _check_type(path: Path, key: str, value: Any, tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else tp
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key} must be a list of strings, got {value!r}")
        return value
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is Path:
        ok = isinstance(value, str)
        value = Path(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{path}: {key} must be of type {getattr(base, '__name__', base)}, got {value!r}")
    return value


def options_markdown() -> str:
    """The README's option table, generated from the dataclasses (a test keeps the README in step)."""
    rows = ["| flag / TOML key | default | meaning |", "|---|---|---|"]
    for _, f, _ in option_fields():
        default = default_of(f)
        shown = "" if default in (None, "", []) else f"`{default}`"
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(c for c in choices if c)}." if choices else ""
        rows.append(f"| `--{f.name.replace('_', '-')}` | {shown} | {f.metadata['help']}{extra} |")
    return "\n".join(rows)
