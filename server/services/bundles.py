"""BundleService: init bundles and the legacy public key file; thin over the bundles
domain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from keyplane.server.domain.bundles import Bundles
from keyplane.server.services.context import Context
from keyplane.v1 import bundle_service_pb2, bundle_service_pb2_grpc


class BundleServicer(bundle_service_pb2_grpc.BundleServiceServicer):
    """Init bundles and the legacy public key file."""

    def __init__(self, bundles: Bundles, endpoints: Callable[[], tuple[str, str]]) -> None:
        self._bundles = bundles
        self._endpoints = endpoints

    async def GetInitBundle(
        self, request: bundle_service_pb2.GetInitBundleRequest, context: Context
    ) -> bundle_service_pb2.GetInitBundleResponse:
        listen, bootstrap = self._endpoints()
        bundle = await asyncio.to_thread(self._bundles.init_bundle, listen, bootstrap)
        return bundle_service_pb2.GetInitBundleResponse(bundle=bundle)

    async def GetLegacyPublicKey(
        self, request: bundle_service_pb2.GetLegacyPublicKeyRequest, context: Context
    ) -> bundle_service_pb2.GetLegacyPublicKeyResponse:
        pem, fingerprint = await asyncio.to_thread(self._bundles.legacy_public_key)
        return bundle_service_pb2.GetLegacyPublicKeyResponse(
            public_key_pem=pem, fingerprint=fingerprint
        )
