"""Shared browser helpers for the tests that open pages in headless Chromium (the built book,
the triage reports): one Chromium per test session, pages served on 127.0.0.1, and a watch that
records console errors, failed requests and any request leaving the machine.

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


class PageWatch:
    """Console errors, uncaught exceptions, failed and off-machine requests of one page."""

    def __init__(self, page, base: str):
        self.problems: list[str] = []
        host = urlparse(base).netloc
        page.on("console", lambda m: m.type == "error" and
                self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and
                self.problems.append(f"HTTP {r.status}: {r.url}"))

        def route(r):
            url = urlparse(r.request.url)
            if url.scheme in ("http", "https") and url.netloc != host:
                self.problems.append(f"off-machine request: {r.request.url}")
                return r.abort()
            return r.continue_()

        page.route("**/*", route)
