"""sdlora's files against their consumers: diffusers' own loader and converters, and the LDM/SGM layout."""

import json

import pytest
import torch

from sdlora import lora
from sdlora.adapters import adapter_bytes
from sdlora.archs import meta_models
from sdlora.config import AdapterConfig
from sdlora.formats import canonical_path, unet_sgm_path
from sdlora.lorafile import fit, read_lora
from sdlora.models import build_tiny

COMPONENTS = ("text_encoder", "text_encoder_2")


def ldm_unet_oracle(unet):
    """Our diffusers→LDM/SGM names, checked by diffusers' own LDM→diffusers converter (what A1111/ComfyUI use)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = dict(unet.named_parameters())
    ldm = {}
    for name, p in params.items():
        module, _, leaf = name.rpartition(".")
        ldm[f"model.diffusion_model.{unet_sgm_path(module, unet.config)}.{leaf}"] = p
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    return params, back


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_sgm_names_match_diffusers_own_converter_tiny(name):
    params, back = ldm_unet_oracle(build_tiny(name).unet)
    assert set(back) == set(params)
    assert all(back[k] is params[k] for k in params)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sgm_names_match_diffusers_own_converter_full_size(family):
    params, back = ldm_unet_oracle(meta_models(family)["unet"])
    assert set(back) == set(params)


@pytest.mark.slow
@pytest.mark.parametrize("family, unet_count, te_count", [("sd1", 192, 72), ("sdxl", 722, 264)])
def test_attn_mlp_is_exactly_kohyas_module_set(family, unet_count, te_count):
    from sdlora.formats import kohya_module

    models = meta_models(family)
    names = {kohya_module("unet", p, family, models["unet"].config)
             for p in lora.targeted_modules(models["unet"], "attn-mlp", "unet")}
    te = set()
    for comp in COMPONENTS:
        if comp in models:
            te |= {kohya_module(comp, p, family) for p in lora.targeted_modules(models[comp], "attn-mlp", "text_encoder")}
    assert (len(names), len(te)) == (unet_count, te_count)
    # What sdlora trains: the same, less the layers the loss never reaches (SDXL's text encoder 1 last layer, 6 modules).
    trained = sum(len(lora.targeted_modules(models[c], "attn-mlp", "text_encoder", lora.unreachable(models[c], family, c)))
                  for c in COMPONENTS if c in models)
    assert trained == te_count - (6 if family == "sdxl" else 0)
    if family == "sdxl":  # kohya writes SGM names for the SDXL UNet, te1/te2 for the two encoders
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
        assert "lora_unet_output_blocks_0_1_proj_out" in names
        assert {n.split("_text_model")[0] for n in te} == {"lora_te1", "lora_te2"}
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_mid_block_attentions_0_proj_in" in names
        assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
        assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te


def nonzero_lora_base(name, preset="attn", with_te=True, rank=4, alpha=2.0, seed=0):
    """A tiny base with LoRA injected through peft and both matrices random (peft starts B at zero)."""
    base = build_tiny(name)
    cfg = AdapterConfig(rank=rank, alpha=alpha, preset=preset, train_text_encoder=with_te)
    targets = {"unet": lora.inject(base.unet, cfg, "unet")}
    if with_te:
        for i, te in enumerate(base.text_encoders):
            targets[COMPONENTS[i]] = lora.inject(te, cfg, "text_encoder")
    g = torch.Generator().manual_seed(seed)
    for m in [base.unet, *base.text_encoders]:
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    states = {"unet": lora.lora_state(base.unet)}
    if with_te:
        for i, te in enumerate(base.text_encoders):
            states[COMPONENTS[i]] = lora.lora_state(te)
    return base, states, targets


def write_adapter(tmp_path, name, layout, with_te, preset="attn", precision="fp16", alpha=2.0, seed=0, stem=None):
    base, states, targets = nonzero_lora_base(name, preset, with_te, alpha=alpha, seed=seed)
    meta = {"ss_base_model_version": "sdxl_base_v1-0" if name == "tiny-sdxl" else "sd_v1"}
    blob = adapter_bytes(states, family=base.family, rank=4, alpha=alpha, targets=targets, layout=layout,
                         precision=precision, metadata=meta, unet_config=base.unet.config)
    path = tmp_path / f"{stem or f'{name}-{layout}'}.safetensors"
    path.write_bytes(blob)
    return path, states


def expected_delta(state, path, alpha, rank, dtype=torch.float16):
    a = state[f"{path}.lora_A.weight"].to(dtype).float()
    b = state[f"{path}.lora_B.weight"].to(dtype).float()
    return (alpha / rank) * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("with_te", [False, True], ids=["unet", "unet+te"])
def test_diffusers_loads_and_fuses_exactly_what_sdlora_wrote(tmp_path, name, layout, with_te):
    path, states = write_adapter(tmp_path, name, layout, with_te, preset="full" if not with_te else "attn")
    base = build_tiny(name)
    pipe = base.pipeline()
    models = base.modules()
    before = {c: {k: v.clone() for k, v in models[c].state_dict().items()} for c in states}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(components=list(states), lora_scale=1.0)
    pipe.unload_lora_weights()
    checked = 0
    for component, state in states.items():
        after = models[component].state_dict()
        modules = {k.rsplit(".lora_", 1)[0] for k in state}
        for mod in modules:
            delta = after[f"{mod}.weight"] - before[component][f"{mod}.weight"]
            want = expected_delta(state, mod, 2.0, 4)
            assert torch.allclose(delta, want, atol=2e-5, rtol=1e-3), (component, mod)
            checked += 1
        untouched = [k for k in after if k.endswith(".weight") and k.rsplit(".", 1)[0] not in modules]
        assert all(torch.equal(after[k], before[component][k]) for k in untouched)
    assert checked == sum(len(s) // 2 for s in states.values())


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_own_save_reads_into_sdlora_with_the_same_effect(tmp_path, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base, states, targets = nonzero_lora_base(name, "attn", with_te=True, alpha=8.0)
    cls = StableDiffusionXLPipeline if name == "tiny-sdxl" else StableDiffusionPipeline
    kw = {f"{c}_lora_layers": s for c, s in states.items() if c != "unet"}
    kw.update({f"{c}_lora_adapter_metadata": {"r": 4, "lora_alpha": 8.0} for c in states})
    cls.save_lora_weights(tmp_path, unet_lora_layers=states["unet"], **kw)
    lf = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lf.layout == "diffusers"
    fresh = build_tiny(name)
    result = fit(lf, fresh.modules(), fresh.family)
    assert not result.unmatched and len(result.targets) == sum(len(s) // 2 for s in states.values())
    for t in result.targets:
        path = t.path if t.component == "unet" else t.path
        state = states[t.component]
        key = path if f"{path}.lora_A.weight" in state else canonical_path(t.component, path).removeprefix("text_model.")
        want = expected_delta(state, key, 8.0, 4, dtype=torch.float32)
        assert torch.allclose(t.module.delta(tuple(t.layer.weight.shape)), want, atol=1e-6)


def test_sdlora_reads_its_own_kohya_file_with_alpha(tmp_path):
    path, states = write_adapter(tmp_path, "tiny-sdxl", "kohya", True, preset="attn-mlp", precision="fp32", alpha=3.0)
    lf = read_lora(path)
    assert lf.layout == "kohya" and lf.family == "sdxl" and lf.family_source == "metadata"
    base = build_tiny("tiny-sdxl")
    result = fit(lf, base.modules(), "sdxl")
    assert not result.unmatched
    for t in result.targets:
        state = states[t.component]
        key = t.path if f"{t.path}.lora_A.weight" in state else t.path.removeprefix("text_model.")
        want = expected_delta(state, key, 3.0, 4, dtype=torch.float32)
        assert torch.equal(t.module.delta(tuple(t.layer.weight.shape)), want)
    assert json.loads(json.dumps(lf.metadata))["ss_base_model_version"] == "sdxl_base_v1-0"
