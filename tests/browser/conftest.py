"""Browser fixtures: a stack of its own with a token, Debian's Chromium driven by Playwright,
geotagged images on disk for the file chooser, and a folder for screenshots.

Chromium is the system one (``shutil.which("chromium")``, Playwright's own browsers are not
downloaded); without it the browser tests are skipped with the reason shown, except under ``CI``,
where a missing browser is a failure. Screenshots go to ``$SCALEODM_TEST_ARTIFACTS`` when set
(``scripts/screenshots.py`` copies some of them to ``docs/screenshots/``), else to a temporary
folder of the session.

The stack runs the ODM test double for ``SCALEODM_TEST_ENGINE_SECONDS`` plus
``ODM_TEST_ENGINE_SECONDS_PER_IMAGE`` per image: a task of 5 images takes about 3 s, long enough
to see its progress move, and a task of many images runs long enough to be canceled from its page.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    ViewportSize,
    sync_playwright,
)

from tests.harness import servers
from tests.harness.data import exif_block, jpeg
from tests.harness.stack import Stack, running_stack

TOKEN = "console-test-token-0123456789"
ENGINE_SECONDS = "1.5"
ENGINE_SECONDS_PER_IMAGE = "0.3"
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


def geotagged_jpeg(index: int) -> bytes:
    """A header-only JPEG with camera EXIF and GPS: image ``index`` of a small grid flight."""
    lat = 46.5 + (index % 3) * 0.0004
    lon = 7.25 + (index // 3) * 0.0005
    return jpeg(4000, 3000, exif_block("DJI", "FC6310", lat, lon, 612.5 + index))


def write_images(folder: Path, count: int, prefix: str = "DJI") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}_{i + 1:04d}.JPG"
        path.write_bytes(geotagged_jpeg(i))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium): browser tests skipped"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; under CI this is a failure")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def console_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    """The four services with ``SCALEODM_TOKEN``, on their own NATS and database."""
    tmp = tmp_path_factory.mktemp("console-stack")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}",
                    extra_env={"SCALEODM_TOKEN": TOKEN,
                               "SCALEODM_TEST_ENGINE_SECONDS": ENGINE_SECONDS,
                               "ODM_TEST_ENGINE_SECONDS_PER_IMAGE": ENGINE_SECONDS_PER_IMAGE})
        with running_stack(own):
            yield own


@pytest.fixture(scope="module")
def api(console_stack: Stack) -> Iterator[httpx.Client]:
    """The NodeODM API with the token, for setting up and checking what the page did."""
    with httpx.Client(base_url=console_stack.gateway_url, params={"token": TOKEN},
                      timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("SCALEODM_TEST_ARTIFACTS")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("console-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def playwright_driver(chromium: str) -> Iterator[Playwright]:  # noqa: ARG001
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright, chromium: str) -> Iterator[Browser]:
    browser = playwright_driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    yield browser
    browser.close()


@dataclass
class Watched:
    """A page and what it said: errors, console lines, every URL it was at."""

    page: Page
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No script error, no Content-Security-Policy violation, every control labelled."""
        csp = [line for line in self.console if "Content Security Policy" in line]
        assert not self.errors, self.errors
        assert not csp, csp
        assert not self.unlabelled(), self.unlabelled()

    def unlabelled(self) -> list[str]:
        """The visible controls of the current page without an accessible name."""
        found: list[str] = self.page.evaluate(UNLABELLED_JS)
        return found


UNLABELLED_JS = """() => {
    const named = (el) => (el.labels && el.labels.length > 0) || el.getAttribute('aria-label')
        || el.getAttribute('aria-labelledby') || el.getAttribute('title')
        || (['BUTTON', 'A'].includes(el.tagName) && el.textContent.trim());
    return [...document.querySelectorAll('input, select, textarea, button, progress, a[href]')]
        .filter((el) => el.type !== 'hidden' && el.getClientRects().length > 0 && !named(el))
        .map((el) => el.outerHTML.slice(0, 120));
}"""


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    seen = Watched(page)

    def on_console(msg: ConsoleMessage) -> None:
        seen.console.append(f"{msg.type}: {msg.text}")

    def on_frame(frame: Any) -> None:
        if frame == page.main_frame:
            seen.urls.append(frame.url)

    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    page.on("console", on_console)
    page.on("framenavigated", on_frame)
    try:
        yield seen
    finally:
        context.close()
