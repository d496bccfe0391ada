"""Message signing: detached signatures by the current message-signing key.

The signature covers a small content record (payload digest and size, signing time,
trust-state version, signer fingerprint), so a verifier can check the signer's
validity at signing time and that the payload was not changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from keyplane.plugins.keys import KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.trust import sign_with
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import KeyKind
from keyplane.v1 import message_signing_service_pb2 as pb

MESSAGE_CONTEXT = b"keyplane-message-v1\0"
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_BATCH = 1000


def signature_algorithm_name(algorithm: KeyAlgorithm) -> str:
    if algorithm.is_ec:
        return "ecdsa-sha384" if algorithm is KeyAlgorithm.EC_P384 else "ecdsa-sha256"
    return "rsa-pkcs1-sha256"


class MessageSigner:
    """Signs payloads with the active message-signing key of the newest root."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        # Certificate chains are immutable per key: parse them once.
        self._chains: dict[str, list[bytes]] = {}

    def sign(self, payload: bytes) -> pb.SignedMessage:
        if len(payload) > MAX_PAYLOAD:
            raise InvalidArgument(
                f"the payload is {len(payload)} bytes; sign at most {MAX_PAYLOAD} bytes "
                "(4 MiB), or sign a digest of a larger file"
            )
        return self._sign_all([payload])[0]

    def sign_many(self, payloads: Sequence[bytes]) -> list[pb.SignedMessage]:
        """SignMessages: one SignedMessage per payload, as `sign` makes it."""
        if not payloads:
            raise InvalidArgument("SignMessages needs at least one payload")
        if len(payloads) > MAX_BATCH:
            raise InvalidArgument(
                f"SignMessages takes at most {MAX_BATCH} payloads; this request has {len(payloads)}"
            )
        total = sum(len(p) for p in payloads)
        if total > MAX_PAYLOAD:
            raise InvalidArgument(
                f"the payloads are {total} bytes together; sign at most {MAX_PAYLOAD} bytes "
                "(4 MiB) per call"
            )
        return self._sign_all(payloads)

    def _sign_all(self, payloads: Sequence[bytes]) -> list[pb.SignedMessage]:
        with self.hierarchy.store.snapshot():
            record = self.hierarchy.active_key(KeyKind.MESSAGE_SIGNING)
            issuer = self.hierarchy.store.key(record.issuer_fingerprint or "")
            version = self.hierarchy.trust.latest_version()
        key = self.hierarchy.backends.private_key(record.key_uri)
        algorithm = KeyAlgorithm(record.algorithm)
        algorithm_name = signature_algorithm_name(algorithm)
        chain = self._chains.get(record.fingerprint)
        if chain is None:
            pems = [record.certificate_pem or ""]
            if issuer is not None:
                pems.append(issuer.certificate_pem or "")
            chain = [certs.to_der(certs.load_pem(pem)) for pem in pems]
            self._chains[record.fingerprint] = chain
        signed = []
        for payload in payloads:
            content = pb.MessageSignatureContent(
                payload_sha256=hashlib.sha256(payload).digest(),
                payload_size=len(payload),
                trust_state_version=version,
                signer_fingerprint=record.fingerprint,
            )
            content.signed_at.FromDatetime(self.hierarchy.clock.now())
            content_bytes = content.SerializeToString(deterministic=True)
            signature = sign_with(key, algorithm, MESSAGE_CONTEXT + content_bytes)
            signed.append(
                pb.SignedMessage(
                    content=content_bytes,
                    signature=signature,
                    algorithm=algorithm_name,
                    certificate_chain=chain,
                )
            )
        return signed
