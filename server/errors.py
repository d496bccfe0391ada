"""Domain errors. Each class carries its gRPC status and an ErrorInfo reason.

Servicers and domain code raise these; one interceptor turns them into statuses.
Messages say what to fix and never hold a traceback, a path or a secret.
"""

from __future__ import annotations

import grpc


class KeyplaneError(Exception):
    """Base of every error a caller is meant to see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"


class InvalidArgument(KeyplaneError):
    """The request is malformed or a value is out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(KeyplaneError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(KeyplaneError):
    """The object to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(KeyplaneError):
    """The request is valid but the current state forbids it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class RootLimitReached(FailedPrecondition):
    """Two roots are active already; revoke one before creating another."""

    reason = "ROOT_LIMIT_REACHED"


class LastActiveRoot(FailedPrecondition):
    """The only active root cannot be revoked."""

    reason = "LAST_ACTIVE_ROOT"


class AlreadyRevoked(FailedPrecondition):
    """The key is revoked already."""

    reason = "ALREADY_REVOKED"


class LastRootOfTrust(FailedPrecondition):
    """The only active root carries a trust with a peer: rotate first, or end the trust."""

    reason = "LAST_ROOT_OF_TRUST"


class LegacyRootImmutable(FailedPrecondition):
    """The legacy root is never created, rotated or revoked."""

    reason = "LEGACY_ROOT_IMMUTABLE"


class ConfirmationRequired(FailedPrecondition):
    """A destructive request lacks its explicit confirmation."""

    reason = "CONFIRMATION_REQUIRED"


class RevokesCaller(FailedPrecondition):
    """The request would revoke the credential it is made with, and lacks force."""

    reason = "REVOKES_CALLER"


class Unauthenticated(KeyplaneError):
    """The call carries no verified client identity."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(KeyplaneError):
    """The caller's identity lacks the role this call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ResourceExhausted(KeyplaneError):
    """A size or rate limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(KeyplaneError):
    """A dependency (a key backend, the database) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(KeyplaneError):
    """Another server (a peer) did not answer in time; nothing was changed here."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ConfigError(Exception):
    """The server's configuration is invalid; raised before anything starts."""


class StartRefused(Exception):
    """The server will not start over what it found; nothing was changed."""


class DataDirIncomplete(StartRefused):
    """The data dir holds part of a server's state: a file is missing beside the others."""


class DataDirUnwritable(StartRefused):
    """The data dir cannot be written (a read-only file system, or its modes)."""


class DamagedDatabase(StartRefused):
    """A database of the data dir does not open, or fails SQLite's own check."""


class PortTaken(StartRefused):
    """A port to listen on is held by another process."""
