"""The in-process ceilings: the same crypto work as the server does, with `cryptography`
alone, in one process per core, with no RPC, no database and no event loop."""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import secrets
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.common import default_signals
from keyplane.v1 import message_signing_service_pb2 as signing_pb

_ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyplane"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "intermediate"),
        x509.NameAttribute(NameOID.COMMON_NAME, "bench intermediate"),
    ]
)
_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def issue_one(csr_pem: bytes) -> str:
    """Verify a CSR and issue a client certificate as keyplane does: parse, check the key
    and the proof of possession, build (O/OU/CN, SKI/AKI, KU, EKU, role URI SAN), sign
    with a P-256 issuer key, PEM-encode, fingerprint the subject key."""
    csr = x509.load_pem_x509_csr(csr_pem)
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not csr.is_signature_valid:
        raise ValueError("bad CSR")
    common_name = str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyplane"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "agent"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(_ISSUER_NAME)
        .public_key(key)
        .serial_number(secrets.randbits(128) | 1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=168))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ISSUER_KEY.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:keyplane:role:agent")]
            ),
            critical=False,
        )
    )
    cert = builder.sign(_ISSUER_KEY, hashes.SHA256())
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hashlib.sha256(spki).hexdigest()
    return cert.public_bytes(serialization.Encoding.PEM).decode()


_FINGERPRINT = hashlib.sha256(b"bench message-signing key").hexdigest()


def sign_one(payload: bytes) -> bytes:
    """Sign a payload as keyplane's SignMessage does: the content record (payload digest
    and size, time, trust-state version, signer) with ECDSA P-256 / SHA-256."""
    content = signing_pb.MessageSignatureContent(
        payload_sha256=hashlib.sha256(payload).digest(),
        payload_size=len(payload),
        trust_state_version=7,
        signer_fingerprint=_FINGERPRINT,
    )
    content.signed_at.FromDatetime(datetime.datetime.now(datetime.UTC))
    data = b"keyplane-message-v1\0" + content.SerializeToString(deterministic=True)
    return _ISSUER_KEY.sign(data, ec.ECDSA(hashes.SHA256()))


_WORK: dict[str, Callable[[bytes], object]] = {"issue": issue_one, "sign": sign_one}
_INPUTS: list[bytes] = []


def _worker(job: tuple[str, float, float]) -> tuple[int, float]:
    kind, start_at, duration = job
    work = _WORK[kind]
    inputs = _INPUTS
    while time.time() < start_at:
        time.sleep(0.001)
    count = 0
    began = time.perf_counter()
    deadline = began + duration
    while True:
        work(inputs[count % len(inputs)])
        count += 1
        if not count % 16 and time.perf_counter() >= deadline:
            break
    return count, time.perf_counter() - began


def ceiling(kind: str, inputs: list[bytes], duration: float) -> float:
    """Operations per second of `kind` ("issue" or "sign") over `inputs`, summed over one
    process per core running at once for `duration` seconds."""
    global _INPUTS
    _INPUTS = inputs
    cores = os.cpu_count() or 1
    start_at = time.time() + 0.5
    with multiprocessing.get_context("fork").Pool(cores, default_signals) as pool:
        results = pool.map(_worker, [(kind, start_at, duration)] * cores, chunksize=1)
    return sum(count / elapsed for count, elapsed in results)
