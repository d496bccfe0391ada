"""Init bundles (the active roots, the server's and every live zone server's listeners,
the trusted peers' roots and listeners, the trust-state version, signed by every active
root; never a secret) and the legacy public key file."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from keyplane.plugins.keys import KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.trust import sign_with
from keyplane.server.errors import FailedPrecondition
from keyplane.server.kinds import KeyState
from keyplane.v1 import bundle_service_pb2, trust_state_pb2

BUNDLE_CONTEXT = b"keyplane-init-bundle-v1\0"


class Bundles:
    """What new components bootstrap from."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy

    def init_bundle(self, listen: str, bootstrap_listen: str) -> bundle_service_pb2.InitBundle:
        hierarchy = self.hierarchy
        body = bundle_service_pb2.InitBundleBody(
            format=1, trust_state_version=hierarchy.trust.latest_version()
        )
        body.create_time.FromDatetime(hierarchy.clock.now())
        roots = hierarchy.active_roots()
        for root in roots:
            body.roots.append(
                trust_state_pb2.TrustedCertificate(
                    fingerprint=root.fingerprint,
                    name=root.name,
                    state=KeyState.ACTIVE,
                    certificate_der=certs.to_der(certs.load_pem(root.certificate_pem or "")),
                    kind=root.kind,
                )
            )
        body.servers.add(
            name=hierarchy.config.fqdn, listen=listen, bootstrap_listen=bootstrap_listen
        )
        for zone in hierarchy.store.zones():
            body.servers.add(
                name=zone.name,
                listen=zone.listen,
                bootstrap_listen=zone.bootstrap_listen,
                zone=True,
            )
        for peer in hierarchy.admission.peers.views():
            body.peer_roots.extend(peer.server().roots)
            body.servers.add(
                name=peer.fqdn,
                listen=peer.record.listen,
                bootstrap_listen=peer.record.bootstrap_listen,
                peer=True,
            )
        body_bytes = body.SerializeToString(deterministic=True)
        bundle = bundle_service_pb2.InitBundle(body=body_bytes)
        for root in roots:
            key = hierarchy.backends.private_key(root.key_uri)
            bundle.signatures.add(
                root_fingerprint=root.fingerprint,
                signature=sign_with(key, KeyAlgorithm(root.algorithm), BUNDLE_CONTEXT + body_bytes),
            )
        return bundle

    def legacy_public_key(self) -> tuple[str, str]:
        if not self.hierarchy.settings.flag("EnableLegacyProtocol"):
            raise FailedPrecondition(
                "the legacy public key is served only while the setting EnableLegacyProtocol "
                "is true ('keyplane settings set EnableLegacyProtocol true')"
            )
        legacy = self.hierarchy.legacy_root()
        pem = self.hierarchy.public_key_of(legacy).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode(), legacy.fingerprint
