"""Who may call what: the one table of RPC access rules, and the caller's identity.

Calls arrive on two listeners of one server: the mutual-TLS listener, where the TLS
stack has verified the client's chain against the active roots, and the bootstrap
listener (server TLS only), where there is no client identity. The same table decides
for both: PUBLIC methods need nothing; every other method needs a verified identity
whose issuer is active and whose certificate is not revoked, and the role listed here.
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
    # Signed documents, verified by the component against the roots it pins.
    "/keyplane.v1.TrustStateService/GetTrustState": Access.PUBLIC,
    "/keyplane.v1.TrustStateService/WatchTrustState": Access.PUBLIC,
}


def identity_from_pem(pem: bytes) -> Identity:
    return Identity.of(x509.load_pem_x509_certificate(pem))


# Answers whether a verified client certificate is still good: issued by an active
# key of this hierarchy and not revoked. Provided by the domain.
CertificateCheck = Callable[[x509.Certificate], str | None]


def authorize(
    method: str,
    peer_pem: bytes | None,
    still_valid: CertificateCheck,
    known: Identity | None = None,
) -> Identity | None:
    """The caller's identity if it may call `method`; raises the status-carrying error if not.

    `known` is the identity already parsed from the same `peer_pem`, if any.
    """
    access = ACCESS.get(method)
    if access is Access.PUBLIC:
        if not peer_pem:
            return None
        return known or identity_from_pem(peer_pem)
    if peer_pem is None:
        raise Unauthenticated(
            "this call needs a client certificate from this server's hierarchy; call the "
            "mutual-TLS listener with a credential (e.g. the admin credential)"
        )
    identity = known or identity_from_pem(peer_pem)
    problem = still_valid(identity.certificate)
    if problem is not None:
        raise PermissionDenied(f"the client certificate is refused: {problem}")
    if access is None:
        raise PermissionDenied(f"method {method} is not open to any caller")
    if access.value not in identity.roles:
        raise PermissionDenied(
            f"this call needs the {access.value} role; the client certificate "
            f"{identity.common_name!r} has {', '.join(sorted(identity.roles)) or 'no role'}"
        )
    return identity
