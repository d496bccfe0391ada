"""Following the trust state: verify each version against the roots the one before it
trusted, and never go back to an older version.

A component starts from pinned root fingerprints (from its init bundle or
`--fingerprint`) or from a trust state it verified before. A new version is accepted
when its number is higher and at least one root that the held version trusts (and the
new one does not revoke) signed it. A chain of versions is walked in order, so a client
that was offline through a root rotation catches up through the bridging versions.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from google.protobuf import json_format

from keyplane.v1 import trust_state_pb2

TRUST_STATE_CONTEXT = b"keyplane-trust-state-v1\0"


# What cryptography raises for bytes that are not the certificate or key they claim to
# be: ValueError, InvalidVersion (a version field out of range: a plain Exception) and
# UnsupportedAlgorithm (a key of an algorithm it does not know, read only when asked);
# DuplicateExtension when the extensions, also read only when asked, name one twice.
UNPARSED: tuple[type[Exception], ...] = (
    ValueError,
    x509.InvalidVersion,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
)


class TrustStateError(Exception):
    """A trust-state version cannot be accepted; the message says why."""


def key_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo, hex; one of UNPARSED if its key
    does not parse (cryptography reads it only now)."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def verify_signature(public_key: object, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is a keyplane signature (ECDSA or RSA PKCS#1 v1.5) over `data`."""
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


@dataclass(frozen=True)
class TrustState:
    """A verified trust-state version and the signed bytes it came from."""

    body: trust_state_pb2.TrustStateBody
    signed: trust_state_pb2.SignedTrustState

    @property
    def version(self) -> int:
        return self.body.version

    @property
    def root_certificates(self) -> dict[str, x509.Certificate]:
        return {
            r.fingerprint: x509.load_der_x509_certificate(r.certificate_der)
            for r in self.body.roots
        }

    @property
    def root_fingerprints(self) -> list[str]:
        return [r.fingerprint for r in self.body.roots]

    @property
    def issue_time(self) -> datetime.datetime:
        return self.body.issue_time.ToDatetime(tzinfo=datetime.UTC)

    def roots_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.root_certificates.values()
        )

    def serialize(self) -> bytes:
        return self.signed.SerializeToString()


def _parse(signed: trust_state_pb2.SignedTrustState) -> trust_state_pb2.TrustStateBody:
    try:
        body = trust_state_pb2.TrustStateBody.FromString(signed.body)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise TrustStateError(f"the trust state does not parse: {exc}") from None
    for root in body.roots:
        try:
            cert = x509.load_der_x509_certificate(root.certificate_der)
            found = key_fingerprint(cert)
        except UNPARSED:
            raise TrustStateError(
                f"root {root.fingerprint[:64]} has no valid certificate"
            ) from None
        if found != root.fingerprint:
            raise TrustStateError(f"root {root.fingerprint} does not match its certificate")
    try:
        body.issue_time.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        raise TrustStateError("the trust state's issue time is not a valid time") from None
    return body


def accept(
    signed: trust_state_pb2.SignedTrustState,
    trusted_roots: dict[str, x509.Certificate] | None,
    pinned: Iterable[str] = (),
    held_version: int = 0,
) -> TrustState:
    """Verify one version against the roots trusted so far (or pinned fingerprints)."""
    body = _parse(signed)
    if body.version <= held_version:
        raise TrustStateError(
            f"trust state version {body.version} is not newer than the held version "
            f"{held_version} (a rollback or a replay)"
        )
    pinned = {p.lower().removeprefix("sha256:") for p in pinned}
    if trusted_roots is None:
        # First contact: the signer must be a pinned root, and its certificate comes
        # from the document itself (it matches the pinned fingerprint).
        own = {r.fingerprint: x509.load_der_x509_certificate(r.certificate_der) for r in body.roots}
        trusted_roots = {fp: c for fp, c in own.items() if fp in pinned}
        if not trusted_roots:
            raise TrustStateError(
                "none of the trust state's roots matches the pinned fingerprint "
                f"({', '.join(sorted(pinned)) or 'none given'})"
            )
    revoked = set(body.revoked_root_fingerprints)
    data = TRUST_STATE_CONTEXT + signed.body
    for signature in signed.signatures:
        cert = trusted_roots.get(signature.root_fingerprint)
        if cert is None or signature.root_fingerprint in revoked:
            continue
        if verify_signature(cert.public_key(), signature.signature, data):
            return TrustState(body, signed)
    raise TrustStateError(
        f"trust state version {body.version} is not signed by any root this component "
        "trusts; it may be forged, or this component missed a root rotation (get a new "
        "init bundle)"
    )


def follow(
    current: TrustState | None,
    versions: Iterable[trust_state_pb2.SignedTrustState],
    pinned: Iterable[str] = (),
) -> TrustState:
    """Walk `versions` (oldest first) from `current`; return the newest verified one."""
    state = current
    for signed in versions:
        state = accept(
            signed,
            state.root_certificates if state is not None else None,
            pinned,
            state.version if state is not None else 0,
        )
    if state is None:
        raise TrustStateError("the server sent no trust state")
    return state


def decode_file(data: bytes) -> trust_state_pb2.SignedTrustState:
    """A signed trust state in any of the forms keyplane writes: the binary that
    `trust-state show --out` writes, the JSON that `trust-state show --json` prints (its
    `signed` field holds the binary, base64), or SignedTrustState in protobuf's JSON
    mapping. TrustStateError, saying which forms it takes, for anything else."""
    forms = (
        "it is neither the binary that 'keyplane trust-state show --out' writes nor the "
        "JSON that 'keyplane trust-state show --json' prints"
    )
    if data.lstrip().startswith(b"{"):
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            # RecursionError: JSON nested deeper than the parser's stack.
            raise TrustStateError(f"the trust state is not valid JSON; {forms}") from None
        if isinstance(document, dict) and isinstance(document.get("signed"), str):
            try:
                data = base64.b64decode(document["signed"], validate=True)
            except (binascii.Error, ValueError):  # ValueError: characters beyond ASCII
                raise TrustStateError("the trust state's 'signed' field is not base64") from None
        else:
            try:
                return json_format.ParseDict(document, trust_state_pb2.SignedTrustState())
            except json_format.ParseError:
                raise TrustStateError(
                    f"the trust state file is JSON of another kind; {forms}"
                ) from None
    try:
        signed = trust_state_pb2.SignedTrustState.FromString(data)
    except Exception:  # protobuf raises DecodeError, a plain Exception subclass
        raise TrustStateError(f"the trust state does not parse; {forms}") from None
    if not signed.body:
        raise TrustStateError(f"the trust state is empty; {forms}")
    return signed


def load(data: bytes, pinned: Iterable[str] = ()) -> TrustState:
    """A trust state from a file written by `keyplane trust-state show --out` (or the
    JSON that `--json` prints: see decode_file).

    With `pinned`, the document must be signed by a pinned root; without, the file is
    trusted as given (the reader fetched it over an authenticated channel).
    """
    signed = decode_file(data)
    pins = list(pinned)
    if pins:
        return accept(signed, None, pins)
    body = _parse(signed)
    return TrustState(body, signed)
