import pytest

from sdlora.cli import build_parser, train_config_from_args
from sdlora.config import Params, TrainConfig, build_config, load_toml, option_fields
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
])
def test_invalid_values_are_rejected_at_construction(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)
