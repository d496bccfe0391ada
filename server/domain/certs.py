"""X.509 builders for every certificate keyplane issues.

Roots are self-signed CA certificates that never expire; leaves carry CA:FALSE, the
right key usage and EKU, SKI/AKI, 128-bit random serials and a not-before backdated
a minute, so that `openssl verify` and `cryptography.x509.verification` accept them.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyplane.plugins.keys import BackendPrivateKey, PublicKey, algorithm_of, fingerprint
from keyplane.server.domain import authority
from keyplane.server.domain.client_template import BACKDATE as BACKDATE
from keyplane.server.domain.client_template import ORGANIZATION as ORGANIZATION
from keyplane.server.domain.client_template import ROLE_URI_PREFIX as ROLE_URI_PREFIX
from keyplane.server.domain.client_template import ClientLeaf as ClientLeaf
from keyplane.server.domain.client_template import (
    ClientTemplate,
    crl_distribution_points,
    new_serial,
)
from keyplane.server.domain.client_template import SubjectKey as SubjectKey
from keyplane.server.domain.client_template import name_of as _name
from keyplane.server.store import CertificateRecord

# RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration date".
NEVER_EXPIRES = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
# Message-signing certificates carry id-kp-documentSigning (RFC 9336), which every
# ASN.1 stack parses. keyplane's first EKU, an X.667 UUID OID (2.25.<uuid>), has an arc
# wider than 64 bits that Go (and so cfssl, step, Vault...) refuses to parse: no new
# certificate carries it, and a server that still uses one rotates it at once.
MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
LEGACY_MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("2.25.167263308521385613718624531546738935541")


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:032x}"


def key_fingerprint(cert: x509.Certificate) -> str:
    """The fingerprint of the certificate's key: SHA-256 of its SubjectPublicKeyInfo."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_pem(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def _key_usage(*, signature: bool, cert_sign: bool, encipher: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_root_certificate(
    key: BackendPrivateKey, name: str, now: datetime.datetime
) -> x509.Certificate:
    """A self-signed root CA certificate for `key`, valid from a minute ago, forever."""
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    subject = _name(name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(NEVER_EXPIRES)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True, cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, algorithm_of(public_key).signature_hash)


def _leaf(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    subject: x509.Name,
    public_key: SubjectKey,
    now: datetime.datetime,
    validity: datetime.timedelta,
    ca: bool = False,
) -> x509.CertificateBuilder:
    """What every certificate under a root shares: validity within the issuer's, serial,
    basic constraints (CA with pathLen 0 for an intermediate), key usage, SKI and AKI."""
    not_after = min(now + validity, issuer_cert.not_valid_after_utc)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    usage = _key_usage(signature=True, cert_sign=ca, encipher=is_rsa and not ca)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )


def _signed(
    builder: x509.CertificateBuilder, issuer_key: BackendPrivateKey, crl_url: str | None
) -> x509.Certificate:
    """Sign, with the CRL distribution point last when the issuer publishes a CRL."""
    if crl_url:
        builder = builder.add_extension(crl_distribution_points(crl_url), critical=False)
    return builder.sign(issuer_key, algorithm_of(issuer_key.public_key()).signature_hash)


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def build_server_tls_certificate(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: PublicKey,
    common_name: str,
    names: list[str],
    now: datetime.datetime,
    validity: datetime.timedelta,
    *,
    crl_url: str | None = None,
) -> x509.Certificate:
    """A TLS server certificate (serverAuth) for a keyplane server's listeners;
    `crl_url`, when given, is its issuer's CRL (a distribution point)."""
    builder = (
        _leaf(issuer_key, issuer_cert, _name(common_name, "server"), public_key, now, validity)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
    )
    return _signed(builder, issuer_key, crl_url)


def build_client_certificate(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: SubjectKey,
    common_name: str,
    role: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
    names: list[str] | None = None,
    server_auth: bool = False,
    crl_url: str | None = None,
) -> x509.Certificate:
    """A TLS client certificate (clientAuth, and serverAuth for a zone server) carrying
    its role as a URI SAN, and `names` as DNS or IP SANs."""
    template = ClientTemplate.for_issuer(issuer_key, issuer_cert)
    if template is not None:
        return template.issue(
            public_key, common_name, role, now, validity, names, server_auth, crl_url
        )
    return build_client_certificate_slowly(
        issuer_key,
        issuer_cert,
        public_key,
        common_name,
        role,
        now,
        validity,
        names,
        server_auth,
        crl_url,
    )


def build_client_certificate_slowly(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: SubjectKey,
    common_name: str,
    role: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
    names: list[str] | None = None,
    server_auth: bool = False,
    crl_url: str | None = None,
) -> x509.Certificate:
    """build_client_certificate through cryptography's CertificateBuilder: for issuers
    the template does not cover, and the reference the template is tested against."""
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_auth:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    san.extend(_san_entries(names or []))
    builder = (
        _leaf(issuer_key, issuer_cert, _name(common_name, role), public_key, now, validity)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )
    return _signed(builder, issuer_key, crl_url)


def client_record(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    issuer_fingerprint: str,
    public_key: SubjectKey,
    common_name: str,
    role: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
    names: list[str] | None = None,
    server_auth: bool = False,
    crl_url: str | None = None,
) -> CertificateRecord:
    """build_client_certificate, straight to the record the state DB keeps of it."""
    template = ClientTemplate.for_issuer(issuer_key, issuer_cert)
    if template is None:
        cert = build_client_certificate_slowly(
            issuer_key,
            issuer_cert,
            public_key,
            common_name,
            role,
            now,
            validity,
            names,
            server_auth,
            crl_url,
        )
        return record_of(cert, role, issuer_fingerprint, now, public_key=public_key)
    leaf = template.issue_leaf(
        public_key, common_name, role, now, validity, names, server_auth, crl_url
    )
    return CertificateRecord(
        serial=f"{leaf.serial:032x}",
        fingerprint=leaf.fingerprint,
        subject=leaf.subject,
        role=role,
        issuer_fingerprint=issuer_fingerprint,
        not_before=leaf.not_before,
        not_after=leaf.not_after,
        certificate_pem=leaf.pem(),
        issued_at=now,
    )


def build_intermediate_certificate(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: SubjectKey,
    common_name: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
    *,
    crl_url: str | None = None,
) -> x509.Certificate:
    """An intermediate CA (pathLen 0) that signs agent certificates and nothing else:
    its EKU is clientAuth only and its name constraints permit no real DNS name or IP
    address (see authority), so no TLS stack takes what it signs for a server's."""
    subject = _name(common_name, "intermediate")
    builder = (
        _leaf(issuer_key, issuer_cert, subject, public_key, now, validity, ca=True)
        .add_extension(authority.INTERMEDIATE_NAME_CONSTRAINTS, critical=True)
        .add_extension(authority.INTERMEDIATE_EKU, critical=False)
    )
    return _signed(builder, issuer_key, crl_url)


def build_message_signing_certificate(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: PublicKey,
    common_name: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
    *,
    crl_url: str | None = None,
) -> x509.Certificate:
    """A message-signing certificate: digitalSignature only, id-kp-documentSigning."""
    subject = _name(common_name, "message-signing")
    builder = _leaf(issuer_key, issuer_cert, subject, public_key, now, validity).add_extension(
        x509.ExtendedKeyUsage([MESSAGE_SIGNING_EKU]), critical=False
    )
    return _signed(builder, issuer_key, crl_url)


def issued_by(cert: x509.Certificate, issuer_pem: str | None) -> bool:
    """Whether the certificate in `issuer_pem` signed `cert`."""
    try:
        cert.verify_directly_issued_by(load_pem(issuer_pem or ""))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def record_of(
    cert: x509.Certificate,
    role: str,
    issuer_fingerprint: str,
    issued_at: datetime.datetime,
    public_key: SubjectKey | None = None,
) -> CertificateRecord:
    """The state DB's record of a certificate keyplane (or a zone server) issued;
    `public_key` is the certificate's, when the caller has it at hand."""
    return CertificateRecord(
        serial=serial_hex(cert),
        fingerprint=fingerprint(public_key or cert.public_key()),  # type: ignore[arg-type]
        subject=cert.subject.rfc4514_string(),
        role=role,
        issuer_fingerprint=issuer_fingerprint,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        certificate_pem=to_pem(cert),
        issued_at=issued_at,
    )


def roles_of(cert: x509.Certificate) -> frozenset[str]:
    """The keyplane roles a certificate carries (URI SANs `urn:keyplane:role:<role>`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(
        uri[len(ROLE_URI_PREFIX) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(ROLE_URI_PREFIX)
    )


def common_name_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
