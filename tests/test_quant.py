"""QLoRA: a frozen base in 8 or 4 bits under a full-precision LoRA, on the CPU through torchao and bitsandbytes."""

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_train import read

from sdlora import quant
from sdlora.config import AdapterConfig, DataConfig, TrainConfig
from sdlora.engine import BlendItem, Engine, Params
from sdlora.errors import ConfigError, MissingDependencyError
from sdlora.models import build_tiny
from sdlora.train import train


def config(out, data, preset="attn", **kw):
    return TrainConfig(**{"base": "tiny-sd", "output_dir": out, "name": "q", "steps": 4, "lr": 1e-2, "save_every": 2,
                          "save_precision": "fp32", **kw},
                       data=DataConfig(data=data, resolution=64),
                       adapter=AdapterConfig(rank=4, train_text_encoder=True, preset=preset))


@pytest.mark.parametrize("kind, preset, backend", [("int8", "full", "torchao"), ("nf4", "attn", "torchao"),
                                                    ("int8", "attn", "bitsandbytes"), ("nf4", "full", "bitsandbytes")])
def test_a_quantized_base_trains_an_ordinary_adapter(tmp_path, dataset, kind, preset, backend):
    """full: LoCon on quantized convolutions. `auto` is torchao on the CPU."""
    full = read(train(config(tmp_path / "full", dataset, preset)).adapter)[0]
    quantized = {"quantize_base": kind, "quantize_backend": backend, "gradient_checkpointing": True}
    result = train(config(tmp_path / kind, dataset, preset, **quantized))
    tensors, meta = read(result.adapter)
    assert tensors.keys() == full.keys()  # exactly the keys a full-precision run writes
    assert (meta["sdlora_quantized_base"], meta["sdlora_quantize_backend"]) == (kind, backend)
    assert all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0] * 1.5
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert sum(bool(t.abs().max() > 0) for t in ups) > len(ups) // 2  # it trained
    # The adapter applies to the full-precision base as any LoRA does.
    params = Params(prompt="sks, a red circle", seed=1, steps=3, width=64, height=64, scheduler="Euler")
    engine = Engine("tiny-sd", lora_files=[result.adapter])
    bare = np.asarray(engine.generate(params).images[0], dtype=float)
    for mode in ("exact", "fast"):
        assert np.abs(np.asarray(engine.generate(params, [BlendItem("q", 1.0)], mode).images[0], dtype=float)
                      - bare).max() > 1
    # Resume on the quantized base: the state holds the LoRA and optimizer only, and the run ends where an
    # uninterrupted one does.
    state = tmp_path / kind / "state" / "q-step000002.state.safetensors"
    assert state.is_file()
    resumed = train(config(tmp_path / kind, dataset, preset, **quantized, resume=str(state), overwrite=True))
    again, _ = read(resumed.adapter)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_layers_get_pefts_bitsandbytes_lora_layers(kind):
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb
    from peft.tuners.lora import layer as peft_layer

    from sdlora import lora

    base = build_tiny("tiny-sd")
    models = {"unet": base.unet, "text_encoder": base.text_encoders[0]}
    for component, model in models.items():
        quant.quantize(model.requires_grad_(False), kind, "bitsandbytes")
        lora.inject(model, AdapterConfig(rank=4, preset="full"), component)
    bnb_layer, peft_layer_type = ((bnb.nn.Linear4bit, peft_bnb.Linear4bit) if kind == "nf4"
                                  else (bnb.nn.Linear8bitLt, peft_bnb.Linear8bitLt))
    for component, model in models.items():
        wrapped = [m for m in model.modules() if isinstance(m, peft_layer.LoraLayer)]
        linears = [m for m in wrapped if isinstance(m.get_base_layer(), torch.nn.Linear)]
        assert linears and all(type(m) is peft_layer_type and type(m.get_base_layer()) is bnb_layer
                               for m in linears), component
        if component == "unet":  # convolutions: sdlora's own quantized layer under peft's conv LoRA
            convs = [m for m in wrapped if isinstance(m.get_base_layer(), torch.nn.Conv2d)]
            assert convs and all(type(m.get_base_layer()) is quant.QuantizedConv2d for m in convs)


def test_quantized_layers_store_a_fraction_of_the_bytes_and_compute_nearly_the_same():
    """SD-sized layers (a 320 x 320 projection, a 320-channel 3x3 convolution): int8 is 1 byte a weight plus one
    scale a row, nf4 half a byte plus the double-quantized block scales; the outputs stay close."""
    g = torch.Generator().manual_seed(0)
    for (kind, most, tolerance), backend in itertools.product((("int8", 0.55, 0.02), ("nf4", 0.3, 0.15)),
                                                             ("torchao", "bitsandbytes")):
        model = torch.nn.Sequential(torch.nn.Linear(320, 320, bias=False), torch.nn.Unflatten(1, (320, 1, 1)),
                                    torch.nn.Conv2d(320, 320, 3, padding=1))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # trained weights are about normal, as NF4 assumes
        model.to(torch.bfloat16)
        x = torch.randn(4, 320, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            want = model(x).float()
        bf16 = quant.weight_bytes(model)
        assert quant.quantize(model, kind, backend) == 2
        assert quant.is_quantized(model[0].weight) and isinstance(model[2], quant.QuantizedConv2d)
        assert quant.is_quantized(model[2].qweight)
        assert model[2].weight.shape == (320, 320, 3, 3)  # the layer still looks like itself to peft and sdlora
        assert quant.weight_bytes(model) <= most * bf16, (kind, backend, quant.weight_bytes(model), bf16)
        with torch.no_grad():
            got = model(x).float()
        assert float((got - want).norm() / want.norm()) < tolerance, (kind, backend)


@pytest.mark.parametrize("kind, backend", [("int8", "torchao"), ("nf4", "bitsandbytes")])
def test_generation_on_a_quantized_base_is_exact_mode_only(tmp_path, kind, backend):
    from test_formats import write_adapter

    write_adapter(tmp_path, "tiny-sd", "kohya", True, preset="full", seed=1, stem="full")  # LoCon, full precision
    g, q = torch.Generator().manual_seed(0), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    save_file({f"{q}.hada_w1_a": torch.randn(32, 2, generator=g), f"{q}.hada_w1_b": torch.randn(2, 32, generator=g),
               f"{q}.hada_w2_a": torch.randn(32, 2, generator=g), f"{q}.hada_w2_b": torch.randn(2, 32, generator=g),
               f"{q}.alpha": torch.tensor(2.0)}, str(tmp_path / "ha.safetensors"))  # LoHa: only merged
    params = Params(prompt="a red circle", seed=2, steps=3, width=64, height=64, scheduler="Euler")
    reference = Engine("tiny-sd", tmp_path)
    engine = Engine("tiny-sd", tmp_path, quantize=kind, quantize_backend=backend)
    assert quant.is_quantized(engine.base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight)
    bare = np.asarray(engine.generate(params).images[0], dtype=float)
    with_lora = np.asarray(engine.generate(params, [BlendItem("full", 1.0)]).images[0], dtype=float)
    want = np.asarray(reference.generate(params, [BlendItem("full", 1.0)]).images[0], dtype=float)
    assert np.abs(with_lora - bare).max() > 1  # the LoRA applies on the quantized base
    assert np.abs(with_lora - want).mean() < np.abs(bare - want).mean()  # and moves the image toward the full one
    with pytest.raises(ConfigError, match="use exact mode"):
        engine.generate(params, [BlendItem("full", 1.0)], "fast")
    assert np.abs(np.asarray(engine.generate(params, [], "fast").images[0], dtype=float) - bare).max() == 0  # no LoRA
    with pytest.raises(ConfigError, match="and ha can only be merged"):  # (exact mode already: not "use exact mode")
        engine.generate(params, [BlendItem("ha", 1.0)])


def test_a_missing_backend_is_named_before_any_model_loads(tmp_path, dataset, monkeypatch):
    import sdlora.train as training

    def no_torchao():
        raise ImportError("No module named 'torchao'")

    def no_bitsandbytes():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quant, "torchao", no_torchao)
    monkeypatch.setattr(quant, "bitsandbytes", no_bitsandbytes)
    monkeypatch.setattr(quant, "_installed", lambda name: True)  # as if both were there, but neither imports
    monkeypatch.setattr(training, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(training, "diagnose", lambda *a, **k: pytest.fail("the data was scanned first"))
    with pytest.raises(MissingDependencyError, match="pip install torchao"):
        train(config(tmp_path, dataset, quantize_base="nf4", quantize_backend="torchao"))
    with pytest.raises(MissingDependencyError, match="with the bitsandbytes backend needs bitsandbytes: pip install bitsandbytes"):
        train(config(tmp_path, dataset, quantize_base="nf4"))  # auto, both installed: bitsandbytes
    with pytest.raises(MissingDependencyError, match="pip install torchao"):
        Engine(build_tiny("tiny-sd"), quantize="int8", quantize_backend="torchao")
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        Engine(build_tiny("tiny-sd"), quantize="int8")
    with pytest.raises(ConfigError, match="pass --quantize-base int8 or nf4 too"):
        Engine(build_tiny("tiny-sd"), quantize_backend="torchao")
    with pytest.raises(ConfigError, match="quantize_base must be one of"):
        config(tmp_path, dataset, quantize_base="int4")
    with pytest.raises(ConfigError, match="pass --quantize-base int8 or nf4 too"):
        config(tmp_path, dataset, quantize_backend="bitsandbytes")
    with pytest.raises(ConfigError, match="quantize_backend must be one of"):
        config(tmp_path, dataset, quantize_base="nf4", quantize_backend="quanto")

    # auto: bitsandbytes where it is installed, else torchao; with neither, bitsandbytes is what the error names
    for installed, picked in (({"bitsandbytes", "torchao"}, "bitsandbytes"), ({"torchao"}, "torchao"),
                              ({"bitsandbytes"}, "bitsandbytes"), (set(), "bitsandbytes")):
        monkeypatch.setattr(quant, "_installed", lambda name, have=installed: name in have)
        assert quant.backend_for("auto") == picked and quant.backend_for("torchao") == "torchao"
    # The message names the other backend only where it is installed
    monkeypatch.setattr(quant, "_installed", lambda name: name == "torchao")
    with pytest.raises(MissingDependencyError, match="or --quantize-backend torchao, which is installed"):
        quant.require("int8", "bitsandbytes")
    monkeypatch.setattr(quant, "_installed", lambda name: False)
    with pytest.raises(MissingDependencyError, match="torchao, the other backend, is not installed either"):
        quant.require("int8", "bitsandbytes")


@pytest.mark.slow
def test_the_memory_benchmark_runs_in_its_short_mode(tmp_path):
    import json
    import subprocess
    import sys

    from test_train import ROOT

    out = tmp_path / "memory.json"
    # (one library: each row is two training processes, and torchao's training is tested above)
    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--short", "--backends", "bitsandbytes", "--out",
                           str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["tiny_sd_shaped"]
    assert set(rows) == {"fp32", "int8 (bitsandbytes)", "nf4 (bitsandbytes)"}
    nf4, int8 = rows["nf4 (bitsandbytes)"], rows["int8 (bitsandbytes)"]
    assert nf4["weight_bytes"] < int8["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert all(r["peak_rss_mib"] > 100 and isinstance(r["step_s"], float) for r in rows.values())  # (2 vs 4 steps: noisy)
