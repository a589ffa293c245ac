"""End-to-end training through the CLI on tiny models, plus the training guarantees (learning, resume, sharding)."""

import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdlora import lora
from sdlora.cli import main
from sdlora.config import AdapterConfig, DataConfig, TrainConfig
from sdlora.errors import ConfigError, DataError
from sdlora.formats import kohya_module
from sdlora.models import load_base
from sdlora.train import train

from conftest import make_dataset

ROOT = Path(__file__).resolve().parent.parent


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def expected_kohya_modules(base_name, preset, with_te):
    base = load_base(base_name)
    names = {kohya_module("unet", p, base.family, base.unet.config)
             for p in lora.targeted_modules(base.unet, preset, "unet")}
    if with_te:
        for i, te in enumerate(base.text_encoders):
            comp = "text_encoder" if i == 0 else "text_encoder_2"
            skip = lora.unreachable(te, base.family, comp)
            names |= {kohya_module(comp, p, base.family) for p in lora.targeted_modules(te, preset, "text_encoder", skip)}
    return names


def json_keys_ok(meta):
    """The ss_*/modelspec keys readers use are present and their JSON values parse."""
    import json

    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_network_args"):
        json.loads(meta[key])
    needed = {"ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name",
              "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate",
              "ss_training_started_at", "ss_training_finished_at", "ss_seed", "modelspec.sai_model_spec",
              "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.resolution"}
    assert needed <= meta.keys(), needed - meta.keys()
    assert json.loads(meta["ss_tag_frequency"]) == {"5_sks": {"sks": 4, "a red circle": 4, "white background": 4}}
    return True


def render(base_name, lora_path=None, prompt="sks, a red circle", fused=False):
    """An image from the base training used (--seed 42 builds the tiny base): bare, with the LoRA loaded by
    diffusers' own loader, or (fused) with ΔW = (alpha/rank)·up·down added to the weights by hand."""
    base = load_base(base_name, seed=42)
    pipe = base.pipeline()
    if lora_path and fused:
        from sdlora.lorafile import fit, read_lora

        with torch.no_grad():
            for t in fit(read_lora(lora_path), base.modules(), base.family).targets:
                up, down = t.module.tensors["up"].float(), t.module.tensors["down"].float()
                t.layer.weight += (up.flatten(1) @ down.flatten(1)).reshape(t.layer.weight.shape) * t.module.scale
    elif lora_path:
        pipe.load_lora_weights(str(lora_path), adapter_name="t")
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]


@pytest.mark.parametrize("base_name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("with_te", [False, True], ids=["unet", "unet+te"])
def test_cli_trains_an_adapter_every_tool_can_load(tmp_path, dataset, base_name, with_te):
    out = tmp_path / "out"
    argv = ["-q", "train", "--base", base_name, "--data", str(dataset), "--resolution", "64", "--steps", "3",
            "--lr", "1e-2", "--rank", "4", "--alpha", "2", "--output-dir", str(out), "--trigger", "sks"]
    if with_te:
        argv += ["--train-text-encoder", "--text-encoder-lr", "5e-3"]
    assert main(argv) == 0
    path = out / "data.safetensors"
    tensors, meta = read(path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert modules == expected_kohya_modules(base_name, "attn", with_te)
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors)
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    assert {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {2.0}
    ups = {k: t for k, t in tensors.items() if k.endswith("lora_up.weight")}
    assert all(t.abs().sum() > 0 for k, t in ups.items() if k.startswith("lora_unet"))  # trained: B left zero-init
    for prefix in {k.split("_text_model")[0] for k in ups if "_text_model" in k}:
        # Not every text-encoder layer is on the gradient path (SDXL reads the penultimate layer), but the first layer is.
        first = [t for k, t in ups.items() if k.startswith(prefix + "_text_model_encoder_layers_0_")]
        assert len(first) == 4 and all(t.abs().sum() > 0 for t in first)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if base_name == "tiny-sdxl" else "sd_v1")
    assert meta["modelspec.trigger_phrase"] == "sks" and "sshs_model_hash" in meta
    assert "/" not in meta["sdlora_dataset"] and str(tmp_path) not in "".join(meta.values())
    before, after, fused = render(base_name), render(base_name, path), render(base_name, path, fused=True)
    assert np.abs(before - after).max() > 1e-2  # the LoRA changes the image
    assert np.abs(after - fused).max() < 1e-3  # and diffusers applies exactly the update the file describes
    assert (out / "logs" / "loss.csv").read_text().count("\n") == 4
    assert (out / "loss.png").stat().st_size > 0
    sidecar = __import__("json").loads((out / "data.json").read_text())
    assert sidecar["activation text"] == "sks" and sidecar["preferred weight"] == 1.0
    assert sidecar["sd version"] == ("SDXL" if base_name == "tiny-sdxl" else "SD1")
    assert json_keys_ok(meta)
    assert any((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_it_learns(tmp_path):
    data = make_dataset(tmp_path / "one", n=1, folder="1_x")
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path / "out", steps=200, lr=1e-3,
                      data=DataConfig(data=data, resolution=64), adapter=AdapterConfig(rank=8, preset="full"))
    losses = train(cfg).losses
    ratio = statistics.mean(losses[-20:]) / statistics.mean(losses[:20])
    # Measured 0.29 on 2026-11-23 (CPU, 2 cores); a broken gradient path stays near 1.
    assert ratio < 0.5, ratio


def test_resume_is_bit_identical(tmp_path, dataset):
    def cfg(out, **kw):
        return TrainConfig(**{"base": "tiny-sd", "output_dir": out, "name": "r", "steps": 6, "save_every": 3,
                              "lr": 5e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "grad_accum": 2,
                              "batch_size": 2, "save_precision": "fp32", **kw},
                           data=DataConfig(data=dataset, resolution=64, flip=True, shuffle_tags=True,
                                           caption_dropout=0.2),
                           adapter=AdapterConfig(rank=4, dropout=0.1))

    full = train(cfg(tmp_path / "a"))
    assert (tmp_path / "a" / "r-step000003.safetensors").is_file()
    state = tmp_path / "a" / "state" / "r-step000003.state.safetensors"
    assert state.is_file() and (tmp_path / "a" / "state" / "r-step000006.state.safetensors").is_file()
    reference, _ = read(full.adapter)
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in reference.items())  # it trained
    before = full.adapter.read_bytes()
    with pytest.raises(ConfigError, match="resumed run would replace it"):
        train(cfg(tmp_path / "a", resume=str(state)))
    assert full.adapter.read_bytes() == before
    with pytest.raises(ConfigError, match="at step 6 and this run has 6 steps"):
        train(cfg(tmp_path / "a", resume="latest", overwrite=True))
    resumed = train(cfg(tmp_path / "a", resume=str(state), overwrite=True))
    assert resumed.steps == 6 and resumed.losses == full.losses
    again, _ = read(resumed.adapter)
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    longer = train(cfg(tmp_path / "a", resume="latest", overwrite=True, steps=8))  # train on from the end
    assert longer.steps == 8 and longer.losses[:6] == full.losses


def test_resume_refuses_a_changed_setting(tmp_path, dataset, capsys):
    base = dict(base="tiny-sd", output_dir=tmp_path, name="r", steps=2, save_every=1,
                data=DataConfig(data=dataset, resolution=64))
    train(TrainConfig(**base, adapter=AdapterConfig(rank=4)))
    assert main(["-q", "train", "--data", str(dataset), "--resolution", "64", "--output-dir", str(tmp_path),
                 "--name", "r", "--steps", "3", "--rank", "8", "--resume", "latest", "--overwrite"]) == 2
    assert "rank was 4 and is now 8" in capsys.readouterr().err
    other = tmp_path / "other_data"
    shutil.copytree(dataset, other)
    with pytest.raises(ConfigError, match="data was"):
        train(TrainConfig(**{**base, "data": DataConfig(data=other, resolution=64), "steps": 3}, overwrite=True,
                          resume="latest", adapter=AdapterConfig(rank=4)))


def test_config_file_drives_a_run(tmp_path, dataset):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'base = "tiny-sd"\ndata = "{dataset}"\noutput-dir = "{tmp_path / "o"}"\nsteps = 2\n'
                   '[dataset]\nresolution = 64\n[adapter]\nrank = 2\npreset = "attn-mlp"\n')
    assert main(["-q", "train", "--config", str(cfg), "--name", "fromtoml"]) == 0
    tensors, meta = read(tmp_path / "o" / "fromtoml.safetensors")
    assert meta["ss_network_dim"] == "2"
    assert any("proj_in" in k for k in tensors) and any("ff_net_2" in k for k in tensors)


def test_latent_cache_on_disk_is_reused_and_invalidated(tmp_path, dataset):
    cache = tmp_path / "cache"
    args = ["-q", "train", "--data", str(dataset), "--resolution", "64", "--steps", "1", "--cache-dir", str(cache),
            "--output-dir", str(tmp_path / "o"), "--overwrite"]
    assert main(args) == 0
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(files) == 4
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == files
    img = next(dataset.rglob("img0.png"))
    from PIL import Image

    Image.new("RGB", (64, 64), (0, 255, 0)).save(img)
    assert main(args) == 0
    assert len(list(cache.glob("*.safetensors"))) == 5  # the changed image got a new entry


def test_samples_and_intermediate_saves(tmp_path, dataset):
    out = tmp_path / "o"
    assert main(["-q", "train", "--data", str(dataset), "--resolution", "64", "--steps", "4", "--save-every", "2",
                 "--sample-prompt", "sks", "--sample-prompt", "a circle", "--sample-every", "2",
                 "--sample-steps", "2", "--output-dir", str(out), "--name", "s"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "s-step000002-0.png", "s-step000002-1.png", "s-step000004-0.png", "s-step000004-1.png"]
    assert (out / "s-step000002.safetensors").is_file() and (out / "s.preview.png").is_file()


def test_a_fresh_run_keeps_an_earlier_runs_checkpoints_and_states_unless_overwrite(tmp_path, dataset, capsys):
    """An interrupted run leaves checkpoints and states but no final adapter; a fresh run of the same name would
    replace its resume point and mix the two runs' checkpoints."""
    out = tmp_path / "o"
    args = ["train", "--data", str(dataset), "--resolution", "64", "--save-every", "2", "--output-dir", str(out)]
    assert main([*args, "--steps", "4"]) == 0
    (out / "data.safetensors").unlink()  # as if it had stopped after step 4
    before = {p: p.read_bytes() for p in [*out.glob("data-step*.safetensors"), *(out / "state").iterdir()]}
    assert len(before) == 3  # the step-2 checkpoint, the step-2 and step-4 states
    capsys.readouterr()
    assert main([*args, "--steps", "2", "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "earlier run named 'data'" in err and "--resume latest" in err
    assert all(p.read_bytes() == b for p, b in before.items())
    assert main([*args, "--steps", "3", "--lr", "5e-4", "--overwrite"]) == 0  # one run in the folder again
    assert sorted(p.name for p in out.glob("data*.safetensors")) == ["data-step000002.safetensors", "data.safetensors"]
    assert sorted(p.name for p in (out / "state").iterdir()) == ["data-step000002.state.safetensors",
                                                                 "data-step000003.state.safetensors"]
    assert (out / "data-step000002.safetensors").read_bytes() != before[out / "data-step000002.safetensors"]


def test_the_runs_toml_repeats_and_resumes_it_from_another_folder(tmp_path, dataset, monkeypatch, capsys):
    """Paths typed relative to where the run started are saved absolute: `--config NAME.toml` works anywhere."""
    import shutil

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(dataset, tmp_path / "a" / "imgs")
    monkeypatch.chdir(tmp_path / "a")
    assert main(["-q", "train", "--data", "imgs", "--resolution", "64", "--steps", "1", "--save-every", "1",
                 "--output-dir", "out"]) == 0
    toml = tmp_path / "a" / "out" / "imgs.toml"
    assert f'data = "{tmp_path / "a" / "imgs"}"' in toml.read_text() and 'base = "tiny-sd"' in toml.read_text()
    monkeypatch.chdir(tmp_path / "b")
    assert main(["-q", "train", "--config", str(toml), "--name", "again"]) == 0
    assert (tmp_path / "a" / "out" / "again.safetensors").is_file()
    # and resumes the run from there, without taking the other spelling of its folder for changed images
    capsys.readouterr()
    assert main(["train", "--config", str(toml), "--resume", "latest", "--steps", "2", "--overwrite"]) == 0
    assert "changed since" not in capsys.readouterr().err


def test_a_cache_dir_that_cannot_be_used_says_so(tmp_path, dataset, capsys):
    assert main(["train", "--data", str(dataset), "--resolution", "64", "--steps", "1", "--flip", "--cache-dir",
                 str(tmp_path / "cache"), "--output-dir", str(tmp_path / "o")]) == 0
    assert "--cache-dir" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_no_usable_image_names_why(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "d").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / "d" / f"{i}.png")
    assert main(["train", "--data", str(tmp_path / "d"), "--resolution", "64", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "3 file(s) skipped, for example 0.png: too small (32x32)" in err and "--upscale" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/folder"], "data folder not found: /nonexistent/folder"),
    (["--data", "{empty}"], "no usable image in"),
    (["--base", "nope/notcached", "--data", "{data}"], "not in the local Hugging Face cache"),
    (["--base", "model.ckpt", "--data", "{data}"], "only reads .safetensors"),
    # a mistyped base is named before the data is scanned (it used to fall back to 64 px and refuse the images)
    (["--base", "toyy", "--data", "{data}"], "base model 'toyy' not found"),
    (["--base", "/nonexistent/model", "--data", "{data}"], "base model '/nonexistent/model' not found"),
    (["--data", "{data}", "--output-dir", "{data}"], "is the data folder"),
    (["--data", "{data}", "--cache-dir", "{data}"], "is the data folder"),
])
def test_errors_are_one_clear_line(tmp_path, dataset, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", data=dataset) for a in argv]
    code = main(["train", "--output-dir", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_flag_and_existing_adapter(tmp_path, dataset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--rnak", "4"])
    assert e.value.code == 2 and "--rnak" in capsys.readouterr().err
    args = ["-q", "train", "--data", str(dataset), "--resolution", "64", "--steps", "1", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "data.safetensors").read_bytes()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "data.safetensors").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sd-ragged", "sdxl-text-encoders", "sd-int8-base", "sd-nf4-bitsandbytes",
                                  "sdxl-new-token"])
def test_two_processes_match_one(tmp_path, case):
    """sd-ragged: 3 images in global batches of 2, so every epoch ends in a batch of one sample (which must not
    count twice), with --train-weight-min, whose weight for a step every process must draw alike.
    sdxl-text-encoders: SDXL with LoRA on both text encoders (DDP refuses a LoRA without gradient).
    sd-int8-base: a quantized base (torchao's tensor subclasses go through DDP's start-up broadcast).
    sd-nf4-bitsandbytes: a base quantized by bitsandbytes, peft's bitsandbytes LoRA layers under DDP.
    sdxl-new-token: pivotal tuning, whose text encoders train only their new tokens' vectors, fixed after step 2."""
    if case == "sdxl-new-token":
        data = make_dataset(tmp_path / "data", caption="<zz>, a red circle")
        extra = ["--base", "tiny-sdxl", "--train-embedding", "<zz>:2", "--embedding-steps", "2", "--steps", "3"]
    elif case == "sd-ragged":
        data = make_dataset(tmp_path / "data", n=3, folder="")
        extra = ["--steps", "4", "--train-weight-min", "0.3", "--train-text-encoder"]
    elif case == "sd-int8-base":
        data = make_dataset(tmp_path / "data")
        extra = ["--steps", "3", "--quantize-base", "int8", "--quantize-backend", "torchao", "--train-text-encoder"]
    elif case == "sd-nf4-bitsandbytes":
        data = make_dataset(tmp_path / "data")
        extra = ["--steps", "3", "--quantize-base", "nf4", "--quantize-backend", "bitsandbytes", "--preset", "full"]
    else:
        data = make_dataset(tmp_path / "data")
        extra = ["--base", "tiny-sdxl", "--train-text-encoder", "--steps", "3"]
    common = ["train", "--data", str(data), "--resolution", "64", "--lr", "1e-2", "--rank", "4",
              "--save-precision", "fp32", "--name", "m", *extra]
    assert main(["-q", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sdlora", "-q", *common, "--batch-size", "1", "--output-dir", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = read(tmp_path / "one" / "m.safetensors")
    b, _ = read(tmp_path / "two" / "m.safetensors")
    assert a.keys() == b.keys()
    # Same global batch, same per-sample noise: only float summation order differs (gloo all-reduce of two
    # gradients vs one batch mean), which Adam's normalisation amplifies for near-zero gradients. Measured
    # 2026-11-23: worst difference 1e-4 on weights of scale 4e-2, so 0.25% of the scale.
    scale = max(a[k].abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 0.01 * scale, (worst, scale)
    mean_rel = sum((a[k] - b[k]).norm() for k in a) / sum(a[k].norm() for k in a)
    assert mean_rel < 1e-3, mean_rel
    assert not (tmp_path / "two" / "state").exists() and len(list((tmp_path / "two").glob("*.safetensors"))) == 1


def test_same_seed_same_adapter_and_every_loss_option(tmp_path, dataset):
    def run(out):
        cfg = TrainConfig(base="tiny-sd", output_dir=out, steps=3, lr=1e-3, min_snr_gamma=5.0, noise_offset=0.05,
                          prediction_type="v_prediction", gradient_checkpointing=True, lr_scheduler="linear",
                          warmup_steps=1, save_precision="bf16",
                          data=DataConfig(data=dataset, resolution=64, crop="random"),
                          adapter=AdapterConfig(rank=4, preset="full", train_text_encoder=True))
        result = train(cfg)
        assert all(np.isfinite(result.losses))
        return read(result.adapter)

    (a, meta), (b, _) = run(tmp_path / "a"), run(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # peft starts every lora_up at zero, so "equal" only means something once training has moved them.
    ups = [a[k] for k in a if k.endswith("lora_up.weight")]
    assert sum(bool(u.abs().max() > 0) for u in ups) > len(ups) // 2
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v_prediction"
    assert any("resnets_0_conv1" in k for k in a) and any("downsamplers_0_conv" in k for k in a)
    assert a[next(k for k in a if k.endswith("lora_up.weight"))].dtype == torch.bfloat16


def test_epochs_diffusers_format_and_prodigy(tmp_path, dataset):
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path, epochs=2, batch_size=4, grad_accum=2, optimizer="prodigy",
                      lr=1.0, format="diffusers", data=DataConfig(data=dataset, resolution=64),
                      adapter=AdapterConfig(rank=4, alpha=8))
    result = train(cfg)
    assert result.steps == 5  # 20 samples / batch 4 = 5 batches an epoch; 2 epochs / accumulation 2 = 5 steps
    tensors, meta = read(result.adapter)
    assert all(k.startswith("unet.") and ".lora_" in k for k in tensors)
    lam = __import__("json").loads(meta["lora_adapter_metadata"])
    assert lam["unet.r"] == 4 and lam["unet.lora_alpha"] == 8


def test_adamw8bit_keeps_8bit_states_and_resumes(tmp_path, dataset):
    """bitsandbytes' AdamW8bit (on the CPU too since bitsandbytes 0.48): states of 4096 values or more (here the
    rank-8 LoRA of the 64-channel 3x3 convolutions) are held in 8 bits, and they survive a resume."""
    from sdlora.safefiles import read_safetensors

    def config(**kw):
        return TrainConfig(base="tiny-sd", output_dir=tmp_path, name="o", steps=4, lr=1e-2, save_every=2,
                           save_precision="fp32", optimizer="adamw8bit", data=DataConfig(data=dataset, resolution=64),
                           adapter=AdapterConfig(rank=8, preset="full"), **kw)

    result = train(config())
    assert all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]
    tensors, _ = read(result.adapter)
    state = tmp_path / "state" / "o-step000002.state.safetensors"
    saved, _ = read_safetensors(state, check_finite=False)
    assert any(k.startswith("optim.") and k.endswith(".state1") and t.dtype == torch.uint8 for k, t in saved.items())
    resumed = train(config(resume=str(state), overwrite=True))
    again, _ = read(resumed.adapter)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_missing_optional_optimizer_says_what_to_install(tmp_path, dataset, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    assert main(["train", "--data", str(dataset), "--optimizer", "prodigy", "--output-dir", str(tmp_path)]) == 2
    assert "pip install prodigyopt" in capsys.readouterr().err


def test_latent_cache_key_sees_deep_vae_changes_and_the_scaling_factor():
    from sdlora.train import _vae_fingerprint

    vae = load_base("tiny-sd").vae
    first = _vae_fingerprint(vae)
    assert _vae_fingerprint(vae) == first
    with torch.no_grad():
        vae.encoder.conv_out.weight[0, 0, 0, 0] += 0.01  # a fine-tune that left conv_in alone
    second = _vae_fingerprint(vae)
    assert second != first
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * 2)
    assert _vae_fingerprint(vae) not in (first, second)


def test_samples_decode_in_fp32_outside_autocast(tmp_path, monkeypatch):
    """Under fp16 autocast on CUDA the VAE would decode in fp16, where SDXL's overflows (black previews)."""
    from sdlora.run import Run, write_samples

    base = load_base("tiny-sdxl")
    seen = []
    decode = base.vae.decode

    def spy(z, *args, **kwargs):
        seen.append((z.dtype, torch.is_autocast_enabled("cpu")))
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(base.vae, "decode", spy)

    class Accelerator:  # what mixed precision looks like to the sampler, on the CPU
        is_main_process, device = True, torch.device("cpu")

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    cfg = TrainConfig(sample_prompt=["sks, a circle"], sample_steps=2, data=DataConfig(resolution=64),
                      output_dir=tmp_path)
    paths = write_samples(Run(cfg, Accelerator(), None, "n", base=base, step=1))
    assert seen == [(torch.float32, False)]
    with Image.open(paths[0]) as img:
        assert img.size == (64, 64) and np.asarray(img).std() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_matches_a_direct_computation(monkeypatch, prediction_type, gamma):
    """The training loss against the formulas written out here: x_t = sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε; target ε, or
    v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0; min-SNR weight min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR+1) (v), SNR = ᾱ/(1-ᾱ).
    Timesteps 10, 500 and 990 put the SNR above and below γ, so the clipping is exercised."""
    from sdlora import loss as training

    base = load_base("tiny-sd", prediction_type=prediction_type)
    cfg = TrainConfig(min_snr_gamma=gamma, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    monkeypatch.setattr(training, "noise_and_timesteps", lambda latents, slots, cfg, n: (noise, t))
    captions = ["a red circle", "a blue square", "sks"]
    batch = {"slot": torch.arange(3), "latents": x0, "caption": captions, "share": torch.full((3,), 1 / 3)}
    sched = base.noise_scheduler()
    with torch.no_grad():
        got = training.batch_loss(batch, base, base.unet, base.text_encoders, sched, cfg, torch.device("cpu"),
                                   torch.float32, None, False)
        acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        ids = base.tokenizers[0](captions, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        pred = base.unet(acp.sqrt() * x0 + (1 - acp).sqrt() * noise, t, base.text_encoders[0](ids)[0]).sample
    target = noise if prediction_type == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * x0
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = (acp / (1 - acp)).flatten()
    if gamma:
        assert (snr > gamma).any() and (snr < gamma).any()
        per_sample = per_sample * torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(got, per_sample.mean(), rtol=1e-5), (got, per_sample.mean())


def test_noise_offset_adds_one_constant_per_channel():
    """Offset noise (Guttenberg 2023): on top of the per-pixel noise, one random constant per channel and image."""
    from sdlora.loss import noise_and_timesteps

    latents = torch.zeros(2, 4, 8, 8)
    plain, t0 = noise_and_timesteps(latents, [3, 4], TrainConfig(), 1000)
    offset, t1 = noise_and_timesteps(latents, [3, 4], TrainConfig(noise_offset=0.1), 1000)
    shift = offset - plain
    per_channel = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)  # constant over each channel
    assert 0.005 < per_channel.abs().mean() < 0.3 and len(set(per_channel.flatten().tolist())) == 8


def test_timesteps_keep_to_the_range_asked_for():
    """kohya's --min_timestep / --max_timestep: the sampled timesteps stay in [min, max), and the same seed
    gives the same noise whatever the range."""
    from sdlora.loss import noise_and_timesteps

    latents, slots = torch.zeros(64, 4, 2, 2), list(range(64))
    noise, every = noise_and_timesteps(latents, slots, TrainConfig(), 1000)
    low_noise, low = noise_and_timesteps(latents, slots, TrainConfig(max_timestep=200), 1000)
    _, high = noise_and_timesteps(latents, slots, TrainConfig(min_timestep=900), 1000)
    assert low.max() < 200 and high.min() >= 900 and every.max() >= 200 and every.min() < 900
    assert torch.equal(noise, low_noise)
    with pytest.raises(ConfigError, match="max_timestep at most 1000"):
        noise_and_timesteps(latents, slots, TrainConfig(max_timestep=2000), 1000)
    with pytest.raises(ConfigError, match="keep min_timestep below max_timestep"):
        noise_and_timesteps(latents, slots, TrainConfig(min_timestep=1000), 1000)


def test_a_shared_caption_tag_is_recorded_as_the_trigger(tmp_path):
    """The demo's captions all begin with `rimstyle`: with no --trigger, that is what metadata, the A1111 sidecar,
    inspect and the studio's cards must show."""
    import json

    from sdlora.convert import info
    from sdlora.engine import LoraLibrary

    data = make_dataset(tmp_path / "data", n=2, caption="zzstyle, a red circle")
    assert main(["-q", "train", "--data", str(data), "--resolution", "64", "--steps", "1", "--output-dir",
                 str(tmp_path / "o"), "--name", "z"]) == 0
    _, meta = read(tmp_path / "o" / "z.safetensors")
    assert meta["modelspec.trigger_phrase"] == "zzstyle"
    assert json.loads((tmp_path / "o" / "z.json").read_text())["activation text"] == "zzstyle"
    assert info(tmp_path / "o" / "z.safetensors")["trigger_words"] == ["zzstyle"]
    assert LoraLibrary(tmp_path / "o", "sd1").entries["z"].triggers == ["zzstyle"]


def test_regularisation_images_train_and_are_recorded(tmp_path, dataset, caplog):
    reg = make_dataset(tmp_path / "reg", n=3, folder="1_circle", caption="a circle")
    with caplog.at_level("INFO", logger="sdlora"):
        result = train(TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", steps=3, lr=1e-2, batch_size=2,
                                   prior_loss_weight=0.5,
                                   data=DataConfig(data=dataset, resolution=64, reg_data=reg, trigger="sks"),
                                   adapter=AdapterConfig(rank=4)))
    assert "regularisation: 3 images" in caplog.text and "20 of them used per epoch" in caplog.text
    _, meta = read(result.adapter)
    assert meta["ss_num_reg_images"] == "3" and meta["ss_prior_loss_weight"] == "0.5"
    assert "1_circle" in meta["ss_reg_dataset_dirs"] and meta["ss_num_train_images"] == "4"
    with pytest.raises(DataError, match="no usable regularisation image"):
        (tmp_path / "empty").mkdir()
        train(TrainConfig(base="tiny-sd", output_dir=tmp_path / "o2", steps=1,
                          data=DataConfig(data=dataset, resolution=64, reg_data=tmp_path / "empty")))


def test_every_default_fits_the_toy_base(tmp_path, monkeypatch, capfd):
    """As a new user tries it: small images and no options but the base. Nothing is skipped as too small, the run
    trains at the toy's 32 px, and the adapter lands in outputs/, the folder every other command uses."""
    data = make_dataset(tmp_path / "mine", n=2, folder="", size=(32, 32))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--base", "toy", "--data", str(data), "--steps", "1"]) == 0
    printed = "".join(capfd.readouterr())
    out = tmp_path / "outputs" / "mine.safetensors"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_num_train_images"] == "2"
    assert "resolution 32 px: the toy base's native size" in printed and "2 images found, 2 used, 0 skipped" in printed
    # the dataset doctor's report comes before the base loads: captions, buckets, memory
    assert "captions: all present and readable" in printed and "estimated training memory" in printed


def test_ema_decay_0_is_the_raw_weights_and_resume_with_ema_is_bit_identical(tmp_path, dataset):
    def cfg(out, **kw):
        return TrainConfig(**{"base": "tiny-sd", "output_dir": out, "name": "e", "steps": 4, "save_every": 2,
                              "lr": 5e-3, "batch_size": 2, "save_precision": "fp32", **kw},
                           data=DataConfig(data=dataset, resolution=64), adapter=AdapterConfig(rank=4))

    raw, _ = read(train(cfg(tmp_path / "raw")).adapter)
    zero, meta = read(train(cfg(tmp_path / "zero", ema_decay=0.0)).adapter)
    # decay 0: the average is the weights themselves (s - (s - p) = p, up to float32 rounding)
    assert meta["sdlora_ema_decay"] == "0.0" and all(torch.allclose(raw[k], zero[k], rtol=1e-6, atol=1e-7) for k in raw)
    full = train(cfg(tmp_path / "a", ema_decay=0.9))
    averaged, _ = read(full.adapter)
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert any(not torch.equal(raw[k], averaged[k]) for k in ups)  # the average is not the last step's weights
    state = tmp_path / "a" / "state" / "e-step000002.state.safetensors"
    resumed = train(cfg(tmp_path / "a", ema_decay=0.9, resume=str(state), overwrite=True))
    again, _ = read(resumed.adapter)
    assert all(torch.equal(averaged[k], again[k]) for k in averaged)
    with pytest.raises(ConfigError, match="ema_decay was 0.9 and is now None"):
        train(cfg(tmp_path / "a", resume=str(state), overwrite=True))


def test_the_progress_bar_shows_the_effective_learning_rate(tmp_path, dataset, capfd):
    assert main(["train", "--data", str(dataset), "--resolution", "64", "--steps", "1", "--alpha", "4",
                 "--output-dir", str(tmp_path / "o")]) == 0
    printed = "".join(capfd.readouterr())
    assert "lr=1.00e-04, effective lr=2.50e-05" in printed  # 1e-4 x alpha 4 / rank 16
    assert "learning rate 0.0001 x alpha 4 / rank 16 = 2.5e-05 effective" in printed


def test_train_weight_scales_the_update_while_it_learns_and_a_weight_range_resumes_bit_identically(
        tmp_path, dataset, monkeypatch):
    import json

    import sdlora.train as train_module
    from sdlora.engine import Engine

    seen = []  # the weight the UNet's adapter had at each forward pass of the loss
    real_loss = train_module.batch_loss

    def spying_loss(batch, base, unet, *args, **kw):
        layer = next(m for m in base.unet.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling)
        seen.append(layer.scaling[lora.ADAPTER] / (layer.lora_alpha[lora.ADAPTER] / layer.r[lora.ADAPTER]))
        return real_loss(batch, base, unet, *args, **kw)

    monkeypatch.setattr(train_module, "batch_loss", spying_loss)

    def cfg(out, **kw):
        return TrainConfig(**{"base": "tiny-sd", "output_dir": out, "name": "w", "steps": 6, "save_every": 3,
                              "lr": 5e-3, "batch_size": 2, "save_precision": "fp32", **kw},
                           data=DataConfig(data=dataset, resolution=64), adapter=AdapterConfig(rank=4, alpha=2))

    half = train(cfg(tmp_path / "half", train_weight=0.5))
    assert seen == pytest.approx([0.5] * 6)
    _, meta = read(half.adapter)
    assert meta["sdlora_train_weight"] == "0.5" and meta["sdlora_preferred_weight"] == "0.5"
    assert "sdlora_train_weight_min" not in meta
    from sdlora.convert import format_info, info

    assert "sdlora_train_weight: 0.5" in format_info(info(half.adapter))  # `sdlora inspect` says so
    assert json.loads(half.adapter.with_suffix(".json").read_text())["preferred weight"] == 0.5
    # the studio puts it in at the weight it learned at
    assert Engine("tiny-sd", lora_files=[half.adapter]).library.entries["w"].preferred_weight == 0.5

    seen.clear()
    full = train(cfg(tmp_path / "range", train_weight_min=0.25))
    drawn = list(seen)
    assert len(drawn) == 6 and all(0.25 <= w <= 1.0 for w in drawn) and len(set(drawn)) == 6
    adapter, meta = read(full.adapter)
    assert (meta["sdlora_train_weight"], meta["sdlora_train_weight_min"]) == ("1", "0.25")
    seen.clear()
    state = tmp_path / "range" / "state" / "w-step000003.state.safetensors"
    again, _ = read(train(cfg(tmp_path / "range", train_weight_min=0.25, resume=str(state), overwrite=True)).adapter)
    assert seen == drawn[3:]  # the resumed steps draw the weights the uninterrupted run drew
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)
    with pytest.raises(ConfigError, match="train_weight_min was 0.25 and is now 0.5"):
        train(cfg(tmp_path / "range", train_weight_min=0.5, resume=str(state), overwrite=True))


@pytest.mark.parametrize("options, message", [
    ({"train_weight": 0.0}, "train_weight must be above 0"),
    ({"train_weight_min": 1.0}, r"train_weight_min must be above 0 and below train_weight \(1.0\), got 1.0"),
    ({"train_weight": 0.5, "train_weight_min": 0.8}, "below train_weight"),
    ({"compile": True, "train_weight_min": 0.5}, "--compile and --train-weight-min do not go together"),
])
def test_train_weight_refusals(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_compile_wraps_the_unet_and_trains_the_same_adapter(tmp_path, dataset, monkeypatch, caplog):
    import logging

    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kw):  # inductor takes minutes on a CPU: what this checks is the wiring around it
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)

    def cfg(out, **kw):
        return TrainConfig(**{"base": "tiny-sd", "output_dir": out, "name": "c", "steps": 3, "lr": 5e-3,
                              "batch_size": 2, "save_precision": "fp32", **kw},
                           data=DataConfig(data=dataset, resolution=64), adapter=AdapterConfig(rank=4))

    plain, _ = read(train(cfg(tmp_path / "plain")).adapter)
    assert compiled == []
    with caplog.at_level(logging.INFO):
        fast, _ = read(train(cfg(tmp_path / "fast", compile=True)).adapter)
    assert len(compiled) == 1  # the UNet, once
    # the same adapter, under the same keys (saving reads the module, not the compiled wrapper)
    assert fast.keys() == plain.keys()
    assert all(torch.allclose(plain[k], fast[k], rtol=1e-4, atol=1e-6) for k in plain)
    assert any(not torch.equal(fast[k], torch.zeros_like(fast[k])) for k in fast if "lora_up" in k)
    assert "first step, with torch.compile's compilation" in caplog.text


def test_worker_processes_start_once_and_train_what_the_main_process_does(tmp_path, dataset, monkeypatch):
    """--num-workers: one loader for the whole run (its workers are not started again each epoch), and the images
    they prepare, random crops and flips included, are the ones the main process would: the same adapter."""
    from torch.utils.data import dataloader

    started = []
    real_init = dataloader._MultiProcessingDataLoaderIter.__init__
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__",
                        lambda self, loader: started.append(loader.worker_init_fn) or real_init(self, loader))

    def run(out, workers):
        cfg = TrainConfig(base="tiny-sd", output_dir=out, steps=12, batch_size=4, lr=1e-3, num_workers=workers,
                          cache_latents=False, data=DataConfig(data=dataset, resolution=64, crop="random", flip=True),
                          adapter=AdapterConfig(rank=4))
        return train(cfg)

    plain = run(tmp_path / "plain", 0)
    assert not started
    workers = run(tmp_path / "workers", 2)
    assert len(started) == 1  # 12 steps of 5 batches an epoch: three epochs, one start
    # A terminal's Ctrl-C reaches the workers too: they leave it to the main process, which saves at the step's end.
    import sdlora.train as training

    assert started[0] is training._worker_ignores_signals
    code = ("import os, signal; from sdlora.train import _worker_ignores_signals as f; f(0); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); print('alive')")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout.strip() == "alive"
    assert workers.steps == plain.steps == 12 and workers.losses == plain.losses
    a, b = read(plain.adapter)[0], read(workers.adapter)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_bf16_on_a_cpu_that_computes_in_it(tmp_path, dataset, monkeypatch, caplog, cpu_bf16):
    """--mixed-precision bf16 on the CPU: honoured where the CPU has AVX-512 BF16 or AMX (the base in bf16, the LoRA
    in fp32, under autocast), fp32 with a message elsewhere. (Patched both ways: bf16 runs on any CPU, only slower.)"""
    import sdlora.train as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    seen = {}
    real = training._optimizer_and_prepare

    def spy(run, *args):
        seen["base"] = run.base.unet.conv_in.weight.dtype
        seen["lora"] = {p.dtype for p in args[1]}
        return real(run, *args)

    monkeypatch.setattr(training, "_optimizer_and_prepare", spy)
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path, steps=6, lr=1e-3, mixed_precision="bf16",
                      save_precision="fp32", data=DataConfig(data=dataset, resolution=64), adapter=AdapterConfig(rank=4))
    with caplog.at_level("INFO", logger="sdlora"):
        result = train(cfg)
    tensors, meta = read(result.adapter)
    assert all(np.isfinite(result.losses)) and seen["lora"] == {torch.float32}
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
    if cpu_bf16:
        assert seen["base"] == torch.bfloat16 and meta["ss_mixed_precision"] == "bf16"
        assert "bf16 on the CPU" in caplog.text and "the base in bf16, the LoRA in fp32" in caplog.text
        # Speed does not buy a different result: the fp32 run's losses within 1% at every step (measured: 0.05%),
        # its whole update (up x down over every module) within 20% (measured: 7.5% after 6 steps at lr 1e-3).
        plain = train(replace(cfg, output_dir=tmp_path / "fp32", mixed_precision="no"))
        assert np.allclose(result.losses, plain.losses, rtol=0.01)
        want, got = read(plain.adapter)[0], tensors
        ups = [k for k in want if k.endswith("lora_up.weight")]

        def update(t, k):
            return t[k].flatten(1).double() @ t[k.replace("lora_up", "lora_down")].flatten(1).double()

        diff = sum(float((update(got, k) - update(want, k)).norm() ** 2) for k in ups)
        assert diff ** 0.5 < 0.2 * sum(float(update(want, k).norm() ** 2) for k in ups) ** 0.5
    else:
        assert seen["base"] == torch.float32 and meta["ss_mixed_precision"] == "no"
        assert "bf16 on the CPU needs AVX-512 BF16 or AMX" in caplog.text and "fp32 on the CPU" in caplog.text
    assert "this CPU computes in bf16" not in caplog.text  # (the hint is for fp32 runs of full-size bases)


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_a_full_size_fp32_run_on_a_bf16_cpu_is_told_about_bf16(tmp_path, dataset, monkeypatch, caplog, cpu_bf16):
    import sdlora.train as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(training, "BF16_HINT_PARAMS", 1_000_000)  # tiny-sd's 1.6 M parameters count as full size
    cfg = TrainConfig(base="tiny-sd", output_dir=tmp_path, steps=1, data=DataConfig(data=dataset, resolution=64))
    with caplog.at_level("INFO", logger="sdlora"):
        train(cfg)
    assert ("--mixed-precision bf16 may train a base of this size up to twice as fast" in caplog.text) == cpu_bf16


def test_encoders_leave_memory_at_once_after_caching(monkeypatch):
    """No sample prompt: once latents and text are cached, the VAE's and text encoders' weights are freed at once,
    without a garbage collection (a tenth of a second or more), although the models sit in reference cycles."""
    import gc
    from types import SimpleNamespace

    import sdlora.train as training

    def model():
        m = torch.nn.Linear(4096, 4096)  # 64 MiB of weights, written by its initialisation
        m.__dict__["cycle"] = m  # as the loaded models: only a collection would free it
        return m

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("collected garbage"))
    base = SimpleNamespace(vae=model(), text_encoders=[model(), model()])
    gc.disable()
    try:
        before = rss()
        training._release_encoders(base, True, True, sampling=False)
        freed = before - rss()
    finally:
        gc.enable()
    assert base.vae is None and base.text_encoders == [None, None]
    assert freed > 0.8 * 3 * 64 * 2 ** 20, freed
