"""The seal of the software backend's pki.db: its key-encryption key (KEK), from the
database password through scrypt (parameters and salt in the header, refused below a
floor) or from a key file beside it (0600); the check that every sealed key and secret
opens; and a password change that no crash can make lock the next start out.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyplane.plugins.errors import (
    BackendAuthError,
    BackendConfigError,
    BackendUnavailableError,
    PasswordRequiredError,
    SealedKeyError,
    WrongPasswordError,
)
from keyplane.plugins.password import (
    SCRYPT_PARAMS,
    PasswordSource,
    change_lock,
    check_kdf_params,
    fsync_directory,
    write_private_file,
)

log = logging.getLogger("keyplane.plugins.software")

FORMAT_VERSION = 1
_CHECK_PLAINTEXT = b"keyplane pki.db key-encryption key check"
_CHECK_AAD = b"keyplane:header"


def key_aad(key_id: str) -> bytes:
    return b"keyplane:key:" + key_id.encode()


def secret_aad(name: str) -> bytes:
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


Transaction = Callable[[], AbstractContextManager[sqlite3.Connection]]


def _write_key_file(path: Path, kek: bytes) -> None:
    """Write the key file whole or not at all: a temporary file, fsynced, then linked
    into place (never over an existing one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    write_private_file(tmp, kek)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
    fsync_directory(path.parent)


class Seal:
    """The KEK of one open pki.db. `aead` seals and unseals; another process (a worker)
    that changes the password changes the header's salt, and `refresh()` then opens
    pki.db afresh, so this one never seals under a stale key."""

    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        lock: threading.RLock,
        transaction: Transaction,
        source: PasswordSource,
    ) -> None:
        self.path = path
        self._db = db
        self._lock = lock
        self._transaction = transaction
        self._source = source
        # The salt of the header this process opened.
        self._salt = b""
        with change_lock(path):
            self.aead = AESGCM(self._open_kek())

    @property
    def key_file(self) -> Path:
        return self.path.with_name(self.path.name + ".key")

    def header_salt(self) -> bytes | None:
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
        except FileNotFoundError:
            raise BackendUnavailableError(
                f"software backend: {self.key_file.name} is missing beside {self.path.name} "
                "(its keys are sealed with it): restore it from the backup the database "
                "came from; nothing was changed"
            ) from None
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
            adopted = self._adopted_key_file()
            if adopted is None:
                kek = secrets.token_bytes(32)
                _write_key_file(self.key_file, kek)
            else:
                kek = adopted
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

    def _adopted_key_file(self) -> bytes | None:
        """A key file beside a database without a header: the one a first open wrote
        before it was interrupted (key files are written whole or not at all), so it is
        kept, provided the database never sealed anything."""
        if not self.key_file.exists():
            return None
        kek = self.key_file.read_bytes()
        with self._lock:
            (sealed,) = self._db.execute(
                "SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM secrets)"
            ).fetchone()
        if len(kek) != 32 or sealed:
            raise BackendUnavailableError(
                "software backend: a key file exists beside an empty PKI database; "
                "move it away or restore the database it belongs to"
            )
        return bytes(kek)

    def changed(self) -> bool:
        """Whether another process changed the password since this one opened pki.db."""
        return self.header_salt() != self._salt

    def refresh(self) -> None:
        """Open pki.db afresh if another process changed its password since this one
        opened it (with --workers), so this one never seals under a stale key."""
        if self.header_salt() == self._salt:
            return
        with change_lock(self.path), self._lock:
            if self.header_salt() != self._salt:
                self.aead = AESGCM(self._open_kek())
                log.info("software backend: the database password changed; re-opened pki.db")

    def check_unchanged(self, db: sqlite3.Connection) -> None:
        """Inside a write: the header is still the one this process seals under."""
        row = db.execute("SELECT salt FROM header").fetchone()
        if row is None or bytes(row[0]) != self._salt:
            raise BackendUnavailableError(
                "software backend: the PKI database password changed during this write; try again"
            )

    def verify(self) -> None:
        """Open every sealed key and secret once: SealedKeyError naming the first that
        does not unseal, or whose private half does not match its public key."""
        with self._lock:
            keys = self._db.execute("SELECT id, label, public_der, nonce, sealed FROM keys")
            key_rows = keys.fetchall()
            secret_rows = self._db.execute("SELECT name, nonce, sealed FROM secrets").fetchall()
        for key_id, label, public_der, nonce, sealed in key_rows:
            what = f"key software:{key_id} ({str(label)[:80]!r})"
            try:
                plain = self.aead.decrypt(nonce, sealed, key_aad(key_id))
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
                self.aead.decrypt(nonce, sealed, secret_aad(name))
            except InvalidTag:
                raise SealedKeyError(
                    f"software backend: secret {str(name)[:80]!r} does not unseal: pki.db is "
                    "damaged or was altered; restore it from a backup"
                ) from None

    def decrypt(self, nonce: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
        try:
            return self.aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise SealedKeyError(
                f"software backend: {what} does not unseal: pki.db is damaged or was altered "
                "(tampered or moved); restore it from a backup"
            ) from None

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
                if self.header_salt() != self._salt:
                    self.aead = AESGCM(self._open_kek())
            staged = self._source.stage(new_password)
            checkpoint("password.staged")
            try:
                with self._lock:  # no thread seals under the old key once this commits
                    self._reseal(new_aead, salt, store_as, new_password)
                    self.aead, self._salt = new_aead, salt
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
            self.check_unchanged(db)
            rows = db.execute("SELECT id, nonce, sealed FROM keys").fetchall()
            for key_id, nonce, sealed in rows:
                plain = self.decrypt(nonce, sealed, key_aad(key_id), f"key software:{key_id}")
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE keys SET nonce = ?, sealed = ? WHERE id = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, key_aad(key_id)), key_id),
                )
            secret_rows = db.execute("SELECT name, nonce, sealed FROM secrets").fetchall()
            for name, nonce, sealed in secret_rows:
                plain = self.decrypt(nonce, sealed, secret_aad(name), f"secret {name}")
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE secrets SET nonce = ?, sealed = ? WHERE name = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, secret_aad(name)), name),
                )
            if store_as is not None:
                nonce = secrets.token_bytes(12)
                db.execute(
                    "INSERT INTO secrets (name, nonce, sealed) VALUES (?, ?, ?) ON CONFLICT "
                    "(name) DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
                    (store_as, nonce, new_aead.encrypt(nonce, new_password, secret_aad(store_as))),
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
