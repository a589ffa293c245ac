"""The blend engine: arithmetic, exact vs fast, exact restore, cache, prompt tags, recipes, grids, CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.engine import BlendItem, Engine, Params, parse_prompt
from sdlora.errors import ConfigError, FormatError
from sdlora.grid import Axis, xy_grid
from sdlora.lorafile import read_lora
from sdlora.recipe import a1111_parameters, parse_parameters, read_png_parameters, save_png

from test_formats import write_adapter


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    write_adapter(d, "tiny-sd", "kohya", True, seed=1, stem="alpha", alpha=4.0)
    write_adapter(d, "tiny-sd", "kohya", True, preset="full", seed=2, stem="beta", alpha=2.0)
    write_adapter(d, "tiny-sdxl", "kohya", True, seed=3, stem="xl")
    return d


@pytest.fixture
def engine(library):
    return Engine("tiny-sd", library)


PARAMS = dict(prompt="a red circle", seed=3, steps=3, width=64, height=64, cfg_scale=5.0, scheduler="Euler")


def image(engine, blend=(), mode="exact", **kw):
    return np.asarray(engine.generate(Params(**{**PARAMS, **kw}), list(blend), mode).images[0], dtype=np.float32)


def weights(engine):
    """The base weights (peft's wrappers, present after exact mode, are looked through)."""
    return {c: {k.replace(".base_layer.", "."): v.clone() for k, v in m.state_dict().items() if ".lora_" not in k}
            for c, m in engine.base.modules().items()}


def test_fast_merge_is_the_hand_computed_sum(engine, library):
    before = weights(engine)
    blend = [BlendItem("alpha", unet=0.7, te=0.3), BlendItem("beta", unet=-0.5)]
    engine.apply([BlendItem("alpha", unet=-1.0, te=2.0), BlendItem("beta", unet=1.3)], "fast")
    engine.apply(blend, "fast")  # same LoRAs, new weights: updated in place
    after = weights(engine)
    files = {"alpha": read_lora(library / "alpha.safetensors"), "beta": read_lora(library / "beta.safetensors")}
    expected = {c: {k: v.clone() for k, v in sd.items()} for c, sd in before.items()}
    for item in blend:
        for name, m in files[item.name].modules.items():
            comp = "unet" if name.startswith("lora_unet") else "text_encoder"
            path = engine._fits[next(k for k in engine._fits if item.name in k[0])].targets
            target = next(t for t in path if t.module.name == name)
            up, down = m.tensors["up"].float(), m.tensors["down"].float()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * m.alpha / m.rank
            w = item.unet if comp == "unet" else item.te_weight
            expected[comp][f"{target.path}.weight"] += w * delta
    for comp in ("unet", "text_encoder"):
        for k in before[comp]:
            assert torch.allclose(after[comp][k], expected[comp][k], atol=1e-5), k


def test_half_precision_fast_blend_does_not_drift_as_sliders_move(library):
    """In fp16 each in-place add rounds; after many moves the blend must still be base + sum(w * delta), rounded once."""
    e = Engine("tiny-sd", library, dtype=torch.float16)
    base = weights(e)
    for w in [0.35, -1.3, 0.9, 1.7, -0.45, 1.1, 0.05, 1.9, -1.6] * 4 + [0.5]:
        e.apply([BlendItem("alpha", unet=w, te=w / 2), BlendItem("beta", unet=0.75)], "fast")
    final = [BlendItem("alpha", unet=0.6, te=0.0), BlendItem("beta", unet=0.75)]
    e.apply(final, "fast")
    after = weights(e)
    expected = {c: {k: v.float() for k, v in sd.items()} for c, sd in base.items()}
    for item in final:
        for t in e._fits[next(k for k in e._fits if item.name in k[0])].targets:
            w = item.unet if t.component == "unet" else item.te_weight
            key = f"{t.path}.weight"
            expected[t.component][key] += w * t.module.delta(tuple(expected[t.component][key].shape))
    moved = 0
    for comp in ("unet", "text_encoder"):
        for k, v in after[comp].items():
            assert torch.equal(v, expected[comp][k].half()), k
            moved += not torch.equal(v, base[comp][k])
    assert moved > 0
    e.clear()
    assert all(torch.equal(weights(e)[c][k], base[c][k]) for c in base for k in base[c])


def test_exact_and_fast_agree_and_clear_restores_bit_exactly(engine):
    base_img = image(engine)
    before = weights(engine)
    blend = [BlendItem("alpha", unet=0.8, te=0.4), BlendItem("beta", unet=-0.6)]
    exact, fast = image(engine, blend, "exact"), image(engine, blend, "fast")
    assert np.abs(exact - base_img).max() > 1  # the blend does something (uint8 scale)
    e = np.asarray(engine.generate(Params(**PARAMS), blend, "exact").images[0], dtype=np.float32)
    assert np.abs(e - exact).max() == 0
    # Compare in [0,1] units: the same image within 1e-4 would mean at most 1 step of 255 after rounding.
    assert np.abs(exact - fast).max() <= 1.0
    engine.clear()
    after = weights(engine)
    assert all(torch.equal(before[c][k], after[c][k]) for c in before for k in before[c])
    assert np.array_equal(image(engine), base_img)


def test_exact_vs_fast_latents_within_1e4(engine):
    blend = [BlendItem("alpha", unet=0.8, te=0.4), BlendItem("beta", unet=-0.6)]
    outs = {}
    for mode in ("exact", "fast"):
        outs[mode] = engine.generate(Params(**PARAMS), blend, mode)
        engine.pipe.set_progress_bar_config(disable=True)
    a = torch.tensor(np.asarray(outs["exact"].images[0], dtype=np.float32) / 255)
    b = torch.tensor(np.asarray(outs["fast"].images[0], dtype=np.float32) / 255)
    latents = {}
    for mode in ("exact", "fast"):
        engine.apply(blend, mode)
        latents[mode] = engine.pipe(PARAMS["prompt"], num_inference_steps=3, width=64, height=64, guidance_scale=5.0,
                                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert (latents["exact"] - latents["fast"]).abs().max() < 1e-4
    assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_weight_change_reloads_nothing_and_a_changed_file_is_reread(engine, library):
    engine.apply([BlendItem("alpha", 1.0)], "exact")
    reads = engine.file_reads
    for w in (0.2, -1.0, 1.5):
        engine.apply([BlendItem("alpha", w)], "exact")
        engine.apply([BlendItem("alpha", w)], "fast")
    assert engine.file_reads == reads
    import os

    p = library / "alpha.safetensors"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    engine.apply([BlendItem("alpha", 1.0)], "fast")
    assert engine.file_reads == reads + 1


@pytest.mark.parametrize("prompt, text, items", [
    ("a cat <lora:alpha:0.5>", "a cat", [BlendItem("alpha", 0.5)]),
    ("<lora:alpha:0.2:0.9>, a cat, <lora:beta>", "a cat", [BlendItem("alpha", unet=0.9, te=0.2), BlendItem("beta", 1.0)]),
    ("a <lora:x y:-1> dog", "a dog", [BlendItem("x y", -1.0)]),
    ("plain", "plain", []),
    # A1111's named arguments; the UNet weight defaults to the text encoder's
    ("<lora:alpha:te=0.5:unet=1> a cat", "a cat", [BlendItem("alpha", unet=1.0, te=0.5)]),
    ("a cat <lora:alpha:unet=0.3>", "a cat", [BlendItem("alpha", unet=0.3, te=1.0)]),
    ("a cat <lora:alpha:te=0.4>", "a cat", [BlendItem("alpha", 0.4)]),
    ("a cat <lora:alpha:0.2:unet=0.9>", "a cat", [BlendItem("alpha", unet=0.9, te=0.2)]),
])
def test_prompt_tags(prompt, text, items):
    assert parse_prompt(prompt) == (text, items)


def test_prompt_tags_dyn_is_taken_out_with_a_warning_and_bad_tags_are_refused(caplog):
    with caplog.at_level("WARNING", logger="sdlora"):
        assert parse_prompt("a cat <lora:alpha:0.7:dyn=8>") == ("a cat", [BlendItem("alpha", 0.7)])
        assert parse_prompt("a cat <lora:alpha:0.7:0.6:8>") == ("a cat", [BlendItem("alpha", unet=0.6, te=0.7)])
    assert caplog.text.count("is not supported") == 2
    for bad, why in (("<lora:alpha:strong>", "must be numbers"), ("<lora:alpha:bogus=1>", "unknown argument bogus"),
                     ("<lora::1>", "write <lora:NAME:WEIGHT>"), ("<lora:a:1:1:1:1>", "write <lora:NAME:WEIGHT>")):
        with pytest.raises(ConfigError, match=why):
            parse_prompt(f"a cat {bad}")


def test_prompt_tag_parsing_is_linear():
    """A hostile prompt (a recipe read from an uploaded PNG) must not stall the server: the old pattern took
    quadratic time on long digit runs."""
    import time

    hostile = "<lora:a:" + "1" * 50_000 + "x " + "<lora:" * 5_000
    started = time.perf_counter()
    assert parse_prompt(hostile)[1] == []
    assert time.perf_counter() - started < 2.0  # linear: milliseconds; the old pattern took minutes here


def test_tags_count_toward_the_blend_limit(engine):
    engine.max_loras = 1
    try:
        with pytest.raises(ConfigError, match="2 LoRAs in one blend"):
            engine.generate(Params(**{**PARAMS, "prompt": "a red circle <lora:beta:0.5>"}), [BlendItem("alpha", 0.5)])
    finally:
        engine.max_loras = None


def test_prompt_tags_drive_the_blend_and_are_removed(engine):
    tagged = image(engine, prompt="a red circle <lora:alpha:0.7>")
    explicit = image(engine, [BlendItem("alpha", 0.7)])
    assert np.array_equal(tagged, explicit)
    result = engine.generate(Params(**{**PARAMS, "prompt": "a red circle <lora:alpha:0.7>"}))
    assert result.infotexts[0].startswith("a red circle <lora:alpha:0.7>\n")


def test_out_of_range_and_unknown_and_foreign_loras_are_refused(engine):
    with pytest.raises(ConfigError, match="outside"):
        BlendItem("alpha", 2.5)
    with pytest.raises(ConfigError, match="unknown LoRA 'nope'"):
        engine.generate(Params(**PARAMS), [BlendItem("nope")])
    assert not engine.library.entries["xl"].compatible
    with pytest.raises(FormatError, match="made for sdxl"):
        engine.generate(Params(**PARAMS), [BlendItem("xl")])
    for bad in (dict(width=65), dict(steps=0), dict(cfg_scale=99), dict(scheduler="Magic"), dict(batch_size=50)):
        with pytest.raises(ConfigError):
            engine.generate(Params(**{**PARAMS, **bad}))


def test_recipe_round_trip(engine, library, tmp_path):
    result = engine.generate(Params(**{**PARAMS, "negative_prompt": "blurry, dark", "scheduler": "DPM++ 2M Karras",
                                       "seed": 1234}), [BlendItem("alpha", 0.6), BlendItem("beta", 0.3, te=0.1)])
    path = save_png(result.images[0], tmp_path / "x.png", result.infotexts[0])
    p = read_png_parameters(path)
    assert p["prompt"] == "a red circle <lora:alpha:0.6> <lora:beta:0.1:0.3>"
    assert p["negative_prompt"] == "blurry, dark" and p["Seed"] == "1234" and p["Steps"] == "3"
    assert p["Sampler"] == "DPM++ 2M Karras" and p["CFG scale"] == "5" and p["Size"] == "64x64"
    hashes = dict(h.split(": ") for h in p["Lora hashes"].split(", "))
    from sdlora.convert import info

    assert hashes == {n: info(library / f"{n}.safetensors")["short_hash"] for n in ("alpha", "beta")}
    with pytest.raises(FormatError):
        parse_parameters("just a prompt")
    plain = a1111_parameters("a cat", "", 20, "Euler a", 7.0, 5, 512, 512, "m", {})
    assert plain == "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Model: m"  # as A1111
    assert parse_parameters(plain)["negative_prompt"] == "" and parse_parameters(plain)["prompt"] == "a cat"


def test_seed_batch_and_random_seed(engine):
    r = engine.generate(Params(**{**PARAMS, "seed": 10, "batch_size": 2, "batch_count": 2}))
    assert r.seeds == [10, 11, 12, 13] and len(r.images) == 4
    assert [f"Seed: {s}," in t for s, t in zip(r.seeds, r.infotexts, strict=True)] == [True] * 4
    single = engine.generate(Params(**{**PARAMS, "seed": 12}))
    # Each image has its own generator, so image 3 of the run is seed 12's image (batched maths may round apart).
    diff = np.abs(np.asarray(single.images[0], dtype=int) - np.asarray(r.images[2], dtype=int))
    assert diff.max() <= 2
    rnd = engine.generate(Params(**{**PARAMS, "seed": -1}))
    assert 0 <= rnd.seeds[0] < 2**32


def test_render_draws_many_prompts_in_one_call_as_generate_would(engine):
    blend = [BlendItem("alpha", 0.8)]
    drawn = engine.render(["a red circle", "a blue square"], [4, 9], Params(**PARAMS), blend, "fast")
    for img, (prompt, seed) in zip(drawn, [("a red circle", 4), ("a blue square", 9)], strict=True):
        one = engine.generate(Params(**{**PARAMS, "prompt": prompt, "seed": seed}), blend, "fast").images[0]
        assert np.abs(np.asarray(one, dtype=int) - np.asarray(img, dtype=int)).max() <= 2
    assert np.abs(np.asarray(drawn[0], dtype=int) - np.asarray(drawn[1], dtype=int)).mean() > 1
    with pytest.raises(ConfigError, match="one seed per prompt"):
        engine.render(["a", "b"], [1], Params(**PARAMS))


def test_size_defaults_to_the_bases_native_size(engine):
    assert engine.native_size == 64  # tiny-sd: UNet sample size 16 x VAE scale 4
    r = engine.generate(Params(prompt="a red circle", seed=1, steps=2, scheduler="Euler"))
    assert r.images[0].size == (64, 64) and "Size: 64x64," in r.infotexts[0]
    r = engine.generate(Params(prompt="a red circle", seed=1, steps=2, width=32, scheduler="Euler"))
    assert r.images[0].size == (32, 64)


def test_xy_grid(engine):
    grid, texts = xy_grid(engine, Params(**PARAMS), [BlendItem("beta", 0.5)], Axis("lora", [0, 0.5, 1], lora="alpha"),
                          Axis("seed", [1, 2]))
    assert grid.size == (110 + 3 * 64, 24 + 2 * 64)
    assert len(texts) == 6 and "<lora:alpha:0.5>" in texts[1] and "Seed: 2," in texts[3]
    arr = np.asarray(grid)
    assert (arr[:20, 110:] < 128).any() and (arr[24:, :100] < 128).any()  # the labels were drawn
    with pytest.raises(ConfigError, match="both axes vary"):  # rows labelled by a weight the columns overwrite
        xy_grid(engine, Params(**PARAMS), [], Axis("lora", [0, 1], lora="alpha"), Axis("lora", [0, 1], lora="alpha"))


def test_loha_generates(library, tmp_path):
    d = tmp_path / "ly"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    save_file({f"{q}.hada_w1_a": torch.randn(32, 2, generator=g), f"{q}.hada_w1_b": torch.randn(2, 32, generator=g),
               f"{q}.hada_w2_a": torch.randn(32, 2, generator=g), f"{q}.hada_w2_b": torch.randn(2, 32, generator=g),
               f"{q}.alpha": torch.tensor(2.0)}, str(d / "ha.safetensors"))
    e = Engine("tiny-sd", d)
    base = image(e)
    assert np.abs(image(e, [BlendItem("ha", 1.0)]) - base).max() > 1
    e.clear()
    assert np.array_equal(image(e), base)


def test_a_partly_matching_lora_is_applied_where_it_fits_and_says_so(tmp_path, caplog):
    g = torch.Generator().manual_seed(1)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    tensors = {}
    for name in (q, "lora_unet_down_blocks_9_attentions_0_proj_in"):  # the second is no layer of tiny-sd
        tensors |= {f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
                    f"{name}.lora_up.weight": torch.randn(32, 2, generator=g), f"{name}.alpha": torch.tensor(2.0)}
    d = tmp_path / "part"
    d.mkdir()
    save_file(tensors, str(d / "part.safetensors"))
    e = Engine("tiny-sd", d)
    base = image(e)
    with caplog.at_level("WARNING", logger="sdlora"):
        for mode in ("fast", "exact"):
            assert np.abs(image(e, [BlendItem("part", 1.0)], mode) - base).max() > 1
    assert "1 modules matched, 1 did not; first unmatched: lora_unet_down_blocks_9_attentions_0_proj_in" in caplog.text


def test_cli_generate_with_two_trained_loras(tmp_path, dataset, capsys):
    for name, lr in (("one", "1e-2"), ("two", "5e-3")):
        assert main(["-q", "train", "--data", str(dataset), "--resolution", "64", "--steps", "3", "--lr", lr,
                     "--output-dir", str(tmp_path / "loras"), "--name", name, "--train-text-encoder"]) == 0
    out = tmp_path / "img.png"
    assert main(["-q", "generate", "--base", "tiny-sd", "--lora", f"{tmp_path / 'loras' / 'one.safetensors'}:0.8",
                 "--lora", f"{tmp_path / 'loras' / 'two.safetensors'}:0.5:1.2", "--prompt", "sks, a circle",
                 "--width", "64", "--height", "64", "--steps", "3", "--seed", "7", "--out", str(out)]) == 0
    p = read_png_parameters(out)
    assert p["prompt"] == "sks, a circle <lora:one:0.8> <lora:two:0.5:1.2>" and p["Seed"] == "7"
    assert set(dict(h.split(": ") for h in p["Lora hashes"].split(", "))) == {"one", "two"}
    plain = tmp_path / "plain.png"
    assert main(["-q", "generate", "--base", "tiny-sd", "--prompt", "sks, a circle", "--width", "64", "--height", "64",
                 "--steps", "3", "--seed", "7", "--out", str(plain)]) == 0
    with Image.open(out) as a, Image.open(plain) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    before = plain.read_bytes()
    again = ["-q", "generate", "--base", "tiny-sd", "--prompt", "a square", "--width", "64", "--height", "64",
             "--steps", "2", "--seed", "8", "--out", str(plain)]
    assert main(again) == 2 and plain.read_bytes() == before  # an existing image is never replaced unasked
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0 and plain.read_bytes() != before


def test_live_adapters_are_bounded(engine, monkeypatch):
    import sdlora.engine as eng

    monkeypatch.setattr(eng, "MAX_LIVE_ADAPTERS", 1)
    first = image(engine, [BlendItem("alpha", 0.9)])
    image(engine, [BlendItem("beta", 0.9)])
    assert len(engine._adapters) == 1
    reads = engine.file_reads
    assert np.array_equal(image(engine, [BlendItem("alpha", 0.9)]), first)  # reloaded from memory, same image
    assert engine.file_reads == reads


def test_listing_reads_headers_only_and_applying_reads_each_file_once(library, monkeypatch):
    """The library lists from headers; a LoRA's tensors and its hash come from one read, when it is first used."""
    import sdlora.lorafile as lorafile

    reads = []
    full_read = lorafile.read_safetensors_bytes
    monkeypatch.setattr(lorafile, "read_safetensors_bytes", lambda p, **kw: reads.append(p) or full_read(p, **kw))
    e = Engine("tiny-sd", library)
    assert reads == [] and {"alpha", "beta", "xl"} <= set(e.library.entries)
    assert e.library.entries["beta"].rank == 4 and e.library.entries["xl"].family == "sdxl"
    for mode in ("exact", "fast", "exact"):
        r = e.generate(Params(**PARAMS), [BlendItem("alpha", 0.5), BlendItem("beta", 0.5)], mode)
    assert sorted(p.name for p in reads) == ["alpha.safetensors", "beta.safetensors"]
    assert e.short_hash("alpha") in r.infotexts[0]
    e.library.rescan()  # nothing changed: no file is read again, not even its header's tensors
    assert len(reads) == 2


def test_changed_and_removed_files_are_let_go(tmp_path):
    import os
    import shutil

    from test_formats import write_adapter

    write_adapter(tmp_path, "tiny-sd", "kohya", True, seed=1, stem="one")
    write_adapter(tmp_path, "tiny-sd", "kohya", True, seed=2, stem="two")
    e = Engine("tiny-sd", tmp_path)
    e.apply([BlendItem("one"), BlendItem("two")], "fast")
    assert len(e._files) == 2
    shutil.copy(tmp_path / "two.safetensors", tmp_path / "one.safetensors")  # a new version of "one"
    st = (tmp_path / "one.safetensors").stat()
    os.utime(tmp_path / "one.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    e.library.rescan()
    e.apply([BlendItem("one")], "fast")
    assert len(e._files) == 2 and sum(k[0].endswith("one.safetensors") for k in e._files) == 1
    (tmp_path / "two.safetensors").unlink()
    e.rescan()
    assert [k[0] for k in e._files] == [str((tmp_path / "one.safetensors").resolve())]
    assert "two" not in e.library.entries
    (tmp_path / "one.safetensors").unlink()
    with pytest.raises(ConfigError, match="is gone"):
        e.apply([BlendItem("one", 0.5)], "fast")


def test_fast_mode_computes_on_the_weights_device_and_clear_lets_the_backups_go(engine, monkeypatch):
    import sdlora.lorafile as lorafile

    devices = []
    delta = lorafile.FileModule.delta
    monkeypatch.setattr(lorafile.FileModule, "delta",
                        lambda self, shape, device=None, base=None: devices.append(device)
                        or delta(self, shape, device, base))
    engine.apply([BlendItem("alpha", 0.8), BlendItem("beta", -0.4)], "fast")
    weight_devices = {p.device for p in engine.base.unet.parameters()}
    assert devices and set(devices) == weight_devices  # never None: the arithmetic runs where the weights live
    assert engine._backup and all(b.device.type == "cpu" for b in engine._backup.values())
    engine.clear()
    assert engine._backup == {}


def test_recipes_are_parsed_in_linear_time_and_huge_ones_refused():
    import time

    from sdlora.recipe import MAX_PARAMETERS

    settings = 'Steps: 3, Sampler: Euler, Lora hashes: "a: 1, b: 2", Note: "esc \\" aped", Seed: 9'
    p = parse_parameters("a cat\n" + settings)
    assert p["Lora hashes"] == "a: 1, b: 2" and p["Seed"] == "9" and p["Note"] == 'esc \\" aped'
    # Shapes that made the old key/value pattern backtrack: long runs of words without a colon, unclosed quotes.
    for tail in ("a a" * 20_000, 'Key: "' + "x" * 60_000, "k" * 60_000 + ":"):
        text = ("x\nSteps: 3, " + tail)[:MAX_PARAMETERS]
        started = time.perf_counter()
        assert parse_parameters(text)["Steps"] == "3"
        assert time.perf_counter() - started < 1.0  # one pass: milliseconds (the old pattern: minutes)
    with pytest.raises(FormatError, match="at most 65,536"):
        parse_parameters("x\nSteps: 3, " + "a" * MAX_PARAMETERS)


def test_loras_sharing_a_file_name_each_get_a_name_none_hidden(library, tmp_path, capsys):
    """Two runs named alike (the default name is the data folder's) or two subfolders holding one name: each
    file is listed (the folder scan used to keep the first and drop the rest), and the CLI blends both."""
    import shutil

    from sdlora.cli import main
    from sdlora.engine import LoraLibrary

    for sub, source in (("styles", "alpha"), ("chars", "beta")):
        (tmp_path / "lib" / sub).mkdir(parents=True)
        shutil.copy(library / f"{source}.safetensors", tmp_path / "lib" / sub / "rim.safetensors")
    shutil.copy(library / "alpha.safetensors", tmp_path / "lib" / "solo.safetensors")
    listed = LoraLibrary(tmp_path / "lib", "sd1")
    assert sorted(listed.entries) == ["chars/rim", "solo", "styles/rim"]
    given = LoraLibrary(None, "sd1", [tmp_path / "lib" / "styles" / "rim.safetensors",
                                      tmp_path / "lib" / "chars" / "rim.safetensors",
                                      tmp_path / "lib" / "styles" / "rim.safetensors"])  # (the same file twice)
    assert sorted(given.entries) == ["chars/rim", "rim"]
    assert given.name_of(tmp_path / "lib" / "chars" / "rim.safetensors") == "chars/rim"
    (tmp_path / "lib" / "chars" / "rim.safetensors").unlink()  # deleted while the studio runs: it leaves, quietly
    given.rescan()
    assert sorted(given.entries) == ["rim"]
    with pytest.raises(ConfigError, match="LoRA file not found"):  # (given missing at the start: an error)
        LoraLibrary(None, "sd1", [tmp_path / "lib" / "chars" / "rim.safetensors"])
    shutil.copy(library / "beta.safetensors", tmp_path / "lib" / "chars" / "rim.safetensors")
    out = tmp_path / "both.png"
    assert main(["generate", "--prompt", "x", "--steps", "2", "--seed", "1", "--out", str(out),
                 "--lora", f"{tmp_path / 'lib' / 'styles' / 'rim.safetensors'}:0.5",
                 "--lora", f"{tmp_path / 'lib' / 'chars' / 'rim.safetensors'}:0.7"]) == 0
    from sdlora.recipe import read_png_parameters

    assert "<lora:rim:0.5> <lora:chars/rim:0.7>" in read_png_parameters(out)["prompt"]
