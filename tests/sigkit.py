"""Known-answer vectors for the signatures keyplane checks itself: one valid signature
per scheme keyplane accepts (ECDSA P-256/SHA-256 and P-384/SHA-384, RSA PKCS#1 v1.5
with SHA-256, Ed25519) and every invalid one made from it systematically: truncated and
extended, each bit flipped, r or s zero, n, or pushed past n (r + n is r modulo n, so
only a range check refuses it), negative, swapped, non-minimal DER, the wrong hash or
padding, the wrong curve or another key, a changed message, Ed25519's S + L. High-S
(n - s) is a valid ECDSA signature; `malleable` lists it apart so a caller can show
that it does not matter where it is checked."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from keyplane.server.domain import der

# Group orders (SEC 2, RFC 8032).
ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77A"
        "ECEC196ACCC52973",
        16,
    ),
}
ED25519_L = 2**252 + 27742317777372353535851937790883648493

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Vectors:
    """For one key: the valid signature over `message`, what is valid but malleated
    (high-S), and the invalid ones by name (each over `message` unless it says)."""

    key: SigningKey
    message: bytes
    valid: bytes
    malleable: dict[str, bytes]
    invalid: dict[str, bytes]


def keyplane_sign(
    key: SigningKey, message: bytes, digest: hashes.HashAlgorithm | None = None
) -> bytes:
    """A signature the way keyplane makes them (the hash that goes with the curve)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        chosen = digest or (hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256())
        return key.sign(message, ec.ECDSA(chosen))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), digest or hashes.SHA256())
    return key.sign(message)


def _integer_minimal_violations(r: int, s: int) -> dict[str, bytes]:
    def raw_int(value_bytes: bytes) -> bytes:
        return der.tlv(der.INTEGER, value_bytes)

    def minimal(v: int) -> bytes:
        return v.to_bytes(v.bit_length() // 8 + 1, "big")

    r_padded = raw_int(b"\x00" + minimal(r))
    s_body = raw_int(minimal(s))
    body = r_padded + s_body
    long_form = bytes((der.SEQUENCE, 0x81, len(body) - 1)) + raw_int(minimal(r)) + s_body
    negative_r = raw_int((-r).to_bytes((r.bit_length() + 8) // 8, "big", signed=True)) + s_body
    return {
        "r with a superfluous leading zero (not DER)": der.tlv(der.SEQUENCE, body),
        "a long-form length where a short one fits (not DER)": long_form,
        "r negative": der.tlv(der.SEQUENCE, negative_r),
        "a trailing byte after the SEQUENCE": der.sequence(raw_int(minimal(r)), s_body) + b"\x00",
    }


def ecdsa_damage(valid: bytes, curve: str) -> dict[str, bytes]:
    """What can be made of a valid ECDSA signature without its key: out-of-range and
    swapped integers, non-minimal DER, and the generic damage (see `damage`)."""
    n = ORDERS[curve]
    r, s = decode_dss_signature(valid)
    return {
        "r = 0": encode_dss_signature(0, s),
        "s = 0": encode_dss_signature(r, 0),
        "r = s = 0": encode_dss_signature(0, 0),
        "r = n": encode_dss_signature(n, s),
        "s = n": encode_dss_signature(r, n),
        "r + n (same residue, past the range)": encode_dss_signature(r + n, s),
        "s + n (same residue, past the range)": encode_dss_signature(r, s + n),
        "r and s swapped": encode_dss_signature(s, r),
        "r = 1, s = 1": encode_dss_signature(1, 1),
        **_integer_minimal_violations(r, s),
        **damage(valid),
    }


def high_s(valid: bytes, curve: str) -> bytes:
    """The other valid ECDSA signature of the same message: (r, n - s)."""
    r, s = decode_dss_signature(valid)
    return encode_dss_signature(r, ORDERS[curve] - s)


def _ecdsa(key: ec.EllipticCurvePrivateKey, message: bytes, valid: bytes) -> Vectors:
    other_curve = ec.SECP384R1() if key.curve.name == "secp256r1" else ec.SECP256R1()
    wrong_hash = hashes.SHA256() if key.curve.name == "secp384r1" else hashes.SHA384()
    invalid = {
        **ecdsa_damage(valid, key.curve.name),
        "the wrong hash": keyplane_sign(key, message, wrong_hash),
        "SHA-1": keyplane_sign(key, message, hashes.SHA1()),  # noqa: S303 - refused, that is the point
        "by a key on the other curve": keyplane_sign(ec.generate_private_key(other_curve), message),
        "by another key on the curve": keyplane_sign(ec.generate_private_key(key.curve), message),
        "over another message": keyplane_sign(key, message + b"!"),
    }
    malleable = {"high-S (n - s)": high_s(valid, key.curve.name)}
    return Vectors(key, message, valid, malleable, invalid)


def _rsa(key: rsa.RSAPrivateKey, message: bytes, valid: bytes) -> Vectors:
    n = key.public_key().public_numbers().n
    size = (n.bit_length() + 7) // 8
    value = int.from_bytes(valid, "big")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    invalid = {
        "s = 0": bytes(size),
        "s = 1": (1).to_bytes(size, "big"),
        "s = n": n.to_bytes(size, "big"),
        "s + n (same residue, past the modulus)": (value + n).to_bytes(size + 1, "big"),
        "one byte longer (a leading zero)": b"\x00" + valid,
        "SHA-384": keyplane_sign(key, message, hashes.SHA384()),
        "SHA-1": keyplane_sign(key, message, hashes.SHA1()),  # noqa: S303 - refused, that is the point
        "PSS, not PKCS#1 v1.5": key.sign(message, pss, hashes.SHA256()),
        "by another key": keyplane_sign(rsa.generate_private_key(65537, key.key_size), message),
        "over another message": keyplane_sign(key, message + b"!"),
    }
    return Vectors(key, message, valid, {}, invalid)


def _ed25519(key: ed25519.Ed25519PrivateKey, message: bytes, valid: bytes) -> Vectors:
    s = int.from_bytes(valid[32:], "little")
    invalid = {
        "S + L (non-canonical S)": valid[:32] + (s + ED25519_L).to_bytes(32, "little"),
        "S = 0": valid[:32] + bytes(32),
        "R the identity, S = 0": b"\x01" + bytes(63),
        "all zero": bytes(64),
        "by another key": ed25519.Ed25519PrivateKey.generate().sign(message),
        "over another message": key.sign(message + b"!"),
    }
    return Vectors(key, message, valid, {}, invalid)


def damage(valid: bytes) -> dict[str, bytes]:
    """Truncations, an appended byte, the empty signature, and each bit flipped."""
    made = {
        "empty": b"",
        "truncated by one byte": valid[:-1],
        "truncated to half": valid[: len(valid) // 2],
        "a byte appended": valid + b"\x00",
    }
    for bit in range(len(valid) * 8):
        flipped = bytearray(valid)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        made[f"bit {bit} flipped"] = bytes(flipped)
    return made


def vectors(key: SigningKey, message: bytes) -> Vectors:
    """Every vector for `key` over `message`, the generic damage included."""
    valid = keyplane_sign(key, message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        made = _ecdsa(key, message, valid)
    elif isinstance(key, rsa.RSAPrivateKey):
        made = _rsa(key, message, valid)
    else:
        made = _ed25519(key, message, valid)
    generic = {} if isinstance(key, ec.EllipticCurvePrivateKey) else damage(valid)
    return Vectors(key, message, valid, made.malleable, {**made.invalid, **generic})


def keys() -> dict[str, SigningKey]:
    """One key of each kind keyplane accepts for a component."""
    return {
        "P-256": ec.generate_private_key(ec.SECP256R1()),
        "P-384": ec.generate_private_key(ec.SECP384R1()),
        "RSA-2048": rsa.generate_private_key(65537, 2048),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
