"""keyplane.server.store: the one package that speaks SQL to the state DB."""

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
    "SCHEMA_VERSION",
    "AuditRecord",
    "CertificateRecord",
    "KeyRecord",
    "SchemaError",
    "StateStore",
    "Transaction",
    "TrustStateRecord",
    "ZoneRecord",
    "certificate_row",
]
