import random

import numpy as np
import pytest
from PIL import Image

from sdlora.config import DataConfig
from sdlora.data import CaptionRules, assign_bucket, bucket_list, make_caption, scan_folder
from sdlora.data.dataset import EpochPlan, Slot, TrainDataset, to_training_image
from sdlora.data.scan import load_rgb
from sdlora.errors import DataError

from conftest import draw_shape, make_dataset


def scan(root, **kw):
    opts = dict(resolution=64, bucket_step=32)
    opts.update(kw)
    return scan_folder(root, **opts)


def test_finds_every_extension_recursively_and_ignores_other_files(tmp_path):
    root = tmp_path / "d"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i, ext in enumerate([".png", ".jpg", ".jpeg", ".webp", ".bmp"]):
        folder = root if i < 2 else root / "sub" / "deeper"
        draw_shape().save(folder / f"a{i}{ext}")
    draw_shape().save(root / ".hidden" / "x.png")
    (root / "notes.md").write_text("not an image")
    report = scan(root)
    assert sorted(i.path.suffix for i in report.items) == [".bmp", ".jpeg", ".jpg", ".png", ".webp"]
    assert not report.skipped


def test_captions_txt_caption_and_bom(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    draw_shape().save(root / "a.png")
    (root / "a.txt").write_bytes("\ufeffa red circle\n\nsecond line".encode("utf-8"))
    draw_shape().save(root / "b.png")
    (root / "b.caption").write_text("a blue square", encoding="utf-8")
    caps = {i.path.name: i.caption for i in scan(root).items}
    assert caps == {"a.png": "a red circle", "b.png": "a blue square"}


def test_non_utf8_caption_skips_the_image_and_says_why(tmp_path):
    root = make_dataset(tmp_path / "d", n=2, folder="")
    (root / "img0.txt").write_bytes(b"caf\xe9 latte")
    report = scan(root)
    assert [i.path.name for i in report.items] == ["img1.png"]
    assert "img0.png" in report.warnings[0] and "not UTF-8" in report.warnings[0]


def test_missing_caption_uses_default_or_class_token_with_one_warning(tmp_path):
    root = make_dataset(tmp_path / "d", n=3, folder="3_sks dog", caption=None)
    report = scan(root)
    assert {i.caption for i in report.items} == {"sks dog"}
    assert len(report.warnings) == 1 and "3 image(s) have no caption" in report.warnings[0]
    report = scan(root, default_caption="a photo")
    assert {i.caption for i in report.items} == {"a photo"}


def test_kohya_repeats_and_tag_frequency(tmp_path):
    root = tmp_path / "d"
    make_dataset(root, n=2, folder="10_style", caption="sks, red, circle")
    make_dataset(root, n=1, folder="plain", caption="sks, blue")
    report = scan(root)
    reps = {i.path.parent.name: i.repeats for i in report.items}
    assert reps == {"10_style": 10, "plain": 1}
    assert report.samples_per_epoch == 21
    assert report.tag_frequency()["10_style"] == {"sks": 2, "red": 2, "circle": 2}
    from sdlora.config import TrainConfig
    from sdlora.doctor import diagnose

    doctor = diagnose(TrainConfig(batch_size=4, grad_accum=4, data=DataConfig(data=root, resolution=64, bucket_step=32)),
                      thorough=False)
    text = doctor.text()
    assert "3 images found, 3 used, 0 skipped" in text and "10_style: 2 images x 10 repeats" in text
    # 21 samples in batches of 4: 6 batches per epoch; with 4 micro-batches per step that is 2 optimizer steps
    assert "3 images x repeats = 21 samples per epoch: 6 batches of 4, 2 optimizer steps per epoch" in text


def test_trigger_goes_first_once(tmp_path):
    root = make_dataset(tmp_path / "d", n=1, folder="", caption="a red circle")
    assert scan(root, trigger="zzt").items[0].caption == "zzt, a red circle"
    (root / "img0.txt").write_text("zzt, a red circle")
    assert scan(root, trigger="zzt").items[0].caption == "zzt, a red circle"


def test_shuffle_keeps_leading_tags_and_trigger_first():
    rules = CaptionRules(trigger="zzt", shuffle_tags=True, keep_tags=1)
    seen = set()
    for seed in range(30):
        cap = make_caption("zzt, keepme, a, b, c, d", rules, random.Random(seed))
        tags = cap.split(", ")
        assert tags[:2] == ["zzt", "keepme"] and sorted(tags[2:]) == ["a", "b", "c", "d"]
        seen.add(cap)
    assert len(seen) > 5


def test_caption_dropout_rate():
    rules = CaptionRules(dropout=0.3)
    empties = sum(make_caption("a, b", rules, random.Random(s)) == "" for s in range(1000))
    assert 240 < empties < 360


def test_buckets_follow_aspect_and_never_upscale_by_default():
    assert all(b.width * b.height <= 512 * 512 and b.width % 64 == 0 for b in bucket_list(512, 64))
    wide = assign_bucket(2000, 1000, 512, 64, bucket=True, upscale=False)
    assert wide.width > wide.height and abs(wide.width / wide.height - 2) < 0.3
    small = assign_bucket(300, 200, 512, 64, bucket=True, upscale=False)
    assert small.width <= 300 and small.height <= 200
    assert assign_bucket(300, 200, 512, 64, bucket=True, upscale=True).width * 200 > 300 * 200 / 2
    assert assign_bucket(1000, 700, 512, 64, bucket=False, upscale=False) == (512, 512)
    assert assign_bucket(40, 40, 512, 64, bucket=True, upscale=False) is None


def test_exif_orientation_is_honoured(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    img.save(root / "r.jpg", exif=exif.tobytes(), quality=95)
    item = scan(root).items[0]
    assert item.size == (32, 64)
    arr = np.asarray(load_rgb(item.path))
    assert arr.shape == (64, 32, 3)
    assert arr[5, 16, 2] > 200 and arr[60, 16, 0] > 200  # blue went to the top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (16, 16, 48, 48))
    img = img.convert(mode)
    path = tmp_path / "t.png"
    if mode == "P":
        img = Image.new("P", (64, 64), 0)
        img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        img.paste(1, (16, 16, 48, 48))
        img.save(path, transparency=0)
    else:
        img.save(path)
    arr = np.asarray(load_rgb(path)).astype(int)
    assert arr.shape == (64, 64, 3)
    assert (arr[2, 2] == 255).all()  # transparent corner is white, not black
    assert arr[32, 32].sum() < 700  # the opaque square kept its colour


def test_cmyk_and_16_bit_convert_correctly(tmp_path):
    draw_shape(colour=(0, 0, 255)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    arr = np.asarray(load_rgb(tmp_path / "c.jpg")).astype(int)
    assert arr[32, 32, 2] > 200 and arr[32, 32, 0] < 60
    grey = np.full((64, 64), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    arr = np.asarray(load_rgb(tmp_path / "g.png")).astype(int)
    assert abs(arr[0, 0, 0] - 128) <= 1 and (arr[0, 0] == arr[0, 0, 0]).all()


def test_unusable_files_are_skipped_with_reason(tmp_path):
    root = make_dataset(tmp_path / "d", n=1, folder="")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    draw_shape((16, 16)).save(root / "tiny.png")
    report = scan(root)
    assert [i.path.name for i in report.items] == ["img0.png"]
    reasons = dict((p.name, r) for p, r in report.skipped)
    assert set(reasons) == {"broken.png", "truncated.png", "tiny.png"}
    assert "too small" in reasons["tiny.png"] and "decoded" in reasons["broken.png"]
    assert any("broken.png" in w for w in report.warnings)


def test_no_usable_image_fails_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable image in .*empty"):
        scan(tmp_path / "empty")
    with pytest.raises(DataError, match="data folder not found"):
        scan(tmp_path / "missing")


def test_crop_flip_and_sizes(tmp_path):
    root = make_dataset(tmp_path / "d", n=1, folder="", size=(128, 64))
    item = scan(root).items[0]
    # Buckets of area at most 64² in steps of 32: 32x128 ... 96x32, 128x32. A 2:1 image (log-aspect 0.69) goes to
    # 96x32 (3:1, distance 0.41), not 64x64 or 128x32 (distance 0.69 each).
    assert tuple(item.bucket) == (96, 32)
    pix, (top, left) = to_training_image(item, DataConfig(resolution=64, bucket_step=32), random.Random(0))
    assert pix.shape == (3, item.bucket.height, item.bucket.width) and pix.min() >= -1 and pix.max() <= 1
    sq = scan(root, bucket=False).items[0]
    pix, (top, left) = to_training_image(sq, DataConfig(resolution=64, bucket=False), random.Random(0))
    assert pix.shape == (3, 64, 64) and left == 32 and top == 0  # centre crop of the resized 128x64
    cfg = DataConfig(resolution=64, bucket=False, crop="random", flip=True)
    outs = {to_training_image(sq, cfg, random.Random(s))[1] for s in range(20)}
    assert len(outs) > 3  # random crops move
    half = Image.new("RGB", (64, 64), (255, 255, 255))
    half.paste((0, 0, 255), (0, 0, 32, 64))
    half.save(item.path)
    flips = [to_training_image(sq, DataConfig(resolution=64, bucket=False, flip=True), random.Random(s))[0]
             for s in range(10)]
    lefts = {round(float(f[0, :, :32].mean()), 3) for f in flips}
    assert len(lefts) == 2  # some uses flipped (blue on the right), some not


def test_epoch_plan_shards_a_global_batch_across_processes(tmp_path):
    report = scan(make_dataset(tmp_path / "d", n=4, folder="2_x"))
    one = EpochPlan(report.items, batch_size=2, num_processes=1, seed=1)
    two = EpochPlan(report.items, batch_size=1, num_processes=2, seed=1)
    for epoch in range(2):
        g = one.global_batches(epoch)
        assert [[s.slot for s in b] for b in g] == [[s.slot for s in b] for b in two.global_batches(epoch)]
        r0, r1 = two.local_batches(epoch, 0), two.local_batches(epoch, 1)
        assert [[s.slot for s in a + b] for a, b in zip(r0, r1, strict=True)] == [[s.slot for s in b] for b in g]
        assert {s.share for b in r0 + r1 for s in b} == {1.0}  # 2 processes x 1/2 of a batch of 2
    assert {s.slot for b in one.global_batches(0) for s in b} == set(range(8))
    assert {s.share for b in one.local_batches(0, 0) for s in b} == {0.5}  # one process: the batch mean


@pytest.mark.parametrize("samples, processes, batch", [(3, 2, 2), (5, 2, 2), (1, 2, 1), (2, 3, 1), (7, 3, 2)])
def test_a_ragged_last_batch_counts_each_sample_once_as_one_process_would(tmp_path, samples, processes, batch):
    """Each step's loss, summed over processes with DDP's averaging (x 1/N), is the mean over the global batch:
    every sample weighs 1/n, none is repeated, and a process left without a sample weighs nothing."""
    report = scan(make_dataset(tmp_path / "d", n=samples, folder=""))
    plan = EpochPlan(report.items, batch_size=batch, num_processes=processes, seed=1)
    single = EpochPlan(report.items, batch_size=batch * processes, num_processes=1, seed=1)
    assert plan.batches_per_epoch == single.batches_per_epoch
    parts = [plan.local_batches(0, r) for r in range(processes)]
    for i, g in enumerate(single.global_batches(0)):
        weights = {}
        for r in range(processes):
            assert parts[r][i], "every process takes part in every step"
            for s in parts[r][i]:
                weights[s.slot] = weights.get(s.slot, 0.0) + s.share / processes
        assert {k: v for k, v in weights.items() if v} == pytest.approx({s.slot: 1 / len(g) for s in g})


def test_dataset_is_deterministic_per_slot(tmp_path):
    report = scan(make_dataset(tmp_path / "d", n=2, folder=""))
    cfg = DataConfig(resolution=64, bucket_step=32, shuffle_tags=True, flip=True)
    ds = TrainDataset(report.items, cfg, seed=3)
    a, b = ds[Slot(0, 7, 0)], ds[Slot(0, 7, 0)]
    assert a["caption"] == b["caption"] and (a["pixels"] == b["pixels"]).all()


def test_the_tag_every_caption_shares_is_the_trigger_when_none_is_given(tmp_path):
    root = make_dataset(tmp_path / "a", n=3, folder="", caption="rimstyle, a red circle, white background")
    (root / "img1.txt").write_text("rimstyle, a blue square, white background", encoding="utf-8")
    assert scan(root).trigger_words() == ["rimstyle"]  # "white background" is shared too, but no single word
    plain = make_dataset(tmp_path / "b", n=2, folder="", caption="a red circle, white background")
    assert scan(plain).trigger_words() == []


def test_regularisation_images_fill_half_of_each_epoch_in_turn_without_the_trigger(tmp_path):
    """kohya's reg_data_dir: as many regularisation samples per epoch as training samples, taken in turn so that
    over the epochs every regularisation image is used; their captions never get the trigger."""
    train_items = scan(make_dataset(tmp_path / "t", n=2, folder="2_sks"), trigger="sks").items  # 4 samples
    reg_items = scan_folder(make_dataset(tmp_path / "r", n=3, folder="1_circle", caption="a circle"), resolution=64,
                            bucket_step=32, reg=True).items
    items = train_items + reg_items
    plan = EpochPlan(items, batch_size=2, num_processes=1, seed=0)
    assert plan.samples == 8
    used = []
    for epoch in range(3):
        slots = [s for b in plan.global_batches(epoch) for s in b]
        assert sorted(s.slot for s in slots) == list(range(epoch * 8, epoch * 8 + 8))  # unique ids
        reg = [s.item for s in slots if items[s.item].reg]
        assert len(reg) == 4 and sum(not items[s.item].reg for s in slots) == 4
        used += reg
    assert set(used) == {2, 3, 4}  # all three regularisation images, in turn
    ds = TrainDataset(items, DataConfig(resolution=64, bucket_step=32, trigger="sks"), seed=0, prior_loss_weight=0.5)
    assert ds.caption(Slot(0, 0, 0)).startswith("sks") and ds.caption(Slot(2, 1, 0)) == "a circle"
    assert ds[Slot(2, 1, 0, share=0.5)]["share"] == 0.25 and ds[Slot(0, 0, 0, share=0.5)]["share"] == 0.5
