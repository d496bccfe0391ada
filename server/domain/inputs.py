"""Checks of the values people type (fingerprints, reasons), shared by every change."""

from __future__ import annotations

import re

from keyplane.server.errors import InvalidArgument

MAX_REASON_LENGTH = 1024
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def parse_fingerprint(text: str) -> str:
    """Normalise a key fingerprint: 64 hex digits, optionally prefixed `sha256:`."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:")
    if not _FINGERPRINT.fullmatch(value):
        raise InvalidArgument(
            "a fingerprint is 64 hex digits (SHA-256 of the key's SubjectPublicKeyInfo), "
            "optionally prefixed 'sha256:'"
        )
    return value


def parse_reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise InvalidArgument("give a reason for the revocation (it is kept in the audit log)")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    if any(ord(c) < 32 and c not in "\t" for c in reason):
        raise InvalidArgument("the reason must not contain control characters or line breaks")
    return reason
