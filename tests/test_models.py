import json

import pytest
import torch

from sdlora.errors import ModelError
from sdlora.models import build_tiny, checkpoint_family, load_base


def test_tiny_models_are_identical_for_a_seed_and_differ_across_seeds():
    a, b, c = build_tiny("tiny-sd", seed=1), build_tiny("tiny-sd", seed=1), build_tiny("tiny-sd", seed=2)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_sdxl_has_the_sdxl_parts():
    base = build_tiny("tiny-sdxl")
    assert base.family == "sdxl" and len(base.text_encoders) == 2 and len(base.tokenizers) == 2
    assert type(base.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    assert base.unet.config.addition_embed_type == "text_time"


def test_diffusers_folder_round_trip_and_family_detection(tmp_path):
    base = build_tiny("tiny-sd")
    base.pipeline().save_pretrained(tmp_path / "sd")
    loaded = load_base(str(tmp_path / "sd"))
    assert loaded.family == "sd1" and loaded.prediction_type == "epsilon"
    ref = base.unet.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.unet.state_dict().items())
    # An SD 2.x folder: 1024-wide cross-attention and a v-prediction scheduler.
    cfg_path = tmp_path / "sd" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 1024
    cfg_path.write_text(json.dumps(cfg))
    from sdlora.models import _folder_family

    assert _folder_family(tmp_path / "sd") == "sd2"


def test_sdxl_folder_is_detected(tmp_path):
    build_tiny("tiny-sdxl").pipeline().save_pretrained(tmp_path / "xl")
    assert load_base(str(tmp_path / "xl")).family == "sdxl"


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    base = build_tiny("tiny-sd")
    base.pipeline().save_pretrained(tmp_path / "sd", safe_serialization=False)
    with pytest.raises(ModelError, match="cannot load"):
        load_base(str(tmp_path / "sd"))


@pytest.mark.parametrize("keys, family", [
    (["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "model.diffusion_model.x"], "sd1"),
    (["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], "sd2"),
    (["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.ln_final.weight"], "sdxl"),
])
def test_single_file_family_from_keys(keys, family):
    assert checkpoint_family(keys) == family


def test_single_file_errors(tmp_path):
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        checkpoint_family(["foo.weight"])
    with pytest.raises(ModelError, match="refiner"):
        checkpoint_family(["conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(ModelError, match="base model file not found"):
        load_base(str(tmp_path / "missing.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02junk")
    with pytest.raises(ModelError, match="pickled"):
        load_base(str(tmp_path / "x.ckpt"))
    with pytest.raises(ModelError, match="not found"):
        load_base(str(tmp_path / "nothing-here"))
