"""The toy world end to end: the shipped base draws what it is asked, and a style LoRA shows its style."""

import json

from sdlora.cli import main
from sdlora.demo import DemoConfig, run_demo
from sdlora.toy.base import WEIGHTS, info


def test_shipped_base_is_small_and_recorded():
    size = sum(p.stat().st_size for p in WEIGHTS.glob("*.safetensors"))
    assert size <= 20 * 1024 * 1024
    record = info()
    assert record["check"]["color_accuracy"] >= 0.9 and record["check"]["shape_accuracy"] >= 0.8
    assert record["command"].startswith("python -m sdlora.toy.pretrain") and record["machine"]
    assert max(record["vae"][f"vae_error_{k}"] for k in ("plain", "rim", "stripes")) < 8


def test_short_demo_moves_every_effect_the_right_way(tmp_path):
    """A shortened demo (fewer steps and images than the default); thresholds are loose versions of the
    README's measured figures, so a regression in training or blending still fails."""
    cfg = DemoConfig(steps=200, seeds=1)
    m = run_demo(tmp_path, cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert set(m) == {"style", "weights", "style_score", "color_accuracy", "shape_accuracy", "train_seconds"}
    s0, s_half, s1 = m["style_score"]
    assert s0 <= 0.1 and s1 >= 0.5 and s0 <= s_half <= s1 + 0.05
    assert m["color_accuracy"][2] >= 0.7 and m["shape_accuracy"][2] >= 0.6
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_demo_cli_rejects_unknown_style(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--style", "plaid"])
    assert "invalid choice" in capsys.readouterr().err
