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
    """A shortened demo (150 steps instead of 200, one image per prompt instead of two), blend included.

    Measured with these settings on 2 CPU cores (2026-11-23): rim 0.0 / 0.32 / 0.94 at weights 0 / 0.5 / 1,
    colour 0.94 and shape 0.89 at weight 1; blend 0.5 + 0.5: rim 0.0 -> 0.63, stripes 0.0 -> 0.10. The
    thresholds leave room for other CPUs' rounding but still fail when training or blending regresses."""
    cfg = DemoConfig(steps=150, seeds=1)
    m = run_demo(tmp_path, cfg, blend=True)
    blend = m.pop("blend")
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert json.loads((tmp_path / "blend.json").read_text()) == blend
    assert set(m) == {"style", "weights", "style_score", "color_accuracy", "shape_accuracy", "train_seconds"}
    s0, s_half, s1 = m["style_score"]
    assert s0 <= 0.1 and s1 >= 0.7 and s0 + 0.1 <= s_half <= s1 - 0.1
    assert m["color_accuracy"][2] >= 0.8 and m["shape_accuracy"][2] >= 0.7
    (rim0, rim), (stripes0, stripes) = blend["style_score"]["rim"], blend["style_score"]["stripes"]
    assert rim0 <= 0.1 and stripes0 <= 0.1
    assert rim >= rim0 + 0.4 and stripes >= stripes0 + 0.03  # both styles above the base
    assert blend["color_accuracy"][1] >= 0.8 and blend["shape_accuracy"][1] >= 0.7
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_demo_cli_rejects_unknown_style(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--style", "plaid"])
    assert "invalid choice" in capsys.readouterr().err
