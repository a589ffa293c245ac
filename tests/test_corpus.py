"""The image corpus (issue 15): odd files of every kind, each with the outcome scanning and a short run give it."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import AdapterConfig, DataConfig, TrainConfig
from sdlora.data import scan_folder
from sdlora.data.scan import load_rgb
from sdlora.train import train

from conftest import draw_shape


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size and whose data is one empty compressed block."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _with_orientation(n: int) -> bytes:
    img = draw_shape((96, 64))
    exif = Image.Exif()
    exif[0x0112] = n
    return _encoded(img, "JPEG", exif=exif)


def corpus(root: Path) -> dict[str, tuple[str, object]]:
    """name -> (outcome, detail): 'used' with the upright (width, height), or 'skipped' with a reason's words.
    Hidden files, folders and symlinks leaving the folder are listed as 'ignored'/'skipped' too."""
    d = root / "1_odd"
    d.mkdir(parents=True)
    base = draw_shape((64, 64))
    rgb = np.asarray(base)
    png, jpg = _encoded(base, "PNG"), _encoded(base, "JPEG")
    cases: dict[str, tuple[str, object]] = {}

    def put(name, data, outcome, detail):
        (d / name).write_bytes(data)
        cases[name] = (outcome, detail)

    put("truncated.png", png[: len(png) // 2], "skipped", "cannot be decoded")
    put("truncated.jpg", jpg[: len(jpg) // 2], "skipped", "cannot be decoded")
    put("zero.png", b"", "skipped", "cannot be decoded")
    put("random.jpg", os.urandom(2048), "skipped", "cannot be decoded")
    put("page.png", b"<!DOCTYPE html><html><body>404</body></html>", "skipped", "cannot be decoded")
    put("text.webp", b"RIFF\x00\x00\x00\x00WEBPnot really", "skipped", "cannot be decoded")
    put("one.png", _encoded(Image.new("RGB", (1, 1)), "PNG"), "skipped", "too small")
    put("small.png", _encoded(draw_shape((40, 40)), "PNG"), "skipped", "too small")
    put("bomb.png", _png_header_only(30000, 30000), "skipped", "pixel limit")
    put("huge.png", _png_header_only(10000, 10000), "skipped", "pixel limit")
    frames = [draw_shape((64, 64), colour=(200, 30 * i, 30)) for i in range(3)]
    put("animated.gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "used", (64, 64))
    put("pages.tiff", _encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "used", (64, 64))
    put("plain.webp", _encoded(base, "WEBP"), "used", (64, 64))
    put("lossless.webp", _encoded(base, "WEBP", lossless=True), "used", (64, 64))
    put("plain.bmp", _encoded(base, "BMP"), "used", (64, 64))
    put("onebit.bmp", _encoded(base.convert("1"), "BMP"), "used", (64, 64))
    put("rgba.png", _encoded(base.convert("RGBA"), "PNG"), "used", (64, 64))
    put("la.png", _encoded(base.convert("LA"), "PNG"), "used", (64, 64))
    put("p.png", _encoded(base.convert("P"), "PNG"), "used", (64, 64))
    put("p-transparent.png", _encoded(base.convert("P"), "PNG", transparency=0), "used", (64, 64))
    put("cmyk.jpg", _encoded(base.convert("CMYK"), "JPEG"), "used", (64, 64))
    put("cmyk.tiff", _encoded(base.convert("CMYK"), "TIFF"), "used", (64, 64))
    put("l.png", _encoded(base.convert("L"), "PNG"), "used", (64, 64))
    put("mode1.png", _encoded(base.convert("1"), "PNG"), "used", (64, 64))
    put("i16.png", _encoded(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16"), "PNG"), "used", (64, 64))
    put("i32.tiff", _encoded(Image.fromarray(rgb[..., 0].astype(np.int32) * 1000), "TIFF"), "used", (64, 64))
    put("f32.tiff", _encoded(Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0), "TIFF"), "used", (64, 64))
    put("rgb16.tiff", _encoded(base, "TIFF", compression="tiff_lzw"), "used", (64, 64))
    for n in (2, 3, 4, 5, 6, 7, 8):
        put(f"exif{n}.jpg", _with_orientation(n), "used", (64, 96) if n in (5, 6, 7, 8) else (96, 64))
    put("progressive.jpg", _encoded(base, "JPEG", progressive=True), "used", (64, 64))
    put("wide.png", _encoded(draw_shape((256, 64)), "PNG"), "used", (256, 64))
    put("tall.png", _encoded(draw_shape((64, 256)), "PNG"), "used", (64, 256))
    put("very-wide.png", _encoded(draw_shape((640, 64)), "PNG"), "used", (640, 64))
    put("UPPER.PNG", png, "used", (64, 64))
    put("jpeg.jpeg", jpg, "used", (64, 64))
    put("gamma-icc.png", _encoded(base, "PNG", icc_profile=b"\x00" * 128), "used", (64, 64))
    (d / "folder.png").mkdir()  # a folder named like an image: not a file, not listed
    cases["folder.png"] = ("ignored", None)
    (d / ".hidden.png").write_bytes(png)
    cases[".hidden.png"] = ("ignored", None)
    outside = root.parent / "outside.png"
    outside.write_bytes(png)
    (d / "link-out.png").symlink_to(outside)
    cases["link-out.png"] = ("skipped", "outside the data folder")
    (d / "link-in.png").symlink_to(d / "l.png")
    cases["link-in.png"] = ("used", (64, 64))
    (d / "nested").mkdir()
    (d / "nested" / "deep.png").write_bytes(png)
    cases["deep.png"] = ("used", (64, 64))
    return cases


def test_image_corpus_scans_to_the_expected_outcomes(tmp_path):
    cases = corpus(tmp_path / "data")
    assert sum(1 for o, _ in cases.values() if o != "ignored") >= 40
    report = scan_folder(tmp_path / "data", resolution=64, bucket_step=64)
    used = {Path(i.path).name: i.size for i in report.items}
    skipped = {p.name: why for p, why in report.skipped}
    for name, (outcome, detail) in cases.items():
        if outcome == "used":
            assert used.get(name) == detail, (name, used.get(name), skipped.get(name))
            pixels = np.asarray(load_rgb(next(Path(i.path) for i in report.items if Path(i.path).name == name)))
            assert pixels.shape[2] == 3 and pixels.max() > 150, name  # decodes to RGB with its white background
        elif outcome == "skipped":
            assert detail in skipped.get(name, ""), (name, skipped.get(name), used.get(name))
            assert any(name in w for w in report.warnings), name
        else:
            assert name not in used and name not in skipped, name
    assert len(used) + len(skipped) == sum(1 for o, _ in cases.values() if o != "ignored")


@pytest.mark.slow
def test_a_short_run_over_the_corpus_finishes_and_names_its_skips(tmp_path, caplog):
    cases = corpus(tmp_path / "data")
    with caplog.at_level("WARNING", logger="sdlora"):
        result = train(TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", steps=2, batch_size=2,
                                   data=DataConfig(data=tmp_path / "data", resolution=64),
                                   adapter=AdapterConfig(rank=4)))
    assert result.adapter.is_file()
    skipped = {n for n, (o, _) in cases.items() if o == "skipped"}
    named = {n for n in cases if f"skipped {tmp_path / 'data' / '1_odd' / n}:" in caplog.text}
    assert named == skipped, (named ^ skipped)


def test_a_file_that_becomes_unreadable_during_training_is_skipped_not_fatal(tmp_path, caplog):
    from sdlora.data.dataset import EpochPlan, TrainDataset

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        draw_shape((64, 64)).save(data / f"img{i}.png")
    cfg = DataConfig(data=data, resolution=64, flip=True)
    report = scan_folder(data, resolution=64, bucket_step=64)
    dataset = TrainDataset(report.items, cfg, seed=0)
    (data / "img1.png").write_bytes(b"gone")  # replaced after the scan
    slots = EpochPlan(report.items, 2, 1, 0).local_batches(0, 0)[0]
    with caplog.at_level("WARNING", logger="sdlora"):
        samples = [dataset[s] for s in slots] + [dataset[s] for s in slots]
    by_item = {Path(report.items[s.item].path).name: samples[k]["share"] for k, s in enumerate(slots)}
    assert by_item == {"img0.png": 0.5, "img1.png": 0.0}
    assert caplog.text.count(f"skipped {data / 'img1.png'} from here on: it can no longer be read") == 1
    result = train(TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", steps=2, batch_size=2,
                               data=DataConfig(data=data, resolution=64, flip=True), adapter=AdapterConfig(rank=4)))
    assert result.steps == 2  # (a run on the changed folder: the scan now skips it, and training goes on)
