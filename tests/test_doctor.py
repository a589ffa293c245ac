"""The dataset doctor: every problem of a folder made to have them is reported, no model is loaded, and the memory
estimate matches what a run measures."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from sdlora.cli import main

from conftest import draw_shape

ROOT = Path(__file__).resolve().parent.parent


def smooth(seed: int, size=(64, 64)) -> Image.Image:
    """A smooth random picture: unlike flat shapes on white, two seeds never look alike to a perceptual hash."""
    import numpy as np

    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR)


def problem_folder(root: Path) -> dict[str, str]:
    """A folder with one of each problem; returns the caption of each used image."""
    root.mkdir(parents=True)
    captions = {"a.png": "sks, red circle", "b.jpg": "sks, red circle", "e.png": "sks, blue square",
                "g.png": "sks, " + ", ".join(f"tag{i}" for i in range(80)), "h.png": "sks, wide", "s.png": "small one"}
    smooth(1).save(root / "a.png")
    smooth(1).save(root / "b.jpg", quality=85)  # the same picture re-encoded: a near-duplicate
    smooth(2).save(root / "c.png")  # no caption file
    smooth(3).save(root / "d.png")
    (root / "d.txt").write_text("")  # empty caption
    smooth(4).save(root / "e.png")
    (root / "e.caption").write_text("other words")  # beside e.txt: both exist
    smooth(5).save(root / "f.png")
    (root / "f.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8: skipped
    smooth(6).save(root / "g.png")  # a caption past 77 tokens
    smooth(7, (300, 64)).save(root / "h.png")  # wider than 4:1: cropped hard
    smooth(8, (48, 48)).save(root / "s.png")  # smaller than the resolution
    draw_shape((16, 16)).save(root / "t.png")  # smaller than a bucket step: skipped
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_text(text)
    return captions


def test_doctor_reports_each_known_problem_and_loads_no_model(tmp_path, capsys, monkeypatch):
    import sdlora.models

    def refuse(*a, **k):
        raise AssertionError("the doctor loaded a model")

    monkeypatch.setattr(sdlora.models, "load_base", refuse)
    captions = problem_folder(tmp_path / "data")
    sheet = tmp_path / "out" / "sheet.png"
    assert main(["doctor", str(tmp_path / "data"), "--base", "tiny-sd", "--resolution", "64", "--bucket-step", "32",
                 "--batch-size", "2", "--json", "--sheet", str(sheet)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"]["found"] == 10 and r["images"]["used"] == 8
    skipped = {Path(p).name: why for p, why in r["images"]["skipped"].items()}
    assert set(skipped) == {"f.png", "t.png"} and "not UTF-8" in skipped["f.png"] and "too small" in skipped["t.png"]
    assert r["captions"] == {"missing a caption file": ["c.png"], "with an empty caption": ["d.png"],
                             "with both .txt and .caption": ["e.png"], "not UTF-8 text": ["f.png"],
                             "longer than 77 tokens": ["g.png"]}
    assert r["tokens_estimated"] is False  # tiny-sd's own tokenizer counted them
    assert r["near_duplicates"] == [["a.png", "b.jpg"]]
    assert r["smaller_than_resolution"] == ["s.png"]
    assert r["buckets"] == {"128x32": 1, "32x32": 1, "64x64": 6}
    assert r["buckets_smaller_than_a_batch"] == ["32x32", "128x32"]
    assert r["worst_crops"][0]["image"] == "h.png" and r["worst_crops"][0]["cut"] > 0.1
    assert (r["samples_per_epoch"], r["batches_per_epoch"], r["steps_per_epoch"]) == (8, 5, 5)
    assert r["trigger"] == "sks" and r["trigger_coverage"] == pytest.approx(
        sum("sks" in c for c in captions.values()) / 8, abs=1e-3)
    assert r["tags"]["sks"] == 5 and r["tags"]["red circle"] == 2
    assert r["memory"]["total_bytes"] > 0 and "activations kept for the backward pass" in r["memory"]["parts"]
    with Image.open(sheet) as img:  # the contact sheet: the worst crops, a real PNG
        img.verify()
    assert r["contact_sheet"] == str(sheet)


def test_doctor_text_and_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    draw_shape((8, 8)).save(tmp_path / "empty" / "tiny.png")
    # the report, and the exit code train would give (a script checking before it trains sees it)
    assert main(["doctor", str(tmp_path / "empty"), "--base", "toy", "--output-dir", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert "1 images found, 0 used, 1 skipped" in out and "skipped tiny.png: too small" in out
    assert "resolution 32 px: the toy base's native size" in out
    assert f"no usable image in {tmp_path / 'empty'}: train would refuse it" in err
    assert main(["doctor", str(tmp_path / "empty"), "--base", "toyy"]) == 2
    assert "base model 'toyy' not found" in capsys.readouterr().err


def test_near_duplicates_are_copies_not_the_same_shape_in_another_colour(tmp_path):
    from PIL import ImageEnhance

    from sdlora.doctor import _near_duplicates

    smooth(1).save(tmp_path / "a.png")
    smooth(1, (48, 48)).save(tmp_path / "a-small.jpg", quality=80)  # resized and re-encoded: a copy
    ImageEnhance.Brightness(smooth(1)).enhance(1.05).save(tmp_path / "a-graded.png")  # lightly graded: a copy
    draw_shape((64, 64), colour=(255, 165, 0)).save(tmp_path / "orange.png")
    draw_shape((64, 64), colour=(0, 128, 0)).save(tmp_path / "green.png")  # same circle, another colour: not a copy
    groups = _near_duplicates(sorted(tmp_path.iterdir()))
    assert [sorted(g) for g in groups] == [["a-graded.png", "a-small.jpg", "a.png"]]


def test_a_run_started_inside_its_data_folder_does_not_train_on_its_own_outputs(tmp_path, capsys):
    """The default --output-dir is ./outputs: from inside the data folder, the samples, previews, loss plot and
    contact sheet a run writes would be counted as training images the next time."""
    root = tmp_path / "d"
    root.mkdir()
    for i in range(2):
        smooth(i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("sks")
    (root / "outputs" / "samples").mkdir(parents=True)
    smooth(9).save(root / "outputs" / "samples" / "x.png")
    smooth(9).save(root / "cache.png")
    (root / "cache").mkdir()
    smooth(9).save(root / "cache" / "y.png")
    args = ["doctor", str(root), "--base", "toy", "--output-dir", str(root / "outputs"), "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    assert "3 images found, 3 used" in capsys.readouterr().out  # 0.png, 1.png and cache.png (a file, not the folder)


def test_memory_estimate_is_within_30_percent_of_a_measured_run(tmp_path):
    """A short tiny-sd run in a child process at a size where activations dominate: its peak resident memory during
    the training steps, above what it held just before the first step, against the doctor's estimate. glibc is
    told to return freed blocks to the system (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors
    instead of the allocator's free lists."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from pathlib import Path
        from conftest import make_dataset
        import sdlora.train as T
        from sdlora.config import DataConfig, TrainConfig
        from sdlora.doctor import diagnose

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        def peak():  # the high-water mark since `before` reset it (not the process's lifetime peak, ru_maxrss)
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) * 1024

        data = make_dataset(Path({str(tmp_path)!r}) / "d", n=8, folder="", size=(128, 128))
        cfg = TrainConfig(base="tiny-sd", batch_size=8, steps=2, output_dir=Path({str(tmp_path)!r}) / "o",
                          data=DataConfig(data=data, resolution=128))
        marks = {{}}
        prepare, end = T._optimizer_and_prepare, T._end_of_step

        def prepared(*a, **k):
            out = prepare(*a, **k)
            marks["before"] = rss()
            with open("/proc/self/clear_refs", "w") as f:  # (a peak while loading or caching does not count)
                f.write("5")
            return out

        def ended(*a, **k):
            marks["peak"] = peak()
            return end(*a, **k)

        T._optimizer_and_prepare, T._end_of_step = prepared, ended
        T.train(cfg)
        print(json.dumps({{"measured": marks["peak"] - marks["before"], "estimate": diagnose(cfg).memory.total}}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured"] > 100e6  # activations dominate: the comparison means something
    assert abs(r["estimate"] - r["measured"]) <= 0.3 * r["measured"], r
