"""The typed facade over the plugin manager: the only code that calls `pm.hook`.

It registers the built-in backends from one tuple and third-party ones from the
`keyplane.backends` entry-point group, opens the configured backends and routes every
key URI to the backend whose name is the URI's scheme.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pluggy

from keyplane.plugins import hookspecs, pkcs11_backend, software
from keyplane.plugins.errors import BackendConfigError, UnknownBackendError
from keyplane.plugins.keys import (
    BackendPrivateKey,
    BackupSource,
    GeneratedKey,
    KeyAlgorithm,
    KeyBackend,
    PublicKey,
    SecretStore,
    TlsKeySource,
)
from keyplane.plugins.uri import scheme_of

ENTRY_POINT_GROUP = "keyplane.backends"


def software_database_path(options: Mapping[str, object], data_dir: Path) -> Path:
    """Where the software backend with these options keeps its pki.db (a data dir check
    needs to know, before any backend is opened)."""
    return software.database_path(options, data_dir)


BUILTIN_PLUGINS: tuple[ModuleType, ...] = (software, pkcs11_backend)


def plugin_manager(extra: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """A plugin manager with the built-ins, the entry-point plugins and `extra`."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for builtin in BUILTIN_PLUGINS:
        pm.register(builtin, name=f"keyplane.builtin.{builtin.__name__.rsplit('.', 1)[-1]}")
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


class KeyBackends:
    """The open key backends of one process, addressed by name or by key URI."""

    def __init__(
        self,
        configured: Mapping[str, Mapping[str, object]],
        data_dir: Path,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self._pm = pm or plugin_manager()
        self._backends: dict[str, KeyBackend] = {}
        self._lock = threading.Lock()
        try:
            for name, options in configured.items():
                self._backends[name] = self._open(name, options, data_dir)
        except BaseException:
            self.close()
            raise

    def available(self) -> list[str]:
        """Every backend name an installed plugin provides."""
        names: list[list[str]] = self._pm.hook.keyplane_backend_names()
        return sorted({n for group in names for n in group})

    def _open(self, name: str, options: Mapping[str, object], data_dir: Path) -> KeyBackend:
        backend: KeyBackend | None = self._pm.hook.keyplane_open_backend(
            name=name, options=options, data_dir=data_dir
        )
        if backend is None:
            raise UnknownBackendError(
                f"no installed plugin provides a key backend named {name!r} "
                f"(available: {', '.join(self.available())})"
            )
        return backend

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def backend(self, name: str) -> KeyBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise UnknownBackendError(
                f"key backend {name!r} is not configured (configured: {', '.join(self._backends)})"
            ) from None

    def for_uri(self, uri: str) -> KeyBackend:
        return self.backend(scheme_of(uri))

    def generate_key(
        self, backend: str, label: str, algorithm: KeyAlgorithm | str, uri: str | None = None
    ) -> GeneratedKey:
        """A new key in `backend`; with `uri` (from new_key_uri), at that URI."""
        chosen = self.backend(backend)
        parsed = KeyAlgorithm.parse(str(algorithm))
        if uri is None:  # a backend written before planned URIs takes two arguments
            return chosen.generate_key(label, parsed)
        return chosen.generate_key(label, parsed, uri)

    def new_key_uri(self, backend: str, label: str) -> str | None:
        """The URI the next key `backend` makes for `label` may take, or None if the
        backend cannot say before it makes the key (see KeyBackend.new_key_uri)."""
        return self.backend(backend).new_key_uri(label)

    def private_key(self, uri: str) -> BackendPrivateKey:
        return self.for_uri(uri).private_key(uri)

    def public_key(self, uri: str) -> PublicKey:
        return self.for_uri(uri).public_key(uri)

    def tls_private_key_pem(self, uri: str) -> bytes:
        backend = self.for_uri(uri)
        if not isinstance(backend, TlsKeySource):
            raise BackendConfigError(
                f"key backend {backend.name!r} cannot hand keys to the TLS stack; "
                "keep TLS listener keys in the software backend"
            )
        return backend.tls_private_key_pem(uri)

    def secret_store(self) -> SecretStore:
        """The backend that keeps protected settings (the software backend)."""
        for backend in self._backends.values():
            if isinstance(backend, SecretStore):
                return backend
        raise BackendConfigError("no configured key backend can keep secrets (add software)")

    def destroy_key(self, uri: str) -> None:
        self.for_uri(uri).destroy_key(uri)

    def holds_key(self, uri: str) -> bool:
        """Whether the backend the URI names holds its key now (looked up, not cached)."""
        return self.for_uri(uri).holds_key(uri)

    def lost(self) -> str | None:
        """The first backend's reason it can no longer reach its keys (KeyBackend.lost)."""
        with self._lock:
            backends = list(self._backends.values())
        return next((why for b in backends if (why := b.lost()) is not None), None)

    def backup_sources(self) -> list[BackupSource]:
        """The backends whose key stores a backup carries (the software backend's pki.db)."""
        return [b for b in self._backends.values() if isinstance(b, BackupSource)]

    def close(self) -> None:
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        failures: list[BaseException] = []
        for backend in backends:
            try:
                backend.close()
            except Exception as exc:  # close the rest before reporting it
                failures.append(exc)
        if failures:
            raise failures[0]
