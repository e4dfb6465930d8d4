"""Open an HTML file in headless Chromium (Debian's ``chromium``, driven by Playwright) and check it: console
errors, requests that leave the page (a self-contained report makes none; they are blocked), images that
did not load; and keep a full-page screenshot.

Playwright's own browser downloads are never used (``playwright install`` would fetch from a CDN); the
system Chromium is passed as ``executable_path``. ``find_chromium(install=True)`` installs Debian's package
with apt-get when running as root (as ``.ci/run`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_SCHEMES = ("data:", "blob:", "about:")


def find_chromium(install: bool = False) -> str | None:
    found = os.environ.get("IMGTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(command, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        subprocess.run(command, capture_output=True)
    return shutil.which("chromium")


@dataclass
class PageCheck:
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    network_requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    image_count: int = 0
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not (self.console_errors or self.network_requests or self.broken_images)


_IMAGES = """() => Array.from(document.images).map(img => ({
    src: img.getAttribute('src') || '', ok: img.complete && img.naturalWidth > 0}))"""


def check_page(html: Path, screenshot: Path, width: int = 1280, chromium: str | None = None) -> PageCheck:
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no chromium found: apt-get install chromium (or set IMGTUNE_CHROMIUM)")
    url = Path(html).resolve().as_uri()
    result = PageCheck(screenshot=Path(screenshot))

    def route(request_route):
        request = request_route.request
        if request.url == url or request.url.startswith(LOCAL_SCHEMES):
            return request_route.continue_()
        result.network_requests.append(request.url)
        return request_route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda message: message.type == "error" and result.console_errors.append(message.text))
            page.on("pageerror", lambda error: result.console_errors.append(f"uncaught: {error}"))
            page.route("**/*", route)
            page.goto(url, wait_until="load")
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_load_state("networkidle")
            images = page.evaluate(_IMAGES)
            result.title = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    result.image_count = len(images)
    result.broken_images = [image["src"][:80] for image in images if not image["ok"]]
    return result
