"""Client certificates from a per-issuer template (see der.py), and the parts every
certificate keyplane issues shares with it: names, serials, the backdated not-before,
the role SAN and the CRL distribution point."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyplane.plugins.keys import BackendPrivateKey, PublicKey, algorithm_of
from keyplane.server.domain import der

# What a component's certificate may certify: any key keyplane accepts in a CSR.
SubjectKey = PublicKey | ed25519.Ed25519PublicKey

# Every certificate is valid from this long before it was made, so that a client whose
# clock is behind (by up to this much) accepts one made just now: a server's TLS
# certificate at its first start or right after a rotation, an agent's renewal.
BACKDATE = datetime.timedelta(minutes=10)
ROLE_URI_PREFIX = "urn:keyplane:role:"
ORGANIZATION = "keyplane"


def new_serial() -> int:
    """A 128-bit random serial number (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def name_of(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
    """The CRL distribution point extension naming one URL (RFC 5280 4.2.1.13)."""
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


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
_OID_CDP = der.oid("2.5.29.31")
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
    """One name attribute as name_of() encodes it: a SET of one, the value a UTF8String."""
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
        self._fixed: dict[
            tuple[str, tuple[str, ...], bool, bool, str | None], tuple[bytes, bytes, bytes]
        ] = {}

    def _parts(
        self,
        role: str,
        names: tuple[str, ...],
        server_auth: bool,
        is_rsa: bool,
        crl_url: str | None,
    ) -> tuple[bytes, bytes, bytes]:
        """What does not change between certificates of one kind: the extensions before
        the SKI, those after it, and the subject's O and OU."""
        key = (role, names, server_auth, is_rsa, crl_url)
        found = self._fixed.get(key)
        if found is None:
            usages = (_SERVER_AUTH + _CLIENT_AUTH) if server_auth else _CLIENT_AUTH
            san = der.tlv(0x86, (ROLE_URI_PREFIX + role).encode("ascii"))
            san += b"".join(_general_name(n) for n in dict.fromkeys(names))
            found = (
                _BASIC_CONSTRAINTS_LEAF + (_KEY_USAGE_SIGN_ENCIPHER if is_rsa else _KEY_USAGE_SIGN),
                self._aki
                + der.extension(_OID_EKU, der.sequence(usages))
                + der.extension(_OID_SAN, der.sequence(san))
                + (
                    der.extension(_OID_CDP, crl_distribution_points(crl_url).public_bytes())
                    if crl_url
                    else b""
                ),
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
        crl_url: str | None = None,
    ) -> x509.Certificate:
        leaf = self.issue_leaf(
            public_key, common_name, role, now, validity, names, server_auth, crl_url
        )
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
        crl_url: str | None = None,
    ) -> ClientLeaf:
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ski = hashlib.sha1(der.public_key_bits(spki)).digest()  # noqa: S324 - RFC 5280 key id
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        not_before, not_after = now - BACKDATE, min(now + validity, self._issuer_not_after)
        if not_after < not_before:  # as CertificateBuilder refuses it
            raise ValueError("the issuer's certificate expires before the new one would start")
        head, tail, unit_rdns = self._parts(role, tuple(names or ()), server_auth, is_rsa, crl_url)
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
    """The RFC 4514 string of name_of(common_name, unit); values with characters RFC 4514
    escapes go through cryptography."""
    if _PLAIN.fullmatch(common_name) and _PLAIN.fullmatch(unit):
        return f"CN={common_name},OU={unit},O={ORGANIZATION}"
    return name_of(common_name, unit).rfc4514_string()
