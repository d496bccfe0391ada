"""The `pkcs11` key backend (python-pkcs11): keys generated on an HSM token, never extractable.

Keys are named by RFC 7512 URIs (`pkcs11:token=…;object=…;id=…`) and found on the
token by CKA_ID and CKA_LABEL. The PIN comes from `pin_env` or `pin_file`, never from a
URI, and never appears in a log or an error message.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from keyplane.plugins.errors import (
    BackendAuthError,
    BackendConfigError,
    BackendError,
    BackendUnavailableError,
    InvalidKeyUriError,
    KeyNotFoundError,
    KeyOperationError,
    UnsupportedAlgorithmError,
)
from keyplane.plugins.hookspecs import hookimpl
from keyplane.plugins.keys import (
    BackendPrivateKey,
    GeneratedKey,
    KeyAlgorithm,
    KeyBackend,
    PublicKey,
    backend_private_key,
)
from keyplane.plugins.uri import Pkcs11KeyUri

if TYPE_CHECKING:
    from pkcs11 import types as p11types

NAME = "pkcs11"
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_OPTIONS = frozenset({"module", "token", "pin_env", "pin_file"})
_ID_BYTES = 16
_CURVE_NAMES = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}
# DER DigestInfo up to the digest (RFC 8017 §9.2, note 1): RSA_PKCS signs prefix + digest.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

log = logging.getLogger(__name__)
T = TypeVar("T")


@functools.cache
def _import_pkcs11() -> Any:
    """python-pkcs11, imported only when a pkcs11 backend is opened."""
    try:
        import pkcs11
    except ImportError:
        raise BackendUnavailableError(
            "pkcs11 backend: python-pkcs11 is not installed; run: pip install python-pkcs11"
        ) from None
    return pkcs11


# --- the PKCS#11 module, once per process ------------------------------------------------


@dataclass
class _LoadedModule:
    """A PKCS#11 module initialised in this process, shared by every backend using it."""

    lib: Any
    # python-pkcs11 initialises the module with C_Initialize(NULL), which tells it that no
    # two threads will call it at once, so SoftHSM runs without its own locks. Every call
    # into the module, from every backend instance that uses it, takes this lock.
    lock: threading.RLock = field(default_factory=threading.RLock)
    # HMAC of the PIN that last logged in to each token (by serial). PKCS#11 login is
    # process-wide: a second login fails with UserAlreadyLoggedIn whatever PIN it offers,
    # so a second backend's PIN is checked against this instead of the token.
    pin_digests: dict[bytes, bytes] = field(default_factory=dict)


# C_Initialize may run only once per module per process (python-pkcs11 cannot initialise
# a module twice), so every backend on the same module shares one entry, keyed by the
# module's real path (two spellings of one path load the same library).
_MODULES: dict[str, _LoadedModule] = {}
_MODULES_LOCK = threading.Lock()
_PIN_DIGEST_KEY = secrets.token_bytes(32)


def _load_module(module_path: str) -> _LoadedModule:
    pkcs11 = _import_pkcs11()
    real_path = os.path.realpath(module_path)
    with _MODULES_LOCK:
        loaded = _MODULES.get(real_path)
        if loaded is not None:
            return loaded
        if not os.path.isfile(real_path):
            raise BackendUnavailableError(
                f"pkcs11 backend: PKCS#11 module {module_path} does not exist; install it "
                "(SoftHSM: apt-get install softhsm2) or set the backend's module option"
            )
        try:
            # python-pkcs11 keeps its own cache by the path as spelled: pass the spelling
            # that other code in this process (tools, tests) most likely uses too.
            lib = pkcs11.lib(module_path)
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"pkcs11 backend: cannot load PKCS#11 module {module_path} ({exc or type(exc)})"
            ) from None
        loaded = _MODULES[real_path] = _LoadedModule(lib)
        return loaded


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_DIGEST_KEY, pin.encode(), hashlib.sha256).digest()


# --- options -------------------------------------------------------------------------------


def _text_option(options: Mapping[str, object], name: str) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise BackendConfigError(f"pkcs11 backend: option {name} must be a non-empty string")
    return str(value)


def _read_pin(options: Mapping[str, object]) -> str:
    """The user PIN from `pin_env` or `pin_file` (exactly one of them)."""
    env_name = _text_option(options, "pin_env")
    file_name = _text_option(options, "pin_file")
    if (env_name is None) == (file_name is None):
        raise BackendConfigError(
            "pkcs11 backend: set exactly one of pin_env (an environment variable) "
            "or pin_file (a file) to give the token's user PIN"
        )
    if env_name is not None:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise BackendConfigError(
                f"pkcs11 backend: environment variable {env_name} (pin_env) is not set"
            )
        return value
    assert file_name is not None  # noqa: S101
    try:
        value = Path(file_name).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise BackendConfigError(f"pkcs11 backend: cannot read pin_file ({reason})") from None
    if not value:
        raise BackendConfigError("pkcs11 backend: pin_file is empty")
    return value


# --- the backend ---------------------------------------------------------------------------


@functools.cache
def _lost_session_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the session (or its login) is gone: reopen and retry once."""
    pkcs11 = _import_pkcs11()
    return (
        pkcs11.SessionClosed,
        pkcs11.SessionHandleInvalid,
        pkcs11.ObjectHandleInvalid,
        pkcs11.KeyHandleInvalid,
        pkcs11.UserNotLoggedIn,
        pkcs11.DeviceRemoved,
        pkcs11.TokenNotPresent,
        _PrivateKeyHidden,
    )


class _PrivateKeyHidden(Exception):  # an internal signal, never raised to callers
    """A key's public object is visible but its private one is not: the login was lost."""


class _Locator(NamedTuple):
    """What a URI selects on this backend's token: CKA_ID and/or CKA_LABEL. A tuple, so
    looking a key's handles up (on every signature) hashes in C."""

    id: bytes | None
    label: str | None


@dataclass
class _Handles:
    """A key's objects in the current session (python-pkcs11 adds `sign` at run time)."""

    private: Any
    public: p11types.PublicKey | None


class Pkcs11Backend(KeyBackend):
    """Keys on one PKCS#11 token, used through one session shared by every thread."""

    name = NAME

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        pkcs11 = _import_pkcs11()
        self.module_path = module_path
        self.token_label = token_label
        self._pin = pin
        self._module = _load_module(module_path)
        self._lock = self._module.lock
        self._handles: dict[_Locator, _Handles] = {}
        self._public_keys: dict[_Locator, PublicKey] = {}
        self._closed = False
        self._lost: str | None = None
        with self._lock:
            try:
                self._token: p11types.Token = self._module.lib.get_token(token_label=token_label)
            except pkcs11.NoSuchToken:
                raise BackendUnavailableError(
                    f"pkcs11 backend: no token labelled {token_label!r} in PKCS#11 module "
                    f"{module_path}; initialise one (softhsm2-util --init-token --free --label "
                    f"{token_label} ...) or fix the token option"
                ) from None
            except pkcs11.MultipleTokensReturned:
                raise BackendUnavailableError(
                    f"pkcs11 backend: more than one token is labelled {token_label!r} in "
                    f"PKCS#11 module {module_path}; give each token its own label"
                ) from None
            except pkcs11.PKCS11Error as exc:
                raise BackendUnavailableError(
                    f"pkcs11 backend: cannot list the tokens of PKCS#11 module {module_path} "
                    f"({type(exc).__name__})"
                ) from None
            self._session: p11types.Session | None = self._open_session()

    def __repr__(self) -> str:
        return f"<Pkcs11Backend token={self.token_label!r} module={self.module_path}>"

    # -- sessions -----------------------------------------------------------------------

    def _open_session(self) -> p11types.Session:
        """A read-write session, logged in once per process (call with the lock held)."""
        pkcs11 = _import_pkcs11()
        label = self.token_label
        digest = _pin_digest(self._pin)
        try:
            session: p11types.Session = self._token.open(rw=True, user_pin=self._pin)
        except pkcs11.UserAlreadyLoggedIn:
            # Another backend in this process is logged in to the token; login state is
            # per process, so this session is logged in too. The token cannot check this
            # PIN now, so compare it with the one that logged in.
            known = self._module.pin_digests.get(self._token.serial)
            if known is not None and not hmac.compare_digest(known, digest):
                raise BackendAuthError(
                    f"pkcs11 backend: the PIN for token {label!r} is wrong (it differs from "
                    "the PIN this process is logged in with)"
                ) from None
            try:
                session = self._token.open(rw=True)
            except pkcs11.PKCS11Error as exc:
                raise BackendUnavailableError(
                    f"pkcs11 backend: cannot open a session on token {label!r} "
                    f"({type(exc).__name__})"
                ) from None
            return session
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise BackendAuthError(f"pkcs11 backend: token {label!r} refused the PIN") from None
        except (pkcs11.PinLocked, pkcs11.PinExpired) as exc:
            state = "locked" if isinstance(exc, pkcs11.PinLocked) else "expired"
            raise BackendAuthError(
                f"pkcs11 backend: the user PIN of token {label!r} is {state}"
            ) from None
        except pkcs11.UserPinNotInitialized:
            raise BackendUnavailableError(
                f"pkcs11 backend: token {label!r} has no user PIN set; initialise it"
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"pkcs11 backend: cannot log in to token {label!r} ({type(exc).__name__})"
            ) from None
        self._module.pin_digests[self._token.serial] = digest
        return session

    def _close_session(self) -> None:
        """Close the session, if any (call with the lock held)."""
        pkcs11 = _import_pkcs11()
        session, self._session = self._session, None
        self._handles.clear()
        if session is None:
            return
        try:
            # A session that logged in logs out first: that ends the login of every
            # session in this process; other backends recover on their next call.
            session.close()
        except pkcs11.PKCS11Error as exc:
            log.debug("pkcs11 backend: closing a session failed (%s)", type(exc).__name__)

    def _live_session(self) -> p11types.Session:
        """The open session, opened now if the last one was lost (call with the lock held).
        A reopen that fails is not tried again in this process: the token is lost (no
        login loop that could lock its PIN); see lost()."""
        if self._closed:
            raise BackendUnavailableError("pkcs11 backend: the backend is closed")
        if self._lost is not None:
            raise BackendUnavailableError(self._lost)
        if self._session is None:
            try:
                self._session = self._open_session()
            except BackendError as exc:
                self._lost = f"{exc}; the token was lost while serving: restart the server"
                raise BackendUnavailableError(self._lost) from None
        return self._session

    def lost(self) -> str | None:
        return self._lost

    def _run(self, what: str, operation: Callable[..., T], *args: Any) -> T:
        """Run `operation(session, *args)`; on a lost session, reopen and retry once."""
        with self._lock:
            # An open session means the backend is not closed (close() drops it).
            session = self._session
            if session is None:
                session = self._live_session()
            try:
                return operation(session, *args)
            except Exception as exc:  # sorted out by _recover
                return self._recover(what, operation, args, exc)

    def _recover(
        self, what: str, operation: Callable[..., T], args: tuple[Any, ...], exc: Exception
    ) -> T:
        """After `operation(session, *args)` raised `exc` (call with the lock held): on a
        lost session, reopen it and retry once; map PKCS#11 errors to backend errors.

        Kept apart from the first attempt, which is on every signature's path: the
        exception classes are looked up only here."""
        pkcs11 = _import_pkcs11()
        lost = _lost_session_errors()
        try:
            if not isinstance(exc, lost):
                raise exc
            log.warning(
                "pkcs11 backend: the session on token %r was lost (%s); opening a new one",
                self.token_label,
                "logged out" if isinstance(exc, _PrivateKeyHidden) else type(exc).__name__,
            )
            self._close_session()
            try:
                return operation(self._live_session(), *args)
            except _PrivateKeyHidden:
                raise KeyNotFoundError(
                    f"pkcs11 backend: {what}: the key has no private key object on token "
                    f"{self.token_label!r}"
                ) from None
            except lost as again:
                self._lost = (
                    f"pkcs11 backend: {what} on token {self.token_label!r} failed "
                    f"after reopening the session ({type(again).__name__})"
                )
                raise BackendUnavailableError(self._lost) from None
        except pkcs11.PKCS11Error as failed:
            raise KeyOperationError(
                f"pkcs11 backend: {what} on token {self.token_label!r} failed "
                f"({type(failed).__name__})"
            ) from None

    # -- finding keys -------------------------------------------------------------------

    def _locator(self, uri: str) -> _Locator:
        parsed = Pkcs11KeyUri.parse(uri)
        if parsed.token is not None and parsed.token != self.token_label:
            raise KeyNotFoundError(
                f"{uri} names token {parsed.token!r}; this backend holds token {self.token_label!r}"
            )
        return _Locator(id=parsed.id, label=parsed.object)

    def _find(self, session: p11types.Session, locator: _Locator, object_class: Any) -> Any:
        """The one object of `object_class` matching `locator`, or None."""
        pkcs11 = _import_pkcs11()
        template: dict[Any, Any] = {pkcs11.Attribute.CLASS: object_class}
        if locator.id is not None:
            template[pkcs11.Attribute.ID] = locator.id
        if locator.label is not None:
            template[pkcs11.Attribute.LABEL] = locator.label
        found = list(session.get_objects(template))
        if len(found) > 1:
            raise InvalidKeyUriError(
                "the key URI matches more than one key on the token; name the key by its id"
            )
        return found[0] if found else None

    def _key_handles(
        self, session: p11types.Session, locator: _Locator, uri: str, *, need_private: bool
    ) -> _Handles:
        """The key's objects in `session`, cached; KeyNotFoundError if there are none."""
        pkcs11 = _import_pkcs11()
        handles = self._handles.get(locator)
        if handles is None or (need_private and handles.private is None):
            private = self._find(session, locator, pkcs11.ObjectClass.PRIVATE_KEY)
            public = self._find(session, locator, pkcs11.ObjectClass.PUBLIC_KEY)
            if private is None and public is None:
                raise KeyNotFoundError(f"no key {uri} on token {self.token_label!r}")
            if private is None and need_private:
                raise _PrivateKeyHidden
            handles = self._handles[locator] = _Handles(private, public)
        return handles

    def _public_key_of(self, locator: _Locator, handles: _Handles, uri: str) -> PublicKey:
        cached = self._public_keys.get(locator)
        if cached is not None:
            return cached
        if handles.public is None:
            raise KeyNotFoundError(f"key {uri} has no public key object on the token")
        public_key = _to_cryptography(handles.public)
        self._public_keys[locator] = public_key
        return public_key

    # -- KeyBackend ---------------------------------------------------------------------

    def new_key_uri(self, label: str) -> str:
        return str(
            Pkcs11KeyUri(token=self.token_label, object=label, id=secrets.token_bytes(_ID_BYTES))
        )

    def generate_key(
        self, label: str, algorithm: KeyAlgorithm, uri: str | None = None
    ) -> GeneratedKey:
        pkcs11 = _import_pkcs11()
        algorithm = KeyAlgorithm.parse(algorithm)
        key_id = secrets.token_bytes(_ID_BYTES)
        if uri is not None:
            planned = Pkcs11KeyUri.parse(uri)
            if planned.token != self.token_label or planned.object != label or not planned.id:
                raise InvalidKeyUriError(
                    f"{uri} is not a key URI this backend planned for {label!r}"
                )
            key_id = planned.id
        attr = pkcs11.Attribute
        common = {attr.TOKEN: True, attr.ID: key_id, attr.LABEL: label}
        public_template = {**common, attr.PRIVATE: False, attr.VERIFY: True}
        # python-pkcs11's default template leaves EXTRACTABLE to the token: set it here.
        private_template = {
            **common,
            attr.PRIVATE: True,
            attr.SENSITIVE: True,
            attr.EXTRACTABLE: False,
            attr.SIGN: True,
        }
        if algorithm.is_ec:
            public_template[attr.EC_PARAMS] = pkcs11.util.ec.encode_named_curve_parameters(
                _CURVE_NAMES[algorithm]
            )
            key_type, key_length = pkcs11.KeyType.EC, None
        else:
            key_type, key_length = pkcs11.KeyType.RSA, algorithm.rsa_bits
        capabilities = pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY

        uri = str(Pkcs11KeyUri(token=self.token_label, object=label, id=key_id))
        locator = _Locator(id=key_id, label=label)

        def generate(session: p11types.Session) -> None:
            public, private = session.generate_keypair(
                key_type,
                key_length,
                store=True,
                capabilities=capabilities,
                public_template=public_template,
                private_template=private_template,
            )
            self._handles[locator] = _Handles(private, public)

        # Generating is not idempotent, so reading the new public key is a separate step:
        # a retry after a lost session looks the new key up rather than making another.
        self._run(f"generating a {algorithm.value} key", generate)
        public_key = self.public_key(uri)
        log.info("pkcs11 backend: generated %s key %s", algorithm.value, uri)
        return GeneratedKey(uri=uri, public_key=public_key)

    def private_key(self, uri: str) -> BackendPrivateKey:
        locator = self._locator(uri)

        def lookup(session: p11types.Session) -> PublicKey:
            handles = self._key_handles(session, locator, uri, need_private=True)
            return self._public_key_of(locator, handles, uri)

        public_key = self._run("looking up a key", lookup)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return backend_private_key(
                public_key, self._ecdsa_signer(locator, uri, public_key), uri
            )

        def sign_digest(
            digest: bytes, hash_algorithm: hashes.HashAlgorithm, pad: AsymmetricPadding | None
        ) -> bytes:
            return self._sign(locator, uri, public_key, digest, hash_algorithm, pad)

        return backend_private_key(public_key, sign_digest, uri)

    def _ecdsa_signer(
        self, locator: _Locator, uri: str, public_key: ec.EllipticCurvePublicKey
    ) -> Callable[[bytes, hashes.HashAlgorithm, AsymmetricPadding | None], bytes]:
        """The ECDSA path, decided once per key rather than on every signature: SoftHSM
        has no ECDSA_SHA256, so the wrapper hashes and the token signs the digest, cut to
        the order's length as ECDSA does (P-256 and P-384 orders are whole bytes)."""
        mechanism = _import_pkcs11().Mechanism.ECDSA
        size = (public_key.key_size + 7) // 8
        what = f"signing with {uri}"

        def sign(session: p11types.Session, data: bytes) -> bytes:
            private = self._key_handles(session, locator, uri, need_private=True).private
            signature: bytes = private.sign(data, mechanism=mechanism)
            return signature

        def sign_digest(
            digest: bytes, hash_algorithm: hashes.HashAlgorithm, pad: AsymmetricPadding | None
        ) -> bytes:
            if len(digest) != hash_algorithm.digest_size:
                raise KeyOperationError(
                    f"a {hash_algorithm.name} digest is {hash_algorithm.digest_size} bytes, "
                    f"not {len(digest)}"
                )
            data = digest[:size]
            # _run's first attempt, inlined for the usual case: a cached handle means the
            # session is open here (closing one clears the cache); if the token lost it,
            # _recover reopens it and retries, as _run does.
            with self._lock:
                handles = self._handles.get(locator)
                if handles is None or handles.private is None:
                    signature = self._run(what, sign, data)
                else:
                    try:
                        signature = handles.private.sign(data, mechanism=mechanism)
                    except Exception as exc:  # sorted out by _recover
                        signature = self._recover(what, sign, (data,), exc)
            return _ecdsa_der(signature)

        return sign_digest

    def public_key(self, uri: str) -> PublicKey:
        locator = self._locator(uri)
        return self._run(
            "looking up a key",
            lambda session: self._public_key_of(
                locator, self._key_handles(session, locator, uri, need_private=False), uri
            ),
        )

    def holds_key(self, uri: str) -> bool:
        """Looked up on the token afresh (signing uses cached handles): the key is held if
        its private object is there. A public object without it means the login was
        lost: the session is reopened and the lookup tried again."""
        pkcs11 = _import_pkcs11()
        locator = self._locator(uri)

        def look(session: p11types.Session) -> bool:
            if self._find(session, locator, pkcs11.ObjectClass.PRIVATE_KEY) is not None:
                return True
            if self._find(session, locator, pkcs11.ObjectClass.PUBLIC_KEY) is not None:
                raise _PrivateKeyHidden
            self._handles.pop(locator, None)
            self._public_keys.pop(locator, None)
            return False

        try:
            return self._run("looking up a key", look)
        except KeyNotFoundError:  # a public object only, after a fresh login
            return False

    def destroy_key(self, uri: str) -> None:
        locator = self._locator(uri)

        def destroy(session: p11types.Session) -> None:
            handles = self._key_handles(session, locator, uri, need_private=True)
            for obj in (handles.private, handles.public):
                if obj is not None:
                    obj.destroy()
            # Other URIs may name the same objects: drop everything cached.
            self._handles.clear()
            self._public_keys.clear()

        self._run("destroying a key", destroy)
        log.info("pkcs11 backend: destroyed key %s", uri)

    def check(self) -> None:
        """The token answers (C_GetTokenInfo) and a session is open or can be opened."""
        pkcs11 = _import_pkcs11()
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("pkcs11 backend: the backend is closed")
            try:
                self._token.slot.get_token()
            except pkcs11.PKCS11Error as exc:
                raise BackendUnavailableError(
                    f"pkcs11 backend: token {self.token_label!r} does not answer "
                    f"({type(exc).__name__})"
                ) from None
            self._live_session()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_session()
            self._public_keys.clear()

    # -- signing --------------------------------------------------------------------------

    def _sign(
        self,
        locator: _Locator,
        uri: str,
        public_key: PublicKey,
        digest: bytes,
        hash_algorithm: hashes.HashAlgorithm,
        pad: AsymmetricPadding | None,
    ) -> bytes:
        pkcs11 = _import_pkcs11()
        if len(digest) != hash_algorithm.digest_size:
            raise KeyOperationError(
                f"a {hash_algorithm.name} digest is {hash_algorithm.digest_size} bytes, "
                f"not {len(digest)}"
            )
        mechanism_param: Any = None
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            # SoftHSM has no ECDSA_SHA256: the wrapper hashed, the token signs the digest,
            # cut to the order's length as ECDSA does (P-256 and P-384 orders are whole bytes).
            mechanism, data = pkcs11.Mechanism.ECDSA, digest[: (public_key.key_size + 7) // 8]
        elif isinstance(pad, padding.PKCS1v15):
            mechanism, data = pkcs11.Mechanism.RSA_PKCS, _digest_info(hash_algorithm) + digest
        elif isinstance(pad, padding.PSS):
            mechanism, data = pkcs11.Mechanism.RSA_PKCS_PSS, digest
            mechanism_param = _pss_params(pad, hash_algorithm, public_key)
        else:
            raise UnsupportedAlgorithmError("RSA keys sign with PKCS#1 v1.5 or PSS padding only")

        def sign(session: p11types.Session) -> bytes:
            handles = self._key_handles(session, locator, uri, need_private=True)
            assert handles.private is not None  # noqa: S101
            signature: bytes = handles.private.sign(
                data, mechanism=mechanism, mechanism_param=mechanism_param
            )
            return signature

        signature = self._run(f"signing with {uri}", sign)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return _ecdsa_der(signature)
        return signature


def _to_cryptography(public: p11types.PublicKey) -> PublicKey:
    """The `cryptography` public key of a token's public-key object."""
    pkcs11 = _import_pkcs11()
    if public.key_type == pkcs11.KeyType.EC:
        der = pkcs11.util.ec.encode_ec_public_key(public)
    elif public.key_type == pkcs11.KeyType.RSA:
        der = pkcs11.util.rsa.encode_rsa_public_key(public)  # PKCS#1 RSAPublicKey
    else:
        raise UnsupportedAlgorithmError(
            f"pkcs11 backend: unsupported key type {public.key_type!r} on the token"
        )
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise UnsupportedAlgorithmError("pkcs11 backend: unsupported public key on the token")
    return key


def _ecdsa_der(raw: bytes) -> bytes:
    """PKCS#11 returns ECDSA signatures as r ‖ s; X.509 wants a DER ECDSA-Sig-Value,
    SEQUENCE { INTEGER r, INTEGER s }. Encoded by hand from the bytes: this runs on every
    signature, where int.from_bytes and cryptography's encode_dss_signature cost ~3 µs
    more (measured on SoftHSM, straight after the token call)."""
    half, odd = divmod(len(raw), 2)
    if odd or not half or half > _MAX_ECDSA_HALF:
        raise KeyOperationError(f"pkcs11 backend: malformed ECDSA signature ({len(raw)} bytes)")
    # A DER INTEGER is minimal and positive: no leading zero bytes, then one zero byte
    # if the top bit is set.
    r, s = raw[:half], raw[half:]
    if not (r[0] and s[0]):  # 1 in 128 signatures
        r = r.lstrip(b"\0") or b"\0"
        s = s.lstrip(b"\0") or b"\0"
    if r[0] & 0x80:
        r = b"\0" + r
    if s[0] & 0x80:
        s = b"\0" + s
    r_len, s_len = len(r), len(s)
    body_len = r_len + s_len + 4
    # Up to P-384 the SEQUENCE's length fits the short form; P-521's may need 0x81 nn.
    head = b"\x30" + (_BYTE[body_len] if body_len < 0x80 else b"\x81" + _BYTE[body_len])
    return b"".join((head, b"\x02", _BYTE[r_len], r, b"\x02", _BYTE[s_len], s))


_BYTE = [bytes((n,)) for n in range(256)]
# r and s are below the group order: at most 66 bytes each (P-521, the largest curve).
_MAX_ECDSA_HALF = 66


def _digest_info(hash_algorithm: hashes.HashAlgorithm) -> bytes:
    try:
        return _DIGEST_INFO_PREFIX[hash_algorithm.name]
    except KeyError:
        raise UnsupportedAlgorithmError(
            f"pkcs11 backend: RSA signatures use SHA-256, SHA-384 or SHA-512, "
            f"not {hash_algorithm.name}"
        ) from None


def _pss_params(
    pad: padding.PSS, hash_algorithm: hashes.HashAlgorithm, public_key: rsa.RSAPublicKey
) -> tuple[Any, Any, int]:
    """CK_RSA_PKCS_PSS_PARAMS (hash, MGF, salt length) for a cryptography PSS padding."""
    pkcs11 = _import_pkcs11()
    hash_mechanisms = {
        "sha256": (pkcs11.Mechanism.SHA256, pkcs11.MGF.SHA256),
        "sha384": (pkcs11.Mechanism.SHA384, pkcs11.MGF.SHA384),
        "sha512": (pkcs11.Mechanism.SHA512, pkcs11.MGF.SHA512),
    }
    if hash_algorithm.name not in hash_mechanisms:
        _digest_info(hash_algorithm)  # raises the unsupported-hash error
    hash_mechanism = hash_mechanisms[hash_algorithm.name][0]
    # cryptography keeps the MGF1 hash and the salt length private; they are part of
    # its PSS and MGF1 classes' declared attributes.
    mgf = pad.mgf
    if not isinstance(mgf, padding.MGF1) or mgf._algorithm.name not in hash_mechanisms:
        raise UnsupportedAlgorithmError(
            "pkcs11 backend: PSS signatures use MGF1 with SHA-256, SHA-384 or SHA-512"
        )
    mgf_id = hash_mechanisms[mgf._algorithm.name][1]
    salt = pad._salt_length
    if isinstance(salt, int):
        salt_length = salt
    elif salt is padding.PSS.DIGEST_LENGTH:
        salt_length = hash_algorithm.digest_size
    elif salt is padding.PSS.MAX_LENGTH:
        salt_length = padding.calculate_max_pss_salt_length(public_key, hash_algorithm)
    else:
        raise UnsupportedAlgorithmError(
            "pkcs11 backend: PSS.AUTO is for verifying; sign with DIGEST_LENGTH, MAX_LENGTH "
            "or a number"
        )
    return hash_mechanism, mgf_id, salt_length


@hookimpl
def keyplane_backend_names() -> list[str]:
    return [NAME]


@hookimpl
def keyplane_open_backend(
    name: str, options: Mapping[str, object], data_dir: Path
) -> KeyBackend | None:
    if name != NAME:
        return None
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendConfigError(
            f"pkcs11 backend: unknown option(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_OPTIONS))})"
        )
    module_path = _text_option(options, "module") or DEFAULT_MODULE
    token_label = _text_option(options, "token")
    if token_label is None:
        raise BackendConfigError("pkcs11 backend: set the token option to the token's label")
    pin = _read_pin(options)
    return Pkcs11Backend(module_path, token_label, pin)
