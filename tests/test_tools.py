"""The LoRA workshop: merge, resize, extract and analyze against what they must equal."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sdlora import lora
from sdlora.cli import main
from sdlora.engine import BlendItem, Engine
from sdlora.errors import FormatError
from sdlora.lorafile import fit, read_lora
from sdlora.models import build_tiny
from sdlora.tools.analyze import analyze, phi
from sdlora.tools.extract import extract
from sdlora.tools.merge import Item, merge, write_merge
from sdlora.tools.resize import resize, write_resize

from test_formats import write_adapter


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("workshop")
    write_adapter(d, "tiny-sd", "kohya", True, preset="full", precision="fp32", alpha=2.0, seed=1, stem="a")
    write_adapter(d, "tiny-sd", "diffusers", False, preset="attn", precision="fp32", alpha=8.0, seed=2, stem="b")
    return d


def deltas(path, base="tiny-sd"):
    """{(component, path): ΔW} as sdlora's reader computes it (its arithmetic is tested against diffusers)."""
    b = build_tiny(base)
    return {(t.component, t.path): t.module.delta(tuple(t.layer.weight.shape))
            for t in fit(read_lora(path), b.modules(), b.family).targets}


def merged_weights(folder, blend):
    engine = Engine("tiny-sd", folder)
    engine.apply(blend, "fast")
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in engine.base.modules().items()}


def test_merge_without_rank_is_the_studios_blend(loras, tmp_path):
    items = [Item(loras / "a.safetensors", unet=0.6, te=0.3), Item(loras / "b.safetensors", unet=-0.4)]
    result = merge(items, base="tiny-sd")
    assert result.errors == {}
    out = write_merge(result, tmp_path / "ab.safetensors")
    (tmp_path / "a.safetensors").write_bytes((loras / "a.safetensors").read_bytes())
    (tmp_path / "b.safetensors").write_bytes((loras / "b.safetensors").read_bytes())
    bare = merged_weights(tmp_path, [])
    blended = merged_weights(tmp_path, [BlendItem("a", unet=0.6, te=0.3), BlendItem("b", unet=-0.4)])
    single = merged_weights(tmp_path, [BlendItem(out.stem, 1.0)])
    moved = 0
    for c in blended:
        for k in blended[c]:
            assert torch.allclose(blended[c][k], single[c][k], atol=1e-6), (c, k)
            moved += not torch.equal(blended[c][k], bare[c][k])
    assert moved > 20  # the UNet's attention, convolutions and the text encoder all moved
    meta = read_lora(out).metadata
    sources = json.loads(meta["sdlora_merged_from"])
    assert [s["file"] for s in sources] == ["a.safetensors", "b.safetensors"]
    assert sources[0]["short_hash"] == read_lora(loras / "a.safetensors").sha256[:12] and sources[1]["unet"] == -0.4
    assert meta["sdlora_merge_rank"] == "concatenated (exact)"


def test_merge_at_the_summed_rank_is_lossless_and_lower_ranks_report_their_error(loras, tmp_path):
    items = [Item(loras / "a.safetensors", 0.7), Item(loras / "b.safetensors", 0.5)]
    exact = merge(items, base="tiny-sd")
    want = {(u.component, u.path): u.delta() for u in exact.updates}
    full = merge(items, rank=8, base="tiny-sd")  # 4 + 4: every module's sum has rank at most 8
    for u in full.updates:
        assert torch.allclose(u.delta(), want[(u.component, u.path)], atol=1e-5)
    assert max(full.errors.values()) < 1e-5
    low = merge(items, rank=2, base="tiny-sd")
    assert all(u.rank == 2 for u in low.updates) and 0 < min(low.errors.values()) < 1


def test_resize_keeps_exactly_the_top_singular_directions(loras, tmp_path):
    source = deltas(loras / "a.safetensors")
    full = resize(loras / "a.safetensors", rank=4, base="tiny-sd")
    for u in full.updates:
        assert torch.allclose(u.delta(), source[(u.component, u.path)], atol=1e-5)
    low = resize(loras / "a.safetensors", rank=2, base="tiny-sd")
    out = write_resize(low, tmp_path / "a2.safetensors")
    written = deltas(out)
    for u in low.updates:
        d = source[(u.component, u.path)].flatten(1)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        got = written[(u.component, u.path)].flatten(1)
        assert torch.allclose(got, best, atol=1e-5), (u.component, u.path)  # Eckart-Young, nothing else
        assert u.scale == pytest.approx(0.5)  # alpha 2 / rank 4 kept: alpha rewritten to 1 for rank 2
    assert all(r["rank_before"] == 4 and r["rank_after"] == 2 for r in low.rows)
    by_energy = resize(loras / "a.safetensors", energy=0.5, base="tiny-sd")
    assert all(1 <= r["rank_after"] <= 4 for r in by_energy.rows)
    assert any(r["rank_after"] < 4 for r in by_energy.rows)


def test_merge_and_resize_keep_the_sources_precision_unless_told(loras, tmp_path):
    """An fp16 LoRA resized is written in fp16 (it was written in fp32: halving the rank saved nothing); a merge of
    fp16 files by SVD is fp16, by concatenation fp32 (exact), of fp16 and fp32 fp32; --precision overrides; alphas
    stay fp32."""
    from safetensors import safe_open

    half, _ = write_adapter(tmp_path, "tiny-sd", "kohya", True, preset="attn", precision="fp16", seed=5, stem="h")
    half2, _ = write_adapter(tmp_path, "tiny-sd", "kohya", True, preset="attn", precision="fp16", seed=6, stem="h2")

    def dtypes(path):
        with safe_open(str(path), "pt") as f:
            return {str(f.get_slice(k).get_dtype()) for k in f.keys() if not k.endswith(".alpha")}

    common = ["--base", "tiny-sd"]
    assert main(["resize", str(half), "--rank", "2", "--out", str(tmp_path / "r.safetensors"), *common]) == 0
    assert dtypes(tmp_path / "r.safetensors") == {"F16"}
    assert main(["resize", str(half), "--rank", "2", "--out", str(tmp_path / "r32.safetensors"), "--precision", "fp32",
                 *common]) == 0
    assert dtypes(tmp_path / "r32.safetensors") == {"F32"}
    sizes = [(tmp_path / f).stat().st_size for f in ("r.safetensors", "r32.safetensors")]
    assert sizes[0] < 0.8 * sizes[1]  # (the tiny file's header, the same in both, is most of it)
    assert main(["merge", str(half), str(half2), "--out", str(tmp_path / "m.safetensors"), *common]) == 0
    assert dtypes(tmp_path / "m.safetensors") == {"F32"}
    assert main(["merge", str(half), str(half2), "--rank", "4", "--out", str(tmp_path / "m4.safetensors"),
                 *common]) == 0
    assert dtypes(tmp_path / "m4.safetensors") == {"F16"}
    assert main(["merge", str(half), str(loras / "a.safetensors"), "--rank", "4", "--out",
                 str(tmp_path / "mixed.safetensors"), *common]) == 0
    assert dtypes(tmp_path / "mixed.safetensors") == {"F32"}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys() if k.endswith(".alpha")} == {"F32"}
    # The fp16 file's updates come back within fp16 rounding of an fp32 resize.
    assert max(r["relative_error"] for r in resize(half, rank=4, base="tiny-sd").rows) < 1e-5


def test_extract_recovers_a_fused_lora(tmp_path):
    """A tiny base with a known rank-4 update added to every module a LoRA (LoCon) can hold is a 'fine-tune';
    extract must give that update back."""
    build_tiny("tiny-sd").pipeline().save_pretrained(tmp_path / "base")
    tuned = build_tiny("tiny-sd")
    g = torch.Generator().manual_seed(3)
    known = {}
    with torch.no_grad():
        for comp, model, kind in (("unet", tuned.unet, "unet"), ("text_encoder", tuned.text_encoders[0], "text_encoder")):
            paths = set(lora.targeted_modules(model, "attn-mlp", kind))
            if comp == "unet":
                paths |= {p for p in lora.targeted_modules(model, "full", kind)
                          if isinstance(model.get_submodule(p), torch.nn.Conv2d)}
            for path in sorted(paths):
                w = model.get_submodule(path).weight
                down = torch.randn(4, *w.shape[1:], generator=g) * 0.1
                up = torch.randn(w.shape[0], 4, generator=g) * 0.1
                known[(comp, path)] = (up @ down.flatten(1)).reshape(w.shape)
                w += known[(comp, path)]
    tuned.pipeline().save_pretrained(tmp_path / "tuned")
    result = extract(str(tmp_path / "base"), str(tmp_path / "tuned"), rank=4, conv_rank=4)
    got = {(u.component, u.path): u.delta() for u in result.updates}
    assert got.keys() == known.keys()
    for key, want in known.items():
        assert torch.allclose(got[key], want, atol=1e-5), key
    assert max(r["relative_error"] for r in result.rows) < 1e-4
    assert any(len(u.shape) == 4 for u in result.updates)  # the convolutions came out as LoCon


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extract_from_a_half_precision_fine_tune_takes_its_changes_not_its_rounding(tmp_path, dtype):
    """A fine-tune saved in fp16/bf16 that changed two modules, one a 1x1 convolution (SD 1.x's proj_in), against
    its fp32 base and without --conv-rank: exactly those two come out, the 1x1 one at the linear rank."""
    build_tiny("tiny-sd").pipeline().save_pretrained(tmp_path / "base")
    tuned = build_tiny("tiny-sd")
    g = torch.Generator().manual_seed(4)
    changed = ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    with torch.no_grad():
        for path in changed:
            w = tuned.unet.get_submodule(path).weight
            w += (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).reshape(w.shape)
    assert isinstance(tuned.unet.get_submodule(changed[0]), torch.nn.Conv2d)
    tuned.pipeline().to(dtype).save_pretrained(tmp_path / "tuned")
    result = extract(str(tmp_path / "base"), str(tmp_path / "tuned"), rank=2)
    assert sorted(u.path for u in result.updates) == changed
    assert {r["rank"] for r in result.rows} == {2}
    assert max(r["relative_error"] for r in result.rows) < 0.02  # (the rounding of the changed weights)


def test_analyze_finds_a_known_rank_and_phi_is_one_on_identical_adapters(tmp_path):
    """Rank-8 factors whose product has rank 3 with equal singular values: 90% and 99% of the energy need 3."""
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {}
    for name, width in ((q, 32), (k, 32)):
        basis = torch.linalg.qr(torch.randn(width, 3, generator=g))[0].T  # 3 orthonormal input directions
        down = torch.cat([basis, torch.zeros(5, width)])  # rank 8 in the file, 3 in the update
        out_dim = 32 if name == q else 64
        up = torch.cat([torch.linalg.qr(torch.randn(out_dim, 3, generator=g))[0], torch.zeros(out_dim, 5)], dim=1)
        tensors |= {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                    f"{name}.alpha": torch.tensor(8.0)}
    save_file(tensors, str(tmp_path / "r3.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    report = analyze([tmp_path / "r3.safetensors"], base="tiny-sd")
    mods = report["files"][0]["per_module"]
    assert [m["effective_rank"] for m in mods] == [{"90%": 3, "99%": 3}] * 2
    assert report["files"][0]["median_effective_rank"] == {"90%": 3, "99%": 3}
    same = analyze([tmp_path / "r3.safetensors", tmp_path / "r3.safetensors"], base="tiny-sd")
    diag = same["similarity"]["phi_diagonal"]
    assert diag[:3] == [1.0, 1.0, 1.0]
    v1, v2 = torch.eye(4)[:2], torch.eye(4)[2:]
    assert torch.equal(phi(v1, v2), torch.zeros(2, 2))  # orthogonal subspaces share nothing


def test_workshop_commands_and_their_refusals(loras, tmp_path, capsys):
    a, b = loras / "a.safetensors", loras / "b.safetensors"
    assert main(["merge", f"{a}:0.5", f"{b}:0.5:1", "--out", str(tmp_path / "m.safetensors"), "--base", "tiny-sd"]) == 0
    assert "2 LoRAs" in capsys.readouterr().out
    before = (tmp_path / "m.safetensors").read_bytes()
    assert main(["merge", str(a), "--out", str(tmp_path / "m.safetensors"), "--base", "tiny-sd"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "m.safetensors").read_bytes() == before
    assert main(["resize", str(a), "--rank", "99", "--out", str(tmp_path / "r.safetensors"), "--base", "tiny-sd"]) == 2
    assert "would only pad it" in capsys.readouterr().err and not (tmp_path / "r.safetensors").exists()
    assert main(["resize", str(a), "--energy", "0.9", "--out", str(tmp_path / "r.safetensors"), "--base",
                 "tiny-sd"]) == 0
    assert "MB ->" in capsys.readouterr().out
    assert main(["analyze", str(a), str(tmp_path / "r.safetensors"), "--base", "tiny-sd", "--plot",
                 str(tmp_path / "plots")]) == 0
    assert "subspace similarity" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"a-spectra.png", "r-spectra.png", "phi.png"}
    write_adapter(tmp_path, "tiny-sdxl", "kohya", False, stem="xl")
    assert main(["merge", str(a), str(tmp_path / "xl.safetensors"), "--out", str(tmp_path / "x.safetensors"),
                 "--base", "tiny-sd"]) == 2
    assert "SDXL" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a lora")
    assert main(["analyze", str(tmp_path / "junk.safetensors")]) == 2
    with pytest.raises(FormatError, match="give --rank"):
        ha = tmp_path / "ha.safetensors"
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        save_file({f"{q}.hada_w1_a": torch.randn(32, 2), f"{q}.hada_w1_b": torch.randn(2, 32),
                   f"{q}.hada_w2_a": torch.randn(32, 2), f"{q}.hada_w2_b": torch.randn(2, 32)}, str(ha))
        merge([Item(a), Item(ha)], base="tiny-sd")


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_bake_is_the_fused_blend_as_a_model(tmp_path, name, layout):
    """A baked model, loaded back (single files through diffusers' own LDM/SGM converter), has the weights of the
    blend merged by `generate --fuse` and draws the same image."""
    import numpy as np

    from sdlora.engine import Params
    from sdlora.models import load_base
    from sdlora.tools.bake import bake

    write_adapter(tmp_path, name, "kohya", True, preset="full", precision="fp32", alpha=2.0, seed=4, stem="one")
    write_adapter(tmp_path, name, "kohya", False, preset="attn", precision="fp32", alpha=4.0, seed=5, stem="two")
    build_tiny(name).pipeline().save_pretrained(tmp_path / "config")
    items = [Item(tmp_path / "one.safetensors", 0.8, 0.5), Item(tmp_path / "two.safetensors", -0.6)]
    out = tmp_path / ("baked.safetensors" if layout == "single" else "baked")
    bake(name, items, out, layout=layout, precision="fp32")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == (0o777 if out.is_dir() else 0o666) & ~umask  # (a folder was made private)
    fused = Engine(name, tmp_path, device="cpu")
    blend = [BlendItem("one", 0.8, 0.5), BlendItem("two", -0.6)]
    fused.apply(blend, "fast")
    baked = load_base(str(out), config=str(tmp_path / "config"))
    want, got = fused.base.modules(), baked.modules()
    for comp in want:
        w, g = want[comp].state_dict(), got[comp].state_dict()
        assert w.keys() == g.keys(), comp
        for k in w:
            assert torch.allclose(w[k].float(), g[k].float(), atol=1e-6), (comp, k)
    params = Params(prompt="a red circle", seed=3, steps=3, width=64, height=64, scheduler="Euler")
    a = np.asarray(fused.generate(params, blend, "fast").images[0], dtype=float)
    b = np.asarray(Engine(baked, device="cpu").generate(params).images[0], dtype=float)
    assert np.abs(a - b).max() <= 1


def test_a_lora_of_a_built_in_base_needs_no_base_option(tmp_path, capsys):
    """The file's metadata names the built-in base it was trained on (always at hand): convert, merge, resize and
    analyze read it against that base; they failed with 'made for another model' without --base."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "d", n=2)
    assert main(["-q", "train", "--data", str(data), "--resolution", "64", "--steps", "1",
                 "--output-dir", str(tmp_path), "--name", "t"]) == 0
    lora_file = tmp_path / "t.safetensors"
    assert main(["convert", str(lora_file), str(tmp_path / "c.safetensors"), "--to", "diffusers"]) == 0
    assert main(["merge", f"{lora_file}:0.5", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["resize", str(lora_file), "--rank", "2", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert main(["analyze", str(lora_file)]) == 0
    assert "made for another model" not in capsys.readouterr().err
    # Only the key sdlora writes for its own built-ins counts: a Hub model `someone/tiny-sd` has the same last name
    from safetensors.torch import load_file, save_file

    meta = {k: v for k, v in read_lora(lora_file).metadata.items() if k != "sdlora_builtin_base"}
    save_file(load_file(str(lora_file)), str(tmp_path / "hub.safetensors"), metadata=meta)
    assert meta["ss_sd_model_name"] == "tiny-sd"
    assert main(["convert", str(tmp_path / "hub.safetensors"), str(tmp_path / "c2.safetensors"), "--to", "diffusers"]) == 2
