"""Conversions between domain records and keyplane.v1 messages."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives import serialization
from google.protobuf import timestamp_pb2

from keyplane.plugins.keys import KeyAlgorithm, PublicKey
from keyplane.server.domain.settings import Setting
from keyplane.server.errors import InvalidArgument
from keyplane.server.store import CertificateRecord, KeyRecord, KeyUsage
from keyplane.v1 import (
    certificate_service_pb2,
    common_pb2,
    key_service_pb2,
    root_key_service_pb2,
    settings_service_pb2,
)

_ALGORITHM_TO_PROTO = {
    KeyAlgorithm.EC_P256: common_pb2.KEY_ALGORITHM_EC_P256,
    KeyAlgorithm.EC_P384: common_pb2.KEY_ALGORITHM_EC_P384,
    KeyAlgorithm.RSA_2048: common_pb2.KEY_ALGORITHM_RSA_2048,
    KeyAlgorithm.RSA_3072: common_pb2.KEY_ALGORITHM_RSA_3072,
    KeyAlgorithm.RSA_4096: common_pb2.KEY_ALGORITHM_RSA_4096,
}
_ALGORITHM_FROM_PROTO = {v: k for k, v in _ALGORITHM_TO_PROTO.items()}


def algorithm_from_proto(value: common_pb2.KeyAlgorithm) -> KeyAlgorithm | None:
    """None for UNSPECIFIED (use the default); INVALID_ARGUMENT for an unknown number."""
    if value == common_pb2.KEY_ALGORITHM_UNSPECIFIED:
        return None
    if value not in _ALGORITHM_FROM_PROTO:
        raise InvalidArgument(f"unknown key algorithm {value}; see KeyAlgorithm in common.proto")
    return _ALGORITHM_FROM_PROTO[value]


def algorithm_to_proto(name: str) -> common_pb2.KeyAlgorithm:
    return _ALGORITHM_TO_PROTO.get(KeyAlgorithm(name), common_pb2.KEY_ALGORITHM_UNSPECIFIED)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def timestamp(value: datetime.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # FromDatetime goes through calendar.timegm in Python; this is the same for the
    # aware UTC datetimes keyplane keeps, at a fraction of the cost (per certificate).
    if value.tzinfo is None:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(value)
        return ts
    since = value - _EPOCH  # normalised: days may be negative, seconds and micros not
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000
    )


def root_key(record: KeyRecord) -> root_key_service_pb2.RootKey:
    state = (
        root_key_service_pb2.ROOT_KEY_STATE_REVOKED
        if record.state == "revoked"
        else root_key_service_pb2.ROOT_KEY_STATE_ACTIVE
    )
    return root_key_service_pb2.RootKey(
        name=record.name,
        number=record.number or 0,
        fingerprint=record.fingerprint,
        algorithm=algorithm_to_proto(record.algorithm),
        backend=record.backend,
        key_uri=record.key_uri,
        create_time=timestamp(record.created_at),
        state=state,
        revoke_time=timestamp(record.revoked_at),
        revoked_by=record.revoked_by or "",
        revoke_reason=record.revoke_reason or "",
        certificate_pem=record.certificate_pem or "",
    )


def legacy_root_key(record: KeyRecord, public_key: PublicKey) -> root_key_service_pb2.LegacyRootKey:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return root_key_service_pb2.LegacyRootKey(
        name=record.name,
        fingerprint=record.fingerprint,
        algorithm=algorithm_to_proto(record.algorithm),
        public_key_pem=pem,
        create_time=timestamp(record.created_at),
    )


_KIND_TO_PROTO = {
    "server_tls": key_service_pb2.KEY_KIND_SERVER_TLS,
    "intermediate_tls": key_service_pb2.KEY_KIND_INTERMEDIATE_TLS,
    "message_signing": key_service_pb2.KEY_KIND_MESSAGE_SIGNING,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_STATE_TO_PROTO = {
    "prepared": key_service_pb2.KEY_STATE_PREPARED,
    "active": key_service_pb2.KEY_STATE_ACTIVE,
    "retired": key_service_pb2.KEY_STATE_RETIRED,
    "revoked": key_service_pb2.KEY_STATE_REVOKED,
}
_SETTING_TYPES = {
    "text": settings_service_pb2.SETTING_TYPE_TEXT,
    "numeric": settings_service_pb2.SETTING_TYPE_NUMERIC,
    "boolean": settings_service_pb2.SETTING_TYPE_BOOLEAN,
    "protected": settings_service_pb2.SETTING_TYPE_PROTECTED,
    "fraction": settings_service_pb2.SETTING_TYPE_FRACTION,
}


def kind_from_proto(value: key_service_pb2.KeyKind, required: bool) -> str | None:
    if value == key_service_pb2.KEY_KIND_UNSPECIFIED:
        if required:
            raise InvalidArgument(
                "choose a key kind: server-tls, intermediate-tls or message-signing"
            )
        return None
    if value not in _KIND_FROM_PROTO:
        raise InvalidArgument(f"unknown key kind {value}; see KeyKind in key_service.proto")
    return _KIND_FROM_PROTO[value]


def key(record: KeyRecord, usage: KeyUsage | None = None) -> key_service_pb2.Key:
    return key_service_pb2.Key(
        signatures=usage.signatures if usage else 0,
        last_used=timestamp(usage.last_used_at) if usage else None,
        kind=_KIND_TO_PROTO[record.kind],
        fingerprint=record.fingerprint,
        name=record.name,
        issuer_fingerprint=record.issuer_fingerprint or "",
        not_before=timestamp(record.not_before),
        not_after=timestamp(record.not_after),
        state=_STATE_TO_PROTO[record.state],
        backend=record.backend,
        algorithm=algorithm_to_proto(record.algorithm),
        certificate_pem=record.certificate_pem or "",
    )


def setting(value: Setting) -> settings_service_pb2.Setting:
    definition = value.definition
    return settings_service_pb2.Setting(
        name=definition.name,
        value=value.value,
        type=_SETTING_TYPES[definition.value_type],
        affects=definition.affects,
        scope=definition.scope,
        is_default=value.is_default,
        description=definition.description,
        update_time=timestamp(value.updated_at),
        updated_by=value.updated_by or "",
    )


def certificate(record: CertificateRecord) -> certificate_service_pb2.CertificateRecord:
    return certificate_service_pb2.CertificateRecord(
        serial=record.serial,
        subject=record.subject,
        fingerprint=record.fingerprint,
        issuer_fingerprint=record.issuer_fingerprint,
        not_after=timestamp(record.not_after),
        component=record.role,
        revoke_time=timestamp(record.revoked_at),
        revoke_reason=record.revoke_reason or "",
        issue_time=timestamp(record.issued_at),
    )
