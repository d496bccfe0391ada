"""MessageSigningService: detached signatures by the current message-signing key."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.signing import MessageSigner
from keyplane.server.services.context import Context
from keyplane.v1 import message_signing_service_pb2 as pb
from keyplane.v1 import message_signing_service_pb2_grpc

INLINE_PAYLOAD = 64 * 1024
# Batches of up to this many payloads are signed on the event loop; larger ones in a
# thread, so other calls go on meanwhile.
INLINE_BATCH = 16


class MessageSigningServicer(message_signing_service_pb2_grpc.MessageSigningServiceServicer):
    """Thin: small payloads are signed inline, large ones (or HSM keys) in a thread."""

    def __init__(self, signer: MessageSigner) -> None:
        self._signer = signer
        self._inline = signer.hierarchy.config.backend_for("message_signing") == "software"

    async def SignMessage(
        self, request: pb.SignMessageRequest, context: Context
    ) -> pb.SignMessageResponse:
        if self._inline and len(request.payload) <= INLINE_PAYLOAD:
            # A small payload and a software key: hashing and one signature cost less
            # than a thread hop. An HSM key may wait on its token, so it gets a thread.
            signed = self._signer.sign(request.payload)
        else:
            signed = await asyncio.to_thread(self._signer.sign, request.payload)
        return pb.SignMessageResponse(signed_message=signed)

    async def SignMessages(
        self, request: pb.SignMessagesRequest, context: Context
    ) -> pb.SignMessagesResponse:
        payloads = list(request.payloads)
        if (
            self._inline
            and len(payloads) <= INLINE_BATCH
            and sum(map(len, payloads)) <= (INLINE_PAYLOAD)
        ):
            signed = self._signer.sign_many(payloads)
        else:
            signed = await asyncio.to_thread(self._signer.sign_many, payloads)
        return pb.SignMessagesResponse(signed_messages=signed)
