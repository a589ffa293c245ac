"""What the Train tab does, as plain methods over `sdlora.jobs` (the tab itself only lays out and wires).

The browser names data folders relative to `--data-root`, the only place the tab may read training data; every
path it sends is resolved (symlinks included) and refused outside that folder. Captions are written atomically,
in UTF-8, beside their image and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.config import build_config
from sdlora.data.captions import split_tags
from sdlora.data.scan import CAPTION_EXTS, IMAGE_EXTS, read_caption
from sdlora.errors import ConfigError, SdloraError
from sdlora.jobs import Jobs
from sdlora.safefiles import atomic_write_bytes

PAGE = 24  # thumbnails per page
MAX_FOLDERS = 200


class Trainer:
    def __init__(self, jobs: Jobs, data_root: Path | None, defaults: dict | None = None):
        """`defaults`: options whose starting value in the form is not the config's (the studio's --base: a run
        trained on another base than the studio's would not apply to it)."""
        self.jobs = jobs
        self.root = Path(data_root).resolve() if data_root else None
        self.defaults = dict(defaults or {})

    # ---------------------------------------------------------------- data

    def folders(self) -> list[str]:
        """Folders below the data root that hold images (directly), as paths relative to it."""
        if self.root is None:
            return []
        found = set()
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTS and path.is_file() and self._inside(path):
                found.add(path.parent.relative_to(self.root).as_posix())
                if len(found) >= MAX_FOLDERS:
                    break
        return sorted(found)

    def folder(self, rel: str) -> Path:
        """`rel` below the data root, or an error: absolute paths, '..', links leading out are all refused."""
        if self.root is None:
            raise ConfigError("training from the browser is off: start the web UI with --data-root FOLDER (the "
                              "folder holding your training-image folders)")
        rel = str(rel or "").strip()
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\x00" in rel:
            raise ConfigError(f"data folder {rel!r}: choose one of the folders below the data root")
        path = (self.root / rel).resolve()
        if not self._inside(path) or not path.is_dir():
            raise ConfigError(f"data folder {rel!r}: choose one of the folders below the data root")
        return path

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def images(self, rel: str) -> list[Path]:
        folder = self.folder(rel)
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                      and self._inside(p))

    def page(self, rel: str, number: int = 0) -> list[tuple[Path, str]]:
        """One page of thumbnails with their captions ("" when an image has none)."""
        images = self.images(rel)
        start = max(0, int(number)) * PAGE
        return [(image, _shown(image)) for image in images[start:start + PAGE]]

    def image(self, rel: str, name: str) -> Path:
        """An image of the folder by its path relative to the folder, as the page listed it."""
        folder = self.folder(rel)
        for image in self.images(rel):
            if image.relative_to(folder).as_posix() == str(name):
                return image
        raise ConfigError(f"no image {name!r} in {rel!r}")

    def save_caption(self, rel: str, name: str, caption: str) -> Path:
        """Write one caption (its existing .txt/.caption file, else a new .txt), atomically, in UTF-8."""
        image = self.image(rel, name)
        text = _words(caption)
        target = next((image.with_suffix(e) for e in CAPTION_EXTS if image.with_suffix(e).is_file()),
                      image.with_suffix(".txt"))
        atomic_write_bytes(target, (text + "\n").encode("utf-8"))
        return target

    def save_captions(self, rel: str, shown: list, edited: list[str]) -> tuple[list[Path], list[str]]:
        """The captions edited on a page of the grid: `shown` lists each image of the page with the caption it
        showed, `edited` the boxes' text now, in the same order. Writes only the captions that changed; one changed
        on disk since the page was shown is left alone and named (nothing typed elsewhere is overwritten).
        Returns the files written and the images left alone."""
        written, left = [], []
        self.folder(rel)
        for (name, before), text in zip(shown or [], edited, strict=False):
            image = self.image(rel, name)
            if _words(text) == _words(before):
                continue
            if _words(_shown(image)) != _words(before):
                left.append(str(name))
                continue
            written.append(self.save_caption(rel, name, text))
        return written, left

    def add_trigger(self, rel: str, word: str) -> int:
        """Put `word` first in every caption that does not have it as a tag yet; returns how many changed."""
        word = " ".join(str(word).split()).strip(", ")
        if not word:
            raise ConfigError("type the trigger word to add")
        folder, changed = self.folder(rel), 0
        for image in self.images(rel):
            caption = read_caption(image) or ""
            if word in split_tags(caption):
                continue
            self.save_caption(rel, image.relative_to(folder).as_posix(), f"{word}, {caption}" if caption else word)
            changed += 1
        return changed

    def preflight(self, rel: str, options: dict) -> str:
        """The pre-flight report `sdlora train` prints (images used and skipped, repeats, buckets, steps)."""
        from sdlora.doctor import diagnose

        return diagnose(self.config(rel, options), thorough=False).text()

    # ---------------------------------------------------------------- runs

    def config(self, rel: str, options: dict):
        values = {k: v for k, v in options.items() if v not in (None, "") and k not in DECIDED}
        for key in FOLDER_OPTIONS:
            if key in values:
                values[key] = str(self.folder(values[key]))
        folder = self.folder(rel)
        try:  # the run goes to outputs/NAME, as Start sends it (and so its TOML says); Start checks the name
            output = self.jobs.folder(str(values.get("name") or folder.name)).resolve()
        except ConfigError:  # (a folder such as "my photos" is not a run name: the report and thumbnails still show)
            output = self.jobs.outputs.resolve()
        return build_config({**values, "data": str(folder), "output_dir": str(output)})

    def relative(self, settings: dict) -> dict:
        """A run's settings with its folders as the tab names them (relative to the data root)."""
        out = dict(settings)
        for key in ("data", *FOLDER_OPTIONS):
            if out.get(key) and self.root is not None and Path(out[key]).resolve().is_relative_to(self.root):
                out[key] = Path(out[key]).resolve().relative_to(self.root).as_posix()
        return out

    def save_toml(self, name: str, text: str) -> Path:
        """The settings as `outputs/toml/NAME.toml` (to download, or to pass to `sdlora train --config`)."""
        path = self.jobs.outputs / "toml" / f"{self.jobs.folder(name).name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def start(self, rel: str, options: dict):
        return self.jobs.submit(self.config(rel, options))


# ---------------------------------------------------------------- the tab

BASICS = ("base", "name", "steps", "epochs", "kind", "rank", "alpha", "lr", "preset", "trigger", "sample_prompt",
          "sample_every")
DECIDED = ("data", "output_dir", "resume", "cache_dir", "overwrite")  # where things go is the tab's decision
FOLDER_OPTIONS = ("reg_data", "validation_data")  # folders below the data root, like the training data


def option_specs(defaults: dict | None = None) -> list[tuple[str, object, str, tuple | None, type]]:
    """(name, default, help, choices, kind) for every option the form shows, from the config dataclasses (or
    `defaults`)."""
    import types
    import typing

    from sdlora.config import default_of, option_fields

    out = []
    for _, f, typ in option_fields():
        if f.name in DECIDED:
            continue
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        kind = args[0] if typing.get_origin(typ) in (typing.Union, types.UnionType) else typ
        kind = list if typing.get_origin(kind) is list else kind
        out.append((f.name, (defaults or {}).get(f.name, default_of(f)), f.metadata.get("help", ""),
                    f.metadata.get("choices"), kind))
    return out


def form_values(names: list[str], values: list) -> dict:
    """The form's values as train options (numbers as their type, lists one per line, blanks left out)."""
    kinds = {name: kind for name, _, _, _, kind in option_specs()}
    out = {}
    for name, value in zip(names, values, strict=True):
        if value is None or value == "":
            continue
        if kinds[name] in (int, float):
            try:
                value = kinds[name](float(value)) if kinds[name] is int else float(value)
            except ValueError:
                raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a number") from None
        elif kinds[name] is list:
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        out[name] = value
    return out


def form_updates(names: list[str], settings: dict, defaults: dict | None = None) -> list:
    """Values to put back into the form for `settings` (a run's TOML), the defaults elsewhere."""
    specs = {name: (default, kind) for name, default, _, _, kind in option_specs(defaults)}
    out = []
    for name in names:
        default, kind = specs[name]
        value = settings.get(name, default)
        if kind is list:
            value = "\n".join(value or [])
        elif isinstance(value, Path) or kind is Path:
            value = "" if value is None else str(value)
        out.append(value)
    return out


def _shown(image: Path) -> str:
    try:
        return read_caption(image) or ""
    except SdloraError as e:
        return f"(unreadable caption: {e})"


def _words(text) -> str:
    """A caption as it is written: words separated by single spaces."""
    return " ".join(str(text or "").split())
