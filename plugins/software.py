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
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
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
from keyplane.plugins.uri import SoftwareKeyUri

NAME = "software"
# pki.db's name in a backup, wherever the `path` option puts it.
BACKUP_FILE = "pki.db"
log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# scrypt cost: about 32 MiB and a tenth of a second, paid once per open.
SCRYPT_PARAMS = {"n": 2**15, "r": 8, "p": 1}
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


@dataclass(frozen=True)
class PasswordSink:
    """Where the configured password comes from, so a new one can be put there."""

    file: Path | None = None
    env: str | None = None

    def write(self, password: bytes) -> None:
        if self.file is not None:
            tmp = self.file.with_name(self.file.name + ".new")
            tmp.unlink(missing_ok=True)
            _write_private_file(tmp, password + b"\n")
            os.replace(tmp, self.file)
        elif self.env is not None:
            log.warning(
                "software backend: the PKI database password changed; set %s to the new "
                "password before the next start",
                self.env,
            )


def _read_password(options: Mapping[str, object]) -> bytes | None:
    """The database password from `password_env` or `password_file`, or None."""
    env_name = options.get("password_env")
    file_name = options.get("password_file")
    if env_name and file_name:
        raise BackendConfigError("software backend: set password_env or password_file, not both")
    if env_name:
        value = os.environ.get(str(env_name))
        if not value:
            raise BackendConfigError(
                f"software backend: environment variable {env_name} (password_env) is not set"
            )
        return value.encode()
    if file_name:
        try:
            value = Path(str(file_name)).read_text().strip()
        except UnicodeDecodeError:
            raise BackendConfigError("software backend: password_file is not text") from None
        except OSError as exc:
            raise BackendConfigError(
                f"software backend: cannot read password_file ({exc.strerror})"
            ) from None
        if not value:
            raise BackendConfigError("software backend: password_file is empty")
        return value.encode()
    return None


def _derive_kek(password: bytes, salt: bytes, params: Mapping[str, int]) -> bytes:
    return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(
        password
    )


def _write_private_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_key_file(path: Path, kek: bytes) -> None:
    """Write the key file whole or not at all: a temporary file, fsynced, then linked
    into place (never over an existing one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private_file(tmp, kek)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def database_path(options: Mapping[str, object], data_dir: Path) -> Path:
    """Where the software backend with these options keeps its pki.db."""
    return Path(str(options.get("path") or data_dir / "pki.db"))


def _generate(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if algorithm.is_ec:
        return ec.generate_private_key(algorithm.curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=algorithm.rsa_bits)


class SoftwareBackend(KeyBackend, TlsKeySource, SecretStore, BackupSource):
    """Keys sealed in one pki.db file; unsealed keys are kept only in this process's memory."""

    name = NAME

    def __init__(
        self, path: Path, password: bytes | None, password_sink: PasswordSink | None = None
    ) -> None:
        self.path = path
        self._password_sink = password_sink
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
            self._aead = AESGCM(self._open_kek(password))
        except BaseException:
            # Closed at once: the files SQLite opened beside it go with the connection.
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

    def _open_kek(self, password: bytes | None) -> bytes:
        row = self._db.execute(
            "SELECT kek_source, kdf_params, salt, check_nonce, check_sealed FROM header"
        ).fetchone()
        if row is None:
            return self._initialise_header(password)
        source, params_text, salt, nonce, sealed = row
        if source == "password":
            if password is None:
                raise BackendConfigError(
                    "software backend: the PKI database is protected by a password; "
                    "set password_env or password_file"
                )
            kek = _derive_kek(password, salt, json.loads(params_text))
        else:
            if password is not None:
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
        try:
            AESGCM(kek).decrypt(nonce, sealed, _CHECK_AAD)
        except (InvalidTag, ValueError):
            raise BackendAuthError(
                "software backend: the PKI database password (or key file) is wrong"
            ) from None
        return kek

    def _initialise_header(self, password: bytes | None) -> bytes:
        salt = secrets.token_bytes(16)
        if password is not None:
            kek = _derive_kek(password, salt, SCRYPT_PARAMS)
            source = "password"
        else:
            kek = self._adopted_key_file() or secrets.token_bytes(32)
            if not self.key_file.exists():
                _write_key_file(self.key_file, kek)
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
        return kek

    def _adopted_key_file(self) -> bytes | None:
        """A key file beside a database without a header: the one a first open wrote
        before it was interrupted (key files are written whole or not at all), so it is
        kept, provided the database never sealed anything."""
        if not self.key_file.exists():
            return None
        kek = self.key_file.read_bytes()
        (sealed,) = self._db.execute(
            "SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM secrets)"
        ).fetchone()
        if len(kek) != 32 or sealed:
            raise BackendUnavailableError(
                "software backend: a key file exists beside an empty PKI database; "
                "move it away or restore the database it belongs to"
            )
        return kek

    def store_secret(self, name: str, value: bytes) -> None:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, value, _secret_aad(name))
        with self._transaction() as db:
            db.execute(
                "INSERT INTO secrets (name, nonce, sealed) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed",
                (name, nonce, sealed),
            )

    def load_secret(self, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT nonce, sealed FROM secrets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return None
        try:
            return self._aead.decrypt(row[0], row[1], _secret_aad(name))
        except InvalidTag:
            raise BackendAuthError(f"software backend: secret {name} does not unseal") from None

    def change_password(self, new_password: bytes) -> None:
        """Re-seal every key and secret under a KEK from `new_password`, in one transaction,
        then put the new password where the configuration reads it from."""
        salt = secrets.token_bytes(16)
        new_kek = _derive_kek(new_password, salt, SCRYPT_PARAMS)
        new_aead = AESGCM(new_kek)
        with self._transaction() as db:
            rows = db.execute("SELECT id, nonce, sealed FROM keys").fetchall()
            for key_id, nonce, sealed in rows:
                plain = self._aead.decrypt(nonce, sealed, _aad(key_id))
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE keys SET nonce = ?, sealed = ? WHERE id = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, _aad(key_id)), key_id),
                )
            for name, nonce, sealed in db.execute("SELECT name, nonce, sealed FROM secrets"):
                plain = self._aead.decrypt(nonce, sealed, _secret_aad(name))
                new_nonce = secrets.token_bytes(12)
                db.execute(
                    "UPDATE secrets SET nonce = ?, sealed = ? WHERE name = ?",
                    (new_nonce, new_aead.encrypt(new_nonce, plain, _secret_aad(name)), name),
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
        self._aead = new_aead
        with contextlib.suppress(FileNotFoundError):
            self.key_file.unlink()
        if self._password_sink is not None:
            self._password_sink.write(new_password)

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
        sealed = self._aead.encrypt(nonce, plain, _aad(key_id))
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = datetime.datetime.now(datetime.UTC).isoformat()
        with self._transaction() as db:
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
        _, nonce, sealed = self._row(key_id)
        try:
            return self._aead.decrypt(nonce, sealed, _aad(key_id))
        except InvalidTag:
            raise BackendAuthError(
                f"software backend: key software:{key_id} does not unseal (tampered or moved)"
            ) from None

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
    unknown = set(options) - {"path", "password_env", "password_file"}
    if unknown:
        raise BackendConfigError(
            f"software backend: unknown option(s) {', '.join(sorted(unknown))}"
        )
    path = database_path(options, data_dir)
    sink = PasswordSink(
        file=Path(str(options["password_file"])) if options.get("password_file") else None,
        env=str(options["password_env"]) if options.get("password_env") else None,
    )
    return SoftwareBackend(path, _read_password(options), sink)
