"""Errors a key backend raises; the server maps each class to one gRPC status."""

from __future__ import annotations


class BackendError(Exception):
    """Base of every key-backend error; the message never holds a secret or key material."""

    reason = "BACKEND_ERROR"


class KeyNotFoundError(BackendError):
    """No key with this URI exists in the backend that owns the URI's scheme."""

    reason = "KEY_NOT_FOUND"


class InvalidKeyUriError(BackendError):
    """A key URI is malformed or has conflicting or forbidden attributes."""

    reason = "INVALID_KEY_URI"


class UnsupportedAlgorithmError(BackendError):
    """The backend cannot generate or use keys of this algorithm."""

    reason = "UNSUPPORTED_ALGORITHM"


class UnknownBackendError(BackendError):
    """No installed plugin provides a backend of this name or URI scheme."""

    reason = "UNKNOWN_BACKEND"


class BackendConfigError(BackendError):
    """A backend's options are missing or wrong."""

    reason = "BACKEND_CONFIG"


class BackendUnavailableError(BackendError):
    """The backend cannot be reached (module missing, token absent, database unreadable)."""

    reason = "BACKEND_UNAVAILABLE"


class BackendAuthError(BackendError):
    """The backend refused the credential (wrong PIN, wrong database password)."""

    reason = "BACKEND_AUTH"


class KeyOperationError(BackendError):
    """The backend failed to perform an operation on an existing key."""

    reason = "KEY_OPERATION_FAILED"


class PasswordRequiredError(BackendConfigError):
    """The store is sealed with a password and none was given (a server starts locked)."""

    reason = "PASSWORD_REQUIRED"


class WrongPasswordError(BackendAuthError):
    """The database password given does not open the store."""

    reason = "WRONG_PASSWORD"


class PasswordSinkError(BackendConfigError):
    """A new database password has nowhere durable to go, so it is not changed."""

    reason = "NO_PASSWORD_SINK"


class SealedKeyError(BackendError):
    """A sealed key or secret does not unseal under the store's key: the store is damaged
    or was altered (a flipped byte, a blob moved to another row)."""

    reason = "SEALED_KEY_DAMAGED"
