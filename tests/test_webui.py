"""The web UI for real: `sdlora webui` on 127.0.0.1, driven by Chromium, and attacked through its routes."""

import os
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

from conftest import make_dataset

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


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
    secret = root / "secret.txt"
    secret.write_text("TOP-SECRET-TOKEN")
    (loras / "evil.safetensors").symlink_to(secret)
    (loras / "<b>bold<img src=x onerror=alert(1)>.safetensors").write_bytes((loras / "inkstyle.safetensors").read_bytes())
    out = root / "outputs"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdlora", "webui", "--base", "tiny-sd", "--lora-dir", str(loras),
                             "--output-dir", str(out), "--port", str(port)], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"webui exited: {proc.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("webui did not start within 120 s")
    yield {"url": url, "root": root, "loras": loras, "out": out, "secret": secret}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


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
        # The LoRA named like HTML is shown as text: no element was made from it.
        assert page.locator("img[src='x']").count() == 0 and page.locator("b", has_text="bold").count() == 0
        assert page.get_by_text("<b>bold<img src=x onerror=alert(1)>").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
        browser.close()
    assert "<lora:inkstyle:0.6:0.8>" in info and "<lora:watercolor:1.2:0.4>" in info
    saved = sorted(server["out"].glob("*.png"))
    assert saved, "no image was saved to the outputs folder"
    recipe = read_png_parameters(saved[-1])
    assert recipe["prompt"] == "a red circle <lora:inkstyle:0.6:0.8> <lora:watercolor:1.2:0.4>"
    assert recipe["Seed"] == "5" and recipe["Size"] == "64x64" and "inkstyle" in recipe["Lora hashes"]


def _payloads(secret: Path, loras: Path):
    yield str(secret)
    yield "../" * 12 + str(secret).lstrip("/")
    yield urllib.parse.quote("../" * 12 + str(secret).lstrip("/"), safe="")
    yield urllib.parse.quote(urllib.parse.quote("../" * 12 + str(secret).lstrip("/"), safe=""), safe="")
    yield "..%2f" * 12 + str(secret).lstrip("/")
    yield str(loras / "evil.safetensors")
    yield str(loras / "inkstyle.safetensors")
    yield secret.name
    yield "/etc/passwd"
    yield "../" * 12 + "etc/passwd"


def test_no_file_outside_the_outputs_can_be_read(server):
    served = server["out"] / "served-probe.txt"  # the positive control: a file in the outputs folder is served
    served.write_text("OUTPUT-OK")
    r = httpx.get(server["url"] + "/gradio_api/file=" + str(served), timeout=10)
    assert r.status_code == 200 and r.text == "OUTPUT-OK"
    served.unlink()
    leaks = []
    for payload in _payloads(server["secret"], server["loras"]):
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/static/", "/assets/"):
            r = httpx.get(server["url"] + route + payload, timeout=10)
            body = r.content
            if b"TOP-SECRET-TOKEN" in body or b"root:x:0:0" in body or body.startswith(b"\x8c\x02") or (
                    r.status_code == 200 and payload.endswith(".safetensors") and len(body) > 8 and b"lora_" in body):
                leaks.append((route, payload, r.status_code))
    assert not leaks


def test_the_api_takes_names_not_paths_and_checks_values(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    written = set(server["out"].glob("*.png"))
    base = ["a", "", 1, 3, 7.0, 64, 64, 1, 1, "Euler a"]
    choice = "not in the list of choices"  # Gradio's own allowlist check, before any code of ours runs
    cases = [
        (["../secret"], {}, {}, (choice, "unknown LoRA")),
        ([str(server["secret"])], {}, {}, (choice, "unknown LoRA")),
        (["evil"], {}, {}, (choice, "unknown LoRA")),
        ([], {3: 1000}, {}, ("greater than maximum", "steps must be")),
        ([], {5: 65}, {}, ("multiples of 8",)),
        ([], {9: "Rocket"}, {}, (choice, "unknown scheduler")),
        (["inkstyle"], {}, {1: 9.0}, ("greater than maximum", "outside")),
        (["inkstyle"], {}, {2: -7.0}, ("less than minimum", "outside")),
    ]
    for names, value_overrides, weight_overrides, reasons in cases:
        values = [value_overrides.get(i, v) for i, v in enumerate(base)]
        weights = [weight_overrides.get(i, v) for i, v in enumerate(["", 1.0, 1.0] * 6)]
        with pytest.raises(Exception) as e:
            client.predict(names, "exact", *values, *weights, api_name="/generate")
        assert any(r in str(e.value) for r in reasons), (reasons, str(e.value))
    assert set(server["out"].glob("*.png")) == written  # a refused request writes nothing


def test_metadata_is_text_and_symlinks_out_are_not_listed(server):
    page = httpx.get(server["url"] + "/config", timeout=10).text
    assert "evil" not in page.replace("evil.safetensors", "")  # the link out is not in the library
    assert "bold<img src=x onerror=alert(1)>" in page  # listed as a plain string in the config


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
