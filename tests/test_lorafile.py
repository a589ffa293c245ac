"""Reading LoRA files: every layout, refusals with clear reasons, inspect and convert."""

import json
import struct

import pytest
import torch
from safetensors.torch import save, save_file

from sdlora.cli import main
from sdlora.convert import convert, info
from sdlora.errors import FormatError
from sdlora.lorafile import FileModule, fit, read_lora
from sdlora.models import build_tiny

from test_formats import write_adapter

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a tiny-sd layer: Linear(32, 32)


def lora_file(path, modules, metadata=None):
    tensors = {}
    for name, (down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return path


def header_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("case, reason", [
    ("empty", "only 0 bytes"),
    ("short", "only 5 bytes"),
    ("huge_header", "header length"),
    ("beyond_file", "header length"),
    ("bad_json", "invalid JSON"),
    ("not_object", "not a JSON object"),
    ("overlap", "overlap"),
    ("out_of_range", "points outside the file"),
    ("bad_dtype", "unknown dtype"),
    ("pickle", "pickled PyTorch file"),
    ("zip_pickle", "pickled PyTorch file"),
    ("nan", "NaN or Inf"),
    ("no_tensors", "holds no tensors"),
    ("bad_meta", "metadata"),
    ("three_offsets", "malformed data offsets"),
    ("list_dtype", "unknown dtype"),
    ("bad_shape", "malformed shape"),
    ("bare_component_key", "not a usable LoRA file"),
    ("adapter_meta_list", "not a JSON object"),
    ("empty_alpha", "alpha must be one number"),
    ("unpaired", "do not make a low-rank pair"),
])
def test_malformed_files_give_one_clear_error(tmp_path, case, reason):
    p = tmp_path / f"{case}.safetensors"
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "empty":
        p.write_bytes(b"")
    elif case == "short":
        p.write_bytes(b"\x01\x02\x03\x04\x05")
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    elif case == "beyond_file":
        p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif case == "bad_json":
        header_file(p, b"{not json")
    elif case == "not_object":
        header_file(p, b"[1, 2]")
    elif case == "overlap":
        header_file(p, json.dumps({"a.lora_down.weight": t, "b": {**t, "data_offsets": [4, 12]}}).encode(), b"\0" * 12)
    elif case == "out_of_range":
        header_file(p, json.dumps({"a": {**t, "data_offsets": [0, 800]}}).encode(), b"\0" * 8)
    elif case == "bad_dtype":
        header_file(p, json.dumps({"a": {**t, "dtype": "Q7"}}).encode(), b"\0" * 8)
    elif case == "pickle":
        p.write_bytes(b"\x80\x02}q\x00.")
    elif case == "zip_pickle":
        p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    elif case == "nan":
        lora_file(p, {Q: (torch.full((4, 32), float("nan")), torch.zeros(32, 4), 4)})
    elif case == "no_tensors":
        p.write_bytes(save({}))
    elif case == "three_offsets":
        header_file(p, json.dumps({"a": {**t, "data_offsets": [0, 4, 8]}}).encode(), b"\0" * 8)
    elif case == "list_dtype":
        header_file(p, json.dumps({"a": {**t, "dtype": ["F32"]}}).encode(), b"\0" * 8)
    elif case == "bad_shape":
        header_file(p, json.dumps({"a": {**t, "shape": "2"}}).encode(), b"\0" * 8)
    elif case == "bare_component_key":
        save_file({"unet": torch.zeros(2)}, str(p))
    elif case == "adapter_meta_list":
        save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)}, str(p),
                  metadata={"lora_adapter_metadata": "[1]"})
    elif case == "empty_alpha":
        save_file({f"{Q}.lora_down.weight": torch.zeros(4, 32), f"{Q}.lora_up.weight": torch.zeros(32, 4),
                   f"{Q}.alpha": torch.zeros(0)}, str(p))
    elif case == "unpaired":
        lora_file(p, {Q: (torch.randn(4, 32), torch.randn(32, 5), 4)})
    elif case == "bad_meta":
        header_file(p, json.dumps({"__metadata__": {"a": 1}}).encode())
    with pytest.raises(FormatError) as e:
        read_lora(p)
    assert str(p) in str(e.value) and reason in str(e.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_only_safetensors_is_read(tmp_path, suffix):
    p = tmp_path / f"x{suffix}"
    p.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(FormatError, match="only .safetensors files are read"):
        read_lora(p)


def test_kohya_without_alpha_means_scale_one_and_rank_is_checked(tmp_path):
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    lf = read_lora(lora_file(tmp_path / "a.safetensors", {Q: (down, up, None)}))
    m = lf.modules[Q]
    assert m.alpha is None and m.scale == 1.0
    assert torch.allclose(m.delta((32, 32)), up @ down)
    base = build_tiny("tiny-sd")
    too_big = lora_file(tmp_path / "b.safetensors", {Q: (torch.randn(40, 32), torch.randn(32, 40), 1)})
    with pytest.raises(FormatError, match="rank 40, larger than its layer"):
        fit(read_lora(too_big), base.modules(), "sd1")
    wrong = lora_file(tmp_path / "c.safetensors", {Q: (torch.randn(4, 768), torch.randn(32, 4), 1)})
    with pytest.raises(FormatError, match="do not fit the layer"):
        fit(read_lora(wrong), base.modules(), "sd1")


def test_zero_and_partial_matches(tmp_path):
    base = build_tiny("tiny-sd")
    bogus = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    none = lora_file(tmp_path / "n.safetensors", {bogus: (torch.randn(4, 32), torch.randn(32, 4), 4)})
    with pytest.raises(FormatError, match="none of its 1 modules matches"):
        fit(read_lora(none), base.modules(), "sd1")
    part = lora_file(tmp_path / "p.safetensors", {bogus: (torch.randn(4, 32), torch.randn(32, 4), 4),
                                                   Q: (torch.randn(4, 32), torch.randn(32, 4), 4)})
    result = fit(read_lora(part), base.modules(), "sd1")
    assert len(result.targets) == 1 and result.unmatched == [bogus]
    assert "1 modules matched, 1 did not; first unmatched: " + bogus in result.report()


def test_family_mismatch_is_refused_with_and_without_metadata(tmp_path):
    xl_path, _ = write_adapter(tmp_path, "tiny-sdxl", "kohya", True)
    sd = build_tiny("tiny-sd")
    with pytest.raises(FormatError, match=r"for SDXL \(from its metadata\) but tiny-sd is SD 1.x"):
        fit(read_lora(xl_path), sd.modules(), "sd1", "tiny-sd")
    # The same file without metadata: the te1/te2 prefixes and SGM block names give it away.
    tensors = read_lora(xl_path).raw
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    lf = read_lora(bare)
    assert (lf.family, lf.family_source) == ("sdxl", "shapes")
    with pytest.raises(FormatError, match="for SDXL"):
        fit(lf, sd.modules(), "sd1", "tiny-sd")
    # A full-size SD 1.5 LoRA (cross-attention keys 768 wide) on an SDXL base, no metadata.
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = lora_file(tmp_path / "sd15.safetensors", {k: (torch.randn(2, 768), torch.randn(640, 2), 2)})
    lf = read_lora(sd15)
    assert (lf.family, lf.family_source) == ("sd1", "shapes")
    xl = build_tiny("tiny-sdxl")
    with pytest.raises(FormatError, match=r"for SD 1.x \(from its tensor shapes\) but tiny-sdxl is SDXL"):
        fit(lf, xl.modules(), "sdxl", "tiny-sdxl")


def test_lycoris_updates_match_their_definitions(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/dim
    w1a, w1b, w2a, w2b = r(32, 4), r(4, 32), r(32, 4), r(4, 32)
    loha = FileModule("m", "loha", {"w1_a": w1a, "w1_b": w1b, "w2_a": w2a, "w2_b": w2b, "alpha": torch.tensor(2.0)})
    expected = torch.zeros(32, 32)
    for i in range(32):
        for j in range(32):
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * 0.5
    assert torch.allclose(loha.delta((32, 32)), expected, atol=1e-5)
    # LoKr: ΔW = kron(w1, w2_a·w2_b) · alpha/dim
    w1, a, b = r(4, 4), r(8, 2), r(2, 8)
    lokr = FileModule("m", "lokr", {"w1": w1, "w2_a": a, "w2_b": b, "alpha": torch.tensor(1.0)})
    w2 = a @ b
    expected = torch.stack([torch.stack([w1[i // 8, j // 8] * w2[i % 8, j % 8] for j in range(32)]) for i in range(32)])
    assert torch.allclose(lokr.delta((32, 32)), expected * 0.5, atol=1e-5)
    # LoCon with a Tucker core on a 3x3 conv
    down, mid, up = r(4, 16, 1, 1), r(4, 4, 3, 3), r(32, 4, 1, 1)
    conv = FileModule("m", "lora", {"down": down, "mid": mid, "up": up, "alpha": torch.tensor(4.0)})
    expected = torch.zeros(32, 16, 3, 3)
    for o in range(32):
        for i in range(16):
            expected[o, i] = sum(up[o, m, 0, 0] * mid[m, n] * down[n, i, 0, 0] for m in range(4) for n in range(4))
    assert torch.allclose(conv.delta((32, 16, 3, 3)), expected, atol=1e-4)
    # DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖, per output row (peft, LyCORIS wd_on_out) or per input column (A1111)
    weight, down, up = r(8, 6), r(2, 6), r(8, 2)
    updated = weight + up @ down * 1.5
    rows, cols = r(8, 1).abs(), r(1, 6).abs()
    for magnitude, norm in ((rows, updated.norm(dim=1, keepdim=True)), (cols, updated.norm(dim=0, keepdim=True))):
        dora = FileModule("m", "dora", {"down": down, "up": up, "alpha": torch.tensor(3.0), "dora_scale": magnitude})
        expected = torch.stack([torch.stack([updated[o, i] * (magnitude[o, 0] if magnitude.shape[0] == 8 else
                                                               magnitude[0, i]) / (norm[o, 0] if norm.shape[0] == 8
                                                                                  else norm[0, i])
                                             for i in range(6)]) for o in range(8)])
        assert torch.allclose(dora.delta((8, 6), base=weight), expected - weight, atol=1e-5)
    with pytest.raises(FormatError, match="its update needs the base layer's weight"):
        dora.delta((8, 6))


def test_lycoris_and_dora_files_are_read(tmp_path):
    p = tmp_path / "loha.safetensors"
    save_file({f"{Q}.hada_{k}": torch.randn(*s) for k, s in
               {"w1_a": (32, 2), "w1_b": (2, 32), "w2_a": (32, 2), "w2_b": (2, 32)}.items()} | {f"{Q}.alpha": torch.tensor(2.0)},
              str(p))
    lf = read_lora(p)
    assert lf.kind == "loha" and lf.modules[Q].rank == 2
    assert len(fit(lf, build_tiny("tiny-sd").modules(), "sd1").targets) == 1
    with pytest.raises(FormatError, match="cannot be written as plain LoRA"):
        convert(p, tmp_path / "out.safetensors", "kohya", base="tiny-sd")
    d = tmp_path / "dora.safetensors"
    save_file({f"{Q}.lora_down.weight": torch.randn(2, 32), f"{Q}.lora_up.weight": torch.randn(32, 2),
               f"{Q}.dora_scale": torch.randn(1, 32)}, str(d))
    lf = read_lora(d)
    assert lf.kind == "dora" and not lf.plain and len(fit(lf, build_tiny("tiny-sd").modules(), "sd1").targets) == 1
    save_file({f"{Q}.lora_down.weight": torch.randn(2, 32), f"{Q}.lora_up.weight": torch.randn(32, 2),
               f"{Q}.dora_scale": torch.randn(5, 1)}, str(d))
    with pytest.raises(FormatError, match=r"DoRA magnitude has shape \[5, 1\], which fits neither the 32 outputs"):
        fit(read_lora(d), build_tiny("tiny-sd").modules(), "sd1")
    save_file({f"{Q}.hada_w1_a": torch.randn(32, 2), f"{Q}.hada_w1_b": torch.randn(2, 32),
               f"{Q}.hada_w2_a": torch.randn(32, 2), f"{Q}.hada_w2_b": torch.randn(2, 32),
               f"{Q}.dora_scale": torch.randn(1, 32)}, str(d))
    with pytest.raises(FormatError, match="has a DoRA magnitude but is loha"):
        read_lora(d)
    u = tmp_path / "unknown.safetensors"
    save_file({"model.foo.weight": torch.randn(2)}, str(u))
    with pytest.raises(FormatError, match="not a LoRA layout"):
        read_lora(u)


def test_older_diffusers_and_peft_layouts(tmp_path):
    base = build_tiny("tiny-sd")
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    old = tmp_path / "old.safetensors"
    save_file({f"{path}.processor.to_q_lora.down.weight": torch.randn(2, 32),
               f"{path}.processor.to_q_lora.up.weight": torch.randn(32, 2),
               f"{path}.processor.to_out_lora.down.weight": torch.randn(2, 32),
               f"{path}.processor.to_out_lora.up.weight": torch.randn(32, 2)}, str(old))
    result = fit(read_lora(old), base.modules(), "sd1")
    assert sorted(t.path for t in result.targets) == [f"{path}.to_out.0", f"{path}.to_q"]
    mid = tmp_path / "mid.safetensors"
    save_file({f"unet.{path}.to_k.lora.down.weight": torch.randn(2, 32),
               f"unet.{path}.to_k.lora.up.weight": torch.randn(32, 2),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.randn(2, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.randn(32, 2)},
              str(mid))
    assert len(fit(read_lora(mid), base.modules(), "sd1").targets) == 2
    peft = tmp_path / "peft.safetensors"
    save_file({f"base_model.model.{path}.to_v.lora_A.weight": torch.randn(2, 32),
               f"base_model.model.{path}.to_v.lora_B.weight": torch.randn(32, 2)}, str(peft))
    lf = read_lora(peft)
    assert lf.layout == "peft" and fit(lf, base.modules(), "sd1").targets[0].path == f"{path}.to_v"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_convert_round_trip_keeps_tensors_and_scale(tmp_path, name):
    src, _ = write_adapter(tmp_path, name, "kohya", True, preset="full", alpha=3.0)
    mid, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert main(["-q", "convert", str(src), str(mid), "--to", "diffusers", "--base", name]) == 0
    assert main(["-q", "convert", str(mid), str(back), "--to", "kohya", "--base", name]) == 0
    a, b = read_lora(src).raw, read_lora(back).raw
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    d = read_lora(mid)
    assert {m.scale for m in d.modules.values()} == {0.75}  # alpha 3 / rank 4 survived via lora_adapter_metadata
    before = mid.stat()
    assert main(["-q", "convert", str(src), str(mid), "--to", "diffusers", "--base", name]) == 2  # never overwrites
    after = mid.stat()  # an atomic replace would bring a new inode
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_convert_keeps_per_module_alphas(tmp_path):
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    k2 = Q.replace("to_q", "to_k")
    src = lora_file(tmp_path / "a.safetensors", {Q: (down, up, 1), k2: (down.clone(), up.clone(), 8)}, {"ss_base_model_version": "sd_v1"})
    convert(src, tmp_path / "d.safetensors", "diffusers", base="tiny-sd")
    scales = {n.rsplit(".", 1)[-1]: m.scale for n, m in read_lora(tmp_path / "d.safetensors").modules.items()}
    assert scales == {"to_q": 0.25, "to_k": 2.0}


def test_inspect_reports_everything(tmp_path, capsys):
    src, _ = write_adapter(tmp_path, "tiny-sdxl", "kohya", True)
    assert main(["inspect", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "kohya" and d["family"] == "sdxl"
    assert d["modules"]["unet"] > 0 and d["modules"]["text_encoder"] == 8 and d["modules"]["text_encoder_2"] == 8
    assert d["ranks"] == {"4": sum(d["modules"].values())} and set(d["alphas"]) == {"2"}
    assert set(d["precision"]) == {"float16"} and d["parameters"] > 0
    assert d["short_hash"] == d["computed_hash"][:12] and d["hash_matches_metadata"]
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "kohya LoRA for SDXL" in text and "A1111 short hash" in text
    assert info(src)["sshs_model_hash"] == d["computed_hash"]
