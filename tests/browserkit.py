"""The admin console in a real browser, for tests: Debian's Chromium headless, driven by
Playwright from /usr/bin/chromium (nothing is downloaded), one browser per test module,
and a `tab` per test (its own cookies) that saves a screenshot of the page it ends on
under build/screenshots/ and fails on any JavaScript error, or console error the test
did not provoke. A module using these defines its own `server` fixture."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyplane.clients.client import KeyplaneClient
from tests.consolekit import console_url
from tests.serverkit import RunningServer

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
# What Chromium logs for a page answered with a refusal the test asked for.
REFUSED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of 4\d\d")

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
PASSWORD = "console test password 1"
# What Chromium logs for a page answered with a refusal the test asked for.
REFUSED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of 4\d\d")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("/usr/bin/chromium is missing: make system-test-deps installs it")
        pytest.skip("no /usr/bin/chromium (make system-test-deps installs it)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@dataclass
class Tab:
    """A browser context and its page, with what went wrong in it."""

    page: Any
    base: str
    errors: list[str] = field(default_factory=list)
    refusals_expected: bool = False

    def go(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def sign_in(self, client: KeyplaneClient) -> None:
        self.page.goto(client.create_sign_in_link().url)
        assert self.page.url == self.base + "/roots", self.page.url


@pytest.fixture
def tab(browser: Any, server: RunningServer, request: pytest.FixtureRequest) -> Iterator[Tab]:
    context = browser.new_context(
        # The console's certificate chains to this server's own roots, which Chromium does
        # not hold; tests/test_console_security.py verifies it against them.
        ignore_https_errors=True,
        viewport={"width": 1280, "height": 900},
        accept_downloads=True,
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    opened = Tab(page, console_url(server))

    def on_console(message: Any) -> None:
        if message.type != "error":
            return
        if opened.refusals_expected and REFUSED_LOAD.search(message.text):
            return
        opened.errors.append(f"console error: {message.text}")

    page.on("pageerror", lambda error: opened.errors.append(f"JavaScript error: {error}"))
    page.on("console", on_console)
    try:
        yield opened
    finally:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
        context.close()
    assert not opened.errors, opened.errors
