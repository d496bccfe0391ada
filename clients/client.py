"""A typed client over the generated keyplane.v1 stubs."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keyplane.clients.credentials import Credential
from keyplane.v1 import common_pb2, root_key_service_pb2, root_key_service_pb2_grpc

DEFAULT_TIMEOUT = 60.0


class KeyplaneClientError(Exception):
    """A call failed: the gRPC status name, the server's message and its ErrorInfo reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> KeyplaneClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        reason = ""
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason = info.reason
        return cls(code, message or "", reason)


ALGORITHMS = {
    "ec-p256": common_pb2.KEY_ALGORITHM_EC_P256,
    "ec-p384": common_pb2.KEY_ALGORITHM_EC_P384,
    "rsa-2048": common_pb2.KEY_ALGORITHM_RSA_2048,
    "rsa-3072": common_pb2.KEY_ALGORITHM_RSA_3072,
    "rsa-4096": common_pb2.KEY_ALGORITHM_RSA_4096,
}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}


def channel_for(address: str, credential: Credential) -> grpc.Channel:
    """A mutual-TLS channel to `address` presenting `credential`."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=credential.root_certificates_pem,
        private_key=credential.private_key_pem,
        certificate_chain=credential.certificate_chain_pem,
    )
    return grpc.secure_channel(address, creds)


class KeyplaneClient:
    """Calls a keyplane server; every method raises KeyplaneClientError on failure."""

    def __init__(self, channel: grpc.Channel, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._channel = channel
        self._timeout = timeout
        self._roots = root_key_service_pb2_grpc.RootKeyServiceStub(channel)  # type: ignore[no-untyped-call]

    @classmethod
    def connect(cls, address: str, credential: Credential) -> KeyplaneClient:
        return cls(channel_for(address, credential))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyplaneClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise KeyplaneClientError.from_rpc_error(exc) from None

    def list_root_keys(self) -> root_key_service_pb2.ListRootKeysResponse:
        response: root_key_service_pb2.ListRootKeysResponse = self._call(
            self._roots.ListRootKeys, root_key_service_pb2.ListRootKeysRequest()
        )
        return response

    def create_root_key(self, algorithm: str | None = None) -> root_key_service_pb2.RootKey:
        request = root_key_service_pb2.CreateRootKeyRequest(
            algorithm=ALGORITHMS[algorithm] if algorithm else common_pb2.KEY_ALGORITHM_UNSPECIFIED
        )
        response: root_key_service_pb2.CreateRootKeyResponse = self._call(
            self._roots.CreateRootKey, request
        )
        return response.root_key

    def get_root_key(self, fingerprint: str) -> root_key_service_pb2.RootKey:
        request = root_key_service_pb2.GetRootKeyRequest(fingerprint=fingerprint)
        response: root_key_service_pb2.GetRootKeyResponse = self._call(
            self._roots.GetRootKey, request
        )
        return response.root_key

    def revoke_root_key(
        self, fingerprint: str, reason: str, confirm: bool
    ) -> root_key_service_pb2.RootKey:
        request = root_key_service_pb2.RevokeRootKeyRequest(
            fingerprint=fingerprint, reason=reason, confirm=confirm
        )
        response: root_key_service_pb2.RevokeRootKeyResponse = self._call(
            self._roots.RevokeRootKey, request
        )
        return response.root_key

    def get_legacy_root_key(self) -> root_key_service_pb2.LegacyRootKey:
        response: root_key_service_pb2.GetLegacyRootKeyResponse = self._call(
            self._roots.GetLegacyRootKey, root_key_service_pb2.GetLegacyRootKeyRequest()
        )
        return response.legacy
