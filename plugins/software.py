"""The `software` key backend: private keys sealed with AES-256-GCM in an SQLite `pki.db`.

The key-encryption key (KEK) comes from the database password through scrypt (its
parameters and salt stored in the header), or, with no password, from a key file
beside the database (mode 0600); software_seal.py keeps it. Each key is sealed with
its key id as associated data, so a sealed blob cannot be moved to another id.
Nothing is written unsealed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from keyplane.plugins.errors import (
    BackendConfigError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeyOperationError,
)
from keyplane.plugins.hookspecs import hookimpl
from keyplane.plugins.keys import (
    BackedUpStore,
    BackendPrivateKey,
    BackupSource,
    DigestSigner,
    GeneratedKey,
    KeyAlgorithm,
    KeyBackend,
    PublicKey,
    SecretStore,
    TlsKeySource,
    backend_private_key,
)
from keyplane.plugins.password import PasswordSource
from keyplane.plugins.software_seal import Seal, key_aad, secret_aad
from keyplane.plugins.uri import SoftwareKeyUri

NAME = "software"
# pki.db's name in a backup, wherever the `path` option puts it.
BACKUP_FILE = "pki.db"
log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS header (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format INTEGER NOT NULL,
    kek_source TEXT NOT NULL CHECK (kek_source IN ('password', 'keyfile')),
    kdf_params TEXT NOT NULL,
    salt BLOB NOT NULL,
    check_nonce BLOB NOT NULL,
    check_sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    public_der BLOB NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL,
    created_at TEXT NOT NULL
);
"""


def database_path(options: Mapping[str, object], data_dir: Path) -> Path:
    """Where the software backend with these options keeps its pki.db."""
    return Path(str(options.get("path") or data_dir / "pki.db"))


def _generate(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if algorithm.is_ec:
        return ec.generate_private_key(algorithm.curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=algorithm.rsa_bits)


class SoftwareBackend(KeyBackend, TlsKeySource, SecretStore, BackupSource):
    """Keys sealed in one pki.db file; unsealed keys are kept only in this process's memory.

    Opening it opens every sealed key and secret once, so a damaged pki.db refuses the
    start (naming the key) instead of failing the day the key is needed.
    """

    name = NAME

    def __init__(self, path: Path, source: PasswordSource | None = None) -> None:
        self.path = path
        self._source = source or PasswordSource()
        self._lock = threading.RLock()
        self._cache: dict[str, BackendPrivateKey] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise BackendUnavailableError(
                f"software backend: cannot open the PKI database ({exc})"
            ) from None
        try:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                # Freed pages are zeroed, so a destroyed key's sealed blob does not linger.
                self._db.execute("PRAGMA secure_delete=ON")
                self._db.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise BackendUnavailableError(
                    f"software backend: cannot open the PKI database ({exc})"
                ) from None
            os.chmod(path, 0o600)
            self._seal = Seal(path, self._db, self._lock, self._transaction, self._source)
            self._seal.verify()
        except BaseException:
            # Closed at once: the files SQLite opened beside it go with the connection.
            self._db.close()
            raise

    # -- the seal, and secrets ------------------------------------------------------------

    @property
    def key_file(self) -> Path:
        return self._seal.key_file

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def store_secret(self, name: str, value: bytes) -> None:
        self._seal.refresh()
        nonce = secrets.token_bytes(12)
        with self._transaction() as db:
            self._seal.check_unchanged(db)
            sealed = self._seal.aead.encrypt(nonce, value, secret_aad(name))
            db.execute(
                "INSERT INTO secrets (name, nonce, sealed) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
                (name, nonce, sealed),
            )

    def load_secret(self, name: str) -> bytes | None:
        self._seal.refresh()
        with self._lock:
            row = self._db.execute(
                "SELECT nonce, sealed FROM secrets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return None
        return self._seal.decrypt(row[0], row[1], secret_aad(name), f"secret {name}")

    def change_password(
        self,
        new_password: bytes,
        store_as: str | None = None,
        checkpoint: Callable[[str], None] = lambda point: None,
    ) -> None:
        """See Seal.change_password: the new password reaches password_file before pki.db
        is re-sealed; PasswordSinkError, and nothing changes, with no file to write."""
        self._seal.change_password(new_password, store_as, checkpoint)

    # -- keys ---------------------------------------------------------------------------

    def new_key_uri(self, label: str) -> str:
        return str(SoftwareKeyUri(secrets.token_hex(16)))

    def generate_key(
        self, label: str, algorithm: KeyAlgorithm, uri: str | None = None
    ) -> GeneratedKey:
        key_id = SoftwareKeyUri.parse(uri).key_id if uri else secrets.token_hex(16)
        key = _generate(algorithm)
        plain = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = secrets.token_bytes(12)
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = datetime.datetime.now(datetime.UTC).isoformat()
        self._seal.refresh()
        with self._transaction() as db:
            self._seal.check_unchanged(db)
            sealed = self._seal.aead.encrypt(nonce, plain, key_aad(key_id))
            if db.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone():
                raise KeyOperationError(f"software:{key_id} names a key already")
            db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, label, algorithm.value, public_der, nonce, sealed, now),
            )
        uri = str(SoftwareKeyUri(key_id))
        public_key = key.public_key()
        with self._lock:
            self._cache[key_id] = backend_private_key(public_key, _native_signer(key), uri)
        return GeneratedKey(uri=uri, public_key=public_key)

    def _row(self, key_id: str) -> tuple[bytes, bytes, bytes]:
        with self._lock:
            row = self._db.execute(
                "SELECT public_der, nonce, sealed FROM keys WHERE id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyNotFoundError(f"no key software:{key_id} in the PKI database")
        return row  # type: ignore[no-any-return]

    def _unseal(self, key_id: str) -> bytes:
        self._seal.refresh()
        _, nonce, sealed = self._row(key_id)
        if self._seal.changed():  # re-sealed between the two reads
            self._seal.refresh()
            _, nonce, sealed = self._row(key_id)
        return self._seal.decrypt(nonce, sealed, key_aad(key_id), f"key software:{key_id}")

    def tls_private_key_pem(self, uri: str) -> bytes:
        key_id = SoftwareKeyUri.parse(uri).key_id
        key = serialization.load_der_private_key(self._unseal(key_id), password=None)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def private_key(self, uri: str) -> BackendPrivateKey:
        key_id = SoftwareKeyUri.parse(uri).key_id
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        key = serialization.load_der_private_key(self._unseal(key_id), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyNotFoundError(f"software:{key_id} is not a signing key")
        wrapped = backend_private_key(key.public_key(), _native_signer(key), str(uri))
        with self._lock:
            self._cache[key_id] = wrapped
        return wrapped

    def public_key(self, uri: str) -> PublicKey:
        key_id = SoftwareKeyUri.parse(uri).key_id
        public_der, _, _ = self._row(key_id)
        key = serialization.load_der_public_key(public_der)
        assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # noqa: S101
        return key

    def destroy_key(self, uri: str) -> None:
        key_id = SoftwareKeyUri.parse(uri).key_id
        with self._transaction() as db:
            gone = db.execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount
        with self._lock:
            self._cache.pop(key_id, None)
        if not gone:
            raise KeyNotFoundError(f"no key software:{key_id} in the PKI database")

    def backup_into(self, directory: Path, recorded: Collection[str]) -> BackedUpStore:
        """pki.db copied with SQLite's online backup (one snapshot, from a connection of
        its own), then, in the copy only, without the keys no record names. The key file
        stays out: with it the copy's keys would be as good as unsealed."""
        keep = {SoftwareKeyUri.parse(uri).key_id for uri in recorded if uri.startswith(f"{NAME}:")}
        target = directory / BACKUP_FILE
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as source:
                with contextlib.closing(sqlite3.connect(target, isolation_level=None)) as copy:
                    source.backup(copy)
                    # Freed pages are zeroed in the copy too.
                    copy.execute("PRAGMA secure_delete=ON")
                    ids = [str(r[0]) for r in copy.execute("SELECT id FROM keys ORDER BY id")]
                    left_out = [key_id for key_id in ids if key_id not in keep]
                    copy.executemany("DELETE FROM keys WHERE id = ?", [(k,) for k in left_out])
                    copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                    row = copy.execute("SELECT kek_source FROM header").fetchone()
        except sqlite3.Error as exc:
            raise BackendUnavailableError(
                f"software backend: cannot copy the PKI database ({exc})"
            ) from None
        os.chmod(target, 0o600)
        kept = [key_id for key_id in ids if key_id in keep]
        seal = str(row[0]) if row else "none"
        return BackedUpStore(
            backend=NAME,
            file_name=BACKUP_FILE,
            seal=seal,
            key_file=f"{BACKUP_FILE}.key" if seal == "keyfile" else None,
            key_uris=tuple(str(SoftwareKeyUri(k)) for k in kept),
            left_out=tuple(str(SoftwareKeyUri(k)) for k in left_out),
        )

    def key_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM keys ORDER BY created_at")]

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._db.close()


def _native_signer(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> DigestSigner:
    """A DigestSigner over an in-memory `cryptography` key."""

    def sign(
        digest: bytes, hash_algorithm: hashes.HashAlgorithm, pad: AsymmetricPadding | None
    ) -> bytes:
        prehashed = utils.Prehashed(hash_algorithm)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(digest, ec.ECDSA(prehashed))
        assert pad is not None  # noqa: S101
        return key.sign(digest, pad, prehashed)

    return sign


@hookimpl
def keyplane_backend_names() -> list[str]:
    return [NAME]


@hookimpl
def keyplane_open_backend(
    name: str, options: Mapping[str, object], data_dir: Path
) -> KeyBackend | None:
    if name != NAME:
        return None
    # `password` is never read from a config file: the server passes a Password in memory
    # (a locked start that was unlocked, or a worker under --workers).
    unknown = set(options) - {"path", "password_env", "password_file", "password"}
    if unknown:
        raise BackendConfigError(
            f"software backend: unknown option(s) {', '.join(sorted(unknown))}"
        )
    path = database_path(options, data_dir)
    return SoftwareBackend(path, PasswordSource.from_options(options))
