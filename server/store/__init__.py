"""keyplane.server.store: the one package that speaks SQL to the state DB."""

from keyplane.server.store.backup import BackupReads, Revocation, Unrevoked, check_file
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
    "BackupReads",
    "CertificateRecord",
    "KeyRecord",
    "Revocation",
    "SchemaError",
    "StateStore",
    "Transaction",
    "TrustStateRecord",
    "Unrevoked",
    "ZoneRecord",
    "certificate_row",
    "check_file",
]
