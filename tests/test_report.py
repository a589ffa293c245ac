"""The selection report on a short toy run: its pick equals a brute-force check of the same scores, the choice lands
in the adapter's metadata and sidecar, and the HTML is valid and self-contained."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sdlora.config import AdapterConfig, DataConfig, DemoConfig, Params, TrainConfig
from sdlora.demo import EXAMPLES
from sdlora.report import WEIGHTS, _score_and_pick, make_report
from sdlora.safefiles import read_metadata
from sdlora.train import train

PROMPTS = ["rimstyle, a red circle on a blue background", "rimstyle, a yellow square on a gray background"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(base="toy", output_dir=out, name="rim", steps=30, save_every=10, lr=1e-3, batch_size=18,
                      sample_prompt=PROMPTS, sample_steps=10, report=True,
                      data=DataConfig(data=EXAMPLES / "rim", validation_split=0.1),
                      adapter=AdapterConfig(rank=8, preset="full"))
    train(cfg)
    return out


def test_the_pick_equals_a_brute_force_check_of_the_same_scores(toy_run):
    from sdlora.engine import BlendItem, Engine
    from sdlora.toy.analyse import analyse

    report = json.loads((toy_run / "report.json").read_text())
    files = ["rim-step000010.safetensors", "rim-step000020.safetensors", "rim.safetensors"]
    assert [c["file"] for c in report["checkpoints"]] == files and report["prompts"] == PROMPTS
    assert "validation loss on held-out images" in report["scores"] and len(report["validation_images"]) == 2
    engine = Engine("toy", lora_files=[toy_run / f for f in files])
    # The toy base is scored as the demo scores it: its guidance and sampler.
    params = Params(prompt="", steps=10, cfg_scale=DemoConfig.cfg_scale, width=32, height=32,
                    scheduler=DemoConfig.sampler, seed=42)
    scores = {}
    for f in files:
        for w in WEIGHTS:
            images = engine.render(PROMPTS, [42, 42], params, [BlendItem(Path(f).stem, w)] if w else [], "exact")
            readings = [analyse(img) for img in images]
            content = sum((r.colour == c) + (r.shape == s) for r, (c, s) in
                          zip(readings, [("red", "circle"), ("yellow", "square")], strict=True)) / 4
            scores[(f, w)] = {"rim": sum(r.rim for r in readings) / 2,
                              "stripes": sum(r.stripes for r in readings) / 2, "content": content}
    # The style is the one the final adapter raises most; then every cell with the LoRA on whose content holds
    # within 0.1 of the base's, and the highest style score wins (earliest step, then lowest weight, on a tie).
    final = {k[1]: v for k, v in scores.items() if k[0] == files[-1]}
    style = max(("rim", "stripes"), key=lambda s: max(v[s] for v in final.values()) - final[0.0][s])
    assert style == "rim"  # the run learned its style
    base_content = scores[(files[0], 0.0)]["content"]
    allowed = [(k, v[style]) for k, v in scores.items() if k[1] > 0 and v["content"] >= base_content - 0.1]
    best = max(v for _, v in allowed)
    first = next(k for k, v in allowed if round(v, 6) == round(best, 6))
    assert (report["recommended"]["file"], report["recommended"]["weight"]) == first
    for cell in report["cells"]:
        assert cell["style"] == pytest.approx(scores[(cell["file"], cell["weight"])]["rim"], abs=1e-6)
        assert "validation_loss" in cell and cell["validation_loss"] > 0
    w0 = {c["validation_loss"] for c in report["cells"] if c["weight"] == 0}
    assert len(w0) == 1  # the base alone, at the same fixed noise and timesteps for every checkpoint


def test_the_choice_is_written_into_the_adapter_and_its_sidecar(toy_run):
    rec = json.loads((toy_run / "report.json").read_text())["recommended"]
    chosen = toy_run / rec["file"]
    assert read_metadata(chosen)["sdlora_preferred_weight"] == f"{rec['weight']:g}"
    assert json.loads(chosen.with_suffix(".json").read_text())["preferred weight"] == rec["weight"]
    from sdlora.engine import LoraLibrary

    assert LoraLibrary(toy_run, "sd1").get(chosen.stem).preferred_weight == rec["weight"]


class _Page(HTMLParser):
    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.sources, self.tags = [], [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.sources += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_the_html_is_valid_and_self_contained(toy_run):
    text = (toy_run / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert text.startswith("<!DOCTYPE html>") and not page.errors and not page.stack
    assert not page.tags & {"script", "link", "iframe"}
    assert len(page.sources) == 3 * len(WEIGHTS) * len(PROMPTS)
    assert all(s.startswith("data:image/png;base64,") for s in page.sources)  # opens offline: nothing fetched
    assert "Recommended:" in text and "Not available:" in text


def test_validation_loss_picks_the_checkpoint_before_it_rises():
    cells = [{"step": s, "file": f"r{s}", "weight": w, "validation_loss": loss}
             for s, losses in ((10, (0.5, 0.42, 0.4)), (20, (0.5, 0.33, 0.3)), (30, (0.5, 0.36, 0.35)))
             for w, loss in zip((0.0, 0.5, 1.0), losses, strict=True)]
    pick = _score_and_pick(cells, toy=False, validation=True)["recommended"]
    assert (pick["file"], pick["weight"]) == ("r20", 1.0)
    none = _score_and_pick([{"step": 5, "file": "r", "weight": 1.0}], toy=False, validation=False)
    assert none["recommended"]["file"] == "r" and "no score" in none["recommended"]["why"]
    assert any("validation loss" in u for u in none["unavailable"])


def test_a_style_no_cell_raises_cannot_choose():
    """A barely trained toy run: every style score is the base's, so the tie-break (earliest step, lowest weight)
    must not pick a checkpoint at half weight; the validation loss chooses, or else the final adapter at 1."""
    cells = [{"step": s, "file": f"r{s}", "weight": w, "styles": {"rim": 0.0, "stripes": 0.0}, "content": 1.0,
              "validation_loss": {0.0: 0.5, 0.5: 0.45, 1.0: 0.4}[w]} for s in (10, 20) for w in (0.0, 0.5, 1.0)]
    pick = _score_and_pick(cells, toy=True, validation=False)["recommended"]
    assert (pick["file"], pick["weight"]) == ("r20", 1.0) and "no score" in pick["why"]
    pick = _score_and_pick(cells, toy=True, validation=True)["recommended"]
    assert (pick["file"], pick["weight"]) == ("r20", 1.0) and "validation loss" in pick["why"]
    cells[4]["styles"]["rim"] = 0.3  # step 20 at weight 0.5 raises it: the style chooses again
    pick = _score_and_pick(cells, toy=True, validation=False)["recommended"]
    assert (pick["file"], pick["weight"]) == ("r20", 0.5) and "style score" in pick["why"]


def test_report_refuses_a_folder_without_a_run(tmp_path):
    from sdlora.errors import ConfigError

    with pytest.raises(ConfigError, match="no run"):
        make_report(tmp_path)


def test_the_studio_opens_the_report_from_the_loras_card(toy_run, tmp_path):
    from sdlora.engine import Engine
    from webui.app import Studio, _cards

    engine = Engine("toy", toy_run)
    studio = Studio(engine, tmp_path)
    cards = {row[0]: row for row in _cards(engine)}
    assert cards["rim"][-1] == "yes" and cards["rim-step000010"][-1] == "yes"
    frame = studio.show_report("rim")
    assert frame.startswith("<iframe sandbox srcdoc=") and "Recommended:" in frame and "<!DOCTYPE" not in frame
    assert "No selection report" in studio.show_report("not-a-lora")
    # The report's accordion is laid out (in a child process: Gradio's event loop ends with it).
    import subprocess
    import sys

    script = ("import sys; from sdlora.engine import Engine; from webui.app import build_app; "
              "app = build_app(Engine('toy', sys.argv[1]), sys.argv[2]); "
              "print(sorted(c.get('props', {}).get('elem_id') or '' for c in app.config['components']))")
    out = subprocess.run([sys.executable, "-c", script, str(toy_run), str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'report'" in out.stdout and "'report-lora'" in out.stdout
