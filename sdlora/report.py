"""The selection report: which of a run's checkpoints, at which weight.

For every saved checkpoint (`--save-every`, and the final adapter) at weights 0, 0.5, 0.75 and 1, a fixed-seed
image of each sample prompt, scored with what is available: on the toy base, the analyser's style score and
whether colour and shape still follow the prompt; on any base with held-out images (`--validation-split` or
`--validation-data`), the validation loss at fixed timesteps and noise. The recommendation (best style without
losing content; else the lowest validation loss before it rises again) goes into that adapter's metadata and A1111
sidecar as its preferred weight. Written as `report.json` and one self-contained `report.html` in the run folder.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch

from .config import DemoConfig, Params, TrainConfig, build_config, load_toml
from .errors import ConfigError

log = logging.getLogger("sdlora")

WEIGHTS = (0.0, 0.5, 0.75, 1.0)
VALIDATION_USES = 4  # fixed (timestep, noise) draws per held-out image
CONTENT_SLACK = 0.1  # a toy cell may lose this much of weight 0's colour-and-shape accuracy, no more
STYLE_GAIN = 0.01  # a toy style score must rise this far above weight 0's to choose a cell


def run_config(run_dir: Path, name: str | None = None) -> tuple[str, TrainConfig]:
    """The adapter name and options of the run in `run_dir`, from the `NAME.toml` train writes there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder not found: {run_dir}")
    names = [p.stem for p in sorted(run_dir.glob("*.toml")) if (p.with_suffix(".safetensors")).is_file()]
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{run_dir}: {'no run' if not names else 'several runs: ' + ', '.join(names)} (a "
                              "NAME.toml beside NAME.safetensors, as train writes); pass --name")
        name = names[0]
    elif name not in names:
        raise ConfigError(f"{run_dir}: no {name}.toml beside {name}.safetensors (runs here: {', '.join(names) or 'none'})")
    return name, build_config(load_toml(run_dir / f"{name}.toml"))


def checkpoints(run_dir: Path, name: str) -> list[tuple[int, Path]]:
    """(step, file) of every saved adapter of the run, in step order; the final one last."""
    from .safefiles import read_metadata

    out = []
    for p in Path(run_dir).glob(f"{glob.escape(name)}-step*.safetensors"):
        m = re.fullmatch(re.escape(name) + r"-step(\d+)", p.stem)
        if m:
            out.append((int(m.group(1)), p))
    final = Path(run_dir) / f"{name}.safetensors"
    steps = int(read_metadata(final).get("ss_steps", "0") or 0)
    out = [c for c in sorted(out) if c[0] != steps] + [(steps, final)]
    return out


def _held_out(cfg: TrainConfig):
    from .doctor import diagnose

    if cfg.data.validation_data is not None:
        return diagnose(replace(cfg, data=replace(cfg.data, data=cfg.data.validation_data, validation_split=0.0,
                                                  reg_data=None)), thorough=False, require=True).scan.items
    if cfg.data.validation_split:
        return diagnose(cfg, thorough=False, require=True).held_out
    return []


def validation_loss(engine, items, cfg: TrainConfig) -> float:
    """Mean denoising loss over the held-out images with the engine's current blend, each at VALIDATION_USES fixed
    (timestep, noise) draws: the same slots, so the same noise, for every checkpoint and weight."""
    from .data.dataset import Slot, TrainDataset, collate
    from .loss import batch_loss

    base = engine.base
    data = replace(cfg.data, flip=False, crop="center", shuffle_tags=False, caption_dropout=0.0)
    dataset = TrainDataset(items, data, cfg.seed)
    device = next(base.unet.parameters()).device
    losses = []
    with torch.no_grad():
        for i in range(len(items)):
            batch = collate([dataset[Slot(i, 10**9 + i * VALIDATION_USES + k, 0, 1 / VALIDATION_USES)]
                             for k in range(VALIDATION_USES)])
            loss = batch_loss(batch, base, base.unet, base.text_encoders, base.noise_scheduler(), cfg, device,
                               base.unet.dtype, None, False)
            losses.append(float(loss))
    return sum(losses) / len(losses)


def _prompts(cfg: TrainConfig, items) -> tuple[list[str], str]:
    if cfg.sample_prompt:
        return list(cfg.sample_prompt), "the run's --sample-prompt"
    if cfg.base == "toy":
        from .demo import _prompts as toy_prompts

        trigger = cfg.data.trigger or next(iter(_trigger(items)), "")
        return [f"{trigger + ', ' if trigger else ''}a {c} {s} on a {bg} background"
                for c, s, bg in toy_prompts()[::3]], "toy prompts (the run has no --sample-prompt)"
    return [i.caption for i in items[:4]], "training captions (the run has no --sample-prompt)"


def _trigger(items) -> list[str]:
    from .data.scan import ScanReport

    return ScanReport(Path("."), list(items)).trigger_words()


def _toy_content(prompt: str) -> tuple[str | None, str | None]:
    from .toy.render import COLOURS, SHAPES

    words = re.findall(r"\w+", prompt)
    return next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None)


def make_report(run_dir: Path, name: str | None = None, *, weights=WEIGHTS, write: bool = True) -> dict:
    """Render, score and recommend; with `write`, save report.json/report.html and mark the recommended adapter."""
    from .doctor import diagnose
    from .engine import BlendItem, Engine

    run_dir = Path(run_dir)
    name, cfg = run_config(run_dir, name)
    ckpts = checkpoints(run_dir, name)
    items = diagnose(cfg, thorough=False, require=True).scan.items
    prompts, prompt_source = _prompts(cfg, items)
    held = _held_out(cfg)
    engine = Engine(cfg.base, lora_files=[p for _, p in ckpts], base_config=cfg.base_config or None)
    size = cfg.data.resolution or engine.native_size
    toy = cfg.base == "toy"
    # On the toy base, sample as the demo measures (its guidance and sampler), so the scores agree with it.
    params = Params(prompt="", steps=cfg.sample_steps, cfg_scale=DemoConfig.cfg_scale if toy else 7.0, width=size,
                    height=size, scheduler=DemoConfig.sampler if toy else "Euler", seed=cfg.seed)
    cells = []
    for step, path in ckpts:
        for w in weights:
            blend = [BlendItem(path.stem, w)] if w else []
            images = engine.render(prompts, [cfg.seed] * len(prompts), params, blend, "exact")
            cell = {"step": step, "file": path.name, "weight": w, "images": images}
            if toy:
                from .toy.analyse import analyse

                readings = [analyse(img) for img in images]
                cell["styles"] = {s: sum(getattr(r, s) for r in readings) / len(readings) for s in ("rim", "stripes")}
                wanted = [_toy_content(p) for p in prompts]
                cell["content"] = sum((r.colour == c) + (r.shape == s) for r, (c, s) in zip(readings, wanted,
                                                                                           strict=True)) / (2 * len(readings))
            if held:
                engine.apply(blend, "exact")
                cell["validation_loss"] = validation_loss(engine, held, cfg)
            cells.append(cell)
    engine.clear()
    report = _score_and_pick(cells, toy, bool(held))
    report.update({"run": str(run_dir), "name": name, "base": str(cfg.base), "prompts": prompts,
                   "prompt_source": prompt_source, "weights": list(weights), "seed": cfg.seed,
                   "validation_images": [str(i.path) for i in held],
                   "checkpoints": [{"step": s, "file": p.name} for s, p in ckpts]})
    if write:
        _write(run_dir, report, cells)
    for c in cells:
        c.pop("images")
    report["cells"] = cells
    return report


def _score_and_pick(cells: list[dict], toy: bool, validation: bool) -> dict:
    """Which scores exist, each cell's score, and the recommended cell (the rules are in the module docstring)."""
    available = (["toy style score (the analyser)", "toy content: colour and shape follow the prompt"] if toy else [])
    available += ["validation loss on held-out images"] if validation else []
    unavailable = [] if validation else ["validation loss (no --validation-split or --validation-data)"]
    unavailable += ["prompt-image similarity (no image-text model installed locally)"]
    if not toy:
        unavailable.insert(0, "toy style and content scores (only on the toy base)")
    pick, why = None, ""
    if toy:
        final = [c for c in cells if c["step"] == cells[-1]["step"]]
        style = max(("rim", "stripes"), key=lambda s: max(c["styles"][s] for c in final) - final[0]["styles"][s])
        for c in cells:
            c["style"], c["style_name"] = c["styles"][style], style
        floor = {c["step"]: c["content"] for c in cells if c["weight"] == 0}
        unstyled = {c["step"]: c["style"] for c in cells if c["weight"] == 0}
        ok = [c for c in cells if c["weight"] > 0 and c["content"] >= floor[c["step"]] - CONTENT_SLACK]
        # A style no cell raises above the base's (an adapter barely trained) cannot choose: every cell ties.
        if any(c["style"] > unstyled[c["step"]] + STYLE_GAIN for c in ok):
            pick = max(ok, key=lambda c: (round(c["style"], 6), -c["step"], -c["weight"]))
            why = (f"the highest {style} style score ({pick['style']:.3f}) whose colour and shape accuracy "
                   f"({pick['content']:.3f}) stays within {CONTENT_SLACK} of the base's ({floor[pick['step']]:.3f})")
    if pick is None and validation:
        full = [c for c in cells if c["weight"] == max(x["weight"] for x in cells)]
        best = next((a for a, b in zip(full, full[1:], strict=False) if b["validation_loss"] > a["validation_loss"]),
                    full[-1])
        at = [c for c in cells if c["step"] == best["step"] and c["weight"] > 0]
        pick = min(at, key=lambda c: (c["validation_loss"], -c["weight"]))
        why = (f"the lowest validation loss ({pick['validation_loss']:.4f}) before it rises again, at the weight "
               "where it is lowest")
    if pick is None:
        pick = next(c for c in reversed(cells) if c["weight"] == max(x["weight"] for x in cells))
        why = "no score could choose: the final adapter at full weight"
    return {"scores": available, "unavailable": unavailable,
            "recommended": {"file": pick["file"], "step": pick["step"], "weight": pick["weight"], "why": why}}


def _png(image, scale: int) -> str:
    from PIL import Image

    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write(run_dir: Path, report: dict, cells: list[dict]) -> None:
    from .safefiles import atomic_write_bytes, read_safetensors, write_safetensors

    rec = report["recommended"]
    chosen = run_dir / rec["file"]
    tensors, meta = read_safetensors(chosen)
    meta = {**meta, "sdlora_preferred_weight": f"{rec['weight']:g}", "sdlora_recommended_by": "report.html"}
    write_safetensors(chosen, tensors, meta)
    sidecar = chosen.with_suffix(".json")
    info = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    info["preferred weight"] = rec["weight"]
    atomic_write_bytes(sidecar, json.dumps(info, indent=2).encode())
    plain = [{k: v for k, v in c.items() if k != "images"} for c in cells]
    atomic_write_bytes(run_dir / "report.json", json.dumps({**report, "cells": plain}, indent=2).encode())
    atomic_write_bytes(run_dir / "report.html", _html(report, cells).encode())


def _html(report: dict, cells: list[dict]) -> str:
    e = html.escape
    size = cells[0]["images"][0].width
    scale = max(1, 128 // size)
    rec = report["recommended"]
    rows = []
    for step in dict.fromkeys(c["step"] for c in cells):
        for c in [c for c in cells if c["step"] == step]:
            chosen = c["file"] == rec["file"] and c["weight"] == rec["weight"]
            scores = []
            if "style" in c:
                scores.append(f"{e(c['style_name'])} {c['style']:.3f}, content {c['content']:.3f}")
            if "validation_loss" in c:
                scores.append(f"validation loss {c['validation_loss']:.4f}")
            imgs = "".join(f'<img src="{_png(img, scale)}" alt="{e(p)}" title="{e(p)}">'
                           for img, p in zip(c["images"], report["prompts"], strict=True))
            rows.append(f'<tr{" class=chosen" if chosen else ""}><th>{e(c["file"])}<br>step {c["step"]}, weight '
                        f'{c["weight"]:g}</th><td>{e("; ".join(scores)) or "-"}</td><td>{imgs}</td></tr>')
    prompts = "".join(f"<li>{e(p)}</li>" for p in report["prompts"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report['name'])}: selection report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top;text-align:left}}img{{image-rendering:pixelated;margin:1px}}
tr.chosen{{background:#e6f4d9;outline:3px solid #4a8f1a}}</style></head>
<body><h1>{e(report['name'])}: which checkpoint, at which weight</h1>
<p><b>Recommended: {e(rec['file'])} at weight {rec['weight']:g}</b> (step {rec['step']}): {e(rec['why'])}.
Written into that file's metadata and A1111 sidecar as its preferred weight.</p>
<p>Base {e(report['base'])}; seed {report['seed']} for every image; weight 0 is the base alone.
Scores used: {e('; '.join(report['scores']) or 'none')}. Not available: {e('; '.join(report['unavailable']))}.</p>
<p>Prompts ({e(report['prompt_source'])}):</p><ol>{prompts}</ol>
<table><tr><th>checkpoint</th><th>scores</th><th>images</th></tr>
{''.join(rows)}
</table></body></html>
"""
