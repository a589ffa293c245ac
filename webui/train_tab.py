"""The Train tab's layout and wiring over `webui.training.Trainer`: data, settings, run, history."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sdlora.config import anchored, dump_toml, load_toml
from sdlora.errors import ConfigError
from webui.training import BASICS, PAGE, Trainer, form_updates, form_values, option_specs

TICK = 2.0  # seconds between progress reads while the tab is open


class Handlers:
    """What the tab's events do, over `Trainer`; each returns the updates of the components it is wired to."""

    def __init__(self, trainer: Trainer, names: list[str], on_finished, loras: int):
        self.trainer, self.names, self.on_finished, self.loras = trainer, names, on_finished, loras

    def look(self, rel, number, *form):
        return self.trainer.preflight(rel, form_values(self.names, list(form))), *self.filled(rel, number)

    def filled(self, rel, number):
        """One page of the grid: the listing kept as state, then the thumbnails, then the caption boxes."""
        root, page = self.trainer.folder(rel), self.trainer.page(rel, number)
        listed = [[p.relative_to(root).as_posix(), c] for p, c in page]
        empty = [gr.update(value=None, visible=False)] * (PAGE - len(page))
        images = [gr.update(value=str(p), visible=True) for p, _ in page]
        texts = [gr.update(value=c, label=n, visible=True) for n, c in listed]
        return listed, *images, *empty, *texts, *empty

    def written(self, rel, listed, *texts):
        saved, left = self.trainer.save_captions(rel, listed, list(texts))
        message = f"saved {len(saved)} caption(s)" + (f": {', '.join(p.name for p in saved)}" if saved else "")
        if left:
            message += (f"; not saved, changed on disk since the page was shown: {', '.join(left)} (reload the page "
                        "to see them, then edit again)")
        now = [[n, t if n not in left else c] for (n, c), t in zip(listed, texts, strict=False)]
        return message, now

    def triggered(self, rel, word):
        return f"added {word!r} to {self.trainer.add_trigger(rel, word)} captions"

    def started(self, rel, *form):
        job = self.trainer.start(rel, form_values(self.names, list(form)))
        return f"**{job.name}**: {job.status}"

    def stopped(self, name):
        name = name or self.trainer.jobs.active()
        self.trainer.jobs.stop(name)
        return f"**{name}**: stopping at the end of this step (its state is saved)"

    def resumed(self, name):
        name = name or self.trainer.jobs.active()
        return f"**{name}**: {self.trainer.jobs.resume(name).status}"

    def tick(self, name, seen):
        """Status, loss, samples, warnings, the last adapter added to the library, then the library's updates."""
        import pandas as pd

        jobs, unchanged = self.trainer.jobs, [gr.update()] * self.loras
        if not name or name not in jobs.jobs:  # a reloaded page or a second tab: follow the live run
            name = jobs.active()
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update(), seen, *unchanged
        p = jobs.progress(name)
        rate = f", {p.rate:.2f} steps/s, {p.left} left" if p.rate and p.status == "running" else ""
        text = f"**{name}**: {p.status}, step {p.step} of {p.total}{rate}" + (f"\n\nerror: {p.error}" if p.error else "")
        frame = pd.DataFrame(p.losses or [], columns=["step", "loss"])
        if p.status == "finished" and p.adapter is not None and seen != str(p.adapter):
            unchanged, seen = self.on_finished(p.adapter), str(p.adapter)
        return text, frame, [str(s) for s in p.samples], "\n".join(p.warnings), seen, *unchanged

    def past(self):
        rows = [[r["name"], r["status"], r["steps"], r["final_loss"], _duration(r["seconds"]),
                 r["adapter"].name if r["adapter"] else ""] for r in self.trainer.jobs.history()]
        return rows, gr.update(choices=[r[0] for r in rows])

    def opened(self, name):
        return self._form(self.trainer.jobs.settings(name))

    def loaded(self, path):
        if not path:
            return [gr.update()] * (1 + len(self.names))
        try:
            return self._form(load_toml(Path(path)))
        except ConfigError as e:  # named as the user knows it, not by Gradio's upload cache
            raise ConfigError(str(e).replace(str(path), Path(path).name)) from None

    def _form(self, settings: dict) -> list:
        settings = self.trainer.relative(settings)
        return [settings.get("data", gr.update()), *form_updates(self.names, settings, self.trainer.defaults)]

    def as_toml(self, rel, *form):
        cfg = self.trainer.config(rel, form_values(self.names, list(form)))
        text = dump_toml(anchored(cfg))  # (as a run's own TOML: repeats it from any folder)
        return text, str(self.trainer.save_toml(cfg.name or Path(cfg.data.data).name, text))


def train_tab(trainer: Trainer, friendly, on_finished, loras) -> None:
    """Built inside a `gr.Tab`. `friendly` turns errors into messages; `on_finished(adapter)` adds a finished
    run's LoRA to the Generate tab's library and returns the updates for `loras`, that tab's components listing
    LoRAs."""
    if trainer.root is None:
        gr.Markdown("Training from the browser is off. Start the web UI with `--data-root FOLDER`, the folder that "
                    "holds your training-image folders; the tab reads training data from there and nowhere else.")
        return
    names = [n for n, *_ in option_specs()]
    do = Handlers(trainer, names, on_finished, len(loras))
    with gr.Row():
        folder = gr.Dropdown(trainer.folders(), label="Training images (a folder below the data root)",
                             elem_id="train-folder")
        refresh = gr.Button("Refresh folders", elem_id="train-refresh")
        check = gr.Button("Check the data with these settings", elem_id="train-check")
    report = gr.Textbox(label="Pre-flight report", lines=8, interactive=False, elem_id="train-report")
    with gr.Row():
        page_no = gr.Number(0, precision=0, label=f"Page ({PAGE} images; save your edits before turning it)",
                            elem_id="train-page")
        save_captions = gr.Button("Save the captions changed on this page", elem_id="train-save-captions")
    thumbs, captions = _grid()
    shown = gr.State([])  # [image, caption] for each slot filled, as the page showed them
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word to put first in every caption", elem_id="train-trigger-word")
        add_trigger = gr.Button("Add to every caption", elem_id="train-add-trigger")
    data_msg = gr.Textbox(label="Data", interactive=False, elem_id="train-data-msg")
    fields = _fields(names, trainer.defaults)
    with gr.Row():
        toml_in = gr.File(label="Load TOML", file_types=[".toml"], type="filepath", elem_id="train-toml-in")
        toml_out = gr.Textbox(label="As TOML (`sdlora train --config`)", lines=4, interactive=False,
                              elem_id="train-toml-out")
        show_toml = gr.Button("Save as TOML", elem_id="train-show-toml")
        toml_file = gr.File(label="TOML file", interactive=False, elem_id="train-toml-file")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves, resumable)", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
    status = gr.Markdown(elem_id="train-status")
    loss = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="train-loss")
    samples = gr.Gallery(label="Samples", columns=4, height="auto", elem_id="train-samples")
    warnings = gr.Textbox(label="Warnings", lines=2, interactive=False, elem_id="train-warnings")
    with gr.Accordion("History", open=False) as past_runs:
        history = gr.Dataframe(headers=["run", "status", "steps", "final loss", "time", "adapter"], interactive=False,
                               elem_id="train-history")
        reopen = gr.Dropdown([], label="Open a past run's settings", elem_id="train-reopen")
    library = gr.State(None)  # the adapter last added to the Generate tab
    values, run_name = [fields[n] for n in names], fields["name"]
    grid = [shown, *thumbs, *captions]

    refresh.click(lambda: gr.update(choices=trainer.folders()), None, folder)
    folder.input(friendly(do.look), [folder, page_no, *values], [report, *grid])
    page_no.change(friendly(do.filled), [folder, page_no], grid)
    check.click(friendly(do.look), [folder, page_no, *values], [report, *grid])
    save_captions.click(friendly(do.written), [folder, shown, *captions], [data_msg, shown])
    add_trigger.click(friendly(do.triggered), [folder, trigger], data_msg).success(
        friendly(do.filled), [folder, page_no], grid)
    show_toml.click(friendly(do.as_toml), [folder, *values], [toml_out, toml_file])
    toml_in.change(friendly(do.loaded), toml_in, [folder, *values])
    start.click(friendly(do.started), [folder, *values], status)
    stop.click(friendly(do.stopped), run_name, status)
    resume.click(friendly(do.resumed), run_name, status)
    gr.Timer(TICK).tick(friendly(do.tick), [run_name, library], [status, loss, samples, warnings, library, *loras])
    past_runs.expand(do.past, None, [history, reopen])  # (read when opened: it scans every run folder)
    reopen.change(friendly(do.opened), reopen, [folder, *values])


def _duration(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


def _grid(columns: int = 6) -> tuple[list, list]:
    """PAGE slots, each a thumbnail over its caption's text box (hidden until a page fills it)."""
    thumbs, captions = [], []
    for first in range(0, PAGE, columns):
        with gr.Row(equal_height=False):
            for i in range(first, first + columns):
                with gr.Column(min_width=120):
                    thumbs.append(gr.Image(height=128, interactive=False, show_label=False, buttons=[],
                                           visible=False, elem_id=f"train-thumb-{i}"))
                    captions.append(gr.Textbox(lines=2, visible=False, elem_id=f"train-caption-{i}"))
    return thumbs, captions


def _fields(names: list[str], defaults: dict) -> dict:
    """One input per option, defaults (the config dataclasses', or `defaults`), choices and help; basics first, the
    rest in an accordion."""
    specs = {n: (d, h, c, k) for n, d, h, c, k in option_specs(defaults)}

    def field(name):
        default, help, choices, kind = specs[name]
        label = f"--{name.replace('_', '-')}"
        if choices:
            return gr.Dropdown(list(choices), value=default, label=label, info=help, elem_id=f"opt-{name}")
        if kind is bool:
            return gr.Checkbox(value=default, label=label, info=help, elem_id=f"opt-{name}")
        if kind in (int, float) and default is not None:  # (an optional number is a text box: empty = unset)
            return gr.Number(value=default, label=label, info=help, precision=0 if kind is int else None,
                             elem_id=f"opt-{name}")
        value = "\n".join(default) if kind is list else ("" if default is None else str(default))
        return gr.Textbox(value=value, label=label, info=help, lines=2 if kind is list else 1, elem_id=f"opt-{name}")

    out = {}
    with gr.Group():
        for name in BASICS:
            out[name] = field(name)
    with gr.Accordion("Advanced settings", open=False):
        for name in names:
            if name not in out:
                out[name] = field(name)
    return out

