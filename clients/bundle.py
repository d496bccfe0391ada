"""Init bundles: read `keyplane-init.dat`, check its signatures, and pick a server.

A bundle is signed by every root it names. It is accepted when at least one root's
signature verifies and, when the component was given `--fingerprint`, that root is
among the bundle's roots (a mismatch stops the component with a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from keyplane.clients.trust import UNPARSED, key_fingerprint, verify_signature
from keyplane.v1 import bundle_service_pb2

BUNDLE_CONTEXT = b"keyplane-init-bundle-v1\0"


class BundleError(Exception):
    """The init bundle cannot be used; the message says why."""


@dataclass(frozen=True)
class Bundle:
    """A verified init bundle."""

    body: bundle_service_pb2.InitBundleBody
    roots: dict[str, x509.Certificate]

    @property
    def root_fingerprints(self) -> list[str]:
        return list(self.roots)

    def roots_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots.values())

    def enrollment_endpoint(self) -> bundle_service_pb2.ServerEndpoint:
        """Where to enroll: the first zone server if the bundle names one, else the server
        (never a peer server: a component enrolls with its own)."""
        zones = [s for s in self.body.servers if s.zone and not s.peer]
        if zones:
            return zones[0]
        return self.server()

    def server(self) -> bundle_service_pb2.ServerEndpoint:
        servers = [s for s in self.body.servers if not s.zone and not s.peer]
        if not servers:
            raise BundleError("the init bundle names no server")
        return servers[0]


def load_bundle(data: bytes, fingerprint: str | None = None) -> Bundle:
    """Parse and verify an init bundle; BundleError with the reason otherwise."""
    try:
        bundle = bundle_service_pb2.InitBundle.FromString(data)
        body = bundle_service_pb2.InitBundleBody.FromString(bundle.body)
    except Exception:  # protobuf's DecodeError
        raise BundleError("the init bundle does not parse (is it a keyplane-init.dat?)") from None
    if body.format != 1:
        raise BundleError(f"init bundle format {body.format} is not supported")
    roots: dict[str, x509.Certificate] = {}
    for root in body.roots:
        try:
            cert = x509.load_der_x509_certificate(root.certificate_der)
            found = key_fingerprint(cert)
        except UNPARSED:
            raise BundleError(f"root {root.fingerprint[:64]} has no valid certificate") from None
        if found != root.fingerprint:
            raise BundleError(f"root {root.fingerprint} does not match its certificate")
        roots[root.fingerprint] = cert
    if not roots:
        raise BundleError("the init bundle names no root")
    if fingerprint:
        pin = fingerprint.strip().lower().removeprefix("sha256:")
        if pin not in roots:
            raise BundleError(
                f"the init bundle's roots ({', '.join(roots)}) do not include the expected "
                f"fingerprint {pin}; this bundle is not from the server you expect"
            )
        signers = {pin: roots[pin]}
    else:
        signers = roots
    for signature in bundle.signatures:
        signer = signers.get(signature.root_fingerprint)
        if signer is not None and verify_signature(
            signer.public_key(), signature.signature, BUNDLE_CONTEXT + bundle.body
        ):
            return Bundle(body, roots)
    raise BundleError("the init bundle's signature does not verify (damaged or forged)")
