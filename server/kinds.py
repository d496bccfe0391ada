"""The names the state DB and the domain agree on: key kinds, key states and roles.

StrEnums, so a value read from keyplane.db compares equal to its member and is stored
as the same text; a leaf module, so the store, the domain and the zone server can all
import it.
"""

from __future__ import annotations

import enum


class KeyKind(enum.StrEnum):
    """A key of the hierarchy, by what it is for."""

    ROOT = "root"
    LEGACY_ROOT = "legacy_root"
    SERVER_TLS = "server_tls"
    INTERMEDIATE_TLS = "intermediate_tls"
    MESSAGE_SIGNING = "message_signing"
    ZONE_INTERMEDIATE = "zone_intermediate"
    # A trusted peer server's intermediate (its own or a zone's), as its trust state
    # lists it: never in this server's key inventory, only an issuer to admit by.
    PEER_INTERMEDIATE = "peer_intermediate"


# The server's own subordinates, which it rotates by itself.
SUBORDINATE_KINDS = (KeyKind.SERVER_TLS, KeyKind.INTERMEDIATE_TLS, KeyKind.MESSAGE_SIGNING)


class KeyState(enum.StrEnum):
    """Where a key is in its life: prepared (recorded, published, not used yet), active,
    retired (replaced, trusted until it expires), revoked (for good)."""

    PREPARED = "prepared"
    ACTIVE = "active"
    RETIRED = "retired"
    REVOKED = "revoked"


# Keys that may still sign or be trusted.
LIVE_STATES = (KeyState.PREPARED, KeyState.ACTIVE, KeyState.RETIRED)


class Role(enum.StrEnum):
    """What a certificate lets its holder do (carried as a URI SAN)."""

    ADMIN = "admin"
    OPERATOR = "operator"
    AUDITOR = "auditor"
    AGENT = "agent"
    ZONE_SERVER = "zone-server"


# Roles of people (and their tools), as opposed to components.
HUMAN_ROLES = frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR})
