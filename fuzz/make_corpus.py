"""Write the seed corpora (fuzz/corpus/<target>/) and the fixtures (fuzz/fixtures/) from
real documents: a real server in this process makes a CSR of each key kind keyplane
accepts, an init bundle, trust-state versions (as a file and as a peer pushes them), an
offer from a made-up peer, signed messages, renewal requests with their proofs, and
backup archives with their manifests.

    .venv/bin/python -m fuzz.make_corpus
"""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fuzz.harness import CORPUS, FIXTURES, PAYLOAD
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.clients.renewal import renewal_proof
from keyplane.clients.trust import load
from keyplane.server.domain import backup_archive
from keyplane.server.domain.backups import Backups
from keyplane.v1 import enrollment_service_pb2, trust_service_pb2


def _csr(key: object, cn: str = "agent-1", san: list[x509.GeneralName] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def _tiny_db(path: Path) -> None:
    """A small real SQLite file (512-byte pages), for archives small enough to mutate."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA page_size = 512")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()


def _small_archive(manifest: backup_archive.Manifest, workdir: Path) -> bytes:
    """An archive in the real format of `manifest`'s shape, over tiny database files."""
    files = {}
    members = []
    for member in manifest.members:
        path = workdir / member.name
        _tiny_db(path)
        files[member.name] = path
        members.append(backup_archive.member_of(path))
    small = backup_archive.Manifest(
        **{**manifest.__dict__, "members": tuple(members), "keys": manifest.keys[:2]}
    )
    out = workdir / "small.tar"
    backup_archive.write_archive(out, small, files)
    return out.read_bytes()


def main() -> None:
    from tests.hostile_kit import peer_message
    from tests.serverkit import FQDN, running_server

    shutil.rmtree(CORPUS, ignore_errors=True)
    shutil.rmtree(FIXTURES, ignore_errors=True)
    FIXTURES.mkdir(parents=True)
    keys = {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    for name, key in keys.items():
        pem = _csr(key)
        _write("csr_intake", f"{name}.pem", pem)
        _write(
            "csr_intake",
            f"{name}.der",
            x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER),
        )
    _write("csr_intake", "san.pem", _csr(keys["p256"], san=[x509.DNSName("agent.example.org")]))

    with tempfile.TemporaryDirectory() as scratch, running_server(Path(scratch) / "data") as server:
        with server.admin_client() as admin:
            _write("init_bundle", "bundle.dat", admin.get_init_bundle().SerializeToString())
            [first] = admin.get_trust_state()
            admin.create_root_key()  # a second root: bundles and trust states signed twice
            _write("init_bundle", "two-roots.dat", admin.get_init_bundle().SerializeToString())
            token = admin.create_enrollment_token(uses=4).token
            # What a component that held `first` is sent: the bridging versions.
            versions = admin.get_trust_state(since_version=load(first.SerializeToString()).version)
            newest = versions[-1]
            (FIXTURES / "trust-first.bin").write_bytes(first.SerializeToString())
            (FIXTURES / "trust.bin").write_bytes(newest.SerializeToString())
            # What a trusted peer pushes: the same versions, as PushTrustState carries them.
            push = trust_service_pb2.PushTrustStateRequest(sender_fqdn=FQDN, versions=versions)
            _write("peer_trust", "push.bin", push.SerializeToString())
            offer = peer_message(trust_service_pb2.PEER_MESSAGE_KIND_OFFER, FQDN)
            _write("peer_trust", "offer.bin", offer.SerializeToString())
            for n, signed in enumerate(versions[-3:]):
                _write("trust_state", f"version-{n}.bin", signed.SerializeToString())
            body_json = json.dumps(
                {"version": 1, "signed": base64.b64encode(newest.SerializeToString()).decode()}
            )
            _write("trust_state", "show.json", body_json.encode())
            signed_message = admin.sign_message(PAYLOAD)
            _write("signed_message", "message.sig", signed_message.SerializeToString())
            backups = Backups(server.hierarchy)
            workdir = backups.new_workdir()
            try:
                made = backups.create("fuzz", workdir)
                _write("backup_manifest", "manifest.json", made.manifest.to_json())
                _write("backup_archive", "small.tar", _small_archive(made.manifest, workdir))
            finally:
                backups.discard(workdir)
        roots = (server.admin_dir / "ca.pem").read_bytes()  # both roots now
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anonymous:
            for name in ("p256", "rsa2048"):
                key = keys[name]
                issued = anonymous.enroll(_csr(key, cn=f"renew-{name}"), token)
                csr = _csr(ec.generate_private_key(ec.SECP256R1()), cn=f"renew-{name}")
                leaf = x509.load_pem_x509_certificate(issued.certificate_chain_pem.encode())
                proof, made_at = renewal_proof(key, leaf, csr, FQDN)  # type: ignore[arg-type]
                request = enrollment_service_pb2.RenewWithProofRequest(
                    csr=csr,
                    certificate_chain_pem=issued.certificate_chain_pem,
                    proof=proof,
                    proof_time=made_at,
                )
                _write("renewal_proof", f"{name}.bin", request.SerializeToString())
    (FIXTURES / "made.txt").write_text(
        f"made by python -m fuzz.make_corpus at {datetime.datetime.now(datetime.UTC).isoformat()}\n"
    )


if __name__ == "__main__":
    main()
