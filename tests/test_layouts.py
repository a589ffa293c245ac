"""Every LoRA layout the README lists gives the same image in exact mode (peft adapters) and fast mode (merged).

Each file below holds the same non-zero LoRA (random A and B, alpha != rank, text encoder included where the layout
carries one), written the way its tool writes it. Exact mode once handed diffusers the file's own tensors, which lost
diffusers-layout alphas, and raised on peft-layout and `.processor.` keys: this table is what catches that.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlora.engine import BlendItem, Engine, Params
from sdlora.formats import kohya_module

from test_formats import nonzero_lora_base

RANK, ALPHA = 4, 1.0  # alpha far from rank: a lost alpha changes the image a lot (scale 0.25 vs 1)


@pytest.fixture(scope="module")
def lora_states():
    _, states, _ = nonzero_lora_base("tiny-sd", "attn", with_te=True, rank=RANK, alpha=ALPHA, seed=5)
    return states


def _pairs(states, component):
    for key, a in states[component].items():
        if key.endswith(".lora_A.weight"):
            path = key.removesuffix(".lora_A.weight")
            yield path, a, states[component][f"{path}.lora_B.weight"]


def _diffusers_meta(states):
    meta = {}
    for c in states:
        meta |= {f"{c}.r": RANK, f"{c}.lora_alpha": ALPHA}
    return {"lora_adapter_metadata": json.dumps(meta)}


def kohya(states, alpha=True):
    out = {}
    for c in states:
        for path, a, b in _pairs(states, c):
            name = kohya_module(c, path, "sd1")
            out |= {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b * (1 if alpha else ALPHA / RANK)}
            if alpha:
                out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out, {"ss_base_model_version": "sd_v1"}


def diffusers_current(states):
    out = {f"{c}.{path}.lora_{ab}.weight": t for c in states for path, a, b in _pairs(states, c)
           for ab, t in (("A", a), ("B", b))}
    return out, _diffusers_meta(states)


def diffusers_old(states):
    """diffusers before peft: `lora.down/up` in the UNet, `lora_linear_layer` in the text encoder, `.alpha` tensors."""
    out = {}
    for c in states:
        for path, a, b in _pairs(states, c):
            style = "lora" if c == "unet" else "lora_linear_layer"
            out |= {f"{c}.{path}.{style}.down.weight": a, f"{c}.{path}.{style}.up.weight": b,
                    f"{c}.{path}.alpha": torch.tensor(ALPHA)}
    return out, {}


def processor(states):
    """The oldest diffusers layout: attention-processor keys, UNet only, no alpha (scale 1)."""
    out = {}
    for path, a, b in _pairs(states, "unet"):
        block, rest = path.split(".to_", 1)  # `...attn1` and `q`, `k`, `v` or `out.0`
        proj = "to_" + rest.split(".")[0]
        out |= {f"{block}.processor.{proj}_lora.down.weight": a, f"{block}.processor.{proj}_lora.up.weight": b}
    return out, {}


def peft(states):
    """peft's own `save_pretrained` layout for one model (the UNet), alpha in no tensor (scale 1)."""
    return {f"base_model.model.{path}.lora_{ab}.weight": t for path, a, b in _pairs(states, "unet")
            for ab, t in (("A", a), ("B", b))}, {}


def mixed_ranks(states):
    """kohya with two ranks and two alphas: diffusers then needs per-module rank and alpha patterns."""
    out, meta = kohya(states)
    for i, key in enumerate(sorted(k for k in out if k.endswith(".lora_down.weight"))):
        if i % 3 == 0:
            name = key.removesuffix(".lora_down.weight")
            out[f"{name}.lora_down.weight"] = out[key][:2].clone()
            out[f"{name}.lora_up.weight"] = out[f"{name}.lora_up.weight"][:, :2].clone()
            out[f"{name}.alpha"] = torch.tensor(3.0)
    return out, meta


def locon(states):
    """kohya LoCon: the attention pairs plus conv modules, 3x3 down / 1x1 up."""
    out, meta = kohya(states)
    g = torch.Generator().manual_seed(11)
    for name, cin, cout in (("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32),
                            ("lora_unet_up_blocks_1_resnets_0_conv2", 32, 32)):
        out |= {f"{name}.lora_down.weight": torch.randn(2, cin, 3, 3, generator=g) * 0.2,
                f"{name}.lora_up.weight": torch.randn(cout, 2, 1, 1, generator=g) * 0.2, f"{name}.alpha": torch.tensor(1.0)}
    return out, meta


def locon_tucker(states):
    """LoCon with a Tucker core (`lora_mid`): peft cannot hold it, so it is merged in both modes."""
    out, meta = locon(states)
    g = torch.Generator().manual_seed(12)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    out |= {f"{name}.lora_down.weight": torch.randn(2, 32, 1, 1, generator=g) * 0.2,
            f"{name}.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=g) * 0.2}
    return out, meta


LAYOUTS = {"kohya": kohya, "kohya-no-alpha": lambda s: kohya(s, alpha=False), "diffusers": diffusers_current,
           "diffusers-old": diffusers_old, "processor": processor, "peft": peft, "mixed-ranks": mixed_ranks,
           "locon": locon, "locon-tucker": locon_tucker}

PARAMS = Params(prompt="a red circle", seed=3, steps=3, width=64, height=64, cfg_scale=5.0, scheduler="Euler")


def latents(engine, blend, mode):
    engine._ready(PARAMS, blend, mode)
    return engine.pipe(PARAMS.prompt, num_inference_steps=3, width=64, height=64, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(3), output_type="latent").images


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_and_fast_agree_for_every_layout(tmp_path, lora_states, layout):
    tensors, meta = LAYOUTS[layout](lora_states)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{layout}.safetensors"), metadata=meta)
    engine = Engine("tiny-sd", tmp_path)
    lf = engine.lora_file(tmp_path / f"{layout}.safetensors")[1]
    assert lf.layout == {"processor": "diffusers", "diffusers-old": "diffusers", "diffusers": "diffusers",
                         "peft": "peft"}.get(layout, "kohya")
    base = latents(engine, [], "exact")
    blend = [BlendItem(layout, unet=0.9, te=0.6)]
    exact, fast = latents(engine, blend, "exact"), latents(engine, blend, "fast")
    assert (exact - base).abs().max() > 1e-2  # the LoRA does something
    assert (exact - fast).abs().max() < 1e-4, layout
    images = {m: np.asarray(engine.generate(PARAMS, blend, m).images[0], dtype=float) for m in ("exact", "fast")}
    assert np.abs(images["exact"] - images["fast"]).max() <= 1  # uint8: at most one rounding step apart


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_exact_and_fast_agree_on_sdxl_with_both_text_encoders(tmp_path, layout):
    """SDXL: SGM-named UNet keys, te1/te2 (kohya) or text_encoder_2 (diffusers), alpha != rank."""
    from test_formats import write_adapter

    write_adapter(tmp_path, "tiny-sdxl", layout, True, preset="attn-mlp", alpha=1.0, stem="xl")
    engine = Engine("tiny-sdxl", tmp_path)
    assert {t.component for t in engine.lora_file(tmp_path / "xl.safetensors")[2].targets} == {
        "unet", "text_encoder", "text_encoder_2"}
    base = latents(engine, [], "exact")
    blend = [BlendItem("xl", unet=0.9, te=0.6)]
    exact, fast = latents(engine, blend, "exact"), latents(engine, blend, "fast")
    assert (exact - base).abs().max() > 1e-2
    assert (exact - fast).abs().max() < 1e-4
