"""The software backend's pki.db: sealed at rest, password or key file, bound to key ids."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyplane.plugins.errors import (
    BackendAuthError,
    BackendConfigError,
    PasswordRequiredError,
    SealedKeyError,
)
from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm
from keyplane.plugins.manager import KeyBackends
from keyplane.plugins.uri import SoftwareKeyUri


def password_file(directory: Path, password: str, name: str = "pki-db-password") -> str:
    path = directory / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


@contextlib.contextmanager
def opened(data_dir: Path, **options: object) -> Iterator[KeyBackends]:
    backends = KeyBackends({"software": options}, data_dir)
    try:
        yield backends
    finally:
        backends.close()


def signs(key: BackendPrivateKey) -> bool:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(b"still signs", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"still signs", ec.ECDSA(hashes.SHA256()))
    return True


def database_bytes(data_dir: Path) -> bytes:
    """Every byte SQLite keeps for pki.db (main file and any journal), read raw."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("pki.db*")) if p.is_file())


def test_password_protected_database_reopens_with_the_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret = password_file(tmp_path, "correct horse battery staple")
    with opened(data_dir, password_file=secret) as backends:
        uri = backends.generate_key("software", "root", KeyAlgorithm.EC_P256).uri

    with opened(data_dir, password_file=secret) as backends:
        assert signs(backends.private_key(uri))
    assert not (data_dir / "pki.db.key").exists()


def test_wrong_password_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir, password_file=password_file(tmp_path, "right password")) as backends:
        backends.generate_key("software", "root", KeyAlgorithm.EC_P256)

    wrong = password_file(tmp_path, "wrong password", name="wrong")
    with pytest.raises(BackendAuthError) as excinfo:
        KeyBackends({"software": {"password_file": wrong}}, data_dir)

    assert "wrong password" not in str(excinfo.value)
    assert "right password" not in str(excinfo.value)


def test_password_protected_database_opened_without_password_is_a_config_error(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir, password_file=password_file(tmp_path, "right password")):
        pass

    with pytest.raises(BackendConfigError, match="password"):
        KeyBackends({"software": {}}, data_dir)


def test_without_password_a_0600_key_file_seals_the_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir) as backends:
        uri = backends.generate_key("software", "root", KeyAlgorithm.EC_P256).uri

    key_file = data_dir / "pki.db.key"
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "pki.db").stat().st_mode) == 0o600
    with opened(data_dir) as backends:
        assert signs(backends.private_key(uri))


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=str)
def test_database_holds_public_keys_but_no_private_key_in_clear(
    tmp_path: Path, algorithm: KeyAlgorithm
) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir) as backends:
        generated = backends.generate_key("software", "root", algorithm)
        # The TLS hand-off is the one way a software key leaves the backend: use it to
        # learn what the clear private key would look like on disk.
        private = serialization.load_pem_private_key(
            backends.tls_private_key_pem(generated.uri), password=None
        )
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    traditional = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = generated.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(private, ec.EllipticCurvePrivateKey):
        secret = private.private_numbers().private_value.to_bytes(32)
    else:
        assert isinstance(private, rsa.RSAPrivateKey)
        secret = private.private_numbers().d.to_bytes(256)

    raw = database_bytes(data_dir)

    assert public_der in raw
    assert pkcs8 not in raw
    assert traditional not in raw
    assert secret not in raw
    # No PKCS#8 header (version 0, then an AlgorithmIdentifier) of any clear key either.
    assert b"\x02\x01\x00\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01" not in raw
    assert b"\x02\x01\x00\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01" not in raw


def test_change_password_rewraps_every_key_and_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    configured = password_file(tmp_path, "old password")
    old_copy = password_file(tmp_path, "old password", name="old-copy")
    with opened(data_dir, password_file=configured) as backends:
        uris = [
            backends.generate_key("software", f"key {i}", KeyAlgorithm.EC_P256).uri
            for i in range(3)
        ]
        backends.secret_store().store_secret("PKIDatabasePassword", b"new password")
        backends.secret_store().change_password(b"new password")
        assert all(signs(backends.private_key(uri)) for uri in uris)

    # The new password is put where the configuration reads it from.
    assert Path(configured).read_text().strip() == "new password"
    assert stat.S_IMODE(Path(configured).stat().st_mode) == 0o600
    with pytest.raises(BackendAuthError):
        KeyBackends({"software": {"password_file": old_copy}}, data_dir)
    with opened(data_dir, password_file=configured) as backends:
        assert all(signs(backends.private_key(uri)) for uri in uris)
        assert backends.secret_store().load_secret("PKIDatabasePassword") == b"new password"
    assert b"new password" not in database_bytes(data_dir)


def test_setting_a_password_on_a_key_file_database_removes_the_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir) as backends:
        uri = backends.generate_key("software", "root", KeyAlgorithm.EC_P256).uri
    # The operator names a password file (it need not exist yet), restarts, and sets it.
    secret = tmp_path / "pki-db-password"
    with opened(data_dir, password_file=str(secret)) as backends:
        backends.secret_store().change_password(b"first password")

    assert not (data_dir / "pki.db.key").exists()
    assert secret.read_text() == "first password\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(PasswordRequiredError):
        KeyBackends({"software": {}}, data_dir)
    with opened(data_dir, password_file=str(secret)) as backends:
        assert signs(backends.private_key(uri))


def test_sealed_key_moved_to_another_id_does_not_unseal(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with opened(data_dir) as backends:
        victim = backends.generate_key("software", "victim", KeyAlgorithm.EC_P256).uri
        donor = backends.generate_key("software", "donor", KeyAlgorithm.EC_P256).uri
    victim_id = SoftwareKeyUri.parse(victim).key_id
    donor_id = SoftwareKeyUri.parse(donor).key_id
    # Copy the donor's sealed blob over the victim's row, as an attacker with the file could.
    with contextlib.closing(sqlite3.connect(data_dir / "pki.db")) as db, db:
        nonce, sealed = db.execute(
            "SELECT nonce, sealed FROM keys WHERE id = ?", (donor_id,)
        ).fetchone()
        db.execute("UPDATE keys SET nonce = ?, sealed = ? WHERE id = ?", (nonce, sealed, victim_id))

    # Every sealed key is opened when pki.db is: the moved one refuses the open, by name.
    with pytest.raises(SealedKeyError, match=f"software:{victim_id}"):
        KeyBackends({"software": {}}, data_dir)
