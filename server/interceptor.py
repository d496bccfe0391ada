"""The one server interceptor: access control from `auth.ACCESS`, and errors to statuses.

A raw ServerInterceptor cannot see the servicer context (and so not the TLS peer), so
this one wraps each method handler's behaviour. Domain and backend errors become their
gRPC status with an ErrorInfo detail (AIP-193); any other exception becomes INTERNAL
with a generic message and an id to find the traceback in the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import inspect
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from keyplane.plugins import errors as backend_errors
from keyplane.server.auth import Admit, authorize
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.sightings import Sightings
from keyplane.server.errors import (
    InvalidArgument,
    KeyplaneError,
    PermissionDenied,
    ResourceExhausted,
)
from keyplane.server.logs import current_caller, current_rpc
from keyplane.server.metrics import Metrics, RpcMetrics, status_code_name

log = logging.getLogger(__name__)
DOMAIN = "keyplane.dev"

IDENTITY_CACHE_SIZE = 10_000

# Told of each call refused with PERMISSION_DENIED: (method, the caller's certificate,
# why). Called on the event loop, so it must not block (the server's audits it).
OnRefused = Callable[[str, x509.Certificate, str], None]

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "current_identity", default=None
)

# Backend errors that reach a caller, and the status each one means to them.
_BACKEND_STATUS: tuple[tuple[type[backend_errors.BackendError], grpc.StatusCode], ...] = (
    (backend_errors.UnsupportedAlgorithmError, grpc.StatusCode.INVALID_ARGUMENT),
    (backend_errors.InvalidKeyUriError, grpc.StatusCode.INVALID_ARGUMENT),
    (backend_errors.KeyNotFoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (backend_errors.UnknownBackendError, grpc.StatusCode.FAILED_PRECONDITION),
    (backend_errors.BackendConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (backend_errors.BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (backend_errors.BackendAuthError, grpc.StatusCode.UNAVAILABLE),
    (backend_errors.SealedKeyError, grpc.StatusCode.DATA_LOSS),
    (backend_errors.KeyOperationError, grpc.StatusCode.INTERNAL),
)


# SQLite's primary result codes (sqlite_errorcode & 0xFF) and the errnos that mean the
# data dir cannot take a write now: the caller is told so, and that nothing was written.
_SQLITE_FULL = 13
_SQLITE_UNWRITABLE = (8, 10, 14)  # READONLY, IOERR, CANTOPEN
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE_ERRNOS = (errno.EROFS, errno.EIO)
_FULL = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "the server's data dir is full: nothing was written; call again once it has space",
    "STORAGE_FULL",
)
_UNWRITABLE = (
    grpc.StatusCode.UNAVAILABLE,
    "the server cannot write its data dir (read-only or failing): nothing was written; "
    "call again once it is writable",
    "STORAGE_UNAVAILABLE",
)


def _storage_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str] | None:
    if isinstance(exc, sqlite3.Error):
        primary = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        found = _FULL if primary == _SQLITE_FULL else None
        found = _UNWRITABLE if primary in _SQLITE_UNWRITABLE else found
    elif isinstance(exc, OSError):
        found = _FULL if exc.errno in _FULL_ERRNOS else None
        found = _UNWRITABLE if exc.errno in _UNWRITABLE_ERRNOS else found
    else:
        return None
    if found is not None:
        log.warning("a write failed: %s (%s)", found[1].split(":")[0], exc)
    return found


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, message, ErrorInfo reason) for an exception a handler raised."""
    if isinstance(exc, KeyplaneError):
        return exc.code, str(exc), exc.reason
    if isinstance(exc, backend_errors.BackendError):
        for cls, code in _BACKEND_STATUS:
            if isinstance(exc, cls):
                return code, str(exc), exc.reason
    storage = _storage_status(exc)
    if storage is not None:
        return storage
    ref = secrets.token_hex(6)
    log.error("internal error %s", ref, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (reference {ref} in the server log)",
        ("INTERNAL"),
    )


# A status message travels twice in the trailers (grpc-message and the rich status), and
# a client drops trailers past 8 KiB (turning the status into RESOURCE_EXHAUSTED): a
# message that echoes a long input is cut well below that.
MAX_STATUS_MESSAGE = 1024


def rich_status(code: grpc.StatusCode, message: str, reason: str) -> grpc.Status:
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[: MAX_STATUS_MESSAGE - 14] + " … (truncated)"
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(proto)


def _peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    certs = list(context.auth_context().get("x509_pem_cert") or ())
    return bytes(certs[0]) if certs else None


@dataclass(frozen=True)
class CallLimits:
    """How many calls a process serves at once, per listener: beyond them a call gets
    RESOURCE_EXHAUSTED at once, before any of its work is done. Streams (trust-state
    watchers) are long-lived and counted apart."""

    unary_per_listener: int = 1024
    streams: int = 50_000


class _Undecodable:
    """A request body that did not parse: the handler answers INVALID_ARGUMENT."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


def _safe(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    """The handler's deserializer, turning garbage into an _Undecodable instead of an
    exception (which grpc would answer with its own status and exception text)."""
    message_type = method.rsplit("/", 1)[-1] + "Request"

    def deserialize(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable(message_type)

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"the request is not a valid keyplane.v1.{request.message_type} message "
            "(protobuf); check the client's generated code"
        )


class _Unmeasured:
    """What a call is counted by when the process keeps no metrics."""

    def started(self) -> None:
        pass

    def handled(self, code: str, seconds: float) -> None:
        pass


_UNMEASURED = _Unmeasured()


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a handler aborted its call with."""
    try:
        return status_code_name(context.code())
    except Exception:
        return "UNKNOWN"


class KeyplaneInterceptor(grpc.aio.ServerInterceptor):
    """Authorises every call from one table, bounds how many run at once, maps errors to
    statuses, and counts every call (started, handled by status, how long it took)."""

    def __init__(
        self,
        admit: Admit,
        limits: CallLimits | None = None,
        on_refused: OnRefused | None = None,
        metrics: Metrics | None = None,
        sightings: Sightings | None = None,
    ) -> None:
        self._admit_certificate = admit
        self._limits = limits or CallLimits()
        self._on_refused = on_refused
        self._metrics = metrics
        # Every admitted caller is noted as seen (in memory; written in batches).
        self._sightings = sightings
        # Calls running now: unary calls per listener (mutual TLS or bootstrap), streams.
        self._running = {"mutual-TLS": 0, "bootstrap": 0, "streams": 0}
        # Parsing the peer's PEM certificate on every call is the costliest part of
        # admission; a connection presents the same bytes each time.
        self._certificates: dict[bytes, x509.Certificate] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserializer = _safe(handler.request_deserializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary, self._measured(method, "unary")),
                deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(
                    method, handler.unary_stream, self._measured(method, "server_stream")
                ),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(
                    method, handler.stream_unary, self._measured(method, "client_stream")
                ),
                deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, self._measured(method, "bidi_stream")),
            deserializer,
            handler.response_serializer,
        )

    def _measured(self, method: str, grpc_type: str) -> RpcMetrics | _Unmeasured:
        return self._metrics.rpc(method, grpc_type) if self._metrics is not None else _UNMEASURED

    def _peer(self, context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate | None:
        pem = _peer_certificate(context)
        if pem is None:
            return None
        cert = self._certificates.get(pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(pem)
            if len(self._certificates) > IDENTITY_CACHE_SIZE:
                self._certificates.clear()
            self._certificates[pem] = cert
        return cert

    @contextlib.contextmanager
    def _slot(self, kind: str, limit: int) -> Iterator[None]:
        """One of `limit` places for a running call; RESOURCE_EXHAUSTED when none is free.
        (Everything here runs on the event loop: no lock is needed.)"""
        if self._running[kind] >= limit:
            raise ResourceExhausted(
                f"the server is running {limit} calls at once on its {kind} listener, its "
                "limit; retry with backoff"
                if kind != "streams"
                else f"the server holds {limit} streams, its limit; retry with backoff"
            )
        self._running[kind] += 1
        try:
            yield
        finally:
            self._running[kind] -= 1

    def _listener(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return "mutual-TLS" if _peer_certificate(context) is not None else "bootstrap"

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Identity | None:
        peer = self._peer(context)
        current_rpc.set(method)
        try:
            identity = authorize(method, peer, self._admit_certificate)
        except PermissionDenied as exc:
            if self._on_refused is not None and peer is not None:
                try:
                    self._on_refused(method, peer, str(exc))
                except Exception:  # recording it must never change the answer
                    log.exception("could not note a refused call of %s", method)
            raise
        current_identity.set(identity)
        if identity is not None:
            current_caller.set(identity.actor)
        if identity is not None and self._sightings is not None:
            self._sightings.seen(identity)
        return identity

    def _watched(self, identity: Identity | None) -> contextlib.AbstractContextManager[None]:
        """A stream's caller counts as seen for as long as the stream lasts."""
        if identity is None or self._sightings is None:
            return contextlib.nullcontext()
        return self._sightings.watching(identity)

    # Each wrapper counts its call as handled (in `finally`) before its status goes out,
    # so a client that has its answer finds it counted.

    def _wrap_unary(self, method: str, behavior: Any, measured: RpcMetrics | _Unmeasured) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            measured.started()
            code = "OK"
            try:
                with self._slot(self._listener(context), self._limits.unary_per_listener):
                    await self._admit(method, context)
                    _check_decoded(request)
                    return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:  # every other error becomes a status
                status = _Status.of(exc)
                code = status.code.name
                await status.abort(context)
            finally:
                measured.handled(code, time.perf_counter() - started)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Any, measured: RpcMetrics | _Unmeasured) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            return self._wrap_coroutine_stream(method, behavior, measured)

        async def wrapped_gen(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            measured.started()
            code = "CANCELLED"  # unless it ends otherwise: its client went away
            try:
                with self._slot("streams", self._limits.streams):
                    identity = await self._admit(method, context)
                    _check_decoded(request)
                    with self._watched(identity):
                        async for response in behavior(request, context):
                            yield response
                code = "OK"
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except Exception as exc:
                status = _Status.of(exc)
                code = status.code.name
                await status.abort(context)
            finally:
                measured.handled(code, time.perf_counter() - started)

        return wrapped_gen

    def _wrap_coroutine_stream(
        self, method: str, behavior: Any, measured: RpcMetrics | _Unmeasured
    ) -> Any:
        """A streaming handler that is a coroutine (it writes with context.write)."""

        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            measured.started()
            code = "OK"
            try:
                with self._slot("streams", self._limits.streams):
                    identity = await self._admit(method, context)
                    _check_decoded(request)
                    with self._watched(identity):
                        return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                status = _Status.of(exc)
                code = status.code.name
                await status.abort(context)
            finally:
                measured.handled(code, time.perf_counter() - started)

        return wrapped


@dataclass(frozen=True)
class _Status:
    """The status an exception ends its call with."""

    code: grpc.StatusCode
    message: str
    reason: str

    @classmethod
    def of(cls, exc: BaseException) -> _Status:
        return cls(*status_for(exc))

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Every refusal's words, at debug level (what `make test-secrets` searches).
        log.debug("%s answered %s: %s", current_rpc.get(), self.code.name, self.message)
        status = rich_status(self.code, self.message, self.reason)
        await context.abort(status.code, status.details, status.trailing_metadata)
