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
from keyplane.server.kinds import Role


class Public(enum.Enum):
    """A method anyone may call: it carries its own credential (a token, a proof) or
    serves signed documents, and the domain checks what it must."""

    PUBLIC = "public"


PUBLIC = Public.PUBLIC
ADMIN = frozenset({Role.ADMIN})
# Operators run the fleet: tokens, certificates, zones, bundles; they read keys and
# settings. Auditors read everything and change nothing. Admins do everything.
OPERATE = frozenset({Role.ADMIN, Role.OPERATOR})
READ = frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR})
# The audit log is for those who answer for the system: admins and auditors.
AUDIT = frozenset({Role.ADMIN, Role.AUDITOR})
AGENT = frozenset({Role.AGENT})
ZONE = frozenset({Role.ZONE_SERVER})

Access = Public | frozenset[Role]

# Every RPC keyplane serves, and who may call it. A method missing here is refused,
# never let through; tests walk every served method against it. Reading a protected
# setting's value (reveal) needs the admin role as well: the domain checks that.
ACCESS: dict[str, Access] = {
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/keyplane.v1.RootKeyService/CreateRootKey": ADMIN,
    "/keyplane.v1.RootKeyService/ListRootKeys": READ,
    "/keyplane.v1.RootKeyService/GetRootKey": READ,
    # Its dry run too: what a revocation would do is an admin's to ask.
    "/keyplane.v1.RootKeyService/RevokeRootKey": ADMIN,
    "/keyplane.v1.RootKeyService/GetRootCoverage": READ,
    "/keyplane.v1.RootKeyService/GetLegacyRootKey": READ,
    "/keyplane.v1.KeyService/ListKeys": READ,
    "/keyplane.v1.KeyService/RotateKey": ADMIN,
    "/keyplane.v1.KeyService/GetRotationForecast": READ,
    "/keyplane.v1.SettingsService/ListSettings": READ,
    "/keyplane.v1.SettingsService/GetSetting": READ,
    # Its dry run too (it shows the forecast a change would make).
    "/keyplane.v1.SettingsService/UpdateSetting": ADMIN,
    "/keyplane.v1.MessageSigningService/SignMessage": ADMIN,
    "/keyplane.v1.MessageSigningService/SignMessages": ADMIN,
    "/keyplane.v1.BundleService/GetInitBundle": READ,
    "/keyplane.v1.BundleService/GetLegacyPublicKey": READ,
    "/keyplane.v1.CertificateService/ListCertificates": READ,
    "/keyplane.v1.CertificateService/RevokeCertificate": OPERATE,
    "/keyplane.v1.CertificateService/CreateEnrollmentToken": OPERATE,
    "/keyplane.v1.CertificateService/ListEnrollmentTokens": READ,
    "/keyplane.v1.CertificateService/RevokeEnrollmentToken": OPERATE,
    "/keyplane.v1.AuditService/ListAuditEvents": AUDIT,
    "/keyplane.v1.AuditService/VerifyAuditLog": AUDIT,
    # Enrollment carries its own credential (a token), checked by the domain.
    "/keyplane.v1.EnrollmentService/Enroll": PUBLIC,
    "/keyplane.v1.EnrollmentService/EnrollBatch": PUBLIC,
    "/keyplane.v1.EnrollmentService/Renew": AGENT,
    # The current certificate and a proof by its key travel in the request.
    "/keyplane.v1.EnrollmentService/RenewWithProof": PUBLIC,
    "/keyplane.v1.ZoneService/EnrollZoneServer": PUBLIC,
    "/keyplane.v1.ZoneService/RenewZoneServer": ZONE,
    "/keyplane.v1.ZoneService/ReportIssuedCertificates": ZONE,
    "/keyplane.v1.ZoneService/RedeemEnrollmentToken": ZONE,
    "/keyplane.v1.ZoneService/ListZoneRevocations": ZONE,
    "/keyplane.v1.ZoneService/PublishZoneCrl": ZONE,
    "/keyplane.v1.ZoneService/ListZoneServers": READ,
    "/keyplane.v1.ZoneService/GetZoneServer": READ,
    "/keyplane.v1.ZoneService/RevokeZoneServer": OPERATE,
    # A backup holds every sealed key and the whole state: admins only. Comparing a
    # manifest with the live inventory changes nothing.
    "/keyplane.v1.BackupService/CreateBackup": ADMIN,
    "/keyplane.v1.BackupService/VerifyBackup": frozenset({Role.ADMIN, Role.AUDITOR}),
    # Signed documents, verified by the component against the roots it pins.
    "/keyplane.v1.TrustStateService/GetTrustState": PUBLIC,
    "/keyplane.v1.TrustStateService/WatchTrustState": PUBLIC,
    "/keyplane.v1.IdentityService/CreateIdentity": ADMIN,
    "/keyplane.v1.IdentityService/ListIdentities": READ,
    "/keyplane.v1.IdentityService/RevokeIdentity": ADMIN,
    # Health, roots, expiries, zones and the last backup: a read.
    "/keyplane.v1.StatusService/GetServerStatus": READ,
    # A person signs itself in to the console (any person's role); the console then
    # asks this same table for every page and action (server/console/calls.py).
    "/keyplane.v1.ConsoleService/CreateSignInLink": READ,
    # Served only by a locked server, on its 0600 Unix socket (server/locked.py): who can
    # reach that socket is the server's own user.
    "/keyplane.v1.UnlockService/Unlock": PUBLIC,
    # Trust with peer servers (active/active): admins set it up and end it.
    "/keyplane.v1.TrustService/RequestTrust": ADMIN,
    "/keyplane.v1.TrustService/ListTrust": READ,
    "/keyplane.v1.TrustService/ApproveTrust": ADMIN,
    "/keyplane.v1.TrustService/RejectTrust": ADMIN,
    "/keyplane.v1.TrustService/RevokeTrust": ADMIN,
    # What one server sends another: each carries a message signed by the sender's roots
    # (or signed trust states), verified by the domain against the roots it pinned.
    "/keyplane.v1.TrustService/OfferTrust": PUBLIC,
    "/keyplane.v1.TrustService/RevealTrustNonce": PUBLIC,
    "/keyplane.v1.TrustService/DecideTrust": PUBLIC,
    "/keyplane.v1.TrustService/EndTrust": PUBLIC,
    "/keyplane.v1.TrustService/PushTrustState": PUBLIC,
}


# Admits a verified client certificate: the caller's identity, or PermissionDenied
# saying why not. Provided by the domain (the server's Admission, a zone's own).
Admit = Callable[[x509.Certificate], Identity]


def authorize(method: str, peer: x509.Certificate | None, admit: Admit) -> Identity | None:
    """The caller's identity if it may call `method`; raises the status-carrying error if
    not. `peer` is the client certificate the TLS stack verified, if any."""
    access = ACCESS.get(method)
    if access is PUBLIC:
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
    check_roles(method, identity)
    return identity


def allowed(method: str, identity: Identity) -> bool:
    """Whether an admitted identity may call `method` (what the console asks to show a
    control enabled or disabled)."""
    access = ACCESS.get(method)
    if access is PUBLIC:
        return True
    return access is not None and bool(access & identity.roles)


def check_roles(method: str, identity: Identity) -> None:
    """PermissionDenied unless an admitted identity's roles may call `method`."""
    access = ACCESS.get(method)
    if access is PUBLIC:
        return
    if access is None:
        raise PermissionDenied(f"method {method} is not open to any caller")
    if not access & identity.roles:
        needed = " or ".join(sorted(access))
        raise PermissionDenied(
            f"this call needs the {needed} role; the client certificate "
            f"{identity.common_name!r} has {', '.join(sorted(identity.roles)) or 'no role'}"
        )
