"""Pivotal tuning: new tokens trained with the LoRA, saved inside it, added to and removed from the studio's base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlora import embeddings
from sdlora.config import AdapterConfig, DataConfig, Params, TrainConfig
from sdlora.convert import format_info, info
from sdlora.engine import BlendItem, Engine
from sdlora.errors import ConfigError, DataError, FormatError
from sdlora.lorafile import read_lora
from sdlora.models import load_base
from sdlora.safefiles import read_safetensors
from sdlora.train import train

from conftest import make_dataset


def pivotal(tmp_path, base="tiny-sd", token="<zz>:2", name="p", steps=3, **kw):
    data = make_dataset(tmp_path / f"data-{name}", n=2, caption="<zz>, a red circle")
    cfg = TrainConfig(base=base, output_dir=tmp_path / "out", name=name, steps=steps, lr=1e-2, embedding_lr=5e-2,
                      save_precision="fp32", **kw,
                      data=DataConfig(data=data, resolution=64),
                      adapter=AdapterConfig(rank=4, train_embedding=[token]))
    return train(cfg)


def test_expand_and_the_tokenizer_record_multi_vector_tokens():
    assert embeddings.expand("<a>, x <a> <a>_1", {"<a>": 3}) == "<a> <a>_1 <a>_2, x <a> <a>_1 <a>_2 <a>_1"
    assert embeddings.parse_spec("<rim>:2") == ("<rim>", 2) and embeddings.parse_spec("tok") == ("tok", 1)
    for bad in ("a b", "<x>:0", "<x>:99", "<x>:two", ""):
        with pytest.raises(ConfigError, match="TOKEN or TOKEN:N"):
            embeddings.parse_spec(bad)
    base = load_base("tiny-sd")
    inst = embeddings.install(base, {"<a>": [torch.zeros(3, 32)], "<b>": [torch.ones(1, 32)]})
    assert embeddings.tokenizer_vectors(base.tokenizers[0]) == {"<a>": 3}
    embeddings.remove(base, inst)
    assert embeddings.tokenizer_vectors(base.tokenizers[0]) == {}


def test_only_the_new_rows_train():
    original = torch.nn.Embedding(10, 4)
    wrapped = embeddings.TokenEmbedding(original, torch.zeros(2, 4))
    wrapped.vectors.requires_grad_(True)
    original.requires_grad_(False)
    out = wrapped(torch.tensor([[1, 10, 3, 11, 10]]))
    assert torch.equal(out[0, 0], original.weight[1]) and torch.equal(out[0, 1], torch.zeros(4))
    (out * torch.arange(5.0)[None, :, None]).sum().backward()
    assert original.weight.grad is None
    assert torch.equal(wrapped.vectors.grad, torch.tensor([[5.0] * 4, [3.0] * 4]))  # rows 10 (at 1 and 4) and 11


@pytest.mark.parametrize("base", ["tiny-sd", "tiny-sdxl"])
def test_new_tokens_train_and_round_trip_through_the_file(tmp_path, base):
    result = pivotal(tmp_path, base)
    tensors, meta = read_safetensors(result.adapter)
    keys = ["clip_l"] if base == "tiny-sd" else ["clip_l", "clip_g"]
    widths = [32] if base == "tiny-sd" else [32, 48]
    bundle = [tensors[f"bundle_emb.<zz>.{k}"] for k in keys]
    assert [tuple(t.shape) for t in bundle] == [(2, w) for w in widths]
    assert meta["modelspec.trigger_phrase"] == "<zz>"
    engine = Engine(base, lora_files=[result.adapter])
    start = embeddings.initial_vectors(engine.base, 2)
    assert all((b - s).abs().max() > 1e-3 for b, s in zip(bundle, start, strict=True))  # they trained
    engine.apply([BlendItem("p", 1.0)])
    installed = [te.get_input_embeddings().vectors for te in engine.base.text_encoders]
    assert all(torch.equal(v.cpu(), b) for v, b in zip(installed, bundle, strict=True))  # exactly the file's
    assert "<zz>" in info(result.adapter)["trigger_words"]
    assert info(result.adapter)["bundled_embeddings"] == {"<zz>": {k: [2, w] for k, w in zip(keys, widths, strict=True)}}


def test_the_studio_adds_and_removes_tokens_exactly(tmp_path):
    result = pivotal(tmp_path)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v for k, v in read_safetensors(result.adapter)[0].items() if not k.startswith("bundle_emb.")}, plain)
    engine = Engine("tiny-sd", lora_files=[result.adapter, plain])
    tok, emb = engine.base.tokenizers[0], engine.base.text_encoders[0].get_input_embeddings()
    params = Params(prompt="<zz>, a red circle", steps=2, width=64, height=64, seed=3)

    def image(blend):
        return np.asarray(engine.generate(params, blend).images[0], dtype=float)

    before = image([])
    with_plain = image([BlendItem("plain", 1.0)])  # a LoRA without embeddings leaves tokenizer and embedding alone
    assert engine.base.tokenizers[0] is tok and engine.base.text_encoders[0].get_input_embeddings() is emb
    assert engine.pipe.tokenizer.tokenize("<zz>") != ["<zz>"]
    with_tokens = image([BlendItem("p", 1.0)])
    assert len(engine.pipe.tokenizer) == len(tok) + 2 and engine.pipe.tokenizer.tokenize("<zz>") == ["<zz>"]
    assert np.abs(with_tokens - with_plain).max() > 0  # the same LoRA, now with its tokens: the image changes
    assert np.array_equal(image([]), before)
    assert engine.base.tokenizers[0] is tok and engine.pipe.tokenizer is tok and len(tok) == 514
    assert engine.base.text_encoders[0].get_input_embeddings() is emb
    assert np.array_equal(image([BlendItem("plain", 1.0)]), with_plain)


def test_bad_bundles_get_one_clear_error(tmp_path):
    result = pivotal(tmp_path)
    tensors, _ = read_safetensors(result.adapter)
    lora_keys = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}

    def variant(name, bundle):
        path = tmp_path / f"{name}.safetensors"
        save_file(lora_keys | bundle, path)
        return path

    files = {"wide": variant("wide", {"bundle_emb.<w>.clip_l": torch.zeros(1, 33)}),
             "vocab": variant("vocab", {"bundle_emb.a.clip_l": torch.zeros(1, 32)}),
             "twin": variant("twin", {"bundle_emb.<zz>.clip_l": torch.zeros(1, 32)})}
    engine = Engine("tiny-sd", lora_files=[result.adapter, *files.values()])
    cases = [(["wide"], r"wide.safetensors: bundled token '<w>' has vectors of shape \(1, 33\); .* width 32"),
             (["vocab"], r"vocab.safetensors: token 'a' is already in the base's vocabulary"),
             (["p", "twin"], r"p.safetensors and .*twin.safetensors both bundle an embedding for the token '<zz>'")]
    for names, message in cases:
        with pytest.raises(FormatError, match=message):
            engine.apply([BlendItem(n, 1.0) for n in names])
        assert len(engine.pipe.tokenizer) == 514  # nothing was added
    nan = variant("nan", {"bundle_emb.<n>.clip_l": torch.full((1, 32), float("nan"))})
    with pytest.raises(FormatError, match="NaN or Inf"):
        Engine("tiny-sd", lora_files=[nan]).apply([BlendItem("nan", 1.0)])


def test_embedding_steps_fix_the_vectors_and_resume_keeps_them(tmp_path):
    full = pivotal(tmp_path, name="f", steps=4, embedding_steps=2, save_every=2)
    at2, _ = read_safetensors(tmp_path / "out" / "f-step000002.safetensors")
    end, _ = read_safetensors(full.adapter)
    assert torch.equal(at2["bundle_emb.<zz>.clip_l"], end["bundle_emb.<zz>.clip_l"])  # fixed after step 2
    ups = [k for k in end if k.endswith("lora_up.weight")]
    assert any(not torch.equal(at2[k], end[k]) for k in ups)  # while the LoRA trained on
    state = tmp_path / "out" / "state" / "f-step000002.state.safetensors"
    resumed = pivotal(tmp_path, name="f", steps=4, embedding_steps=2, save_every=2, resume=str(state), overwrite=True)
    again, _ = read_safetensors(resumed.adapter)
    assert resumed.losses == full.losses and all(torch.equal(end[k], again[k]) for k in end)


def test_embedding_only_writes_a_textual_inversion_diffusers_loads(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2, caption="a red circle")
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", name="yy", steps=2, embedding_lr=5e-2,
                      data=DataConfig(data=data, resolution=64, trigger="<yy>"),
                      adapter=AdapterConfig(train_embedding=["<yy>"], embedding_only=True, embedding_init="red"))
    result = train(cfg)
    tensors, meta = read_safetensors(result.adapter)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (1, 32) and meta["sdlora_token"] == "<yy>"
    assert result.trainable_params == 32
    pipe = load_base("tiny-sd").pipeline()
    pipe.load_textual_inversion(str(result.adapter), token="<yy>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-1], tensors["emb_params"][0])
    assert not any(k.startswith("ss_network_") for k in meta)  # no network was trained
    with pytest.raises(FormatError, match="a textual-inversion embedding, not a LoRA"):
        read_lora(result.adapter)  # (the studio and the workshop say where it goes instead)
    about = info(result.adapter)  # inspect describes it
    assert (about["kind"], about["vectors"], about["trigger_words"]) == ("embedding", {"emb_params": {"count": 1,
                                                                                                    "width": 32}}, ["yy"])
    assert "textual-inversion embedding" in format_info(about) and "write yy in the prompt" in format_info(about)


@pytest.mark.parametrize("widths, family", [({"emb_params": 768}, "sd1"), ({"emb_params": 1024}, "sd2"),
                                            ({"clip_l": 768, "clip_g": 1280}, "sdxl"), ({"emb_params": 32}, None)])
def test_inspect_tells_an_embedding_s_family_by_its_widths(tmp_path, widths, family):
    path = tmp_path / "e.safetensors"
    save_file({k: torch.zeros(2, w) for k, w in widths.items()}, str(path))
    about = info(path)
    assert about["family"] == family and all(v["count"] == 2 for v in about["vectors"].values())


def test_bad_embedding_options_are_refused_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", n=2, caption="a red circle")
    for adapter, message in [(dict(train_embedding=["<a>", "<a>:2"]), "names a token twice"),
                             (dict(train_embedding=["<a>", "<b>"], embedding_only=True), "exactly one"),
                             (dict(embedding_init="red"), "needs --train-embedding")]:
        with pytest.raises(ConfigError, match=message):
            AdapterConfig(**adapter)
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", steps=1, data=DataConfig(data=data, resolution=64),
                      adapter=AdapterConfig(train_embedding=["<zz>"]))
    with pytest.raises(DataError, match="no caption in .* holds '<zz>'.* --trigger <zz>"):
        train(cfg)
    cfg.adapter.train_embedding, cfg.data.trigger = ["a"], "a"
    with pytest.raises(FormatError, match="token 'a' is already in the base's vocabulary"):
        train(cfg)
    assert not (tmp_path / "o").exists()
