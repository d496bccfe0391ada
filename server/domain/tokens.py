"""Enrollment tokens: made by an operator, shown once, stored only as a SHA-256 hash,
spent one use per certificate in the transaction that records it; listed and revoked by
their id (the hash's first 16 hex digits), never by their secret.

A token is checked before anything else of a request is looked at (its role, expiry and
uses left), so a request with a bad token costs one indexed read, not a CSR verify.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import secrets
from dataclasses import dataclass

from keyplane.server.domain.clock import Clock
from keyplane.server.domain.settings import Settings
from keyplane.server.errors import (
    AlreadyRevoked,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from keyplane.server.kinds import Role
from keyplane.server.store import StateStore, TokenRecord

TOKEN_PREFIX = "kpt_"  # noqa: S105 - a marker, not a secret
TOKEN_ROLES = (Role.AGENT, Role.ZONE_SERVER)
MAX_TOKEN_USES = 1_000_000
MAX_TOKEN_TTL = datetime.timedelta(days=365)
MAX_TOKEN_LENGTH = 256
UNUSABLE = "the enrollment token is unknown, spent, expired or revoked"
TOKEN_ID = re.compile(r"[0-9a-f]{16}")
MAX_LISTED = 10_000


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
        if found.revoked_at is not None:
            raise Unauthenticated("this enrollment token was revoked; ask for a new one")
        token_role, left = found.role, found.uses_left
        if token_role != role:
            raise Unauthenticated(
                f"this enrollment token is for role {token_role}, not {role.value}"
            )
        if left <= 0 or found.expires_at <= self.clock.now():
            raise Unauthenticated(UNUSABLE)
        if left < needed:
            raise Unauthenticated(
                f"the enrollment token has {left} uses left; this batch needs {needed} "
                "(one per CSR)"
            )
        return digest

    def list(self, include_unusable: bool = False, limit: int = 0) -> list[TokenRecord]:
        """Tokens, newest first: the usable ones, or (include_unusable) every one."""
        limit = limit or 1000
        if not 1 <= limit <= MAX_LISTED:
            raise InvalidArgument(f"page_size must be at most {MAX_LISTED}")
        usable_at = None if include_unusable else self.clock.now()
        return self.store.reads.tokens(usable_at, limit)

    def revoke(self, actor: str, token_id: str) -> TokenRecord:
        """Make a token unusable at once: a request that has not spent its use yet is
        refused when it tries (the use is spent only if the token is unrevoked then)."""
        wanted = token_id.strip().lower()
        if not TOKEN_ID.fullmatch(wanted):
            raise InvalidArgument(
                "a token id is the 16 hex digits that 'keyplane tokens list' shows (the "
                "token_id of CreateEnrollmentToken), not the token itself"
            )
        with self.store.transaction(self.clock.now()) as tx:
            found = tx.reads.tokens_with_id(wanted)
            if not found:
                raise NotFound(f"no enrollment token has id {wanted}")
            if len(found) > 1:  # 64 bits of SHA-256 in common: not expected, never guessed at
                raise FailedPrecondition(f"{len(found)} enrollment tokens have id {wanted}")
            token = found[0]
            if not tx.revoke_token(token.token_hash, actor):
                raise AlreadyRevoked(f"enrollment token {wanted} was revoked already")
            tx.audit(
                actor,
                "token.revoke",
                wanted,
                role=token.role,
                uses_left=token.uses_left,
                expires=token.expires_at.isoformat(),
            )
        revoked = self.store.token(token.token_hash)
        assert revoked is not None  # noqa: S101 - it was just updated
        return revoked
