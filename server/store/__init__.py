"""keyplane.server.store: the one package that speaks SQL to the state DB."""

from keyplane.server.store.audit_chain import ChainedEvent
from keyplane.server.store.backup import BackupReads, Revocation, Unrevoked, check_file
from keyplane.server.store.peers import LIVE_PEER_STATES, PeerRecord, TrustEventRecord
from keyplane.server.store.records import (
    Actor,
    AuditOutcome,
    AuditRecord,
    CertificateRecord,
    CrlRecord,
    KeyIntent,
    KeyRecord,
    KeyUsage,
    RevokedEntry,
    TokenRecord,
    TrustStateRecord,
    ZoneRecord,
    certificate_row,
)
from keyplane.server.store.schema import SCHEMA_VERSION, SchemaError
from keyplane.server.store.state import StateStore
from keyplane.server.store.transaction import AuditEntry, Transaction

__all__ = [
    "LIVE_PEER_STATES",
    "SCHEMA_VERSION",
    "Actor",
    "AuditEntry",
    "AuditOutcome",
    "AuditRecord",
    "BackupReads",
    "CertificateRecord",
    "ChainedEvent",
    "CrlRecord",
    "KeyIntent",
    "KeyRecord",
    "KeyUsage",
    "PeerRecord",
    "Revocation",
    "RevokedEntry",
    "SchemaError",
    "StateStore",
    "TokenRecord",
    "Transaction",
    "TrustEventRecord",
    "TrustStateRecord",
    "Unrevoked",
    "ZoneRecord",
    "certificate_row",
    "check_file",
]
