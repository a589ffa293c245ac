"""The command line leaves bitsandbytes and torchao unimported unless a run quantizes (sdlora.optional)."""

import subprocess
import sys
import textwrap

from test_train import ROOT

# As a command's process does: hide, import what every run imports, then quantize and put LoRA on.
QUANTIZE_AFTER_HIDING = textwrap.dedent("""
    import sys
    from sdlora import optional
    optional.hide()
    import accelerate, diffusers, peft, transformers, torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    assert sys.modules["bitsandbytes"] is None and sys.modules["torchao"] is None, "the libraries imported them"
    assert optional.installed("bitsandbytes") and optional.installed("torchao")
    from peft.import_utils import is_bnb_available, is_torchao_available
    assert not is_bnb_available() and not is_torchao_available()  # peft takes them for absent, and caches that
    from sdlora import lora, quant
    from sdlora.config import AdapterConfig
    from sdlora.models import build_tiny
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_hidden_libraries_look_absent_and_load_brings_them_back():
    proc = run(QUANTIZE_AFTER_HIDING + "import bitsandbytes\n")  # other code than sdlora's still cannot
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr and "bitsandbytes" in proc.stderr


def test_quantizing_after_hiding_gets_pefts_quantized_lora_layers():
    """peft decides at injection whether bitsandbytes and torchao are there (and caches the answer); after `load`
    its LoRA layers for both libraries go on as in a process that never hid them."""
    code = QUANTIZE_AFTER_HIDING + textwrap.dedent("""
    for backend, kind in (("bitsandbytes", "nf4"), ("torchao", "int8")):
        quant.require(kind, backend)
        from peft.tuners.lora import bnb as peft_bnb
        from peft.tuners.lora.torchao import TorchaoLoraLinear
        unet = build_tiny("tiny-sd").unet.requires_grad_(False)
        quant.quantize(unet, kind, backend)
        lora.inject(unet, AdapterConfig(rank=4, preset="attn"), "unet")
        want = peft_bnb.Linear4bit if backend == "bitsandbytes" else TorchaoLoraLinear
        layers = [m for n, m in unet.named_modules() if n.endswith("to_q")]
        assert layers and all(type(m) is want for m in layers), (backend, {type(m).__name__ for m in layers})
    print("ok")
    """)
    proc = run(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_run_that_quantizes_nothing_imports_neither_library(tmp_path, dataset):
    """-X importtime lists every module the process imported (and a halted attempt at a hidden one, as a bare name
    taking microseconds: a real import of either brings its submodules)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdlora", "train", "--base", "tiny-sd",
                           "--data", str(dataset), "--output-dir", str(tmp_path), "--steps", "1",
                           "--resolution", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "diffusers" in imported and "peft" in imported  # (the listing is read right)
    assert not {m for m in imported if m.startswith(("bitsandbytes.", "torchao."))}
    assert "kernels-community" not in proc.stderr  # bitsandbytes' advice about a package from the Hub is gone with it
