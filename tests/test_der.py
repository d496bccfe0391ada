"""The client-certificate template against cryptography's CertificateBuilder: for every
issuer and subject key type, role, SAN mix and validity edge, the template's
TBSCertificate is byte for byte the builder's, and its signature verifies."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification

from keyplane.server.domain import certs, client_template, der
from tests.serverkit import openssl_verify

NOW = datetime.datetime(2026, 11, 29, 7, 30, 15, 123456, tzinfo=datetime.UTC)
WEEK = datetime.timedelta(days=7)
SERIAL = 0x80 << 120 | 5  # the top bit set: encoded with a leading zero byte


def _key(kind: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def issuers() -> dict[str, tuple[object, x509.Certificate]]:
    found = {}
    for kind in ("p256", "p384", "rsa"):
        root_key = _key(kind)
        root = certs.build_root_certificate(root_key, f"{kind} root", NOW)  # type: ignore[arg-type]
        key = _key(kind)
        cert = certs.build_intermediate_certificate(
            root_key,  # type: ignore[arg-type]
            root,
            key.public_key(),  # type: ignore[arg-type]
            f"{kind} intermediate",
            NOW,
            datetime.timedelta(days=30),
        )
        found[kind] = (key, cert)
    return found


def _both(
    monkeypatch: pytest.MonkeyPatch, issuer: tuple[object, x509.Certificate], **kwargs: object
) -> tuple[x509.Certificate, x509.Certificate]:
    monkeypatch.setattr(certs, "new_serial", lambda: SERIAL)
    monkeypatch.setattr(client_template, "new_serial", lambda: SERIAL)
    key, cert = issuer
    template = certs.ClientTemplate.for_issuer(key, cert)  # type: ignore[arg-type]
    assert template is not None
    fast = certs.build_client_certificate(key, cert, **kwargs)  # type: ignore[arg-type]
    slow = certs.build_client_certificate_slowly(key, cert, **kwargs)  # type: ignore[arg-type]
    return fast, slow


@pytest.mark.parametrize(
    ("issuer_kind", "subject_kind"),
    list(itertools.product(("p256", "p384", "rsa"), ("p256", "p384", "rsa", "ed25519"))),
)
def test_template_matches_builder(
    monkeypatch: pytest.MonkeyPatch,
    issuers: dict[str, tuple[object, x509.Certificate]],
    issuer_kind: str,
    subject_kind: str,
) -> None:
    subject = _key(subject_kind).public_key()
    for role, names, server_auth, crl_url in (
        ("agent", None, False, None),
        ("agent", None, False, "http://crl.example.org:8080/crl/" + "ab" * 32 + ".crl"),
        (
            "zone-server",
            ["zone-1", "127.0.0.1", "::1", "zone-1", "zone-1.example.org"],
            True,
            "https://pki.example.org/base/crl/" + "cd" * 32 + ".crl",
        ),
    ):
        fast, slow = _both(
            monkeypatch,
            issuers[issuer_kind],
            public_key=subject,
            common_name="node-7.a_b@c",
            role=role,
            now=NOW,
            validity=WEEK,
            names=names,
            server_auth=server_auth,
            crl_url=crl_url,
        )
        assert fast.tbs_certificate_bytes == slow.tbs_certificate_bytes
        if crl_url is not None:  # the distribution point names the issuer's CRL
            points = fast.extensions.get_extension_for_class(x509.CRLDistributionPoints)
            assert points.value[0].full_name == [x509.UniformResourceIdentifier(crl_url)]
        assert fast.signature_algorithm_oid == slow.signature_algorithm_oid
        fast.verify_directly_issued_by(issuers[issuer_kind][1])
        assert fast.serial_number == SERIAL


def test_validity_is_clamped_and_late_dates_use_generalized_time(
    monkeypatch: pytest.MonkeyPatch, issuers: dict[str, tuple[object, x509.Certificate]]
) -> None:
    subject = _key("p256").public_key()
    key, cert = issuers["p256"]
    late = datetime.datetime(2049, 12, 31, 23, 59, 30, tzinfo=datetime.UTC)
    late_root = certs.build_root_certificate(key, "late root", late)  # type: ignore[arg-type]
    for issuer_cert, now, validity in (
        (cert, NOW, datetime.timedelta(days=3650)),  # past the issuer's not-after: clamped
        (late_root, late, WEEK),  # not-after in 2050: GeneralizedTime
    ):
        fast, slow = _both(
            monkeypatch,
            (key, issuer_cert),
            public_key=subject,
            common_name="n",
            role="agent",
            now=now,
            validity=validity,
        )
        assert fast.tbs_certificate_bytes == slow.tbs_certificate_bytes
        assert fast.not_valid_after_utc == min(now + validity, issuer_cert.not_valid_after_utc)
    # An issuer that expires before the certificate would start: both refuse.
    for build in (certs.build_client_certificate, certs.build_client_certificate_slowly):
        with pytest.raises(ValueError, match=r"after|before"):
            build(key, cert, subject, "n", "agent", late, WEEK)  # type: ignore[arg-type]


def test_template_certificates_verify_with_openssl_and_cryptography(tmp_path: Path) -> None:
    root_key = _key("p256")
    root = certs.build_root_certificate(root_key, "r", NOW)  # type: ignore[arg-type]
    mid_key = _key("p256")
    mid = certs.build_intermediate_certificate(
        root_key,  # type: ignore[arg-type]
        root,
        mid_key.public_key(),  # type: ignore[arg-type]
        "m",
        NOW,
        datetime.timedelta(days=30),
    )
    leaf = certs.build_client_certificate(
        mid_key,  # type: ignore[arg-type]
        mid,
        _key("p256").public_key(),  # type: ignore[arg-type]
        "node-1",
        "agent",
        datetime.datetime.now(datetime.UTC),
        WEEK,
    )
    chain = certs.to_pem(leaf) + certs.to_pem(mid)
    result = openssl_verify(tmp_path, certs.to_pem(root), chain)
    assert result.returncode == 0, result.stderr + result.stdout
    store = verification.Store([root])
    verifier = verification.PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(leaf, [mid])
    assert verified.chain[-1] == root


def test_der_reader_refuses_truncated_input() -> None:
    encoded = der.sequence(der.integer(300), der.oid("1.2.840.10045.4.3.2"))
    assert der.read(encoded) == (der.SEQUENCE, 2, len(encoded))
    for cut in (1, 3, len(encoded) - 1):
        with pytest.raises(ValueError, match="truncated"):
            der.children(encoded[:cut], 2, len(encoded))
    long = der.tlv(der.OCTET_STRING, b"x" * 300)
    assert long[:4] == b"\x04\x82\x01\x2c"
    assert der.read(long) == (der.OCTET_STRING, 4, 304)


@pytest.mark.parametrize("subject_kind", ["p256", "rsa", "ed25519"])
def test_client_record_matches_the_record_of_the_parsed_certificate(
    issuers: dict[str, tuple[object, x509.Certificate]], subject_kind: str
) -> None:
    key, cert = issuers["p384"]
    public = _key(subject_kind).public_key()
    for common_name, role in (("node-1", "agent"), ("zone a, b", "zone-server")):
        record = certs.client_record(
            key,  # type: ignore[arg-type]
            cert,
            "f" * 64,
            public,  # type: ignore[arg-type]
            common_name,
            role,
            NOW,
            WEEK,
            names=["zone-a"],
            server_auth=role == "zone-server",
        )
        parsed = certs.load_pem(record.certificate_pem)
        assert record == certs.record_of(parsed, role, "f" * 64, NOW)
        assert parsed.subject.rfc4514_string() == record.subject


def test_pkcs11_ecdsa_signature_encoding_matches_cryptography() -> None:
    """The PKCS#11 backend turns r || s into DER by hand; cryptography's encoder is the
    reference, on the edges (leading zeros, the top bit set, zero) and at random."""
    import secrets

    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from keyplane.plugins.errors import KeyOperationError
    from keyplane.plugins.pkcs11_backend import _ecdsa_der

    cases = [(0, 0), (1, 0x80), (0x7F, 0xFF), (2**255, 2**256 - 1), (2**247, 5)]
    for size in (32, 48, 66):
        cases += [(secrets.randbits(8 * size), secrets.randbits(8 * size)) for _ in range(500)]
        cases += [(secrets.randbits(8 * size - 9), secrets.randbits(8 * size)) for _ in range(50)]
        for r, s in cases:
            if max(r, s).bit_length() > 8 * size:
                continue
            raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
            assert _ecdsa_der(raw) == encode_dss_signature(r, s), (size, r, s)
    for bad in (b"", b"\x01", b"\x01" * 33, b"\x01" * 134):
        with pytest.raises(KeyOperationError):
            _ecdsa_der(bad)
