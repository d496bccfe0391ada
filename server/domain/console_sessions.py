"""Signing in to the admin console: one-time links and the sessions they open.

`keyplane console login` asks for a link for the caller's own identity (any person's
role); the link holds `<id>.<secret>`, valid LINK_LIFETIME and good once. Opening it
opens a session bound to that identity's certificate, whose cookie holds another
`<id>.<secret>`. Only SHA-256 of each secret is stored, compared in constant time.
Every request re-admits the certificate the way mutual TLS admits it (unrevoked,
unexpired, issuer live), so revoking the identity ends its sessions at once; a session
also ends when signed out, after SESSION_LIFETIME, or after SESSION_IDLE unused.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from keyplane.server.domain import certs
from keyplane.server.domain.admission import Admission
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import PermissionDenied, Unauthenticated
from keyplane.server.kinds import HUMAN_ROLES
from keyplane.server.store import StateStore
from keyplane.server.store.console import ConsoleLinkRecord, ConsoleSessionRecord

log = logging.getLogger(__name__)

LINK_LIFETIME = datetime.timedelta(minutes=5)
SESSION_LIFETIME = datetime.timedelta(hours=8)
SESSION_IDLE = datetime.timedelta(minutes=30)
# A session's last use is written at most this often (not on every page).
SEEN_EVERY = datetime.timedelta(minutes=1)
# Rows are forgotten this long after they expired.
KEPT_AFTER_EXPIRY = datetime.timedelta(days=1)
_ID_BYTES = 12
_SECRET_BYTES = 32
# The longest `<id>.<secret>` this server makes, with room; anything longer is not one.
MAX_TOKEN_LENGTH = 128
_CSRF_CONTEXT = b"keyplane-console-csrf-v1"


class SignInRefused(Unauthenticated):
    """A link or session that does not sign anyone in; the message says why."""

    reason = "CONSOLE_SIGN_IN_REFUSED"


@dataclass(frozen=True)
class SignInLink:
    """A new one-time link (its token is shown once, to the identity that asked)."""

    token: str
    expires_at: datetime.datetime
    name: str
    roles: frozenset[str]


@dataclass(frozen=True)
class Session:
    """A live session and the identity admitted for it on this request."""

    id: str
    cookie: str  # `<id>.<secret>`: only the browser and this request hold it
    identity: Identity
    expires_at: datetime.datetime

    @property
    def csrf_token(self) -> str:
        return csrf_token(self.cookie)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(token: str) -> tuple[str, str] | None:
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    found, dot, secret = token.partition(".")
    if not dot or not found or not secret:
        return None
    return found, secret


def csrf_token(cookie: str) -> str:
    """The session's form token: derived from its secret, so it is never stored, and
    unknown to anyone who does not hold the cookie."""
    return hmac.new(cookie.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def csrf_matches(cookie: str, given: str) -> bool:
    return hmac.compare_digest(csrf_token(cookie).encode(), given.encode())


class ConsoleSignIn:
    """Makes sign-in links, redeems them, and admits sessions on every request."""

    def __init__(self, store: StateStore, admission: Admission, clock: Clock) -> None:
        self.store = store
        self.admission = admission
        self.clock = clock

    def create_link(self, who: Identity) -> SignInLink:
        """A one-time link for `who` itself (never for anyone else): audited."""
        if not who.roles & HUMAN_ROLES:
            raise PermissionDenied("only people (admin, operator, auditor) sign in to the console")
        if self.store.certificate(who.serial) is None:
            raise PermissionDenied("the console signs in identities this server issued")
        now = self.clock.now()
        link_id, secret = secrets.token_urlsafe(_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES)
        expires = now + LINK_LIFETIME
        with self.store.transaction(now) as tx:
            tx.prune_console(now - KEPT_AFTER_EXPIRY)
            tx.insert_console_link(
                ConsoleLinkRecord(link_id, _digest(secret), who.serial, now, expires, None)
            )
            tx.audit(
                who.actor, "console.link", who.serial, link=link_id, expires=expires.isoformat()
            )
        return SignInLink(
            f"{link_id}.{secret}", expires, who.common_name, frozenset(r.value for r in who.roles)
        )

    def _admit(self, serial: str) -> Identity:
        record = self.store.certificate(serial)
        if record is None:
            raise PermissionDenied("the client certificate is refused: it is not recorded")
        return self.admission.admit(certs.load_pem(record.certificate_pem))

    def redeem(self, token: str) -> Session:
        """Spend a link and open a session for its identity; SignInRefused (nothing
        changed) for a link that is unknown, used, expired, or whose identity is no longer
        admitted."""
        parts = _split(token)
        link = self.store.reads.console_link(parts[0]) if parts else None
        if (
            parts is None
            or link is None
            or not hmac.compare_digest(link.secret_hash.encode(), _digest(parts[1]).encode())
        ):
            raise SignInRefused(
                "this is not a sign-in link this server gave; run 'keyplane console login' "
                "for a new one"
            )
        now = self.clock.now()
        if link.used_at is not None:
            raise SignInRefused(
                "this sign-in link was used already (each is good once); run 'keyplane "
                "console login' for a new one"
            )
        if link.expires_at <= now:
            raise SignInRefused(
                "this sign-in link has expired (links last "
                f"{int(LINK_LIFETIME.total_seconds() // 60)} minutes); run 'keyplane console "
                "login' for a new one"
            )
        try:
            identity = self._admit(link.serial)
        except PermissionDenied as exc:
            raise SignInRefused(f"the identity cannot sign in: {exc}") from None
        session_id, secret = secrets.token_urlsafe(_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES)
        expires = now + SESSION_LIFETIME
        with self.store.transaction(now) as tx:
            if not tx.use_console_link(link.id):  # another worker or tab spent it first
                raise SignInRefused(
                    "this sign-in link was used already (each is good once); run 'keyplane "
                    "console login' for a new one"
                )
            tx.insert_console_session(
                ConsoleSessionRecord(
                    session_id, _digest(secret), link.serial, now, expires, now, None, None
                )
            )
            tx.audit(identity.actor, "console.sign_in", link.serial, session=session_id)
        return Session(session_id, f"{session_id}.{secret}", identity, expires)

    def _end(self, record: ConsoleSessionRecord, reason: str) -> None:
        now = self.clock.now()
        with self.store.transaction(now) as tx:
            tx.end_console_session(record.id, reason)

    def session(self, cookie: str) -> Session:
        """The session a cookie holds, its identity admitted now; SignInRefused saying
        why not (a session whose identity was refused is ended for good)."""
        parts = _split(cookie)
        record = self.store.reads.console_session(parts[0]) if parts else None
        if (
            parts is None
            or record is None
            or not hmac.compare_digest(record.secret_hash.encode(), _digest(parts[1]).encode())
        ):
            raise SignInRefused("you are not signed in")
        now = self.clock.now()
        if record.ended_at is not None:
            raise SignInRefused(f"your session ended ({record.end_reason})")
        if record.expires_at <= now:
            raise SignInRefused("your session expired; sign in again")
        if record.seen_at + SESSION_IDLE <= now:
            self._end(record, "unused for too long")
            raise SignInRefused("your session ended after a time unused; sign in again")
        try:
            identity = self._admit(record.serial)
        except PermissionDenied as exc:
            why = str(exc).removeprefix("the client certificate is refused: ")
            self._end(record, f"the identity was refused: {why}")
            raise SignInRefused(f"your session ended: the identity was refused ({why})") from None
        if now - record.seen_at >= SEEN_EVERY:
            with self.store.transaction(now) as tx:
                tx.touch_console_session(record.id)
        return Session(record.id, cookie, identity, record.expires_at)

    def sign_out(self, session: Session) -> None:
        now = self.clock.now()
        with self.store.transaction(now) as tx:
            if tx.end_console_session(session.id, "signed out"):
                tx.audit(
                    session.identity.actor,
                    "console.sign_out",
                    session.identity.serial,
                    session=session.id,
                )
