"""The admin console in a real browser (tests/browserkit.py: Debian's Chromium, headless,
one browser for the module, a screenshot of each test's last page): signing in, roots,
settings, reveals, the fleet, backups, who may press what, forged requests, revoked
identities and the keyboard, against one server shared by the module."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from tests.browserkit import Tab, browser, tab
from tests.consolekit import console_overrides
from tests.serverkit import RunningServer, running_server
from tests.test_enrollment import make_csr, p256
from tests.test_roles import Person, new_identity, snapshot_state

__all__ = ["browser", "tab"]  # fixtures, used by name

PASSWORD = "console test password 1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    base = tmp_path_factory.mktemp("console")
    password_file = base / "pki-password"
    password_file.write_text("first password 1\n")
    config = base / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{password_file}"\n')
    with running_server(base / "data", config_file=config, **console_overrides()) as running:
        with running.admin_client() as admin:
            admin.update_setting("PKIDatabasePassword", PASSWORD)
        yield running


@pytest.fixture
def admin(server: RunningServer) -> Iterator[KeyplaneClient]:
    with server.admin_client() as client:
        yield client


def person(admin: KeyplaneClient, name: str, role: str) -> Person:
    return new_identity(admin, name, role)


def enabled_buttons(page: Any) -> list[str]:
    """The labels of buttons that would change something (sign-out, search, filter and
    copy buttons aside)."""
    found = page.eval_on_selector_all(
        "main button:not([disabled])",
        "els => els.map(e => e.textContent.trim())",
    )
    # Verifying a backup against live compares and changes nothing (an auditor's read).
    return [b for b in found if b not in ("Search", "Filter", "Copy", "Verify against live")]


# -- signing in ----------------------------------------------------------------------------


def test_sign_in_with_a_one_time_link_and_a_replayed_link_is_refused(
    tab: Tab, browser: Any, admin: KeyplaneClient
) -> None:
    link = admin.create_sign_in_link().url
    tab.page.goto(link)
    assert tab.page.url == tab.base + "/roots"
    assert tab.page.locator(".identity").inner_text() == "admin@pki.test"
    assert tab.page.locator(".strip").inner_text().count("Trust state: version") == 1
    # The very same link in another browser: refused, and that browser is not signed in.
    other = browser.new_context(ignore_https_errors=True)
    try:
        replay = other.new_page()
        response = replay.goto(link)
        assert response.status == 401
        assert "used already" in replay.locator(".notice").inner_text()
        assert replay.goto(tab.base + "/roots").status == 401
    finally:
        other.close()
    tab.page.get_by_role("button", name="Sign out").click()
    assert "You are signed out." in tab.page.locator(".notice").inner_text()
    tab.refusals_expected = True
    assert tab.go("/roots").status == 401


# -- root keys -----------------------------------------------------------------------------


def test_create_a_second_root_then_revoke_the_first_with_its_fingerprint_typed(
    tab: Tab, server: RunningServer, admin: KeyplaneClient
) -> None:
    page = tab.page
    tab.sign_in(admin)
    first = admin.list_root_keys().active[0]
    page.get_by_role("button", name="Create key").click()
    tiles = page.locator("article.tile:not(.legacy)")
    assert tiles.count() == 2
    assert "Created pki.test Root 1" in page.locator(".notice").inner_text()
    create = page.get_by_role("button", name="Create key")
    assert create.is_disabled()
    assert "2 root keys are active" in page.locator("#create-why").inner_text()
    assert page.locator("article.legacy .badge").inner_text().lower() == "legacy root"
    # Revoke Root 0 with the keyboard: open its form, a wrong prefix first.
    tile = page.locator("article.tile", has_text=first.name)
    tile.locator("summary").focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.type("scheduled rotation")
    page.keyboard.press("Tab")
    page.keyboard.type("00000000")
    page.keyboard.press("Enter")
    tab.refusals_expected = True
    assert "nothing was revoked" in page.locator(".notice-error").inner_text()
    assert len(admin.list_root_keys().active) == 2
    tile = page.locator("article.tile", has_text=first.name)
    tile.get_by_label("Type the first 8 characters").fill(first.fingerprint[:8])
    tile.get_by_label("Reason").fill("scheduled rotation")
    assert "ends this session" in tile.locator(".signs-out").inner_text()
    tile.get_by_role("button", name=f"Revoke {first.name}").click()
    # The session's credential came from Root 0, so it went with it: signed out, saying
    # why. The admin credential dir holds the one re-issued under Root 1.
    assert "issuing root revoked: scheduled rotation" in page.locator(".notice").inner_text()
    with server.admin_client() as fresh:
        tab.sign_in(fresh)
        listed = fresh.list_root_keys()
    assert page.locator("article.tile:not(.legacy)").count() == 1
    row = page.locator("#revoked-roots tbody tr", has_text=first.fingerprint)
    assert row.count() == 1
    assert "scheduled rotation" in row.inner_text() and "admin@pki.test" in row.inner_text()
    assert page.get_by_role("button", name="Create key").is_enabled()
    assert [r.fingerprint for r in listed.revoked] == [first.fingerprint]
    # Readable at 800 pixels: nothing wider than the window.
    page.set_viewport_size({"width": 800, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth") <= 800


# -- settings ------------------------------------------------------------------------------


def test_a_bad_setting_value_is_refused_with_the_api_s_message(
    tab: Tab, admin: KeyplaneClient
) -> None:
    page = tab.page
    tab.sign_in(admin)
    tab.go("/settings")
    page.locator("#setting-PKIServerTLSKeyRenewalWindowHours").get_by_role(
        "link", name="Edit"
    ).click()
    page.get_by_label("Value").fill("three days")
    tab.refusals_expected = True
    page.get_by_role("button", name="Save").click()
    shown = page.locator(".notice-error").inner_text()
    from keyplane.clients.client import KeyplaneClientError

    with pytest.raises(KeyplaneClientError) as api:
        admin.update_setting("PKIServerTLSKeyRenewalWindowHours", "three days")
    assert shown == api.value.message
    assert "takes a whole number" in shown
    page.get_by_label("Value").fill("900")
    page.get_by_role("button", name="Save").click()
    assert (
        "must be shorter than PKIServerTLSKeyValidityHours"
        in page.locator(".notice-error").inner_text()
    )
    page.get_by_label("Value").fill("48")
    page.get_by_role("button", name="Save").click()
    assert "PKIServerTLSKeyRenewalWindowHours is now 48." in page.locator(".notice").inner_text()
    assert admin.get_setting("PKIServerTLSKeyRenewalWindowHours").value == "48"


def test_reveal_a_protected_value_and_find_the_reveal_in_the_audit_log(
    tab: Tab, admin: KeyplaneClient
) -> None:
    page = tab.page
    tab.sign_in(admin)
    tab.go("/settings")
    row = page.locator("#setting-PKIDatabasePassword")
    assert PASSWORD not in page.content()
    assert "••••••••" in row.inner_text()
    row.get_by_role("button", name="Reveal").click()
    assert page.locator("#revealed code").inner_text() == PASSWORD
    tab.go("/audit?action=setting.reveal")
    events = page.locator("#audit-table tbody tr")
    assert events.count() >= 1
    first = events.first.inner_text()
    assert "setting.reveal" in first and "PKIDatabasePassword" in first
    assert "admin@pki.test" in first
    assert PASSWORD not in page.content()
    # The filter form keeps what was asked, and the log pages.
    assert page.get_by_label("Action").input_value() == "setting.reveal"


# -- the fleet -----------------------------------------------------------------------------


def test_revoke_an_agent_certificate_found_by_name(
    tab: Tab, server: RunningServer, admin: KeyplaneClient
) -> None:
    page = tab.page
    roots = (server.admin_dir / "ca.pem").read_bytes()
    token = admin.create_enrollment_token().token
    with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anonymous:
        agent = anonymous.enroll(make_csr(p256(), cn="meter-7"), token)
    tab.sign_in(admin)
    tab.go("/fleet")
    page.get_by_label("Search by name or serial").fill("meter-7")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#certificate-table tbody tr")
    assert rows.count() == 1 and agent.serial in rows.first.inner_text()
    rows.first.locator("summary").click()
    rows.first.get_by_label("Reason").fill("lost laptop")
    rows.first.get_by_role("button", name=re.compile("^Revoke ")).click()
    assert f"Revoked certificate {agent.serial}" in page.locator(".notice").inner_text()
    assert "revoked" in page.locator(f"#cert-{agent.serial}").inner_text()
    found = [c for c in admin.list_certificates(search=agent.serial) if c.serial == agent.serial]
    assert found and found[0].revoke_reason == "lost laptop"
    # A new token is shown once.
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#token-secret").inner_text()
    assert len(secret) > 20
    tab.go("/fleet")
    assert secret not in page.content()


# -- backups -------------------------------------------------------------------------------


def test_create_a_backup_download_it_and_verify_it_against_live(
    tab: Tab, admin: KeyplaneClient, tmp_path: Path
) -> None:
    page = tab.page
    tab.sign_in(admin)
    tab.go("/backups")
    with page.expect_download() as waiting:
        page.get_by_role("button", name="Create and download").click()
    archive = tmp_path / "backup.tar"
    waiting.value.save_as(archive)
    assert archive.stat().st_size > 10_000
    page.get_by_label("Archive").set_input_files(str(archive))
    page.get_by_role("button", name="Verify against live").click()
    assert "is intact" in page.locator("#verification .notice").inner_text()
    assert "none" in page.locator("#verification dl").inner_text()


# -- who may press what ----------------------------------------------------------------------

PAGES = ("/roots", "/keys", "/files", "/trust", "/settings", "/fleet", "/audit", "/backups")


def test_an_auditor_sees_everything_and_can_press_nothing(
    tab: Tab, server: RunningServer, admin: KeyplaneClient
) -> None:
    page = tab.page
    auditor = person(admin, "audrey@example.org", "auditor")
    with auditor.client(server) as client:
        tab.sign_in(client)
    assert page.locator(".role").inner_text() == "auditor"
    for path in PAGES:
        assert tab.go(path).status == 200, path
        assert enabled_buttons(page) == [], (path, enabled_buttons(page))
        page.set_viewport_size({"width": 800, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= 800, path
        page.set_viewport_size({"width": 1280, "height": 900})
    tab.go("/roots")
    assert page.locator("article.tile").count() >= 2  # it sees the roots
    tab.go("/audit")
    assert page.locator("#audit-table tbody tr").count() > 0
    # A forged POST from the auditor's own signed-in page, with its form token: refused
    # by the server, and nothing changed.
    token = page.locator("input[name=csrf]").first.input_value()
    before = snapshot_state(server)
    response = page.request.post(
        tab.base + "/roots/create",
        form={"csrf": token},
        headers={"Origin": tab.base},
    )
    assert response.status == 403 and "needs the admin role" in response.text()
    assert snapshot_state(server) == before


def test_a_forged_cross_site_post_is_refused(
    tab: Tab, server: RunningServer, admin: KeyplaneClient
) -> None:
    page = tab.page
    tab.sign_in(admin)
    token = page.locator("input[name=csrf]").first.input_value()
    attack = (
        f'<form method="post" action="{tab.base}/roots/create">'
        f'<input type="hidden" name="csrf" value="{token}">'
        '<button id="go">Win a prize</button></form>'
    ).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        before = len(admin.list_root_keys().active)
        page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
        tab.refusals_expected = True
        with page.expect_navigation() as landed:
            page.click("#go")
        assert landed.value.status in (401, 403)
        assert len(admin.list_root_keys().active) == before
    finally:
        site.shutdown()
        site.server_close()


def test_a_revoked_identity_s_session_ends(
    tab: Tab, server: RunningServer, admin: KeyplaneClient
) -> None:
    page = tab.page
    operator = person(admin, "olivia@example.org", "operator")
    with operator.client(server) as client:
        tab.sign_in(client)
    assert tab.go("/fleet").status == 200
    assert page.get_by_role("button", name="Create token").is_enabled()
    assert page.get_by_role("button", name="Create key").count() == 0  # not on this page
    tab.go("/roots")
    assert page.get_by_role("button", name="Create key").is_disabled()
    admin.revoke_identity(operator.name, "left the team", True)
    tab.refusals_expected = True
    assert page.reload().status == 401
    assert "identity was refused" in page.locator(".notice").inner_text()
    tab.go("/fleet")
    assert "keyplane console login" in page.content()


def test_the_pages_work_with_the_keyboard(tab: Tab, admin: KeyplaneClient) -> None:
    page = tab.page
    tab.sign_in(admin)
    page.keyboard.press("Tab")  # the skip link first
    assert page.evaluate("document.activeElement.textContent") == "Skip to the page"
    # Through the header to the navigation, then to a page by Enter alone.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Settings":
            break
    # The focused link shows where the keyboard is.
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    page.wait_for_url(tab.base + "/settings")
    assert page.locator("h1").inner_text() == "Settings"
