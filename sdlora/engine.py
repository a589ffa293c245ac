"""The blend engine behind `sdlora generate` and the web UI: one base, a library of LoRAs, blends, images.

Adapters are read from disk once (cache keyed by path, size and mtime). Two modes:
- `exact`: plain LoRAs stay separate peft adapters inside the pipeline, weighted with diffusers'
  `set_adapters`; a change of weights reloads nothing.
- `fast`: the blend is merged into the base weights whenever it changes (ΔW computed from the file),
  so each image costs what the base costs. The touched weights are backed up first, so removing
  the blend restores the base bit for bit (diffusers' `unfuse_lora` subtracts, which is not exact).
LyCORIS LoHa/LoKr cannot be peft adapters; they are merged the same way in both modes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import embeddings
from .config import Params, check_quantize
from .errors import ConfigError, FormatError
from .lorafile import Fit, LoraFile, fit, peek_lora, read_lora, trigger_words
from .models import Base, load_base

log = logging.getLogger("sdlora")

WEIGHT_RANGE = (-2.0, 2.0)
MAX_LIVE_ADAPTERS = 8  # peft adapters kept inside the pipeline at once (parsed files are cached without limit)
MODES = ("exact", "fast")
LORA_TAG = re.compile(r"<lora:([^<>]*)>")  # linear: one scan to the next angle bracket, no backtracking


@dataclass(frozen=True)
class BlendItem:
    """One LoRA in a blend: UNet strength and text-encoder strength (None: same as the UNet's)."""

    name: str
    unet: float = 1.0
    te: float | None = None

    @property
    def te_weight(self) -> float:
        return self.unet if self.te is None else self.te

    def __post_init__(self):
        for w in (self.unet, self.te_weight):
            if not WEIGHT_RANGE[0] <= w <= WEIGHT_RANGE[1]:
                raise ConfigError(f"weight {w} for LoRA {self.name!r} is outside [{WEIGHT_RANGE[0]:g}, {WEIGHT_RANGE[1]:g}]")


def parse_prompt(prompt: str) -> tuple[str, list[BlendItem]]:
    """Take A1111's `<lora:name:...>` tags out of a prompt; return the clean text and the items."""
    items = [_tag_item(m.group(0), m.group(1)) for m in LORA_TAG.finditer(prompt)]
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", re.sub(r"\s{2,}", " ", text)).strip(" ,")
    return text, items


def _tag_item(tag: str, body: str) -> BlendItem:
    """A1111's arguments: `name:te:unet:dyn` by position, or `te=`, `unet=`, `dyn=` by name; the UNet weight
    defaults to the text encoder's, which defaults to 1 (`<lora:name:w>` is w for both)."""
    name, *args = body.split(":")
    positional = [a.strip() for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    named = {k.strip(): v.strip() for k, v in named.items()}
    unknown = set(named) - {"te", "unet", "dyn"}
    if not name.strip() or unknown or len(positional) > 3:
        raise ConfigError(f"{tag}: write <lora:NAME:WEIGHT>, <lora:NAME:TE_WEIGHT:UNET_WEIGHT> or named te=, unet= "
                          f"(A1111's syntax){'; unknown argument ' + ', '.join(sorted(unknown)) if unknown else ''}")
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        raise ConfigError(f"{tag}: the weights must be numbers") from None
    if "dyn" in named or len(positional) > 2:
        log.warning(f"{tag}: dyn= (DyLoRA's rank limit) is not supported; the LoRA is applied at its full rank")
    return BlendItem(name.strip(), unet=unet, te=None if te == unet else te)


def blend_tags(blend: list[BlendItem]) -> str:
    tags = []
    for b in blend:
        tags.append(f"<lora:{b.name}:{b.unet:g}>" if b.te is None or b.te == b.unet
                    else f"<lora:{b.name}:{b.te:g}:{b.unet:g}>")
    return " ".join(tags)


@dataclass
class LoraInfo:
    name: str
    path: Path
    family: str | None
    rank: int
    kind: str
    triggers: list[str]
    preferred_weight: float
    preview: Path | None
    compatible: bool
    problem: str = ""
    report: Path | None = None  # the selection report of the run that made it (report.html beside it)


def _report_of(path: Path, root: Path) -> Path | None:
    """The run's report.html beside a LoRA, when its report.json lists this file among the run's checkpoints."""
    import json

    report = path.with_name("report.json")
    if not (report.is_file() and report.resolve().is_relative_to(root) and path.with_name("report.html").is_file()):
        return None
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError):
        if path.name in {c["file"] for c in json.loads(report.read_text(encoding="utf-8"))["checkpoints"]}:
            return path.with_name("report.html").resolve()
    return None


class LoraLibrary:
    """LoRAs by name: the `.safetensors` files of one folder (and its subfolders), plus files named explicitly
    (the CLI's --lora). Names are the only handle the UI gets: a path never comes from a user there, and
    links that lead outside the folder are left out. Listing reads each file's header only (cached by path, size
    and mtime, so a rescan reads only what changed); the tensors are read once, when a LoRA is first applied."""

    def __init__(self, folder: Path | None, family: str, files: list[Path] = ()):
        self.folder = Path(folder).resolve() if folder else None
        self.family = family
        self.files = [Path(f) for f in files]
        self.entries: dict[str, LoraInfo] = {}
        self._seen: dict[tuple, LoraInfo] = {}
        self.rescan(strict=True)

    def rescan(self, strict: bool = False) -> None:
        """Each LoRA is named by its file name without .safetensors; where two share one (in two subfolders, or
        two run folders given as files), each is named by its path below the folder (`styles/rim`), or a given
        file by its folder's name and then a number (`run2/rim`, `run2/rim 2`): none is hidden by another. A given
        file that is missing is an error when the library is made (`strict`), and dropped later (deleted since)."""
        entries: dict[str, LoraInfo] = {}
        if self.folder is not None:
            if not self.folder.is_dir():
                raise ConfigError(f"LoRA folder not found: {self.folder}")
            found = [p for p in sorted(self.folder.rglob("*.safetensors"))
                     if p.resolve().is_relative_to(self.folder) and p.resolve().is_file()]
            stems = Counter(p.stem for p in found)
            for path in found:
                name = path.stem if stems[path.stem] == 1 else path.relative_to(self.folder).with_suffix("").as_posix()
                entries[name] = self._entry(path, self.folder, name)
        for path in list(self.files):
            if not path.is_file():
                if strict:
                    raise ConfigError(f"LoRA file not found: {path}")
                log.warning(f"{path} is gone; it leaves the library")
                self.files.remove(path)
                continue
            if any(e.path == path.resolve() for e in entries.values()):
                continue  # (the same file twice)
            name, n = path.stem, 1
            while name in entries:
                n += 1
                name = f"{path.resolve().parent.name}/{path.stem}" + (f" {n - 1}" if n > 2 else "")
            entries[name] = self._entry(path, path.resolve().parent, name)
        self.entries = entries
        live = {file_key(e.path) for e in entries.values()}
        self._seen = {k: v for k, v in self._seen.items() if k in live}

    def name_of(self, path: Path) -> str:
        """The name the library gave the file at `path`."""
        return next(n for n, e in self.entries.items() if e.path == Path(path).resolve())

    def _entry(self, path: Path, root: Path, name: str) -> LoraInfo:
        key = file_key(path.resolve())
        if key not in self._seen or self._seen[key].name != name:
            self._seen[key] = self._describe(path, root, name)
        return self._seen[key]

    def _describe(self, path: Path, root: Path, name: str) -> LoraInfo:
        import json

        real = path.resolve()
        try:
            lf = peek_lora(real)
        except FormatError as e:
            return LoraInfo(name, real, None, 0, "?", [], 1.0, None, False, str(e))
        weight = 1.0
        with contextlib.suppress(ValueError):
            weight = float(lf.metadata.get("sdlora_preferred_weight") or 1.0)
        sidecar = path.with_suffix(".json")
        if sidecar.is_file() and sidecar.resolve().is_relative_to(root):
            with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError):
                weight = float(json.loads(sidecar.read_text(encoding="utf-8")).get("preferred weight") or 1.0)
        preview = path.with_name(path.stem + ".preview.png")
        preview = preview.resolve() if preview.is_file() and preview.resolve().is_relative_to(root) else None
        ok = lf.family in (None, self.family)
        problem = "" if ok else f"made for {lf.family}, the base is {self.family}"
        rank = Counter(m.rank for m in lf.modules.values()).most_common(1)[0][0]
        return LoraInfo(name, real, lf.family, rank, lf.kind, trigger_words(real, lf.metadata, lf.bundles), weight, preview, ok,
                        problem, _report_of(path, root))

    def get(self, name: str) -> LoraInfo:
        entry = self.entries.get(name)
        if entry is None:
            raise ConfigError(f"unknown LoRA {name!r}; choose one of: {', '.join(self.entries) or '(library is empty)'}")
        if not entry.compatible:
            raise FormatError(f"LoRA {name!r} cannot be applied: {entry.problem}")
        return entry


def file_key(path: Path) -> tuple:
    """What identifies one version of a file: its path, size and modification time."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise ConfigError(f"LoRA file {path} is gone; it was moved or deleted after the library was read") from None
    return (str(path), st.st_size, st.st_mtime_ns)


@dataclass
class Result:
    images: list  # PIL images
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path] = field(default_factory=list)


class Engine:
    def __init__(self, base: str | Base, lora_dir: Path | None = None, *, lora_files: list[Path] = (),
                 base_config: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                 quantize: str = "", quantize_backend: str = "auto"):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_quantize(quantize, quantize_backend)
        if quantize:
            from . import quant

            quantize_backend = quant.backend_for(quantize_backend)
            quant.require(quantize, quantize_backend)
        self.base = load_base(base, config=base_config) if isinstance(base, str) else base
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.pipe = self.base.pipeline()
        self.pipe.to(self.device, self.dtype)
        self.quantized = quantize  # the UNet's and text encoders' linear layers in 8 or 4 bits: exact mode only
        if quantize:
            for m in (self.base.unet, *self.base.text_encoders):
                quant.quantize(m, quantize, quantize_backend)
        self.library = LoraLibrary(lora_dir, self.base.family, lora_files)
        self.lock = threading.Lock()
        self.max_loras: int | None = None  # a cap on LoRAs per blend, prompt tags included (the web UI sets one)
        self.file_reads = 0  # how often a LoRA file was read from disk (the cache should keep this flat)
        self._files: dict[tuple, LoraFile] = {}
        self._fits: dict[tuple, Fit] = {}
        self._adapters: dict[str, tuple] = {}  # peft adapter name -> file key, for plain LoRAs in exact mode
        self._backup: dict[tuple[str, str], torch.Tensor] = {}  # (component, path) -> original weight
        self._merged: tuple = ()  # what is merged into the weights now
        self._exact: tuple = ()
        self._tokens: tuple = ()  # the bundled tokens in the tokenizers now: ((token, file key), ...)
        self._installed = None  # and what put them there (sdlora.embeddings.Installed)

    # ------------------------------------------------------------ files and adapters

    def lora_file(self, path: Path) -> tuple[tuple, LoraFile, Fit]:
        key = file_key(path)
        if key not in self._files:
            self._forget(lambda k: k[0] == key[0])  # an older version of this file
            lf = read_lora(path)
            self.file_reads += 1
            self._fits[key] = fit(lf, self.base.modules(), self.base.family, self.base.name)
            self._files[key] = lf
            if self._fits[key].unmatched:  # applied to the layers it does match, as A1111 and ComfyUI do, but said
                log.warning(f"{path}: {self._fits[key].report()}; only the matched modules are applied")
        return key, self._files[key], self._fits[key]

    def rescan(self) -> None:
        """Read the LoRA folder again; parsed files that left it are let go (adapters in use stay until replaced)."""
        self.library.rescan()
        live = {str(e.path) for e in self.library.entries.values()}
        self._forget(lambda k: k[0] not in live)

    def _forget(self, which) -> None:
        for k in [k for k in self._files if which(k)]:
            del self._files[k], self._fits[k]

    def _resolve(self, blend: list[BlendItem]) -> list[tuple[BlendItem, tuple, LoraFile, Fit]]:
        out = []
        for item in blend:
            out.append((item, *self.lora_file(self.library.get(item.name).path)))
        return out

    def _adapter_name(self, key: tuple) -> str:
        return "a" + str(abs(hash(key)) % 10**12)

    # ------------------------------------------------------------ applying a blend

    def apply(self, blend: list[BlendItem], mode: str = "exact") -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        resolved = self._resolve(blend)
        merge_only = [item.name for item, _, lf, _ in resolved if not lf.plain]
        if self.quantized and mode == "fast" and resolved:
            raise ConfigError(f"the base is quantized ({self.quantized}), so a LoRA cannot be merged into its weights: "
                              "use exact mode")
        if self.quantized and merge_only:
            raise ConfigError(f"the base is quantized ({self.quantized}), and {', '.join(merge_only)} can only be "
                              "merged into its weights (DoRA, LyCORIS LoHa/LoKr and LoCon with a Tucker core are): "
                              "they need a full-precision base")
        self._set_tokens(resolved)
        merged = [(i, k, f) for i, k, lf, f in resolved if mode == "fast" or not lf.plain]
        exact = [(i, k, f) for i, k, lf, f in resolved if mode == "exact" and lf.plain]
        self._merge(merged)
        self._set_exact(exact)

    def _set_exact(self, items: list[tuple[BlendItem, tuple, Fit]]) -> None:
        state = tuple((self._adapter_name(k), i.unet, i.te_weight) for i, k, _ in items)
        if state == self._exact:
            return
        if not items:
            if self._adapters:
                # Remove peft's wrappers entirely, so a merged (fast) blend or the bare base runs at base speed.
                # The parsed files stay cached in memory; going back to exact mode reads no file.
                self.pipe.unload_lora_weights()
                self._adapters.clear()
            self._exact = ()
            return
        wanted = {self._adapter_name(k) for _, k, _ in items}
        stale = [n for n in self._adapters if n not in wanted]
        if len(self._adapters) + len(wanted - self._adapters.keys()) > MAX_LIVE_ADAPTERS and stale:
            # peft walks every module of the model on each load, and the walk grows with each live adapter; keeping
            # a bounded number live keeps loading one more LoRA flat however many the library holds.
            evict = stale[: len(self._adapters) + len(wanted - self._adapters.keys()) - MAX_LIVE_ADAPTERS]
            self.pipe.delete_adapters(evict)
            for n in evict:
                del self._adapters[n]
        for _, key, result in items:
            name = self._adapter_name(key)
            if name not in self._adapters:
                with warnings.catch_warnings():
                    # peft warns on every adapter after the first; several adapters are the point here.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
                    # What the reader fitted, not the file's own tensors: one layout diffusers reads the same way
                    # every time, with each module's scale folded in (the same update fast mode merges).
                    self.pipe.load_lora_weights(result.peft_state(), adapter_name=name)
                self._adapters[name] = key
        self.pipe.enable_lora()
        comps = [c for c in ("text_encoder", "text_encoder_2") if getattr(self.pipe, c, None) is not None]
        weights = [{"unet": i.unet, **{c: i.te_weight for c in comps}} for i, _, _ in items]
        self.pipe.set_adapters([self._adapter_name(k) for _, k, _ in items], weights)
        self._exact = state

    def _set_tokens(self, resolved: list[tuple[BlendItem, tuple, LoraFile, Fit]]) -> None:
        """The blend's bundled embeddings in the tokenizers and text encoders, and no others: the base's own
        tokenizers and embedding modules come back when a LoRA with tokens leaves the blend."""
        owner: dict[str, tuple[tuple, LoraFile]] = {}
        for _, key, lf, _ in resolved:
            for token in lf.bundles:
                if token in owner and owner[token][0] != key:
                    raise FormatError(f"{owner[token][1].path} and {lf.path} both bundle an embedding for the token "
                                      f"{token!r}; blend only one of them")
                owner[token] = (key, lf)
        state = tuple((t, k) for t, (k, _) in owner.items())
        if state == self._tokens:
            return
        vectors = {}
        for token, (_, lf) in owner.items():  # checked against the base before anything changes
            vectors[token] = embeddings.bundle_vectors(lf.path, {token: lf.bundles[token]}, self.base)[token]
        if self._installed is not None:
            embeddings.remove(self.base, self._installed)
            self._installed, self._tokens = None, ()
        if vectors:
            self._installed = embeddings.install(self.base, vectors, {t: str(lf.path) for t, (_, lf) in owner.items()})
            self._tokens = state
        self.pipe.tokenizer = self.base.tokenizers[0]
        if self.base.is_sdxl:
            self.pipe.tokenizer_2 = self.base.tokenizers[1]

    @torch.no_grad()
    def _merge(self, items: list[tuple[BlendItem, tuple, Fit]]) -> None:
        state = tuple((k, i.unet, i.te_weight) for i, k, _ in items)
        if state == self._merged:
            return
        models = self.base.modules()
        old = {k: (u, t) for k, u, t in self._merged}
        if [k for k, _, _ in state] == [k for k, _, _ in self._merged]:
            # Same LoRAs, new weights: add only the change of the LoRAs whose weights moved.
            changes = [(i, r, i.unet - old[k][0], i.te_weight - old[k][1]) for i, k, r in items
                       if (i.unet, i.te_weight) != old[k]]
        else:
            self._restore()
            changes = [(i, r, i.unet, i.te_weight) for i, _, r in items]
        rebuild = set()
        for _, result, unet_w, te_w in changes:
            for t in result.targets:
                w = unet_w if t.component == "unet" else te_w
                if w == 0:
                    continue
                weight = _weight(models[t.component], t.path)
                key = (t.component, t.path)
                if key not in self._backup:
                    # Kept in host memory: a blend over most of an SDXL UNet would otherwise hold a second UNet's
                    # worth of weights on the GPU.
                    self._backup[key] = weight.detach().to("cpu", copy=True)
                if weight.dtype in (torch.float16, torch.bfloat16):
                    # Adding to half-precision weights rounds on every slider move and the blend drifts; these
                    # layers are rebuilt below from the base in fp32 and rounded once.
                    rebuild.add(key)
                    continue
                weight.add_(w * t.module.delta(tuple(weight.shape), weight.device, base=self._backup[key]))
        sums: dict[tuple[str, str], torch.Tensor] = {}
        for i, _, result in items if rebuild else ():
            for t in result.targets:
                key = (t.component, t.path)
                w = i.unet if t.component == "unet" else i.te_weight
                if key not in rebuild:
                    continue
                weight = _weight(models[t.component], t.path)
                if key not in sums:
                    sums[key] = self._backup[key].to(weight.device, torch.float32)
                if w != 0:
                    sums[key] += w * t.module.delta(tuple(weight.shape), weight.device, base=self._backup[key])
        for (component, path), total in sums.items():
            weight = _weight(models[component], path)
            weight.copy_(total.to(weight.dtype))
        self._merged = state

    def _restore(self) -> None:
        """Every merged weight back to the base, bit for bit, and the backups let go."""
        models = self.base.modules()
        for (component, path), original in self._backup.items():
            _weight(models[component], path).copy_(original)
        self._backup.clear()

    def clear(self) -> None:
        """No LoRA: merged weights restored from the backup, adapters disabled, bundled tokens removed."""
        self._set_tokens([])
        self._merge([])
        self._set_exact([])

    # ------------------------------------------------------------ generating

    @property
    def native_size(self) -> int:
        """The size the base was trained at, diffusers' own default: the UNet's sample size x the VAE's scale."""
        size = self.pipe.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size) * int(self.pipe.vae_scale_factor)

    def sized(self, params: Params) -> Params:
        """params with a width or height of 0 set to the base's native size, checked."""
        params = replace(params, width=params.width or self.native_size, height=params.height or self.native_size)
        params.check()
        return params

    def _ready(self, params: Params, blend: list[BlendItem], mode: str) -> None:
        """The blend applied and the sampler set; call with the lock held."""
        from .schedulers import make_scheduler

        self.apply(blend, mode)
        self.pipe.scheduler = make_scheduler(params.scheduler, self.base.scheduler.config)

    def generate(self, params: Params, blend: list[BlendItem] | None = None, mode: str = "exact",
                 progress=None) -> Result:
        params = self.sized(params)
        text, tagged = parse_prompt(params.prompt)
        merged = {b.name: b for b in blend or []}
        merged.update({b.name: b for b in tagged})  # a tag in the prompt sets that LoRA's weights
        blend = list(merged.values())
        if self.max_loras is not None and len(blend) > self.max_loras:
            raise ConfigError(f"{len(blend)} LoRAs in one blend (prompt tags included); at most {self.max_loras}")
        with self.lock:
            self._ready(params, blend, mode)
            seed = params.seed if params.seed != -1 else random.randrange(2**32)
            images, seeds, texts = [], [], []
            total = params.batch_count * params.steps
            for batch in range(params.batch_count):
                batch_seeds = [seed + batch * params.batch_size + i for i in range(params.batch_size)]

                def on_step(pipe, step, timestep, kwargs, _batch=batch):
                    if progress is not None:
                        progress((_batch * params.steps + step + 1) / total)
                    return kwargs

                images += self._call([text] * params.batch_size, batch_seeds, params, on_step)
                seeds += batch_seeds
            for s in seeds:
                texts.append(self.infotext(params, text, blend, s))
        return Result(images, seeds, texts)

    def render(self, prompts: list[str], seeds: list[int], params: Params, blend: list[BlendItem] | None = None,
               mode: str = "exact") -> list:
        """One image per (prompt, seed) pair, all in one pipeline call: for measuring many prompts at once
        (`sdlora demo`). Prompts are plain text here (no <lora:...> tags); params.prompt and batch are unused."""
        if len(prompts) != len(seeds):
            raise ConfigError(f"render needs one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        params = self.sized(params)
        with self.lock:
            self._ready(params, blend or [], mode)
            return self._call(prompts, seeds, params)

    def _call(self, prompts: list[str], seeds: list[int], params: Params, on_step=None) -> list:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        negative = [params.negative_prompt] * len(prompts) if params.negative_prompt else None  # diffusers: same type
        return self.pipe(prompts, negative_prompt=negative, num_inference_steps=params.steps,
                         guidance_scale=params.cfg_scale, width=params.width, height=params.height,
                         generator=gens, callback_on_step_end=on_step).images

    def short_hash(self, name: str) -> str:
        """A1111's short LoRA hash (12 digits of the sha256 of the tensor data), from the one read of the file."""
        return self.lora_file(self.library.get(name).path)[1].sha256[:12]

    def infotext(self, params: Params, text: str, blend: list[BlendItem], seed: int) -> str:
        from .recipe import a1111_parameters

        hashes = {b.name: self.short_hash(b.name) for b in blend}
        prompt = " ".join(p for p in (text, blend_tags(blend)) if p)
        return a1111_parameters(prompt, params.negative_prompt, params.steps, params.scheduler, params.cfg_scale, seed,
                                params.width, params.height, self.base.name, {k: v for k, v in hashes.items() if v})


def _weight(model: torch.nn.Module, path: str) -> torch.Tensor:
    layer = model.get_submodule(path)
    return getattr(layer, "base_layer", layer).weight.data
