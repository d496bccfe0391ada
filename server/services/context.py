"""What every servicer asks of the call: the admitted caller (set by the interceptor)."""

from __future__ import annotations

from typing import TypeAlias

import grpc

from keyplane.server.domain.identity import Identity
from keyplane.server.errors import Unauthenticated
from keyplane.server.interceptor import current_identity

Context: TypeAlias = grpc.aio.ServicerContext


def caller() -> Identity:
    """The caller the interceptor admitted (mutual TLS)."""
    identity = current_identity.get()
    if identity is None:  # the access table admits no anonymous caller here
        raise Unauthenticated("this call needs a client certificate")
    return identity


def actor() -> str:
    """The audit name of the caller the interceptor admitted."""
    return caller().actor
