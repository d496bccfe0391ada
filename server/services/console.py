"""ConsoleService: one-time sign-in links to the admin console; thin over the console
sign-in domain."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable

from keyplane.server.domain.console_sessions import ConsoleSignIn
from keyplane.server.errors import FailedPrecondition
from keyplane.server.services import convert
from keyplane.server.services.context import Context, caller
from keyplane.v1 import console_service_pb2 as pb
from keyplane.v1 import console_service_pb2_grpc


class ConsoleServicer(console_service_pb2_grpc.ConsoleServiceServicer):
    """Sign-in links, for whichever worker takes the call (the links live in the DB)."""

    def __init__(self, sign_in: ConsoleSignIn, console_url: Callable[[], str | None]) -> None:
        self._sign_in = sign_in
        self._console_url = console_url

    async def CreateSignInLink(
        self, request: pb.CreateSignInLinkRequest, context: Context
    ) -> pb.CreateSignInLinkResponse:
        base = self._console_url()
        if base is None:
            raise FailedPrecondition(
                "this server runs no admin console; start it with --console-listen "
                "HOST:PORT (config: console_listen)"
            )
        link = await asyncio.to_thread(self._sign_in.create_link, caller())
        query = urllib.parse.urlencode({"link": link.token})
        return pb.CreateSignInLinkResponse(
            url=f"{base}/signin?{query}",
            expire_time=convert.timestamp(link.expires_at),
            name=link.name,
            roles=sorted(link.roles),
        )
