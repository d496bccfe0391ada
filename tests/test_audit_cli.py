"""`keyplane audit list|verify` and `keyplane tokens list|revoke` against a real
`keyplane serve` subprocess, and keyplane.db edited with sqlite3 behind its back."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.clients.cli.audit import BROKEN_EXIT
from keyplane.server.store.audit_chain import AUDIT_COLUMNS, event_hash
from tests.serverkit import KEYPLANE, ServerProcess, run_cli
from tests.test_enrollment import make_csr, p256


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data")
    yield process
    assert process.stop() == 0


def cli_json(data_dir: Path, *args: str) -> object:
    result = run_cli(*args, "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def attacker(data_dir: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Someone with keyplane.db: drops the triggers, then writes what they like."""
    with sqlite3.connect(data_dir / "keyplane.db", isolation_level=None) as db:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql, args in statements:
            db.execute(sql, args)


def row(data_dir: Path, event_id: int) -> tuple[object, ...]:
    with sqlite3.connect(data_dir / "keyplane.db") as db:
        found = db.execute(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE id = ?",  # noqa: S608
            (event_id,),
        ).fetchone()
    return tuple(found)


def verify(data_dir: Path) -> tuple[int, str]:
    result = run_cli("audit", "verify", data_dir=data_dir)
    return result.returncode, result.stdout + result.stderr


def test_tokens_list_and_revoke_show_no_secret_and_stop_enrollment(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    created = cli_json(data, "tokens", "create", "--uses", "5")
    assert isinstance(created, dict)
    secret, token_id = created["token"], created["token_id"]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    listed = cli_json(data, "tokens", "list")
    assert [t["token_id"] for t in listed] == [token_id]  # type: ignore[union-attr]
    assert listed[0]["state"] == "active" and listed[0]["uses_left"] == 5  # type: ignore[index]
    table = run_cli("tokens", "list", data_dir=data, check=True).stdout
    assert token_id in table and "5/5" in table
    revoked = run_cli("tokens", "revoke", token_id, data_dir=data, check=True).stdout
    assert f"revoked token {token_id}" in revoked
    every = run_cli("tokens", "list", "--all", "--json", data_dir=data, check=True).stdout
    assert json.loads(every)[0]["state"] == "revoked"
    assert cli_json(data, "tokens", "list") == []
    for output in (table, revoked, every):
        assert secret not in output and digest not in output and digest[16:] not in output
    csr = tmp_path / "agent.csr"
    csr.write_bytes(make_csr(p256()))
    refused = run_cli("certs", "issue", str(csr), "--token", secret, data_dir=data)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert "revoked" in refused.stderr
    again = run_cli("tokens", "revoke", token_id, data_dir=data)
    assert again.returncode == 1 and "revoked already" in again.stderr
    events = cli_json(data, "audit", "list", "--action", "token.revoke")
    assert isinstance(events, list) and len(events) == 1
    (event,) = events
    assert event["target"] == token_id and event["outcome"] == "ok"
    assert len(event["actor_fingerprint"]) == 64
    log = run_cli("audit", "list", "--limit", "0", "--json", data_dir=data, check=True).stdout
    assert secret not in log and digest not in log


def test_audit_list_filters_and_limits(served: ServerProcess) -> None:
    data = served.data_dir
    for _ in range(3):
        run_cli("tokens", "create", data_dir=data, check=True)
    events = cli_json(data, "audit", "list", "--limit", "2")
    assert isinstance(events, list) and len(events) == 2
    assert events[0]["id"] > events[1]["id"]
    tokens = cli_json(data, "audit", "list", "--action", "token.create", "--since", "1h")
    assert isinstance(tokens, list) and len(tokens) == 3
    admin = tokens[0]["actor"].split(" (serial ")[0]
    assert cli_json(data, "audit", "list", "--actor", admin, "--action", "token.create") == tokens
    fp = "sha256:" + tokens[0]["actor_fingerprint"]
    assert cli_json(data, "audit", "list", "--actor", fp, "--action", "token.create") == tokens
    assert cli_json(data, "audit", "list", "--until", "2000-01-01") == []
    table = run_cli("audit", "list", data_dir=data, check=True).stdout
    assert table.splitlines()[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]
    assert "token.create" in table and "trust_state.publish" in table
    bad = run_cli("audit", "list", "--since", "yesterday", data_dir=data)
    assert bad.returncode == 2 and "not a time" in bad.stderr


def test_audit_verify_names_the_event_edited_deleted_or_inserted(served: ServerProcess) -> None:
    data = served.data_dir
    for _ in range(4):
        run_cli("tokens", "create", data_dir=data, check=True)
    code, output = verify(data)
    assert code == 0 and "the audit log is intact" in output
    report = cli_json(data, "audit", "verify")
    assert isinstance(report, dict) and report["intact"] and report["problem"] is None
    count = report["events_checked"]
    assert count == report["head_id"] > 8
    target = count - 3
    original = row(data, target)

    attacker(data, ("UPDATE audit SET actor = 'nobody' WHERE id = ?", (target,)))
    code, output = verify(data)
    assert code == BROKEN_EXIT
    assert f"the audit log is broken at event {target}: edited" in output
    attacker(data, ("UPDATE audit SET actor = ? WHERE id = ?", (original[2], target)))
    assert verify(data)[0] == 0

    attacker(data, ("DELETE FROM audit WHERE id = ?", (target,)))
    code, output = verify(data)
    assert code == BROKEN_EXIT
    assert f"the audit log is broken at event {target}: missing" in output
    columns = ", ".join("?" * 12)
    insert = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({columns})"  # noqa: S608
    attacker(data, (insert, original))
    assert verify(data)[0] == 0

    # Make room and insert an event properly chained to the one before it.
    before = row(data, target - 1)
    fields = (target, str(before[1]), "admin", "", "token.create", "x", "{}", "", "", "ok")
    forged = (*fields, before[-1], event_hash(*fields, str(before[-1])))  # type: ignore[arg-type]
    attacker(
        data,
        ("UPDATE audit SET id = id + 1000000 WHERE id >= ?", (target,)),
        ("UPDATE audit SET id = id - 999999 WHERE id >= 1000000", ()),
        (insert, forged),
    )
    code, output = verify(data)
    assert code == BROKEN_EXIT
    assert f"the audit log is broken at event {target}: inserted" in output
    broken = json.loads(run_cli("audit", "verify", "--json", data_dir=data).stdout)
    assert broken["intact"] is False
    assert broken["problem"]["kind"] == "inserted" and broken["problem"]["event_id"] == target


def test_every_new_verb_explains_itself_with_an_example() -> None:
    import subprocess

    for verb in (
        ["audit", "list"],
        ["audit", "verify"],
        ["tokens", "list"],
        ["tokens", "revoke"],
        ["tokens", "create"],
    ):
        result = subprocess.run(
            [KEYPLANE, *verb, "--help"], capture_output=True, text=True, check=True
        )
        assert "example" in result.stdout, verb
        assert f"  keyplane {' '.join(verb)}" in result.stdout.split("example")[1], verb
