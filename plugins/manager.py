"""The typed facade over the plugin manager: the only code that calls `pm.hook`.

It registers the built-in backends from one tuple and third-party ones from the
`keyplane.backends` entry-point group, opens the configured backends and routes every
key URI to the backend whose name is the URI's scheme. Every private-key operation
passes here, so here they are timed (an observer is told of each) and each key's
signatures counted (taken by the server in batches, never written per signature).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pluggy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from keyplane.plugins import hookspecs, pkcs11_backend, software
from keyplane.plugins.errors import BackendConfigError, BackendError, UnknownBackendError
from keyplane.plugins.keys import (
    BackendPrivateKey,
    BackupSource,
    DigestSigner,
    GeneratedKey,
    KeyAlgorithm,
    KeyBackend,
    PublicKey,
    SecretStore,
    TlsKeySource,
    backend_private_key,
)
from keyplane.plugins.uri import scheme_of

ENTRY_POINT_GROUP = "keyplane.backends"

# Told of each private-key operation: (backend, operation, seconds, succeeded), where
# operation is "generate", "sign" or "destroy". Called on the thread that did it.
KeyOperationObserver = Callable[[str, str, float, bool], None]


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
        observe: KeyOperationObserver | None = None,
    ) -> None:
        self._pm = pm or plugin_manager()
        self._backends: dict[str, KeyBackend] = {}
        self._lock = threading.Lock()
        self._observe = observe
        # Signatures per key URI since the last take_usage().
        self._usage: dict[str, int] = {}
        self._usage_lock = threading.Lock()
        # key URI -> (the backend's key object, the one handed out, which counts).
        self._signing: dict[str, tuple[BackendPrivateKey, BackendPrivateKey]] = {}
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

    @contextmanager
    def _timed(self, backend: str, operation: str) -> Iterator[None]:
        observe = self._observe
        if observe is None:
            yield
            return
        started = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            observe(backend, operation, time.perf_counter() - started, ok)

    def generate_key(
        self, backend: str, label: str, algorithm: KeyAlgorithm | str, uri: str | None = None
    ) -> GeneratedKey:
        """A new key in `backend`; with `uri` (from new_key_uri), at that URI."""
        chosen = self.backend(backend)
        parsed = KeyAlgorithm.parse(str(algorithm))
        with self._timed(chosen.name, "generate"):
            if uri is None:  # a backend written before planned URIs takes two arguments
                return chosen.generate_key(label, parsed)
            return chosen.generate_key(label, parsed, uri)

    def new_key_uri(self, backend: str, label: str) -> str | None:
        """The URI the next key `backend` makes for `label` may take, or None if the
        backend cannot say before it makes the key (see KeyBackend.new_key_uri)."""
        return self.backend(backend).new_key_uri(label)

    def private_key(self, uri: str) -> BackendPrivateKey:
        """A signing handle for the key at `uri` whose signatures are timed and counted."""
        held = self.for_uri(uri).private_key(uri)
        cached = self._signing.get(uri)
        if cached is not None and cached[0] is held:
            return cached[1]
        counted = backend_private_key(held.public_key(), self._signer(uri, held), uri)
        self._signing[uri] = (held, counted)
        return counted

    def _signer(self, uri: str, held: BackendPrivateKey) -> DigestSigner:
        """Signs through `held`, timing each signature and counting it for its key (on
        every signature's path: kept to a few lookups)."""
        backend = scheme_of(uri)
        observe = self._observe
        count = self._count_signature
        elliptic = isinstance(held, ec.EllipticCurvePrivateKey)
        algorithms: dict[str, ec.ECDSA] = {}

        def sign_digest(
            digest: bytes, hash_algorithm: hashes.HashAlgorithm, pad: AsymmetricPadding | None
        ) -> bytes:
            started = time.perf_counter()
            ok = False
            try:
                if elliptic:
                    algorithm = algorithms.get(hash_algorithm.name)
                    if algorithm is None:
                        algorithm = ec.ECDSA(utils.Prehashed(hash_algorithm))
                        algorithms[hash_algorithm.name] = algorithm
                    signature = held.sign(digest, algorithm)  # type: ignore[call-arg, arg-type]
                else:
                    assert pad is not None  # noqa: S101 - RSA keys sign with a padding
                    signature = held.sign(digest, pad, utils.Prehashed(hash_algorithm))  # type: ignore[call-arg, arg-type]
                ok = True
            finally:
                if observe is not None:
                    observe(backend, "sign", time.perf_counter() - started, ok)
            count(uri)
            return signature

        return sign_digest

    def _count_signature(self, uri: str) -> None:
        with self._usage_lock:
            self._usage[uri] = self._usage.get(uri, 0) + 1

    def take_usage(self) -> dict[str, int]:
        """Signatures made per key URI since the last call (the caller records them)."""
        with self._usage_lock:
            taken, self._usage = self._usage, {}
        return taken

    def give_back_usage(self, usage: Mapping[str, int]) -> None:
        """Counts taken that could not be recorded, to be taken again."""
        with self._usage_lock:
            for uri, count in usage.items():
                self._usage[uri] = self._usage.get(uri, 0) + count

    def check(self) -> dict[str, str | None]:
        """Each configured backend's health: None if it can serve, else why not."""
        found: dict[str, str | None] = {}
        for name, backend in list(self._backends.items()):
            try:
                backend.check()
            except BackendError as exc:
                found[name] = str(exc)
            else:
                found[name] = None
        return found

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
        backend = self.for_uri(uri)
        with self._timed(backend.name, "destroy"):
            backend.destroy_key(uri)
        self._signing.pop(uri, None)

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
