"""Benchmarks that wait for a GPU still run here, in their short mode, so the command that fills in the GPU figures
is ready when one is lent."""

import json
import math
import sys

from test_train import ROOT


def test_the_full_size_benchmark_runs_in_its_short_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("full_size", None)
    import full_size

    out = tmp_path / "full_size.json"
    report = full_size.main(["--short", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["rows"]) == {f"{f}, gradient checkpointing {s}" for f in ("sd1", "sdxl") for s in ("on", "off")}
    assert report["matmul_tflops"] > 0
    for family in ("sd1", "sdxl"):
        off, on = (report["rows"][f"{family}, gradient checkpointing {s}"] for s in ("off", "on"))
        # the same run either way: checkpointing recomputes activations, it does not change what trains
        assert off["trainable_parameters"] == on["trainable_parameters"] > 0
        assert off["loss_first_last"] == on["loss_first_last"] and all(map(math.isfinite, off["loss_first_last"]))
        for row in (off, on):
            assert row["step_ms"] > 0 and row["peak_rss_gib"] > 0.1
            assert row["unet_tflop_per_sample"] > 0 and 0 < row["utilisation"] < 1
    assert report["rows"]["sd1, gradient checkpointing on"]["unet_tflop_per_sample"] != \
        report["rows"]["sdxl, gradient checkpointing on"]["unet_tflop_per_sample"]

    quantized = full_size.main(["--short", "--family", "sd1", "--quantize-base", "nf4"])  # QLoRA (issue 12)
    assert quantized["settings"]["quantize_base"] == "nf4"
    on = quantized["rows"]["sd1 nf4, gradient checkpointing on"]
    assert on["trainable_parameters"] == report["rows"]["sd1, gradient checkpointing on"]["trainable_parameters"]
    assert on["step_ms"] > 0 and all(map(math.isfinite, on["loss_first_last"]))
