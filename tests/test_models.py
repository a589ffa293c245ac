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
    # A v-prediction model says so in its scheduler config; training and sampling both follow it.
    sched_path = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), "prediction_type": "v_prediction"}))
    v = load_base(str(tmp_path / "sd"))
    assert v.prediction_type == "v_prediction" == v.noise_scheduler().config.prediction_type
    # An SD 2.x folder: 1024-wide cross-attention.
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


def test_single_file_checkpoint_trains_with_a_local_config(tmp_path, dataset):
    """An A1111-style single file (LDM layout) loads to the same weights, offline, and trains."""
    from safetensors.torch import save_file

    from sdlora.cli import main
    from sdlora.tools.bake import checkpoint_tensors

    base = build_tiny("tiny-sd")  # written in the LDM layout as bake writes it; diffusers' converter reads it back
    save_file(checkpoint_tensors(base), str(tmp_path / "tiny.safetensors"))
    base.pipeline().save_pretrained(tmp_path / "cfg")
    loaded = load_base(str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "cfg"))
    assert loaded.family == "sd1" and loaded.name == "tiny"
    for ref, got in ((base.unet, loaded.unet), (base.vae, loaded.vae), (base.text_encoders[0], loaded.text_encoders[0])):
        a, b = ref.state_dict(), got.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["-q", "train", "--base", str(tmp_path / "tiny.safetensors"), "--base-config", str(tmp_path / "cfg"),
                 "--data", str(dataset), "--resolution", "64", "--steps", "1", "--output-dir", str(tmp_path / "o")]) == 0
    # Its native size comes from --base-config's configs, as loading it does (not SD 1.x's 512 from the keys)
    from sdlora.models import native_size

    assert native_size(str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "cfg")) == (64, "cfg's unet/config.json")
    assert native_size(str(tmp_path / "tiny.safetensors"))[0] == 512
    with pytest.raises(ModelError, match="--base-config"):
        load_base(str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "missing-folder"))


def test_hub_id_loads_from_the_local_cache_offline(tmp_path):
    """A Hub id resolves from the Hugging Face cache with the network off (the cache is laid out by hand)."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--sdlora-test--tiny" / "snapshots" / ("a" * 40)
    build_tiny("tiny-sd").pipeline().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--sdlora-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--sdlora-test--tiny" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from sdlora.models import load_base; b = load_base('sdlora-test/tiny'); "
            "print(b.family, sum(p.numel() for p in b.unet.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "sd1"
    assert int(out.stdout.split()[1]) == sum(p.numel() for p in build_tiny("tiny-sd").unet.parameters())


@pytest.mark.parametrize("name", ["toy", "tiny-sd"])
def test_loading_a_built_in_base_leaves_torchs_generator_alone(name):
    """Otherwise the LoRA's initial weights, drawn right after, would ignore --seed."""
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    load_base(name)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_prediction_type_override_reaches_every_scheduler():
    """--prediction-type changes the training target and the samplers of previews and the studio alike."""
    from sdlora.engine import Engine
    from sdlora.schedulers import SCHEDULERS, make_scheduler

    base = load_base("tiny-sd", prediction_type="v_prediction")
    assert base.prediction_type == "v_prediction"
    assert base.scheduler.config.prediction_type == "v_prediction"
    assert base.noise_scheduler().config.prediction_type == "v_prediction"
    assert base.pipeline().scheduler.config.prediction_type == "v_prediction"
    for name in SCHEDULERS:
        assert make_scheduler(name, Engine(base).base.scheduler.config).config.prediction_type == "v_prediction", name
    assert load_base("tiny-sd").scheduler.config.prediction_type == "epsilon"


def test_ddim_never_clips_latents():
    """DDIM built from a config without `clip_sample` (the toy base's) used to clip latents to [-1, 1] and draw
    mush; it must draw what it is asked, as Euler does."""
    from sdlora.engine import Engine, Params
    from sdlora.schedulers import make_scheduler
    from sdlora.toy.analyse import analyse

    engine = Engine("toy")
    assert make_scheduler("DDIM", engine.base.scheduler.config).config.clip_sample is False
    prompts = ["a red circle on a white background", "a blue square on a gray background"]
    for name in ("Euler", "DDIM"):
        images = engine.render(prompts, [0, 1], Params(prompt="", steps=25, cfg_scale=5.0, width=32, height=32,
                                                       scheduler=name), [], "fast")
        assert [(r.colour, r.shape) for r in map(analyse, images)] == [("red", "circle"), ("blue", "square")], name


@pytest.mark.parametrize("tensors, expected", [
    ({"v_pred": torch.zeros(1)}, "v_prediction"),
    ({"probe": torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.3}, "v_prediction"),
    ({"probe": torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.02}, "epsilon"),
    ({"model.diffusion_model.out.2.bias": torch.zeros(4)}, None),
])
def test_sd2_single_files_say_whether_they_are_v_prediction(tmp_path, tensors, expected):
    from safetensors.torch import save_file

    from sdlora.models import SD2_V_PROBE, sd2_prediction_type

    tensors = {SD2_V_PROBE if k == "probe" else k: v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    kind, how = sd2_prediction_type(tmp_path / "m.safetensors")
    assert kind == expected
    assert how  # always says how it was decided, or why it could not be


def test_a_folder_saved_in_half_precision_loads_in_fp32_without_its_pipeline_class(tmp_path, monkeypatch):
    """Components load one by one (the pipeline classes cost seconds of start-up a training run does not need),
    always in fp32 whatever the files hold: training and the engine cast from there."""
    import diffusers

    base = build_tiny("tiny-sdxl")
    for m in base.modules().values():
        m.half()
    base.pipeline().save_pretrained(tmp_path / "xl")
    monkeypatch.setattr(diffusers, "StableDiffusionXLPipeline", None)  # loading must not touch it
    loaded = load_base(str(tmp_path / "xl"))
    assert loaded.family == "sdxl" and len(loaded.text_encoders) == len(loaded.tokenizers) == 2
    assert {p.dtype for m in loaded.modules().values() for p in m.parameters()} == {torch.float32}
    ref = {k: v.float() for k, v in base.unet.state_dict().items()}
    assert all(torch.equal(ref[k], v) for k, v in loaded.unet.state_dict().items())
    assert type(loaded.scheduler).__name__ == type(base.scheduler).__name__
