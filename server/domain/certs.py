"""X.509 builders for every certificate keyplane issues.

Roots are self-signed CA certificates that never expire; leaves carry CA:FALSE, the
right key usage and EKU, SKI/AKI, 128-bit random serials and a not-before backdated
a minute, so that `openssl verify` and `cryptography.x509.verification` accept them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyplane.plugins.keys import BackendPrivateKey, PublicKey, algorithm_of, fingerprint
from keyplane.server.domain import authority, der
from keyplane.server.store import CertificateRecord

# What a component's certificate may certify: any key keyplane accepts in a CSR.
SubjectKey = PublicKey | ed25519.Ed25519PublicKey

# Every certificate is valid from this long before it was made, so that a client whose
# clock is behind (by up to this much) accepts one made just now: a server's TLS
# certificate at its first start or right after a rotation, an agent's renewal.
BACKDATE = datetime.timedelta(minutes=10)
# RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration date".
NEVER_EXPIRES = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
ROLE_URI_PREFIX = "urn:keyplane:role:"
# Message-signing certificates carry id-kp-documentSigning (RFC 9336), which every
# ASN.1 stack parses. keyplane's first EKU, an X.667 UUID OID (2.25.<uuid>), has an arc
# wider than 64 bits that Go (and so cfssl, step, Vault...) refuses to parse: no new
# certificate carries it, and a server that still uses one rotates it at once.
MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
LEGACY_MESSAGE_SIGNING_EKU = x509.ObjectIdentifier("2.25.167263308521385613718624531546738935541")
ORGANIZATION = "keyplane"


def new_serial() -> int:
    """A 128-bit random serial number (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


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


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


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
) -> x509.Certificate:
    """A TLS server certificate (serverAuth) for a keyplane server's listeners."""
    builder = (
        _leaf(issuer_key, issuer_cert, _name(common_name, "server"), public_key, now, validity)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
    )
    algorithm = algorithm_of(issuer_key.public_key())
    return builder.sign(issuer_key, algorithm.signature_hash)


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
) -> x509.Certificate:
    """A TLS client certificate (clientAuth, and serverAuth for a zone server) carrying
    its role as a URI SAN, and `names` as DNS or IP SANs."""
    template = ClientTemplate.for_issuer(issuer_key, issuer_cert)
    if template is not None:
        return template.issue(public_key, common_name, role, now, validity, names, server_auth)
    return build_client_certificate_slowly(
        issuer_key, issuer_cert, public_key, common_name, role, now, validity, names, server_auth
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
    algorithm = algorithm_of(issuer_key.public_key())
    return builder.sign(issuer_key, algorithm.signature_hash)


_OID_ORGANIZATION = der.oid("2.5.4.10")
_OID_UNIT = der.oid("2.5.4.11")
_OID_COMMON_NAME = der.oid("2.5.4.3")
_BASIC_CONSTRAINTS_LEAF = der.extension(der.oid("2.5.29.19"), der.sequence(), critical=True)
_KEY_USAGE_SIGN = der.extension(der.oid("2.5.29.15"), b"\x03\x02\x07\x80", critical=True)
# digitalSignature and keyEncipherment (bits 0 and 2), for RSA subject keys.
_KEY_USAGE_SIGN_ENCIPHER = der.extension(der.oid("2.5.29.15"), b"\x03\x02\x05\xa0", critical=True)
_OID_SKI = der.oid("2.5.29.14")
_OID_AKI = der.oid("2.5.29.35")
_OID_EKU = der.oid("2.5.29.37")
_OID_SAN = der.oid("2.5.29.17")
_CLIENT_AUTH = der.oid(ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string)
_SERVER_AUTH = der.oid(ExtendedKeyUsageOID.SERVER_AUTH.dotted_string)
_VERSION_3 = der.tlv(0xA0, der.integer(2))
_ECDSA_WITH = {
    "sha256": der.sequence(der.oid("1.2.840.10045.4.3.2")),
    "sha384": der.sequence(der.oid("1.2.840.10045.4.3.3")),
}
_RSA_WITH = {
    "sha256": der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00"),
    "sha384": der.sequence(der.oid("1.2.840.113549.1.1.12"), b"\x05\x00"),
}
_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def _rdn(attribute: bytes, value: str) -> bytes:
    """One name attribute as _name() encodes it: a SET of one, the value a UTF8String."""
    return der.tlv(der.SET, der.sequence(attribute, der.tlv(der.UTF8_STRING, value.encode())))


# The SKI extension up to its 20-byte key id (SHA-1): OID 2.5.29.14, OCTET STRING {
# OCTET STRING (20) }.
_SKI_PREFIX = b"\x30\x1d" + der.oid("2.5.29.14") + b"\x04\x16\x04\x14"


# Templates by (issuer key object, issuer certificate); a template holds its key, so the
# key's id cannot be reused while the entry exists.
_TEMPLATES: dict[tuple[int, x509.Certificate], ClientTemplate] = {}


def _general_name(name: str) -> bytes:
    try:
        return der.tlv(0x87, ipaddress.ip_address(name).packed)
    except ValueError:
        pass
    try:
        return der.tlv(0x82, name.encode("ascii"))
    except UnicodeEncodeError:
        raise ValueError(f"{name!r} is not an ASCII (A-label) DNS name") from None


class ClientTemplate:
    """A client certificate's fixed parts for one issuer, DER-encoded once: issuer name,
    signature algorithm, AKI, basic constraints. `issue` adds the rest and signs."""

    def __init__(self, issuer_key: BackendPrivateKey, issuer_cert: x509.Certificate) -> None:
        issuer_public = issuer_key.public_key()
        hash_algorithm = algorithm_of(issuer_public).signature_hash
        self._hash = _HASHES[hash_algorithm.name]
        if isinstance(issuer_public, ec.EllipticCurvePublicKey):
            self._algorithm = _ECDSA_WITH[hash_algorithm.name]
        else:
            self._algorithm = _RSA_WITH[hash_algorithm.name]
        self.issuer_key = issuer_key
        self._issuer_name = der.subject_of(issuer_cert.public_bytes(serialization.Encoding.DER))
        key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public).key_identifier
        assert key_id is not None  # noqa: S101 - always set by from_issuer_public_key
        self._aki = der.extension(_OID_AKI, der.sequence(der.tlv(0x80, key_id)))
        self._issuer_not_after = issuer_cert.not_valid_after_utc
        self._ecdsa = ec.ECDSA(self._hash)
        self._fixed: dict[tuple[str, tuple[str, ...], bool, bool], tuple[bytes, bytes, bytes]] = {}

    def _parts(
        self, role: str, names: tuple[str, ...], server_auth: bool, is_rsa: bool
    ) -> tuple[bytes, bytes, bytes]:
        """What does not change between certificates of one kind: the extensions before
        the SKI, those after it, and the subject's O and OU."""
        key = (role, names, server_auth, is_rsa)
        found = self._fixed.get(key)
        if found is None:
            usages = (_SERVER_AUTH + _CLIENT_AUTH) if server_auth else _CLIENT_AUTH
            san = der.tlv(0x86, (ROLE_URI_PREFIX + role).encode("ascii"))
            san += b"".join(_general_name(n) for n in dict.fromkeys(names))
            found = (
                _BASIC_CONSTRAINTS_LEAF + (_KEY_USAGE_SIGN_ENCIPHER if is_rsa else _KEY_USAGE_SIGN),
                self._aki
                + der.extension(_OID_EKU, der.sequence(usages))
                + der.extension(_OID_SAN, der.sequence(san)),
                _rdn(_OID_ORGANIZATION, ORGANIZATION) + _rdn(_OID_UNIT, role),
            )
            if len(self._fixed) >= 256:
                self._fixed.clear()
            self._fixed[key] = found
        return found

    @classmethod
    def for_issuer(
        cls, issuer_key: BackendPrivateKey, issuer_cert: x509.Certificate
    ) -> ClientTemplate | None:
        """The template for this issuer (made once), or None for issuer keys it does not
        cover (anything but EC P-256/P-384 and RSA with PKCS#1 v1.5)."""
        key = (id(issuer_key), issuer_cert)
        found = _TEMPLATES.get(key)
        if found is not None and found.issuer_key is issuer_key:
            return found
        if not isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            return None
        try:
            template = cls(issuer_key, issuer_cert)
        except (KeyError, ValueError, TypeError):
            return None
        if len(_TEMPLATES) >= 64:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
        return template

    def issue(
        self,
        public_key: SubjectKey,
        common_name: str,
        role: str,
        now: datetime.datetime,
        validity: datetime.timedelta,
        names: list[str] | None,
        server_auth: bool,
    ) -> x509.Certificate:
        leaf = self.issue_leaf(public_key, common_name, role, now, validity, names, server_auth)
        return x509.load_der_x509_certificate(leaf.der)

    def issue_leaf(
        self,
        public_key: SubjectKey,
        common_name: str,
        role: str,
        now: datetime.datetime,
        validity: datetime.timedelta,
        names: list[str] | None,
        server_auth: bool,
    ) -> ClientLeaf:
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ski = hashlib.sha1(der.public_key_bits(spki)).digest()  # noqa: S324 - RFC 5280 key id
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        not_before, not_after = now - BACKDATE, min(now + validity, self._issuer_not_after)
        if not_after < not_before:  # as CertificateBuilder refuses it
            raise ValueError("the issuer's certificate expires before the new one would start")
        head, tail, unit_rdns = self._parts(role, tuple(names or ()), server_auth, is_rsa)
        serial = new_serial()
        tbs = der.sequence(
            _VERSION_3,
            der.integer(serial),
            self._algorithm,
            self._issuer_name,
            der.sequence(der.time(not_before), der.time(not_after)),
            der.tlv(der.SEQUENCE, unit_rdns + _rdn(_OID_COMMON_NAME, common_name)),
            spki,
            der.tlv(0xA3, der.tlv(der.SEQUENCE, head + _SKI_PREFIX + ski + tail)),
        )
        key = self.issuer_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            signature = key.sign(tbs, self._ecdsa)
        else:
            signature = key.sign(tbs, padding.PKCS1v15(), self._hash)
        return ClientLeaf(
            der=der.sequence(tbs, self._algorithm, der.bit_string(signature)),
            serial=serial,
            not_before=not_before.replace(microsecond=0),
            not_after=not_after.replace(microsecond=0),
            subject=_subject_text(common_name, role),
            fingerprint=hashlib.sha256(spki).hexdigest(),
        )


@dataclass(frozen=True)
class ClientLeaf:
    """A client certificate the template made, with what its record needs, so the
    record does not have to parse it back."""

    der: bytes
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    subject: str  # RFC 4514, as x509.Name.rfc4514_string() gives it
    fingerprint: str  # of the subject key: SHA-256 of its SubjectPublicKeyInfo

    def pem(self) -> str:
        text = base64.b64encode(self.der).decode()
        lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
        return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


_PLAIN = re.compile(r"[A-Za-z0-9._@-]+")


def _subject_text(common_name: str, unit: str) -> str:
    """The RFC 4514 string of _name(common_name, unit); values with characters RFC 4514
    escapes go through cryptography."""
    if _PLAIN.fullmatch(common_name) and _PLAIN.fullmatch(unit):
        return f"CN={common_name},OU={unit},O={ORGANIZATION}"
    return _name(common_name, unit).rfc4514_string()


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
        )
        return record_of(cert, role, issuer_fingerprint, now, public_key=public_key)
    leaf = template.issue_leaf(public_key, common_name, role, now, validity, names, server_auth)
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
    return builder.sign(issuer_key, algorithm_of(issuer_key.public_key()).signature_hash)


def build_message_signing_certificate(
    issuer_key: BackendPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: PublicKey,
    common_name: str,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> x509.Certificate:
    """A message-signing certificate: digitalSignature only, id-kp-documentSigning."""
    subject = _name(common_name, "message-signing")
    builder = _leaf(issuer_key, issuer_cert, subject, public_key, now, validity).add_extension(
        x509.ExtendedKeyUsage([MESSAGE_SIGNING_EKU]), critical=False
    )
    return builder.sign(issuer_key, algorithm_of(issuer_key.public_key()).signature_hash)


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
