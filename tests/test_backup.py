"""Backups against real `keyplane serve` processes and real SQLite: taken while agents
enroll, restored into a fresh data dir that serves and renews, verified against a live
inventory that moved on, and corrupt, truncated and older archives refused by restore
with the target left as it was."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from keyplane.clients import backup_archive as client_archive
from keyplane.clients.agent import new_key_and_csr
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import load_credential
from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain import backup_archive as server_archive
from keyplane.server.domain.backups import Backups
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import ServerProcess, run_cli, running_server
from tests.test_agent import AgentProcess
from tests.test_server_access import issue_client


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "server")
    yield process
    process.stop()


def cli_json(data_dir: Path, *args: str) -> Any:
    result = run_cli(*args, "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def admin(data_dir: Path) -> KeyplaneClient:
    endpoint = json.loads((data_dir / "admin" / "endpoint.json").read_text())
    return KeyplaneClient.connect(endpoint["listen"], load_credential(data_dir / "admin"))


def take_backup(data_dir: Path, out: Path) -> dict[str, Any]:
    result = cli_json(data_dir, "backup", "create", "--out", str(out))
    assert isinstance(result, dict)
    return result


def manifest_of(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        source = tar.extractfile(server_archive.MANIFEST)
        assert source is not None
        data = json.loads(source.read())
    assert isinstance(data, dict)
    return data


def db_rows(db_file: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)) as db:
        return list(db.execute(sql, args))


def restore(archive: Path, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return run_cli(
        "backup", "restore", str(archive), "--data-dir", str(data_dir), *extra,
        data_dir=data_dir, env=env,
    )  # fmt: skip


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (and the entries beside it) with its SHA-256: what a
    refused restore must leave exactly as it was."""
    files = {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
    files["<beside>"] = ",".join(sorted(p.name for p in path.parent.iterdir()))
    return files


def enroll(client: KeyplaneClient, token: str, name: str) -> str:
    _, csr = new_key_and_csr(name)
    return client.enroll(csr, token).serial


# -- a backup under load, restored into a fresh data dir ---------------------------------


def test_a_backup_taken_while_agents_enroll_restores_into_a_fresh_data_dir_that_serves(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    cli_json(data, "roots", "create")  # two roots in the backup
    bundle = tmp_path / "keyplane-init.dat"
    cli_json(data, "bundle", "download", "--out", str(bundle))
    token = cli_json(data, "tokens", "create", "--uses", "1000", "--ttl", "1h")["token"]
    # An agent enrolled before the backup; it stays stopped until the restored server runs.
    agent = AgentProcess(tmp_path / "agent", bundle, "--token", token)
    enrolled = agent.wait_enrolled()
    assert agent.stop() == 0
    with admin(data) as client:
        revoked_serial = enroll(client, token, "revoked-before")
        client.revoke_certificate(revoked_serial, "lost before the backup")

    # A thread enrolls as fast as it can while `keyplane backup create` runs.
    done: list[tuple[float, str]] = []
    stop = threading.Event()

    def enroll_constantly() -> None:
        with admin(data) as client:
            n = 0
            while not stop.is_set():
                n += 1
                serial = enroll(client, token, f"load-{n}")
                done.append((time.monotonic(), serial))

    loader = threading.Thread(target=enroll_constantly)
    loader.start()
    try:
        while len(done) < 5:
            time.sleep(0.01)
        started = time.monotonic()
        archive = tmp_path / "backup.tar"
        created = take_backup(data, archive)
        finished = time.monotonic()
        while not [t for t, _ in done if t > finished]:
            time.sleep(0.01)
    finally:
        stop.set()
        loader.join(timeout=30)
    assert archive.stat().st_mode & 0o777 == 0o600
    before = {s for t, s in done if t < started}
    assert len(done) > len(before) > 0

    manifest = manifest_of(archive)
    assert created["keys"] == len(manifest["keys"])
    assert manifest["key_stores"][0]["seal"] == "keyfile"
    assert manifest["key_stores"][0]["key_file"] == "pki.db.key"
    assert served.stop() == 0
    live_db = data / "keyplane.db"

    # The archive holds no private key in clear: not the server's (every key in pki.db,
    # unsealed here with the key file), not the admin credential's.
    raw = archive.read_bytes()
    assert b"PRIVATE KEY" not in raw
    assert (data / "pki.db.key").read_bytes() not in raw
    admin_pem = (data / "admin" / "admin.pem").read_bytes()
    clear_keys = [admin_pem[admin_pem.index(b"-----BEGIN PRIVATE KEY-----") :]]
    backends = KeyBackends({"software": {}}, data)
    try:
        for key in manifest["keys"]:
            if key["in_archive"]:
                clear_keys.append(backends.tls_private_key_pem(key["key_uri"]))
    finally:
        backends.close()
    assert len(clear_keys) == 1 + sum(k["in_archive"] for k in manifest["keys"]) >= 8
    for pem in clear_keys:
        private = serialization.load_pem_private_key(pem, None)
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert der not in raw
        body = pem.split(b"-----")[2].split()
        assert body[0] not in raw

    # Into a fresh data dir: the key file is not in the archive, so it is given.
    restored = tmp_path / "restored"
    refused = restore(archive, restored)
    assert refused.returncode == 1 and "--key-file" in refused.stderr
    assert not restored.exists()
    result = restore(archive, restored, "--key-file", str(data / "pki.db.key"))
    assert result.returncode == 0, result.stderr
    assert "restored" in result.stdout and "replaced" not in result.stdout
    assert restored.stat().st_mode & 0o777 == 0o700

    # Every root, key, certificate and revocation of the backup's point is there, and
    # the certificates enrolled concurrently are those of one point: every one done
    # before the backup began, none that did not exist.
    new_db = restored / "keyplane.db"
    key_rows = "SELECT fingerprint, kind, state, key_uri, certificate_pem FROM keys ORDER BY 1"
    assert {r[0] for r in db_rows(new_db, key_rows)} == {k["fingerprint"] for k in manifest["keys"]}
    live_keys = {r[0]: r for r in db_rows(live_db, key_rows)}
    for row in db_rows(new_db, key_rows):
        assert live_keys[row[0]] == row
    serials = {r[0] for r in db_rows(new_db, "SELECT serial FROM certificates")}
    live_serials = {r[0] for r in db_rows(live_db, "SELECT serial FROM certificates")}
    assert before | {enrolled["serial"], revoked_serial} <= serials <= live_serials
    assert len(serials) == manifest["tables"]["certificates"]
    revocations = "SELECT * FROM revocations ORDER BY seq"
    assert db_rows(new_db, revocations) == db_rows(live_db, revocations)
    revoked = "SELECT revoked_at IS NOT NULL FROM certificates WHERE serial = ?"
    assert db_rows(new_db, revoked, revoked_serial) == [(1,)]
    roots = db_rows(new_db, "SELECT name FROM keys WHERE kind = 'root' AND state = 'active'")
    assert sorted(r[0] for r in roots) == ["pki.test Root 0", "pki.test Root 1"]

    # The restored server starts where the old one listened, and the agent renews there.
    endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
    again = ServerProcess(
        restored,
        "--listen",
        endpoint["listen"],
        "--bootstrap-listen",
        endpoint["bootstrap_listen"],
    )
    try:
        listing = cli_json(restored, "roots", "list")
        assert len(listing["active"]) == 2
        agent = AgentProcess(tmp_path / "agent", bundle, "--time-scale", "200000")
        renewed = agent.wait_for("a renewal", lambda s: s["renewals"] >= 1, timeout=60)
        assert renewed["serial"] != enrolled["serial"] and renewed["last_error"] is None
        agent.wait_for("a second renewal", lambda s: s["renewals"] >= 2, timeout=60)
        # The agent follows the restored trust state: its versions go above any the lost
        # server could have published since the backup, so nothing is taken for a rollback.
        latest = db_rows(restored / "keyplane.db", "SELECT max(version) FROM trust_states")
        assert latest[0][0] > manifest["trust_state_version"] + 99_999
        agent.wait_for(
            "the agent to follow the restored trust state",
            lambda s: s["trust_state_version"] == latest[0][0],
            timeout=60,
        )
        assert agent.stop() == 0
        certs = cli_json(restored, "certs", "list")
        by_serial = {c["serial"]: c for c in certs}
        assert renewed["serial"] in by_serial
        assert by_serial[revoked_serial]["revoked"] is not None
    finally:
        assert again.stop() == 0
    check_invariants(
        restored,
        acknowledged=Acknowledged(
            serials=before | {enrolled["serial"], revoked_serial, renewed["serial"]},
            revoked={revoked_serial},
        ),
    )


# -- verify against a live inventory that moved on ----------------------------------------


def test_verify_reports_what_changed_live_since_the_backup(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    archive = tmp_path / "backup.tar"
    take_backup(data, archive)
    manifest = manifest_of(archive)
    in_backup = {k["fingerprint"]: k for k in manifest["keys"]}

    unchanged = cli_json(data, "backup", "verify", str(archive))["live"]
    assert unchanged["missing_from_backup"] == unchanged["missing_from_live"] == []
    assert unchanged["state_changed"] == unchanged["not_held"] == []

    # After the backup: a new root (with the subordinates issued under it), and a key
    # destroyed behind the server's back (its row gone from pki.db).
    root1 = cli_json(data, "roots", "create")
    legacy = next(k for k in manifest["keys"] if k["kind"] == "legacy_root")
    with closing(sqlite3.connect(data / "pki.db")) as db, db:
        db.execute("DELETE FROM keys WHERE id = ?", (legacy["key_uri"].split(":", 1)[1],))

    found = cli_json(data, "backup", "verify", str(archive))
    assert found["intact"] is True
    live = found["live"]
    new = {k["fingerprint"]: k for k in live["missing_from_backup"]}
    subordinates = {k["fingerprint"]: k for k in cli_json(data, "keys", "list")}
    issued_by_root1 = {
        fp for fp, k in subordinates.items() if k["issuer_fingerprint"] == root1["fingerprint"]
    }
    assert set(new) == {root1["fingerprint"], *issued_by_root1}
    assert sorted(k["kind"] for k in new.values()) == [
        "intermediate_tls",
        "message_signing",
        "root",
        "server_tls",
    ]
    assert live["missing_from_live"] == []
    # The subordinates under Root 0 were retired by the new root; nothing else changed.
    assert {(c["fingerprint"], c["state"], c["live_state"]) for c in live["state_changed"]} == {
        (fp, "active", "retired")
        for fp, k in in_backup.items()
        if k["kind"] in ("server_tls", "intermediate_tls", "message_signing")
    }
    assert [(k["fingerprint"], k["backend"]) for k in live["not_held"]] == [
        (legacy["fingerprint"], "software")
    ]
    assert "not in the software backend" in live["not_held"][0]["reason"]
    assert live["trust_state_version"]["live"] > live["trust_state_version"]["backup"]
    assert live["tables"]["keys"] == {"backup": len(in_backup), "live": len(in_backup) + 4}

    text = run_cli("backup", "verify", str(archive), data_dir=data)
    assert text.returncode == 0, text.stderr
    assert "keys live that the backup lacks:" in text.stdout
    assert root1["name"] in text.stdout and "legacy-root" in text.stdout


# -- refusals: corrupt, truncated, older; a server that holds the data dir ----------------


def member_offset(archive: Path, name: str) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember(name).offset_data


def flipped(archive: Path, out: Path, offset: int) -> Path:
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def test_restore_refuses_corrupt_truncated_and_older_archives_and_changes_nothing(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    with admin(data) as client:
        token = client.create_enrollment_token(uses=2).token
        serial = enroll(client, token, "edge-1")
    archive = tmp_path / "backup.tar"
    take_backup(data, archive)
    # A revocation after the backup: the archive is older than the data dir.
    cli_json(data, "certs", "revoke", serial, "--reason", "stolen after the backup")

    # While the server runs, its data dir is not restored into.
    held = restore(archive, data)
    assert held.returncode == 1 and "stop it" in held.stderr
    assert served.stop() == 0
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    acknowledged = Acknowledged(serials={serial}, revoked={serial})
    snapshot = check_invariants(data, acknowledged=acknowledged)
    before = tree(data)
    damaged = {
        "a flipped byte in keyplane.db": flipped(
            archive, bad_dir / "a.tar", member_offset(archive, "keyplane.db") + 5000
        ),
        "a flipped byte in pki.db": flipped(
            archive, bad_dir / "b.tar", member_offset(archive, "pki.db") + 100
        ),
        "a flipped byte in the manifest": flipped(
            archive, bad_dir / "c.tar", member_offset(archive, "manifest.json") + 200
        ),
    }
    truncated = bad_dir / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    damaged["truncated"] = truncated
    cut_before_sums = bad_dir / "no-sums.tar"
    cut_before_sums.write_bytes(archive.read_bytes()[: member_offset(archive, "SHA256SUMS") - 512])
    damaged["cut before SHA256SUMS"] = cut_before_sums
    for what, bad in damaged.items():
        result = restore(bad, data, "--force")
        assert result.returncode == 1, what
        assert "refused" in result.stderr and "unchanged" in result.stderr, what
        assert tree(data) == before, what
        offline = run_cli("backup", "verify", str(bad), "--offline", data_dir=data)
        assert offline.returncode == 1 and "is refused" in offline.stderr, what

    older = restore(archive, data)
    assert older.returncode == 1
    assert "older" in older.stderr and "--force" in older.stderr
    assert f"certificate {serial}" in older.stderr and "stolen after the backup" in older.stderr
    assert tree(data) == before
    check_invariants(data, acknowledged=acknowledged, previous=snapshot)

    forced = restore(archive, data, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "came back from revoked" in forced.stderr and serial in forced.stderr
    replaced = [p for p in data.parent.iterdir() if p.name.startswith("server.replaced-")]
    assert len(replaced) == 1
    assert tree(replaced[0]) | {"<beside>": ""} == before | {"<beside>": ""}
    unrevoked = "SELECT revoked_at FROM certificates WHERE serial = ?"
    assert db_rows(data / "keyplane.db", unrevoked, serial) == [(None,)]
    # Its next trust state goes above the replaced server's, which components may hold.
    newest = "SELECT max(version) FROM trust_states"
    again = ServerProcess(data)
    try:
        assert (
            db_rows(data / "keyplane.db", newest)[0][0]
            > db_rows(replaced[0] / "keyplane.db", newest)[0][0]
        )
    finally:
        assert again.stop() == 0
    assert not [p for p in data.parent.iterdir() if ".restore-" in p.name]
    # Forced, the revocation came back undone (the sequence went back, as asked); the
    # rest holds, in the restored dir and in the one it replaced.
    check_invariants(data, acknowledged=Acknowledged(serials={serial}))
    check_invariants(replaced[0], acknowledged=acknowledged)


def test_restore_asks_for_the_archive_database_password(tmp_path: Path) -> None:
    password = tmp_path / "pki-password"
    password.write_text("correct horse battery staple\n")
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{password}"\n')
    server = ServerProcess(tmp_path / "server", "--config", str(config))
    try:
        archive = tmp_path / "backup.tar"
        created = take_backup(server.data_dir, archive)
    finally:
        assert server.stop() == 0
    assert created["key_stores"][0]["seal"] == "password" and not created["notes"]

    target = tmp_path / "restored"
    asked = restore(archive, target)
    assert asked.returncode == 1 and "--password-file" in asked.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    refused = restore(archive, target, "--password-file", str(wrong))
    assert refused.returncode == 1 and "does not open" in refused.stderr
    assert not target.exists()
    result = restore(archive, target, "--password-file", str(password), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replaced"] is None
    assert not (target / "pki.db.key").exists()
    again = ServerProcess(target, "--config", str(config))
    try:
        assert len(cli_json(target, "roots", "list")["active"]) == 1
    finally:
        assert again.stop() == 0
    check_invariants(target)


# -- one point, in process ----------------------------------------------------------------


def archive_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def software_ids(pki_db: bytes, tmp_path: Path) -> set[str]:
    copy = tmp_path / f"pki-{hashlib.sha256(pki_db).hexdigest()[:8]}.db"
    copy.write_bytes(pki_db)
    return {f"software:{r[0]}" for r in db_rows(copy, "SELECT id FROM keys")}


def test_each_key_is_in_both_copies_or_neither_while_keys_are_generated(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path / "data") as server:
        hierarchy = server.hierarchy
        backups = Backups(hierarchy)
        # A key generated but not recorded (as while a rotation runs in another worker).
        in_flight = hierarchy.backends.generate_key("software", "in flight", "ec-p256").uri
        stop = threading.Event()

        def rotate() -> None:
            while not stop.is_set():
                hierarchy.rotation.rotate_key("test", "message_signing")

        rotator = threading.Thread(target=rotate)
        rotator.start()
        try:
            for n in range(6):
                workdir = backups.new_workdir()
                try:
                    made = backups.create("test", workdir)
                    members = archive_members(made.path)
                finally:
                    backups.discard(workdir)
                state = tmp_path / f"state-{n}.db"
                state.write_bytes(members["keyplane.db"])
                recorded = {
                    r[0]: r[1]
                    for r in db_rows(state, "SELECT key_uri, state FROM keys")
                    if r[0].startswith("software:")
                }
                held = software_ids(members["pki.db"], tmp_path)
                assert held <= set(recorded), "a key no record names is in the backup"
                assert {u for u, s in recorded.items() if s != "revoked"} <= held
                assert in_flight in made.manifest.key_stores[0].left_out
        finally:
            stop.set()
            rotator.join(timeout=60)
        assert not list((tmp_path / "data").glob(".backup-*"))


def test_backup_rpcs_take_admin_and_auditor_only(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        with server.admin_client() as client:
            chunks = list(client.create_backup())
        archive = tmp_path / "b.tar"
        archive.write_bytes(b"".join(c.chunk for c in chunks))
        assert (
            len(chunks[0].chunk) <= 256 * 1024 and chunks[0].total_bytes == archive.stat().st_size
        )
        assert chunks[-1].archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
        manifest = client_archive.check_archive(archive).manifest_bytes

        roots = (server.admin_dir / "ca.pem").read_bytes()
        for role, may_verify in (("auditor", True), ("operator", False)):
            chain, key = issue_client(server, role)
            creds = grpc.ssl_channel_credentials(roots, key, chain)
            with KeyplaneClient(grpc.secure_channel(server.listen, creds)) as caller:
                with pytest.raises(KeyplaneClientError) as denied:
                    list(caller.create_backup())
                assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED, role
                if may_verify:
                    assert caller.verify_backup(manifest).live_trust_state_version >= 1
                else:
                    with pytest.raises(KeyplaneClientError) as refused:
                        caller.verify_backup(manifest)
                    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, role
        with server.admin_client() as client:
            with pytest.raises(KeyplaneClientError) as bad:
                client.verify_backup(b'{"format": "something else"}')
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        actions = [a.action for a in server.hierarchy.store.audit_log()]
        assert actions.count("backup.create") == 1


def test_the_client_reads_the_format_the_server_writes() -> None:
    for name in ("FORMAT", "FORMAT_VERSION", "MANIFEST", "SUMS", "MAX_MANIFEST_BYTES"):
        assert getattr(client_archive, name) == getattr(server_archive, name), name


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    progress = client_archive.Progress(400, "backup", plain)
    for _ in range(4):
        progress.advance(100)
    assert plain.getvalue().splitlines() == [
        "backup: 25% (100 of 400 bytes)",
        "backup: 50% (200 of 400 bytes)",
        "backup: 75% (300 of 400 bytes)",
        "backup: 100% (400 of 400 bytes)",
    ]
    tty = Tty()
    bar = client_archive.Progress(400, "backup", tty)
    bar.advance(400)
    assert tty.getvalue().startswith("\rbackup [" + "#" * 30 + "] 100%")
    assert tty.getvalue().endswith("\n")
