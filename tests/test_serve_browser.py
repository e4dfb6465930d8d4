"""The page of ``imgtune serve`` in headless Chromium (Playwright driving Debian's chromium): drop a
hymenoptera photo (a generated JPEG where the data set is absent) on it and read the top label and the
heat map from the page; no console errors, no request beyond the server."""

from __future__ import annotations

import base64

import httpx
import pytest

from browser import LAUNCH_ARGS, LOCAL_SCHEMES
from imgtune.ort_predict import open_predictor
from imgtune.serve.service import ServeOptions, Service
from serving import jpeg_bytes, served, tiny_run  # noqa: F401
from test_report import ARTIFACTS, HYMENOPTERA, chromium_or_skip

pytestmark = pytest.mark.slow

DROP = """async ([data, name]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
    const zone = document.getElementById("drop");
    for (const type of ["dragenter", "dragover", "drop"]) {
        zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }
}"""


def photo() -> tuple[str, bytes]:
    found = sorted(HYMENOPTERA.glob("val/ants/*.jpg"))[:1]
    return (found[0].name, found[0].read_bytes()) if found else ("generated.jpg", jpeg_bytes((320, 240)))


def test_dropping_a_photo_shows_the_top_label_and_the_heat_map(tiny_run):
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    name, data = photo()
    with served(Service(open_predictor(tiny_run[0], "torch", "cpu"), ServeOptions())) as base:
        expected = httpx.post(f"{base}/predict", files={"file": (name, data)}).json()["results"][0]
        errors, outside = [], []

        def route(handle):
            url = handle.request.url
            if url.startswith(base + "/") or url.startswith(LOCAL_SCHEMES):
                return handle.continue_()
            outside.append(url)
            return handle.abort("blockedbyclient")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1100, "height": 900})
                context.route("**/*", route)
                page = context.new_page()
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"uncaught {e}"))
                page.goto(f"{base}/", wait_until="load")
                assert "Trained on 24 images of 3 classes" in page.inner_text("#about")
                page.evaluate(DROP, [base64.b64encode(data).decode(), name])
                page.wait_for_selector('#heatmap[data-ready="1"]', timeout=60_000)
                label = page.inner_text("#top-label")
                bars = page.locator("#bar-list .bar").count()
                size = page.evaluate("() => [heatmap.naturalWidth, heatmap.naturalHeight]")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
            finally:
                browser.close()
    assert label == expected["label"] and bars == 3  # top 5 of a 3-class model
    assert size[0] > 0 and size[1] > 0
    assert not errors and not outside, (errors, outside)
