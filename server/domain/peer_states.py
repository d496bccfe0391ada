"""Following a trusted peer's trust state on the server: the rules of
keyplane.clients.trust.follow (which the server may not import: server and clients
never import each other), plus one of the peer link's own.

A version is accepted when it is newer than the one held (no rollback), it names the
peer, one root the held version trusts (the approved roots, before the first) and that
it does not revoke signed it, and its roots share at least one with the held version's:
the peer rotates one root at a time, so a version that drops every root held is not a
rotation but a takeover, even when a held root signed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509

from keyplane.server.domain import certs
from keyplane.server.domain.der import UNPARSED
from keyplane.server.domain.peer_messages import verify_with
from keyplane.server.domain.trust import TRUST_STATE_CONTEXT
from keyplane.server.errors import FailedPrecondition, KeyplaneError, PermissionDenied
from keyplane.v1 import trust_state_pb2

MAX_VERSIONS = 1000


@dataclass(frozen=True)
class PeerState:
    """A verified trust-state version of a peer."""

    body: trust_state_pb2.TrustStateBody
    signed: bytes

    @property
    def version(self) -> int:
        return int(self.body.version)

    @property
    def roots(self) -> dict[str, x509.Certificate]:
        return {
            r.fingerprint: x509.load_der_x509_certificate(r.certificate_der)
            for r in self.body.roots
        }


@dataclass(frozen=True)
class Followed:
    """What following a batch gave: the newest good version (None if none was), and the
    error that stopped it (None if every version was accepted)."""

    state: PeerState | None
    error: KeyplaneError | None


def load_state(signed: bytes) -> PeerState:
    """A version accepted before (as stored)."""
    parsed = trust_state_pb2.SignedTrustState.FromString(signed)
    return PeerState(trust_state_pb2.TrustStateBody.FromString(parsed.body), signed)


def _parse(signed: trust_state_pb2.SignedTrustState) -> trust_state_pb2.TrustStateBody:
    try:
        body = trust_state_pb2.TrustStateBody.FromString(signed.body)
    except Exception:  # protobuf's DecodeError
        raise PermissionDenied("the peer's trust state does not parse") from None
    for root in body.roots:
        try:
            cert = x509.load_der_x509_certificate(root.certificate_der)
            found = certs.key_fingerprint(cert)
        except UNPARSED:
            raise PermissionDenied(
                f"root {root.fingerprint[:16]} has no valid certificate"
            ) from None
        if found != root.fingerprint:
            raise PermissionDenied(f"root {root.fingerprint[:16]} does not match its certificate")
    return body


def accept_one(
    signed: trust_state_pb2.SignedTrustState,
    fqdn: str,
    trusted: Mapping[str, x509.Certificate],
    held_version: int,
) -> PeerState:
    """One version, against the roots held (see the module docstring)."""
    body = _parse(signed)
    if body.server_fqdn != fqdn:
        raise PermissionDenied(
            f"the trust state is {body.server_fqdn!r}'s, not the trusted peer {fqdn}'s"
        )
    if body.version <= held_version:
        raise FailedPrecondition(
            f"{fqdn}'s trust state version {body.version} is not newer than the held "
            f"version {held_version} (a rollback or a replay); the held version stays"
        )
    revoked = set(body.revoked_root_fingerprints)
    data = TRUST_STATE_CONTEXT + signed.body
    if not any(
        s.root_fingerprint in trusted
        and s.root_fingerprint not in revoked
        and verify_with(trusted[s.root_fingerprint].public_key(), s.signature, data)
        for s in signed.signatures
    ):
        raise PermissionDenied(
            f"{fqdn}'s trust state version {body.version} is not signed by a root this "
            "server holds for it (one it no longer has, or a forgery); the held version stays"
        )
    if not {r.fingerprint for r in body.roots} & set(trusted):
        raise PermissionDenied(
            f"{fqdn}'s trust state version {body.version} drops every root this server "
            "holds for it (a rotation replaces one root at a time); the held version stays"
        )
    return PeerState(body, signed.SerializeToString())


def follow_peer(
    fqdn: str,
    held: PeerState | None,
    approved: Mapping[str, x509.Certificate],
    versions: Iterable[trust_state_pb2.SignedTrustState],
) -> Followed:
    """Walk `versions` (oldest first) from `held`, or from the approved roots."""
    state = held
    batch = list(versions)
    if len(batch) > MAX_VERSIONS:
        return Followed(None, PermissionDenied(f"at most {MAX_VERSIONS} versions at once"))
    for signed in batch:
        trusted = state.roots if state is not None else approved
        try:
            state = accept_one(signed, fqdn, trusted, state.version if state else 0)
        except KeyplaneError as exc:
            return Followed(state if state is not held else None, exc)
    return Followed(state if state is not held else None, None)
