"""The headless-Chromium harness (tests/browser.py) notices what a self-contained report must not have."""

from __future__ import annotations

import base64
import functools
import io
import os
from pathlib import Path

import pytest
from PIL import Image

import browser
from browser import check_page, find_chromium


def png_data_uri(colour=(200, 0, 0)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


GOOD = png_data_uri()
CORRUPT = "data:image/png;base64,AAAA"
REMOTE = "https://example.com/x.png"


@functools.cache
def _chromium_found() -> str | None:
    return find_chromium(install=bool(os.environ.get("CI")))  # looked for (and installed) once


def chromium_or_skip() -> str:
    """Debian's chromium; under CI it is installed when missing, and its absence FAILS the test there
    (called in the test's body, not in a fixture, so that it reads as a failure, not a setup error)."""
    found = _chromium_found()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed and could not be installed "
                        "(apt-get install --no-install-recommends chromium)")
        pytest.skip("chromium is not installed (apt-get install --no-install-recommends chromium)")
    return found


def page(tmp_path: Path, body: str, title: str = "t") -> Path:
    html = tmp_path / "page.html"
    html.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
                    f"<body>{body}</body></html>")
    return html


@pytest.mark.slow
def test_harness_notices_console_errors_requests_and_broken_images(tmp_path):
    html = page(tmp_path, f'<img src="{GOOD}"><img src="{CORRUPT}"><script>console.error("boom")</script>'
                          f'<img src="{REMOTE}">', title="broken")
    result = check_page(html, tmp_path / "shots" / "page.png", chromium=chromium_or_skip())
    # Chromium also logs "Failed to load resource: net::ERR_BLOCKED_BY_CLIENT" for the blocked https image;
    # that one is reported as a request, not again as a console error. The corrupt data: image logs nothing.
    assert result.console_errors == ["boom"]
    assert result.network_requests == [REMOTE]  # blocked by the route, never fetched
    assert result.broken_images == [CORRUPT, REMOTE]  # in page order; the good image is not among them
    assert result.image_count == 3 and result.title == "broken" and not result.ok
    assert result.screenshot == tmp_path / "shots" / "page.png"
    with Image.open(result.screenshot) as shot:
        assert shot.format == "PNG" and shot.width == 1280


@pytest.mark.slow
def test_clean_page_is_ok(tmp_path):
    result = check_page(page(tmp_path, f'<h1>report</h1><img src="{GOOD}" alt="good">'), tmp_path / "page.png",
                        chromium=chromium_or_skip())
    assert result.ok, result
    assert (result.console_errors, result.network_requests, result.broken_images) == ([], [], [])
    assert result.image_count == 1 and result.title == "t"
    with Image.open(result.screenshot) as shot:
        assert shot.format == "PNG" and shot.width == 1280


@pytest.mark.slow
def test_lazy_images_far_down_load_and_the_screenshot_is_the_whole_page(tmp_path):
    spacer = '<div style="height:3000px"></div>'
    body = spacer.join(f'<img loading="lazy" width="8" height="8" src="{png_data_uri((0, 0, 40 * i))}">'
                       for i in range(4))
    result = check_page(page(tmp_path, body), tmp_path / "page.png", width=800, chromium=chromium_or_skip())
    assert result.ok, result
    assert result.image_count == 4
    with Image.open(result.screenshot) as shot:
        assert shot.width == 800 and shot.height > 9000


@pytest.mark.slow
def test_uncaught_errors_and_file_requests_count(tmp_path):
    (tmp_path / "side.css").write_text("body { color: red }")
    html = page(tmp_path, '<link rel="stylesheet" href="side.css"><script>throw new Error("bang")</script>')
    result = check_page(html, tmp_path / "page.png", chromium=chromium_or_skip())
    assert result.console_errors == ["uncaught Error: bang"]
    assert result.network_requests == [(tmp_path / "side.css").resolve().as_uri()]  # not self-contained
    assert result.broken_images == [] and result.image_count == 0 and not result.ok


def test_find_chromium_honours_the_environment(monkeypatch):
    monkeypatch.setenv("IMGTUNE_CHROMIUM", "/opt/my/chromium")
    assert find_chromium() == "/opt/my/chromium"


def test_check_page_without_chromium_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(browser, "find_chromium", lambda install=False: None)
    with pytest.raises(RuntimeError, match="no chromium found"):
        check_page(page(tmp_path, "<p>x</p>"), tmp_path / "page.png")
