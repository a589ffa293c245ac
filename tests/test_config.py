import pytest

from sdlora.cli import build_parser, train_config_from_args
from sdlora.config import (
    AdapterConfig,
    DataConfig,
    Params,
    TrainConfig,
    build_config,
    load_toml,
    option_fields,
)
from sdlora.errors import ConfigError


def parse(*argv):
    return train_config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_come_from_the_dataclasses():
    cfg = parse()
    assert cfg == TrainConfig()
    assert cfg.adapter.rank == 16 and cfg.adapter.lora_alpha == 16.0 and cfg.adapter.preset == "attn"


def test_generate_flags_default_to_the_engines_params():
    ns = build_parser().parse_args(["generate", "--prompt", "x"])
    d = Params(prompt="x")
    assert (ns.seed, ns.steps, ns.cfg, ns.width, ns.height, ns.batch_size, ns.batch_count, ns.scheduler) == (
        d.seed, d.steps, d.cfg_scale, d.width, d.height, d.batch_size, d.batch_count, d.scheduler)


def test_every_option_is_a_flag_with_help():
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for _, f, _ in option_fields():
        assert "--" + f.name.replace("_", "-") in help_text
        assert f.metadata["help"], f.name


def test_toml_sets_options_and_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rank = 8\nlr = 0.001\ntrigger = "sks"\nsample-prompt = ["a", "b"]\n[dataset]\nresolution = 256\n')
    cfg = parse("--config", str(path), "--rank", "4")
    assert cfg.adapter.rank == 4  # flag wins
    assert cfg.lr == 0.001 and cfg.data.trigger == "sks" and cfg.data.resolution == 256
    assert cfg.sample_prompt == ["a", "b"]


@pytest.mark.parametrize("text, message", [
    ("rnak = 8\n", "unknown option 'rnak'"),
    ("rank = 'eight'\n", "rank must be of type int"),
    ("rank = 0\n", "rank must be > 0"),
    ("optimizer = 'sgd'\n", "optimizer must be one of"),
    ("rank = \n", "invalid TOML"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(load_toml(path))


def test_unknown_key_and_missing_file():
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        build_config({"nope": 1})
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml("/nonexistent/x.toml")


@pytest.mark.parametrize("values, message", [
    ({"resolution": 100}, "multiple of 8"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"dropout": 1.0}, "dropout"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0}, "lr must be > 0"),
    ({"crop": "left"}, "crop must be one of"),
    ({"min_snr_gamma": -5}, "min_snr_gamma must be >= 0"),  # would weight the loss negatively: training goes uphill
    ({"noise_offset": -1}, "noise_offset must be >= 0"),
    ({"weight_decay": -3}, "weight_decay must be >= 0"),
    ({"max_grad_norm": -1}, "max_grad_norm must be >= 0"),
    ({"min_timestep": -1}, "min_timestep must be >= 0"),
    ({"min_timestep": 500, "max_timestep": 500}, "max_timestep \\(500\\) must be above min_timestep \\(500\\)"),
])
def test_invalid_values_are_rejected_at_construction(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def _checkpoint(path, keys):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2) if k != "v_pred" else torch.zeros(1) for k in keys}, str(path))
    return path


def test_resolution_and_bucket_step_default_to_the_base(tmp_path):
    """Read from configs or a checkpoint's header: nothing is loaded, and the summary says where each came from."""
    import json

    import torch
    from safetensors.torch import save_file

    from sdlora.doctor import fit_to_base
    from sdlora.models import SD2_V_PROBE, native_size

    folder = tmp_path / "model"
    for part, cfg in (("unet", {"sample_size": 96}), ("vae", {"block_out_channels": [128, 256, 512, 512]})):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(cfg))
    eps = tmp_path / "sd2-base.safetensors"  # SD 2.x-base: a narrow spread in ComfyUI's probe bias
    save_file({"cond_stage_model.model.x": torch.zeros(2), SD2_V_PROBE: torch.zeros(320)}, str(eps))
    cases = {"toy": 32, "tiny-sd": 64, "tiny-sdxl": 64, str(folder): 768,
             str(_checkpoint(tmp_path / "sd15.safetensors", ["cond_stage_model.transformer.x"])): 512,
             str(_checkpoint(tmp_path / "xl.safetensors", ["conditioner.embedders.1.x"])): 1024,
             str(_checkpoint(tmp_path / "sd21.safetensors", ["cond_stage_model.model.x", "v_pred"])): 768,
             str(eps): 512}
    for base, size in cases.items():
        assert native_size(base)[0] == size, base
        cfg, notes = fit_to_base(TrainConfig(base=base))
        assert (cfg.data.resolution, cfg.data.bucket_step) == (size, min(64, size))
        assert notes[0].startswith(f"resolution {size} px: ") and "--resolution to change" in notes[0]
        assert notes[1].startswith(f"bucket step {min(64, size)} px: the default")
    cfg, notes = fit_to_base(TrainConfig(base="toy", data=DataConfig(resolution=48, bucket_step=16)))
    assert (cfg.data.resolution, cfg.data.bucket_step, notes) == (48, 16, [])  # given values are kept
    with pytest.raises(ConfigError, match="bucket_step must be a multiple of 8"):
        DataConfig(bucket_step=12)


def test_one_outputs_folder_and_the_effective_learning_rate():
    from sdlora.config import StudioConfig
    from sdlora.doctor import learning_rate_notes

    assert TrainConfig().output_dir == StudioConfig.output_dir == build_parser().parse_args(
        ["generate", "--prompt", "x"]).output_dir
    line, warning = learning_rate_notes(TrainConfig(lr=1e-3, adapter=AdapterConfig(rank=32, alpha=1)))
    assert line == "learning rate 0.001 x alpha 1 / rank 32 = 3.13e-05 effective"
    assert "alpha 1 is far below rank 32" in warning and "1e-3 or more" in warning
    assert learning_rate_notes(TrainConfig(adapter=AdapterConfig(rank=16, alpha=8)))[1] is None
    # Prodigy at an AdamW-sized lr saved a LoRA whose up-matrices were still zero, without a word
    assert "Use --lr 1" in learning_rate_notes(TrainConfig(optimizer="prodigy"))[1]
    assert learning_rate_notes(TrainConfig(optimizer="prodigy", lr=1.0))[1] is None
