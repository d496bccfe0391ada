"""The console's one way in: each action and read is the RPC it mirrors, called in
process on the very servicer the gRPC server serves, as the signed-in identity.

So a page does what `keyplane <noun> <verb>` does, with the same checks, messages and
audit records: ACCESS in server/auth.py decides (and a refusal is audited as the
interceptor audits one), the servicer converts and calls the domain, and the domain's
errors come back as they would over gRPC.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from keyplane.server.auth import ACCESS, allowed, check_roles
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import PermissionDenied
from keyplane.server.interceptor import OnRefused, current_identity

log = logging.getLogger(__name__)

# A servicer's method: (request, context) -> response (or an async iterator of them).
Handler = Callable[[Any, Any], Any]
R = TypeVar("R", bound=Message)


class _ConsoleContext:
    """What a servicer is handed as its context: no servicer reads it (the caller comes
    from the identity set here, as the interceptor sets it for gRPC)."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


CONTEXT = _ConsoleContext()


def handlers_of(servicers: Mapping[str, object], services: Mapping[str, Any]) -> dict[str, Handler]:
    """Every RPC path of `services` (full name -> descriptor) to its servicer's method."""
    found: dict[str, Handler] = {}
    for name, descriptor in services.items():
        servicer = servicers[name]
        for method in descriptor.methods:
            found[f"/{name}/{method.name}"] = getattr(servicer, method.name)
    return found


class ConsoleCalls:
    """Calls RPCs in process as an identity, under the one access table."""

    def __init__(self, handlers: Mapping[str, Handler], on_refused: OnRefused | None) -> None:
        self._handlers = dict(handlers)
        self._on_refused = on_refused
        missing = [m for m in self._handlers if m not in ACCESS]
        if missing:  # the walk in tests/test_roles.py keeps this from happening
            raise ValueError(f"served but not in the access table: {missing}")

    def may(self, method: str, who: Identity) -> bool:
        """Whether `who` may call `method`: a page shows its control enabled or not."""
        return method in self._handlers and allowed(method, who)

    def check(self, method: str, who: Identity) -> None:
        """PermissionDenied (audited) unless `who` may call `method`: for a page that
        checks a form of its own before it makes the call."""
        self._admit(method, who)

    def _admit(self, method: str, who: Identity) -> Handler:
        handler = self._handlers.get(method)
        if handler is None:
            raise PermissionDenied(f"method {method} is not served here")
        try:
            check_roles(method, who)
        except PermissionDenied as exc:
            if self._on_refused is not None:
                try:
                    self._on_refused(method, who.certificate, f"{exc} (console)")
                except Exception:  # recording it must never change the answer
                    log.exception("could not note a refused console call of %s", method)
            raise
        return handler

    async def call(self, method: str, request: R, who: Identity) -> Any:
        """The response of a unary RPC, or the domain error it raised."""
        handler = self._admit(method, who)
        token = current_identity.set(who)
        try:
            return await handler(request, CONTEXT)
        finally:
            current_identity.reset(token)

    async def stream(self, method: str, request: R, who: Identity) -> AsyncIterator[Any]:
        """The responses of a server-streaming RPC, as they come."""
        handler = self._admit(method, who)
        token = current_identity.set(who)
        try:
            async for response in handler(request, CONTEXT):
                yield response
        finally:
            current_identity.reset(token)
