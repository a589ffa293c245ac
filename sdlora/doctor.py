"""Before a run: the options fitted to the base, and the dataset doctor.

`diagnose` looks at a training folder with a run's options and loads no model: which images are used and
why others are not (the checks `train` runs), caption coverage, near-duplicate images, images smaller than
the resolution, the bucket histogram, the worst crops (as a contact sheet), samples and steps per epoch,
tag frequencies and the trigger word's coverage, and the memory the run will need. `sdlora doctor` prints it;
`train` prints the same report before it loads the base. It lives beside the trainer rather than in `data/`
because it also reads the base's configs (native size, architecture) and the memory estimate.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import TrainConfig
from .data.captions import split_tags
from .data.scan import CAPTION_EXTS, ScanReport, scan_folder
from .errors import DataError
from .models import base_kind, native_size

DUPLICATE_BITS = 4  # difference hashes (64 bits) this close are near-duplicates: resized, re-encoded, lightly graded
DUPLICATE_COLOUR = 24  # ... if their quarters' mean colours differ by at most this much (of 255) in every channel
WORST_CROPS = 8  # images on the contact sheet
PRODIGY_LR = 0.1  # below this, --lr is an AdamW-sized one that Prodigy's adaptive step would be scaled down by


def fit_to_base(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The options with a resolution and bucket step left at 0 fitted to the base (its native size, read from its
    configs without loading it), and one line for each default saying where its value came from. A --base that
    names no model is refused here, before the data is scanned."""
    base_kind(cfg.base)
    if cfg.data.resolution and cfg.data.bucket_step:
        return cfg, []
    native, why = (0, "") if cfg.data.resolution else native_size(
        cfg.base, prediction_type=cfg.prediction_type or None, download=True, config=cfg.base_config or None)
    data = cfg.data.fitted(native)
    notes = [] if cfg.data.resolution else [f"resolution {data.resolution} px: {why} (--resolution to change)"]
    if not cfg.data.bucket_step:
        notes.append(f"bucket step {data.bucket_step} px: the default, 64 or the resolution when smaller "
                     "(--bucket-step to change)")
    return replace(cfg, data=data), notes


def learning_rate_notes(cfg: TrainConfig) -> tuple[str, str | None]:
    """The learning rate as it acts (lr x alpha / rank: the update is scaled by alpha / rank), and a warning when
    alpha is far below the rank, which makes the same lr train much more slowly, or when Prodigy (which finds its own
    step size and multiplies it by lr) is given an AdamW-sized lr."""
    a = cfg.adapter
    scale = a.lora_alpha / a.rank
    line = (f"learning rate {cfg.lr:g} x alpha {a.lora_alpha:g} / rank {a.rank} = {cfg.lr * scale:.3g} effective"
            + (f"; embeddings {cfg.embedding_lr:g}" if a.train_embedding else ""))
    warning = None
    if scale < 0.25 and not a.embedding_only:
        warning = (f"alpha {a.lora_alpha:g} is far below rank {a.rank}: the update is scaled by {scale:.3g}, so "
                   f"--lr {cfg.lr:g} trains like {cfg.lr * scale:.2g} would at alpha = rank. Raise --lr (kohya users "
                   "with alpha 1 often use 1e-3 or more) or leave --alpha at its default (the rank).")
    if cfg.optimizer == "prodigy" and cfg.lr < PRODIGY_LR:
        warning = (f"--optimizer prodigy finds its own step size and multiplies it by --lr: at --lr {cfg.lr:g} the "
                   "LoRA barely moves (a short run saves one that learned nothing). Use --lr 1, as Prodigy's authors "
                   "and kohya users do.")
    return line, warning


@dataclass
class DatasetReport:
    root: Path
    scan: ScanReport
    cfg: TrainConfig
    defaults: list[str] = field(default_factory=list)
    captions: dict[str, list[str]] = field(default_factory=dict)  # problem -> image names
    token_limit: int = 77
    tokens_estimated: bool = False
    duplicates: list[list[str]] = field(default_factory=list)
    smaller: list[str] = field(default_factory=list)
    crops: list[tuple[str, float]] = field(default_factory=list)  # (name, share of the image cut away), worst first
    sheet: Path | None = None
    tags: list[tuple[str, int]] = field(default_factory=list)
    trigger: str = ""
    trigger_coverage: float = 0.0
    memory: object = None  # memory.Estimate, or None when the architecture cannot be read
    processes: int = 1
    reg: ScanReport | None = None  # the regularisation images (--reg-data)
    held_out: list = field(default_factory=list)  # images kept out of training for validation (--validation-split)

    @property
    def buckets(self) -> dict[str, int]:
        return {f"{b.width}x{b.height}": n for b, n in sorted(self.scan.buckets().items())}

    @property
    def small_buckets(self) -> list[str]:
        """Buckets holding fewer samples than one batch: their batches come out short every epoch."""
        per_batch = self.cfg.batch_size * self.processes
        return [f"{b.width}x{b.height}" for b, n in sorted(self.scan.epoch_buckets(self.reg).items()) if n < per_batch]

    @property
    def batches_per_epoch(self) -> int:
        per_batch = self.cfg.batch_size * self.processes
        return sum(math.ceil(n / per_batch) for n in self.scan.epoch_buckets(self.reg).values())

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.cfg.grad_accum)

    def to_json(self) -> dict:
        images = len(self.scan.items) + len(self.scan.skipped)
        return {
            "folder": str(self.root), "held_out": [str(i.path) for i in self.held_out], "resolution": self.cfg.data.resolution, "bucket_step": self.cfg.data.bucket_step,
            "defaults": self.defaults, "images": {"found": images, "used": len(self.scan.items),
                                                  "skipped": {str(p): why for p, why in self.scan.skipped}},
            "captions": self.captions, "token_limit": self.token_limit, "tokens_estimated": self.tokens_estimated,
            "near_duplicates": self.duplicates, "smaller_than_resolution": self.smaller,
            "buckets": self.buckets, "buckets_smaller_than_a_batch": self.small_buckets,
            "worst_crops": [{"image": n, "cut": round(c, 3)} for n, c in self.crops],
            "contact_sheet": str(self.sheet) if self.sheet else None,
            "samples_per_epoch": self.scan.samples_per_epoch, "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "batch_size": self.cfg.batch_size,
            "tags": dict(self.tags), "trigger": self.trigger, "trigger_coverage": round(self.trigger_coverage, 3),
            "memory": None if self.memory is None else {"total_bytes": self.memory.total, "parts": self.memory.parts,
                                                        "basis": self.memory.basis},
        }

    def text(self) -> str:
        s, cfg = self.scan, self.cfg
        lines = [f"dataset {self.root}: {len(s.items) + len(s.skipped)} images found, {len(s.items)} used, "
                 f"{len(s.skipped)} skipped"]
        lines += [f"  skipped {p.name}: {why}" for p, why in s.skipped]
        folders = Counter((i.folder, i.repeats) for i in s.items)
        lines += [f"  {folder}: {n} images x {reps} repeats" for (folder, reps), n in sorted(folders.items())]
        if self.reg is not None:
            lines.append(f"  regularisation: {len(self.reg.items)} images from {self.reg.root} ({len(self.reg.skipped)} "
                         f"skipped), {s.samples_per_epoch} of them used per epoch")
        if self.held_out:
            lines.append(f"  {len(self.held_out)} held out for validation (--validation-split): "
                         f"{_few([i.path.name for i in self.held_out])}")
        lines += [f"  {line}" for line in self.defaults]
        problems = {k: v for k, v in self.captions.items() if v}
        lines.append("captions: " + ("all present and readable" if not problems else "; ".join(
            f"{len(v)} {k} ({_few(v)})" for k, v in problems.items())))
        if self.tokens_estimated:
            lines.append(f"  (token counts estimated from words: the base's tokenizer was not at hand; limit "
                         f"{self.token_limit})")
        for group in self.duplicates:
            lines.append(f"near-duplicates: {', '.join(group)}")
        if self.smaller:
            lines.append(f"{len(self.smaller)} image(s) smaller than {cfg.data.resolution}x{cfg.data.resolution} "
                         f"({_few(self.smaller)}): " + ("upscaled (--upscale)" if cfg.data.upscale else
                                                        "trained in smaller buckets at their own size"))
        lines.append("buckets: " + ", ".join(f"{k} x{n}" for k, n in self.buckets.items()))
        if self.small_buckets:
            lines.append(f"  fewer samples than a batch of {cfg.batch_size * self.processes} in: "
                         f"{', '.join(self.small_buckets)} (their batches are short every epoch)")
        if self.crops:
            lines.append("most cut by cropping: " + ", ".join(f"{n} {c:.0%}" for n, c in self.crops[:4])
                         + (f" (contact sheet: {self.sheet})" if self.sheet else ""))
        lines.append(f"{len(s.items)} images x repeats = {s.samples_per_epoch} samples per epoch"
                     + (" (and as many regularisation samples)" if self.reg is not None else "") + ": "
                     f"{self.batches_per_epoch} batches of {cfg.batch_size}"
                     + (f" x {self.processes} processes" if self.processes > 1 else "")
                     + f", {self.steps_per_epoch} optimizer steps per epoch")
        if self.tags:
            shared = [(t, n) for t, n in self.tags if n > 1]
            once = len(self.tags) - len(shared)
            lines.append(f"tags: {len(self.tags)} different" + (": " if shared else "") + ", ".join(
                f"{t} {n}" for t, n in shared[:12]) + (f" ({once} used once)" if once else ""))
        if self.trigger:
            lines.append(f"trigger {self.trigger!r} is in {self.trigger_coverage:.0%} of the captions")
        if self.memory is not None:
            lines.append(self.memory.text())
        return "\n".join(lines)


def split_validation(items: list, share: float, seed: int) -> tuple[list, list]:
    """(training items, held-out items): `share` of the images (at least one), chosen by the seed, so the same
    options always hold out the same images (the selection report finds them again)."""
    import random

    k = max(1, round(len(items) * share))
    if k >= len(items):
        raise DataError(f"--validation-split {share} would hold out all {len(items)} images; lower it, or pass "
                        "--validation-data DIR")
    held = set(random.Random(seed).sample(range(len(items)), k))
    return [i for n, i in enumerate(items) if n not in held], [i for n, i in enumerate(items) if n in held]


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def diagnose(cfg: TrainConfig, *, sheet: Path | None = None, processes: int = 1, thorough: bool = True,
             require: bool = False) -> DatasetReport:
    """The report on `cfg.data.data` (and `cfg.data.reg_data`) for a run of `cfg`, its resolution and bucket step
    fitted to the base (`report.cfg`). Writes the contact sheet of the worst crops to `sheet` when given; without
    `thorough`, skips the costlier checks (near-duplicates decode every image again; the memory estimate). Raises
    DataError when a folder is missing, or (with `require`, as train does) when it holds no usable image."""
    cfg, defaults = fit_to_base(cfg)
    d = cfg.data
    if d.data is None:
        raise DataError("no training data: pass --data FOLDER (or `data = \"...\"` in the config file)")
    made = (cfg.output_dir, cfg.cache_dir)  # (a run started from inside its data folder writes there)
    for flag, folder in zip(("--output-dir", "--cache-dir"), made, strict=True):
        if folder is not None and Path(folder).resolve() == Path(d.data).resolve():
            raise DataError(f"{flag} {folder} is the data folder: what a run writes there would be read as training "
                            "images next time; give another folder (a subfolder of it is fine)")
    scan = scan_folder(d.data, resolution=d.resolution, bucket_step=d.bucket_step, bucket=d.bucket,
                       upscale=d.upscale, default_caption=d.default_caption, trigger=d.trigger, require=require,
                       exclude=made)
    reg = None if d.reg_data is None else scan_folder(d.reg_data, resolution=d.resolution, bucket_step=d.bucket_step,
                                                       bucket=d.bucket, upscale=d.upscale, reg=True, require=require,
                                                       exclude=made)
    report = DatasetReport(Path(d.data), scan, cfg, defaults, processes=processes, reg=reg)
    if d.validation_split and scan.items:
        scan.items, report.held_out = split_validation(scan.items, d.validation_split, cfg.seed)
    tokenizer, report.token_limit = _tokenizer(cfg.base_config if cfg.base_config and Path(cfg.base).suffix.lower()
                                               == ".safetensors" else cfg.base)
    report.tokens_estimated = tokenizer is None
    report.captions = _captions(scan, tokenizer, report.token_limit)
    report.smaller = [i.path.name for i in scan.items if i.size[0] * i.size[1] < d.resolution ** 2]
    report.crops = sorted(((i.path.name, _cut(i.size, i.bucket)) for i in scan.items if _cut(i.size, i.bucket) > 0.01),
                          key=lambda t: -t[1])
    if thorough:
        report.duplicates = _near_duplicates([i.path for i in scan.items])
    if sheet is not None and report.crops:
        report.sheet = _contact_sheet(scan, report.crops[:WORST_CROPS], Path(sheet))
    tags = Counter(t for i in scan.items for t in split_tags(i.caption))
    report.tags = tags.most_common()
    # The trigger: --trigger, else a new token being trained, else the one-word tag most captions share.
    words = [(t, n) for t, n in report.tags if " " not in t and n * 2 >= len(scan.items)]
    report.trigger = (d.trigger or next((t.split(":")[0] for t in cfg.adapter.train_embedding), "")
                      or next(iter(words), ("", 0))[0])
    if report.trigger and scan.items:
        report.trigger_coverage = sum(report.trigger in i.caption for i in scan.items) / len(scan.items)
    if thorough and scan.items:
        from .memory import estimate

        largest = max(scan.epoch_buckets(reg), key=lambda b: b.width * b.height)
        report.memory = estimate(cfg, images=len(scan.items) + len(reg.items if reg else []), bucket=tuple(largest))
    return report


def _tokenizer(base: str):
    """The base's tokenizer where it is at hand without loading the model, and its token limit (CLIP's 77 else)."""
    try:
        if base == "toy":
            from .toy.base import toy_tokenizer

            tok = toy_tokenizer()
        elif base in ("tiny-sd", "tiny-sdxl"):
            from .models import tiny_tokenizer

            tok = tiny_tokenizer()
        elif (Path(base).expanduser() / "tokenizer").is_dir():
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(Path(base).expanduser() / "tokenizer")
        else:
            return None, 77
    except (OSError, ValueError):
        return None, 77
    return tok, tok.model_max_length


WORD = re.compile(r"[\w']+|[^\w\s]", re.UNICODE)  # CLIP splits at least this finely (words, then BPE pieces)


def _captions(scan: ScanReport, tokenizer, limit: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"missing a caption file": [], "with an empty caption": [],
                                 "with both .txt and .caption": [], "not UTF-8 text": [],
                                 f"longer than {limit} tokens": []}
    for path, why in scan.skipped:
        if "not UTF-8" in why:
            out["not UTF-8 text"].append(path.name)
    for item in scan.items:
        files = [item.path.with_suffix(e) for e in CAPTION_EXTS if item.path.with_suffix(e).is_file()]
        name = item.path.name
        if not files:
            out["missing a caption file"].append(name)
        elif not item.caption.strip():
            out["with an empty caption"].append(name)
        if len(files) > 1:
            out["with both .txt and .caption"].append(name)
        count = (len(tokenizer(item.caption).input_ids) if tokenizer is not None
                 else len(WORD.findall(item.caption)) + 2)  # + start and end tokens
        if count > limit:
            out[f"longer than {limit} tokens"].append(name)
    return out


def _cut(size: tuple[int, int], bucket) -> float:
    """The share of the image that cropping to its bucket cuts away (after scaling to cover the bucket)."""
    w, h = size
    scale = max(bucket.width / w, bucket.height / h)
    return max(0.0, 1 - (bucket.width * bucket.height) / (w * scale * h * scale))


def _dhash(path: Path) -> tuple[int, bytes] | None:
    """A 64-bit difference hash (which of each row's neighbouring pixels is brighter, at 9x8 grey) and the colours
    of the image's four quarters (the hash alone sees the same shape in two colours as one picture)."""
    from PIL import Image

    from .data.scan import load_rgb

    try:
        rgb = load_rgb(path)
    except OSError:
        return None
    px = rgb.convert("L").resize((9, 8), Image.Resampling.BILINEAR).tobytes()  # 72 grey bytes, row by row
    bits = [px[r * 9 + c] > px[r * 9 + c + 1] for r in range(8) for c in range(8)]
    return sum(1 << i for i, b in enumerate(bits) if b), rgb.resize((2, 2), Image.Resampling.BOX).tobytes()


def _near_duplicates(paths: list[Path]) -> list[list[str]]:
    hashes = [(p, h) for p in paths if (h := _dhash(p)) is not None]
    parent = list(range(len(hashes)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            (a, colours_a), (b, colours_b) = hashes[i][1], hashes[j][1]
            if ((a ^ b).bit_count() <= DUPLICATE_BITS
                    and max(abs(x - y) for x, y in zip(colours_a, colours_b, strict=True)) <= DUPLICATE_COLOUR):
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, (p, _) in enumerate(hashes):
        groups.setdefault(root(i), []).append(p.name)
    return [g for g in groups.values() if len(g) > 1]


def _contact_sheet(scan: ScanReport, crops: list[tuple[str, float]], out: Path) -> Path:
    """The worst-cropped images side by side, the part that trains outlined in red, each named with its cut."""
    from PIL import Image, ImageDraw

    from .data.scan import load_rgb
    from .safefiles import atomic_write_bytes

    by_name = {i.path.name: i for i in scan.items}
    cell, label, cols = 160, 28, min(4, len(crops))
    rows = math.ceil(len(crops) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, cut) in enumerate(crops):
        item = by_name[name]
        img = load_rgb(item.path)
        img.thumbnail((cell - 8, cell - 8))
        x0, y0 = (k % cols) * cell + (cell - img.width) // 2, (k // cols) * (cell + label) + (cell - img.height) // 2
        sheet.paste(img, (x0, y0))
        b = item.bucket
        s = max(b.width / img.width, b.height / img.height)  # the bucket's window in thumbnail pixels, centred
        kw, kh = b.width / s, b.height / s
        left, top = x0 + (img.width - kw) / 2, y0 + (img.height - kh) / 2
        draw.rectangle([left, top, left + kw - 1, top + kh - 1], outline=(220, 0, 0), width=2)
        draw.text(((k % cols) * cell + 4, (k // cols) * (cell + label) + cell + 2),
                  f"{name[:22]}\n{cut:.0%} cut to {b.width}x{b.height}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out
