"""The training dataset and its epoch plan.

Everything random here is a pure function of (seed, epoch, slot), where a slot is one use of one
image in one epoch. That makes a resumed run identical to an uninterrupted one without saving any
RNG state, and lets N processes split a global batch and see exactly what one process would.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .captions import CaptionRules, make_caption
from .scan import Item, load_rgb

log = logging.getLogger("sdlora")


def seeded(*parts) -> int:
    """A 63-bit seed mixed from any values (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Slot:
    item: int  # index into the item list
    slot: int  # unique id of this use of the item across the whole run
    epoch: int
    share: float = 1.0  # the weight of this sample's loss in its step (see EpochPlan.local_batches)


class EpochPlan:
    """Global batches per epoch (same-bucket items), split across processes."""

    def __init__(self, items: list[Item], batch_size: int, num_processes: int, seed: int):
        self.items, self.batch_size, self.num_processes, self.seed = items, batch_size, num_processes, seed
        self.train = [i for i, item in enumerate(items) for _ in range(item.repeats) if not item.reg]
        self.reg = [i for i, item in enumerate(items) for _ in range(item.repeats) if item.reg]
        self.samples = len(self.train) * (2 if self.reg else 1)

    def global_batches(self, epoch: int) -> list[list[Slot]]:
        rng = random.Random(seeded(self.seed, "epoch", epoch))
        order = list(self.train)
        if self.reg:
            # As kohya mixes reg_data_dir in: each epoch holds as many regularisation samples as training ones,
            # taken in turn from the (repeated) regularisation images, so over epochs every one is used.
            n = len(self.train)
            order += [self.reg[(epoch * n + k) % len(self.reg)] for k in range(n)]
        rng.shuffle(order)
        by_bucket: dict = defaultdict(list)
        for pos, idx in enumerate(order):
            by_bucket[self.items[idx].bucket].append(Slot(idx, epoch * self.samples + pos, epoch))
        size = self.batch_size * self.num_processes
        batches = []
        for bucket in sorted(by_bucket):
            slots = by_bucket[bucket]
            batches += [slots[start : start + size] for start in range(0, len(slots), size)]
        rng.shuffle(batches)
        return batches

    def local_batches(self, epoch: int, rank: int) -> list[list[Slot]]:
        """This process's part of each global batch. A global batch of n samples is split as evenly as the
        processes allow, and each sample's share of the loss is N/n: DDP averages the N gradients, so every step
        is the mean over exactly the n samples one process would see, a ragged last batch included (no sample
        counts twice). A process left with no sample runs one at share 0, so it still takes part in the step."""
        out = []
        n_proc = self.num_processes
        for batch in self.global_batches(epoch):
            n = len(batch)
            mine = [replace(s, share=n_proc / n) for s in batch[rank * n // n_proc : (rank + 1) * n // n_proc]]
            out.append(mine or [replace(batch[0], share=0.0)])
        return out

    @property
    def batches_per_epoch(self) -> int:
        return len(self.global_batches(0))


def to_training_image(item: Item, cfg: DataConfig, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover the bucket, crop, maybe flip; return CHW in [-1, 1] and the crop's (top, left)."""
    img = load_rgb(item.path)
    bw, bh = item.bucket
    scale = max(bw / img.width, bh / img.height)
    new = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.LANCZOS)
    dx, dy = img.width - bw, img.height - bh
    if cfg.crop == "random":
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        left, top = dx // 2, dy // 2
    img = img.crop((left, top, left + bw, top + bh))
    if cfg.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (top, left)


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by Slot. Returns pixels (or cached latents), the caption (or cached embeddings) and SDXL sizes."""

    def __init__(self, items: list[Item], cfg: DataConfig, seed: int, prior_loss_weight: float = 1.0):
        self.items, self.cfg, self.seed, self.prior_loss_weight = items, cfg, seed, prior_loss_weight
        self.rules = CaptionRules(cfg.trigger, cfg.shuffle_tags, cfg.keep_tags, cfg.caption_dropout)
        self.reg_rules = replace(self.rules, trigger="")  # regularisation images never get the trigger
        self.latents: dict[int, torch.Tensor] | None = None
        self.lost: set = set()  # images that could not be read again during training
        self.text: dict[str, tuple[torch.Tensor, ...]] | None = None

    def __len__(self) -> int:  # the dataset is indexed by Slot, not by position
        return len(self.items)

    def caption(self, slot: Slot) -> str:
        rng = random.Random(seeded(self.seed, "caption", slot.slot))
        item = self.items[slot.item]
        return make_caption(item.caption, self.reg_rules if item.reg else self.rules, rng)

    def __getitem__(self, slot: Slot) -> dict:
        item = self.items[slot.item]
        weight = self.prior_loss_weight if item.reg else 1.0
        out: dict = {"slot": slot.slot, "share": slot.share * weight, "original_size": (item.size[1], item.size[0]),
                     "target_size": (item.bucket.height, item.bucket.width)}
        if self.latents is not None:
            out["latents"] = self.latents[slot.item]
            out["crop_top_left"] = _center_crop(item)
        else:
            rng = random.Random(seeded(self.seed, "image", slot.slot))
            try:
                out["pixels"], out["crop_top_left"] = to_training_image(item, self.cfg, rng)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                # The file changed since the scan (deleted, truncated, replaced): this sample counts for nothing,
                # the run goes on, and the file is named once.
                out["pixels"], out["crop_top_left"] = torch.zeros(3, item.bucket.height, item.bucket.width), (0, 0)
                out["share"] = 0.0
                if item.path not in self.lost:
                    self.lost.add(item.path)
                    log.warning(f"skipped {item.path} from here on: it can no longer be read ({type(e).__name__}: {e})")
        out["caption"] = self.caption(slot)
        return out


def _center_crop(item: Item) -> tuple[int, int]:
    bw, bh = item.bucket
    w, h = item.size
    scale = max(bw / w, bh / h)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (new_h - bh) // 2, (new_w - bw) // 2


def collate(samples: list[dict]) -> dict:
    out: dict = {"slot": torch.tensor([s["slot"] for s in samples]), "caption": [s["caption"] for s in samples],
                 "share": torch.tensor([s["share"] for s in samples], dtype=torch.float32)}
    for key in ("original_size", "crop_top_left", "target_size"):
        out[key] = torch.tensor([s[key] for s in samples], dtype=torch.float32)
    for key in ("pixels", "latents"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def latent_cache_key(item: Item, cfg: DataConfig, vae_fingerprint: str) -> str:
    st = Path(item.path).stat()
    parts = (str(Path(item.path).resolve()), st.st_size, st.st_mtime_ns, tuple(item.bucket), cfg.crop, vae_fingerprint)
    return hashlib.sha1(repr(parts).encode()).hexdigest()
