"""X.509 v2 CRLs, one copy of the rules for the server and every zone: the reason codes
keyplane records, the URL layout (`<base>/crl/<issuer fingerprint>.crl`), the CRL
number (it only grows, across restarts and restores), when a CRL is re-signed, and the
CRL itself, signed by its issuer's key through whatever backend holds it."""

from __future__ import annotations

import datetime
import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.plugins.keys import BackendPrivateKey, algorithm_of
from keyplane.server.domain.client_template import BACKDATE

CRL_BASE_URL_SETTING = "PKICRLBaseURL"
CRL_VALIDITY_SETTING = "PKICRLValidityHours"
DEFAULT_VALIDITY_HOURS = 24
MAX_VALIDITY_HOURS = 24 * 31
MAX_BASE_URL = 512
CONTENT_TYPE_DER = "application/pkix-crl"
CONTENT_TYPE_PEM = "application/x-pem-file"

# RFC 5280 5.3.1 CRLReason codes keyplane records. certificateHold and removeFromCRL
# are left out: a keyplane revocation is for good.
UNSPECIFIED = 0
KEY_COMPROMISE = 1
CA_COMPROMISE = 2
AFFILIATION_CHANGED = 3
SUPERSEDED = 4
CESSATION_OF_OPERATION = 5
PRIVILEGE_WITHDRAWN = 9
AA_COMPROMISE = 10
REASON_NAMES = {
    "unspecified": UNSPECIFIED,
    "keyCompromise": KEY_COMPROMISE,
    "cACompromise": CA_COMPROMISE,
    "affiliationChanged": AFFILIATION_CHANGED,
    "superseded": SUPERSEDED,
    "cessationOfOperation": CESSATION_OF_OPERATION,
    "privilegeWithdrawn": PRIVILEGE_WITHDRAWN,
    "aACompromise": AA_COMPROMISE,
}
_FLAGS = {
    KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    SUPERSEDED: x509.ReasonFlags.superseded,
    CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
    AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
}
_BY_LOWER = {name.lower(): code for name, code in REASON_NAMES.items()}
_LEADING_NAME = re.compile(r"\s*([A-Za-z]+)\s*(?::|$)")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def reason_code_of(reason: str) -> int:
    """The CRL reason code a revocation's reason text names: an RFC 5280 name at its
    start, alone or before a colon (`keyCompromise: lost laptop`), case aside;
    unspecified otherwise."""
    match = _LEADING_NAME.match(reason)
    if match is None:
        return UNSPECIFIED
    return _BY_LOWER.get(match.group(1).lower(), UNSPECIFIED)


def inherited_reason(cause: int, otherwise: int) -> int:
    """The code of what goes with a revoked issuer: a compromised issuer's certificates
    are revoked for cACompromise, else for `otherwise` (superseded after a root
    rotation, cessationOfOperation for a zone taken down)."""
    return CA_COMPROMISE if cause in (KEY_COMPROMISE, CA_COMPROMISE) else otherwise


def check_base_url(text: str) -> str:
    """A CRL base URL as the setting takes it: empty (no distribution points) or an
    http(s) URL with a host, no credentials, query or fragment; ValueError saying why
    not. A trailing slash is dropped."""
    value = text.strip()
    if not value:
        return ""
    if len(value) > MAX_BASE_URL:
        raise ValueError(f"is longer than {MAX_BASE_URL} characters")
    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be a plain ASCII URL without spaces")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"is not a URL: {value[:80]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, such as http://pki.example.org:8080"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("must not have a query or fragment")
    del port  # parsed only to refuse a bad one
    return value.rstrip("/")


def crl_url(base: str, issuer_fingerprint: str) -> str | None:
    """Where the CRL of the issuer with this fingerprint is published, or None when no
    base URL is set (certificates then carry no distribution point)."""
    return f"{base}/crl/{issuer_fingerprint}.crl" if base else None


def parse_crl_path(path: str) -> tuple[str, str] | None:
    """(issuer fingerprint, "der" | "pem") for `/crl/<fp>.crl` or `/crl/<fp>.pem`."""
    name = path.removeprefix("/crl/")
    if name == path:
        return None
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("crl", "pem") or not _FINGERPRINT.fullmatch(stem):
        return None
    return stem, "der" if suffix == "crl" else "pem"


def next_number(previous: int | None, now: datetime.datetime) -> int:
    """The next CRL number: above the last one, and at least the time in Unix seconds,
    so that it grows across restarts and past a restored backup's numbers too."""
    return max((previous or 0) + 1, int(now.timestamp()))


def due(
    this_update: datetime.datetime, next_update: datetime.datetime, now: datetime.datetime
) -> bool:
    """Whether a CRL is at or past half its life, when it is signed anew."""
    return now >= this_update + (next_update - this_update) / 2


@dataclass(frozen=True)
class Entry:
    """One revoked certificate in a CRL."""

    serial: str  # lowercase hex, as keyplane names serials
    revoked_at: datetime.datetime
    reason_code: int


def digest(issuer_fingerprint: str, entries: Sequence[Entry], validity_hours: int) -> str:
    """What a CRL says, apart from its number and dates: when it changes, it is signed
    anew."""
    text = "\n".join(
        [
            issuer_fingerprint,
            str(validity_hours),
            *sorted(
                f"{e.serial} {e.revoked_at.replace(microsecond=0).isoformat()} {e.reason_code}"
                for e in entries
            ),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()


def build(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    entries: Sequence[Entry],
    number: int,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
) -> bytes:
    """A DER CRL signed by `issuer_key` (the key of `issuer_cert`), its thisUpdate a
    minute before `this_update`: its CRL number and the AKI of the issuer's key, each
    entry with its revocation date and, unless unspecified (RFC 5280 5.3.1: then left
    out), its reason code."""
    try:
        key_id = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        # Backdated as certificates are, so that a verifier whose clock is a little
        # behind does not take a new CRL for one not yet valid.
        .last_update((this_update - BACKDATE).replace(microsecond=0))
        .next_update(next_update.replace(microsecond=0))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(aki, critical=False)
    )
    for entry in sorted(entries, key=lambda e: e.serial):
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(entry.revoked_at.replace(microsecond=0))
        )
        flag = _FLAGS.get(entry.reason_code)
        if flag is not None:
            revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(issuer_key, algorithm_of(issuer_key.public_key()).signature_hash)
    return crl.public_bytes(serialization.Encoding.DER)


def to_pem(der_crl: bytes) -> bytes:
    return x509.load_der_x509_crl(der_crl).public_bytes(serialization.Encoding.PEM)
