"""What must hold after any fault (a SIGKILL, a failed backend, bad input): one function
that fault tests call once the dust has settled, and that raises an AssertionError
naming each invariant broken.

    snapshot = check_invariants(data_dir)                    # before the fault
    ... kill, restart ...
    check_invariants(data_dir, previous=snapshot, acknowledged=acks, token=softhsm_token)

It reads the databases read-only (SQLite's own integrity check on each), verifies every
recorded certificate with real signatures up to a root, and looks every recorded key up
in its backend: the software backend's rows in `pki.db` (no key is unsealed) and, given
the SoftHSM token, the token's objects through `pkcs11-tool`. It returns a snapshot for
the next call: versions and sequences (a trusted peer's held version too) never go
back, and every key that appeared on the token since is recorded somewhere. Each agent
token's spent uses equal the certificates recorded for it, and no backup's work dir
(copies of both databases) is left. The checks
themselves are in tests/invariant_checks.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.invariant_checks import (
    MAX_ACTIVE_ROOTS,
    Acknowledged,
    Problems,
    check_acknowledged,
    check_audit_chain,
    check_chains,
    check_keys,
    check_token_uses,
    check_zone,
    integrity,
    peer_versions,
    read_only,
    read_server,
    token_keys,
    uri_id,
)

__all__ = ["Acknowledged", "InvariantSnapshot", "check_invariants", "token_keys"]


@dataclass(frozen=True)
class InvariantSnapshot:
    """What the next check compares with: none of these may go back, and a key that
    appears on the token after `token_keys` must be recorded."""

    revocation_sequence: int
    trust_state_version: int
    audit_events: int
    zone_trust_versions: Mapping[str, int]
    token_keys: frozenset[str] | None
    peer_versions: Mapping[str, int] = field(default_factory=dict)


def check_invariants(
    data_dir: Path,
    *,
    zone_dirs: Iterable[Path] = (),
    token: Any = None,
    acknowledged: Acknowledged | None = None,
    previous: InvariantSnapshot | None = None,
    pki_db: Path | None = None,
) -> InvariantSnapshot:
    """Check a server's data dir (and its zones' data dirs) at rest: after the server
    restarted from a fault, or once a burst has gone quiet. `token` is the SoftHSM token
    (tests.softhsm.SoftHsmToken) when any key is on it; `acknowledged`, what callers
    were told succeeded; `previous`, the snapshot an earlier call returned. Raises
    AssertionError naming every invariant broken; returns the snapshot for the next call.
    """
    problems = Problems()
    pki_db = pki_db or data_dir / "pki.db"
    # A backup's work dir holds copies of both databases: at rest, none is left.
    left = sorted(p.name for p in data_dir.glob(".backup-*"))
    problems.check(not left, f"work dirs of backups left in {data_dir}: {left}")
    integrity(pki_db, problems)
    if not integrity(data_dir / "keyplane.db", problems):
        raise AssertionError("invariants broken:\n- " + "\n- ".join(problems))
    with read_only(data_dir / "keyplane.db") as db:
        server = read_server(db, problems)
        peers = peer_versions(db, problems)
        check_audit_chain(db, problems)
        roots = [k for k in server.keys.values() if k["kind"] == "root"]
        active = {k["fingerprint"] for k in roots if k["state"] == "active"}
        problems.check(
            1 <= len(active) <= MAX_ACTIVE_ROOTS,
            f"roots: {len(active)} are active (1 to {MAX_ACTIVE_ROOTS} may be)",
        )
        if server.latest is not None:
            listed = {r.fingerprint for r in server.latest.roots}
            problems.check(
                listed == active,
                f"trust state {server.latest_version} lists roots {sorted(listed)}, "
                f"the active ones are {sorted(active)}",
            )
        prepared = [k["kind"] for k in server.keys.values() if k["state"] == "prepared"]
        problems.check(not prepared, f"rotations left half done: {prepared} still prepared")
        intents = [r[0] for r in db.execute("SELECT name FROM meta WHERE name LIKE 'key_intent:%'")]
        problems.check(not intents, f"keys left being made (intents): {intents}")
        check_chains(server, problems)
        check_token_uses(db, problems)
        on_token = token_keys(token) if token is not None else None
        check_keys(data_dir, pki_db, server, token, on_token, problems)
        if acknowledged is not None:
            check_acknowledged(db, server, acknowledged, problems)
    published = {r.fingerprint for r in server.latest.roots} if server.latest else set()
    zone_versions: dict[str, int] = {}
    zone_token_ids: set[str] = set()
    zone_labels: set[str] = set()
    for zone_dir in zone_dirs:
        version, ids, labels = check_zone(Path(zone_dir), published, problems)
        zone_versions[str(zone_dir)] = version
        zone_token_ids |= ids
        zone_labels |= labels
        problems.check(
            version <= server.latest_version,
            f"zone {zone_dir} holds trust version {version}, past the server's",
        )
    if on_token is not None:
        missing = zone_token_ids - set(on_token)
        problems.check(not missing, f"zones' keys are not on the token: {sorted(missing)}")
    if previous is not None:
        problems.check(
            server.revocation_sequence >= previous.revocation_sequence,
            f"the revocation sequence went back: {previous.revocation_sequence} -> "
            f"{server.revocation_sequence}",
        )
        problems.check(
            server.latest_version >= previous.trust_state_version,
            f"the trust-state version went back: {previous.trust_state_version} -> "
            f"{server.latest_version}",
        )
        problems.check(
            server.audit_events >= previous.audit_events,
            f"the audit log shrank: {previous.audit_events} -> {server.audit_events} events",
        )
        for fqdn, version in previous.peer_versions.items():
            problems.check(
                peers.get(fqdn, version) >= version,
                f"the trust state held for peer {fqdn} went back: {version} -> {peers[fqdn]}",
            )
        for zone, version in zone_versions.items():
            before = previous.zone_trust_versions.get(zone, 0)
            problems.check(version >= before, f"zone {zone}'s trust version went back")
        if on_token is not None and previous.token_keys is not None:
            recorded = {
                uri_id(k["key_uri"]) for k in server.keys.values() if k["backend"] == "pkcs11"
            }
            # A zone keeps the intermediates it renewed away from on its token (their
            # label is its current one's): a zone's gap, not the server's.
            held = {i for i, label in on_token.items() if label in zone_labels}
            appeared = set(on_token) - previous.token_keys - recorded - zone_token_ids - held
            problems.check(
                not appeared,
                f"the token holds keys no record names: "
                f"{sorted(f'{i} ({on_token[i]})' for i in appeared)}",
            )
    if problems:
        raise AssertionError(
            f"{len(problems)} invariant(s) broken in {data_dir}:\n- " + "\n- ".join(problems)
        )
    return InvariantSnapshot(
        revocation_sequence=server.revocation_sequence,
        trust_state_version=server.latest_version,
        audit_events=server.audit_events,
        zone_trust_versions=zone_versions,
        token_keys=frozenset(on_token) if on_token is not None else None,
        peer_versions=peers,
    )
