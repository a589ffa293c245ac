"""The blend studio's web UI: a thin Gradio face over `sdlora.engine`.

Built in a function (no module-level state). Safe by default: LoRAs are chosen by name from the scanned
library (never by path), every value is checked again on the server by the engine, one generation
runs at a time behind a bounded queue, Gradio may serve files from the outputs folder only, and all
metadata is shown as plain text.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr

from sdlora.config import StudioConfig, anchored_spec
from sdlora.engine import MODES, WEIGHT_RANGE, BlendItem, Engine, Params, parse_prompt
from sdlora.errors import SdloraError
from sdlora.grid import AXIS_KINDS, Axis, xy_grid
from sdlora.recipe import next_output_path, read_png_parameters, save_png
from sdlora.schedulers import SCHEDULERS

log = logging.getLogger("sdlora")

MAX_SLOTS = 6  # LoRAs per blend, ticked or named in <lora:...> tags
QUEUE_SIZE = 32  # generations waiting behind the running one; more are refused at once
CACHE_CLEAN = (3600, 3600)  # Gradio's cache (inside the outputs folder): every hour, delete files older than an hour
DEFAULTS = Params(prompt="")


def _cards(engine: Engine) -> list[list]:
    rows = []
    for e in engine.library.entries.values():
        status = "ok" if e.compatible else f"cannot apply: {e.problem}"
        rows.append([e.name, e.family or "?", e.rank, ", ".join(e.triggers), e.preferred_weight, e.kind, status,
                     "yes" if e.report else ""])
    return rows


def friendly(fn):
    """Errors become one Gradio message shown as text: sdlora's own as they are, anything else as an unexpected
    error with its type (the traceback goes to the server's log, not to the browser)."""
    @functools.wraps(fn)  # keeps the signature Gradio inspects (gr.Progress)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except SdloraError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            log.exception("unexpected error in the web UI")
            raise gr.Error(f"unexpected error ({type(e).__name__}); nothing was saved. The server log has the "
                           "details.", print_exception=False) from None
    return wrapper


class Studio:
    """What the UI's buttons do, over one engine: plain methods, so `build_app` only lays out and wires."""

    def __init__(self, engine: Engine, output_dir: Path):
        self.engine, self.output_dir = engine, Path(output_dir).resolve()
        engine.max_loras = MAX_SLOTS
        self.usable = [n for n, e in engine.library.entries.items() if e.compatible]
        self.native = engine.native_size  # the base's own size: 512 for SD 1.x, 1024 for SDXL, 32 for toy

    def slots_for(self, selected, *slot_values):
        """Show one weight row per ticked LoRA: a LoRA ticked before keeps the weights its row had (`slot_values`:
        name, UNet weight, text-encoder weight per row), a newly ticked one starts at its preferred weight."""
        entries = self.engine.library.entries
        selected = [n for n in (selected or []) if n in entries][:MAX_SLOTS]
        shown = {slot_values[k]: slot_values[k + 1:k + 3] for k in range(0, len(slot_values), 3) if slot_values[k]}
        updates = []
        for i in range(MAX_SLOTS):
            if i < len(selected):
                w = entries[selected[i]].preferred_weight
                unet_w, te_w = shown.get(selected[i], (w, w))
                updates += [gr.update(visible=True), gr.update(value=selected[i]), gr.update(value=unet_w),
                            gr.update(value=te_w)]
            else:
                updates += [gr.update(visible=False), gr.update(value=""), gr.update(), gr.update()]
        return updates

    @staticmethod
    def _blend(selected, slot_values) -> list[BlendItem]:
        return [BlendItem(str(name), unet=float(slot_values[3 * i + 1]), te=float(slot_values[3 * i + 2]))
                for i, name in enumerate(list(selected or [])[:MAX_SLOTS])]

    @staticmethod
    def _params(prompt, negative, seed, steps, cfg, width, height, batch_size, batch_count, scheduler) -> Params:
        return Params(prompt=str(prompt or ""), negative_prompt=str(negative or ""), seed=int(seed), steps=int(steps),
                      cfg_scale=float(cfg), width=int(width), height=int(height), batch_size=int(batch_size),
                      batch_count=int(batch_count), scheduler=str(scheduler))

    @friendly
    def generate(self, selected, mode, prompt, negative, seed, steps, cfg, width, height, batch_size, batch_count,
                 scheduler, *slot_values, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for progress
        params = self._params(prompt, negative, seed, steps, cfg, width, height, batch_size, batch_count, scheduler)
        progress(0, desc="generating")
        result = self.engine.generate(params, self._blend(selected, slot_values), str(mode),
                                      progress=lambda f: progress(f, desc="generating"))
        paths = [str(save_png(image, next_output_path(self.output_dir, s), text))
                 for image, s, text in zip(result.images, result.seeds, result.infotexts, strict=True)]
        return paths, result.infotexts[0], f"seed used: {result.seeds[0]}"

    @friendly
    def grid(self, selected, mode, x_lora, x_values, y_kind, y_lora, y_values, prompt, negative, seed, steps, cfg,
             width, height, scheduler, *slot_values):
        params = self._params(prompt, negative, seed, steps, cfg, width, height, 1, 1, scheduler)
        if params.seed == -1:  # drawn here, so the file is named after the seed its recipe holds
            import dataclasses
            import random

            params = dataclasses.replace(params, seed=random.randrange(2**32))
        x = Axis("lora", _floats(x_values), lora=str(x_lora or ""))
        y = Axis(str(y_kind), _floats(y_values), lora=str(y_lora or ""))
        for axis in (x, y):
            if axis.kind == "lora":
                self.engine.library.get(axis.lora)
        image, texts = xy_grid(self.engine, params, self._blend(selected, slot_values), x, y, str(mode))
        path = next_output_path(self.output_dir, params.seed)
        path = path.with_name(path.stem + "-grid.png")
        save_png(image, path, texts[0])
        return str(path)

    @friendly
    def load_png(self, image):
        """The form filled from an image's A1111 recipe: text, numbers, sampler, and the LoRAs of its tags."""
        if image is None:
            raise gr.Error("drop a PNG first", print_exception=False)
        p = read_png_parameters(image)
        text, tags = parse_prompt(p["prompt"])
        names = [t.name for t in tags if t.name in self.usable][:MAX_SLOTS]
        sampler = p.get("Sampler", DEFAULTS.scheduler)
        try:
            width, height = (int(v) for v in p.get("Size", f"{self.native}x{self.native}").split("x"))
            numbers = [int(p.get("Seed", -1)), int(p.get("Steps", DEFAULTS.steps)),
                       float(p.get("CFG scale", DEFAULTS.cfg_scale))]
        except ValueError:
            raise gr.Error("this PNG's parameters have a malformed Size, Seed, Steps or CFG scale; nothing was "
                           "loaded", print_exception=False) from None
        out = [text, p["negative_prompt"], *numbers, width, height,
               sampler if sampler in SCHEDULERS else DEFAULTS.scheduler, names]
        slot_updates = self.slots_for(names)
        by_name = {t.name: t for t in tags}
        for i, name in enumerate(names):
            slot_updates[4 * i + 2] = gr.update(value=by_name[name].unet)
            slot_updates[4 * i + 3] = gr.update(value=by_name[name].te_weight)
        return out + slot_updates

    @friendly
    def save_blend(self, name, selected, *slot_values):
        """The ticked LoRAs at their slider weights as one LoRA in the LoRA folder (ranks concatenated: exact)."""
        import re

        from sdlora.errors import ConfigError
        from sdlora.tools.merge import Item, merge, write_merge

        name = str(name or "").strip().removesuffix(".safetensors")
        if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith("."):
            raise ConfigError(f"name {name!r}: use letters, digits, spaces, '.', '-' or '_'")
        folder = self.engine.library.folder
        if folder is None:
            raise ConfigError("no LoRA folder to save into (start the studio with --lora-dir)")
        out = folder / f"{name}.safetensors"
        if out.exists() or name in self.engine.library.entries:
            raise ConfigError(f"a LoRA named {name!r} exists already; choose another name")
        blend = self._blend(selected, slot_values)
        if not blend:
            raise ConfigError("tick at least one LoRA to save a blend")
        items = [Item(self.engine.library.get(b.name).path, b.unet, b.te) for b in blend]
        base = self.engine.base
        result = merge(items, models=(base.modules(), base.family, base.name))
        write_merge(result, out)
        listed = self.add_lora(out)  # the tick boxes and the cards at once
        listed[0] = gr.update(choices=self.usable, value=list(selected or []))
        return [*listed, f"saved {out.name} ({len(blend)} LoRAs)"]

    @friendly
    def show_report(self, name):
        """The selection report of the run that made this LoRA, in a sandboxed frame (its images are embedded)."""
        import html

        entry = self.engine.library.entries.get(str(name or ""))
        if entry is None or entry.report is None:
            return "<p>No selection report for this LoRA (sdlora report RUN_FOLDER writes one).</p>"
        page = entry.report.read_text(encoding="utf-8")
        return (f'<iframe sandbox srcdoc="{html.escape(page, quote=True)}" title="selection report" '
                'style="width:100%;height:640px;border:0"></iframe>')

    def add_lora(self, path: Path):
        """A LoRA a run of the Train tab just finished, into the library: the list to tick and the cards."""
        library = self.engine.library
        inside = library.folder is not None and Path(path).resolve().is_relative_to(library.folder)
        if not inside and Path(path) not in library.files:  # (one in the folder is found by the scan)
            library.files.append(Path(path))
        self.engine.rescan()
        self.usable = [n for n, e in library.entries.items() if e.compatible]
        previews, triggers = _previews(self.engine), _triggers(self.engine)
        return [gr.update(choices=self.usable), _cards(self.engine), gr.update(value=previews, visible=bool(previews)),
                gr.update(samples=triggers or [[""]], visible=bool(triggers))]

    @staticmethod
    def insert_trigger(sample, prompt):
        word = (sample[0] if isinstance(sample, list | tuple) else str(sample)).strip()
        if not word:
            return prompt
        return f"{word}, {prompt}" if prompt else word


def build_app(engine: Engine, output_dir: Path, data_root: Path | None = None, train_defaults: dict | None = None):
    """The studio; with `data_root`, its Train tab trains on the image folders below it (runs go to
    `output_dir`), its form starting from `train_defaults` (the studio's base) where given."""
    from sdlora.jobs import Jobs
    from webui.train_tab import train_tab
    from webui.training import Trainer

    studio = Studio(engine, output_dir)
    trainer = Trainer(Jobs(studio.output_dir), data_root, train_defaults)
    with gr.Blocks(title="sdlora blend studio", delete_cache=CACHE_CLEAN) as app:
        gr.Markdown("## sdlora blend studio")
        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    ui = _form(studio)
                with gr.Column(scale=1):
                    ui |= _library(studio, ui["prompt"])
            ui |= _tools(studio)
        with gr.Tab("Train", elem_id="tab-train"):
            train_tab(trainer, friendly, studio.add_lora, [ui[k] for k in LIBRARY])

        def take(*keys):
            return [ui[k] for k in keys]

        common = take("prompt", "negative", "seed", "steps", "cfg", "width", "height")
        slots = ui["slot_components"]
        ui["go"].click(studio.generate, [*take("selected", "mode"), *common,
                                         *take("batch_size", "batch_count", "scheduler"), *slots],
                       take("gallery", "info", "seed_used"), concurrency_limit=1, concurrency_id="gpu")
        ui["grid_go"].click(studio.grid, [*take("selected", "mode", "x_lora", "x_values", "y_kind", "y_lora", "y_values"),
                                          *common, ui["scheduler"], *slots],
                            ui["grid_out"], concurrency_limit=1, concurrency_id="gpu")
        ui["load"].click(studio.load_png, ui["png"], [*common, *take("scheduler", "selected"), *ui["slot_outputs"]])
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    app.sdlora_jobs = trainer.jobs  # (serve asks a running job to save and exit when the server stops)
    return app


def _form(studio: Studio) -> dict:
    """The left column: prompt, numbers, sampler and mode, the Generate button and what it makes."""
    ui = {"prompt": gr.Textbox(label="Prompt", lines=2, elem_id="prompt"),
          "negative": gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")}
    with gr.Row():
        ui["seed"] = gr.Number(label="Seed (-1: random)", value=DEFAULTS.seed, precision=0, elem_id="seed")
        ui["steps"] = gr.Slider(1, 150, value=DEFAULTS.steps, step=1, label="Steps", elem_id="steps")
        ui["cfg"] = gr.Slider(0, 30, value=DEFAULTS.cfg_scale, step=0.5, label="CFG scale", elem_id="cfg")
    with gr.Row():
        ui["width"] = gr.Slider(8, 2048, value=studio.native, step=8, label="Width", elem_id="width")
        ui["height"] = gr.Slider(8, 2048, value=studio.native, step=8, label="Height", elem_id="height")
        ui["batch_size"] = gr.Slider(1, 8, value=DEFAULTS.batch_size, step=1, label="Batch size")
        ui["batch_count"] = gr.Slider(1, 16, value=DEFAULTS.batch_count, step=1, label="Batch count")
    with gr.Row():
        ui["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=DEFAULTS.scheduler, label="Sampler", elem_id="sampler")
        ui["mode"] = gr.Radio(list(MODES), value=MODES[0], label="Blend mode", elem_id="mode")
    ui["go"] = gr.Button("Generate", variant="primary", elem_id="generate")
    ui["gallery"] = gr.Gallery(label="Images", elem_id="gallery", columns=4, height="auto")
    ui["info"] = gr.Textbox(label="Parameters", lines=3, interactive=False, elem_id="info")
    ui["seed_used"] = gr.Textbox(label="Seed", interactive=False, elem_id="seed-used")
    return ui


LIBRARY = ("selected", "cards", "previews", "triggers")  # what lists the LoRAs, updated when a run finishes


def _library(studio: Studio, prompt) -> dict:
    """The right column: LoRA cards, previews, trigger words, the tick boxes and one weight row per ticked LoRA."""
    gr.Markdown("### LoRAs")
    cards = gr.Dataframe(value=_cards(studio.engine), headers=["name", "family", "rank", "trigger words", "weight",
                                                               "kind", "status", "report"], interactive=False,
                         wrap=True, elem_id="cards")
    previews, triggers = _previews(studio.engine), _triggers(studio.engine)
    gallery = gr.Gallery(value=previews, label="Previews", elem_id="previews", columns=3, height="auto",
                         visible=bool(previews))  # (present even when empty: a run of the Train tab may fill it)
    trig = gr.Dataset(components=[gr.Textbox(visible=False)], samples=triggers or [[""]],
                      label="Trigger words (click to insert)", elem_id="triggers", visible=bool(triggers))
    trig.click(studio.insert_trigger, [trig, prompt], prompt)
    selected = gr.CheckboxGroup(studio.usable, label="Use", elem_id="selected")
    slot_components, slot_outputs = [], []
    for i in range(MAX_SLOTS):
        with gr.Group(visible=False) as row:
            name = gr.Textbox(label="LoRA", interactive=False, elem_id=f"slot{i}-name")
            unet_w = gr.Slider(*WEIGHT_RANGE, value=1.0, step=0.05, label="UNet weight", elem_id=f"slot{i}-unet")
            te_w = gr.Slider(*WEIGHT_RANGE, value=1.0, step=0.05, label="Text-encoder weight", elem_id=f"slot{i}-te")
        slot_components += [name, unet_w, te_w]
        slot_outputs += [row, name, unet_w, te_w]
    # Only a tick by the user resets the weight rows to the preferred weights: a PNG's recipe ticks LoRAs and sets
    # their weights itself (.change fired for that too, and put every weight back to its preferred value).
    selected.input(studio.slots_for, [selected, *slot_components], slot_outputs)
    with gr.Row():
        save_name = gr.Textbox(label="Name of the merged LoRA", elem_id="save-name", scale=2)
        save = gr.Button("Save this blend as one LoRA", elem_id="save-blend", scale=1)
    saved = gr.Textbox(label="Saved", interactive=False, elem_id="saved")
    save.click(studio.save_blend, [save_name, selected, *slot_components], [selected, cards, gallery, trig, saved],
               concurrency_limit=1, concurrency_id="gpu")
    return {"selected": selected, "slot_components": slot_components, "slot_outputs": slot_outputs, "cards": cards,
            "previews": gallery, "triggers": trig}


def _previews(engine: Engine) -> list:
    """(image, name) for each LoRA with a `NAME.preview.png` beside it, as RGB (previews may carry alpha)."""
    from PIL import Image

    def rgb(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    return [(rgb(e.preview), e.name) for e in engine.library.entries.values() if e.preview]


def _triggers(engine: Engine) -> list[list[str]]:
    return [[w] for e in engine.library.entries.values() if e.compatible for w in e.triggers]


def _tools(studio: Studio) -> dict:
    """Below: the X/Y grid and "Load parameters from a PNG"."""
    ui = {}
    with gr.Accordion("X/Y grid", open=False):
        with gr.Row():
            ui["x_lora"] = gr.Dropdown(studio.usable, label="X: LoRA weight of", elem_id="x-lora")
            ui["x_values"] = gr.Textbox(value="0, 0.5, 1", label="X values", elem_id="x-values")
            ui["y_kind"] = gr.Dropdown(list(AXIS_KINDS), value="seed", label="Y axis", elem_id="y-kind")
            ui["y_lora"] = gr.Dropdown(studio.usable, label="Y: LoRA (for a LoRA axis)", elem_id="y-lora")
            ui["y_values"] = gr.Textbox(value="1, 2", label="Y values", elem_id="y-values")
        ui["grid_go"] = gr.Button("Make grid", elem_id="grid")
        ui["grid_out"] = gr.Image(label="Grid", elem_id="grid-image", type="filepath")
    reported = [e.name for e in studio.engine.library.entries.values() if e.report]
    if reported:
        with gr.Accordion("Selection report of a LoRA's run", open=False):
            which = gr.Dropdown(reported, label="LoRA", elem_id="report-lora")
            shown = gr.HTML(elem_id="report")
            which.change(studio.show_report, which, shown)
    with gr.Accordion("Load parameters from a PNG", open=False):
        ui["png"] = gr.Image(type="pil", label="PNG with parameters", elem_id="png-info", image_mode=None)
        ui["load"] = gr.Button("Load into the form", elem_id="load-png")
    return ui


def _floats(text: str) -> list[float]:
    from sdlora.errors import ConfigError

    try:
        return [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"axis values must be numbers separated by commas, got {text!r}") from None


def serve(base: str, lora_dir: Path, output_dir: Path, host: str = StudioConfig.host, port: int = StudioConfig.port,
          block: bool = True, base_config: str | None = None, quantize: str = "", quantize_backend: str = "auto",
          data_root: Path | None = None):
    """Start the UI. Gradio may read files from the outputs folder only (its cache lives inside it), and from
    `data_root` (the Train tab's thumbnails). Stopping a blocking server asks a running training job to save and
    exit."""
    import os

    from sdlora.errors import ConfigError

    if data_root is not None and not Path(data_root).is_dir():
        raise ConfigError(f"--data-root {data_root} is not a folder; give the folder that holds your training-image "
                          "folders")
    _check_port_free(host, port)  # before the base loads: Gradio's own message names its environment variables
    output_dir = Path(output_dir).resolve()
    cache = output_dir / ".gradio"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    engine = Engine(base, lora_dir, base_config=base_config, quantize=quantize, quantize_backend=quantize_backend)
    # The Train tab starts from the studio's base, so that what it trains applies here.
    trained_on = {"base": anchored_spec(str(base))} | ({"base_config": anchored_spec(base_config)} if base_config else {})
    app = build_app(engine, output_dir, data_root, trained_on)
    allowed = [str(output_dir)] + ([str(Path(data_root).resolve())] if data_root else [])
    if block:  # SIGTERM (a service manager stopping the server) ends it the way Ctrl-C does, through the finally
        import signal

        signal.signal(signal.SIGTERM, _interrupt)
    import sys

    print(f"sdlora web UI on http://{host}:{port} (Ctrl+C to stop)", file=sys.stderr)  # (also with -q)
    try:
        app.launch(server_name=host, server_port=port, share=False, allowed_paths=allowed,
                   blocked_paths=[str(Path(lora_dir).resolve())] if lora_dir else None, prevent_thread_lock=not block,
                   quiet=True, show_error=True)
    finally:
        if block:
            app.sdlora_jobs.shutdown()
    return app


def _check_port_free(host: str, port: int) -> None:
    import socket

    from sdlora.errors import ConfigError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed one's port is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror}); pass another --port, or stop what "
                              "uses it") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


__all__ = ["build_app", "serve"]
