"""The editor page in a real headless Chromium (Debian's, driven by Playwright), against a real server."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

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


def choose_photo(page, tmp_path: Path, seed: int) -> Path:
    """A 64x64 test photo written under ``tmp_path`` and chosen in the page's file input."""
    path = tmp_path / "photo.png"
    make_image(64, 64, seed=seed).save(path)
    page.set_input_files("#file", str(path))
    return path


def fill_edit(page, prompt: str, steps: str = str(STEPS)) -> None:
    """The target prompt, then the step count in the advanced options (opened)."""
    page.fill("#prompt", prompt)
    page.click("summary")
    page.fill("#steps", steps)


def test_page_edits_an_uploaded_image_like_the_api(page, server, tmp_path):
    page.wait_for_function("document.getElementById('server-info').textContent.includes('torch')")
    path = choose_photo(page, tmp_path, seed=9)
    fill_edit(page, "a red car")
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
    path = choose_photo(page, tmp_path, seed=2)
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
    path = choose_photo(page, tmp_path, seed=5)
    fill_edit(page, "a small red car")
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
        choose_photo(page, tmp_path, seed=3)
        fill_edit(page, "a cat", steps="-3")
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


def capsule(shape: tuple[int, int], start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Each pixel centre's distance to the segment ``start``-``end`` (pixel units, x right, y down)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    (x0, y0), (x1, y1) = start, end
    t = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    return np.hypot(xs - (x0 + t * (x1 - x0)), ys - (y0 + t * (y1 - y0)))


def test_page_brush_mask_edits_only_inside_it(page, server, engine, tmp_path):
    """A stroke painted over the source (then partly erased) is sent as the edit's mask; outside the latent
    cells it selects, the edit's final latent is the inversion's z_0 bit for bit, and the mask the server
    used is drawn over the result while "show" is ticked."""
    from reference import reference_user_mask

    from fpedit.engine.blend import Blend
    from fpedit.engine.options import EditOptions

    path = choose_photo(page, tmp_path, seed=4)
    page.wait_for_selector("#brush-stage:not([hidden])")
    assert page.evaluate("maskB64()") is None  # nothing painted: no mask is sent
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / 64  # screen pixels per image pixel
    page.eval_on_selector("#brush-size", "(e, v) => { e.value = v; }", str(12 * scale))  # 12 image px wide
    start, end, erased = (6.0, 20.0), (30.0, 20.0), (30.0, 20.0)  # image px: a stroke along latent row 2

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + point[0] * scale, box["y"] + point[1] * scale

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=10)
    page.mouse.up()
    # Clear removes it all; paint again, then erase a dot at the stroke's end.
    page.click("#brush-clear")
    assert page.evaluate("maskB64()") is None
    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=10)
    page.mouse.up()
    page.click("#brush-erase")
    page.mouse.move(*at(erased))
    page.mouse.down()
    page.mouse.up()
    page.click("#brush-paint")

    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/edit:stream") else None)
    fill_edit(page, "a red car")
    page.check("#show-mask")
    page.click("#run")
    page.wait_for_selector("#f-edited img#mask-overlay", state="attached", timeout=60_000)

    # The mask sent: white within the painted stroke (less the erased dot), black elsewhere.
    mask_png = base64.b64decode(sent[0]["options"]["mask"])
    mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 127
    assert mask.shape == (64, 64)
    stroke, dot = capsule(mask.shape, start, end), capsule(mask.shape, erased, (erased[0] + 1e-3, erased[1]))
    assert mask[(stroke <= 4.5) & (dot > 7.5)].all()  # painted (6 px radius), away from the eraser
    assert not mask[(stroke > 7.5) | (dot <= 4.5)].any()  # outside the stroke, or erased

    # The same edit in process, to see its latents: the page shows exactly it.
    image = Image.open(path)
    options = EditOptions(steps=STEPS, blend=Blend(mask=mask_png))
    result = engine.edit_real(
        engine.invert(image, options=EditOptions(steps=STEPS)), "a red car", options=options
    )
    shown = page.get_attribute("#f-edited img:not(#mask-overlay)", "src").split(",", 1)[1]
    assert np.array_equal(pixels(shown), np.asarray(result.edited_image.convert("RGB")))
    cells = reference_user_mask(Image.open(io.BytesIO(mask_png)), (64, 64))
    assert 0 < cells.sum() < cells.size
    np.testing.assert_array_equal(result.blend_mask, cells)
    outside = ~cells
    np.testing.assert_array_equal(result.edited_latents[..., outside], result.source_latents[..., outside])
    assert not np.array_equal(result.edited_latents[..., cells], result.source_latents[..., cells])

    # The overlay is the mask the server used (each latent cell an 8x8 block), shown only while ticked.
    overlay = pixels(page.get_attribute("#mask-overlay", "src").split(",", 1)[1])[..., 0] > 127
    np.testing.assert_array_equal(overlay, np.kron(cells, np.ones((8, 8), bool)))
    assert page.locator("#mask-overlay").is_visible()
    page.uncheck("#show-mask")
    assert page.locator("#mask-overlay").is_hidden()
    assert page.locator("#error").is_hidden() and page.blocked == []


def test_page_blend_words_are_sent_and_refused_words_explained(page, server, tmp_path):
    path = choose_photo(page, tmp_path, seed=6)
    fill_edit(page, "a red car")
    page.fill("#blend-words", "boat")
    page.click("#run")
    page.wait_for_selector("#error-message", timeout=60_000)
    assert page.inner_text("#error-message").startswith(
        "blend_words: 'boat' is not a word of the target prompt"
    )
    page.fill("#blend-words", "red, car")
    page.fill("#blend-threshold", "0.97")
    page.click("#run")
    page.wait_for_selector("#f-edited img#mask-overlay", state="attached", timeout=60_000)
    body = {"image": base64.b64encode(path.read_bytes()).decode(), "targetPrompt": "a red car",
            "options": {"steps": STEPS, "blendWords": ["red", "car"], "blendThreshold": 0.97}}  # fmt: skip
    api = httpx.post(server.http.url + "v1/edit", json=body, timeout=300).json()
    shown = page.get_attribute("#f-edited img:not(#mask-overlay)", "src").split(",", 1)[1]
    assert np.array_equal(pixels(shown), pixels(api["editedImage"]))
    assert np.array_equal(
        pixels(page.get_attribute("#mask-overlay", "src").split(",", 1)[1]), pixels(api["blendMask"])
    )
    assert page.locator("#mask-overlay").is_hidden()  # "show" is not ticked


def test_page_submits_a_job_and_lists_recent_jobs(page, server, tmp_path):
    """ "Submit as job" posts to /v1/jobs, the list shows GET /v1/jobs (newest first), and the finished job's
    result is shown: the same image as the synchronous edit."""
    path = choose_photo(page, tmp_path, seed=8)
    fill_edit(page, "a blue boat")
    page.click("#job-btn")
    page.wait_for_selector("#f-edited img", timeout=60_000)
    listing = httpx.get(server.http.url + "v1/jobs", params={"limit": 10}, timeout=30).json()["jobs"]
    newest = listing[0]
    assert newest["kind"] == "edit" and newest["state"] == "succeeded"
    page.wait_for_function(
        "id => document.querySelector('#jobs tbody tr').dataset.id === id && "
        "document.querySelector('#jobs tbody tr').cells[2].textContent === 'succeeded'",
        arg=newest["id"],
        timeout=10_000,
    )
    rows = page.eval_on_selector_all("#jobs tbody tr", "rows => rows.map(r => r.dataset.id)")
    assert rows == [job["id"] for job in listing]
    body = {"image": base64.b64encode(path.read_bytes()).decode(), "targetPrompt": "a blue boat",
            "options": {"steps": STEPS}}  # fmt: skip
    api = httpx.post(server.http.url + "v1/edit", json=body, timeout=300).json()
    shown = page.get_attribute("#f-edited img", "src").split(",", 1)[1]
    assert np.array_equal(pixels(shown), pixels(api["editedImage"]))
    assert np.array_equal(pixels(shown), pixels(newest["edit"]["editedImage"]))
    assert "job" in page.inner_text("#runs tbody tr:first-child")
    assert page.locator("#error").is_hidden() and page.blocked == []


def test_page_offers_the_source_prompt_only_to_inversions_that_use_one(page):
    """DDIM inversion takes no source prompt (every entry point refuses one): the field is disabled while DDIM
    is chosen and comes back for null-text and negative-prompt inversion."""
    assert page.is_disabled("#source-prompt")
    page.select_option("#method", "INVERSION_METHOD_NEGATIVE_PROMPT")
    assert page.is_enabled("#source-prompt")
    page.fill("#source-prompt", "a photo of a cat")
    page.select_option("#method", "INVERSION_METHOD_DDIM")
    assert page.is_disabled("#source-prompt")
