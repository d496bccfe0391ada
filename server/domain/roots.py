"""Root keys: creating `<fqdn> Root <n>` (at most two active), the legacy root, how far
the fleet has moved to the newest one (coverage), and revoking a root for good with
everything it issued, behind a gate on that coverage (revocation_plan).

A revocation and the trust-state version that publishes it commit in one transaction:
if the new version cannot be signed, nothing is revoked and the caller is told so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from keyplane.plugins.errors import BackendError
from keyplane.plugins.keys import KeyAlgorithm, fingerprint
from keyplane.server.domain import certs, crl
from keyplane.server.domain.coverage import DEFAULT_STRAGGLERS, MAX_STRAGGLERS, Coverage, Fleet
from keyplane.server.domain.inputs import parse_reason
from keyplane.server.domain.revocation_plan import RevocationPlan, Verdict, plan_revocation
from keyplane.server.errors import (
    AlreadyRevoked,
    ConfirmationRequired,
    InvalidArgument,
    LastActiveRoot,
    LastRootOfTrust,
    LegacyRootImmutable,
    RootLimitReached,
    Unavailable,
)
from keyplane.server.kinds import KeyKind, KeyState
from keyplane.server.store import KeyRecord

if TYPE_CHECKING:
    from keyplane.server.domain.hierarchy import Hierarchy

log = logging.getLogger(__name__)

MAX_ACTIVE_ROOTS = 2
LEGACY_ROOT_NAME = "legacy-root"
SERVER_ACTOR = "keyplane-server"
MIN_COVERAGE = "PKIRootRevocationMinCoverage"


class Roots:
    """Creates and revokes the hierarchy's roots."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.h = hierarchy

    def create(self, actor: str, algorithm: KeyAlgorithm | None = None) -> KeyRecord:
        """Create `<fqdn> Root <n>` and re-issue the server's subordinates under it."""
        with self.h.lock:
            try:
                record = self.create_unlocked(actor, algorithm or self.h.config.root_algorithm)
            except RootLimitReached:
                raise  # refused: no rotation was tried
            except Exception:
                self.h.metrics.rotation(KeyKind.ROOT, ok=False)
                raise
            self.h.metrics.rotation(KeyKind.ROOT, ok=True)
            self.h.rotation.reconcile_unlocked(actor)
            return record

    def _check_limit(self, active: list[KeyRecord]) -> None:
        if len(active) >= MAX_ACTIVE_ROOTS:
            names = ", ".join(r.name for r in active)
            raise RootLimitReached(
                f"{len(active)} root keys are active already ({names}); revoke one with "
                "'keyplane roots revoke FINGERPRINT' before creating another"
            )

    def create_unlocked(self, actor: str, algorithm: KeyAlgorithm) -> KeyRecord:
        h = self.h
        self._check_limit(h.active_roots())
        with h.store.transaction(h.clock.now()) as tx:
            number = tx.next_root_number()
        name = f"{h.config.fqdn} Root {number}"
        backend = h.config.backend_for(KeyKind.ROOT)
        # No key is left behind for a root that was not recorded (key_intents.py).
        with h.keys.making(backend, name, algorithm) as generated:
            h.faults.checkpoint("root.generated")
            now = h.clock.now()
            key = h.backends.private_key(generated.uri)
            cert = certs.build_root_certificate(key, name, now)
            record = KeyRecord(
                fingerprint=fingerprint(generated.public_key),
                kind=KeyKind.ROOT,
                name=name,
                number=number,
                algorithm=algorithm.value,
                backend=backend,
                key_uri=generated.uri,
                state=KeyState.ACTIVE,
                issuer_fingerprint=None,
                certificate_pem=certs.to_pem(cert),
                not_before=cert.not_valid_before_utc,
                not_after=None,
                created_at=now,
            )
            with h.store.transaction(now) as tx:
                # Checked again inside the write lock: another worker may have won.
                self._check_limit(tx.reads.keys(KeyKind.ROOT, (KeyState.ACTIVE,)))
                tx.insert_key(record)
                tx.on_commit(lambda: h.metrics.issued(KeyKind.ROOT))
                tx.audit(
                    actor,
                    "root.create",
                    record.fingerprint,
                    after_fingerprint=record.fingerprint,
                    name=name,
                    backend=backend,
                    algorithm=algorithm.value,
                    key_uri=generated.uri,
                )
        h.faults.checkpoint("root.recorded")
        log.info("created root key %s (%s) in %s", name, record.fingerprint, backend)
        return record

    def create_legacy(self) -> KeyRecord:
        h = self.h
        backend = h.config.backend_for(KeyKind.LEGACY_ROOT)
        algorithm = h.config.root_algorithm
        with h.keys.making(backend, LEGACY_ROOT_NAME, algorithm) as generated:
            now = h.clock.now()
            record = KeyRecord(
                fingerprint=fingerprint(generated.public_key),
                kind=KeyKind.LEGACY_ROOT,
                name=LEGACY_ROOT_NAME,
                number=None,
                algorithm=algorithm.value,
                backend=backend,
                key_uri=generated.uri,
                state=KeyState.ACTIVE,
                issuer_fingerprint=None,
                certificate_pem=None,
                not_before=now,
                not_after=None,
                created_at=now,
            )
            with h.store.transaction(now) as tx:
                tx.insert_key(record)
                tx.audit(
                    SERVER_ACTOR,
                    "legacy_root.create",
                    record.fingerprint,
                    after_fingerprint=record.fingerprint,
                )
        return record

    def coverage(self, straggler_limit: int = 0) -> Coverage:
        """How far the fleet has moved to the newest root (see coverage.py)."""
        limit = straggler_limit or DEFAULT_STRAGGLERS
        if not 1 <= limit <= MAX_STRAGGLERS:
            raise InvalidArgument(f"straggler_limit is 1 to {MAX_STRAGGLERS}")
        h = self.h
        with h.store.reads.snapshot() as reads:
            fleet = Fleet(reads, h.config.fqdn, h.clock.now())
            return fleet.coverage(limit, h.settings.fraction(MIN_COVERAGE))

    def _check_revocable(self, record: KeyRecord) -> None:
        h = self.h
        fp = record.fingerprint
        if record.kind == KeyKind.LEGACY_ROOT:
            raise LegacyRootImmutable("the legacy root is never revoked or rotated")
        if record.state == KeyState.REVOKED:
            raise AlreadyRevoked(f"{record.name} ({fp}) is revoked already")
        if len(h.active_roots()) <= 1:
            trusted = [p.fqdn for p in h.store.reads.peers.trust_peers(("trusted",))]
            if trusted:
                peers = ", ".join(trusted)
                raise LastRootOfTrust(
                    f"{record.name} is the only active root, and the trust with {peers} "
                    f"rests on it: revoke the trust first ('keyplane trust revoke "
                    f"{trusted[0]}'), or create a second root first ('keyplane roots "
                    f"create'), let {peers} follow it, then revoke this one"
                )
            raise LastActiveRoot(
                f"{record.name} is the only active root; create a new root with "
                "'keyplane roots create' first, then revoke this one"
            )

    def revoke(
        self,
        actor: str,
        fingerprint_text: str,
        reason: str,
        confirm: bool,
        dry_run: bool = False,
        force: bool = False,
    ) -> tuple[KeyRecord, RevocationPlan]:
        """Revoke a root for good, with everything it issued, publish that, then destroy
        its key; the plan of what it did. With `dry_run`, only the plan (nothing changes).
        Refused (CoverageBelowMinimum) while too few live components have moved off it,
        unless `force`."""
        h = self.h
        fp = h.root_fingerprint(fingerprint_text)
        if not dry_run:
            reason = parse_reason(reason)
            if not confirm:
                raise ConfirmationRequired(
                    "revoking a root is permanent and destroys its private key; "
                    "confirm it explicitly (--yes on the command line)"
                )
        with h.lock:
            record = h.root(fp)
            self._check_revocable(record)
            min_coverage = h.settings.fraction(MIN_COVERAGE)
            if dry_run:
                with h.store.reads.snapshot() as reads:
                    plan = plan_revocation(
                        reads, h.config.fqdn, record, h.clock.now(), min_coverage, force, True
                    )
                return record, plan
            because = f"issuing root revoked: {reason}"
            code = crl.reason_code_of(reason)
            # What goes with a rotated-out root is superseded (re-issued under the new
            # one); with a compromised one, cACompromise.
            inherited = crl.inherited_reason(code, crl.SUPERSEDED)
            try:
                with h.store.transaction(h.clock.now()) as tx:
                    # Worked out from what this transaction sees: what is done is the plan.
                    plan = plan_revocation(
                        tx.reads, h.config.fqdn, record, tx.now, min_coverage, force, False
                    )
                    if plan.verdict == Verdict.REFUSED:
                        raise plan.refusal()
                    tx.revoke_key(fp, KeyKind.ROOT, actor, reason, code)
                    for sub in plan.subordinates:
                        tx.revoke_key(sub.fingerprint, sub.kind, actor, because, inherited)
                    certificates = tx.revoke_certificates_issued_by(fp, actor, because, inherited)
                    for sub in plan.subordinates:
                        # Everything the root's intermediates issued goes with them.
                        certificates += tx.revoke_certificates_issued_by(
                            sub.fingerprint, actor, because, inherited
                        )
                    tx.audit(
                        actor,
                        "root.revoke",
                        fp,
                        before_fingerprint=fp,
                        name=record.name,
                        reason=reason,
                        subordinates=[s.fingerprint for s in plan.subordinates],
                        certificates=certificates,
                        forced=plan.verdict == Verdict.FORCED,
                        coverage=plan.coverage,
                        min_coverage=min_coverage,
                        stranded=plan.stranded,
                    )
                    h.trust.publish_in(tx, actor)
            except BackendError as exc:
                raise Unavailable(
                    f"{record.name} was not revoked: the trust state that publishes the "
                    f"revocation could not be signed ({exc}); nothing changed, try again"
                ) from None
            h.faults.checkpoint("revoke.recorded")
            log.info(
                "revoked root key %s (%s)%s: %s",
                record.name,
                fp,
                " (forced)" if plan.verdict == Verdict.FORCED else "",
                reason,
            )
            h.destroy_revoked_keys()
            h.rotation.reconcile_unlocked(actor)
            revoked = h.store.key(fp)
            assert revoked is not None  # noqa: S101 - just written
            return revoked, plan
