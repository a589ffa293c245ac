"""Shared fixtures: tiny models come from sdlora.models; images are drawn here with Pillow."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

for _name in ("diffusers", "transformers", "accelerate"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def draw_shape(size=(64, 64), colour=(200, 30, 30), shape="circle", background=(255, 255, 255), mode="RGB"):
    w, h = size
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    box = [w // 5, h // 5, 4 * w // 5, 4 * h // 5]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    else:
        d.rectangle(box, fill=colour)
    return img.convert(mode) if mode != "RGB" else img


def make_dataset(root: Path, n=4, *, folder="5_sks", size=(64, 64), caption="a red circle, white background",
                 ext=".png") -> Path:
    d = root / folder if folder else root
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_shape(size, colour=(200, 30 + 40 * i, 30)).save(d / f"img{i}{ext}")
        if caption is not None:
            (d / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")
