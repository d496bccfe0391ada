"""The one small interface every key backend implements, and the key objects it returns.

A backend hands back `cryptography` private-key objects whose `sign()` goes to the
backend, so certificate code (CertificateBuilder.sign and friends) never knows where a
key lives. The objects refuse to export private material.
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Self

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from keyplane.plugins.errors import KeyNotFoundError, KeyOperationError, UnsupportedAlgorithmError

if TYPE_CHECKING:  # what cryptography's signature methods accept
    Buffer = bytes | bytearray | memoryview[int]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
BackendPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyAlgorithm(enum.StrEnum):
    """Key algorithms keyplane generates; the value is the name used in config and URIs."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, name: str) -> KeyAlgorithm:
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise UnsupportedAlgorithmError(
                f"unsupported key algorithm {name[:40]!r}; use one of: {known}"
            ) from None

    @property
    def is_ec(self) -> bool:
        return self in (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384)

    @property
    def rsa_bits(self) -> int:
        return int(self.value.split("-")[1]) if not self.is_ec else 0

    @property
    def curve(self) -> ec.EllipticCurve:
        if self is KeyAlgorithm.EC_P256:
            return ec.SECP256R1()
        if self is KeyAlgorithm.EC_P384:
            return ec.SECP384R1()
        raise UnsupportedAlgorithmError(f"{self.value} is not an elliptic-curve algorithm")

    @property
    def signature_hash(self) -> hashes.SHA256 | hashes.SHA384:
        """The hash keyplane signs certificates with for this key algorithm."""
        return hashes.SHA384() if self is KeyAlgorithm.EC_P384 else hashes.SHA256()


def algorithm_of(public_key: object) -> KeyAlgorithm:
    """The KeyAlgorithm of a public key; UnsupportedAlgorithmError for any other key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
        if public_key.curve.name in by_curve:
            return by_curve[public_key.curve.name]
    if isinstance(public_key, rsa.RSAPublicKey):
        by_size = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}
        by_size[4096] = KeyAlgorithm.RSA_4096
        if public_key.key_size in by_size:
            return by_size[public_key.key_size]
    raise UnsupportedAlgorithmError(f"unsupported public key type {type(public_key).__name__}")


def fingerprint(public_key: PublicKey | ed25519.Ed25519PublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex: the id of every key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class GeneratedKey:
    """What a backend returns for a new key: where it lives and its public half."""

    uri: str
    public_key: PublicKey


# Signs a digest made with `hash_algorithm`; returns the signature in X.509 form
# (DER ECDSA-Sig-Value for EC, the raw block for RSA). `padding` is None for EC.
DigestSigner = Callable[[bytes, hashes.HashAlgorithm, AsymmetricPadding | None], bytes]


# hashlib's own constructors: quicker than a Hash for short inputs, and than hashlib.new.
_HASHLIB = {
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}


def _digest(
    data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed
) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        return data, algorithm._algorithm
    hashlib_hash = _HASHLIB.get(algorithm.name)
    if hashlib_hash is not None:
        return hashlib_hash(data).digest(), algorithm
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


def _refuse_export() -> NoReturn:
    raise KeyOperationError("private key material never leaves its backend")


class _HeldKey:
    """What both backend key classes share: no export, and copies are the same key."""

    uri: str

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse_export()

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


class BackendECKey(_HeldKey, ec.EllipticCurvePrivateKey):
    """An EC private key held by a backend: signs through it, never exports."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, signer: DigestSigner, uri: str):
        self._public_key = public_key
        self._signer = signer
        self.uri = uri

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithmError("EC keys sign with ECDSA only")
        digest, hash_algorithm = _digest(bytes(data), signature_algorithm.algorithm)
        return self._signer(digest, hash_algorithm, None)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithmError("keyplane keys sign only; key exchange is not offered")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse_export()

    def __repr__(self) -> str:
        return f"<BackendECKey {self.uri} {self.curve.name}>"


class BackendRSAKey(_HeldKey, rsa.RSAPrivateKey):
    """An RSA private key held by a backend: signs through it, never exports or decrypts."""

    def __init__(self, public_key: rsa.RSAPublicKey, signer: DigestSigner, uri: str):
        self._public_key = public_key
        self._signer = signer
        self.uri = uri

    def sign(
        self,
        data: Buffer,
        padding: AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
    ) -> bytes:
        if not isinstance(padding, _RSA_PADDINGS):
            raise UnsupportedAlgorithmError("RSA keys sign with PKCS#1 v1.5 or PSS padding only")
        if isinstance(algorithm, utils.NoDigestInfo):
            raise UnsupportedAlgorithmError("RSA keys sign a digest with its DigestInfo only")
        digest, hash_algorithm = _digest(bytes(data), algorithm)
        return self._signer(digest, hash_algorithm, padding)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithmError("keyplane keys sign only; decryption is not offered")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse_export()

    def __repr__(self) -> str:
        return f"<BackendRSAKey {self.uri} {self.key_size}>"


_RSA_PADDINGS = (padding.PKCS1v15, padding.PSS)


def backend_private_key(public_key: PublicKey, signer: DigestSigner, uri: str) -> BackendPrivateKey:
    """Wrap a backend's signing function as the matching `cryptography` private key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return BackendECKey(public_key, signer, uri)
    return BackendRSAKey(public_key, signer, uri)


class TlsKeySource(abc.ABC):
    """A backend that can hand a key to this process's TLS stack.

    gRPC's TLS stack takes a PEM private key and cannot call a backend to sign, so
    the keys of the server's own TLS listeners must come from a backend that
    implements this (the software backend). The PEM stays in process memory.
    """

    @abc.abstractmethod
    def tls_private_key_pem(self, uri: str) -> bytes:
        """The key at `uri` as unencrypted PKCS#8 PEM, for the in-process TLS stack only."""


class SecretStore(abc.ABC):
    """A backend that also keeps small secrets (protected settings) sealed, and whose
    seal can be re-keyed under a new password."""

    @abc.abstractmethod
    def store_secret(self, name: str, value: bytes) -> None:
        """Seal `value` under `name`, replacing any previous value."""

    @abc.abstractmethod
    def load_secret(self, name: str) -> bytes | None:
        """The secret stored under `name`, or None."""

    @abc.abstractmethod
    def change_password(
        self,
        new_password: bytes,
        store_as: str | None = None,
        checkpoint: Callable[[str], None] = lambda point: None,
    ) -> None:
        """Re-seal everything under a key derived from `new_password`, atomically, and
        put the new password where the next start reads it, in an order no crash can
        lock out; also seal `new_password` under `store_as` in the same transaction.
        `checkpoint(point)` is called after each step (tests kill the process there).
        PasswordSinkError, changing nothing, when there is nowhere to put the password."""


@dataclass(frozen=True)
class BackedUpStore:
    """What a backend copied into a backup: its file; how its keys are sealed ("password",
    or "keyfile": then `key_file` names the file beside it that holds the key-encryption
    key, which no backup carries); the URIs of the keys the copy holds; and those it
    left out because no record names them."""

    backend: str
    file_name: str
    seal: str
    key_file: str | None
    key_uris: tuple[str, ...]
    left_out: tuple[str, ...]


class BackupSource(abc.ABC):
    """A backend whose keys live in a file of the data dir, which a backup carries as it
    is: sealed (an HSM's keys never leave the token, so such a backend is no source)."""

    @abc.abstractmethod
    def backup_into(self, directory: Path, recorded: Collection[str]) -> BackedUpStore:
        """Copy the key store into `directory` as one consistent file (keys still sealed,
        no key-encryption key with them), leaving out keys whose URI is not in `recorded`:
        a key generated but not yet recorded (or left by a crash) was never usable."""


class KeyBackend(abc.ABC):
    """One configured key store. `keyplane_open_backend` returns one; the facade routes to it.

    Every method raises a `keyplane.plugins.errors.BackendError` subclass on failure,
    never an exception that carries key material.
    """

    #: The backend's name in configuration, and the scheme of the URIs it issues.
    name: str

    @abc.abstractmethod
    def generate_key(
        self, label: str, algorithm: KeyAlgorithm, uri: str | None = None
    ) -> GeneratedKey:
        """Create a new key pair in the backend; `label` is a human-readable name. With
        `uri` (one new_key_uri gave for this label), the key gets that URI."""

    def lost(self) -> str | None:
        """Why this backend can no longer reach its keys in this process (a token that
        was taken away cannot be opened again without starting the process again), or
        None. A server that sees it says NOT_SERVING and exits, to be restarted."""
        return None

    def new_key_uri(self, label: str) -> str | None:
        """A fresh URI, naming no key yet, that generate_key(label, algorithm, uri) will
        give the key it makes: so that a caller can record its intent to make the key
        before the key exists, and destroy the key if it crashes before recording it.
        None (the default): this backend names a key only as it makes it."""
        return None

    @abc.abstractmethod
    def private_key(self, uri: str) -> BackendPrivateKey:
        """A signing handle for the key at `uri`; KeyNotFoundError if there is none."""

    @abc.abstractmethod
    def public_key(self, uri: str) -> PublicKey:
        """The public half of the key at `uri`; KeyNotFoundError if there is none."""

    @abc.abstractmethod
    def destroy_key(self, uri: str) -> None:
        """Destroy the key at `uri` for good; KeyNotFoundError if there is none."""

    def holds_key(self, uri: str) -> bool:
        """Whether the backend holds the key at `uri` now, looked up in its storage (not
        in a cache); backends whose lookups cache override this."""
        try:
            self.public_key(uri)
        except KeyNotFoundError:
            return False
        return True

    def check(self) -> None:
        """Whether the backend can serve now: raise BackendUnavailableError (or
        BackendAuthError) saying why not. A serving process calls it every few seconds
        to report its health (an HSM unplugged, a network HSM unreachable); it must be
        cheap and change nothing. The default has nothing to check."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions and files; the backend is not used afterwards."""
