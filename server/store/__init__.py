"""keyplane.server.store: the one package that speaks SQL to the state DB."""

from keyplane.server.store.peers import LIVE_PEER_STATES, PeerRecord, TrustEventRecord
from keyplane.server.store.records import (
    AuditRecord,
    CertificateRecord,
    KeyRecord,
    TrustStateRecord,
    ZoneRecord,
    certificate_row,
)
from keyplane.server.store.schema import SCHEMA_VERSION, SchemaError
from keyplane.server.store.state import StateStore
from keyplane.server.store.transaction import Transaction

__all__ = [
    "LIVE_PEER_STATES",
    "SCHEMA_VERSION",
    "AuditRecord",
    "CertificateRecord",
    "KeyRecord",
    "PeerRecord",
    "SchemaError",
    "StateStore",
    "Transaction",
    "TrustEventRecord",
    "TrustStateRecord",
    "ZoneRecord",
    "certificate_row",
]
