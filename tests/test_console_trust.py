"""Trust between two servers (active/active) set up through both servers' consoles in
a real browser (tests/browserkit.py): A's admin asks, B's admin sees the banner and
the request with both fingerprints and the comparison code side by side, approves; both
show the other as trusted and its roots; A's admin ends it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyplane.server.config import load_config
from tests.browserkit import SHOTS, Tab, browser, tab
from tests.consolekit import console_url
from tests.serverkit import RunningServer

__all__ = ["browser", "tab"]  # fixtures, used by name


def peer_server(data_dir: Path, fqdn: str) -> RunningServer:
    return RunningServer(
        load_config(
            None, data_dir=data_dir, listen="127.0.0.1:0", fqdn=fqdn, console_listen="127.0.0.1:0"
        )
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    base = tmp_path_factory.mktemp("pair")
    a = peer_server(base / "a", "pki-a.test")
    try:
        b = peer_server(base / "b", "pki-b.test")
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.fixture(scope="module")
def server(pair: tuple[RunningServer, RunningServer]) -> RunningServer:
    """The server the `tab` opens: A, which asks."""
    return pair[0]


def test_approve_a_trust_request_between_two_servers(
    browser: Any, tab: Tab, pair: tuple[RunningServer, RunningServer]
) -> None:
    a, b = pair
    _trust_between(browser, tab, a, b)


def _trust_between(browser: Any, tab: Tab, a: RunningServer, b: RunningServer) -> None:
    b_root = b.hierarchy.active_roots()[0].fingerprint
    a_root = a.hierarchy.active_roots()[0].fingerprint
    # A's admin asks B, in A's console (the tab's page, pointed at A).
    page = tab.page
    with a.admin_client() as admin_a:
        tab.sign_in(admin_a)
    tab.go("/trust")
    page.get_by_label("Its bootstrap listener").fill(b.bootstrap)
    page.get_by_label("The fingerprint of one of its roots").fill(b_root)
    page.get_by_role("button", name="Request trust").click()
    assert "Asked pki-b.test for trust" in page.locator(".notice").inner_text()
    outgoing = page.locator("article.request")
    assert outgoing.count() == 1 and "outgoing, pending" in outgoing.inner_text().lower()
    code_on_a = outgoing.locator(".comparison-code").inner_text()
    assert re.fullmatch(r"\d{3} \d{3}", code_on_a)
    # B's admin, in B's console: a banner on every page, then the request with both
    # servers' fingerprints and the same code side by side.
    other = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    try:
        on_b = other.new_page()
        errors: list[str] = []
        on_b.on("pageerror", lambda error: errors.append(str(error)))
        with b.admin_client() as admin_b:
            on_b.goto(admin_b.create_sign_in_link().url)
        banner = on_b.locator(".banner")
        assert "A trust request from pki-a.test is waiting" in banner.inner_text()
        banner.get_by_role("link").click()
        incoming = on_b.locator("article.request.decidable")
        assert incoming.count() == 1
        assert incoming.locator(".comparison-code").inner_text() == code_on_a
        sides = incoming.locator(".side-by-side").inner_text()
        assert a_root in sides and b_root in sides
        SHOTS.mkdir(parents=True, exist_ok=True)
        on_b.screenshot(path=str(SHOTS / "test_approve_a_trust_request_pending_on_b.png"))
        incoming.get_by_role("button", name="Approve pki-a.test").click()
        assert "pki-a.test is trusted" in on_b.locator(".notice").inner_text()
        assert on_b.locator(".banner").count() == 0
        assert on_b.locator("#peer-pki-a\\.test").count() == 1
        events = on_b.locator("#trust-history").inner_text()
        assert "received" in events and "approved" in events
        on_b.goto(console_url(b) + "/roots")
        assert a_root in on_b.locator("#peer-roots").inner_text()
        on_b.screenshot(path=str(SHOTS / "test_approve_a_trust_request_b_side.png"), full_page=True)
        assert not errors, errors
    finally:
        other.close()
    # A trusts B too (A started first, before B's approval returned).
    tab.go("/trust")
    assert page.locator("#peer-pki-b\\.test").count() == 1
    assert page.locator("article.request").count() == 0
    tab.go("/roots")
    assert b_root in page.locator("#peer-roots").inner_text()
    # And A's admin ends it, typing B's name.
    tab.go("/trust")
    row = page.locator("#peer-pki-b\\.test")
    row.locator("summary").click()
    row.get_by_label("Reason").fill("decommissioning B")
    row.get_by_label("Type its name").fill("pki-b.test")
    row.get_by_role("button", name="End the trust with pki-b.test").click()
    assert "Ended the trust with pki-b.test" in page.locator(".notice").inner_text()
    assert page.locator("#trusted-peers").count() == 0
    assert "revoked" in page.locator("#trust-history").inner_text()
