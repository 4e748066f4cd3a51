"""Shared browser helpers for the tests that open pages in headless Chromium (the built book,
the triage reports): one Chromium per test session, pages served on 127.0.0.1 or opened from
``file://`` (:func:`file_base`), and a watch that records console errors, failed requests and
any request leaving the machine.

Set ``WMHQC_REQUIRE_BROWSER=1`` (CI does) to fail instead of skipping where Chromium or
Playwright is missing; ``WMHQC_CHROMIUM`` points at another Chromium binary.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parent.parent
# screenshots kept as test artifacts
ARTIFACTS = Path(os.environ.get("WMHQC_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"]


def chromium_path() -> str | None:
    path = os.environ.get("WMHQC_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    return path if path and Path(path).exists() else None


@contextlib.contextmanager
def launched_chromium() -> Iterator:
    """Headless Chromium through Playwright; skips (or fails under WMHQC_REQUIRE_BROWSER=1)
    where either is missing."""
    required = os.environ.get("WMHQC_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    executable = chromium_path()
    if executable is None:
        if required:
            pytest.fail("no chromium binary (apt-get install chromium, or set WMHQC_CHROMIUM)")
        pytest.skip("no chromium binary")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output readable
        pass


@contextlib.contextmanager
def served(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def file_base(directory: Path) -> str:
    """``directory`` as a ``file://`` base URL for :class:`Tab` (no server: pages opened as a
    reader double-clicking them would open them)."""
    return Path(directory).resolve().as_uri()


class PageWatch:
    """Console errors, uncaught exceptions, failed and off-machine requests of one page.

    Requests are watched, not intercepted: routing them through Playwright would switch the
    browser cache off, and every page would parse plotly's 4.8 MB again (3 s a page here
    instead of 1). A request to another host is a problem whether or not it could load. For a
    ``file://`` base the host is empty, so every network request (http, https, ws, ftp) is a
    problem, while ``file:``, ``data:`` and ``blob:`` URLs stay on the machine."""

    def __init__(self, page, base: str):
        self.problems: list[str] = []
        host = urlparse(base).netloc

        def console(m):
            # the browser's own request for /favicon.ico (not made by the page) is not a fault
            if m.type == "error" and not urlparse(m.location.get("url", "")).path.endswith(
                    "/favicon.ico"):
                self.problems.append(f"console error: {m.text}")

        page.on("console", console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and
                self.problems.append(f"HTTP {r.status}: {r.url}"))

        def request(r):
            url = urlparse(r.url)
            if url.scheme in ("http", "https", "ws", "wss", "ftp") and url.netloc != host:
                self.problems.append(f"off-machine request: {r.url}")

        page.on("request", request)


class Tab:
    """One browser page that a test module navigates from document to document, keeping the
    cache and the compiled scripts; ``open`` starts each document with a clean watch.

    ``browser`` is a Browser (the page gets a context of its own) or a BrowserContext, whose
    pages share storage (``localStorage``) and downloads settings."""

    def __init__(self, browser, base: str):
        self.base = base
        if hasattr(browser, "new_context"):  # a Browser
            self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        else:  # a BrowserContext: its new_page takes no viewport
            self.page = browser.new_page()
            self.page.set_viewport_size({"width": 1280, "height": 900})
        self.watch = PageWatch(self.page, base)

    def open(self, rel: str, viewport: tuple[int, int] = (1280, 900), settle_ms: int = 300):
        """Load ``rel`` (relative to the served root) at ``viewport``; waits until every
        plotly figure has drawn and a moment more for late console errors."""
        self.page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
        self.watch.problems.clear()
        self.page.goto(f"{self.base}/{rel}", wait_until="load")
        self.page.wait_for_function(
            "Array.from(document.querySelectorAll('.plotly-graph-div'))"
            ".every(d => d.querySelector('svg.main-svg'))", timeout=30_000)
        self.page.wait_for_timeout(settle_ms)
        return self.page, self.watch

    def close(self) -> None:
        self.page.close()
