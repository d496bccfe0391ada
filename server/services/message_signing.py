"""MessageSigningService: detached signatures by the current message-signing key."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.signing import MessageSigner
from keyplane.server.services.root_keys import Context
from keyplane.v1 import message_signing_service_pb2 as pb
from keyplane.v1 import message_signing_service_pb2_grpc


class MessageSigningServicer(message_signing_service_pb2_grpc.MessageSigningServiceServicer):
    """Thin: hands the payload to the signer off the event loop."""

    def __init__(self, signer: MessageSigner) -> None:
        self._signer = signer

    async def SignMessage(
        self, request: pb.SignMessageRequest, context: Context
    ) -> pb.SignMessageResponse:
        signed = await asyncio.to_thread(self._signer.sign, request.payload)
        return pb.SignMessageResponse(signed_message=signed)
