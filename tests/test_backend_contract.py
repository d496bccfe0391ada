"""The key-backend contract: every backend (software, pkcs11 on SoftHSM) passes these.

Each case opens the backend through the `KeyBackends` facade over real storage (a pki.db
in a temporary data dir, or the session's SoftHSM token), as the server does.
"""

from __future__ import annotations

import datetime
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from keyplane.plugins.errors import (
    KeyNotFoundError,
    KeyOperationError,
    UnsupportedAlgorithmError,
)
from keyplane.plugins.keys import (
    BackendPrivateKey,
    KeyAlgorithm,
    PublicKey,
    algorithm_of,
    fingerprint,
)
from keyplane.plugins.manager import KeyBackends
from tests.softhsm import SoftHsmToken


@dataclass
class ContractBackend:
    """One backend under test: `keys` is open; `reopen()` opens the same store afresh."""

    name: str
    open_keys: Callable[[], KeyBackends]
    keys: KeyBackends = field(init=False)
    _opened: list[KeyBackends] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = self._open()

    def _open(self) -> KeyBackends:
        opened = self.open_keys()
        self._opened.append(opened)
        return opened

    def reopen(self) -> KeyBackends:
        self.keys.close()
        self.keys = self._open()
        return self.keys

    def generate(self, algorithm: KeyAlgorithm) -> tuple[str, BackendPrivateKey]:
        label = f"contract-{algorithm.value}-{uuid.uuid4().hex[:8]}"
        generated = self.keys.generate_key(self.name, label, algorithm)
        return generated.uri, self.keys.private_key(generated.uri)

    def unknown_uri(self) -> str:
        if self.name == "software":
            return "software:no-such-key"
        return "pkcs11:object=no-such-key;id=%00%11%22%33"

    def close(self) -> None:
        for opened in self._opened:
            opened.close()


@pytest.fixture(
    params=["software", pytest.param("pkcs11", marks=pytest.mark.softhsm)],
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ContractBackend]:
    name: str = request.param
    if name == "software":
        configured: dict[str, dict[str, object]] = {"software": {}}
    else:
        token: SoftHsmToken = request.getfixturevalue("softhsm_token")
        configured = {"pkcs11": token.backend_options(tmp_path)}
    data_dir = tmp_path / "data"
    under_test = ContractBackend(name, lambda: KeyBackends(configured, data_dir))
    try:
        yield under_test
    finally:
        under_test.close()


ALGORITHMS = [
    KeyAlgorithm.EC_P256,
    KeyAlgorithm.EC_P384,
    KeyAlgorithm.RSA_2048,
    KeyAlgorithm.RSA_3072,
    # RSA-4096 is left out: generating it on SoftHSM takes seconds and adds nothing here.
]


def _verify(public_key: PublicKey, signature: bytes, data: bytes, how: SignatureScheme) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(how.hash_algorithm))
    else:
        assert how.padding is not None
        public_key.verify(signature, data, how.padding, how.hash_algorithm)


@dataclass(frozen=True)
class SignatureScheme:
    algorithm: KeyAlgorithm
    hash_algorithm: hashes.HashAlgorithm
    padding: padding.AsymmetricPadding | None = None

    def sign(self, key: BackendPrivateKey, data: bytes) -> bytes:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(self.hash_algorithm))
        assert self.padding is not None
        return key.sign(data, self.padding, self.hash_algorithm)


def _pss(salt_length: int | padding._MaxLength | padding._DigestLength) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


SCHEMES = {
    "ecdsa-p256-sha256": SignatureScheme(KeyAlgorithm.EC_P256, hashes.SHA256()),
    "ecdsa-p256-sha384": SignatureScheme(KeyAlgorithm.EC_P256, hashes.SHA384()),
    "ecdsa-p384-sha384": SignatureScheme(KeyAlgorithm.EC_P384, hashes.SHA384()),
    "ecdsa-p384-sha256": SignatureScheme(KeyAlgorithm.EC_P384, hashes.SHA256()),
    "rsa-pkcs1v15-sha256": SignatureScheme(
        KeyAlgorithm.RSA_2048, hashes.SHA256(), padding.PKCS1v15()
    ),
    "rsa-pkcs1v15-sha384": SignatureScheme(
        KeyAlgorithm.RSA_2048, hashes.SHA384(), padding.PKCS1v15()
    ),
    "rsa-pkcs1v15-sha512": SignatureScheme(
        KeyAlgorithm.RSA_2048, hashes.SHA512(), padding.PKCS1v15()
    ),
    "rsa-pss-sha256-digest-length": SignatureScheme(
        KeyAlgorithm.RSA_2048, hashes.SHA256(), _pss(padding.PSS.DIGEST_LENGTH)
    ),
    "rsa-pss-sha256-max-length": SignatureScheme(
        KeyAlgorithm.RSA_2048, hashes.SHA256(), _pss(padding.PSS.MAX_LENGTH)
    ),
    "rsa-pss-sha384-salt-20": SignatureScheme(
        KeyAlgorithm.RSA_2048,
        hashes.SHA384(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=20),
    ),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_generate_key_returns_uri_and_public_key_of_the_algorithm(
    backend: ContractBackend, algorithm: KeyAlgorithm
) -> None:
    generated = backend.keys.generate_key(backend.name, "generate-test", algorithm)

    assert generated.uri.startswith(f"{backend.name}:")
    assert algorithm_of(generated.public_key) is algorithm
    if algorithm.is_ec:
        assert isinstance(generated.public_key, ec.EllipticCurvePublicKey)
        assert generated.public_key.curve.name == algorithm.curve.name
    else:
        assert isinstance(generated.public_key, rsa.RSAPublicKey)
        assert generated.public_key.key_size == algorithm.rsa_bits
        assert generated.public_key.public_numbers().e == 65537


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=str)
def test_lookup_by_uri_returns_the_generated_key(
    backend: ContractBackend, algorithm: KeyAlgorithm
) -> None:
    generated = backend.keys.generate_key(backend.name, "lookup-test", algorithm)

    private_key = backend.keys.private_key(generated.uri)
    public_key = backend.keys.public_key(generated.uri)

    assert fingerprint(public_key) == fingerprint(generated.public_key)
    assert fingerprint(private_key.public_key()) == fingerprint(generated.public_key)
    assert isinstance(
        private_key,
        ec.EllipticCurvePrivateKey if algorithm.is_ec else rsa.RSAPrivateKey,
    )


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_signature_verifies_with_the_public_key(
    backend: ContractBackend, scheme: SignatureScheme
) -> None:
    uri, key = backend.generate(scheme.algorithm)
    data = b"keyplane contract: " + scheme.hash_algorithm.name.encode()

    signature = scheme.sign(key, data)

    _verify(backend.keys.public_key(uri), signature, data, scheme)
    with pytest.raises(InvalidSignature):
        _verify(backend.keys.public_key(uri), signature, data + b"!", scheme)


@pytest.mark.parametrize(
    "scheme",
    [SCHEMES["ecdsa-p384-sha384"], SCHEMES["rsa-pss-sha256-digest-length"]],
    ids=["ecdsa", "rsa-pss"],
)
def test_prehashed_signature_verifies(backend: ContractBackend, scheme: SignatureScheme) -> None:
    _, key = backend.generate(scheme.algorithm)
    data = b"signed as a precomputed digest"
    digest = hashes.Hash(scheme.hash_algorithm)
    digest.update(data)
    prehashed = utils.Prehashed(scheme.hash_algorithm)

    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(digest.finalize(), ec.ECDSA(prehashed))
    else:
        assert scheme.padding is not None
        signature = key.sign(digest.finalize(), scheme.padding, prehashed)

    _verify(key.public_key(), signature, data, scheme)


def _self_signed_ca(
    key: BackendPrivateKey, hash_algorithm: hashes.HashAlgorithm
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyplane contract root")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hash_algorithm)
    )


def _leaf(ca: x509.Certificate, ca_key: BackendPrivateKey) -> x509.Certificate:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pki.test")]))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("pki.test")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, ca.signature_hash_algorithm)
    )


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048], ids=str
)
def test_self_signed_ca_certificate_verifies_with_openssl(
    backend: ContractBackend, algorithm: KeyAlgorithm, tmp_path: Path
) -> None:
    _, key = backend.generate(algorithm)

    cert = _self_signed_ca(key, algorithm.signature_hash)

    cert.verify_directly_issued_by(cert)
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(pem), str(pem)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
    # The root issues a server certificate that cryptography's verifier accepts.
    leaf = _leaf(cert, key)
    verifier = (
        PolicyBuilder()
        .store(Store([cert]))
        .time(datetime.datetime.now(datetime.UTC))
        .build_server_verifier(x509.DNSName("pki.test"))
    )
    chain = verifier.verify(leaf, [])
    assert chain[-1] == cert


def test_keys_persist_across_close_and_reopen(backend: ContractBackend) -> None:
    uri, _ = backend.generate(KeyAlgorithm.EC_P256)
    before = fingerprint(backend.keys.public_key(uri))

    reopened = backend.reopen()

    key = reopened.private_key(uri)
    assert fingerprint(reopened.public_key(uri)) == before
    signature = key.sign(b"after reopening", ec.ECDSA(hashes.SHA256()))
    _verify(key.public_key(), signature, b"after reopening", SCHEMES["ecdsa-p256-sha256"])


def test_destroyed_key_is_gone(backend: ContractBackend) -> None:
    uri, _ = backend.generate(KeyAlgorithm.EC_P256)

    backend.keys.destroy_key(uri)

    with pytest.raises(KeyNotFoundError):
        backend.keys.private_key(uri)
    with pytest.raises(KeyNotFoundError):
        backend.keys.public_key(uri)
    with pytest.raises(KeyNotFoundError):
        backend.keys.destroy_key(uri)
    # Still gone for a fresh process view of the same store.
    with pytest.raises(KeyNotFoundError):
        backend.reopen().public_key(uri)


def test_destroying_one_key_keeps_the_others(backend: ContractBackend) -> None:
    doomed, _ = backend.generate(KeyAlgorithm.EC_P256)
    kept, _ = backend.generate(KeyAlgorithm.EC_P256)

    backend.keys.destroy_key(doomed)

    key = backend.keys.private_key(kept)
    signature = key.sign(b"still here", ec.ECDSA(hashes.SHA256()))
    _verify(key.public_key(), signature, b"still here", SCHEMES["ecdsa-p256-sha256"])


def test_holds_key_says_whether_the_store_has_the_key(backend: ContractBackend) -> None:
    # What `backup verify` asks each backend about the keys a backup names.
    uri, _ = backend.generate(KeyAlgorithm.EC_P256)
    assert backend.keys.holds_key(uri)
    assert backend.reopen().holds_key(uri)

    backend.keys.destroy_key(uri)

    assert not backend.keys.holds_key(uri)
    assert not backend.keys.holds_key(backend.unknown_uri())


def test_unknown_uri_is_key_not_found(backend: ContractBackend) -> None:
    with pytest.raises(KeyNotFoundError):
        backend.keys.private_key(backend.unknown_uri())
    with pytest.raises(KeyNotFoundError):
        backend.keys.public_key(backend.unknown_uri())
    with pytest.raises(KeyNotFoundError):
        backend.keys.destroy_key(backend.unknown_uri())


def test_unsupported_algorithm_name_is_refused_with_the_choices(backend: ContractBackend) -> None:
    with pytest.raises(UnsupportedAlgorithmError) as excinfo:
        backend.keys.generate_key(backend.name, "dsa", KeyAlgorithm.parse("dsa-1024"))

    message = str(excinfo.value)
    assert "dsa-1024" in message
    assert all(a.value in message for a in KeyAlgorithm)


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=str)
def test_private_key_material_cannot_be_exported(
    backend: ContractBackend, algorithm: KeyAlgorithm
) -> None:
    _, key = backend.generate(algorithm)

    with pytest.raises(KeyOperationError):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(KeyOperationError):
        key.private_numbers()


@pytest.mark.parametrize(
    "scheme",
    [SCHEMES["ecdsa-p256-sha256"], SCHEMES["rsa-pkcs1v15-sha256"]],
    ids=["ecdsa", "rsa"],
)
def test_concurrent_signing_from_eight_threads(
    backend: ContractBackend, scheme: SignatureScheme
) -> None:
    uri, _ = backend.generate(scheme.algorithm)
    key = backend.keys.private_key(uri)

    def sign_many(thread: int) -> list[tuple[bytes, bytes]]:
        messages = [f"thread {thread} message {i}".encode() for i in range(25)]
        return [(m, scheme.sign(key, m)) for m in messages]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [pair for batch in pool.map(sign_many, range(8)) for pair in batch]

    assert len(results) == 200
    public_key = backend.keys.public_key(uri)
    for message, signature in results:
        _verify(public_key, signature, message, scheme)
