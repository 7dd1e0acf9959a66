"""The editor page in a real headless Chromium (Debian's, driven by Playwright), against a real server."""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from fpedit import EditEngine
from fpedit.server.app import build_server
from fpedit.server.config import ServerConfig

pytestmark = pytest.mark.browser

STEPS = 2
#: The system browser (.ci/run installs Debian's chromium); Playwright never downloads its own.
CHROMIUM = os.environ.get("FPEDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium, as .ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(model_dir):
    running = build_server(EditEngine.from_pretrained(model_dir), ServerConfig(port=0, http_port=0))
    yield running
    running.drain(5)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    blocked: list[str] = []  # the page must work offline: anything from another origin is refused and noted

    def only_this_server(route) -> None:
        if route.request.url.startswith(server.http.url) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.blocked = blocked
    page.goto(server.http.url)
    yield page
    context.close()


def test_page_edits_an_uploaded_image_like_the_api(page, server, tmp_path):
    path = tmp_path / "photo.png"
    make_image(64, 64, seed=9).save(path)
    page.wait_for_function("document.getElementById('server-info').textContent.includes('torch')")
    page.set_input_files("#file", str(path))
    page.fill("#prompt", "a red car")
    page.click("summary")
    page.fill("#steps", str(STEPS))
    page.click("#run")
    page.wait_for_selector("#f-edited img", timeout=240_000)
    shown_edit = page.get_attribute("#f-edited img", "src")
    shown_recon = page.get_attribute("#f-recon img", "src")
    assert shown_edit.startswith("data:image/png;base64,")
    # The same request over the API.
    body = {"image": base64.b64encode(path.read_bytes()).decode(), "targetPrompt": "a red car",
            "options": {"steps": STEPS}}  # fmt: skip
    api = httpx.post(server.http.url + "v1/edit", json=body, timeout=300).json()
    assert np.array_equal(pixels(shown_edit.split(",", 1)[1]), pixels(api["editedImage"]))
    assert np.array_equal(pixels(shown_recon.split(",", 1)[1]), pixels(api["reconstructionImage"]))
    assert page.get_attribute("#download", "href") == shown_edit
    assert page.locator("#runs tbody tr").count() == 1

    # Edit again: by the inversion id, the target branch only; the page says how much faster it was.
    page.fill("#prompt", "a blue boat")
    page.click("#again")
    page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 2", timeout=240_000)
    again = page.get_attribute("#f-edited img", "src").split(",", 1)[1]
    by_id = {"inversionId": api["inversionId"], "targetPrompt": "a blue boat", "options": {"steps": STEPS}}
    api_again = httpx.post(server.http.url + "v1/edit", json=by_id, timeout=300).json()
    assert np.array_equal(pixels(again), pixels(api_again["editedImage"]))
    assert "by id" in page.inner_text("#runs tbody tr:first-child")
    assert page.text_content("#speedup").startswith("edit by id: ")  # with both timings
    # The maps of the edited inversion (by id: nothing inverted again) for the prompt now typed.
    page.click("#maps-btn")
    page.wait_for_selector("#maps-grid figure", timeout=240_000)
    maps = httpx.post(server.http.url + "v1/maps", json={"prompt": "a blue boat", "inversionId": api["inversionId"]},
                      timeout=300).json()  # fmt: skip
    captions = page.locator("#maps-grid figcaption").all_inner_texts()
    assert captions == maps["tokens"] and len(captions) == page.locator("#maps-grid img.heat").count()
    assert page.locator("#error").is_hidden()
    assert page.blocked == []


def test_page_shows_the_api_error_message(page, server, tmp_path):
    path = tmp_path / "photo.png"
    make_image(64, 64, seed=2).save(path)
    page.set_input_files("#file", str(path))
    page.click("summary")
    page.fill(
        "#start", "0.9"
    )  # each value is in range, the window they make is not: only the server can tell
    page.fill("#end", "0.2")
    page.fill("#prompt", "a cat")
    page.click("#run")
    page.wait_for_selector("#error-message", timeout=60_000)
    body = {"image": base64.b64encode(path.read_bytes()).decode(), "targetPrompt": "a cat",
            "options": {"replaceStart": 0.9, "replaceEnd": 0.2}}  # fmt: skip
    api = httpx.post(server.http.url + "v1/edit", json=body, timeout=60)
    assert api.status_code == 400
    assert page.inner_text("#error-message") == api.json()["error"]["message"]
    assert "INVALID_ARGUMENT" in page.inner_text("#error")
    assert page.locator("#f-edited img").count() == 0


def test_page_shows_one_heatmap_per_token_of_the_target_prompt(page, server, tmp_path):
    path = tmp_path / "photo.png"
    make_image(64, 64, seed=5).save(path)
    page.set_input_files("#file", str(path))
    page.fill("#prompt", "a small red car")
    page.click("summary")
    page.fill("#steps", str(STEPS))
    page.click("#maps-btn")  # before any edit: the chosen image, inverted by the server
    page.wait_for_selector("#maps-grid figure", timeout=240_000)
    body = {"image": base64.b64encode(path.read_bytes()).decode(), "prompt": "a small red car",
            "options": {"steps": STEPS}}  # fmt: skip
    api = httpx.post(server.http.url + "v1/maps", json=body, timeout=300).json()
    figures = page.locator("#maps-grid figure")
    assert figures.count() == len(api["tokens"]) == len(api["heatmaps"]) >= 4
    assert [figures.nth(i).locator("figcaption").inner_text() for i in range(figures.count())] == api[
        "tokens"
    ]
    shown = page.eval_on_selector_all("#maps-grid img.heat", "imgs => imgs.map(i => i.src)")
    assert len(shown) == len(api["tokens"])
    for src, expected in zip(shown, api["heatmaps"], strict=True):
        assert src.startswith("data:image/png;base64,")
        assert np.array_equal(pixels(src.split(",", 1)[1]), pixels(expected))
    assert len({src for src in shown}) > 1  # tokens attend to different places
    # Drawn: every heatmap decoded by the browser, scaled over the image (not a 4x4 speck).
    sizes = page.eval_on_selector_all(
        "#maps-grid img.heat", "imgs => imgs.map(i => [i.complete && i.naturalWidth, i.clientWidth])"
    )
    assert all(natural == api["mapWidth"] and shown_width >= 64 for natural, shown_width in sizes), sizes
    assert page.locator("#error").is_hidden() and page.blocked == []


def test_page_states_the_server_limits_and_explains_a_refusal_before_sending(browser, server, tmp_path):
    """The number inputs carry the limits the server enforces (1..1000 steps, guidance 0..50, window 0..1);
    steps -3 is explained next to the field and nothing is sent; loading the page logs no error (no 404)."""
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    try:
        page.goto(server.http.url)
        page.wait_for_function("document.getElementById('server-info').textContent.includes('torch')")
        limits = {
            name: (page.get_attribute(f"#{name}", "min"), page.get_attribute(f"#{name}", "max"))
            for name in ("steps", "guidance", "start", "end")
        }
        assert limits == {
            "steps": ("1", "1000"),
            "guidance": ("0", "50"),
            "start": ("0", "1"),
            "end": ("0", "1"),
        }
        path = tmp_path / "photo.png"
        make_image(64, 64, seed=3).save(path)
        page.set_input_files("#file", str(path))
        page.fill("#prompt", "a cat")
        page.click("summary")
        page.fill("#steps", "-3")
        page.click("#run")
        page.wait_for_selector("#steps-note:not(:empty)", timeout=10_000)
        note = page.inner_text("#steps-note")
        assert note.startswith("Steps: ") and "1" in note, note
        assert page.evaluate("document.getElementById('steps').validity.rangeUnderflow")
        page.wait_for_timeout(300)  # a request sent anyway would have started by now
        assert posts == []
        page.fill("#steps", str(STEPS))
        page.click("#run")
        page.wait_for_selector("#f-edited img", timeout=120_000)
        assert page.inner_text("#steps-note") == ""
        assert len(posts) == 1
        assert problems == []
    finally:
        context.close()
