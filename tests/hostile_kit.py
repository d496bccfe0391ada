"""What the hostile-input matrix sends, and how it tells that nothing changed: CSRs that
lie (a flipped signature bit, another key's SPKI), weak and unsupported keys built with
cryptography or as raw DER (RSA-1024, e = 3, primes close enough for Fermat, P-224,
DSA, an EC point off its curve), damaged PEM and DER, messages from a made-up peer
server, and a snapshot of every table of the state DB and of pki.db."""

from __future__ import annotations

import datetime
import functools
import secrets
import sqlite3
from contextlib import closing
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID

from keyplane.server.domain import der
from keyplane.server.domain.peer_messages import (
    PEER_MESSAGE_CONTEXT,
    commitment,
    trusted_certificate,
)
from keyplane.v1 import trust_service_pb2


def csr_der(
    key: object, cn: str = "hostile", algorithm: hashes.HashAlgorithm | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    signed = builder.sign(key, algorithm or hashes.SHA256())  # type: ignore[arg-type]
    return signed.public_bytes(serialization.Encoding.DER)


def to_pem(data: bytes, label: str = "CERTIFICATE REQUEST") -> bytes:
    import base64

    body = base64.encodebytes(data).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""]
    )


def flip_signature_bit(csr: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped (it still parses)."""
    return csr[:-1] + bytes([csr[-1] ^ 0x01])


def bump_version(csr: bytes) -> bytes:
    """The CSR with its version INTEGER 0 made 16 (it no longer parses as PKCS#10)."""
    at = csr.index(b"\x02\x01\x00")  # the first INTEGER of the request info
    return csr[:at] + b"\x02\x01\x10" + csr[at + 3 :]


def _spki_span(csr: bytes) -> tuple[int, int]:
    """Where the SubjectPublicKeyInfo lies in a DER CSR: [start, end)."""
    _, outer, _ = der.read(csr)
    _, info_start, info_end = der.read(csr, outer)
    fields = der.children(csr, info_start, info_end)  # version, subject, spki, attributes
    _, start, end = fields[2]
    return start, end


def swap_key(csr: bytes, other: ec.EllipticCurvePrivateKey) -> bytes:
    """The CSR with another key's SPKI in place of its own: the signature is the first
    key's, so proof of possession fails (outer lengths are unchanged: same curve)."""
    start, end = _spki_span(csr)
    spki = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(spki) == end - start
    return csr[:start] + spki + csr[end:]


def off_curve(csr: bytes) -> bytes:
    """A P-256 CSR whose point is moved off the curve (its last byte changed)."""
    _, end = _spki_span(csr)
    last = end - 1
    return csr[:last] + bytes([csr[last] ^ 0x01]) + csr[last + 1 :]


def _probably_prime(n: int, rounds: int = 24) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_prime(n: int) -> int:
    n |= 1
    while not _probably_prime(n):
        n += 2
    return n


def rsa_from_primes(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


@functools.cache
def close_primes_key() -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key whose primes are neighbours: Fermat's method factors it."""
    p = _next_prime((3 << 1022) + secrets.randbits(1000))  # p * q has 2048 bits
    return rsa_from_primes(p, _next_prime(p + 2))


@functools.cache
def weak_csrs() -> dict[str, bytes]:
    """Every key keyplane refuses, as a CSR its own key signed (DER)."""
    rsa_1024 = rsa.generate_private_key(65537, 1024)
    e3 = rsa.generate_private_key(3, 2048)
    p224 = ec.generate_private_key(ec.SECP224R1())
    dsa_key = dsa.generate_private_key(2048)
    good = ec.generate_private_key(ec.SECP256R1())
    return {
        "RSA-1024": csr_der(rsa_1024),
        "RSA e=3": csr_der(e3),
        "RSA close primes": csr_der(close_primes_key()),
        "P-224": csr_der(p224),
        "DSA": csr_der(dsa_key),
        "point off the curve": off_curve(csr_der(good)),
    }


def bad_encodings(csr: bytes) -> dict[str, bytes]:
    """One good DER CSR, damaged in the ways a wire or a disk damages it."""
    pem = to_pem(csr)
    return {
        "empty": b"",
        "garbage": secrets.token_bytes(300),
        "truncated DER": csr[: len(csr) // 2],
        "DER with bytes appended": csr + b"\x00\x01",
        "truncated PEM": pem[: len(pem) // 2],
        "PEM without its end line": pem.split(b"-----END")[0],
        "PEM with bad base64": pem.replace(pem[40:48], b"!!!!****"),
        "a certificate, not a CSR": to_pem(csr, "CERTIFICATE"),
        "oversized": csr + b"\x00" * (70 * 1024),
        "a bit flipped in the signature": flip_signature_bit(csr),
        # cryptography's InvalidVersion is not a ValueError: it once escaped as INTERNAL.
        "a version past v1": bump_version(csr),
        "another key's SPKI": swap_key(csr, ec.generate_private_key(ec.SECP256R1())),
    }


# When the holders of certificates were last seen: any admitted caller is seen, whatever
# its call then answers (written in batches), so it is not a change the call made.
LIVENESS_TABLES = ("certificate_sightings",)
# Likewise each key's signature count and last use (counted in memory, written in
# batches): a read a refused call made of the key is not a change it made.
LIVENESS_COLUMNS = {("keys", "signatures"), ("keys", "last_used_at")}


def db_state(path: Path, skip_meta: tuple[str, ...] = ()) -> dict[str, object]:
    """Every table of an SQLite file: row count, highest rowid and a digest of the rows
    (so an UPDATE shows too); meta rows by name (but `skip_meta`)."""
    found: dict[str, object] = {}
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            if table in LIVENESS_TABLES:
                continue
            if table == "meta":
                found[table] = sorted(
                    (n, v)
                    for n, v in db.execute("SELECT name, value FROM meta")
                    if n not in skip_meta
                )
                continue
            columns = [
                r[1]
                for r in db.execute(f"PRAGMA table_info({table})")
                if (table, r[1]) not in LIVENESS_COLUMNS
            ]
            listed = ", ".join(columns)
            try:
                rows = db.execute(f"SELECT {listed} FROM {table} ORDER BY rowid").fetchall()  # noqa: S608
            except sqlite3.OperationalError:  # a WITHOUT ROWID table: by its primary key
                rows = db.execute(f"SELECT {listed} FROM {table} ORDER BY 1").fetchall()  # noqa: S608
            found[table] = (len(rows), rows[-1][0] if rows else None, hash(tuple(rows)))
    return found


def server_state(data_dir: Path) -> dict[str, object]:
    """What a refused call must leave as it was: keyplane.db (its audit log but for the
    refusals it records, which move audit_head) and pki.db."""
    state = db_state(data_dir / "keyplane.db", skip_meta=("audit_head",))
    with closing(
        sqlite3.connect(f"{(data_dir / 'keyplane.db').resolve().as_uri()}?mode=ro", uri=True)
    ) as db:
        state["audit"] = db.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM audit WHERE outcome != 'refused'"
        ).fetchone()[0]
    state["pki.db"] = db_state(data_dir / "pki.db")
    return state


def self_signed_root(
    key: ec.EllipticCurvePrivateKey, name: str = "peer.test root"
) -> x509.Certificate:
    """A CA certificate of `key`, signed by itself: a made-up peer server's root."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def peer_message(
    kind: int,
    recipient: str,
    *,
    sent: datetime.datetime | None = None,
    roots: int = 1,
    flip: bool = False,
    **fields: object,
) -> trust_service_pb2.SignedPeerMessage:
    """A message of `kind` from a made-up peer (peer.test) to `recipient`, signed by each
    of its `roots` (an offer's shape: roots, addresses, a commitment), sent `sent` (now);
    `flip` flips a bit of each signature. `fields` override the body's."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(roots)]
    entries = [trusted_certificate(self_signed_root(k), "peer.test root") for k in keys]
    body = trust_service_pb2.PeerMessageBody(
        kind=kind,  # type: ignore[arg-type]
        request_id=secrets.token_hex(16),
        sender_fqdn="peer.test",
        recipient_fqdn=recipient,
        roots=entries,
        listen="127.0.0.1:9",
        bootstrap_listen="127.0.0.1:9",
        commitment=commitment(secrets.token_bytes(32), [e.fingerprint for e in entries]),
    )
    for name, value in fields.items():
        setattr(body, name, value)
    body.send_time.FromDatetime(sent or datetime.datetime.now(datetime.UTC))
    data = body.SerializeToString(deterministic=True)
    signed = trust_service_pb2.SignedPeerMessage(body=data)
    for key, entry in zip(keys, entries, strict=True):
        signature = bytearray(key.sign(PEER_MESSAGE_CONTEXT + data, ec.ECDSA(hashes.SHA256())))
        if flip:
            signature[-1] ^= 1
        signed.signatures.add(root_fingerprint=entry.fingerprint, signature=bytes(signature))
    return signed


def with_san_twice(cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey) -> bytes:
    """`cert` (DER) with its SubjectAlternativeName twice, signed again by its issuer: a
    certificate cryptography parses, but whose extensions it refuses when read."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    placeholder = x509.ObjectIdentifier("2.5.29.99")  # same length as 2.5.29.17
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(
        x509.UnrecognizedExtension(placeholder, san.public_bytes()), critical=False
    )
    made = builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    _, outer, end = der.read(made)
    (_, t0, t1), (_, a0, a1), _ = der.children(made, outer, end)
    tbs = made[t0:t1].replace(der.oid("2.5.29.99"), der.oid("2.5.29.17"))
    signature = issuer_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der.sequence(tbs, made[a0:a1], der.bit_string(signature))
