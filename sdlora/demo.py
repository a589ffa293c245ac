"""`sdlora demo`: train a style LoRA on the toy base from `datasets_example/`, then measure what it does.

Writes `DIR/<style>.safetensors`, `DIR/grid.png` (rows: prompts; columns: LoRA weight 0, 0.5, 1) and
`DIR/metrics.json` (style score, colour and shape accuracy per weight, read by the analyser). With
`blend=True` it trains both styles for blending (each step at a weight drawn from 0.4 to 1, see `DemoConfig`) and
also measures both LoRAs blended at 0.5 + 0.5 (`DIR/blend.json`).
Its defaults (`DemoConfig` in config.py) are the settings that reach the acceptance figures in the README.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import AdapterConfig, DataConfig, DemoConfig, TrainConfig
from .engine import BlendItem, Engine, Params
from .errors import ConfigError
from .safefiles import atomic_save_image, atomic_write_bytes

EXAMPLES = Path(__file__).resolve().parent.parent / "datasets_example"


def _prompts():
    from .toy.pretrain import check_prompts

    return [(c, s, bg) for c, s, bg, seed in check_prompts() if seed == 0]


def train_style(style: str, cfg: DemoConfig, out: Path, quantize_base: str = "", reg_data: Path | None = None,
                data: Path | None = None, train_embedding: tuple[str, ...] = (), options: dict | None = None):
    """The demo's LoRA for one example style (or for `data`, another folder of it), at the demo's settings, with any
    train `options` (by name) changed on top."""
    from .toy.render import STYLES
    from .train import train

    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    tcfg = TrainConfig(base="toy", output_dir=out, name=style, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                       overwrite=True, seed=cfg.seed, save_precision="fp32", quantize_base=quantize_base,
                       data=DataConfig(data=data or EXAMPLES / style, resolution=32, bucket_step=32, reg_data=reg_data),
                       adapter=AdapterConfig(rank=cfg.rank, preset=cfg.preset, train_embedding=list(train_embedding)))
    if options:
        from .config import build_config
        from .run import flat_config

        tcfg = build_config({**flat_config(tcfg), **options})
    return train(tcfg)


def measure(engine: Engine, blend_at, styles: list[str], cfg: DemoConfig, weights: list[float],
            trigger: str | None = None) -> dict:
    """For each weight: mean style score(s), colour and shape accuracy over every colour x shape prompt, each
    prompt led by the styles' trigger words (or by `trigger`; "" for none)."""
    from .toy.analyse import analyse
    from .toy.render import STYLES

    trigger = ", ".join(STYLES[s] for s in styles) if trigger is None else trigger
    out = {"weights": weights, "style_score": {s: [] for s in styles}, "color_accuracy": [], "shape_accuracy": []}
    images = {}
    cases = [(colour, shape, bg, k) for colour, shape, bg in _prompts() for k in range(cfg.seeds)]
    prompts = [f"{trigger + ', ' if trigger else ''}a {colour} {shape} on a {bg} background"
               for colour, shape, bg, _ in cases]
    params = Params(prompt="", steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, width=32, height=32,
                    scheduler=cfg.sampler)
    for w in weights:
        readings = []
        drawn = engine.render(prompts, [cfg.seed + k for *_, k in cases], params, blend_at(w), "fast")
        for (colour, shape, _, k), img in zip(cases, drawn, strict=True):
            images[(w, colour, shape, k)] = img
            readings.append((analyse(img), colour, shape))
        for s in styles:
            out["style_score"][s].append(round(sum(getattr(r, s) for r, _, _ in readings) / len(readings), 3))
        out["color_accuracy"].append(round(sum(r.colour == c for r, c, _ in readings) / len(readings), 3))
        out["shape_accuracy"].append(round(sum(r.shape == s for r, _, s in readings) / len(readings), 3))
    engine.clear()
    out["images"] = images
    return out


def grid_image(images: dict, weights: list[float], rows: int = 6, scale: int = 3, styles: tuple[str, ...] = ()):
    """Rows: prompts; columns: the weights (of each of `styles` when there are several, a blend)."""
    from PIL import Image

    from .grid import draw_grid

    every = _prompts()  # colour-major, shapes cycling: pick a different shape on each row
    prompts = [every[(3 * i + i % 3) % len(every)] for i in range(rows)]
    cells = [images[(w, c, s, 0)].resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
             for c, s, _ in prompts for w in weights]
    heads = [" + ".join(f"{s} {w:g}" for s in styles) if len(styles) > 1 else f"weight {w:g}" for w in weights]
    return draw_grid(cells, heads, [f"{c} {s}" for c, s, _ in prompts])


def run_demo(out: Path, cfg: DemoConfig | None = None, blend: bool = False) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(out)
    t0 = time.time()
    # For a blend, both LoRAs train across the weights they will be blended at (config.py, DemoConfig).
    options = {"steps": cfg.blend_steps, "train_weight_min": cfg.blend_weight_min} if blend else None
    result = train_style(cfg.style, cfg, out, options=options)
    train_seconds = time.time() - t0
    engine = Engine("toy", lora_files=[result.adapter])
    m = measure(engine, lambda w: [BlendItem(cfg.style, w)] if w else [], [cfg.style], cfg, cfg.weights)
    atomic_save_image(grid_image(m.pop("images"), cfg.weights), out / "grid.png")
    metrics = {"style": cfg.style, "weights": cfg.weights, "style_score": m["style_score"][cfg.style],
               "color_accuracy": m["color_accuracy"], "shape_accuracy": m["shape_accuracy"],
               "train_seconds": round(train_seconds, 1), "steps": cfg.blend_steps if blend else cfg.steps,
               "train_weight_min": cfg.blend_weight_min if blend else None}
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    if blend:
        from .toy.render import STYLES

        other = next(s for s in STYLES if s != cfg.style)
        second = train_style(other, cfg, out, options=options)
        engine = Engine("toy", lora_files=[result.adapter, second.adapter])
        styles = [cfg.style, other]
        b = measure(engine, lambda w: [BlendItem(cfg.style, w), BlendItem(other, w)] if w else [], styles, cfg,
                    [0.0, 0.5])
        atomic_save_image(grid_image(b.pop("images"), b["weights"], scale=4, styles=tuple(styles)), out / "blend.png")
        report = {"styles": styles, "weights": b["weights"], "style_score": b["style_score"],
                  "color_accuracy": b["color_accuracy"], "shape_accuracy": b["shape_accuracy"],
                  "seconds": round(time.time() - t0, 1)}  # the whole demo: both trainings and every measurement
        atomic_write_bytes(out / "blend.json", json.dumps(report, indent=2).encode())
        metrics["blend"] = report
    return metrics
