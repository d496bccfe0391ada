"""Messages between two keyplane servers (active/active) and the comparison code.

Each message is a PeerMessageBody signed by every active root of its sender, over
"keyplane-peer-message-v1\\0" + body, like the trust state. The body says which step it
is, the request it belongs to, who sent it to whom, and when; a receiver refuses one for
another server, one more than MESSAGE_WINDOW from its clock, and one of the wrong kind.

The comparison code is what both admins read aloud before approving. It cannot be ground
by making keys until a short string matches, because it comes from a nonce each side
drew, and the requester committed to its nonce (SHA-256 of it with its root
fingerprints) before it saw the receiver's:

    code = SHA-256("keyplane-sas-v1\\0" || requester nonce || receiver nonce
                   || every root fingerprint of both, sorted, comma-separated)

as six decimal digits. The full fingerprints are shown beside it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.der import UNPARSED
from keyplane.server.domain.trust import sign_with
from keyplane.server.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from keyplane.server.kinds import KeyKind, KeyState
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2

PEER_MESSAGE_CONTEXT = b"keyplane-peer-message-v1\0"
COMMIT_CONTEXT = b"keyplane-sas-commit-v1\0"
SAS_CONTEXT = b"keyplane-sas-v1\0"
NONCE_BYTES = 32
MESSAGE_WINDOW = datetime.timedelta(minutes=10)
# A server has at most two active roots; an offer may list no more.
MAX_ROOTS = 2
MAX_MESSAGE_BYTES = 64 * 1024
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
# What a root certificate that is not self-signed, or has no readable CA flag, raises.
NOT_SELF_SIGNED: tuple[type[Exception], ...] = (*UNPARSED, TypeError, InvalidSignature)
NO_CA_FLAG: tuple[type[Exception], ...] = (*UNPARSED, x509.ExtensionNotFound)

KIND_NAMES: dict[int, str] = {
    pb.PEER_MESSAGE_KIND_OFFER: "an offer",
    pb.PEER_MESSAGE_KIND_RECEIPT: "a receipt",
    pb.PEER_MESSAGE_KIND_REVEAL: "a nonce reveal",
    pb.PEER_MESSAGE_KIND_DECISION: "a decision",
    pb.PEER_MESSAGE_KIND_ACK: "an acknowledgement",
    pb.PEER_MESSAGE_KIND_END: "an end of trust",
}


@dataclass(frozen=True)
class Signer:
    """One of this server's active roots, to sign with."""

    fingerprint: str
    key: BackendPrivateKey
    algorithm: KeyAlgorithm


def new_request_id() -> str:
    return secrets.token_hex(16)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _joined(fingerprints: Iterable[str]) -> bytes:
    return ",".join(sorted(fingerprints)).encode()


def commitment(nonce: bytes, fingerprints: Iterable[str]) -> bytes:
    """What the requester sends before its nonce: it cannot change the nonce after."""
    return hashlib.sha256(COMMIT_CONTEXT + nonce + _joined(fingerprints)).digest()


def commitment_matches(expected: bytes, nonce: bytes, fingerprints: Iterable[str]) -> bool:
    return len(nonce) == NONCE_BYTES and hmac.compare_digest(
        expected, commitment(nonce, fingerprints)
    )


def comparison_code(
    requester_nonce: bytes, receiver_nonce: bytes, fingerprints: Iterable[str]
) -> str:
    """Six digits, "123 456", from both nonces and both servers' root fingerprints."""
    digest = hashlib.sha256(
        SAS_CONTEXT + requester_nonce + receiver_nonce + _joined(fingerprints)
    ).digest()
    number = int.from_bytes(digest[:8], "big") % 1_000_000
    return f"{number // 1000:03d} {number % 1000:03d}"


def trusted_certificate(cert: x509.Certificate, name: str) -> trust_state_pb2.TrustedCertificate:
    return trust_state_pb2.TrustedCertificate(
        fingerprint=certs.key_fingerprint(cert),
        certificate_der=certs.to_der(cert),
        name=name,
        state=KeyState.ACTIVE,
        kind=KeyKind.ROOT,
    )


def verify_with(public_key: object, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is a keyplane signature (ECDSA, RSA PKCS#1 v1.5) over `data`."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if public_key.curve.name == "secp384r1" else hashes.SHA256()
            public_key.verify(signature, data, ec.ECDSA(digest))
            return True
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return True
    except InvalidSignature:
        return False
    return False


def sign_message(body: pb.PeerMessageBody, signers: Iterable[Signer]) -> pb.SignedPeerMessage:
    data = body.SerializeToString(deterministic=True)
    signed = pb.SignedPeerMessage(body=data)
    for signer in signers:
        signed.signatures.add(
            root_fingerprint=signer.fingerprint,
            signature=sign_with(signer.key, signer.algorithm, PEER_MESSAGE_CONTEXT + data),
        )
    return signed


def parse_message(signed: pb.SignedPeerMessage, kind: pb.PeerMessageKind) -> pb.PeerMessageBody:
    """The body of a message that must be of `kind`; INVALID_ARGUMENT otherwise."""
    if not signed.body:
        raise InvalidArgument(f"{KIND_NAMES.get(kind, 'a peer message')} is missing")
    if len(signed.body) > MAX_MESSAGE_BYTES:
        raise InvalidArgument(f"a peer message is at most {MAX_MESSAGE_BYTES} bytes")
    try:
        body = pb.PeerMessageBody.FromString(signed.body)
    except Exception:  # protobuf's DecodeError
        raise InvalidArgument("the peer message body is not a PeerMessageBody") from None
    if body.kind != kind:
        raise InvalidArgument(
            f"expected {KIND_NAMES.get(kind, 'a peer message')}, got "
            f"{KIND_NAMES.get(body.kind, 'an unknown kind')}"
        )
    if not REQUEST_ID.fullmatch(body.request_id):
        raise InvalidArgument("a peer message's request_id is 32 lowercase hex digits")
    return body


def check_addressed(body: pb.PeerMessageBody, own_fqdn: str, now: datetime.datetime) -> None:
    """That the message is for this server and recent (a replay from long ago is not)."""
    if body.recipient_fqdn != own_fqdn:
        raise PermissionDenied(
            f"this peer message is for {body.recipient_fqdn!r}, not this server ({own_fqdn})"
        )
    try:
        sent = body.send_time.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("the peer message's send_time is not a valid time") from None
    if abs(sent - now) > MESSAGE_WINDOW:
        raise FailedPrecondition(
            "the peer message was sent more than "
            f"{int(MESSAGE_WINDOW.total_seconds() // 60)} minutes from this server's clock "
            "(a replay, or a clock that is off); it is refused"
        )


def roots_of(body: pb.PeerMessageBody) -> dict[str, x509.Certificate]:
    """The sender's roots as its message lists them: self-signed CA certificates, each
    matching its fingerprint; INVALID_ARGUMENT otherwise."""
    if not body.roots or len(body.roots) > MAX_ROOTS:
        raise InvalidArgument(f"a peer lists 1 to {MAX_ROOTS} active roots")
    roots: dict[str, x509.Certificate] = {}
    for root in body.roots:
        try:
            cert = x509.load_der_x509_certificate(root.certificate_der)
            cert.verify_directly_issued_by(cert)
            found = certs.key_fingerprint(cert)
        except NOT_SELF_SIGNED:
            raise InvalidArgument(
                f"root {root.fingerprint[:16]} is not a self-signed certificate"
            ) from None
        if found != root.fingerprint:
            raise InvalidArgument(f"root {root.fingerprint[:16]} does not match its certificate")
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except NO_CA_FLAG:  # extensions are parsed only now
            ca = False
        if not ca:
            raise InvalidArgument(f"root {root.fingerprint[:16]} is not a CA certificate")
        roots[root.fingerprint] = cert
    return roots


def verify_signed(
    signed: pb.SignedPeerMessage,
    roots: Mapping[str, x509.Certificate],
    require_all: bool = False,
) -> None:
    """That `roots` signed the message: every one of them with `require_all` (an offer,
    whose roots come from itself), else at least one. PERMISSION_DENIED otherwise."""
    data = PEER_MESSAGE_CONTEXT + signed.body
    good = {
        s.root_fingerprint
        for s in signed.signatures
        if s.root_fingerprint in roots
        and verify_with(roots[s.root_fingerprint].public_key(), s.signature, data)
    }
    if require_all and good != set(roots):
        missing = sorted(set(roots) - good)
        raise PermissionDenied(
            "the peer message is not signed by every root it lists (no valid signature "
            f"by {', '.join(m[:16] for m in missing)}); it is refused"
        )
    if not good:
        raise PermissionDenied(
            "the peer message is not signed by any root this server holds for its sender; "
            "it is refused"
        )


def roots_pem(roots: Mapping[str, x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in roots.values())


def load_roots_pem(pem: str) -> dict[str, x509.Certificate]:
    if not pem:
        return {}
    return {certs.key_fingerprint(c): c for c in x509.load_pem_x509_certificates(pem.encode())}
