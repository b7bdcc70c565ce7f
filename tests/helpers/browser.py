"""Headless Chromium for the browser tests: Playwright driving Debian's chromium, skipped (or failed in CI) when missing, and page checks."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RETRIEVAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS_ENV = "RETRIEVAL_SCREENSHOTS"   # a folder: page screenshots land there for a person to look at


def browser_missing_reason() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}: {INSTALL_HINT}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing: pip install -e '.[dev]'"
    return None


@contextlib.contextmanager
def launch_chromium() -> Iterator:
    """A headless Chromium (playwright Browser); skips the test without one, fails instead when RETRIEVAL_REQUIRE_BROWSER=1 (CI)."""
    reason = browser_missing_reason()
    if reason:
        if os.environ.get("RETRIEVAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RETRIEVAL_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageErrors:
    """Console errors, uncaught JavaScript exceptions and 5xx answers of a page, collected from the moment it is watched."""

    def __init__(self, page) -> None:  # noqa: ANN001 - playwright Page
        self.messages: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.messages.append(f"uncaught exception: {exc}"))
        page.on("response", self._response)

    def _response(self, response) -> None:  # noqa: ANN001 - playwright Response
        if response.status >= 500:
            self.messages.append(f"HTTP {response.status} for {response.request.method} {response.url}")

    def _console(self, message) -> None:  # noqa: ANN001 - playwright ConsoleMessage
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            self.messages.append(f"console error: {message.text}" + (f" ({where})" if where else ""))

    def take(self) -> list[str]:
        """-> the messages collected since the last take()."""
        taken, self.messages = self.messages, []
        return taken


def broken_images(page, timeout_ms: int = 30_000) -> list[str]:  # noqa: ANN001 - playwright Page
    """Scroll through the page (lazy images load on the way), wait for every <img> to finish; -> the srcs that did not load.

    An image that did not load is one not complete, or complete with naturalWidth 0 (an error answer, a broken file).
    """
    page.evaluate("""async () => {
        for (let y = 0; y < document.documentElement.scrollHeight; y += Math.max(200, window.innerHeight / 2)) {
            window.scrollTo(0, y);
            await new Promise(r => setTimeout(r, 25));
        }
        window.scrollTo(0, document.documentElement.scrollHeight);
    }""")
    with contextlib.suppress(Exception):   # a timeout is reported below, image by image
        page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=timeout_ms)
    return page.evaluate("""() => [...document.images]
        .filter(i => !i.complete || i.naturalWidth === 0)
        .map(i => (i.complete ? 'failed: ' : 'still loading: ') + i.getAttribute('src'))""")


def screenshot(page, name: str) -> None:  # noqa: ANN001 - playwright Page
    """A full-page screenshot into $RETRIEVAL_SCREENSHOTS/<name>.png, when that variable names a folder."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")   # sticky headers are drawn where the page is scrolled to
        page.screenshot(path=str(Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"), full_page=True)
