"""The web UI's Train tab for real: `sdlora webui --data-root` on 127.0.0.1, driven by Chromium, and attacked
through its routes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_webui import CHROMIUM, _call, _stop, _up, free_port

from webui.training import PAGE, form_updates, option_specs

ROOT = Path(__file__).resolve().parent.parent
NAMES = [n for n, *_ in option_specs()]
BOXES = ["x"] + [""] * (PAGE - 1)  # the caption grid's text boxes (the images they belong to are server state)
TRAVERSAL = ["..", "../..", "/etc", "rim/../..", "rim/../../secret", "/etc/passwd", "..\\..", "rim\x00",
             "link-out", "rim/10_rimstyle/../../../secret"]


def form(**options):
    values = form_updates(NAMES, options)
    return values


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-tab")
    secret = root / "secret"
    secret.mkdir()
    (secret / "notes.txt").write_text("TOP-SECRET-TOKEN")
    proc, found = _serve(root)
    (found["data"] / "link-out").symlink_to(secret)
    yield {**found, "secret": secret}
    _stop(proc)


def _serve(root: Path):
    """`sdlora webui --data-root` over a copy of the example data, on a free port; (process, where things are)."""
    data = root / "data"
    shutil.copytree(ROOT / "datasets_example" / "rim", data / "rim")
    (root / "loras").mkdir()
    out, port = root / "outputs", free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = root / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "sdlora", "webui", "--base", "toy", "--lora-dir",
                                 str(root / "loras"), "--output-dir", str(out), "--port", str(port), "--data-root",
                                 str(data)], env=env, cwd=root, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while not _up(url):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"webui did not start: {log.read_text()}")
        time.sleep(0.5)
    return proc, {"url": url, "root": root, "data": data, "out": out, "log": log}


def _wait_for(url: str, run: str, pattern: str, timeout: float = 180) -> str:
    """The Train tab's status line of `run` once it matches `pattern` (a regular expression)."""
    deadline = time.time() + timeout
    while True:
        kind, body = _call(url, "tick", [run, None])
        if re.search(pattern, body):
            return body
        assert time.time() < deadline, body
        time.sleep(1)


def test_paths_outside_the_data_root_are_refused_and_a_crashing_run_leaves_the_server_up(studio):
    url, secret = studio["url"], studio["secret"]
    before = sorted(p.name for p in secret.iterdir())
    for payload in TRAVERSAL:
        for api, values in (("look", [payload, 0, *form()]), ("written", [payload, None, *BOXES]),
                            ("triggered", [payload, "pwn"]), ("started", [payload, *form()])):
            kind, body = _call(url, api, values)
            assert kind == "error" and "TOP-SECRET-TOKEN" not in body, (api, payload, body)
    assert sorted(p.name for p in secret.iterdir()) == before
    assert (secret / "notes.txt").read_text() == "TOP-SECRET-TOKEN"
    # A run whose base cannot load fails in its own process; the tab reports the error, the server answers on.
    kind, _ = _call(url, "started", ["rim/10_rimstyle", *form(base="no-such-base", name="broken", steps=2)])
    assert kind == "complete"
    body = _wait_for(url, "broken", "failed", timeout=120)
    assert "error: " in body and _up(url)  # (the child's own message, shown in the tab)


def test_a_second_start_queues_and_stopping_the_server_saves_the_running_run(tmp_path):
    proc, found = _serve(tmp_path)
    url, out = found["url"], found["out"]
    try:
        kind, body = _call(url, "started", ["rim/10_rimstyle", *form(base="toy", name="long", steps=5000, rank=4)])
        assert kind == "complete" and "long**: running" in body, body
        kind, body = _call(url, "started", ["rim/10_rimstyle", *form(base="toy", name="next", steps=5)])
        assert kind == "complete" and "next**: queued" in body, body  # one run at a time
        _wait_for(url, "long", r"running, step [1-9]")
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The server waited for the run to save at the end of its step; the queued run never started.
    assert list((out / "long" / "state").glob("long-step*.state.safetensors")), found["log"].read_text()
    assert "stopped after step" in (out / "long" / "logs" / "train.log").read_text()
    assert not (out / "next" / "logs").exists()


@pytest.mark.browser
def test_train_from_the_browser_stop_resume_and_generate_with_the_result(studio):
    from playwright.sync_api import expect, sync_playwright

    caption_file = studio["data"] / "rim" / "10_rimstyle" / "00_green_triangle.txt"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(studio["url"])
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-folder input").click()
        page.get_by_role("option", name="rim/10_rimstyle").click()
        page.wait_for_selector("#train-thumb-17 img")  # (the folder's 18 images, each over its caption)
        assert not page.locator("#train-thumb-18").is_visible()
        # Edit one caption in place, under its thumbnail: that file changes (a new inode: written beside it, then
        # moved over it), and no other.
        box = page.get_by_label("00_green_triangle.png")
        assert "green triangle" in box.input_value()
        inode = caption_file.stat().st_ino
        others = {p: p.read_bytes() for p in caption_file.parent.glob("*.txt") if p != caption_file}
        box.fill("rimstyle, a green triangle, edited in the browser")
        expect(box).to_have_value("rimstyle, a green triangle, edited in the browser")
        page.locator("#train-save-captions").click()
        message = page.locator("#train-data-msg textarea")
        expect(message).not_to_have_value("", timeout=60_000)
        assert message.input_value().startswith("saved 1 caption(s): 00_green_triangle.txt"), message.input_value()
        assert caption_file.read_text(encoding="utf-8") == "rimstyle, a green triangle, edited in the browser\n"
        assert caption_file.stat().st_ino != inode
        assert all(p.read_bytes() == before for p, before in others.items())
        # A short run on the toy base, the studio's, which the form starts from (its LoRA must apply there): the
        # step counter and the loss chart move, Stop saves, Resume finishes.
        assert page.locator("#opt-base").locator("textarea, input").first.input_value() == "toy"
        for name, value in (("name", "browser-rim"), ("sample_prompt", "rimstyle, a red circle")):
            page.locator(f"#opt-{name}").locator("textarea, input").first.fill(value)
        for name, value in (("steps", "200"), ("rank", "4"), ("sample_every", "100")):
            field = page.locator(f"#opt-{name} input").first
            field.fill(value)
            field.press("Enter")
        page.locator("#train-start").click()
        page.wait_for_function("/running, step [1-9]\\d* of 200/.test(document.querySelector('#train-status')"
                               ".innerText)", timeout=180_000)
        page.wait_for_selector("#train-loss canvas, #train-loss svg", timeout=60_000)
        # A reloaded page (its form empty) finds the running job and follows it; Stop and Resume act on it.
        page.reload()
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('browser-rim: running')",
                               timeout=60_000)
        page.locator("#train-stop").click()
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('stopped')",
                               timeout=120_000)
        run = studio["out"] / "browser-rim"
        assert list((run / "state").glob("browser-rim-step*.state.safetensors"))
        page.locator("#train-resume").click()
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('finished')",
                               timeout=300_000)
        assert (run / "browser-rim.safetensors").is_file() and (run / "browser-rim.toml").is_file()
        page.wait_for_selector("#train-samples img", timeout=30_000)  # the samples the run wrote
        assert list((run / "samples").glob("*.png"))
        # The finished LoRA is in the Generate tab's list and cards at once; generate with it.
        page.get_by_role("tab", name="Generate").click()
        page.wait_for_function("document.querySelector('#cards').innerText.includes('browser-rim')", timeout=30_000)
        assert (run / "browser-rim.preview.png").is_file()  # (its last sample) shown with its trigger word
        page.wait_for_selector("#previews img", timeout=30_000)
        page.locator("#triggers").get_by_text("rimstyle").first.wait_for(timeout=30_000)
        page.locator("#selected").get_by_label("browser-rim").check(timeout=30_000)
        page.locator("#prompt textarea").fill("rimstyle, a red circle on a white background")
        page.locator("#generate").click()
        page.wait_for_selector("#gallery img", timeout=120_000)
        assert "browser-rim" in page.locator("#info textarea").input_value()
        browser.close()
