"""Scan a training folder: which images are usable, their captions, repeats and buckets, and why others are not.

Folder conventions follow kohya's sd-scripts, so existing datasets work unchanged: a caption is
`<stem>.txt` (or `<stem>.caption`) beside the image, and a folder named `N_name` repeats its images N
times with `name` as the class token for uncaptioned images.
"""

from __future__ import annotations

import codecs
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .buckets import Bucket, assign_bucket
from .captions import split_tags, with_trigger

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # GIF and TIFF: their first frame
CAPTION_EXTS = (".txt", ".caption")
REPEATS_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str  # with the trigger word, before per-use shuffling/dropout
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF orientation
    bucket: Bucket
    folder: str  # kohya's "<repeats>_<name>" key for tag frequency
    reg: bool = False  # a regularisation image (prior preservation): no trigger, its own loss weight


@dataclass
class ScanReport:
    root: Path
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def samples_per_epoch(self) -> int:
        return sum(i.repeats for i in self.items)

    def buckets(self) -> Counter:
        c: Counter = Counter()
        for i in self.items:
            c[i.bucket] += i.repeats
        return c

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i in self.items:
            freq = out.setdefault(i.folder, {})
            for tag in split_tags(i.caption):
                freq[tag] = freq.get(tag, 0) + 1
        return out

    def trigger_words(self) -> list[str]:
        """One-word tags every caption has (a style's `rimstyle`, kohya's class token first in each caption), in the
        order the first caption gives them: the trigger a user would type, when --trigger does not say."""
        if not self.items:
            return []
        common = set.intersection(*(set(split_tags(i.caption)) for i in self.items))
        return [t for t in split_tags(self.items[0].caption) if t in common and " " not in t]

    def epoch_buckets(self, reg: ScanReport | None = None) -> Counter:
        """Samples per bucket in one epoch: the training samples, and with `reg` as many regularisation samples,
        drawn in turn as EpochPlan draws them."""
        buckets = self.buckets()
        if reg is not None:
            pool = [i.bucket for i in reg.items for _ in range(i.repeats)]
            buckets.update(pool[k % len(pool)] for k in range(self.samples_per_epoch))
        return buckets


BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16")]  # (UTF-32 LE's BOM begins with UTF-16 LE's, so it is tried first)


def read_caption(image: Path) -> str | None:
    """The caption beside an image, or None when it has none. Raises DataError for undecodable text."""
    for ext in CAPTION_EXTS:
        cap = image.with_suffix(ext)
        if cap.is_file():
            raw = cap.read_bytes()
            # UTF-8 (with or without a BOM), or UTF-16/32 with their BOM: Windows Notepad's "Unicode" is UTF-16 LE.
            encoding = next((enc for bom, enc in BOMS if raw.startswith(bom)), "utf-8-sig")
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError:
                raise DataError(f"caption {cap.name} is not UTF-8 (or UTF-16 with a byte-order mark) text; re-save "
                                "it as UTF-8") from None
            lines = [ln.replace("\x00", "").strip() for ln in text.splitlines() if ln.replace("\x00", "").strip()]
            return lines[0] if lines else ""
    return None


def _folder_info(image: Path, root: Path) -> tuple[int, str, str]:
    """(repeats, class token, folder key) from the nearest `N_name` folder at or above the image."""
    folder = image.parent
    while True:
        m = REPEATS_RE.match(folder.name)
        if m:
            return int(m.group(1)), m.group(2).strip(), folder.name
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return 1, root.name.replace("_", " "), f"1_{root.name}"


def image_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (so truncated files are caught now) and return its upright size. Larger than Pillow's
    pixel limit is refused before decoding (a decompression bomb, or a photo to downscale first)."""
    with warnings.catch_warnings(), Image.open(path) as img:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise Image.DecompressionBombError(f"{img.width}x{img.height}")
        img.load()
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def scan_folder(root: Path, *, resolution: int, bucket_step: int, bucket: bool = True, upscale: bool = False,
                default_caption: str = "", trigger: str = "", reg: bool = False, require: bool = True,
                exclude: tuple[Path | None, ...] = ()) -> ScanReport:
    """The usable images of `root` and why the others are not; raises DataError when none is usable (unless not
    `require`: the dataset doctor reports an empty result too). Folders in `exclude` (the run's outputs and cache,
    which may lie inside `root` when a run starts from the data folder) are passed over."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"--data must be a folder of images, but {root} is a file")
    report = ScanReport(root)
    uncaptioned: list[Path] = []
    empty: list[Path] = []
    skip = [e for e in (Path(e).resolve() for e in exclude if e is not None) if e.is_relative_to(root.resolve())]
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and not any(p.resolve().is_relative_to(e) for e in skip))
    real_root = root.resolve()
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        if not path.resolve().is_relative_to(real_root):
            report.skipped.append((path, f"a link to {path.resolve()}, outside the data folder; copy the file in"))
            continue
        try:
            size = image_size(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            report.skipped.append((path, f"too large: over Pillow's {Image.MAX_IMAGE_PIXELS:,}-pixel limit (a "
                                         f"decompression bomb, or a photo to downscale first; {e})"))
            continue
        except (UnidentifiedImageError, OSError, ValueError) as e:
            report.skipped.append((path, f"cannot be decoded as an image ({type(e).__name__}: {e})"))
            continue
        b = assign_bucket(*size, resolution, bucket_step, bucket=bucket, upscale=upscale)
        if b is None:
            report.skipped.append((path, f"too small ({size[0]}x{size[1]}): both sides must be at least {bucket_step} pixels"
                                         " (or pass --upscale)"))
            continue
        try:
            caption = read_caption(path)
        except DataError as e:
            report.skipped.append((path, str(e)))
            continue
        repeats, class_token, folder = _folder_info(path, root)
        if caption is None:
            uncaptioned.append(path)
            caption = default_caption or class_token
        elif not caption:
            empty.append(path)
        report.items.append(Item(path, with_trigger(caption, trigger), repeats, size, b, folder, reg))
    for path, reason in report.skipped:
        report.warnings.append(f"skipped {path}: {reason}")
    if uncaptioned:
        used = repr(default_caption) if default_caption else "the folder's class token"
        report.warnings.append(f"{len(uncaptioned)} image(s) have no caption file ({_names(uncaptioned)}); using {used}")
    if empty:
        report.warnings.append(f"{len(empty)} image(s) have an empty caption file ({_names(empty)}); they train with "
                               + (f"the trigger {trigger!r} alone" if trigger else "no text (unconditionally)"))
    stems = Counter(p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTS)
    shared = [s for s, n in stems.items() if n > 1]
    if shared:
        first = " and ".join(p.name for p in files if p.with_suffix("") == shared[0] and p.suffix.lower() in IMAGE_EXTS)
        report.warnings.append(f"{len(shared)} name(s) belong to several images, which share one caption file "
                               f"(e.g. {first}); each such image is used with it")
    orphans = [p for p in files if p.suffix.lower() in CAPTION_EXTS and p.with_suffix("") not in stems]
    if orphans:
        report.warnings.append(f"{len(orphans)} caption file(s) have no image beside them ({_names(orphans)}); "
                               "they are not used")
    if not report.items and require:
        # (the warnings are logged after the scan returns: the reasons go into the error itself)
        # One example per distinct reason (the sizes in a reason differ from image to image).
        firsts: dict[str, str] = {}
        for path, reason in report.skipped:
            firsts.setdefault(reason.split(" (")[0], f"{path.name}: {reason}")
        why = (f"; {len(report.skipped)} file(s) skipped, for example " + "; ".join(list(firsts.values())[:3])
               if report.skipped else "")
        what = "regularisation image (--reg-data)" if reg else "image"
        raise DataError(f"no usable {what} in {root} (looked for {', '.join(IMAGE_EXTS)} recursively){why}")
    return report


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:3]) + (" ..." if len(paths) > 3 else "")


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright, in 8-bit RGB, with transparency composited on white."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16/32-bit integer or float greyscale: scale to 8 bits instead of clipping (floats in [0, 1] too).
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            top = (65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else
                   1.0 if img.mode == "F" and arr.max() <= 1.0 else 255.0)
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
        if img.mode == "P":
            img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        return img.convert("RGB")
