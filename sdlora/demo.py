"""`sdlora demo`: train a small LoRA on the bundled example folder and generate with it.

Until the pretrained toy base lands this runs on `tiny-sd`, a randomly initialised model: it shows the
whole path (data → training → adapter → generation) working, not a learned style.
"""

from __future__ import annotations

from pathlib import Path

from .config import AdapterConfig, DataConfig, TrainConfig
from .train import train

EXAMPLES = Path(__file__).resolve().parent.parent / "datasets_example"


def run_demo(out: Path, steps: int = 40) -> str:
    out = Path(out)
    data = EXAMPLES / "stripes"
    cfg = TrainConfig(base="tiny-sd", output_dir=out, name="demo-stripes", steps=steps, lr=1e-3, overwrite=True,
                      data=DataConfig(data=data, resolution=64, trigger="stripestyle"),
                      adapter=AdapterConfig(rank=8))
    result = train(cfg, progress=True)
    from .engine import BlendItem, Engine, Params
    from .recipe import save_png

    engine = Engine("tiny-sd", lora_files=[result.adapter])
    images = engine.generate(Params(prompt="stripestyle, a red circle", seed=0, width=64, height=64),
                             [BlendItem(result.adapter.stem)], mode="fast")
    image = save_png(images.images[0], out / "demo.png", images.infotexts[0])
    return f"{result.summary()}\nimage: {image}"
