"""DoRA, LoHa and LoKr: trained through peft, written in the LyCORIS keys A1111 and ComfyUI read, read back into
the update peft computes, applied by the studio, converted without losing DoRA's magnitudes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdlora import lora, models
from sdlora.cli import main
from sdlora.config import AdapterConfig, DataConfig, Params, TrainConfig
from sdlora.convert import convert
from sdlora.engine import BlendItem, Engine
from sdlora.errors import ConfigError
from sdlora.lorafile import fit, read_lora
from sdlora.state import load_state
from sdlora.train import train

from conftest import make_dataset

KEYS = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}
COMPONENTS = {"tiny-sd": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each kind trained for 3 steps (LoCon preset, text encoders too) on each tiny base, with its state."""
    root = tmp_path_factory.mktemp("kinds")
    data = make_dataset(root / "data", n=2)
    out = {}
    for base in COMPONENTS:
        for kind in KEYS:
            cfg = TrainConfig(base=base, steps=3, lr=2e-2, save_every=3, output_dir=root / base, name=kind,
                              data=DataConfig(data=data, resolution=64),
                              adapter=AdapterConfig(kind=kind, rank=4, preset="full", train_text_encoder=True))
            out[base, kind] = (cfg, train(cfg).adapter)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("base", list(COMPONENTS))
@pytest.mark.parametrize("kind", list(KEYS))
def test_each_kind_writes_lycoris_keys_that_read_back_as_the_update_peft_computes(trained, base, kind):
    cfg, path = trained[base, kind]
    lf = read_lora(path)
    assert lf.layout == "kohya" and set(lf.kinds) == {kind}
    suffixes = {k.split(".", 1)[1] for k in lf.raw}
    assert suffixes <= KEYS[kind] and suffixes >= KEYS[kind] - {"lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    assert lf.metadata["ss_network_module"] == "lycoris.kohya"
    # peft's own model with the raw state the run saved (the adapter file is the same weights, rounded to fp16)
    reference = models.load_base(base)
    state = load_state(path.parent / "state" / f"{kind}-step000003.state.safetensors")["lora"]
    fitted = fit(lf, reference.modules(), reference.family)
    assert not fitted.unmatched
    for component in COMPONENTS[base]:
        model = reference.modules()[component]
        exclude = lora.unreachable(model, reference.family, component)
        lora.inject(model, cfg.adapter, component, exclude)
        lora.set_lora_state(model, state[component])
    checked = 0
    for t in fitted.targets:
        layer = reference.modules()[t.component].get_submodule(t.path)
        w0 = layer.get_base_layer().weight.detach().clone()
        merged = copy.deepcopy(layer)
        merged.merge()
        expected = merged.get_base_layer().weight.detach() - w0
        ours = t.module.delta(tuple(w0.shape), base=w0)
        tolerance = 2e-3 * float(expected.abs().max()) + 1e-6  # fp16 rounding of the factors
        assert float((ours - expected).abs().max()) <= tolerance, (t.component, t.path)
        checked += float(expected.abs().max()) > 0
    assert checked > 0.9 * len(fitted.targets)  # trained: almost every update is non-zero
    assert {t.component for t in fitted.targets} == set(COMPONENTS[base])


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KEYS))
def test_the_studio_applies_each_kind_and_the_image_changes(trained, kind):
    _, path = trained["tiny-sd", kind]
    engine = Engine("tiny-sd", lora_files=[path])
    params = Params(prompt="a red circle", seed=3, steps=4, width=64, height=64)

    def image(blend, mode="exact"):
        return np.asarray(engine.generate(params, blend, mode).images[0], dtype=np.float32)

    plain = image([])
    styled = image([BlendItem(path.stem, 1.0)])
    assert np.abs(styled - plain).mean() > 0.5
    assert np.array_equal(image([BlendItem(path.stem, 1.0)], "fast"), styled)  # merged either way
    assert np.array_equal(image([]), plain)  # and taken out again bit for bit
    assert engine.library.get(path.stem).kind == kind


@pytest.mark.slow
def test_a_dora_file_converts_to_diffusers_and_back_with_its_magnitudes(trained, tmp_path):
    _, path = trained["tiny-sd", "dora"]
    there, _ = convert(path, tmp_path / "d.safetensors", "diffusers", base="tiny-sd")
    back, _ = convert(there, tmp_path / "k.safetensors", "kohya", base="tiny-sd")
    a, d, b = read_lora(path), read_lora(there), read_lora(back)
    assert d.layout == "diffusers" and set(d.kinds) == {"dora"}
    assert any(k.endswith(".lora_magnitude_vector.weight") for k in d.raw)
    assert a.raw.keys() == b.raw.keys()
    assert all(torch.equal(a.raw[k].float(), b.raw[k].float()) for k in a.raw if k.endswith("dora_scale"))
    # diffusers itself loads the diffusers file into peft's DoRA layers and fuses the same update sdlora merges
    from diffusers import StableDiffusionPipeline

    base = models.load_base("tiny-sd")
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    originals = {name: m.weight.detach().clone() for name, m in base.unet.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    pipe.load_lora_weights(str(there), adapter_name="d")
    pipe.fuse_lora(components=["unet", "text_encoder"])
    fitted = fit(a, models.load_base("tiny-sd").modules(), "sd1")
    compared = 0
    for t in fitted.targets:
        if t.component != "unet":
            continue
        layer = base.unet.get_submodule(t.path)
        fused = layer.get_base_layer().weight.detach() if hasattr(layer, "get_base_layer") else layer.weight.detach()
        w0 = originals[t.path]
        ours = t.module.delta(tuple(w0.shape), base=w0)
        assert torch.allclose(fused - w0, ours, atol=1e-4 * float(w0.abs().max())), t.path
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("kind", ["lora", *KEYS])
def test_set_weight_scales_every_layers_update_of_every_kind_in_the_unet_and_text_encoder(kind):
    """--train-weight's lever: each adapted layer's update at weight w is w times its update at 1 (DoRA's, which
    renormalises, only vanishes at 0), in every adapted layer of the UNet and the text encoder."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    base = models.build_tiny("tiny-sd")
    g = torch.Generator().manual_seed(0)
    cfg = AdapterConfig(kind=kind, rank=4, preset="full")
    unet, te = base.unet, base.text_encoders[0]
    lora.inject(unet, cfg, "unet")
    lora.inject(te, cfg, "text_encoder", lora.unreachable(te, base.family, "text_encoder"))
    for model in (unet, te):
        for name, p in model.named_parameters():
            if any(mark in name for mark in lora.PARAMETER_MARKS) and "magnitude" not in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1  # peft starts some factors at zero
    for model in (unet, te):
        layers = [m for m in model.modules() if isinstance(m, (LoraLayer, LycorisLayer))]
        assert len(layers) > 4 and lora.adapted_layers([model, None]) == layers
        inputs = [torch.randn((2, m.get_base_layer().in_features) if isinstance(m.get_base_layer(), torch.nn.Linear)
                              else (1, m.get_base_layer().in_channels, 8, 8), generator=g) for m in layers]

        def updates(weight, layers=layers, inputs=inputs, model=model):
            lora.set_weight(lora.adapted_layers([model, None]), weight)
            with torch.no_grad():
                return [m(x) - m.get_base_layer()(x) for m, x in zip(layers, inputs, strict=True)]

        one, half, zero = updates(1.0), updates(0.5), updates(0.0)
        for u1, u5, u0 in zip(one, half, zero, strict=True):
            assert u1.abs().max() > 1e-4 and u0.abs().max() < 1e-5
            if kind == "dora":
                assert (u5 - u1).abs().max() > 1e-5 and u5.abs().max() > 1e-5
            else:
                torch.testing.assert_close(u5, 0.5 * u1, rtol=1e-4, atol=1e-6)


def test_kind_options_that_do_not_fit_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="diffusers cannot load a loha adapter; save it with --format kohya"):
        TrainConfig(format="diffusers", adapter=AdapterConfig(kind="loha"))
    with pytest.raises(ConfigError, match="--factor and --decompose-both shape a LoKr adapter"):
        AdapterConfig(kind="lora", factor=4)
    with pytest.raises(ConfigError, match="peft's lokr has none"):
        AdapterConfig(kind="lokr", dropout=0.1)
    with pytest.raises(ConfigError, match="--quantize-base trains --kind lora only"):
        TrainConfig(quantize_base="int8", adapter=AdapterConfig(kind="dora"))
    with pytest.raises(ConfigError, match="kind must be one of lora, dora, loha, lokr; got 'oft'"):
        TrainConfig(adapter=AdapterConfig(kind="oft"))
    TrainConfig(format="diffusers", adapter=AdapterConfig(kind="dora"))  # diffusers reads DoRA


@pytest.mark.slow
def test_inspect_names_the_kind(trained, capsys):
    for kind, title in (("dora", "kohya DoRA for"), ("loha", "kohya LyCORIS LoHa for"),
                        ("lokr", "kohya LyCORIS LoKr for")):
        assert main(["inspect", str(trained["tiny-sd", kind][1])]) == 0
        out = capsys.readouterr().out
        assert title in out and "rank: 0" not in out  # (a LoKr factor not split in two reads as "full")
    assert "full (" in out
