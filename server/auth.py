"""Who may call what: the one table of RPC access rules, and the caller's identity.

Calls arrive on two listeners of one server: the mutual-TLS listener, where the TLS
stack has verified the client's chain against the active roots, and the bootstrap
listener (server TLS only), where there is no client identity. The same table decides
for both: PUBLIC methods need nothing; every other method needs a caller admitted by
the domain (issuer live and allowed to confer its roles, certificate unrevoked; see
server/domain/admission.py) with the role listed here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from cryptography import x509

from keyplane.server.domain.identity import Identity
from keyplane.server.errors import PermissionDenied, Unauthenticated


class Access(enum.Enum):
    """What a method needs."""

    PUBLIC = "public"
    ADMIN = "admin"
    AGENT = "agent"
    ZONE = "zone-server"


# Every RPC keyplane serves. A method missing here is refused, never let through.
ACCESS: dict[str, Access] = {
    "/grpc.health.v1.Health/Check": Access.PUBLIC,
    "/grpc.health.v1.Health/Watch": Access.PUBLIC,
    "/grpc.health.v1.Health/List": Access.PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Access.PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Access.PUBLIC,
    "/keyplane.v1.RootKeyService/CreateRootKey": Access.ADMIN,
    "/keyplane.v1.RootKeyService/ListRootKeys": Access.ADMIN,
    "/keyplane.v1.RootKeyService/GetRootKey": Access.ADMIN,
    "/keyplane.v1.RootKeyService/RevokeRootKey": Access.ADMIN,
    "/keyplane.v1.RootKeyService/GetLegacyRootKey": Access.ADMIN,
    "/keyplane.v1.KeyService/ListKeys": Access.ADMIN,
    "/keyplane.v1.KeyService/RotateKey": Access.ADMIN,
    "/keyplane.v1.SettingsService/ListSettings": Access.ADMIN,
    "/keyplane.v1.SettingsService/GetSetting": Access.ADMIN,
    "/keyplane.v1.SettingsService/UpdateSetting": Access.ADMIN,
    "/keyplane.v1.MessageSigningService/SignMessage": Access.ADMIN,
    "/keyplane.v1.MessageSigningService/SignMessages": Access.ADMIN,
    "/keyplane.v1.BundleService/GetInitBundle": Access.ADMIN,
    "/keyplane.v1.BundleService/GetLegacyPublicKey": Access.ADMIN,
    "/keyplane.v1.CertificateService/ListCertificates": Access.ADMIN,
    "/keyplane.v1.CertificateService/RevokeCertificate": Access.ADMIN,
    "/keyplane.v1.CertificateService/CreateEnrollmentToken": Access.ADMIN,
    # Enrollment carries its own credential (a token), checked by the domain.
    "/keyplane.v1.EnrollmentService/Enroll": Access.PUBLIC,
    "/keyplane.v1.EnrollmentService/EnrollBatch": Access.PUBLIC,
    "/keyplane.v1.EnrollmentService/Renew": Access.AGENT,
    # The current certificate and a proof by its key travel in the request.
    "/keyplane.v1.EnrollmentService/RenewWithProof": Access.PUBLIC,
    "/keyplane.v1.ZoneService/EnrollZoneServer": Access.PUBLIC,
    "/keyplane.v1.ZoneService/RenewZoneServer": Access.ZONE,
    "/keyplane.v1.ZoneService/ReportIssuedCertificates": Access.ZONE,
    "/keyplane.v1.ZoneService/RedeemEnrollmentToken": Access.ZONE,
    "/keyplane.v1.ZoneService/ListZoneServers": Access.ADMIN,
    "/keyplane.v1.ZoneService/GetZoneServer": Access.ADMIN,
    "/keyplane.v1.ZoneService/RevokeZoneServer": Access.ADMIN,
    # Signed documents, verified by the component against the roots it pins.
    "/keyplane.v1.TrustStateService/GetTrustState": Access.PUBLIC,
    "/keyplane.v1.TrustStateService/WatchTrustState": Access.PUBLIC,
}


# Admits a verified client certificate: the caller's identity, or PermissionDenied
# saying why not. Provided by the domain (the server's Admission, a zone's own).
Admit = Callable[[x509.Certificate], Identity]


def authorize(method: str, peer: x509.Certificate | None, admit: Admit) -> Identity | None:
    """The caller's identity if it may call `method`; raises the status-carrying error if
    not. `peer` is the client certificate the TLS stack verified, if any."""
    access = ACCESS.get(method)
    if access is Access.PUBLIC:
        if peer is None:
            return None
        try:
            return admit(peer)
        except PermissionDenied:
            return None  # a public call needs no identity; it just has none
    if peer is None:
        raise Unauthenticated(
            "this call needs a client certificate from this server's hierarchy; call the "
            "mutual-TLS listener with a credential (e.g. the admin credential)"
        )
    if access is None:
        raise PermissionDenied(f"method {method} is not open to any caller")
    identity = admit(peer)
    if access.value not in identity.roles:
        raise PermissionDenied(
            f"this call needs the {access.value} role; the client certificate "
            f"{identity.common_name!r} has {', '.join(sorted(identity.roles)) or 'no role'}"
        )
    return identity
