"""The agent's runtime: one Agent over its data dir, with a renewal thread (before the
certificate expires, soon after a new root, backing off after failures) and a trust
thread (it follows the signed trust state over mutual TLS, reconnecting with backoff),
and what `agent status` shows. While its own server does not answer, both turn to a
peer server its own server trusts (failover.py) and come back when it answers again."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from keyplane.clients import trust
from keyplane.clients.agent.errors import AgentError, EnrollmentRefused
from keyplane.clients.agent.failover import (
    FAILBACK_SECONDS,
    PEER_POLL_SECONDS,
    PROBE_TIMEOUT,
    Peer,
    PeerTrust,
    peers_of,
    revoked_by_peers,
    unreachable,
)
from keyplane.clients.agent.files import (
    AGENT_FILE,
    PENDING_FILE,
    STATUS_FILE,
    TRUST_FILE,
    _endpoint_from_json,
    _read_agent_json,
    _write_agent_json,
    endpoint_json,
    load_issued,
    save_issued,
    write_atomic,
)
from keyplane.clients.agent.keys import (
    Issued,
    _common_name,
    _iso,
    _now,
    chain_root,
    issued_from,
    new_key_and_csr,
)
from keyplane.clients.bundle import Bundle, BundleError
from keyplane.clients.client import (
    KeyplaneClient,
    KeyplaneClientError,
    TrustStateWatch,
    bootstrap_channel_for,
    channel_for,
)
from keyplane.clients.credentials import Credential
from keyplane.clients.trust import TrustState, TrustStateError

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


@dataclass(frozen=True)
class RenewalOutcome:
    """What one renewal call came to."""

    error: str
    issued: Issued | None = None
    refused_as_revoked: bool = False
    # The server did not answer: a peer may be asked instead.
    unanswered: bool = False


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
        # The peer server in use while its own server does not answer (None: its own).
        self._using: Peer | None = None
        self._peer_trust = PeerTrust(directory)

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

    def _peers(self) -> list[Peer]:
        """Its own server's peers (the one in use first)."""
        peers = peers_of(self._trust, self._bundle)
        if self._using is not None:
            peers.sort(key=lambda p: p.fqdn != self._using.fqdn)  # type: ignore[union-attr]
        return peers

    def _chain_root(self) -> str | None:
        if self._issued is None:
            return None
        roots = self._roots()
        for peer in peers_of(self._trust, self._bundle):
            roots.update(peer.roots)  # a certificate renewed at a peer ends at its root
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
                "server_in_use": endpoint_json(
                    self._using.endpoint() if self._using is not None else self._endpoint
                ),
                "peer_roots": {p.fqdn: list(p.roots) for p in peers_of(self._trust, self._bundle)},
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
        serial = _serial_number(issued.serial)
        peer = self._peer_trust.state
        # A peer's revocations count too: a certificate renewed at a peer is the peer's,
        # and while on a peer, its trust state says what its own server had revoked.
        own_lists = [(body, "the trust state")]
        if peer is not None and self._using is not None:
            own_lists.append((peer.body, f"{peer.body.server_fqdn}'s trust state"))
        for lists, where in own_lists:
            if serial in {_serial_number(s) for s in lists.revoked_serials}:
                self._mark_revoked(issued.serial, f"{where} lists it as revoked")
                return
            if trust.key_fingerprint(issued.chain[0]) in lists.revoked_certificate_key_fingerprints:
                self._mark_revoked(issued.serial, f"{where} lists its key as revoked")
                return
        why = revoked_by_peers(issued.chain[0], serial, [state, peer if self._using else None])
        if why is not None:
            self._mark_revoked(issued.serial, why)

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
        newest, ready = self._newest_root()
        if newest and ready and self._chain_root() != newest:
            reason = f"the trust state's newest root is {newest[:16]}…"
        if reason and self._retry_at is None:
            self._soon = time.monotonic() + _random.uniform(0, SOON_MAX_SECONDS)
            self._soon_reason = reason
            self._wake.set()

    def _newest_root(self) -> tuple[str, bool]:
        """The newest root of the server that issued the certificate (its own, or a peer
        it renewed at), and whether that server issues under it yet."""
        state = self._trust
        if state is None:
            return "", False
        chain = self._chain_root()
        for section in state.body.peers:
            if chain is not None and chain in {r.fingerprint for r in section.roots}:
                newest = section.roots[-1].fingerprint if section.roots else ""
                return newest, any(
                    i.issuer_fingerprint == newest and i.state == "active"
                    for i in section.intermediates
                )
        newest = state.body.roots[-1].fingerprint if state.body.roots else ""
        # The server issues from an intermediate under its newest root once that one is
        # active; a zone server's intermediate is not listed, so its agents just try.
        ready = self._endpoint.zone or any(
            i.issuer_fingerprint == newest and i.state == "active" for i in state.body.intermediates
        )
        return newest, ready

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
            # With a peer to turn to, a server slow to answer counts as down sooner.
            timeout = PROBE_TIMEOUT if self._peers() else RPC_TIMEOUT
            client = KeyplaneClient(channel, timeout=timeout)
            watch: TrustStateWatch | None = None
            connected_at: float | None = None
            failed_over = False
            try:
                # Catch up first: it also proves the connection, which clears an old error.
                self._accept(client.get_trust_state(self._held_version()))
                connected_at = time.monotonic()
                self._use(None)
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
                log.warning("trust state stream: %s", exc)
                if unreachable(exc) and self._peers():
                    failed_over = True  # below, once this client is closed
                else:
                    self._record_error("trust", str(exc))
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
            if failed_over and self._follow_a_peer():
                backoff.reset()
                continue  # its own server is asked again now
            if self._channel_key() != key:
                continue  # a new certificate or new roots: reconnect with them now
            if connected_at is not None and time.monotonic() - connected_at > BACKOFF_MAX:
                backoff.reset()  # it was up for a while: this is a new outage
            self._stop.wait(backoff.next())

    def _use(self, peer: Peer | None) -> None:
        """Say which server is in use: its own (None) or a peer."""
        with self._lock:
            before = self._using
            if (before.fqdn if before else None) == (peer.fqdn if peer else None):
                return
            self._using = peer
            self._write_status()
        if peer is None:
            log.info("back on its own server %s", self._endpoint.name)
        else:
            log.warning(
                "its own server %s does not answer: using the peer %s (%s)",
                self._endpoint.name,
                peer.fqdn,
                peer.listen,
            )

    def _follow_a_peer(self) -> bool:
        """While its own server does not answer: follow a peer's trust state for a few
        seconds (then its own server is asked again). False if no peer answered."""
        deadline = time.monotonic() + FAILBACK_SECONDS
        answered = False
        while not self._stop.is_set() and time.monotonic() < deadline:
            for peer in self._peers():
                with self._lock:
                    if self._issued is None:
                        return False
                    credential = self._credential(peer.roots_pem())
                try:
                    with KeyplaneClient(
                        channel_for(peer.listen, credential), timeout=PROBE_TIMEOUT
                    ) as client:
                        self._peer_trust.follow(client, peer)
                except (KeyplaneClientError, TrustStateError) as exc:
                    log.warning("the peer %s: %s", peer.fqdn, exc)
                    continue
                answered = True
                self._use(peer)
                with self._lock:
                    self._clear_error("trust")
                    self._check_revoked()
                    self._write_status()
                break
            if not answered:
                self._use(None)
                return False
            self._stop.wait(PEER_POLL_SECONDS)
        return answered

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
            # Its own server first; a peer only if that does not answer.
            targets: list[tuple[Peer | None, str, bytes]] = [
                (None, self._endpoint.listen, roots_pem)
            ]
            targets += [(p, p.listen, p.roots_pem()) for p in self._peers()]
        log.info("renewing (%s)", why)
        key_pem, csr_pem = self._pending_renewal(current.serial)
        # With a peer to turn to, a server that is slow to answer counts as down sooner.
        own_timeout = PROBE_TIMEOUT if len(targets) > 1 else RPC_TIMEOUT
        for peer, address, roots in targets:
            outcome = self._renew_at(
                address,
                roots,
                key_pem,
                csr_pem,
                current.renewals + 1,
                RPC_TIMEOUT if peer is not None else own_timeout,
            )
            if not outcome.unanswered:
                break
            log.warning(
                "renewal at %s: %s", peer.fqdn if peer else self._endpoint.name, outcome.error
            )
        error, refused_as_revoked = outcome.error, outcome.refused_as_revoked
        if outcome.issued is not None and peer is not None:
            log.info("renewed at the peer %s (its own server does not answer)", peer.fqdn)
        if refused_as_revoked:
            self._mark_revoked(current.serial, f"the renewal was refused: {error}")
            return
        if self._stop.is_set():
            return
        if outcome.issued is None:
            self._renewal_failed(error)
            return
        issued = outcome.issued
        self._renew_backoff.reset()
        with self._lock:
            save_issued(self.directory, issued)
            (self.directory / PENDING_FILE).unlink(missing_ok=True)  # saved: no longer pending
            self._clear_error("renew")
            self._install(issued)
            newest, _ = self._newest_root()
            if newest and self._chain_root() != newest:
                # Still under an older root: try again later, then less and less often.
                self._soon = time.monotonic() + self._root_backoff.next()
                self._soon_reason = "the certificate is not under the newest root yet"
            else:
                self._root_backoff.reset()
            self._write_status()
        log.info("renewed: serial %s, valid until %s", issued.serial, _iso(issued.not_after))
        self._restart_watch()

    def _renew_at(
        self,
        address: str,
        roots_pem: bytes,
        key_pem: bytes,
        csr_pem: bytes,
        renewals: int,
        timeout: float,
    ) -> RenewalOutcome:
        """One renewal call, at one server."""
        channel = channel_for(address, self._credential(roots_pem))
        with self._lock:
            if self._stop.is_set():
                channel.close()
                return RenewalOutcome("stopped")
            self._renew_channel = channel
        try:
            response = KeyplaneClient(channel, timeout=timeout).renew(csr_pem)
            return RenewalOutcome("", issued_from(response, key_pem, self.name, renewals))
        except KeyplaneClientError as exc:
            return RenewalOutcome(
                str(exc), refused_as_revoked=says_revoked(exc), unanswered=unreachable(exc)
            )
        except AgentError as exc:
            return RenewalOutcome(str(exc))
        finally:
            with self._lock:
                self._renew_channel = None
            channel.close()
