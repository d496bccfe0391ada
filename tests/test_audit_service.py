"""AuditService over real gRPC against an in-process server: filters, paging with page
tokens, who may read the log, refused calls recorded with the caller's fingerprint (and
a flood of them kept bounded), reveals recorded, and a change whose audit event cannot
be written not happening at all."""

from __future__ import annotations

import datetime
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import load_credential
from keyplane.plugins.keys import fingerprint
from keyplane.server.domain import audit, certs
from keyplane.server.domain.audit import AuditLog, RefusalRecorder
from keyplane.server.domain.clock import ManualClock
from keyplane.server.store import Actor, AuditRecord
from keyplane.v1 import audit_service_pb2 as pb
from tests.serverkit import RunningServer, running_server
from tests.test_enrollment import expect, make_csr, p256
from tests.test_server_access import issue_client


def client_with(server: RunningServer, chain: bytes, key: bytes) -> KeyplaneClient:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(roots, key, chain)
    return KeyplaneClient(grpc.secure_channel(server.listen, creds), timeout=30)


def key_fingerprint_of(chain: bytes) -> str:
    return certs.key_fingerprint(certs.load_pem(chain))


def events_where(server: RunningServer, action: str) -> list[AuditRecord]:
    return [e for e in server.hierarchy.store.audit_log(100_000) if e.action == action]


def wait_for(server: RunningServer, action: str, count: int = 1) -> list[AuditRecord]:
    deadline = time.monotonic() + 10
    while len(found := events_where(server, action)) < count:
        assert time.monotonic() < deadline, f"no {action} event was recorded"
        time.sleep(0.02)
    return found


def db_dump(server: RunningServer) -> list[str]:
    with sqlite3.connect(server.config.data_dir / "keyplane.db") as db:
        return list(db.iterdump())


def seed(server: RunningServer, count: int) -> list[int]:
    """`count` events by three actors with three actions, one second apart from T0; ids."""
    store = server.hierarchy.store
    start = store.reads.audit_head()[0]
    for n in range(count):
        with store.transaction(T0 + datetime.timedelta(seconds=n)) as tx:
            tx.audit(
                Actor(f"person-{n % 3} (serial {n:04x})", f"{n % 3:064x}"),
                f"test.action{n % 3}",
                f"target-{n}",
                n=n,
            )
    return list(range(start + 1, start + count + 1))


T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def list_all(client: KeyplaneClient, request: pb.ListAuditEventsRequest) -> list[pb.AuditEvent]:
    return list(client.audit_events(request))


def at(seconds: int) -> object:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime((T0 + datetime.timedelta(seconds=seconds)).replace(tzinfo=None))
    return ts


def test_paging_through_hundreds_of_events_yields_each_once(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    ids = seed(server, 320)
    seen: list[int] = []
    request = pb.ListAuditEventsRequest(page_size=37)
    pages = 0
    while True:
        page = admin.list_audit_events(request)
        pages += 1
        seen.extend(e.id for e in page.events)
        if pages == 2:  # events written while paging come before the first page, not in it
            seed(server, 5)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, reverse=True)  # newest first
    assert set(ids) <= set(seen)
    assert seen[-1] == 1  # down to the first event the server wrote
    everything = server.hierarchy.store.reads.audit_head()[0]
    assert len(seen) == everything - 5
    assert pages == -(-len(seen) // 37)


def test_each_filter_narrows_the_listing(server: RunningServer, admin: KeyplaneClient) -> None:
    seed(server, 30)
    by_action = list_all(admin, pb.ListAuditEventsRequest(action="test.action1", page_size=4))
    assert len(by_action) == 10 and {e.action for e in by_action} == {"test.action1"}
    by_fingerprint = list_all(admin, pb.ListAuditEventsRequest(actor=f"sha256:{2:064x}"))
    assert len(by_fingerprint) == 10
    assert {e.actor_fingerprint for e in by_fingerprint} == {f"{2:064x}"}
    by_name = list_all(admin, pb.ListAuditEventsRequest(actor="person-0"))
    assert len(by_name) == 10 and all(e.actor.startswith("person-0 (serial ") for e in by_name)
    full = by_name[0].actor
    assert [e.id for e in list_all(admin, pb.ListAuditEventsRequest(actor=full))] == [by_name[0].id]
    window = list_all(admin, pb.ListAuditEventsRequest(since=at(10), until=at(20)))
    assert [e.target for e in window] == [f"target-{n}" for n in range(19, 9, -1)]
    combined = list_all(
        admin,
        pb.ListAuditEventsRequest(
            since=at(10), until=at(20), actor="person-1", action="test.action1"
        ),
    )
    assert [e.target for e in combined] == ["target-19", "target-16", "target-13", "target-10"]
    assert list_all(admin, pb.ListAuditEventsRequest(action="no.such")) == []
    event = by_action[0]
    assert event.outcome == "ok" and event.hash and event.details_json
    assert event.time.ToDatetime(tzinfo=datetime.UTC) >= T0


def test_bad_paging_requests_are_refused(server: RunningServer, admin: KeyplaneClient) -> None:
    seed(server, 9)
    page = admin.list_audit_events(pb.ListAuditEventsRequest(page_size=2, action="test.action0"))
    assert page.next_page_token
    other = pb.ListAuditEventsRequest(page_token=page.next_page_token, action="test.action1")
    error = expect(grpc.StatusCode.INVALID_ARGUMENT, admin.list_audit_events, other)
    assert "other filters" in error.message
    garbage = pb.ListAuditEventsRequest(page_token="not a token!")
    expect(grpc.StatusCode.INVALID_ARGUMENT, admin.list_audit_events, garbage)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        admin.list_audit_events,
        pb.ListAuditEventsRequest(page_size=1001),
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        admin.list_audit_events,
        pb.ListAuditEventsRequest(since=at(5), until=at(5)),
    )


def test_an_auditor_reads_and_verifies_the_log_and_an_operator_may_not(
    server: RunningServer,
) -> None:
    chain, key = issue_client(server, "auditor")
    with client_with(server, chain, key) as auditor:
        events = list(auditor.audit_events(pb.ListAuditEventsRequest(), limit=5))
        assert len(events) == 5
        report = auditor.verify_audit_log()
        assert report.intact and report.events_checked == report.head_id > 5
        assert not report.HasField("problem")
        # An auditor changes nothing.
        expect(grpc.StatusCode.PERMISSION_DENIED, auditor.create_enrollment_token)
    chain, key = issue_client(server, "operator")
    with client_with(server, chain, key) as operator:
        error = expect(grpc.StatusCode.PERMISSION_DENIED, operator.verify_audit_log)
        assert "admin or auditor" in error.message
        expect(
            grpc.StatusCode.PERMISSION_DENIED,
            operator.list_audit_events,
            pb.ListAuditEventsRequest(),
        )
    refused = wait_for(server, "access.refused", 3)
    assert {e.target for e in refused} == {
        "/keyplane.v1.CertificateService/CreateEnrollmentToken",
        "/keyplane.v1.AuditService/VerifyAuditLog",
        "/keyplane.v1.AuditService/ListAuditEvents",
    }


def test_an_agent_calling_an_admin_rpc_leaves_an_access_refused_event(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="agent-7"), admin.create_enrollment_token().token)
    chain = issued.certificate_chain_pem.encode()
    from tests.test_server_access import _pem

    with client_with(server, chain, _pem(key)) as agent:
        error = expect(grpc.StatusCode.PERMISSION_DENIED, agent.create_root_key)
    assert "admin role" in error.message
    (event,) = wait_for(server, "access.refused")
    assert event.actor_fingerprint == fingerprint(key.public_key())
    assert event.actor == f"agent-7 (serial {issued.serial})"
    assert event.target == "/keyplane.v1.RootKeyService/CreateRootKey"
    assert event.outcome == "refused"
    assert "admin role" in str(event.details["why"])
    listed = list_all(admin, pb.ListAuditEventsRequest(action="access.refused"))
    assert [e.actor_fingerprint for e in listed] == [event.actor_fingerprint]
    assert admin.verify_audit_log().intact


def test_a_revoked_credential_refused_is_recorded_too(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    chain, key = issue_client(server, "operator")
    serial = certs.serial_hex(certs.load_pem(chain))
    admin.revoke_certificate(serial, "left", confirm=True)
    with client_with(server, chain, key) as operator:
        expect(grpc.StatusCode.PERMISSION_DENIED, operator.list_certificates)
    (event,) = wait_for(server, "access.refused")
    assert event.actor_fingerprint == key_fingerprint_of(chain)
    assert serial in event.actor


def test_a_flood_of_refusals_neither_waits_nor_grows_without_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the group commit cannot write (its lock is held), refusals are noted at
    once and at most MAX_PENDING_REFUSALS are held; the rest become one count."""
    monkeypatch.setattr(audit, "MAX_PENDING_REFUSALS", 50)
    with running_server(tmp_path / "data") as server:
        store = server.hierarchy.store
        recorder = RefusalRecorder(store, ManualClock())
        chain, _ = issue_client(server, "agent", record=False)
        peer = certs.load_pem(chain)
        with store._lock:  # the commit thread waits for this
            started = time.monotonic()
            for _ in range(5000):
                recorder.refused("/keyplane.v1.RootKeyService/CreateRootKey", peer, "no")
            assert time.monotonic() - started < 5
            assert len(recorder._pending) == 50 and recorder._unrecorded == 4950
        refused = wait_for(server, "access.refused", 50)
        (summary,) = wait_for(server, "access.refused.unrecorded")
        assert len(refused) == 50 and summary.details == {"count": 4950}
        assert AuditLog(store).verify().problem is None
        # Later refusals are recorded again, one by one.
        recorder.refused("/keyplane.v1.RootKeyService/CreateRootKey", peer, "again")
        wait_for(server, "access.refused", 51)


def test_a_reveal_is_recorded_with_the_callers_fingerprint(tmp_path: Path) -> None:
    password_file = tmp_path / "pki-password"
    password_file.write_text("first password 1\n")
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{password_file}"\n')
    with running_server(tmp_path / "data", config_file=config) as server:
        with server.admin_client() as admin:
            admin.update_setting("PKIDatabasePassword", "a much better password")
            admin.get_setting("PKIDatabasePassword", reveal=True)
            (reveal,) = list_all(admin, pb.ListAuditEventsRequest(action="setting.reveal"))
            (update,) = list_all(admin, pb.ListAuditEventsRequest(action="setting.update"))
            everything = list_all(admin, pb.ListAuditEventsRequest())
        credential = load_credential(server.admin_dir)
        admin_fp = key_fingerprint_of(credential.certificate_chain_pem)
        assert reveal.target == "PKIDatabasePassword"
        assert reveal.actor_fingerprint == update.actor_fingerprint == admin_fp
        for event in everything:  # never the secret, anywhere in the log
            assert "a much better password" not in str(event)
            assert "first password" not in str(event)


def test_a_change_whose_audit_event_cannot_be_written_does_not_happen(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=2)
    chain, _ = issue_client(server, "operator")
    operator_serial = certs.serial_hex(certs.load_pem(chain))
    db = sqlite3.connect(server.config.data_dir / "keyplane.db", isolation_level=None)
    db.execute(
        "CREATE TRIGGER audit_fails BEFORE INSERT ON audit "
        "BEGIN SELECT RAISE(ABORT, 'the disk is full'); END"
    )
    before = db_dump(server)
    expect(grpc.StatusCode.INTERNAL, admin.create_enrollment_token)
    expect(grpc.StatusCode.INTERNAL, admin.update_setting, "PKIServerTLSKeyValidityHours", "100")
    expect(grpc.StatusCode.INTERNAL, admin.revoke_enrollment_token, token.token_id)
    expect(grpc.StatusCode.INTERNAL, admin.revoke_certificate, operator_serial, "x", True)
    expect(grpc.StatusCode.INTERNAL, anonymous.enroll, make_csr(p256()), token.token)
    expect(grpc.StatusCode.INTERNAL, admin.rotate_key, "message-signing")
    assert db_dump(server) == before
    db.execute("DROP TRIGGER audit_fails")
    db.close()
    # The same changes go through once the log can be written, each with its event.
    anonymous.enroll(make_csr(p256()), token.token)
    admin.revoke_enrollment_token(token.token_id)
    admin.revoke_certificate(operator_serial, "x", True)
    actions = [e.action for e in server.hierarchy.store.audit_log(20)]
    assert {"certificate.issue", "token.revoke", "certificate.revoke"} <= set(actions)
    assert admin.verify_audit_log().intact


def test_refusals_while_changes_commit_keep_one_chain(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    chain, key = issue_client(server, "auditor")
    errors: list[BaseException] = []

    def refused_calls() -> None:
        with client_with(server, chain, key) as auditor:
            for _ in range(30):
                try:
                    auditor.create_enrollment_token()
                except KeyplaneClientError:
                    pass
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=refused_calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(30):
        admin.create_enrollment_token()
    for thread in threads:
        thread.join()
    assert not errors
    wait_for(server, "access.refused", 90)
    report = admin.verify_audit_log()
    assert report.intact and report.events_checked == report.head_id
