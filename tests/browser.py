"""Open an HTML file in headless Chromium (Debian's ``chromium``, driven by Playwright) and check it: console
errors, requests that leave the page (a self-contained report makes none; they are blocked, never fetched),
images that did not load; and keep a full-page screenshot.

Playwright's own browser downloads are never used (``playwright install`` would fetch from a CDN); the
system Chromium is passed as ``executable_path``. ``find_chromium(install=True)`` installs Debian's package
with apt-get when running as root (as ``.ci/run`` does).

    from browser import check_page, find_chromium
    result = check_page(Path("report.html"), tmp_path / "report.png")
    assert result.ok, result
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# URLs that never reach the network; anything else a page asks for is recorded and blocked
LOCAL_SCHEMES = ("data:", "blob:", "about:")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu"]  # root in a container, headless
# Chromium logs "Failed to load resource: net::ERR_BLOCKED_BY_CLIENT" for each request the route blocks;
# that request is already in network_requests, so the message is not counted again as a console error
BLOCKED = "net::ERR_BLOCKED_BY_CLIENT"


def _installed() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def find_chromium(install: bool = False) -> str | None:
    """The Chromium to drive: ``$IMGTUNE_CHROMIUM`` if set, else ``chromium`` on the PATH (or
    /usr/bin/chromium). When there is none and ``install`` is true, as root with apt-get, install Debian's
    ``chromium`` (``apt-get update`` first if the plain install fails) and look again. None if not found."""
    if explicit := os.environ.get("IMGTUNE_CHROMIUM"):
        return explicit
    found = _installed()
    if found or not install or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        subprocess.run(command, capture_output=True, env=env)
    return _installed()


@dataclass
class PageCheck:
    console_errors: list[str]  # console messages of type error, then "uncaught ..." page errors
    network_requests: list[str]  # URLs the page asked for beyond itself and data:/blob:/about: (blocked)
    broken_images: list[str]  # src (first 80 characters) of each <img> not complete with a natural width
    image_count: int  # <img> elements on the page
    title: str
    screenshot: Path  # full-page PNG

    @property
    def ok(self) -> bool:
        return not (self.console_errors or self.network_requests or self.broken_images)


# Scroll down a viewport at a time, two animation frames per step, so that loading="lazy" images and
# IntersectionObserver-driven content below the first screen start loading; then back to the top.
_SCROLL = """async () => {
    const frame = () => new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    const step = Math.max(window.innerHeight, 100);
    for (let y = 0; y < document.documentElement.scrollHeight; y += step) {
        window.scrollTo(0, y);
        await frame();
    }
    window.scrollTo(0, document.documentElement.scrollHeight);
    await frame();
    window.scrollTo(0, 0);
    await frame();
}"""
# every image has finished, loaded or failed (a failed image is complete too)
_SETTLED = "() => Array.from(document.images).every(img => img.complete)"
_IMAGES = """() => Array.from(document.images).map(img => ({
    src: img.getAttribute('src') || img.currentSrc || '', ok: img.complete && img.naturalWidth > 0}))"""


def check_page(html: Path, screenshot: Path, width: int = 1280, chromium: str | None = None,
               settle_ms: int = 10_000) -> PageCheck:
    """Open ``html`` (file://) in headless Chromium at ``width`` CSS pixels, wait for load, scroll through
    the page and wait up to ``settle_ms`` for every image to finish, save a full-page PNG to ``screenshot``
    and report what went wrong. ``chromium`` defaults to ``find_chromium()``; RuntimeError when none."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no chromium found: apt-get install --no-install-recommends chromium, "
                           "or set IMGTUNE_CHROMIUM to a Chromium executable")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url = Path(html).resolve().as_uri()
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    console: list[tuple[str, str]] = []  # (text, url of the message's source)
    page_errors: list[str] = []
    requests: list[str] = []

    def route(handle):
        request_url = handle.request.url
        if request_url == url or request_url.startswith(LOCAL_SCHEMES):
            return handle.continue_()
        requests.append(request_url)
        return handle.abort("blockedbyclient")

    def on_console(message):
        if message.type == "error":
            console.append((message.text, message.location.get("url", "")))

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        except Exception as error:
            raise RuntimeError(f"could not start {chromium} under Playwright: {error}") from error
        try:
            context = browser.new_context(viewport={"width": width, "height": 900})
            context.route("**/*", route)  # the context's route also covers popups and frames
            page = context.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda error: page_errors.append(f"uncaught {error.name}: {error.message}"))
            page.goto(url, wait_until="load")
            page.evaluate(_SCROLL)
            try:
                page.wait_for_function(_SETTLED, timeout=settle_ms)
            except PlaywrightTimeout:
                pass  # the images still loading are reported as broken
            images = page.evaluate(_IMAGES)
            title = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    blocked = set(requests)
    errors = [text for text, source in console if not (BLOCKED in text and source in blocked)]
    return PageCheck(console_errors=errors + page_errors, network_requests=requests,
                     broken_images=[image["src"][:80] for image in images if not image["ok"]],
                     image_count=len(images), title=title, screenshot=screenshot)
