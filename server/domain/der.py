"""Just enough DER to assemble a client certificate from parts, and to find the parts of
an issuer certificate that a client certificate copies.

`cryptography`'s CertificateBuilder re-reads every name and extension object through
Python on each call, which made building cost four times the signature itself. Every
client certificate keyplane issues has the same shape, so `certs.ClientTemplate`
encodes the fixed parts once per issuer and only the serial, validity, subject, key and
names per certificate. The result is the same DER the builder makes
(tests/test_der.py compares them byte for byte).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OBJECT_IDENTIFIER = 0x06
UTF8_STRING = 0x0C
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN_TRUE = b"\x01\x01\xff"

# What cryptography raises for bytes that are not the certificate, CSR or key they claim
# to be: ValueError, InvalidVersion (a version field out of range: a plain Exception) and
# UnsupportedAlgorithm (a key of an algorithm it does not know, read only when asked);
# DuplicateExtension when the extensions, also read only when asked, name one twice.
UNPARSED: tuple[type[Exception], ...] = (
    ValueError,
    x509.InvalidVersion,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
)


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    size = (n.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + n.to_bytes(size, "big")


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))


def integer(value: int) -> bytes:
    """A non-negative INTEGER, minimal, with a leading zero byte when the top bit is set."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(OBJECT_IDENTIFIER, bytes(body))


def time(value: datetime.datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds."""
    value = value.astimezone(datetime.UTC)
    if 1950 <= value.year < 2050:
        return tlv(UTC_TIME, value.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, value.strftime("%Y%m%d%H%M%SZ").encode())


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole bytes (no unused bits)."""
    return tlv(BIT_STRING, b"\x00" + data)


def extension(extension_oid: bytes, value: bytes, critical: bool = False) -> bytes:
    return sequence(extension_oid, BOOLEAN_TRUE if critical else b"", tlv(OCTET_STRING, value))


# -- reading ----------------------------------------------------------------------------


def read(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """The element at `offset`: (tag, where its content starts, where it ends)."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or start + count > len(data):
            raise ValueError("bad DER length")
        size = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + size
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, start, end


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, start of the element, end of the element) of each element in [start, end)."""
    found = []
    while start < end:
        tag, _, element_end = read(data, start)
        found.append((tag, start, element_end))
        start = element_end
    return found


def tbs_fields(certificate_der: bytes) -> list[bytes]:
    """The encoded fields of a certificate's TBSCertificate, version included if present:
    [version?, serial, signature, issuer, validity, subject, spki, extensions?]."""
    _, cert_start, _ = read(certificate_der)
    _, tbs_start, tbs_end = read(certificate_der, cert_start)
    return [certificate_der[s:e] for _, s, e in children(certificate_der, tbs_start, tbs_end)]


def subject_of(certificate_der: bytes) -> bytes:
    """The subject Name of a certificate, exactly as encoded in it."""
    fields = tbs_fields(certificate_der)
    if fields and fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    return fields[4]


def public_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey bits of a SubjectPublicKeyInfo (whole bytes)."""
    _, start, end = read(spki_der)
    parts = children(spki_der, start, end)
    tag, bits_start, _ = parts[1]
    _, content_start, content_end = read(spki_der, bits_start)
    if tag != BIT_STRING or spki_der[content_start] != 0:
        raise ValueError("the key is not a whole-byte BIT STRING")
    return spki_der[content_start + 1 : content_end]
