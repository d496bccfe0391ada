"""The secret scanner (tests/secretscan.py, what `make test-secrets` runs) finds what it
is for: a key planted in each form and place it searches (PKCS#8 DER in a log, its
base64 in JSON, a raw scalar as hex in an error message, a PEM block in a page, a
password in the audit DB, a key inside a backup tar, an RSA prime), taking its needles
from a real server's pki.db and from key and password files; and it finds nothing in
files that hold only public material."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyplane.plugins.software import SoftwareBackend
from tests import secretscan
from tests.serverkit import running_server


def _pkcs8(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_a_planted_key_is_found_in_every_form_and_place(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    run = tmp_path / "run"
    run.mkdir()
    # Where components keep keys by design: their keys become needles, not hits.
    (run / "key.pem").write_bytes(_pem(ec_key))
    (run / "agent-key.pem").write_bytes(_pem(rsa_key) + _pem(ed_key))
    (run / "db-password").write_text("a database password, long\n")
    (run / "old").write_text("a database password, long\n")  # a password file by content
    scalar = ec_key.private_numbers().private_value.to_bytes(32, "big")
    planted = {
        "server.log": b"DEBUG signing with " + _pkcs8(ec_key) + b" done\n",
        "bundle.json": json.dumps({"key": base64.b64encode(_pkcs8(ec_key)).decode()}).encode(),
        "error.txt": f"INVALID_ARGUMENT: bad key {scalar.hex()}".encode(),
        "page.html": b"<pre>" + _pem(ed_key) + b"</pre>",
        "prime.txt": rsa_key.private_numbers().p.to_bytes(128, "big").hex().upper().encode(),
        "b64-scalar.txt": b"x" + base64.b64encode(b"\x00" + scalar),  # off alignment
    }
    for name, data in planted.items():
        (run / name).write_bytes(data)
    with sqlite3.connect(run / "keyplane.db") as db:
        db.execute("CREATE TABLE audit (detail TEXT)")
        db.execute("INSERT INTO audit VALUES ('changed to a database password, long')")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("inside/raw.key.bin")
        member.size = len(_pkcs8(rsa_key))
        tar.addfile(member, io.BytesIO(_pkcs8(rsa_key)))
    (run / "backup.tar").write_bytes(archive.getvalue())
    needles = secretscan.Needles()
    haystack, closed = secretscan.gather([run], needles)
    assert needles.keys == 3 and not closed
    assert {p.name for p in haystack} == {*planted, "keyplane.db", "backup.tar"}
    hits = secretscan.scan(haystack, needles)
    found = {Path(h.where.split("!")[0].split(":")[0]).name for h in hits}
    assert found == {*planted, "keyplane.db", "backup.tar"}, hits
    assert any("PEM private-key marker" in h.what for h in hits if "page.html" in h.where)
    assert any("password file" in h.what for h in hits if "keyplane.db" in h.where)


def test_a_real_servers_keys_are_needles_and_its_files_are_clean(tmp_path: Path) -> None:
    """The needles come from pki.db itself (so a key that leaked into keyplane.db, a
    log or a bundle would be found), and a fresh server's data dir has no hit."""
    data = tmp_path / "data"
    with running_server(data) as server, server.admin_client() as admin:
        bundle = admin.get_init_bundle().SerializeToString()
        [trust] = admin.get_trust_state()
    (tmp_path / "bundle.dat").write_bytes(bundle)
    (tmp_path / "trust.bin").write_bytes(trust.SerializeToString())
    needles = secretscan.Needles()
    haystack, closed = secretscan.gather([tmp_path], needles)
    backend = SoftwareBackend(data / "pki.db")
    try:
        ids = backend.key_ids()
        leaked = backend._unseal(ids[0])
    finally:
        backend.close()
    assert needles.keys >= len(ids) >= 3 and not closed
    assert secretscan.scan(haystack, needles) == []
    (tmp_path / "oops.log").write_bytes(b"key: " + base64.b64encode(leaked))
    hits = secretscan.scan([tmp_path / "oops.log"], needles)
    assert hits and all("PKCS#8" in h.what or "scalar" in h.what for h in hits)
