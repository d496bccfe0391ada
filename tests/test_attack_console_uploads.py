"""An auditor (who "changes nothing") may upload a backup archive to the console to have
it verified: up to 1 GiB per request, streamed into a directory in the server's data
dir. Nothing bounds how many uploads one session has under way at once, so an auditor
who opens a few uploads and keeps them going can put any multiple of 1 GiB into the
data dir's file system, the one the state DB must commit to. What should happen: one
upload at a time per session and MAX_UPLOADS on the console (a further one refused with
429, nothing stored for it), and an upload cut short takes its file with it."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.clients.client import KeyplaneClient
from keyplane.server.console.security import MAX_UPLOADS
from tests.consolekit import (
    COOKIE,
    ConsoleHttp,
    Reply,
    console_http,
    console_overrides,
    sign_in_link,
)
from tests.serverkit import RunningServer, running_server
from tests.test_roles import new_identity

UPLOADS = 4
SENT_EACH = 4 * 1024 * 1024
BOUNDARY = "keyplaneattack"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "srv", **console_overrides()) as running:
        yield running


def _open_upload(browser: ConsoleHttp, csrf: str) -> ssl.SSLSocket:
    """A POST /backups/verify that promises 1 GiB, sends the form token and the first
    SENT_EACH bytes of the archive, and then stays open."""
    parts = urllib.parse.urlsplit(browser.url)
    context = ssl.create_default_context(cafile=str(browser.roots))
    raw = socket.create_connection((parts.hostname or "", parts.port or 443), timeout=10)
    sock = context.wrap_socket(raw, server_hostname=parts.hostname)
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="archive"; '
        f'filename="a.tar"\r\nContent-Type: application/x-tar\r\n\r\n'
    ).encode()
    length = 1024 * 1024 * 1024 - 1024  # under the 1 GiB bound
    request = (
        f"POST /backups/verify HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Origin: {browser.origin}\r\nSec-Fetch-Site: same-origin\r\n"
        f"Cookie: {COOKIE}={browser.cookie}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    sock.sendall(request + head)
    chunk = b"\0" * (256 * 1024)
    for _ in range(SENT_EACH // len(chunk)):
        sock.sendall(chunk)
    return sock


def _stored(data_dir: Path) -> list[int]:
    return [
        (d / "upload.tar").stat().st_size
        for d in data_dir.glob(".console-upload-*")
        if (d / "upload.tar").exists()
    ]


def test_an_auditor_cannot_have_several_uploads_stored_at_once(server: RunningServer) -> None:
    admin = server.admin_client()
    auditor = new_identity(admin, "audrey@example.org", "auditor")
    browser = console_http(server)
    with auditor.client(server) as client:
        assert isinstance(client, KeyplaneClient)
        assert browser.sign_in(sign_in_link(client)).status == 303
    csrf = browser.csrf("/backups")
    socks = [_open_upload(browser, csrf) for _ in range(UPLOADS)]
    try:
        deadline = time.monotonic() + 20
        stored = _stored(server.config.data_dir)
        while time.monotonic() < deadline and sum(stored) < (UPLOADS - 1) * SENT_EACH:
            time.sleep(0.2)
            stored = _stored(server.config.data_dir)
    finally:
        for sock in socks:
            sock.close()
        admin.close()
    assert len(stored) <= 1, (
        f"one auditor session has {len(stored)} uploads stored in the data dir at once "
        f"({sum(stored)} bytes so far, each may reach 1 GiB)"
    )
    # The uploads cut short leave nothing behind, and the session may upload again.
    assert _gone(server.config.data_dir), "an upload cut short left its file in the data dir"
    reply = _small_upload(browser, csrf)
    assert reply.status == 400 and "under way" not in reply.body, reply.body[:300]
    assert _gone(server.config.data_dir)


def _gone(data_dir: Path) -> bool:
    deadline = time.monotonic() + 10
    while list(data_dir.glob(".console-upload-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not list(data_dir.glob(".console-upload-*"))


def _small_upload(browser: ConsoleHttp, csrf: str) -> Reply:
    """A whole upload of a few bytes that are no backup archive."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="archive"; '
        f'filename="a.tar"\r\nContent-Type: application/x-tar\r\n\r\nnot a tar\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    return browser.request(
        "POST",
        "/backups/verify",
        body=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


def _signed_in_auditor(server: RunningServer, admin: KeyplaneClient, name: str) -> ConsoleHttp:
    auditor = new_identity(admin, name, "auditor")
    browser = console_http(server)
    with auditor.client(server) as client:
        assert isinstance(client, KeyplaneClient)
        assert browser.sign_in(sign_in_link(client)).status == 303
    return browser


def test_uploads_past_one_per_session_or_the_console_s_cap_are_refused_before_storing(
    server: RunningServer,
) -> None:
    admin = server.admin_client()
    browsers = [
        _signed_in_auditor(server, admin, f"aud{i}@example.org") for i in range(MAX_UPLOADS + 1)
    ]
    tokens = [browser.csrf("/backups") for browser in browsers]
    held = [_open_upload(b, t) for b, t in zip(browsers[:MAX_UPLOADS], tokens, strict=False)]
    try:
        deadline = time.monotonic() + 20
        while len(_stored(server.config.data_dir)) < MAX_UPLOADS:
            assert time.monotonic() < deadline, "the held uploads were not stored"
            time.sleep(0.1)
        # A second upload of a session that has one under way...
        again = _small_upload(browsers[0], tokens[0])
        assert again.status == 429 and "upload of this session is under way" in again.body
        # ...and one more session's, past the console's cap, are refused...
        third = _small_upload(browsers[-1], tokens[-1])
        assert third.status == 429 and "uploads are under way on this console" in third.body
        # ...with nothing stored for either.
        assert len(list(server.config.data_dir.glob(".console-upload-*"))) == MAX_UPLOADS
    finally:
        for sock in held:
            sock.close()
        admin.close()
    assert _gone(server.config.data_dir)
    # Once the others are gone, the third session's upload is taken (and checked).
    reply = _small_upload(browsers[-1], tokens[-1])
    assert reply.status == 400 and "under way" not in reply.body, reply.body[:300]
