"""Authority: who may issue what, which roles each issuer may confer, and what a
certificate lets its holder do. The one copy of these rules: the server uses it to
issue and to admit, and every zone server uses it to issue, admit and report.

    issuer                     issues                              confers
    a root                     server TLS, message signing,        admin, operator,
                               intermediates, people's             auditor, zone-server
                               credentials, zone-server TLS
    the server's intermediate  agent certificates                  agent
    a zone's intermediate      agent certificates only             agent
    a trusted peer's           (the peer's agent certificates,     agent
      intermediate              admitted here, never issued)

A certificate's role counts only if its issuer may confer it: a certificate whose SAN
claims a role its issuer may not confer is refused outright, whatever else it says.
Intermediates carry X.509 constraints that say the same to any other stack: an EKU of
clientAuth only, and name constraints that permit no real DNS name and no IP address
(only names under `.invalid`, which never resolve, RFC 6761), so no TLS stack accepts
a certificate they issue as a server's for a real name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from keyplane.server.errors import PermissionDenied
from keyplane.server.kinds import KeyKind, Role

# The roles each kind of issuing key may confer.
CONFERS: dict[KeyKind, frozenset[Role]] = {
    KeyKind.ROOT: frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR, Role.ZONE_SERVER}),
    KeyKind.INTERMEDIATE_TLS: frozenset({Role.AGENT}),
    KeyKind.ZONE_INTERMEDIATE: frozenset({Role.AGENT}),
    # Active/active: the peer's agents may fail over here; its admins, zones and
    # anything else its roots issued get no role at this server.
    KeyKind.PEER_INTERMEDIATE: frozenset({Role.AGENT}),
}
ISSUER_NAMES = {
    KeyKind.ROOT: "a root",
    KeyKind.INTERMEDIATE_TLS: "the server's intermediate",
    KeyKind.ZONE_INTERMEDIATE: "a zone's intermediate",
    KeyKind.PEER_INTERMEDIATE: "a trusted peer's intermediate",
}

# Every agent certificate names this DNS name (under the constrained `.invalid`): with a
# DNS SAN present, OpenSSL and NSS do not test a common name that looks like a host name
# against the intermediate's name constraints, so agents may be called "web01.corp".
AGENT_DNS_NAME = "agent.invalid"
PERMITTED_DNS = "invalid"
INTERMEDIATE_NAME_CONSTRAINTS = x509.NameConstraints(
    permitted_subtrees=[x509.DNSName(PERMITTED_DNS)],
    excluded_subtrees=[
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0")),
    ],
)
INTERMEDIATE_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def issuer_of_role(role: Role) -> KeyKind:
    """Which kind of key the server issues a certificate of `role` from."""
    if role is Role.AGENT:
        return KeyKind.INTERMEDIATE_TLS
    return KeyKind.ROOT


def may_confer(issuer: KeyKind, role: str) -> bool:
    return role in CONFERS.get(issuer, frozenset())


def admitted_roles(issuer: KeyKind, claimed: Iterable[str]) -> frozenset[Role]:
    """The roles a certificate from `issuer` gives its holder; PERMISSION_DENIED if it
    claims one its issuer may not confer (a forgery, or a zone minting roles)."""
    roles = frozenset(claimed)
    refused = sorted(r for r in roles if not may_confer(issuer, r))
    if refused:
        raise PermissionDenied(
            f"the certificate claims the role {', '.join(refused)}, which "
            f"{ISSUER_NAMES.get(issuer, 'its issuer')} may not confer; it is refused"
        )
    return frozenset(Role(r) for r in roles)


def extended_key_usages(role: Role) -> list[x509.ObjectIdentifier]:
    """The EKUs of a certificate of `role`: zone servers serve TLS and call the server,
    everything else is a TLS client."""
    if role is Role.ZONE_SERVER:
        return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.CLIENT_AUTH]


# Who renews how: agents with Renew (mutual TLS) or RenewWithProof, zone servers with
# RenewZoneServer; people's credentials are re-issued, not renewed.
RENEWS_WITH_RENEW = frozenset({Role.AGENT})
RENEWS_AS_ZONE = frozenset({Role.ZONE_SERVER})


def check_may_renew(roles: frozenset[Role]) -> None:
    if not roles & RENEWS_WITH_RENEW:
        raise PermissionDenied(
            "only agents renew certificates with Renew or RenewWithProof; zone servers "
            "use RenewZoneServer, and people get a new credential"
        )


# What a zone server may report or record: the certificates it issued, all agents.
ZONE_REPORTABLE = frozenset({Role.AGENT})


def check_zone_report(component: str, certificate_roles: Iterable[str]) -> None:
    """A zone's report may hold only agent certificates, its own intermediate's."""
    claimed = set(certificate_roles) | ({component} if component else set())
    refused = sorted(claimed - ZONE_REPORTABLE)
    if refused:
        raise PermissionDenied(
            f"a zone server reports only agent certificates; this one claims {', '.join(refused)}"
        )
