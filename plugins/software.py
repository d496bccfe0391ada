"""The `software` key backend: private keys sealed with AES-256-GCM in an SQLite `pki.db`.

The key-encryption key (KEK) comes from the database password through scrypt (its
parameters and salt stored in the header), or, with no password, from a key file
beside the database (mode 0600). Each key is sealed with its key id as associated
data, so a sealed blob cannot be moved to another id. Nothing is written unsealed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyplane.plugins.errors import (
    BackendAuthError,
    BackendConfigError,
    BackendUnavailableError,
    KeyNotFoundError,
    PasswordRequiredError,
    SealedKeyError,
    WrongPasswordError,
)
from keyplane.plugins.hookspecs import hookimpl
from keyplane.plugins.keys import (
    BackendPrivateKey,
    DigestSigner,
    GeneratedKey,
    KeyAlgorithm,
    KeyBackend,
    PublicKey,
    SecretStore,
    TlsKeySource,
    backend_private_key,
)
from keyplane.plugins.password import (
    SCRYPT_PARAMS,
    PasswordSource,
    change_lock,
    check_kdf_params,
    fsync_directory,
    write_private_file,
)
from keyplane.plugins.uri import SoftwareKeyUri

NAME = "software"
log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CHECK_PLAINTEXT = b"keyplane pki.db key-encryption key check"
_CHECK_AAD = b"keyplane:header"

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


def _aad(key_id: str) -> bytes:
    return b"keyplane:key:" + key_id.encode()


def _secret_aad(name: str) -> bytes:
    return b"keyplane:secret:" + name.encode()


def _derive_kek(password: bytes, salt: bytes, params: Mapping[str, int]) -> bytes:
    return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(
        password
    )


def _opens(kek: bytes, nonce: bytes, sealed: bytes) -> bool:
    """Whether `kek` is the one the header's check value was sealed with."""
    try:
        AESGCM(kek).decrypt(nonce, sealed, _CHECK_AAD)
    except (InvalidTag, ValueError):
        return False
    return True


def _no_checkpoint(point: str) -> None:
    """A password change's steps, where a test may kill the process (none by default)."""


def _generate(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if algorithm.is_ec:
        return ec.generate_private_key(algorithm.curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=algorithm.rsa_bits)


class SoftwareBackend(KeyBackend, TlsKeySource, SecretStore):
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
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Freed pages are zeroed, so a destroyed key's sealed blob does not linger.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise BackendUnavailableError(
                f"software backend: cannot open the PKI database ({exc})"
            ) from None
        try:
            os.chmod(path, 0o600)
            # The salt of the header this process opened: another process (a worker) that
            # changes the password changes it, and this one then opens pki.db afresh.
            self._salt = b""
            with change_lock(path):
                self._aead = AESGCM(self._open_kek())
            self._verify_sealed()
        except BaseException:
            self._db.close()
            raise

    # -- key-encryption key -------------------------------------------------------------

    @property
    def key_file(self) -> Path:
        return self.path.with_name(self.path.name + ".key")

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

    def _header_salt(self) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT salt FROM header").fetchone()
        return None if row is None else bytes(row[0])

    def _open_kek(self) -> bytes:
        """The KEK, from the password that opens pki.db (the configured one, or the new
        one of a change a crash interrupted, which this then finishes) or the key file.
        Called with change_lock held."""
        with self._lock:
            row = self._db.execute(
                "SELECT kek_source, kdf_params, salt, check_nonce, check_sealed FROM header"
            ).fetchone()
        if row is None:
            kek = self._initialise_header(self._new_database_password())
            self._source.discard_staged()  # nothing was ever sealed under it
            return kek
        source, params_text, salt, nonce, sealed = row
        if source == "password":
            kek = self._password_kek(params_text, salt, nonce, sealed)
        else:
            kek = self._key_file_kek(nonce, sealed)
            self._undo_unsealed_change()  # the key file still rules
        self._salt = bytes(salt)
        return kek

    def _new_database_password(self) -> bytes | None:
        password = self._source.current()
        if password is None and self._source.file is not None:
            raise BackendConfigError(
                "software backend: password_file is configured but does not exist; write the "
                "database password to it, or remove password_file to seal pki.db with a key "
                "file"
            )
        return password

    def _password_kek(self, params_text: str, salt: bytes, nonce: bytes, sealed: bytes) -> bytes:
        try:
            params = check_kdf_params(json.loads(params_text), salt)
        except ValueError:
            raise BackendUnavailableError(
                "software backend: the PKI database header is damaged (key-derivation parameters)"
            ) from None
        candidates = self._source.candidates()
        if not candidates:
            if self._source.file is not None:
                raise BackendConfigError(
                    "software backend: password_file does not exist; write the PKI database "
                    "password to it"
                )
            raise PasswordRequiredError(
                "software backend: the PKI database is protected by a password and none was "
                "given; set password_file or password_env, or unlock the server with "
                "'keyplane unlock'"
            )
        for origin, password in candidates:
            kek = _derive_kek(password, salt, params)
            if _opens(kek, nonce, sealed):
                self._settle_change(origin)
                return kek
        raise WrongPasswordError("software backend: the PKI database password is wrong")

    def _settle_change(self, origin: str) -> None:
        """Finish, or undo, a password change that a crash interrupted."""
        staged = self._source.staged
        if origin == "staged" and staged is not None:
            self._source.commit(staged)
            log.warning(
                "software backend: finished an interrupted database password change: "
                "password_file now holds the new password"
            )
        else:
            self._undo_unsealed_change()
        # The database is sealed with a password: a key file left by a change goes now.
        self._drop_key_file()

    def _undo_unsealed_change(self) -> None:
        """Drop the staged password of a change that a crash stopped before the re-seal."""
        staged = self._source.staged
        if staged is not None and staged.exists():
            self._source.discard_staged()
            log.warning(
                "software backend: an interrupted database password change never re-sealed "
                "pki.db; the password is unchanged"
            )

    def _key_file_kek(self, nonce: bytes, sealed: bytes) -> bytes:
        if self._source.current() is not None:
            log.warning(
                "software backend: a password is configured but the PKI database uses "
                "a key file; run a password change to protect it with the password"
            )
        try:
            kek = self.key_file.read_bytes()
        except OSError as exc:
            raise BackendUnavailableError(
                f"software backend: the PKI database key file is unreadable ({exc.strerror})"
            ) from None
        if not _opens(kek, nonce, sealed):
            raise BackendAuthError("software backend: the PKI database key file is wrong")
        return kek

    def _drop_key_file(self) -> None:
        if self.key_file.exists():
            self.key_file.unlink()
            fsync_directory(self.key_file.parent)

    def _initialise_header(self, password: bytes | None) -> bytes:
        salt = secrets.token_bytes(16)
        if password is not None:
            kek = _derive_kek(password, salt, SCRYPT_PARAMS)
            source = "password"
        else:
            kek = secrets.token_bytes(32)
            if self.key_file.exists():
                raise BackendUnavailableError(
                    "software backend: a key file exists beside an empty PKI database; "
                    "move it away or restore the database it belongs to"
                )
            write_private_file(self.key_file, kek)
            source = "keyfile"
            log.warning(
                "software backend: no database password is set; private keys are sealed with "
                "the key file %s (mode 0600). Set a password to protect them with it instead.",
                self.key_file.name,
            )
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(kek).encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO header VALUES (1, ?, ?, ?, ?, ?, ?)",
                (FORMAT_VERSION, source, json.dumps(SCRYPT_PARAMS), salt, nonce, sealed),
            )
        self._salt = salt
        return kek

    def _refresh_kek(self) -> None:
        """Open pki.db afresh if another process changed its password since this one
        opened it (with --workers), so this one never seals under a stale key."""
        if self._header_salt() == self._salt:
            return
        with change_lock(self.path), self._lock:
            if self._header_salt() != self._salt:
                self._aead = AESGCM(self._open_kek())
                log.info("software backend: the database password changed; re-opened pki.db")

    def _check_header_unchanged(self, db: sqlite3.Connection) -> None:
        """Inside a write: the header is still the one this process seals under."""
        row = db.execute("SELECT salt FROM header").fetchone()
        if row is None or bytes(row[0]) != self._salt:
            raise BackendUnavailableError(
                "software backend: the PKI database password changed during this write; try again"
            )

    def _verify_sealed(self) -> None:
        """Open every sealed key and secret once: SealedKeyError naming the first that
        does not unseal, or whose private half does not match its public key."""
        with self._lock:
            keys = self._db.execute("SELECT id, label, public_der, nonce, sealed FROM keys")
            key_rows = keys.fetchall()
            secret_rows = self._db.execute("SELECT name, nonce, sealed FROM secrets").fetchall()
        for key_id, label, public_der, nonce, sealed in key_rows:
            what = f"key software:{key_id} ({str(label)[:80]!r})"
            try:
                plain = self._aead.decrypt(nonce, sealed, _aad(key_id))
                key = serialization.load_der_private_key(plain, password=None)
            except (InvalidTag, ValueError, TypeError):
                raise SealedKeyError(
                    f"software backend: {what} does not unseal: pki.db is damaged or was "
                    "altered (a changed byte, or a sealed key moved to another row); restore "
                    "it from a backup"
                ) from None
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if public != public_der:
                raise SealedKeyError(
                    f"software backend: {what} does not match its public key: pki.db was "
                    "altered; restore it from a backup"
                )
        for name, nonce, sealed in secret_rows:
            try:
                self._aead.decrypt(nonce, sealed, _secret_aad(name))
            except InvalidTag:
                raise SealedKeyError(
                    f"software backend: secret {str(name)[:80]!r} does not unseal: pki.db is "
                    "damaged or was altered; restore it from a backup"
                ) from None

    def _decrypt(self, nonce: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise SealedKeyError(
                f"software backend: {what} does not unseal: pki.db is damaged or was altered "
                "(tampered or moved); restore it from a backup"
            ) from None

    def store_secret(self, name: str, value: bytes) -> None:
        self._refresh_kek()
        nonce = secrets.token_bytes(12)
        with self._transaction() as db:
            self._check_header_unchanged(db)
            sealed = self._aead.encrypt(nonce, value, _secret_aad(name))
            db.execute(
                "INSERT INTO secrets (name, nonce, sealed) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
                (name, nonce, sealed),
            )

    def load_secret(self, name: str) -> bytes | None:
        self._refresh_kek()
        with self._lock:
            row = self._db.execute(
                "SELECT nonce, sealed FROM secrets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return None
        return self._decrypt(row[0], row[1], _secret_aad(name), f"secret {name}")

    def change_password(
        self,
        new_password: bytes,
        store_as: str | None = None,
        checkpoint: Callable[[str], None] = _no_checkpoint,
    ) -> None:
        """Re-seal every key and secret under a KEK from `new_password`, so that no step
        can lock the next start out: the new password is written beside password_file
        (fsynced), pki.db is re-sealed in one transaction (with the value sealed under
        `store_as`, if given), then the file is replaced, then the key file goes. With
        no password_file keyplane can write, PasswordSinkError and nothing changes."""
        self._source.writable_file()  # refused before any work
        salt = secrets.token_bytes(16)
        new_aead = AESGCM(_derive_kek(new_password, salt, SCRYPT_PARAMS))
        with change_lock(self.path):
            with self._lock:
                if self._header_salt() != self._salt:
                    self._aead = AESGCM(self._open_kek())
            staged = self._source.stage(new_password)
            checkpoint("password.staged")
            try:
                with self._lock:  # no thread seals under the old key once this commits
                    self._reseal(new_aead, salt, store_as, new_password)
                    self._aead, self._salt = new_aead, salt
            except BaseException:
                self._source.discard_staged()
                raise
            checkpoint("password.resealed")
            self._source.commit(staged)
            checkpoint("password.replaced")
            self._drop_key_file()
            checkpoint("password.keyfile_removed")

    def _reseal(
        self, new_aead: AESGCM, salt: bytes, store_as: str | None, new_password: bytes
    ) -> None:
        with self._transaction() as db:
            self._check_header_unchanged(db)
            rows = db.execute("SELECT id, nonce, sealed FROM keys").fetchall()
            for key_id, nonce, sealed in rows:
                plain = self._decrypt(nonce, sealed, _aad(key_id), f"key software:{key_id}")
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE keys SET nonce = ?, sealed = ? WHERE id = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, _aad(key_id)), key_id),
                )
            for name, nonce, sealed in db.execute("SELECT name, nonce, sealed FROM secrets"):
                plain = self._decrypt(nonce, sealed, _secret_aad(name), f"secret {name}")
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE secrets SET nonce = ?, sealed = ? WHERE name = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, _secret_aad(name)), name),
                )
            if store_as is not None:
                nonce = secrets.token_bytes(12)
                db.execute(
                    "INSERT INTO secrets (name, nonce, sealed) VALUES (?, ?, ?) ON CONFLICT "
                    "(name) DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
                    (store_as, nonce, new_aead.encrypt(nonce, new_password, _secret_aad(store_as))),
                )
            check_nonce = secrets.token_bytes(12)
            db.execute(
                "UPDATE header SET kek_source = 'password', kdf_params = ?, salt = ?, "
                "check_nonce = ?, check_sealed = ?",
                (
                    json.dumps(SCRYPT_PARAMS),
                    salt,
                    check_nonce,
                    new_aead.encrypt(check_nonce, _CHECK_PLAINTEXT, _CHECK_AAD),
                ),
            )

    # -- keys ---------------------------------------------------------------------------

    def generate_key(self, label: str, algorithm: KeyAlgorithm) -> GeneratedKey:
        key = _generate(algorithm)
        key_id = secrets.token_hex(16)
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
        self._refresh_kek()
        with self._transaction() as db:
            self._check_header_unchanged(db)
            sealed = self._aead.encrypt(nonce, plain, _aad(key_id))
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
        self._refresh_kek()
        _, nonce, sealed = self._row(key_id)
        if self._header_salt() != self._salt:  # re-sealed between the two reads
            self._refresh_kek()
            _, nonce, sealed = self._row(key_id)
        return self._decrypt(nonce, sealed, _aad(key_id), f"key software:{key_id}")

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
    path = Path(str(options.get("path") or data_dir / "pki.db"))
    return SoftwareBackend(path, PasswordSource.from_options(options))
