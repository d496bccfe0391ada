"""A search for private key material in what a test run leaves behind (README, "Secret
scan"). Needles: every private key the run made that can be found (each software
backend's pki.db, unsealed with the key file beside it; each private-key PEM file a
component keeps), as PKCS#8 DER, base64 of it, and the raw private scalar (bytes, hex,
base64 at each alignment); the SoftHSM PINs; the contents of password files. Haystack:
every other file (logs, the state DB with its audit log, backups, bundles, trust states,
captured output), tar members included. A PEM private-key marker anywhere but in a key
file is a hit on its own."""

from __future__ import annotations

import base64
import io
import re
import sqlite3
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

PEM_MARKER = re.compile(rb"-----BEGIN (?:[A-Z0-9 ]+ )?PRIVATE KEY-----")
# Files that hold a private key or a password by design, and SoftHSM's token objects.
# (pending-renewal.json is the agent's next key and CSR, 0600, until the renewal is saved.)
KEY_FILE = re.compile(r"(^|[-_.])key\.pem$|^admin\.pem$|\.key$|\.object$|^pending-renewal\.json$")
PASSWORD_FILE = re.compile(r"password|passphrase|(^|[-_.])pin($|[-_.])", re.IGNORECASE)
MIN_SECRET = 8  # shorter strings would match by chance


@dataclass
class Needles:
    """What must not appear: name -> bytes."""

    found: dict[bytes, str] = field(default_factory=dict)
    keys: int = 0

    def add(self, name: str, value: bytes) -> None:
        if len(value) >= MIN_SECRET:
            self.found.setdefault(value, name)

    def add_key(self, name: str, key: object) -> None:
        self.keys += 1
        der = key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.add(f"{name}: PKCS#8 DER", der)
        self.add(f"{name}: PKCS#8 DER, base64", base64.b64encode(der))
        for label, scalar in _scalars(key):
            self.add_secret_bytes(f"{name}: {label}", scalar)

    def add_secret_bytes(self, name: str, value: bytes) -> None:
        self.add(f"{name} (raw)", value)
        self.add(f"{name} (hex)", value.hex().encode())
        self.add(f"{name} (HEX)", value.hex().upper().encode())
        for shift in range(3):
            chunk = value[shift:]
            chunk = chunk[: len(chunk) // 3 * 3]
            self.add(f"{name} (base64)", base64.b64encode(chunk))
            self.add(f"{name} (base64url)", base64.urlsafe_b64encode(chunk))

    def add_password(self, name: str, text: str) -> None:
        value = text.strip()
        if len(value) >= MIN_SECRET:
            self.add(name, value.encode())


def _scalars(key: object) -> list[tuple[str, bytes]]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return [("private scalar", key.private_numbers().private_value.to_bytes(size, "big"))]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        return [
            (label, value.to_bytes((value.bit_length() + 7) // 8, "big"))
            for label, value in (("d", numbers.d), ("p", numbers.p), ("q", numbers.q))
        ]
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return [("private key bytes", raw)]
    if isinstance(key, dsa.DSAPrivateKey | x25519.X25519PrivateKey | x448.X448PrivateKey):
        return []
    return []


def is_key_file(path: Path) -> bool:
    return bool(KEY_FILE.search(path.name)) or "tokens" in path.parts


def keys_of_pki_db(path: Path, needles: Needles, passwords: Iterable[bytes] = ()) -> bool:
    """Unseal every key of a software backend's pki.db (on a copy: opening writes), with
    its key file or one of `passwords`; False if none opens it."""
    import shutil
    import tempfile

    from keyplane.plugins.password import Password, PasswordSource
    from keyplane.plugins.software import SoftwareBackend

    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "pki.db"
        for suffix in ("", "-wal", ".key"):
            source = path.with_name(path.name + suffix)
            if source.exists():
                shutil.copy(source, copy.with_name(copy.name + suffix))
        sources = [None, *(PasswordSource(given=Password(p)) for p in passwords)]
        for source in sources:
            try:
                backend = SoftwareBackend(copy, source)
            except Exception:  # noqa: S112 - not this password, or a damaged file: the next
                continue
            try:
                for key_id in backend.key_ids():
                    der = backend._unseal(key_id)
                    key = serialization.load_der_private_key(der, None)
                    needles.add_key(f"{path}:{key_id}", key)
            finally:
                backend.close()
            return True
    return False


def gather(roots: Iterable[Path], needles: Needles) -> tuple[list[Path], list[Path]]:
    """Needles from `roots` (password files, key files, then each pki.db, opened with
    its key file or a password found) into `needles`; returns (the haystack's files,
    the pki.db files that could not be opened)."""
    files = [
        p for root in roots for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    ]
    haystack, databases = [], []
    passwords: list[bytes] = []
    for path in files:
        if PASSWORD_FILE.search(path.name) and path.stat().st_size < 4096:
            text = path.read_text(errors="replace")
            needles.add_password(f"password file {path}", text)
            passwords.append(text.strip().encode())
        elif is_key_file(path):
            _keys_of_pem(path, needles)
        else:
            haystack.append(path)
            if path.name == "pki.db":
                databases.append(path)
    unique = list(dict.fromkeys(p for p in passwords if p))
    # A file that holds nothing but a password the run used is a password file too
    # (a test's "old" or "new"), not a leak.
    haystack = [p for p in haystack if not _only_a_password(p, unique)]
    closed = [db for db in databases if not keys_of_pki_db(db, needles, unique)]
    return haystack, closed


def _only_a_password(path: Path, passwords: list[bytes]) -> bool:
    return path.stat().st_size < 4096 and path.read_bytes().strip() in passwords


def _keys_of_pem(path: Path, needles: Needles) -> None:
    data = path.read_bytes()
    for block in re.findall(
        rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", data, re.S
    ):
        try:
            needles.add_key(str(path), serialization.load_pem_private_key(block, None))
        except (ValueError, TypeError):
            continue  # an encrypted one: its password is a needle if a file holds it


def _contents(path: Path) -> Iterator[tuple[str, bytes]]:
    data = path.read_bytes()
    yield str(path), data
    if data[257:262] == b"ustar":
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        extracted = tar.extractfile(member)
                        if extracted is not None:
                            yield f"{path}!{member.name}", extracted.read()
        except tarfile.TarError:
            return
    if data.startswith(b"SQLite format 3\x00"):
        # Text in SQLite pages is stored as is; blobs too. Also read every row, so a value
        # split over overflow pages is seen whole.
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
            try:
                tables = [
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables:
                    rows = db.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608
                    yield f"{path}:{table}", repr(rows).encode()
            finally:
                db.close()
        except sqlite3.Error:
            return


@dataclass(frozen=True)
class Hit:
    where: str
    what: str


def scan(files: Iterable[Path], needles: Needles) -> list[Hit]:
    """Every needle, and every PEM private-key marker, in `files`."""
    hits = []
    for path in files:
        for where, data in _contents(path):
            if PEM_MARKER.search(data):
                hits.append(Hit(where, "a PEM private-key marker"))
            for needle, name in needles.found.items():
                if needle in data:
                    hits.append(Hit(where, name))
    return hits
