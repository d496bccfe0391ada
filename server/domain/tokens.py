"""Enrollment tokens: made by an operator, shown once, stored only as a SHA-256 hash,
spent one use per certificate in the transaction that records it.

A token is checked before anything else of a request is looked at (its role, expiry and
uses left), so a request with a bad token costs one indexed read, not a CSR verify.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass

from keyplane.server.domain.clock import Clock
from keyplane.server.domain.settings import Settings
from keyplane.server.errors import InvalidArgument, Unauthenticated
from keyplane.server.kinds import Role
from keyplane.server.store import StateStore

TOKEN_PREFIX = "kpt_"  # noqa: S105 - a marker, not a secret
TOKEN_ROLES = (Role.AGENT, Role.ZONE_SERVER)
MAX_TOKEN_USES = 1_000_000
MAX_TOKEN_TTL = datetime.timedelta(days=365)
MAX_TOKEN_LENGTH = 256
UNUSABLE = "the enrollment token is unknown, spent or expired"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    """A new enrollment token; the secret is returned once."""

    token: str
    token_id: str
    role: str
    uses: int
    expires_at: datetime.datetime


class Tokens:
    """Creates and checks enrollment tokens."""

    def __init__(self, store: StateStore, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock

    def create(self, actor: str, uses: int, ttl_seconds: int, role: str) -> Token:
        role = role or Role.AGENT
        if role not in TOKEN_ROLES:
            raise InvalidArgument(
                f"a token's role is one of: {', '.join(r.value for r in TOKEN_ROLES)}"
            )
        uses = uses or 1
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise InvalidArgument(f"uses must be between 1 and {MAX_TOKEN_USES}")
        ttl = datetime.timedelta(seconds=ttl_seconds or 86400)
        if not datetime.timedelta(seconds=1) <= ttl <= MAX_TOKEN_TTL:
            raise InvalidArgument("the token's ttl must be between 1 second and 365 days")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        now = self.clock.now()
        with self.store.transaction(now) as tx:
            tx.insert_token(digest, role, uses, now + ttl, actor)
            tx.audit(
                actor,
                "token.create",
                digest[:16],
                role=role,
                uses=uses,
                expires=(now + ttl).isoformat(),
            )
        return Token(token, digest[:16], role, uses, now + ttl)

    def check(self, token: str, role: Role, needed: int = 1) -> str:
        """The token's hash if it has `role`, is unexpired and can be used `needed`
        times; "" for no token under open enrollment (agents only); UNAUTHENTICATED
        otherwise. Spends nothing: the use is spent where the certificate is recorded."""
        if not token:
            if role is Role.AGENT and self.settings.flag("OpenEnrollment"):
                return ""
            raise Unauthenticated("enrollment needs a token ('keyplane tokens create')")
        if len(token) > MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX):
            raise Unauthenticated(UNUSABLE)
        digest = token_hash(token)
        found = self.store.token(digest)
        if found is None:
            raise Unauthenticated(UNUSABLE)
        token_role, left, expires_at = found
        if token_role != role:
            raise Unauthenticated(
                f"this enrollment token is for role {token_role}, not {role.value}"
            )
        if left <= 0 or expires_at <= self.clock.now():
            raise Unauthenticated(UNUSABLE)
        if left < needed:
            raise Unauthenticated(
                f"the enrollment token has {left} uses left; this batch needs {needed} "
                "(one per CSR)"
            )
        return digest
