"""The web UI for real: `sdlora webui` on 127.0.0.1, driven by Chromium, and attacked through its routes."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from sdlora.cli import main
from sdlora.recipe import read_png_parameters

from conftest import draw_shape, make_dataset

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
HTML_NAME = "<b>bold<img src=x onerror=window.__pwned=1>"
HTML_TRIGGER = "<u>und</u><img src=y onerror=window.__pwned=2>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    data = make_dataset(root / "data")
    loras = root / "loras"
    for name, lr in (("inkstyle", "1e-2"), ("watercolor", "5e-3")):
        assert main(["-q", "train", "--data", str(data), "--resolution", "64", "--steps", "2", "--lr", lr,
                     "--output-dir", str(loras), "--name", name, "--trigger", name]) == 0
    # A LoRA whose trigger word is HTML, and a preview captioned with an HTML name: all must show as text.
    assert main(["-q", "train", "--data", str(data), "--resolution", "64", "--steps", "1", "--output-dir", str(loras),
                 "--name", "marked", "--trigger", HTML_TRIGGER]) == 0
    secret = root / "secret.txt"  # in the server's working folder; more in its home folder and in the dataset
    secret.write_text("TOP-SECRET-TOKEN")
    home = root / "home"
    home.mkdir()
    (home / "secret-home.txt").write_text("TOP-SECRET-TOKEN")
    (data / "secret-data.txt").write_text("TOP-SECRET-TOKEN")
    (loras / "evil.safetensors").symlink_to(secret)
    (loras / f"{HTML_NAME}.safetensors").write_bytes((loras / "inkstyle.safetensors").read_bytes())
    draw_shape((32, 32)).save(loras / f"{HTML_NAME}.preview.png")
    out = root / "outputs"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HOME": str(home)}
    # The server's output goes to a file: a pipe nobody reads fills up with Gradio's logged refusals (64 KiB) and
    # then blocks the server's next write, which looked like a hung request.
    log = root / "server.log"
    with log.open("w") as sink:  # the child keeps its own copy of the handle
        proc = subprocess.Popen([sys.executable, "-m", "sdlora", "webui", "--base", "tiny-sd", "--lora-dir",
                                 str(loras), "--output-dir", str(out), "--port", str(port)], env=env, cwd=root,
                                stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"webui exited: {log.read_text()}")
        if _up(url):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("webui did not start within 120 s")
    yield {"url": url, "root": root, "loras": loras, "out": out, "secret": secret, "home": home, "data": data}
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.browser
def test_select_weight_generate_in_a_browser(server):
    pytest.importorskip("playwright")
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(server["url"])
        page.wait_for_selector("#generate")
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#selected").get_by_label("inkstyle").check()
        page.locator("#selected").get_by_label("watercolor").check()
        page.wait_for_selector("#slot1-unet", state="visible")
        for slot, (unet_w, te_w) in enumerate([("0.8", "0.6"), ("0.4", "1.2")]):
            for name, value in (("unet", unet_w), ("te", te_w)):
                box = page.locator(f"#slot{slot}-{name} input[type=number]")
                box.fill(value)
                box.press("Enter")
        # Width and height start at the base's native size (tiny-sd: 64), so they are left alone here.
        assert [page.locator(f"#{f} input[type=number]").input_value() for f in ("width", "height")] == ["64", "64"]
        for field, value in (("seed", "5"), ("steps", "3")):
            box = page.locator(f"#{field} input[type=number]") if field != "seed" else page.locator("#seed input")
            box.fill(value)
            box.press("Enter")
        page.locator("#generate").click()
        page.wait_for_selector("#gallery img", timeout=120_000)
        page.wait_for_function("document.querySelector('#info textarea').value.includes('Seed: 5')", timeout=60_000)
        info = page.locator("#info textarea").input_value()
        # Names, trigger words and preview captions that look like HTML are shown as text: no element was made
        # from them and no script ran, on the rendered page itself.
        assert page.locator("img[src='x'], img[src='y']").count() == 0
        assert page.locator("b", has_text="bold").count() == 0 and page.locator("u", has_text="und").count() == 0
        assert page.evaluate("window.__pwned === undefined")
        for where in ("#cards", "#selected", "#previews"):
            assert page.locator(where).get_by_text(HTML_NAME, exact=False).count() >= 1, where
        for where in ("#cards", "#triggers"):
            assert page.locator(where).get_by_text(HTML_TRIGGER, exact=False).count() >= 1, where
        page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
        # The image's recipe back into a fresh page: the LoRAs ticked at the weights it was made with (ticking them
        # used to reset every weight to the LoRA's preferred one).
        page.reload()
        page.wait_for_selector("#generate")
        page.get_by_text("Load parameters from a PNG").click()
        page.locator("#png-info input[type=file]").set_input_files(str(sorted(server["out"].glob("*.png"))[-1]))
        page.wait_for_selector("#png-info img")
        page.locator("#load-png").click()
        weights = {f"#slot{s}-{n} input[type=number]": v for s, n, v in ((0, "unet", "0.8"), (0, "te", "0.6"),
                                                                         (1, "unet", "0.4"), (1, "te", "1.2"))}
        page.wait_for_function("document.querySelector('#seed input').value === '5'", timeout=30_000)
        page.wait_for_timeout(2000)  # (whatever else the load sets off has run)
        assert {k: page.locator(k).input_value() for k in weights} == weights
        assert page.locator("#slot0-name textarea, #slot0-name input").first.input_value() == "inkstyle"
        # Ticking one more keeps the rows that were there; the new one starts at its preferred weight.
        page.locator("#selected").get_by_label("marked", exact=True).check()
        page.wait_for_selector("#slot2-unet", state="visible")
        page.wait_for_timeout(1000)
        assert {k: page.locator(k).input_value() for k in weights} == weights
        assert page.locator("#slot2-unet input[type=number]").input_value() == "1"
        browser.close()
    assert "<lora:inkstyle:0.6:0.8>" in info and "<lora:watercolor:1.2:0.4>" in info
    saved = sorted(server["out"].glob("*.png"))
    assert saved, "no image was saved to the outputs folder"
    recipe = read_png_parameters(saved[-1])
    assert recipe["prompt"] == "a red circle <lora:inkstyle:0.6:0.8> <lora:watercolor:1.2:0.4>"
    assert recipe["Seed"] == "5" and recipe["Size"] == "64x64" and "inkstyle" in recipe["Lora hashes"]


def _payloads(server) -> list[str]:
    """Paths to the planted secrets (working folder, home folder, dataset) and to system files, spelled every way a
    traversal is tried: absolute, ../ chains, encoded and double-encoded, backslashes, ~, NUL, case and fullwidth."""
    secret, home, data, loras = server["secret"], server["home"], server["data"], server["loras"]
    targets = [str(secret), str(home / "secret-home.txt"), str(data / "secret-data.txt"), "/etc/passwd"]
    out = []
    for t in targets:
        rel = t.lstrip("/")
        out += [t, "../" * 12 + rel, urllib.parse.quote("../" * 12 + rel, safe=""),
                urllib.parse.quote(urllib.parse.quote("../" * 12 + rel, safe=""), safe=""),
                "..%2f" * 12 + rel, "..%2F" * 12 + rel, "%2e%2e/" * 12 + rel, "%2E%2E%2F" * 12 + rel,
                "..\\" * 12 + rel.replace("/", "\\"), "..%5c" * 12 + rel.replace("/", "%5c"),
                "....//" * 12 + rel, "\uff0e\uff0e/" * 12 + rel, "%ef%bc%8e%ef%bc%8e/" * 12 + rel,
                t + "%00.png", t + "\x00.png", "//" + rel, "/./" * 3 + rel, t.upper()]
    out += ["~/secret-home.txt", "%7e/secret-home.txt", "file://" + str(secret), secret.name, "secret-data.txt",
            str(loras / "evil.safetensors"), str(loras / "inkstyle.safetensors"), "evil.safetensors"]
    return out


def test_no_file_outside_the_outputs_can_be_read(server):
    served = server["out"] / "served-probe.txt"  # the positive control: a file in the outputs folder is served
    served.write_text("OUTPUT-OK")
    r = httpx.get(server["url"] + "/gradio_api/file=" + str(served), timeout=10)
    assert r.status_code == 200 and r.text == "OUTPUT-OK"
    served.unlink()
    leaks = []
    payloads = _payloads(server)
    assert len(payloads) >= 60
    for payload in payloads:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/static/", "/assets/"):
            try:
                r = httpx.get(server["url"] + route + payload, timeout=10)
            except (httpx.InvalidURL, ValueError):  # refused by the client before it reached the server
                continue
            body = r.content
            if b"TOP-SECRET-TOKEN" in body or b"root:x:0:0" in body or body.startswith(b"\x8c\x02") or (
                    r.status_code == 200 and payload.endswith(".safetensors") and len(body) > 8 and b"lora_" in body):
                leaks.append((route, payload, r.status_code))
    assert not leaks


def test_the_api_takes_names_not_paths_and_checks_values(server):
    """Values Gradio's own checks let through (its allowlists and slider bounds refuse the rest first), so each
    refusal here is sdlora's server-side check: LoRAs named in prompt tags, sizes off the 8-pixel grid, weights and
    numbers beyond range, and too many LoRAs."""
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    written = set(server["out"].glob("*.png"))
    base = ["a", "", 1, 3, 7.0, 64, 64, 1, 1, "Euler a"]
    secret = server["secret"]
    too_many = " ".join(f"<lora:l{i}>" for i in range(7))
    cases = [  # (prompt, value overrides by position, sdlora's message)
        (f"a <lora:../{secret.name}:1>", {}, "unknown LoRA '../secret.txt'"),
        (f"a <lora:{secret}:1>", {}, "unknown LoRA"),
        ("a <lora:evil:1>", {}, "unknown LoRA 'evil'"),  # the link out of the folder is not in the library
        ("a <lora:inkstyle:9>", {}, "outside [-2, 2]"),
        ("a <lora:inkstyle:te=-7>", {}, "outside [-2, 2]"),
        (f"a {too_many}", {}, "7 LoRAs in one blend (prompt tags included); at most 6"),
        ("a", {5: 65}, "multiples of 8"),
        ("a", {2: 2**40}, "seed must be"),
    ]
    for prompt, overrides, reason in cases:
        values = [overrides.get(i, v) for i, v in enumerate([prompt, *base[1:]])]
        with pytest.raises(Exception, match=re.escape(reason)):
            client.predict([], "exact", *values, *["", 1.0, 1.0] * 6, api_name="/generate")
    slots = ["", 1.0, 1.0] * 6
    for y_kind, y_values, reason in (("steps", "1000", "steps must be between 1 and 150"),
                                     ("cfg", "99", "CFG scale must be between 0 and 30"),
                                     ("seed", ", ".join("1" * 9), "an axis takes 1 to 8 values"),
                                     ("seed", "one, two", "axis values must be numbers")):
        with pytest.raises(Exception, match=re.escape(reason)):
            client.predict([], "fast", "inkstyle", "0, 1", y_kind, None, y_values, "a", "", 3, 2, 5.0, 64, 64,
                           "Euler", *slots, api_name="/grid")
    assert set(server["out"].glob("*.png")) == written  # a refused request writes nothing


def test_twenty_simultaneous_generations_are_queued_none_lost_none_crossed(server):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    client = Client(server["url"], verbose=False)

    def one(k):
        gallery, info, _ = client.predict([], "exact", f"a circle number {k}", "", 1000 + k, 2, 7.0, 64, 64, 1, 1,
                                          "Euler", *["", 1.0, 1.0] * 6, api_name="/generate")
        return k, info, read_png_parameters(Path(gallery[0]["image"]))

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20
    for k, info, recipe in results:
        assert f"Seed: {1000 + k}" in info and recipe["prompt"] == f"a circle number {k}" and recipe["Seed"] == str(1000 + k)


def test_symlinks_out_of_the_folder_are_not_listed(server):
    page = httpx.get(server["url"] + "/config", timeout=10).text
    assert "inkstyle" in page and "evil" not in page.replace("evil.safetensors", "")


def test_save_a_blend_as_one_lora(server):
    import json

    from gradio_client import Client

    from sdlora.lorafile import read_lora

    client = Client(server["url"], verbose=False)
    slots = ["inkstyle", 0.8, 0.6, "watercolor", 0.4, 1.2, *["", 1.0, 1.0] * 4]
    *listed, message = client.predict("ink and water", ["inkstyle", "watercolor"], *slots, api_name="/save_blend")
    assert "ink and water" in str(listed[1])  # the cards list it at once, not after a reload
    out = server["loras"] / "ink and water.safetensors"
    assert message == "saved ink and water.safetensors (2 LoRAs)" and out.is_file()
    sources = json.loads(read_lora(out).metadata["sdlora_merged_from"])
    assert [(s["file"], s["unet"], s["te"]) for s in sources] == [("inkstyle.safetensors", 0.8, 0.6),
                                                                  ("watercolor.safetensors", 0.4, 1.2)]
    before = out.read_bytes()
    for name, why in (("ink and water", "exists already"), ("../escape", "use letters"), ("", "use letters")):
        with pytest.raises(Exception, match=why):
            client.predict(name, ["inkstyle"], *slots, api_name="/save_blend")
    assert out.read_bytes() == before and not (server["root"] / "escape.safetensors").exists()
    gallery, info, _ = client.predict([], "fast", "a red circle <lora:ink and water:1>", "", 11, 2, 7.0, 64, 64, 1, 1,
                                      "Euler a", *["", 1.0, 1.0] * 6, api_name="/generate")
    assert "<lora:ink and water:1>" in info  # the saved LoRA is in the library at once


def test_wider_address_needs_an_explicit_flag(capsys, tmp_path):
    assert main(["webui", "--lora-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--listen" in capsys.readouterr().err


def test_grid_and_png_info_through_the_api(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    slots = ["", 1.0, 1.0] * 6
    grid = client.predict(["watercolor"], "fast", "inkstyle", "0, 1", "seed", None, "1, 2", "a circle", "", 3, 2, 5.0,
                          64, 64, "Euler", *slots, api_name="/grid")
    from PIL import Image

    with Image.open(grid) as g:
        assert g.size == (110 + 2 * 64, 24 + 2 * 64)
    client.predict(["watercolor"], "fast", "inkstyle", "0, 1", "cfg", None, "5", "a circle", "", -1, 2, 5.0,
                   64, 64, "Euler", *slots, api_name="/grid")  # a seed drawn at random: the file is named after it
    newest = max(server["out"].glob("*-grid.png"), key=lambda p: p.stat().st_mtime)
    assert newest.name.split("-")[1] == read_png_parameters(newest)["Seed"] != "0"
    gallery, _, _ = client.predict(["inkstyle", "watercolor"], "exact", "a red circle", "", 11, 2, 7.0, 64, 64, 1, 1,
                                   "Euler a", "inkstyle", 0.8, 0.6, "watercolor", 0.4, 1.2, *slots[6:],
                                   api_name="/generate")
    png = Path(gallery[0]["image"])
    recipe = read_png_parameters(png)
    assert recipe["prompt"] == "a red circle <lora:inkstyle:0.6:0.8> <lora:watercolor:1.2:0.4>"
    values = client.predict(handle_file(str(png)), api_name="/load_png")
    assert values[0] == "a red circle" and values[2] == 11 == int(recipe["Seed"]) and values[5] == 64
    assert values[8] == ["inkstyle", "watercolor"]
    from sdlora.recipe import save_png

    bad = server["root"] / "bad-size.png"
    with Image.open(png) as img:
        save_png(img.copy(), bad, "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64xbig, Model: m")
    with pytest.raises(Exception, match="malformed Size, Seed, Steps or CFG scale"):
        client.predict(handle_file(str(bad)), api_name="/load_png")


def test_one_generation_at_a_time_behind_a_full_queue(tmp_path):
    """What the README promises: generations run one at a time, and at most QUEUE_SIZE more wait; the rest are refused
    at once. The studio runs over an engine whose generate blocks until released (tests/blocking_studio.py), so
    the queue fills for sure. Requests go to Gradio's queue endpoint: one HTTP call each, answered with an event
    id or a refusal."""
    from webui.app import QUEUE_SIZE

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "blocking_studio.py"), str(port), str(tmp_path)],
                                env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    events = tmp_path / "events.txt"

    def count(kind):
        return events.read_text().split().count(kind) if events.exists() else 0

    def wait_for(check, seconds=120):
        deadline = time.time() + seconds
        while not check() and time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the studio exited: {log.read_text()}")
            time.sleep(0.1)
        return check()

    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(url)), "the studio did not start"
        config = httpx.get(url + "/config", timeout=10).json()
        fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
        data = [[], "exact", "a", "", 1, 3, 7.0, 64, 64, 1, 1, "Euler a", *["", 1.0, 1.0] * 6]
        answers = []
        with httpx.Client(base_url=url, timeout=30) as http:
            for k in range(QUEUE_SIZE + 4):
                r = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                               "session_hash": f"s{k}", "event_data": None})
                answers.append("queued" if r.status_code == 200 else f"{r.status_code} {r.json().get('detail')}")
                if k == 0:  # the first one starts; every later one finds it running
                    assert wait_for(lambda: count("start") == 1)
        assert answers[: 1 + QUEUE_SIZE] == ["queued"] * (1 + QUEUE_SIZE)
        assert all(a.startswith("503 Queue is full") for a in answers[1 + QUEUE_SIZE:]), answers
        time.sleep(1)
        assert count("start") == 1  # the others wait
        (tmp_path / "release").touch()
        assert wait_for(lambda: count("end") == 1 + QUEUE_SIZE)
        lines = events.read_text().split()
        assert lines == ["start", "end"] * (1 + QUEUE_SIZE)  # all that queued ran, never two at once
    finally:
        _stop(proc)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _call(url: str, api: str, data: list, seconds: float = 20) -> tuple[str, str]:
    """One request through Gradio's HTTP API (the route any script can use, past the client's own checks): the
    last event's kind ('complete' or 'error') and data."""
    r = httpx.post(f"{url}/gradio_api/call/{api}", json={"data": data}, timeout=seconds)
    r.raise_for_status()
    kind, body = "", ""
    with httpx.stream("GET", f"{url}/gradio_api/call/{api}/{r.json()['event_id']}", timeout=seconds) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return kind, line[5:].strip()
    return kind, body


def test_every_callback_refuses_path_payloads_and_the_server_keeps_answering(server):
    """Each traversal payload, in every field that names a LoRA, a file or an axis, of every callback (generate,
    grid, save_blend, load_png): answered with an error within seconds, nothing read or written, and a plain
    generation afterwards still completes (no request is left holding the generation slot)."""
    url, out, loras = server["url"], server["out"], server["loras"]
    before = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *loras.rglob("*")] if p.is_file()}
    slots = ["", 1.0, 1.0] * 6
    gen = ["exact", "a", "", 1, 2, 7.0, 64, 64, 1, 1, "Euler"]
    grid_tail = ["a", "", 3, 2, 5.0, 64, 64, "Euler", *slots]
    fields = {  # callback: a function from a payload to that call's values
        "generate (ticked LoRA)": ("generate", lambda p: [[p], *gen, *slots]),
        "generate (weight row)": ("generate", lambda p: [["inkstyle"], *gen, p, 1.0, 1.0, *slots[3:]]),
        "grid (X LoRA)": ("grid", lambda p: [[], "fast", p, "0, 1", "seed", None, "1, 2", *grid_tail]),
        "grid (Y LoRA)": ("grid", lambda p: [[], "fast", "inkstyle", "0, 1", "lora", p, "0, 1", *grid_tail]),
        "grid (Y kind)": ("grid", lambda p: [[], "fast", "inkstyle", "0, 1", p, None, "1, 2", *grid_tail]),
        "save_blend (name)": ("save_blend", lambda p: [p, ["inkstyle"], *slots]),
        "save_blend (ticked)": ("save_blend", lambda p: ["payload-blend", [p], *slots]),
        "load_png (file)": ("load_png", lambda p: [{"path": p, "meta": {"_type": "gradio.FileData"}}]),
    }
    payloads = _payloads(server)
    answered = []
    for label, (api, values) in fields.items():
        for payload in payloads:
            started = time.time()
            kind, body = _call(url, api, values(payload))
            answered.append((label, payload, kind, round(time.time() - started, 1)))
            assert "TOP-SECRET-TOKEN" not in body and "root:x:0:0" not in body, (label, payload)
    # The weight-row name is display-only (the ticked box chooses the LoRA), so those calls may complete; a payload
    # that is a plain file name is a valid name for a saved blend, which lands in the LoRA folder and nowhere else.
    def allowed(label, payload):
        return label.startswith("generate (weight row)") or (
            label == "save_blend (name)" and re.fullmatch(r"[\w.\- ]+", payload) and not payload.startswith("."))

    wrong = [a for a in answered if a[2] != "error" and not allowed(a[0], a[1])]
    slow = [a for a in answered if a[3] > 10]
    assert not wrong and not slow
    assert len(answered) == len(fields) * len(payloads)
    kind, body = _call(url, "generate", [[], *gen, *slots], seconds=120)
    assert kind == "complete" and "Seed: 1" in body
    after = {p: p.stat().st_mtime_ns for p in [*out.rglob("*"), *loras.rglob("*")] if p.is_file()}
    changed = [p for p in after if before.get(p) != after[p]]
    blends = {loras / f"{p.removesuffix('.safetensors')}.safetensors" for label, p, kind, _ in answered
              if label == "save_blend (name)" and kind == "complete"}
    assert [p for p in changed if p.parent == out] and not (loras / "payload-blend.safetensors").exists()
    assert all(p in blends or p.is_relative_to(out) and (p.parent == out and p.suffix == ".png" or ".gradio" in p.parts)
               for p in changed)


def test_output_names_never_come_from_the_prompt(server):
    """The prompt is text in the picture's recipe, never part of its file name."""
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    for prompt in ("../../escaped", "/etc/passwd", "CON", "name.safetensors <b>", "a/b\\c:d*e?f"):
        gallery, _, _ = client.predict([], "fast", prompt, "", 5, 2, 7.0, 64, 64, 1, 1, "Euler",
                                       *["", 1.0, 1.0] * 6, api_name="/generate")
        saved = Path(gallery[0]["image"])
        written = sorted(server["out"].glob("*.png"), key=lambda p: p.stat().st_mtime_ns)[-1]
        assert re.fullmatch(r"\d{5}-5\.png", written.name), written.name
        assert read_png_parameters(written)["prompt"] == prompt and saved.suffix == ".png"
