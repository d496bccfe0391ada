"""Verifying a signed message against a trust state.

Checks, in order: the payload matches the signed digest; the signature is the signer's;
the signer is a message-signing certificate issued by a root the trust state trusts;
it was valid when the message was signed; neither it nor its root is revoked.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from keyplane.clients.trust import UNPARSED, TrustState, key_fingerprint, verify_signature
from keyplane.v1 import message_signing_service_pb2 as pb

MESSAGE_CONTEXT = b"keyplane-message-v1\0"
# id-kp-documentSigning (RFC 9336): what message-signing certificates carry. The first
# keyplane EKU (an X.667 UUID OID) is still accepted on a certificate that carries it:
# such a certificate is only trusted while it is valid, and none is issued any more.
MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
LEGACY_MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("2.25.167263308521385613718624531546738935541")

# What verify_directly_issued_by raises for a certificate its issuer did not sign.
NOT_ISSUED_BY: tuple[type[Exception], ...] = (*UNPARSED, TypeError, InvalidSignature)


class MessageVerificationError(Exception):
    """The message must not be trusted; the message says why."""


@dataclass(frozen=True)
class VerifiedMessage:
    """Who signed a payload, and when."""

    signer_fingerprint: str
    signer_subject: str
    root_fingerprint: str
    signed_at: datetime.datetime
    trust_state_version: int


def verify_message(payload: bytes, signed: pb.SignedMessage, trust: TrustState) -> VerifiedMessage:
    try:
        content = pb.MessageSignatureContent.FromString(signed.content)
    except Exception:  # protobuf's DecodeError
        raise MessageVerificationError(
            "the signature file is damaged (content does not parse)"
        ) from None
    if hashlib.sha256(payload).digest() != content.payload_sha256 or (
        len(payload) != content.payload_size
    ):
        raise MessageVerificationError("the payload does not match its signature (tampered)")
    if not signed.certificate_chain:
        raise MessageVerificationError("the signature carries no signer certificate")
    try:
        signer = x509.load_der_x509_certificate(signed.certificate_chain[0])
        signer_fp = key_fingerprint(signer)
    except UNPARSED:
        raise MessageVerificationError("the signer certificate does not parse") from None
    if signer_fp != content.signer_fingerprint:
        raise MessageVerificationError("the signer certificate is not the one that signed")
    if not verify_signature(
        signer.public_key(), signed.signature, MESSAGE_CONTEXT + signed.content
    ):
        raise MessageVerificationError("the signature is not valid for this content (tampered)")
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = x509.ExtendedKeyUsage([])
    except UNPARSED:  # extensions are parsed only now: a duplicate, a malformed one
        raise MessageVerificationError("the signer certificate's extensions do not parse") from None
    if MESSAGE_SIGNING_EKU not in eku and LEGACY_MESSAGE_SIGNING_EKU not in eku:
        raise MessageVerificationError("the signer is not a keyplane message-signing certificate")
    body = trust.body
    if signer_fp in body.revoked_key_fingerprints:
        raise MessageVerificationError(f"the signer key {signer_fp} is revoked")
    if f"{signer.serial_number:032x}" in body.revoked_serials:
        raise MessageVerificationError("the signer certificate is revoked")
    root_fp = ""
    for fp, root in trust.root_certificates.items():
        try:
            signer.verify_directly_issued_by(root)
        except NOT_ISSUED_BY:
            continue
        root_fp = fp
        break
    if not root_fp:
        revoked_roots = set(body.revoked_root_fingerprints)
        issuer_fps = set()
        for der in signed.certificate_chain[1:]:
            try:
                issuer_fps.add(key_fingerprint(x509.load_der_x509_certificate(der)))
            except UNPARSED:
                continue  # a certificate that does not parse names no revoked root
        if issuer_fps & revoked_roots:
            raise MessageVerificationError("the signer's root is revoked")
        raise MessageVerificationError(
            "the signer was not issued by a root this trust state trusts"
        )
    try:
        signed_at = content.signed_at.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        raise MessageVerificationError("the signing time is not a valid time") from None
    if not signer.not_valid_before_utc <= signed_at <= signer.not_valid_after_utc:
        raise MessageVerificationError(
            f"the signer certificate was not valid when the message was signed ({signed_at})"
        )
    return VerifiedMessage(
        signer_fingerprint=signer_fp,
        signer_subject=signer.subject.rfc4514_string(),
        root_fingerprint=root_fp,
        signed_at=signed_at,
        trust_state_version=content.trust_state_version,
    )
