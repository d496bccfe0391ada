"""The admin console played by attackers, without a browser: plain HTTPS on loopback
to a real server's console. No session, a session of the wrong role, a missing or
wrong form token, a request from another site, an oversized body, a replayed or
expired sign-in link, a revoked identity: each is refused and changes nothing. Also
what every response carries, the certificate it serves, and the sign-in RPC itself."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import audit_service_pb2
from tests.consolekit import (
    COOKIE,
    ConsoleHttp,
    console_http,
    console_overrides,
    console_url,
    sign_in_link,
)
from tests.serverkit import KEYPLANE, RunningServer, ServerProcess, running_server
from tests.test_roles import new_identity, snapshot_state

ADMIN_ACTIONS = {
    "/roots/create": {},
    "/roots/revoke": {"fingerprint": "", "reason": "x", "confirm": ""},
    "/keys/rotate": {"kind": "message-signing"},
    "/settings/update": {"name": "OpenEnrollment", "value": "true"},
    "/trust/request": {"peer": "127.0.0.1:1", "fingerprint": "0" * 64},
    "/trust/approve": {"id": "0" * 32},
    "/trust/reject": {"id": "0" * 32, "reason": "x"},
    "/trust/revoke": {"peer": "pki-b.test", "reason": "x", "confirm": "pki-b.test"},
}
PAGES = ("/roots", "/keys", "/files", "/trust", "/settings", "/fleet", "/audit", "/backups")
OPERATOR_ACTIONS = {
    "/fleet/tokens/create": {"role": "agent", "uses": "1", "ttl_hours": "1"},
    "/fleet/certificates/revoke": {"serial": "00", "reason": "x"},
    "/fleet/tokens/revoke": {"token_id": "0" * 16},
    "/fleet/zones/revoke": {"name": "zone1", "reason": "x", "confirm": "zone1"},
}


@pytest.fixture
def server(tmp_path: Path, clock: ManualClock) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data", clock=clock, **console_overrides()) as running:
        yield running


def signed_in(server: RunningServer, client: KeyplaneClient) -> ConsoleHttp:
    browser = console_http(server)
    reply = browser.sign_in(sign_in_link(client))
    assert reply.status == 303 and reply.header("Location") == "/roots", reply.body
    return browser


def audit(admin: KeyplaneClient, action: str) -> list[audit_service_pb2.AuditEvent]:
    return list(admin.audit_events(audit_service_pb2.ListAuditEventsRequest(action=action)))


def _root_fingerprints(admin: KeyplaneClient) -> list[str]:
    return [r.fingerprint for r in admin.list_root_keys().active]


# -- signing in ----------------------------------------------------------------------------


def test_a_sign_in_link_opens_a_session_once_with_a_strict_cookie(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    link = admin.create_sign_in_link()
    assert link.url.startswith(console_url(server) + "/signin?link=")
    assert link.name == "admin@pki.test" and list(link.roles) == ["admin"]
    browser = console_http(server)
    assert browser.sign_in(link.url).status == 303
    (cookie,) = [c for c in browser.set_cookies if c.startswith(COOKIE)]
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "path", "samesite"} <= attributes
    assert "samesite=strict" in cookie.lower() and "domain" not in attributes
    assert "Path=/" in cookie
    page = browser.get("/roots")
    assert page.status == 200 and "admin@pki.test" in page.body and "pki.test Root 0" in page.body
    # The same link again, from another browser: refused, no second session.
    before = snapshot_state(server)
    again = console_http(server)
    replay = again.sign_in(link.url)
    assert replay.status == 401 and "used already" in replay.body
    assert not again.cookie and again.get("/roots").status == 401
    assert snapshot_state(server) == before
    # Only the secret's hash is stored: the link's secret is nowhere in the state DB.
    secret = urllib.parse.parse_qs(urllib.parse.urlsplit(link.url).query)["link"][0]
    data = (server.config.data_dir / "keyplane.db").read_bytes()
    assert secret.split(".")[1].encode() not in data
    actions = [e.action for e in audit(admin, "console.sign_in")]
    assert actions == ["console.sign_in"]


def test_a_sign_in_link_expires_and_a_made_up_one_is_refused(
    server: RunningServer, admin: KeyplaneClient, clock: ManualClock
) -> None:
    link = sign_in_link(admin)
    browser = console_http(server)
    forged = link.rsplit(".", 1)[0] + ".x" + link.rsplit(".", 1)[1][1:]
    reply = browser.sign_in(forged)
    assert reply.status == 401 and "not a sign-in link this server gave" in reply.body
    clock.advance(datetime.timedelta(minutes=6))
    reply = browser.sign_in(link)
    assert reply.status == 401 and "has expired" in reply.body
    assert not browser.cookie


def test_a_link_opened_from_another_site_is_not_spent(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    link = sign_in_link(admin)
    browser = console_http(server)
    parts = urllib.parse.urlsplit(link)
    reply = browser.get(
        f"{parts.path}?{parts.query}", headers={"Sec-Fetch-Site": "cross-site"}, same_site=False
    )
    assert reply.status == 403 and "another site" in reply.body and not browser.cookie
    assert browser.sign_in(link).status == 303  # still good for its owner


def test_no_console_means_no_link_and_components_get_none(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as plain, plain.admin_client() as admin:
        with pytest.raises(KeyplaneClientError) as caught:
            admin.create_sign_in_link()
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--console-listen" in caught.value.message


# -- no session, wrong role, forged requests -------------------------------------------------


def test_without_a_session_every_page_is_401_and_nothing_changes(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    before = snapshot_state(server)
    nobody = console_http(server)
    for path in PAGES:
        reply = nobody.get(path)
        assert reply.status == 401 and "keyplane console login" in reply.body, path
    for path, fields in {**ADMIN_ACTIONS, **OPERATOR_ACTIONS}.items():
        assert nobody.post(path, {**fields, "csrf": "0" * 64}).status == 401, path
    nobody.cookie = "made.up"
    assert nobody.get("/roots").status == 401
    assert nobody.get("/files/keyplane-init.dat").status == 401
    assert snapshot_state(server) == before


def test_an_operator_session_posting_admin_actions_is_refused_and_audited(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    operator = new_identity(admin, "olivia@example.org", "operator")
    with operator.client(server) as client:
        browser = signed_in(server, client)
    root = _root_fingerprints(admin)[0]
    token = browser.csrf()
    before = snapshot_state(server)
    fields = dict(ADMIN_ACTIONS)
    fields["/roots/revoke"] = {"fingerprint": root, "reason": "take over", "confirm": root[:8]}
    for path, form in fields.items():
        reply = browser.post(path, {**form, "csrf": token})
        assert reply.status == 403, (path, reply.status, reply.body[:200])
        assert "needs the admin role" in reply.body, path
    assert snapshot_state(server) == before
    wanted = {
        "/keyplane.v1.RootKeyService/CreateRootKey",
        "/keyplane.v1.RootKeyService/RevokeRootKey",
        "/keyplane.v1.KeyService/RotateKey",
        "/keyplane.v1.SettingsService/UpdateSetting",
        "/keyplane.v1.TrustService/ApproveTrust",
        "/keyplane.v1.TrustService/RevokeTrust",
    }
    deadline = time.monotonic() + 10  # refusals are recorded without making them wait
    refused = audit(admin, "access.refused")
    while not {e.target for e in refused} >= wanted:
        assert time.monotonic() < deadline, [e.target for e in refused]
        time.sleep(0.05)
        refused = audit(admin, "access.refused")
    assert all(e.actor.startswith("olivia@example.org") for e in refused)
    # What the operator may do, it does: a token, shown once.
    made = browser.post("/fleet/tokens/create", {"role": "agent", "uses": "2", "csrf": token})
    assert made.status == 200 and "It is shown this once" in made.body
    assert "It is shown this once" not in browser.get("/fleet").body


def test_an_auditor_session_can_change_nothing(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    auditor = new_identity(admin, "audrey@example.org", "auditor")
    with auditor.client(server) as client:
        browser = signed_in(server, client)
    token = browser.csrf()
    before = snapshot_state(server)
    for path, form in {**ADMIN_ACTIONS, **OPERATOR_ACTIONS}.items():
        reply = browser.post(path, {**form, "csrf": token})
        assert reply.status == 403, (path, reply.status)
    reply = browser.post("/settings/reveal", {"name": "PKIDatabasePassword", "csrf": token})
    assert reply.status in (403, 200) and "needs the admin role" in reply.body
    assert browser.post("/backups/create", {"csrf": token}).status == 403
    assert snapshot_state(server) == before
    # It reads every page.
    for path in PAGES:
        assert browser.get(path).status == 200, path


def test_a_missing_or_wrong_form_token_is_refused(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    browser = signed_in(server, admin)
    other = signed_in(server, admin)
    before = snapshot_state(server)
    for fields in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": browser.csrf() + "0"}):
        reply = browser.post("/roots/create", fields)
        assert reply.status == 403 and "form token" in reply.body, fields
    # Another session's token is not this one's.
    assert browser.post("/roots/create", {"csrf": other.csrf()}).status == 403
    assert snapshot_state(server) == before
    assert len(_root_fingerprints(admin)) == 1


def test_a_cross_site_post_is_refused_even_with_the_cookie_and_token(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    browser = signed_in(server, admin)
    token = browser.csrf()
    before = snapshot_state(server)
    for headers in (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": browser.origin},
        {"Origin": "null"},
        {},  # says nothing of where it came from
    ):
        reply = browser.post("/roots/create", {"csrf": token}, headers=headers, same_site=False)
        assert reply.status == 403 and "cross-site" in reply.body, headers
    assert snapshot_state(server) == before


def test_an_oversized_body_is_refused(server: RunningServer, admin: KeyplaneClient) -> None:
    browser = signed_in(server, admin)
    token = browser.csrf()
    before = snapshot_state(server)
    reply = browser.post(
        "/settings/update", {"csrf": token, "name": "OpenEnrollment", "value": "x" * 100_000}
    )
    assert reply.status == 413
    assert snapshot_state(server) == before


def test_revoking_the_identity_ends_its_sessions_and_sign_out_ends_one(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    person = new_identity(admin, "sam@example.org", "operator")
    with person.client(server) as client:
        first, second = signed_in(server, client), signed_in(server, client)
    assert first.get("/fleet").status == 200
    token = first.csrf()
    out = first.post("/signout", {"csrf": token})
    assert out.status == 303 and out.header("Location") == "/signin?out=1"
    assert "Max-Age=0" in first.set_cookies[-1] or "expires" in first.set_cookies[-1].lower()
    first.cookie = first.set_cookies[-2].split(";", 1)[0].split("=", 1)[1]  # replay the cookie
    assert first.get("/fleet").status == 401
    assert second.get("/fleet").status == 200
    admin.revoke_identity(person.name, "left", True)
    reply = second.get("/fleet")
    assert reply.status == 401 and "identity was refused" in reply.body
    assert second.get("/fleet").status == 401  # ended for good


def test_a_session_expires_and_ends_when_unused(
    server: RunningServer, admin: KeyplaneClient, clock: ManualClock
) -> None:
    browser = signed_in(server, admin)
    clock.advance(datetime.timedelta(minutes=31))
    reply = browser.get("/roots")
    assert reply.status == 401 and "unused" in reply.body
    browser = signed_in(server, admin)
    used = 0
    for _ in range(17):  # used every 29 minutes: still ends at 8 hours
        clock.advance(datetime.timedelta(minutes=29))
        reply = browser.get("/roots")
        if reply.status != 200:
            break
        used += 1
    assert used == 16 and reply.status == 401 and "expired" in reply.body


# -- what every response carries -------------------------------------------------------------


def test_pages_carry_a_strict_policy_and_are_never_cached(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    browser = signed_in(server, admin)
    for path in ("/roots", "/settings", "/signin", "/nowhere"):
        reply = browser.get(path)
        csp = reply.header("Content-Security-Policy")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "script-src 'self'" in csp
        assert reply.header("X-Frame-Options") == "DENY"
        assert reply.header("X-Content-Type-Options") == "nosniff"
        assert reply.header("Cache-Control") == "no-store", path
        assert "<script>" not in reply.body and " on" + "click=" not in reply.body
    script = browser.get("/static/console.js")
    assert script.status == 200 and "javascript" in script.header("Content-Type")


def test_the_console_serves_the_servers_certificate_and_follows_a_new_one(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    host, port = urllib.parse.urlsplit(console_url(server)).netloc.split(":")

    def served() -> x509.Certificate:
        context = ssl.create_default_context(cafile=str(server.admin_dir / "ca.pem"))
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    first = served()  # verified against the roots, for the name 127.0.0.1
    tls_keys = admin.list_keys("server-tls")
    assert first.serial_number in {
        x509.load_pem_x509_certificate(k.certificate_pem.encode()).serial_number for k in tls_keys
    }
    admin.create_root_key()
    second = served()
    assert second.serial_number != first.serial_number
    newest = max(admin.list_root_keys().active, key=lambda r: r.number)
    issuer = x509.load_pem_x509_certificate(newest.certificate_pem.encode())
    assert second.issuer == issuer.subject


# -- --workers: worker 0 serves it, and again after a restart ---------------------------------


def _console_port_listener(supervisor: int, port: int) -> set[int]:
    from tests.test_state_safety import workers_on

    return workers_on(supervisor, port)


def test_with_workers_the_console_survives_a_restart_of_its_worker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = ServerProcess(data, "--workers", "2", "--console-listen", "127.0.0.1:0")
    try:
        note = json.loads((data / "admin" / "endpoint.json").read_text())
        url = note["console"]
        port = int(url.rsplit(":", 1)[1])
        login = subprocess.run(
            [KEYPLANE, "console", "login", "--json"],
            env={**os.environ, "KEYPLANE_DATA_DIR": str(data)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        link = json.loads(login.stdout)["url"]
        assert link.startswith(url + "/signin?link=")
        browser = ConsoleHttp(url, data / "admin" / "ca.pem")
        assert browser.sign_in(link).status == 303
        assert browser.get("/roots").status == 200
        serving = _console_port_listener(process.proc.pid, port)
        assert len(serving) == 1  # worker 0 alone
        os.kill(next(iter(serving)), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            fresh = _console_port_listener(process.proc.pid, port) - serving
            if fresh:
                break
            assert time.monotonic() < deadline, "no worker serves the console again"
            time.sleep(0.2)
        # The session lives in the state DB: the same cookie works on the new worker.
        for _ in range(100):
            try:
                reply = browser.get("/roots")
                break
            except OSError:
                time.sleep(0.1)
        assert reply.status == 200 and "pki.test Root 0" in reply.body
    finally:
        assert process.stop() == 0
    assert "admin console: https://127.0.0.1:" in process.output()
