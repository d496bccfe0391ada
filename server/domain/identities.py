"""People's identities: the credentials of admins, operators and auditors.

An identity is a client certificate from the newest root, its name the common name and
its role a URI SAN, recorded with every other certificate: admission knows no other
kind of person. The person makes the key and sends a CSR, so the private key never
reaches the server. A name is taken while a live (unrevoked, unexpired) identity has
it; revoking a name revokes its live credentials the way RevokeCertificate revokes one,
published in the trust state in the same transaction.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from keyplane.plugins.keys import fingerprint
from keyplane.server.domain import certs
from keyplane.server.domain.csr_policy import NAME, check_public_key, check_request, parse_csr
from keyplane.server.domain.enrollment import check_revocation, key_in_use, revoke_published
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.inputs import parse_reason
from keyplane.server.errors import AlreadyExists, InvalidArgument, NotFound
from keyplane.server.kinds import HUMAN_ROLES, KeyKind, Role
from keyplane.server.store import CertificateRecord
from keyplane.server.store.reads import Reads

# People get a new credential when theirs runs out, not a renewal: long enough not to
# be a chore, short enough that a forgotten one goes by itself.
IDENTITY_VALIDITY = datetime.timedelta(days=90)
# More people than any one server has; ListIdentities reads them all.
MAX_IDENTITIES = 1_000_000
ROLE_ORDER = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR)


class IdentityState(enum.StrEnum):
    """Where an identity's credential is in its life."""

    LIVE = "live"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class IdentityView:
    """One credential of a person's identity."""

    name: str
    role: Role
    state: IdentityState
    record: CertificateRecord


@dataclass(frozen=True)
class CreatedIdentity:
    """A new identity, with the roots its holder trusts the server by."""

    identity: IdentityView
    roots_pem: str


def parse_name(text: str) -> str:
    if not NAME.fullmatch(text):
        raise InvalidArgument(
            "an identity's name is 1-128 letters, digits, '.', '_', '@' or '-', starting "
            "with a letter or digit (e.g. alice@example.org)"
        )
    return text


def parse_role(text: str) -> Role:
    if text not in HUMAN_ROLES:
        raise InvalidArgument(
            f"choose an identity's role: {', '.join(r.value for r in ROLE_ORDER)}"
        )
    return Role(text)


def view_of(record: CertificateRecord, now: datetime.datetime) -> IdentityView:
    if record.revoked_at is not None:
        state = IdentityState.REVOKED
    elif record.not_after <= now:
        state = IdentityState.EXPIRED
    else:
        state = IdentityState.LIVE
    name = certs.common_name_of(certs.load_pem(record.certificate_pem))
    return IdentityView(name, Role(record.role), state, record)


class Identities:
    """Creates, lists and revokes people's identities."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.store = hierarchy.store
        self.clock = hierarchy.clock

    def _all(self, reads: Reads, now: datetime.datetime) -> list[IdentityView]:
        """Every identity's credentials, by name, newest first within a name."""
        found = [
            view_of(record, now)
            for role in ROLE_ORDER
            for record in reads.certificates(role, MAX_IDENTITIES)
        ]
        found.sort(key=lambda v: v.record.issued_at, reverse=True)
        found.sort(key=lambda v: v.name)
        return found

    def _live(self, reads: Reads, name: str, now: datetime.datetime) -> list[IdentityView]:
        return [
            v for v in self._all(reads, now) if v.name == name and v.state is IdentityState.LIVE
        ]

    def create(self, actor: str, name: str, role: str, csr_data: bytes) -> CreatedIdentity:
        """Certify the CSR's key as `name` with `role`, from the newest root."""
        name, checked_role = parse_name(name), parse_role(role)
        csr = parse_csr(csr_data)
        key = check_public_key(csr)
        key_fp = fingerprint(key)
        known = self.store.certificates_for_key(key_fp)
        if known:  # before the signature: a replayed CSR is refused cheaply
            raise AlreadyExists(key_in_use(known))
        if check_request(csr) != name:
            raise InvalidArgument(
                f"the CSR's common name must be the identity's name, {name!r} "
                "('keyplane identities create' makes such a CSR)"
            )
        h = self.hierarchy
        with h.lock:
            now = self.clock.now()
            self._refuse_taken(self.store.reads, name, now)
            issuer = h.issuing_root()
            record = certs.client_record(
                h.backends.private_key(issuer.key_uri),
                certs.load_pem(issuer.certificate_pem or ""),
                issuer.fingerprint,
                key,
                name,
                checked_role,
                now,
                IDENTITY_VALIDITY,
                crl_url=h.crls.url_for(issuer.fingerprint),
            )
            with self.store.transaction(now) as tx:
                # Again in the transaction: another worker process may have just made it.
                self._refuse_taken(tx.reads, name, now)
                known = tx.reads.certificates_for_key(key_fp)
                if known:
                    raise AlreadyExists(key_in_use(known))
                tx.insert_certificate(record)
                tx.on_commit(lambda: h.metrics.issued(KeyKind.ROOT))
                tx.audit(
                    actor,
                    "identity.create",
                    record.serial,
                    name=name,
                    role=checked_role.value,
                    issuer=issuer.fingerprint,
                )
            roots = h.trusted_roots_pem().decode()
        return CreatedIdentity(view_of(record, now), roots)

    def _refuse_taken(self, reads: Reads, name: str, now: datetime.datetime) -> None:
        live = self._live(reads, name, now)
        if live:
            raise AlreadyExists(
                f"a live identity is named {name!r} ({live[0].role}, certificate "
                f"{live[0].record.serial}); revoke it first or choose another name"
            )

    def list_identities(self, include_revoked: bool = False) -> list[IdentityView]:
        found = self._all(self.store.reads, self.clock.now())
        if include_revoked:
            return found
        return [v for v in found if v.state is IdentityState.LIVE]

    def revoke(
        self,
        actor: str,
        name: str,
        reason: str,
        confirm: bool = False,
        force: bool = False,
        caller: Identity | None = None,
    ) -> list[IdentityView]:
        """Revoke every live credential of `name`, published before this returns."""
        name = parse_name(name)
        reason = parse_reason(reason)
        h = self.hierarchy
        with h.lock:
            live = self._live(self.store.reads, name, self.clock.now())
            if not live:
                raise NotFound(f"no live identity is named {name!r} ('identities list')")
            for view in live:
                check_revocation(view.record, confirm, force, caller)
            serials = [v.record.serial for v in live]
            revoke_published(h, actor, serials, reason, "identity.revoke", name=name)
        now = self.clock.now()
        revoked = [self.store.certificate(serial) for serial in serials]
        return [view_of(r, now) for r in revoked if r is not None]
