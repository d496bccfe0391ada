"""The checks tests/invariants.py makes, one function each: SQLite's integrity check,
reading a server's state DB, the audit chain, certificate chains up to a published
root, keys in their backends (pki.db's rows, the SoftHSM token's objects), a zone's
databases, and what callers were told succeeded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from keyplane.clients.trust import TrustStateError, accept
from keyplane.plugins.uri import Pkcs11KeyUri
from keyplane.server.store.audit_chain import GENESIS, ChainedEvent, parse_head, recomputed
from keyplane.v1 import trust_state_pb2

MAX_ACTIVE_ROOTS = 2


@dataclass
class Acknowledged:
    """What callers were told had succeeded, to look for afterwards: certificate
    serials issued, serials and key fingerprints revoked, token hashes (SHA-256 hex of
    the token), (setting, value) pairs set, key fingerprints made (roots, rotations),
    zone names enrolled."""

    serials: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    revoked_keys: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    settings: set[tuple[str, str]] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    zones: set[str] = field(default_factory=set)
    revoked_tokens: set[str] = field(default_factory=set)  # token ids (16 hex digits)
    revoked_zones: set[str] = field(default_factory=set)  # zone names


class Problems(list[str]):
    def check(self, holds: bool, what: str) -> bool:
        if not holds:
            self.append(what)
        return holds


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection: nothing the check does changes the files it checks. (A
    read-only reader of a WAL database makes an empty -wal and a -shm that it cannot
    remove on close; those it made, the server being stopped, are removed after.)"""
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    existed = [p.exists() for p in beside]
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA query_only=ON")
        yield db
    finally:
        db.close()
        wal, shm = beside
        if not any(existed) and wal.exists() and wal.stat().st_size == 0:
            wal.unlink()
            shm.unlink(missing_ok=True)


def integrity(path: Path, problems: Problems) -> bool:
    if not problems.check(path.exists(), f"{path} is missing"):
        return False
    try:
        with read_only(path) as db:
            result = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        problems.append(f"integrity: {path} does not open ({exc})")
        return False
    return problems.check(
        result == ["ok"], f"integrity: {path} fails PRAGMA integrity_check: {result[:3]}"
    )


def fingerprint_of(key: Any) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def token_keys(token: Any) -> dict[str, str]:
    """The private keys on a SoftHSM token (tests.softhsm.SoftHsmToken): id hex -> label,
    listed by pkcs11-tool in a process of its own (what the token holds now)."""
    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            token.module,
            "--token-label",
            token.label,
            "--login",
            "--pin",
            token.pin,
            "--list-objects",
            "--type",
            "privkey",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    found: dict[str, str] = {}
    label = ""
    for line in listing.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "label":
            label = value.strip()
        elif name == "ID":
            found[value.strip().lower()] = label
    return found


def uri_id(uri: str) -> str | None:
    """The CKA_ID (hex) a pkcs11: key URI names."""
    parsed = Pkcs11KeyUri.parse(uri)
    return parsed.id.hex() if parsed.id else None


@dataclass
class ServerRead:
    """What the check read from one server's state DB."""

    keys: dict[str, dict[str, Any]]
    certificates: list[dict[str, Any]]
    latest: trust_state_pb2.TrustStateBody | None
    latest_version: int
    revocation_sequence: int
    audit_events: int


def rows_of(db: sqlite3.Connection, query: str) -> list[dict[str, Any]]:
    cursor = db.execute(query)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def read_server(db: sqlite3.Connection, problems: Problems) -> ServerRead:
    keys = {k["fingerprint"]: k for k in rows_of(db, "SELECT * FROM keys")}
    certificates = rows_of(db, "SELECT * FROM certificates")
    versions = [int(r[0]) for r in db.execute("SELECT version FROM trust_states ORDER BY version")]
    latest = None
    row = db.execute("SELECT signed FROM trust_states ORDER BY version DESC LIMIT 1").fetchone()
    if row is not None:
        signed = trust_state_pb2.SignedTrustState.FromString(row[0])
        latest = trust_state_pb2.TrustStateBody.FromString(signed.body)
        problems.check(
            latest.version == versions[-1],
            f"trust state: the newest row holds version {latest.version}, not {versions[-1]}",
        )
        try:  # signed by one of its own roots (a published version is never unsigned)
            accept(signed, None, [r.fingerprint for r in latest.roots])
        except TrustStateError as exc:
            problems.append(f"trust state {latest.version} does not verify: {exc}")
    sequence = int(db.execute("SELECT coalesce(max(seq), 0) FROM revocations").fetchone()[0])
    audit = db.execute("SELECT count(*) FROM audit").fetchone()[0]
    return ServerRead(keys, certificates, latest, versions[-1] if versions else 0, sequence, audit)


def check_audit_chain(db: sqlite3.Connection, problems: Problems) -> None:
    head_row = db.execute("SELECT value FROM meta WHERE name = 'audit_head'").fetchone()
    head_id, head_hash = parse_head(head_row[0] if head_row else None)
    previous, expected_id = GENESIS, 1
    columns = (
        "id, at, actor, actor_fingerprint, action, target, details, before_fingerprint, "
        "after_fingerprint, outcome, prev_hash, hash"
    )
    for row in db.execute(f"SELECT {columns} FROM audit ORDER BY id"):  # noqa: S608
        event = ChainedEvent(*row)
        if not problems.check(
            event.id == expected_id and event.prev_hash == previous,
            f"audit: the chain breaks at event {event.id}",
        ) or not problems.check(
            recomputed(event) == event.hash, f"audit: event {event.id} was changed"
        ):
            return
        previous, expected_id = event.hash, expected_id + 1
    problems.check(
        (head_id, head_hash) == (expected_id - 1, previous),
        f"audit: meta.audit_head ({head_id}) is not the newest event ({expected_id - 1})",
    )


def load_pem(pem: str | None) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate((pem or "").encode())
    except ValueError:
        return None


def check_token_uses(db: sqlite3.Connection, problems: Problems) -> None:
    """Each agent token's spent uses are the certificates recorded for it: none handed
    out without its record, no use spent for nothing."""
    rows = db.execute(
        "SELECT t.token_hash, t.uses - t.uses_left, (SELECT count(*) FROM certificates c "
        "WHERE c.token_hash = t.token_hash) FROM enrollment_tokens t WHERE t.role = 'agent'"
    )
    for digest, spent, recorded in rows:
        problems.check(
            spent == recorded,
            f"token {str(digest)[:12]}: {spent} uses spent, {recorded} certificates recorded",
        )


def check_chains(server: ServerRead, problems: Problems) -> None:
    """Every recorded certificate (of a key, or issued) is signed by its recorded issuer,
    up to a root; the root is published and unrevoked, or something on the way is
    recorded revoked."""
    published = {r.fingerprint for r in server.latest.roots} if server.latest else set()
    certificates: dict[str, x509.Certificate] = {}
    for fp, key in server.keys.items():
        if key["certificate_pem"] is None:
            problems.check(
                key["kind"] == "legacy_root", f"key {fp} ({key['kind']}) has no certificate"
            )
            continue
        cert = load_pem(key["certificate_pem"])
        if problems.check(cert is not None, f"key {fp}: its certificate does not parse"):
            assert cert is not None
            problems.check(
                fingerprint_of(cert.public_key()) == fp,
                f"key {fp}: its certificate is another key's",
            )
            certificates[fp] = cert
    verified: dict[str, bool] = {}

    def issued_by(cert: x509.Certificate, issuer: str) -> bool:
        issuer_cert = certificates.get(issuer)
        if issuer_cert is None:
            return False
        try:
            cert.verify_directly_issued_by(issuer_cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def chain_state(fp: str, depth: int = 0) -> str:
        """'live' if the key chains to a published unrevoked root, 'revoked' if it or an
        issuer above it is recorded revoked, else what is wrong."""
        key = server.keys.get(fp)
        if key is None or depth > 4:
            return f"issuer {fp} is not in the inventory"
        if key["state"] == "revoked":
            return "revoked"
        if key["kind"] == "root":
            cert = certificates.get(fp)
            if cert is None or not issued_by(cert, fp):
                return f"root {fp} is not self-signed"
            return "live" if fp in published else f"root {fp} is active but not published"
        issuer = key["issuer_fingerprint"] or ""
        if not verified.setdefault(fp, issued_by(certificates[fp], issuer)):
            return f"{fp}'s certificate does not verify with its issuer {issuer}'s key"
        return chain_state(issuer, depth + 1)

    for fp, key in server.keys.items():
        if fp in certificates:
            state = chain_state(fp)
            problems.check(state in ("live", "revoked"), f"chain of {key['kind']} {fp}: {state}")
    for record in server.certificates:
        serial = record["serial"]
        cert = load_pem(record["certificate_pem"])
        if not problems.check(cert is not None, f"certificate {serial} does not parse"):
            continue
        assert cert is not None
        problems.check(
            f"{cert.serial_number:032x}" == serial
            and fingerprint_of(cert.public_key()) == record["fingerprint"],
            f"certificate {serial}: its record does not match it",
        )
        issuer = record["issuer_fingerprint"]
        if not issued_by(cert, issuer):
            problems.append(f"certificate {serial} does not verify with its issuer {issuer}")
            continue
        state = "revoked" if record["revoked_at"] is not None else chain_state(issuer)
        problems.check(state in ("live", "revoked"), f"chain of certificate {serial}: {state}")


def check_keys(
    data_dir: Path,
    pki_db: Path,
    server: ServerRead,
    token: Any,
    on_token: dict[str, str] | None,
    problems: Problems,
) -> None:
    """Every live recorded key is in its backend with the recorded public key; nothing
    destroyed is still there; the software store holds no key without a record."""
    with read_only(pki_db) as db:
        stored = {str(i): bytes(d) for i, d in db.execute("SELECT id, public_der FROM keys")}
    recorded_software: set[str] = set()
    for fp, key in server.keys.items():
        uri, backend = key["key_uri"], key["backend"]
        gone = key["destroyed_at"] is not None
        if backend == "software":
            key_id = uri.removeprefix("software:")
            recorded_software.add(key_id)
            if gone:
                problems.check(key_id not in stored, f"key {fp} was destroyed but is in pki.db")
            elif key["state"] != "revoked":
                der = stored.get(key_id)
                if problems.check(der is not None, f"key {fp} ({key['kind']}) is not in pki.db"):
                    problems.check(
                        hashlib.sha256(der or b"").hexdigest() == fp,
                        f"key {fp}: pki.db holds another public key under {uri}",
                    )
        elif backend == "pkcs11":
            if on_token is None:
                problems.check(token is not None or gone, f"key {fp} is on a token; pass token=")
                continue
            key_id = uri_id(uri)
            if gone:
                problems.check(
                    key_id not in on_token, f"key {fp} was destroyed but is on the token"
                )
            elif key["state"] != "revoked":
                problems.check(key_id in on_token, f"key {fp} ({key['kind']}) is not on the token")
    unrecorded = sorted(set(stored) - recorded_software)
    problems.check(not unrecorded, f"pki.db of {data_dir} holds keys no record names: {unrecorded}")


def check_zone(
    zone_dir: Path, published: set[str], problems: Problems
) -> tuple[int, set[str], set[str]]:
    """A zone's databases: sound, its current keys in its backend, its intermediate
    issued by a root. (highest trust version, pkcs11 ids it records, names it holds)."""
    integrity(zone_dir / "pki.db", problems)
    if not integrity(zone_dir / "zone.db", problems):
        return 0, set(), set()
    with read_only(zone_dir / "zone.db") as db:
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        version = int(
            db.execute("SELECT coalesce(max(version), 0) FROM trust_versions").fetchone()[0]
        )
    with read_only(zone_dir / "pki.db") as db:
        stored = {str(r[0]) for r in db.execute("SELECT id FROM keys")}
    token_ids: set[str] = set()
    labels: set[str] = set()
    for name in ("intermediate_uri", "tls_uri"):
        uri = meta.get(name)
        if uri is None:
            continue  # not enrolled (yet)
        if uri.startswith("software:"):
            problems.check(
                uri.removeprefix("software:") in stored,
                f"zone {zone_dir}: its {name} is not in pki.db",
            )
        elif uri.startswith("pkcs11:"):
            parsed = Pkcs11KeyUri.parse(uri)
            token_ids.add((parsed.id or b"").hex())
            labels.add(parsed.object or "")
    chain = meta.get("intermediate_chain_pem")
    if chain:
        certs = x509.load_pem_x509_certificates(chain.encode())
        problems.check(
            len(certs) >= 2 and fingerprint_of(certs[-1].public_key()) in published,
            f"zone {zone_dir}: its intermediate's chain does not end at a published root",
        )
    return version, token_ids, labels


def check_acknowledged(
    db: sqlite3.Connection, server: ServerRead, acks: Acknowledged, problems: Problems
) -> None:
    serials = {c["serial"] for c in server.certificates}
    missing = acks.serials - serials
    problems.check(not missing, f"acknowledged: {len(missing)} certificates are not recorded")
    revoked = {c["serial"] for c in server.certificates if c["revoked_at"] is not None}
    problems.check(
        acks.revoked <= revoked,
        f"acknowledged revocations not recorded: {sorted(acks.revoked - revoked)[:5]}",
    )
    revoked_keys = {fp for fp, k in server.keys.items() if k["state"] == "revoked"}
    problems.check(
        acks.revoked_keys <= revoked_keys,
        f"acknowledged key revocations not recorded: {sorted(acks.revoked_keys - revoked_keys)}",
    )
    tokens = {r[0] for r in db.execute("SELECT token_hash FROM enrollment_tokens")}
    problems.check(acks.tokens <= tokens, "acknowledged tokens are not recorded")
    problems.check(
        acks.keys <= set(server.keys),
        f"acknowledged keys are not recorded: {sorted(acks.keys - set(server.keys))}",
    )
    zones = {r[0] for r in db.execute("SELECT name FROM zones")}
    problems.check(acks.zones <= zones, f"acknowledged zones missing: {acks.zones - zones}")
    revoked_zones = {
        r[0] for r in db.execute("SELECT name FROM zones WHERE revoked_at IS NOT NULL")
    }
    problems.check(
        acks.revoked_zones <= revoked_zones,
        f"acknowledged zone revocations not recorded: {acks.revoked_zones - revoked_zones}",
    )
    revoked_tokens = {
        str(r[0])[:16]
        for r in db.execute("SELECT token_hash FROM enrollment_tokens WHERE revoked_at IS NOT NULL")
    }
    problems.check(
        acks.revoked_tokens <= revoked_tokens,
        f"acknowledged token revocations not recorded: {acks.revoked_tokens - revoked_tokens}",
    )
    set_values: set[tuple[str, str]] = set()
    updates = db.execute("SELECT target, details FROM audit WHERE action = 'setting.update'")
    for name, details in updates:
        set_values.add((str(name), str(json.loads(details).get("value"))))
        set_values.add((str(name), "*"))
    for name, value in acks.settings:  # "*": some value (a protected one is masked)
        problems.check(
            (name, value) in set_values, f"acknowledged setting {name}={value!r} was never recorded"
        )
    body = server.latest
    if body is None:
        problems.check(not acks.revoked, "revocations acknowledged, but no trust state published")
        return
    published = set(body.revoked_serials)
    issue_time = body.issue_time.ToDatetime().isoformat()
    expired_by_then = {
        c["serial"] for c in server.certificates if c["not_after"][:19] <= issue_time[:19]
    }
    unpublished = acks.revoked - published - expired_by_then
    problems.check(
        not unpublished,
        f"acknowledged revocations not in trust state {body.version}: {sorted(unpublished)[:5]}",
    )
    published_keys = set(body.revoked_key_fingerprints) | set(body.revoked_root_fingerprints)
    problems.check(
        acks.revoked_keys <= published_keys,
        f"acknowledged key revocations not in trust state {body.version}: "
        f"{sorted(acks.revoked_keys - published_keys)}",
    )


def peer_versions(db: sqlite3.Connection, problems: Problems) -> dict[str, int]:
    """The version of each trusted peer's trust state held (fqdn -> version), each the
    version of the state stored beside it."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'trust_peers'").fetchone():
        return {}
    held = {}
    query = "SELECT fqdn, peer_version, peer_state FROM trust_peers WHERE state = 'trusted'"
    for fqdn, version, state in db.execute(query):
        held[fqdn] = int(version)
        if state is not None:
            signed = trust_state_pb2.SignedTrustState.FromString(state)
            body = trust_state_pb2.TrustStateBody.FromString(signed.body)
            problems.check(
                body.version == version and body.server_fqdn == fqdn,
                f"peer {fqdn}: the state held is {body.server_fqdn}'s version {body.version}, "
                f"the row says {version}",
            )
    return held
