"""The calls a keyplane server makes to a peer server (active/active), on the peer's
bootstrap listener: the exchange's messages, its trust state, pushing this server's.

Before the first call there is nothing to trust the peer's TLS certificate by, so
`discover` makes a plain TLS handshake without verification only to read the chain the
peer serves; the exchange then decides, from the admin's fingerprint, whether that
chain is the peer's (server/domain/exchange.py). Every later call is gRPC over TLS that
trusts exactly the peer's roots and the name its certificate carries (its fqdn).

Failures become the domain's errors: a peer that does not answer UNAVAILABLE (or
DEADLINE_EXCEEDED), a peer's refusal its own status, with the peer named.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509

from keyplane.server.config import parse_address
from keyplane.server.domain import certs
from keyplane.server.domain.peer_side import PeerAddress
from keyplane.server.errors import (
    AlreadyExists,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeyplaneError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from keyplane.v1 import (
    trust_service_pb2,
    trust_service_pb2_grpc,
    trust_state_pb2,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
)

PEER_TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_ERRORS: dict[grpc.StatusCode, type[KeyplaneError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
}


def _served_chain(bootstrap: str, timeout: float) -> list[x509.Certificate]:
    """The certificates the listener at `bootstrap` serves, leaf first, unverified."""
    try:
        host, port = parse_address(bootstrap, "--peer")
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read only: the exchange decides what to trust
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            chain = _unverified_chain(tls)
    except TimeoutError:
        raise DeadlineExceeded(f"the peer at {bootstrap} did not answer in time") from None
    except (OSError, ssl.SSLError) as exc:
        raise Unavailable(f"the peer at {bootstrap} does not answer ({exc})") from None
    return chain


def _unverified_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The chain as served: SSLSocket.get_unverified_chain from Python 3.13, its
    private counterpart (there since 3.10) before."""
    getter = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    served: list[Any] = list(getter() or [])
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in served]  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(d) for d in ders]


def _grpc_error(peer: str, exc: grpc.RpcError) -> KeyplaneError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    error = _ERRORS.get(code, Unavailable)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return error(f"the peer {peer} does not answer ({code.name}: {details})")
    return error(f"the peer {peer} refused: {details}")


class GrpcPeerTransport:
    """PeerTransport over gRPC (see the module docstring)."""

    def __init__(self, timeout: float = PEER_TIMEOUT) -> None:
        self.timeout = timeout

    def _channel(self, address: str, roots_pem: bytes, name: str) -> grpc.Channel:
        return grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=roots_pem),
            options=[
                ("grpc.ssl_target_name_override", name),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )

    def _call(self, peer: PeerAddress, call: Callable[[grpc.Channel], Any], name: str = "") -> Any:
        with self._channel(peer.bootstrap_listen, peer.roots_pem, name or peer.fqdn) as channel:
            try:
                return call(channel)
            except grpc.RpcError as exc:
                raise _grpc_error(peer.fqdn or peer.bootstrap_listen, exc) from None

    def discover(
        self, bootstrap_listen: str
    ) -> tuple[x509.Certificate, list[trust_state_pb2.SignedTrustState]]:
        chain = _served_chain(bootstrap_listen, self.timeout)
        if len(chain) < 2:
            raise PermissionDenied(
                f"the server at {bootstrap_listen} serves no certificate chain up to a root; "
                "it is not a keyplane server"
            )
        leaf, root = chain[0], chain[-1]
        names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        address = PeerAddress("", bootstrap_listen, certs.to_pem(root).encode())

        def fetch(channel: grpc.Channel) -> list[trust_state_pb2.SignedTrustState]:
            stub = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)  # type: ignore[no-untyped-call]
            response = stub.GetTrustState(
                trust_state_service_pb2.GetTrustStateRequest(since_version=0),
                timeout=self.timeout,
            )
            return list(response.versions)

        return root, self._call(address, fetch, name)

    def _trust(self, peer: PeerAddress, method: str, request: Any) -> Any:
        def call(channel: grpc.Channel) -> Any:
            stub = trust_service_pb2_grpc.TrustServiceStub(channel)  # type: ignore[no-untyped-call]
            return getattr(stub, method)(request, timeout=self.timeout)

        return self._call(peer, call)

    def offer(
        self, peer: PeerAddress, message: trust_service_pb2.SignedPeerMessage
    ) -> trust_service_pb2.SignedPeerMessage:
        response = self._trust(
            peer, "OfferTrust", trust_service_pb2.OfferTrustRequest(message=message)
        )
        return response.message  # type: ignore[no-any-return]

    def reveal(self, peer: PeerAddress, message: trust_service_pb2.SignedPeerMessage) -> str:
        response = self._trust(
            peer, "RevealTrustNonce", trust_service_pb2.RevealTrustNonceRequest(message=message)
        )
        return str(response.comparison_code)

    def decide(
        self, peer: PeerAddress, message: trust_service_pb2.SignedPeerMessage
    ) -> trust_service_pb2.SignedPeerMessage | None:
        response = self._trust(
            peer, "DecideTrust", trust_service_pb2.DecideTrustRequest(message=message)
        )
        return response.message if response.HasField("message") else None

    def end(self, peer: PeerAddress, message: trust_service_pb2.SignedPeerMessage) -> None:
        self._trust(peer, "EndTrust", trust_service_pb2.EndTrustRequest(message=message))

    def trust_states(self, peer: PeerAddress, since: int) -> list[trust_state_pb2.SignedTrustState]:
        def fetch(channel: grpc.Channel) -> list[trust_state_pb2.SignedTrustState]:
            stub = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)  # type: ignore[no-untyped-call]
            response = stub.GetTrustState(
                trust_state_service_pb2.GetTrustStateRequest(since_version=since),
                timeout=self.timeout,
            )
            return list(response.versions)

        return self._call(peer, fetch)  # type: ignore[no-any-return]

    def push(
        self,
        peer: PeerAddress,
        sender_fqdn: str,
        versions: list[trust_state_pb2.SignedTrustState],
    ) -> int:
        response = self._trust(
            peer,
            "PushTrustState",
            trust_service_pb2.PushTrustStateRequest(sender_fqdn=sender_fqdn, versions=versions),
        )
        return int(response.held_version)
