"""The client agent runtime (`keyplane agent run|status|verify`): enroll with a token, keep
the client certificate renewed (before it expires, and onto a new root), follow the signed
trust state, and verify signed messages against it.

Everything the agent holds lives in its data dir (mode 0700), each file written atomically:

    agent.json    its name (the certificate's CN) and the server it enrolled with
    key.pem       its private key (0600)          cert.pem     leaf + intermediate, PEM
    roots.pem     the roots sent with the cert    issued.json  serial, not_after, renew_after
    trust.bin     the newest verified trust state status.json  what `agent status` shows
    pending-renewal.json   the next certificate's key and CSR (0600), until it is saved

A renewal stages key.pem, cert.pem, roots.pem and issued.json in `.renewal/`, marks the set
complete, then moves each file into place; a start that finds a complete set finishes the
move, so a crash never leaves a key beside a certificate for another key. The new key is
made once per certificate and kept until its certificate is saved: a renewal whose answer
was lost is asked again for the same key, and the server answers it with the same
certificate (a certificate renews once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyplane.clients import trust
from keyplane.clients.bundle import Bundle, BundleError, load_bundle
from keyplane.clients.client import (
    KeyplaneClient,
    KeyplaneClientError,
    TrustStateWatch,
    bootstrap_channel_for,
    channel_for,
)
from keyplane.clients.credentials import Credential
from keyplane.clients.trust import TrustState, TrustStateError
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.v1 import bundle_service_pb2, enrollment_service_pb2, message_signing_service_pb2

PROG = "keyplane"
AGENT_FILE = "agent.json"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
ROOTS_FILE = "roots.pem"
ISSUED_FILE = "issued.json"
TRUST_FILE = "trust.bin"
STATUS_FILE = "status.json"
STAGING_DIR = ".renewal"
STAGED_COMPLETE = "complete"
# The key and CSR of a renewal not yet saved (0600): reused until it is.
PENDING_FILE = "pending-renewal.json"
# The files of one certificate, swapped together; the key goes first.
CREDENTIAL_FILES = (KEY_FILE, CERT_FILE, ROOTS_FILE, ISSUED_FILE)

RPC_TIMEOUT = 20.0
# Reconnecting and retrying: 0.2 s, doubling to 10 s, with jitter.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
# A new root (or a revoked certificate) is acted on within this many seconds, spread so
# that a fleet does not renew at once.
SOON_MAX_SECONDS = 2.0
# When a renewal still lands under an older root (a zone server that has not moved yet),
# the next try waits longer and longer, up to this.
ROOT_RETRY_MAX = 300.0
# Enrollment errors worth waiting out; anything else stops the agent.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# `agent run` exits with this once its certificate is revoked (a supervisor should not
# restart it: only enrolling again with a new token helps).
EXIT_REVOKED = 3
REVOKED = "revoked: re-enroll with a new token"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_random = secrets.SystemRandom()

log = logging.getLogger("keyplane.agent")

AGENT_HELP = """\
A client agent: enrolls once with an enrollment token, then renews its client TLS
certificate by itself (when the server says, and soon after a new root appears), follows
the signed trust state over mutual TLS, and verifies signed messages against it. Its key,
certificate and state live in --data-dir; a restart resumes without a token.
"""

RUN_HELP = """\
Enroll (first start, with --token) and run: renew the certificate, follow the trust
state. Stop it with SIGTERM or SIGINT.

When its certificate is revoked (the trust state lists its serial or its key, or a
renewal is refused as revoked; revoking a zone server revokes everything it issued),
the agent stops renewing, logs "revoked: re-enroll with a new token", shows state
"revoked" in 'keyplane agent status' and exits with status 3, then again at every
start. Its data dir is left as it is: to enroll again, move it aside and start the
agent with a new token.
"""

RUN_EPILOG = """\
exit status: 0 stopped by SIGTERM/SIGINT; 1 enrollment refused or failed; 2 a bad
bundle, data dir or option; 3 its certificate is revoked (re-enroll with a new token).

example:
  keyplane agent run --data-dir var-agent --bundle keyplane-init.dat \\
      --token "$(keyplane tokens create)" --fingerprint <root fingerprint>
"""


class AgentError(Exception):
    """The agent cannot start or go on; the message says why and what to do."""


class EnrollmentRefused(AgentError):
    """The server refused to enroll this agent (a bad token, a bad request)."""


# -- files -----------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path`, fsync it, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _iso(value: datetime.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def endpoint_json(endpoint: bundle_service_pb2.ServerEndpoint) -> dict[str, Any]:
    return {
        "name": endpoint.name,
        "listen": endpoint.listen,
        "bootstrap_listen": endpoint.bootstrap_listen,
        "zone": endpoint.zone,
    }


def _endpoint_from_json(data: dict[str, Any]) -> bundle_service_pb2.ServerEndpoint:
    return bundle_service_pb2.ServerEndpoint(
        name=str(data["name"]),
        listen=str(data["listen"]),
        bootstrap_listen=str(data["bootstrap_listen"]),
        zone=bool(data.get("zone", False)),
    )


# -- keys and certificates -------------------------------------------------------------------


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR for it with CN=`name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


@dataclass(frozen=True)
class Issued:
    """The agent's certificate: its key, chain, the roots sent with it, and its schedule."""

    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes
    serial: str
    not_after: datetime.datetime
    renew_after: datetime.datetime
    renewals: int

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem)

    def issued_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "not_after": _iso(self.not_after),
            "renew_after": _iso(self.renew_after),
            "renewals": self.renewals,
        }


def issued_from(
    certificate: enrollment_service_pb2.IssuedCertificate, key_pem: bytes, name: str, renewals: int
) -> Issued:
    """Check what the server sent (for our key, our name, a chain) and keep it."""
    try:
        chain = x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())
    except ValueError:
        raise AgentError("the server sent a certificate chain that does not parse") from None
    leaf = chain[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise AgentError("the server sent a certificate for another key")
    if _common_name(leaf) != name:
        raise AgentError(f"the server sent a certificate for {_common_name(leaf)!r}, not {name!r}")
    return Issued(
        key_pem=key_pem,
        chain_pem=certificate.certificate_chain_pem.encode(),
        roots_pem=certificate.roots_pem.encode(),
        serial=certificate.serial or f"{leaf.serial_number:032x}",
        not_after=certificate.not_after.ToDatetime(tzinfo=datetime.UTC),
        renew_after=certificate.renew_after.ToDatetime(tzinfo=datetime.UTC),
        renewals=renewals,
    )


def chain_root(chain: list[x509.Certificate], roots: dict[str, x509.Certificate]) -> str | None:
    """The fingerprint of the root among `roots` that issued the chain's top certificate."""
    top = chain[-1]
    for fingerprint, root in roots.items():
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint
    return None


# -- the data dir ----------------------------------------------------------------------------


def finish_staged_swap(directory: Path) -> bool:
    """Move a complete staged certificate into place; drop an incomplete one."""
    staging = directory / STAGING_DIR
    if not staging.is_dir():
        return False
    if not (staging / STAGED_COMPLETE).exists():
        shutil.rmtree(staging)  # never committed: the current certificate stays
        return False
    for name in CREDENTIAL_FILES:
        if (staging / name).exists():
            os.replace(staging / name, directory / name)
    _fsync_dir(directory)
    (staging / STAGED_COMPLETE).unlink()
    staging.rmdir()
    _fsync_dir(directory)
    return True


def save_issued(directory: Path, issued: Issued) -> None:
    """Replace the certificate set (key, chain, roots, schedule) as one step."""
    staging = directory / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    write_atomic(staging / KEY_FILE, issued.key_pem, 0o600)
    write_atomic(staging / CERT_FILE, issued.chain_pem)
    write_atomic(staging / ROOTS_FILE, issued.roots_pem)
    write_atomic(staging / ISSUED_FILE, json.dumps(issued.issued_json(), indent=2).encode())
    write_atomic(staging / STAGED_COMPLETE, b"")
    finish_staged_swap(directory)


def load_issued(directory: Path) -> Issued | None:
    """The certificate set in `directory`, None if there is none; AgentError if damaged."""
    finish_staged_swap(directory)
    if not (directory / CERT_FILE).exists():
        return None
    try:
        key_pem = (directory / KEY_FILE).read_bytes()
        chain_pem = (directory / CERT_FILE).read_bytes()
        roots_pem = (directory / ROOTS_FILE).read_bytes()
        meta = json.loads((directory / ISSUED_FILE).read_text())
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        issued = Issued(
            key_pem=key_pem,
            chain_pem=chain_pem,
            roots_pem=roots_pem,
            serial=str(meta["serial"]),
            not_after=_parse_iso(meta["not_after"]),
            renew_after=_parse_iso(meta["renew_after"]),
            renewals=int(meta.get("renewals", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(
            f"the certificate in {directory} is damaged ({type(exc).__name__}); move the "
            "directory aside and enroll again with a new token"
        ) from None
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise AgentError(
            f"{directory / KEY_FILE} is not the key of {directory / CERT_FILE}; move the "
            "directory aside and enroll again with a new token"
        )
    return issued


def _read_agent_json(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / AGENT_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AgentError(f"{directory / AGENT_FILE} is damaged ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise AgentError(f"{directory / AGENT_FILE} is damaged (not an object)")
    return data


def _write_agent_json(
    directory: Path, name: str, endpoint: bundle_service_pb2.ServerEndpoint | None
) -> None:
    data: dict[str, Any] = {"name": name}
    if endpoint is not None:
        data["endpoint"] = endpoint_json(endpoint)
    write_atomic(directory / AGENT_FILE, json.dumps(data, indent=2).encode())


# -- the runtime -----------------------------------------------------------------------------


def _serial_number(serial: str) -> int | None:
    """A hex serial as a number, so that "00ab" and "ab" are the same certificate."""
    try:
        return int(serial, 16)
    except ValueError:
        return None


def says_revoked(error: KeyplaneClientError) -> bool:
    """Whether the server (or zone) refused a call because the certificate, its key or
    its issuer is revoked: then no retry can succeed."""
    return error.code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in error.message


class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._cap, self._next * 2)
        return _random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self._first


class Agent:
    """One agent over its data dir: enrollment, the renewal thread and the trust thread."""

    def __init__(
        self,
        directory: Path,
        bundle: Bundle,
        name: str | None,
        time_scale: float,
        stop: threading.Event,
    ) -> None:
        self.directory = directory
        self._bundle = bundle
        self._time_scale = time_scale
        self._stop = stop
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._errors: dict[str, str] = {}
        # Why this agent's certificate is known to be revoked; None while it is not.
        self._revoked: str | None = None
        self._watch: TrustStateWatch | None = None
        self._renew_channel: grpc.Channel | None = None
        self._renew_deadline = 0.0
        self._soon: float | None = None
        self._soon_reason = ""
        self._retry_at: float | None = None
        self._renew_backoff = Backoff()
        self._root_backoff = Backoff(SOON_MAX_SECONDS, ROOT_RETRY_MAX)
        self._threads: list[threading.Thread] = []

        meta = _read_agent_json(directory)
        self._issued = load_issued(directory)
        stored_name = meta.get("name")
        # Enrolled, the name is the certificate's: renewal keeps it.
        enrolled_name = _common_name(self._issued.chain[0]) if self._issued else None
        if enrolled_name and name and name != enrolled_name:
            raise AgentError(
                f"this agent is enrolled as {enrolled_name!r}; --name {name!r} differs "
                "(renewal keeps the name; use another --data-dir to enroll under a new name)"
            )
        self.name = enrolled_name or name or stored_name or f"agent-{secrets.token_hex(4)}"
        if not _NAME.fullmatch(self.name):
            raise AgentError(
                f"--name {self.name!r} is not valid: 1-128 letters, digits, '.', '_', '@' or '-', "
                "starting with a letter or digit"
            )
        stored_endpoint = meta.get("endpoint")
        try:
            self._endpoint = (
                _endpoint_from_json(stored_endpoint)
                if isinstance(stored_endpoint, dict) and self._issued is not None
                else bundle.enrollment_endpoint()
            )
        except KeyError as exc:
            raise AgentError(f"{directory / AGENT_FILE} is damaged (no {exc})") from None
        except BundleError as exc:
            raise AgentError(str(exc)) from None
        if stored_name != self.name or (self._issued is None and stored_endpoint):
            _write_agent_json(directory, self.name, None)
        self._trust = self._load_trust()
        self._revoked = self._revoked_before(self._issued)
        if self._issued is not None:
            self._install(self._issued)
        with self._lock:
            self._write_status()

    # -- state ---------------------------------------------------------------------------

    def _load_trust(self) -> TrustState | None:
        try:
            data = (self.directory / TRUST_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            # Verified when it was saved; from here on it is followed, not re-pinned.
            return trust.load(data)
        except Exception as exc:  # protobuf's DecodeError or TrustStateError
            log.warning("ignoring a damaged %s (%s); following from the bundle", TRUST_FILE, exc)
            return None

    def _revoked_before(self, issued: Issued | None) -> str | None:
        """The revocation an earlier run found for this very certificate (status.json
        keeps it: a renewal refusal is not in the trust state to be found again)."""
        try:
            data = json.loads((self.directory / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or issued is None:
            return None
        if data.get("state") == "revoked" and data.get("serial") == issued.serial:
            return str(data.get("revoked_because") or "found revoked by an earlier run")
        return None

    @property
    def revoked(self) -> str | None:
        """The message saying this agent is revoked and why, None if it is not."""
        with self._lock:
            if self._revoked is None or self._issued is None:
                return None
            return f"{REVOKED} (certificate {self._issued.serial}: {self._revoked})"

    @property
    def enrolled(self) -> bool:
        """Whether a certificate that has not expired is in the data dir."""
        with self._lock:
            return self._issued is not None and self._issued.not_after > _now()

    def _roots(self) -> dict[str, x509.Certificate]:
        """What this agent trusts: the trust state's roots, the bundle's until it has one."""
        if self._trust is not None:
            return self._trust.root_certificates
        return dict(self._bundle.roots)

    def _roots_pem(self) -> bytes:
        if self._trust is not None:
            return self._trust.roots_pem()
        return self._bundle.roots_pem()

    def _chain_root(self) -> str | None:
        if self._issued is None:
            return None
        roots = self._roots()
        for pem in (self._issued.roots_pem, self._bundle.roots_pem()):
            if pem:
                for cert in x509.load_pem_x509_certificates(pem):
                    roots.setdefault(trust.key_fingerprint(cert), cert)
        return chain_root(self._issued.chain, roots)

    def _record_error(self, source: str, message: str) -> None:
        """Keep the newest error per source; last_error is the newest one not yet resolved."""
        with self._lock:
            self._errors.pop(source, None)
            self._errors[source] = message
            self._write_status()

    def _clear_error(self, source: str) -> None:
        with self._lock:
            self._errors.pop(source, None)

    def _last_error(self) -> str | None:
        revoked = self.revoked
        if revoked is not None:
            # In the "STATUS: message" form of the other errors: it is what the server
            # answers this certificate now.
            return f"PERMISSION_DENIED: {revoked}"
        return next(reversed(self._errors.values()), None)

    def status(self) -> dict[str, Any]:
        with self._lock:
            issued = self._issued
            if self._revoked is not None:
                state = "revoked"
            else:
                state = "enrolled" if issued is not None else "not-enrolled"
            return {
                "name": self.name,
                "state": state,
                "serial": issued.serial if issued else None,
                "not_after": _iso(issued.not_after) if issued else None,
                "renew_after": _iso(issued.renew_after) if issued else None,
                "chain_root_fingerprint": self._chain_root(),
                "trusted_roots": list(self._roots()),
                "trust_state_version": self._trust.version if self._trust else None,
                "endpoint": endpoint_json(self._endpoint),
                "renewals": issued.renewals if issued else 0,
                "last_error": self._last_error(),
                "revoked_because": self._revoked,
                "updated": _iso(_now()),
            }

    def _write_status(self) -> None:
        with self._lock:
            data = json.dumps(self.status(), indent=2).encode() + b"\n"
            write_atomic(self.directory / STATUS_FILE, data)

    def _install(self, issued: Issued) -> None:
        """Make `issued` current and schedule its renewal."""
        with self._lock:
            self._issued = issued
            wait = (issued.renew_after - _now()).total_seconds() / self._time_scale
            self._renew_deadline = time.monotonic() + max(0.0, wait)
            self._soon = None
            self._retry_at = None
            self._check_revoked()
            self._check_triggers()
        self._wake.set()

    def _check_revoked(self) -> None:
        """Stop for good when the trust state lists this certificate's serial or key as
        revoked."""
        state, issued = self._trust, self._issued
        if state is None or issued is None or self._revoked is not None:
            return
        body = state.body
        if _serial_number(issued.serial) in {_serial_number(s) for s in body.revoked_serials}:
            self._mark_revoked(issued.serial, "the trust state lists it as revoked")
        elif trust.key_fingerprint(issued.chain[0]) in body.revoked_certificate_key_fingerprints:
            self._mark_revoked(issued.serial, "the trust state lists its key as revoked")

    def _mark_revoked(self, serial: str, because: str) -> None:
        """Record that the certificate `serial` is revoked, if it is still the current
        one, and end the run: no renewal can succeed, only a new enrollment."""
        with self._lock:
            if self._revoked is not None or self._issued is None or self._issued.serial != serial:
                return
            self._revoked = because
            self._soon = None
            self._retry_at = None
            self._write_status()
        log.error("%s (certificate %s: %s)", REVOKED, serial, because)
        self._stop.set()
        self._wake.set()

    def _check_triggers(self) -> None:
        """Renew soon when the trust state says a newer root is ready."""
        state, issued = self._trust, self._issued
        if state is None or issued is None or self._soon is not None or self._revoked:
            return
        reason = ""
        newest = state.body.roots[-1].fingerprint if state.body.roots else ""
        # The server issues from an intermediate under its newest root once that one is
        # active; a zone server's intermediate is not listed, so its agents just try.
        ready = self._endpoint.zone or any(
            i.issuer_fingerprint == newest and i.state == "active" for i in state.body.intermediates
        )
        if newest and ready and self._chain_root() != newest:
            reason = f"the trust state's newest root is {newest[:16]}…"
        if reason and self._retry_at is None:
            self._soon = time.monotonic() + _random.uniform(0, SOON_MAX_SECONDS)
            self._soon_reason = reason
            self._wake.set()

    # -- enrollment ----------------------------------------------------------------------

    def enroll(self, token: str) -> bool:
        """Enroll at the bundle's endpoint; False if stopped first, EnrollmentRefused if refused."""
        if self._issued is not None:
            log.warning(
                "the certificate in %s expired at %s; enrolling again",
                self.directory,
                _iso(self._issued.not_after),
            )
        endpoint = self._bundle.enrollment_endpoint()
        key_pem, csr_pem = new_key_and_csr(self.name)
        backoff = Backoff()
        log.info("enrolling as %s at %s (%s)", self.name, endpoint.name, endpoint.bootstrap_listen)
        while True:
            channel = bootstrap_channel_for(endpoint.bootstrap_listen, self._bundle.roots_pem())
            try:
                with KeyplaneClient(channel, timeout=RPC_TIMEOUT) as client:
                    response = client.enroll(csr_pem, token)
                break
            except KeyplaneClientError as exc:
                self._record_error("enroll", str(exc))
                if exc.code not in TRANSIENT_CODES:
                    raise EnrollmentRefused(f"enrollment refused: {exc}") from None
                delay = backoff.next()
                log.warning("enrollment failed: %s (trying again in %.1f s)", exc, delay)
                if self._stop.wait(delay):
                    return False
        issued = issued_from(response, key_pem, self.name, renewals=0)
        with self._lock:
            self._endpoint = endpoint
            _write_agent_json(self.directory, self.name, endpoint)
            save_issued(self.directory, issued)
            self._clear_error("enroll")
            self._install(issued)
            self._write_status()
        log.info(
            "enrolled as %s: serial %s, valid until %s",
            self.name,
            issued.serial,
            _iso(issued.not_after),
        )
        return True

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        """Renew and follow the trust state until the stop event is set."""
        self._threads = [
            threading.Thread(target=self._follow_trust_state, name="trust", daemon=True),
            threading.Thread(target=self._renew_loop, name="renew", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("running as %s: following the trust state at %s", self.name, self._endpoint.listen)
        while not self._stop.wait(0.5):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._watch is not None:
                self._watch.cancel()
            if self._renew_channel is not None:
                self._renew_channel.close()
        for thread in self._threads:
            thread.join(timeout=10)
        log.info("stopped")

    def _restart_watch(self) -> None:
        """Reconnect the trust-state stream (with a new certificate or new roots)."""
        with self._lock:
            if self._watch is not None:
                self._watch.cancel()

    def _channel_key(self) -> tuple[bytes, bytes]:
        with self._lock:
            assert self._issued is not None  # noqa: S101 - run() starts after enrollment
            return self._roots_pem(), self._issued.chain_pem

    def _credential(self, roots_pem: bytes) -> Credential:
        with self._lock:
            assert self._issued is not None  # noqa: S101 - run() starts after enrollment
            return Credential(
                self._issued.chain_pem, self._issued.key_pem, roots_pem, self.directory
            )

    def _follow_trust_state(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            key = self._channel_key()
            channel = channel_for(self._endpoint.listen, self._credential(key[0]))
            client = KeyplaneClient(channel, timeout=RPC_TIMEOUT)
            watch: TrustStateWatch | None = None
            connected_at: float | None = None
            try:
                # Catch up first: it also proves the connection, which clears an old error.
                self._accept(client.get_trust_state(self._held_version()))
                connected_at = time.monotonic()
                with self._lock:
                    watch = client.watch_trust_state(self._held_version())
                    self._watch = watch
                    if self._stop.is_set() or self._channel_key() != key:
                        watch.cancel()
                for batch in watch:
                    self._accept(batch)
                    if self._channel_key() != key:
                        break
            except KeyplaneClientError as exc:
                self._record_error("trust", str(exc))
                log.warning("trust state stream: %s", exc)
            except TrustStateError as exc:
                self._record_error("trust", f"trust state rejected: {exc}")
                log.warning("trust state rejected: %s", exc)
            except Exception as exc:  # a full disk, a bug: report it and reconnect
                log.exception("following the trust state failed")
                self._record_error("trust", f"trust state: {type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._watch = None
                if watch is not None:
                    watch.cancel()
                client.close()
            if self._stop.is_set():
                return
            if self._channel_key() != key:
                continue  # a new certificate or new roots: reconnect with them now
            if connected_at is not None and time.monotonic() - connected_at > BACKOFF_MAX:
                backoff.reset()  # it was up for a while: this is a new outage
            self._stop.wait(backoff.next())

    def _held_version(self) -> int:
        with self._lock:
            return self._trust.version if self._trust is not None else 0

    def _accept(self, batch: list[Any]) -> None:
        """Verify a batch of versions from the one held; keep and save the newest."""
        with self._lock:
            held = self._trust
            if not batch:  # nothing newer: the connection works, so an old error is over
                if "trust" in self._errors:
                    self._clear_error("trust")
                    self._write_status()
                return
        state = trust.follow(held, batch, self._bundle.root_fingerprints)
        write_atomic(self.directory / TRUST_FILE, state.serialize())
        with self._lock:
            self._trust = state
            self._clear_error("trust")
            self._check_revoked()
            self._check_triggers()
            self._write_status()
        log.info(
            "trust state version %d: roots %s",
            state.version,
            ", ".join(fp[:16] for fp in state.root_fingerprints),
        )

    def _renew_loop(self) -> None:
        while not self._stop.is_set() and self._revoked is None:
            self._wake.clear()
            with self._lock:
                # After a failure only the retry (or a new trigger) counts, not the schedule.
                due = self._retry_at if self._retry_at is not None else self._renew_deadline
                if self._soon is not None:
                    due = min(due, self._soon)
            wait = due - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
                continue
            try:
                self._renew_once()
            except Exception as exc:  # a bug or a full disk must not end renewals
                log.exception("renewal failed unexpectedly")
                self._renewal_failed(f"renewal failed: {type(exc).__name__}: {exc}")

    def _renewal_failed(self, error: str) -> None:
        """Keep the current certificate and try again after a backoff."""
        delay = self._renew_backoff.next()
        with self._lock:
            self._soon = None
            self._retry_at = time.monotonic() + delay
            self._record_error("renew", error)
        log.warning("renewal failed: %s (trying again in %.1f s)", error, delay)

    def _pending_renewal(self, serial: str) -> tuple[bytes, bytes]:
        """The key and CSR of this certificate's renewal: made once and kept (0600) until
        the renewal is saved, so that a renewal whose answer was lost (the server
        renewed, the agent never heard) is asked again for the same key, and answered
        with the same certificate; a certificate renews once."""
        path = self.directory / PENDING_FILE
        try:
            pending = json.loads(path.read_text())
            if pending.get("for") == serial:
                return pending["key_pem"].encode(), pending["csr_pem"].encode()
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        key_pem, csr_pem = new_key_and_csr(self.name)
        record = {"for": serial, "key_pem": key_pem.decode(), "csr_pem": csr_pem.decode()}
        write_atomic(path, json.dumps(record).encode(), 0o600)
        return key_pem, csr_pem

    def _renew_once(self) -> None:
        with self._lock:
            current = self._issued
            assert current is not None  # noqa: S101 - run() starts after enrollment
            if self._soon is not None:
                why = self._soon_reason
            elif self._retry_at is not None:
                why = "trying again after a failure"
            else:
                why = "renewal time"
            roots_pem = self._roots_pem()
        log.info("renewing (%s)", why)
        key_pem, csr_pem = self._pending_renewal(current.serial)
        channel = channel_for(self._endpoint.listen, self._credential(roots_pem))
        with self._lock:
            if self._stop.is_set():
                channel.close()
                return
            self._renew_channel = channel
        error = ""
        refused_as_revoked = False
        try:
            response = KeyplaneClient(channel, timeout=RPC_TIMEOUT).renew(csr_pem)
            issued = issued_from(response, key_pem, self.name, current.renewals + 1)
        except KeyplaneClientError as exc:
            error = str(exc)
            refused_as_revoked = says_revoked(exc)
        except AgentError as exc:
            error = str(exc)
        finally:
            with self._lock:
                self._renew_channel = None
            channel.close()
        if refused_as_revoked:
            self._mark_revoked(current.serial, f"the renewal was refused: {error}")
            return
        if self._stop.is_set():
            return
        if error:
            self._renewal_failed(error)
            return
        self._renew_backoff.reset()
        with self._lock:
            save_issued(self.directory, issued)
            (self.directory / PENDING_FILE).unlink(missing_ok=True)  # saved: no longer pending
            self._clear_error("renew")
            self._install(issued)
            newest = self._trust.body.roots[-1].fingerprint if self._trust else None
            if newest and self._chain_root() != newest:
                # Still under an older root: try again later, then less and less often.
                self._soon = time.monotonic() + self._root_backoff.next()
                self._soon_reason = "the certificate is not under the newest root yet"
            else:
                self._root_backoff.reset()
            self._write_status()
        log.info("renewed: serial %s, valid until %s", issued.serial, _iso(issued.not_after))
        self._restart_watch()


# -- commands --------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _prepare_data_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s keyplane agent: %(message)s",
        stream=sys.stderr,
    )
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read the init bundle {args.bundle}: {exc.strerror}", 2)
    try:
        bundle = load_bundle(data, args.fingerprint)
    except BundleError as exc:
        return _fail(f"the init bundle {args.bundle} is refused: {exc}", 2)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _prepare_data_dir(args.data_dir)
        agent = Agent(args.data_dir, bundle, args.name, args.time_scale, stop)
    except AgentError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"cannot use the data dir {args.data_dir}: {exc.strerror}", 2)
    if agent.revoked is None and not agent.enrolled:
        try:
            if not agent.enroll(args.token or ""):
                return 0
        except EnrollmentRefused as exc:
            return _fail(str(exc), 1)
        except AgentError as exc:
            return _fail(f"enrollment failed: {exc}", 1)
        except OSError as exc:
            return _fail(f"cannot save the certificate in {args.data_dir}: {exc.strerror}", 1)
    if agent.revoked is None:
        agent.run()
    revoked = agent.revoked
    if revoked is not None:
        return _fail(
            f"{revoked}; the data dir {args.data_dir} is kept as it is: move it aside and "
            "start 'keyplane agent run' with a new --token",
            EXIT_REVOKED,
        )
    return 0


def _read_status(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STATUS_FILE).read_text())
    except FileNotFoundError:
        raise AgentError(
            f"no agent in {directory} (no {STATUS_FILE}); start one with 'keyplane agent run'"
        ) from None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read {directory / STATUS_FILE}: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(f"{directory / STATUS_FILE} is damaged")
    return data


def cmd_status(args: argparse.Namespace) -> int:
    try:
        data = _read_status(args.data_dir)
    except AgentError as exc:
        return _fail(str(exc), 2)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    endpoint = data.get("endpoint") or {}
    rows = [
        ("name", data.get("name")),
        ("state", data.get("state")),
        ("serial", data.get("serial")),
        ("not after", data.get("not_after")),
        ("renew after", data.get("renew_after")),
        ("chain root", data.get("chain_root_fingerprint")),
        ("trusted roots", ", ".join(data.get("trusted_roots") or [])),
        ("trust state", data.get("trust_state_version")),
        ("endpoint", f"{endpoint.get('name', '')} {endpoint.get('listen', '')}".strip()),
        ("renewals", data.get("renewals")),
        ("last error", data.get("last_error")),
        ("updated", data.get("updated")),
    ]
    for label, value in rows:
        print(f"{label + ':':21}{'-' if value is None or value == '' else value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        state_bytes = (args.data_dir / TRUST_FILE).read_bytes()
    except FileNotFoundError:
        return _fail(
            f"no trust state in {args.data_dir} (start the agent with 'keyplane agent run' "
            "and let it follow the trust state)",
            2,
        )
    except OSError as exc:
        return _fail(f"cannot read {args.data_dir / TRUST_FILE}: {exc.strerror}", 2)
    try:
        state = trust.load(state_bytes)
    except Exception:  # protobuf's DecodeError or TrustStateError
        return _fail(f"{args.data_dir / TRUST_FILE} is damaged", 2)
    try:
        payload = args.file.read_bytes()
        signature = args.signature.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}", 2)
    try:
        signed = message_signing_service_pb2.SignedMessage.FromString(signature)
    except Exception:  # protobuf's DecodeError
        return _fail(f"signature rejected: {args.signature} is not a keyplane signature file", 1)
    try:
        verified = verify_message(payload, signed, state)
    except MessageVerificationError as exc:
        return _fail(f"signature rejected: {exc}", 1)
    signed_at = verified.signed_at.isoformat()
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "signer_fingerprint": verified.signer_fingerprint,
                    "signer_subject": verified.signer_subject,
                    "root_fingerprint": verified.root_fingerprint,
                    "signed_at": signed_at,
                    "trust_state_version": state.version,
                },
                indent=2,
            )
        )
    else:
        print(
            f"OK: signed by {verified.signer_subject} at {signed_at} "
            f"(root {verified.root_fingerprint[:16]}…, trust state v{state.version})"
        )
    return 0


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("the time scale must be a positive number")
    return value


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `keyplane agent run|status|verify` to the CLI."""
    agent = commands.add_parser(
        "agent",
        help="run a client agent (enroll, renew, follow trust)",
        description=AGENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = agent.add_subparsers(dest="verb", metavar="VERB", required=True)
    data_dir_help = "the agent's directory: key, certificate, trust state, status (mode 0700)"

    p = verbs.add_parser(
        "run",
        help="enroll (first start) and run: renew, follow the trust state; stop with SIGTERM",
        description=RUN_HELP,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle",
        type=Path,
        required=True,
        help="the init bundle (keyplane-init.dat from 'keyplane bundle download')",
    )
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument(
        "--token",
        help="enrollment token from 'keyplane tokens create' (first start only; a restart "
        "with a valid certificate does not need it)",
    )
    p.add_argument(
        "--fingerprint",
        help="the root fingerprint to expect in the bundle (sha256:HEX or HEX); "
        "a bundle without it is refused",
    )
    p.add_argument(
        "--name",
        help="the certificate's common name (default: agent-<8 hex>, kept in the data dir)",
    )
    p.add_argument(
        "--time-scale",
        type=_time_scale,
        default=1.0,
        metavar="N",
        help="wait (renew_after - now) / N seconds before renewing (for tests; default 1)",
    )
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("status", help="show what the agent in --data-dir holds and does")
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser(
        "verify",
        help="verify a signed file against the agent's trust state (offline)",
    )
    p.add_argument("file", type=Path, help="the signed file")
    p.add_argument("signature", type=Path, help="its signature (FILE.sig from 'keyplane sign')")
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_verify)
