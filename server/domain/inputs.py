"""Checks of the values people type (fingerprints, reasons), shared by every change."""

from __future__ import annotations

import re
from collections.abc import Iterable

from keyplane.server.errors import InvalidArgument, NotFound

MAX_REASON_LENGTH = 1024
# A prefix shorter than this could match keys no one meant; 8 hex digits is what people
# copy from a listing and still one in four billion.
MIN_PREFIX = 8
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(rf"^[0-9a-f]{{{MIN_PREFIX},64}}$")


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


def resolve_fingerprint(text: str, known: Iterable[str], what: str) -> str:
    """The one fingerprint of `known` that `text` names: all 64 hex digits, or an
    unambiguous prefix of at least MIN_PREFIX (optionally prefixed `sha256:`). A full
    fingerprint is returned as given, known or not (the caller says what is missing);
    a prefix matching nothing is NotFound, one matching several InvalidArgument listing
    them. Only for looking up what this server holds: a pin is always all 64 digits."""
    value = text.strip().lower().removeprefix("sha256:")
    if _FINGERPRINT.fullmatch(value):
        return value
    if not _PREFIX.fullmatch(value):
        raise InvalidArgument(
            "a fingerprint is 64 hex digits (SHA-256 of the key's SubjectPublicKeyInfo), "
            f"optionally prefixed 'sha256:', or an unambiguous prefix of at least {MIN_PREFIX}"
        )
    matches = sorted({fp for fp in known if fp.startswith(value)})
    if not matches:
        raise NotFound(f"no {what} has a fingerprint starting {value}")
    if len(matches) > 1:
        raise InvalidArgument(
            f"{value} is the start of {len(matches)} {what} fingerprints "
            f"({', '.join(matches)}); give more digits"
        )
    return matches[0]


def parse_reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise InvalidArgument("give a reason for the revocation (it is kept in the audit log)")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    if any(ord(c) < 32 and c not in "\t" for c in reason):
        raise InvalidArgument("the reason must not contain control characters or line breaks")
    return reason
