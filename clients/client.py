"""A typed client over the generated keyplane.v1 stubs."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keyplane.clients.credentials import Credential
from keyplane.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    backup_service_pb2,
    backup_service_pb2_grpc,
    bundle_service_pb2,
    bundle_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    common_pb2,
    console_service_pb2,
    console_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    message_signing_service_pb2,
    message_signing_service_pb2_grpc,
    root_key_service_pb2,
    root_key_service_pb2_grpc,
    rotation_pb2,
    settings_service_pb2,
    settings_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
    trust_service_pb2,
    trust_service_pb2_grpc,
    trust_state_pb2,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
    zone_service_pb2_grpc,
)

DEFAULT_TIMEOUT = 60.0
# A backup streams the whole state: room for a large one over a slow link.
BACKUP_TIMEOUT = 3600.0


class KeyplaneClientError(Exception):
    """A call failed: the gRPC status name, the server's message and its ErrorInfo reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> KeyplaneClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        reason = ""
        try:
            status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        except ValueError:  # a rich status that disagrees with the call's: the call's wins
            status = None
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason = info.reason
        return cls(code, message or "", reason)


ALGORITHMS = {
    "ec-p256": common_pb2.KEY_ALGORITHM_EC_P256,
    "ec-p384": common_pb2.KEY_ALGORITHM_EC_P384,
    "rsa-2048": common_pb2.KEY_ALGORITHM_RSA_2048,
    "rsa-3072": common_pb2.KEY_ALGORITHM_RSA_3072,
    "rsa-4096": common_pb2.KEY_ALGORITHM_RSA_4096,
}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
KEY_KINDS = {
    "server-tls": key_service_pb2.KEY_KIND_SERVER_TLS,
    "intermediate-tls": key_service_pb2.KEY_KIND_INTERMEDIATE_TLS,
    "message-signing": key_service_pb2.KEY_KIND_MESSAGE_SIGNING,
}
KEY_KIND_NAMES = {v: k for k, v in KEY_KINDS.items()}
IDENTITY_ROLES = {
    "admin": identity_service_pb2.IDENTITY_ROLE_ADMIN,
    "operator": identity_service_pb2.IDENTITY_ROLE_OPERATOR,
    "auditor": identity_service_pb2.IDENTITY_ROLE_AUDITOR,
}
IDENTITY_ROLE_NAMES = {v: k for k, v in IDENTITY_ROLES.items()}
# Room for a 4 MiB payload to sign plus its envelope.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
# A watch stream on a connection that died silently is noticed within ~80 s: pings go on
# however long the stream is quiet (by default gRPC stops after two pings without data,
# and a dead connection would then go unnoticed). Servers accept data-less pings down to
# every 30 s (server/grpc_options.py; tests/test_keepalive.py pins both).
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options(keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


CHANNEL_OPTIONS = channel_options()


def channel_for(
    address: str, credential: Credential, keepalive_ms: int = KEEPALIVE_TIME_MS
) -> grpc.Channel:
    """A mutual-TLS channel to `address` presenting `credential`."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=credential.root_certificates_pem,
        private_key=credential.private_key_pem,
        certificate_chain=credential.certificate_chain_pem,
    )
    return grpc.secure_channel(address, creds, options=channel_options(keepalive_ms))


def bootstrap_channel_for(
    address: str, root_certificates_pem: bytes, keepalive_ms: int = KEEPALIVE_TIME_MS
) -> grpc.Channel:
    """A server-TLS channel to a bootstrap listener, trusting `root_certificates_pem`."""
    creds = grpc.ssl_channel_credentials(root_certificates=root_certificates_pem)
    return grpc.secure_channel(address, creds, options=channel_options(keepalive_ms))


class TrustStateWatch:
    """An open WatchTrustState stream: iterate for batches of versions, oldest first."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[list[trust_state_pb2.SignedTrustState]]:
        try:
            for response in self._call:
                yield list(response.versions)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise KeyplaneClientError.from_rpc_error(exc) from None

    def cancel(self) -> None:
        """End the stream (from any thread); the iterator then stops."""
        self._call.cancel()


class KeyplaneClient:
    """Calls a keyplane server; every method raises KeyplaneClientError on failure."""

    def __init__(self, channel: grpc.Channel, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._channel = channel
        self._timeout = timeout
        self._roots = root_key_service_pb2_grpc.RootKeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._keys = key_service_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._settings = settings_service_pb2_grpc.SettingsServiceStub(channel)  # type: ignore[no-untyped-call]
        self._trust = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)  # type: ignore[no-untyped-call]
        self._signing = message_signing_service_pb2_grpc.MessageSigningServiceStub(channel)  # type: ignore[no-untyped-call]
        self._bundles = bundle_service_pb2_grpc.BundleServiceStub(channel)  # type: ignore[no-untyped-call]
        self._certs = certificate_service_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        self._enrollment = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)  # type: ignore[no-untyped-call]
        self._zones = zone_service_pb2_grpc.ZoneServiceStub(channel)  # type: ignore[no-untyped-call]
        self._identities = identity_service_pb2_grpc.IdentityServiceStub(channel)  # type: ignore[no-untyped-call]
        self._backups = backup_service_pb2_grpc.BackupServiceStub(channel)  # type: ignore[no-untyped-call]
        self._audit = audit_service_pb2_grpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]
        self._peers = trust_service_pb2_grpc.TrustServiceStub(channel)  # type: ignore[no-untyped-call]
        self._status = status_service_pb2_grpc.StatusServiceStub(channel)  # type: ignore[no-untyped-call]
        self._console = console_service_pb2_grpc.ConsoleServiceStub(channel)  # type: ignore[no-untyped-call]

    @classmethod
    def connect(cls, address: str, credential: Credential) -> KeyplaneClient:
        return cls(channel_for(address, credential))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyplaneClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise KeyplaneClientError.from_rpc_error(exc) from None

    def list_root_keys(self) -> root_key_service_pb2.ListRootKeysResponse:
        response: root_key_service_pb2.ListRootKeysResponse = self._call(
            self._roots.ListRootKeys, root_key_service_pb2.ListRootKeysRequest()
        )
        return response

    def create_root_key(self, algorithm: str | None = None) -> root_key_service_pb2.RootKey:
        request = root_key_service_pb2.CreateRootKeyRequest(
            algorithm=ALGORITHMS[algorithm] if algorithm else common_pb2.KEY_ALGORITHM_UNSPECIFIED
        )
        response: root_key_service_pb2.CreateRootKeyResponse = self._call(
            self._roots.CreateRootKey, request
        )
        return response.root_key

    def get_root_key(self, fingerprint: str) -> root_key_service_pb2.RootKey:
        request = root_key_service_pb2.GetRootKeyRequest(fingerprint=fingerprint)
        response: root_key_service_pb2.GetRootKeyResponse = self._call(
            self._roots.GetRootKey, request
        )
        return response.root_key

    def revoke_root_key(
        self, fingerprint: str, reason: str, confirm: bool, force: bool = False
    ) -> root_key_service_pb2.RootKey:
        return self.revoke_root(fingerprint, reason, confirm, force=force).root_key

    def revoke_root(
        self,
        fingerprint: str,
        reason: str = "",
        confirm: bool = False,
        dry_run: bool = False,
        force: bool = False,
    ) -> root_key_service_pb2.RevokeRootKeyResponse:
        """Revoke a root (or, with `dry_run`, only say what that would do): the root and
        the plan of what the revocation did or would do. `force` passes the coverage
        gate (a compromised key)."""
        request = root_key_service_pb2.RevokeRootKeyRequest(
            fingerprint=fingerprint, reason=reason, confirm=confirm, dry_run=dry_run, force=force
        )
        response: root_key_service_pb2.RevokeRootKeyResponse = self._call(
            self._roots.RevokeRootKey, request
        )
        return response

    def get_root_coverage(
        self, straggler_limit: int = 0
    ) -> root_key_service_pb2.GetRootCoverageResponse:
        """How far the fleet has moved to the newest root, with the slowest stragglers."""
        response: root_key_service_pb2.GetRootCoverageResponse = self._call(
            self._roots.GetRootCoverage,
            root_key_service_pb2.GetRootCoverageRequest(straggler_limit=straggler_limit),
        )
        return response

    def get_legacy_root_key(self) -> root_key_service_pb2.LegacyRootKey:
        response: root_key_service_pb2.GetLegacyRootKeyResponse = self._call(
            self._roots.GetLegacyRootKey, root_key_service_pb2.GetLegacyRootKeyRequest()
        )
        return response.legacy

    def list_keys(self, kind: str | None = None) -> list[key_service_pb2.Key]:
        request = key_service_pb2.ListKeysRequest(
            kind=KEY_KINDS[kind] if kind else key_service_pb2.KEY_KIND_UNSPECIFIED
        )
        response: key_service_pb2.ListKeysResponse = self._call(self._keys.ListKeys, request)
        return list(response.keys)

    def rotate_key(self, kind: str) -> key_service_pb2.Key:
        request = key_service_pb2.RotateKeyRequest(kind=KEY_KINDS[kind])
        response: key_service_pb2.RotateKeyResponse = self._call(self._keys.RotateKey, request)
        return response.key

    def get_rotation_forecast(self, hours: int = 0) -> rotation_pb2.RotationForecast:
        """The renewals expected per hour for the next `hours` (default 72, at most 720)."""
        response: key_service_pb2.GetRotationForecastResponse = self._call(
            self._keys.GetRotationForecast, key_service_pb2.GetRotationForecastRequest(hours=hours)
        )
        return response.forecast

    def list_settings(self, reveal: bool = False) -> list[settings_service_pb2.Setting]:
        response: settings_service_pb2.ListSettingsResponse = self._call(
            self._settings.ListSettings, settings_service_pb2.ListSettingsRequest(reveal=reveal)
        )
        return list(response.settings)

    def get_setting(self, name: str, reveal: bool = False) -> settings_service_pb2.Setting:
        response: settings_service_pb2.GetSettingResponse = self._call(
            self._settings.GetSetting,
            settings_service_pb2.GetSettingRequest(name=name, reveal=reveal),
        )
        return response.setting

    def update_setting(self, name: str, value: str) -> settings_service_pb2.Setting:
        return self.change_setting(name, value).setting

    def change_setting(
        self, name: str, value: str, dry_run: bool = False
    ) -> settings_service_pb2.UpdateSettingResponse:
        """Change a setting (with `dry_run`: check it and show the forecast before and
        after, saving nothing)."""
        response: settings_service_pb2.UpdateSettingResponse = self._call(
            self._settings.UpdateSetting,
            settings_service_pb2.UpdateSettingRequest(name=name, value=value, dry_run=dry_run),
        )
        return response

    def get_trust_state(self, since_version: int = 0) -> list[trust_state_pb2.SignedTrustState]:
        response: trust_state_service_pb2.GetTrustStateResponse = self._call(
            self._trust.GetTrustState,
            trust_state_service_pb2.GetTrustStateRequest(since_version=since_version),
        )
        return list(response.versions)

    def watch_trust_state(
        self, since_version: int = 0, timeout: float | None = None
    ) -> TrustStateWatch:
        """A stream of version batches as the server commits them; cancel() ends it."""
        call = self._trust.WatchTrustState(
            trust_state_service_pb2.WatchTrustStateRequest(since_version=since_version),
            timeout=timeout,
        )
        return TrustStateWatch(call)

    def sign_message(self, payload: bytes) -> message_signing_service_pb2.SignedMessage:
        response: message_signing_service_pb2.SignMessageResponse = self._call(
            self._signing.SignMessage,
            message_signing_service_pb2.SignMessageRequest(payload=payload),
        )
        return response.signed_message

    def sign_messages(
        self, payloads: list[bytes]
    ) -> list[message_signing_service_pb2.SignedMessage]:
        """One detached signature per payload, in one call (at most 1,000, 4 MiB in all)."""
        response: message_signing_service_pb2.SignMessagesResponse = self._call(
            self._signing.SignMessages,
            message_signing_service_pb2.SignMessagesRequest(payloads=payloads),
        )
        return list(response.signed_messages)

    def create_backup(self) -> Iterator[backup_service_pb2.CreateBackupResponse]:
        """The archive's chunks as the server streams them (see CreateBackupResponse)."""
        call = self._backups.CreateBackup(
            backup_service_pb2.CreateBackupRequest(), timeout=BACKUP_TIMEOUT
        )
        try:
            yield from call
        except grpc.RpcError as exc:
            raise KeyplaneClientError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    def verify_backup(self, manifest: bytes) -> backup_service_pb2.VerifyBackupResponse:
        response: backup_service_pb2.VerifyBackupResponse = self._call(
            self._backups.VerifyBackup, backup_service_pb2.VerifyBackupRequest(manifest=manifest)
        )
        return response

    def get_init_bundle(self) -> bundle_service_pb2.InitBundle:
        response: bundle_service_pb2.GetInitBundleResponse = self._call(
            self._bundles.GetInitBundle, bundle_service_pb2.GetInitBundleRequest()
        )
        return response.bundle

    def get_legacy_public_key(self) -> bundle_service_pb2.GetLegacyPublicKeyResponse:
        response: bundle_service_pb2.GetLegacyPublicKeyResponse = self._call(
            self._bundles.GetLegacyPublicKey, bundle_service_pb2.GetLegacyPublicKeyRequest()
        )
        return response

    def create_enrollment_token(
        self, uses: int = 1, ttl_seconds: int = 86400, role: str = "agent"
    ) -> certificate_service_pb2.CreateEnrollmentTokenResponse:
        response: certificate_service_pb2.CreateEnrollmentTokenResponse = self._call(
            self._certs.CreateEnrollmentToken,
            certificate_service_pb2.CreateEnrollmentTokenRequest(
                uses=uses, ttl_seconds=ttl_seconds, role=role
            ),
        )
        return response

    def list_enrollment_tokens(
        self, include_unusable: bool = False, page_size: int = 0
    ) -> list[certificate_service_pb2.EnrollmentToken]:
        response: certificate_service_pb2.ListEnrollmentTokensResponse = self._call(
            self._certs.ListEnrollmentTokens,
            certificate_service_pb2.ListEnrollmentTokensRequest(
                include_unusable=include_unusable, page_size=page_size
            ),
        )
        return list(response.tokens)

    def revoke_enrollment_token(self, token_id: str) -> certificate_service_pb2.EnrollmentToken:
        response: certificate_service_pb2.RevokeEnrollmentTokenResponse = self._call(
            self._certs.RevokeEnrollmentToken,
            certificate_service_pb2.RevokeEnrollmentTokenRequest(token_id=token_id),
        )
        return response.token

    def list_audit_events(
        self, request: audit_service_pb2.ListAuditEventsRequest
    ) -> audit_service_pb2.ListAuditEventsResponse:
        """One page of audit events, newest first (next_page_token for the next)."""
        response: audit_service_pb2.ListAuditEventsResponse = self._call(
            self._audit.ListAuditEvents, request
        )
        return response

    def audit_events(
        self, request: audit_service_pb2.ListAuditEventsRequest, limit: int = 0
    ) -> Iterator[audit_service_pb2.AuditEvent]:
        """Every matching event (at most `limit`, 0 for all), newest first, page by page."""
        paged = audit_service_pb2.ListAuditEventsRequest()
        paged.CopyFrom(request)
        if limit and not paged.page_size:
            paged.page_size = min(limit, 1000)
        yielded = 0
        while True:
            page = self.list_audit_events(paged)
            for event in page.events:
                yield event
                yielded += 1
                if limit and yielded >= limit:
                    return
            if not page.next_page_token:
                return
            paged.page_token = page.next_page_token

    def verify_audit_log(self) -> audit_service_pb2.VerifyAuditLogResponse:
        response: audit_service_pb2.VerifyAuditLogResponse = self._call(
            self._audit.VerifyAuditLog, audit_service_pb2.VerifyAuditLogRequest()
        )
        return response

    def list_certificates(
        self, component: str = "", page_size: int = 0, search: str = ""
    ) -> list[certificate_service_pb2.CertificateRecord]:
        response: certificate_service_pb2.ListCertificatesResponse = self._call(
            self._certs.ListCertificates,
            certificate_service_pb2.ListCertificatesRequest(
                component=component, page_size=page_size, search=search
            ),
        )
        return list(response.certificates)

    def revoke_certificate(
        self, serial: str, reason: str = "", confirm: bool = False, force: bool = False
    ) -> certificate_service_pb2.CertificateRecord:
        """Revoke one certificate; `confirm` for a person's credential, `force` as well
        for the one this client calls with."""
        response: certificate_service_pb2.RevokeCertificateResponse = self._call(
            self._certs.RevokeCertificate,
            certificate_service_pb2.RevokeCertificateRequest(
                serial=serial, reason=reason, confirm=confirm, force=force
            ),
        )
        return response.certificate

    def get_server_status(self, expiries: int = 0) -> status_service_pb2.GetServerStatusResponse:
        """Health, roots, the next expiries, zones last seen and the last backup."""
        response: status_service_pb2.GetServerStatusResponse = self._call(
            self._status.GetServerStatus,
            status_service_pb2.GetServerStatusRequest(expiries=expiries),
        )
        return response

    def list_zone_servers(self, include_revoked: bool = False) -> list[zone_service_pb2.ZoneServer]:
        response: zone_service_pb2.ListZoneServersResponse = self._call(
            self._zones.ListZoneServers,
            zone_service_pb2.ListZoneServersRequest(include_revoked=include_revoked),
        )
        return list(response.zone_servers)

    def get_zone_server(self, name: str) -> zone_service_pb2.ZoneServer:
        response: zone_service_pb2.GetZoneServerResponse = self._call(
            self._zones.GetZoneServer, zone_service_pb2.GetZoneServerRequest(name=name)
        )
        return response.zone_server

    def revoke_zone_server(
        self, name: str, reason: str, confirm: bool
    ) -> zone_service_pb2.ZoneServer:
        response: zone_service_pb2.RevokeZoneServerResponse = self._call(
            self._zones.RevokeZoneServer,
            zone_service_pb2.RevokeZoneServerRequest(name=name, reason=reason, confirm=confirm),
        )
        return response.zone_server

    def enroll(self, csr: bytes, token: str) -> enrollment_service_pb2.IssuedCertificate:
        response: enrollment_service_pb2.EnrollResponse = self._call(
            self._enrollment.Enroll, enrollment_service_pb2.EnrollRequest(csr=csr, token=token)
        )
        return response.certificate

    def enroll_batch(
        self, csrs: list[bytes], token: str
    ) -> list[enrollment_service_pb2.IssuedCertificate]:
        """One certificate per CSR, in order; all or nothing (at most 1,000 CSRs)."""
        response: enrollment_service_pb2.EnrollBatchResponse = self._call(
            self._enrollment.EnrollBatch,
            enrollment_service_pb2.EnrollBatchRequest(csrs=csrs, token=token),
        )
        return list(response.certificates)

    def renew(self, csr: bytes) -> enrollment_service_pb2.IssuedCertificate:
        response: enrollment_service_pb2.RenewResponse = self._call(
            self._enrollment.Renew, enrollment_service_pb2.RenewRequest(csr=csr)
        )
        return response.certificate

    def renew_with_proof(
        self, csr: bytes, certificate_chain_pem: str, proof: bytes, proof_time: int
    ) -> enrollment_service_pb2.IssuedCertificate:
        """Renew with the current certificate and a proof by its key in the request
        (see keyplane.clients.renewal.renewal_proof), over any connection."""
        response: enrollment_service_pb2.RenewResponse = self._call(
            self._enrollment.RenewWithProof,
            enrollment_service_pb2.RenewWithProofRequest(
                csr=csr,
                certificate_chain_pem=certificate_chain_pem,
                proof=proof,
                proof_time=proof_time,
            ),
        )
        return response.certificate

    def enroll_zone_server(
        self, request: zone_service_pb2.EnrollZoneServerRequest
    ) -> zone_service_pb2.EnrollZoneServerResponse:
        response: zone_service_pb2.EnrollZoneServerResponse = self._call(
            self._zones.EnrollZoneServer, request
        )
        return response

    def renew_zone_server(
        self, request: zone_service_pb2.RenewZoneServerRequest
    ) -> zone_service_pb2.RenewZoneServerResponse:
        response: zone_service_pb2.RenewZoneServerResponse = self._call(
            self._zones.RenewZoneServer, request
        )
        return response

    def report_issued_certificates(
        self, certificates: list[zone_service_pb2.IssuedCertificateReport]
    ) -> int:
        response: zone_service_pb2.ReportIssuedCertificatesResponse = self._call(
            self._zones.ReportIssuedCertificates,
            zone_service_pb2.ReportIssuedCertificatesRequest(certificates=certificates),
        )
        return response.recorded

    def list_zone_revocations(self) -> list[zone_service_pb2.ZoneRevocation]:
        """The revoked certificates the calling zone's intermediates issued (a zone
        server's call)."""
        response: zone_service_pb2.ListZoneRevocationsResponse = self._call(
            self._zones.ListZoneRevocations, zone_service_pb2.ListZoneRevocationsRequest()
        )
        return list(response.revocations)

    def publish_zone_crl(self, crl_der: bytes) -> int:
        """Have the server keep and serve the CRL the calling zone signed; its number."""
        response: zone_service_pb2.PublishZoneCrlResponse = self._call(
            self._zones.PublishZoneCrl, zone_service_pb2.PublishZoneCrlRequest(crl_der=crl_der)
        )
        return response.crl_number

    def report_sightings(self, sightings: list[zone_service_pb2.CertificateSighting]) -> None:
        """Tell the server when a zone last saw agents it issued (zone-server role)."""
        self._call(
            self._zones.ReportIssuedCertificates,
            zone_service_pb2.ReportIssuedCertificatesRequest(sightings=sightings),
        )

    def redeem_enrollment_token(self, token: str, subject: str, certificate_der: bytes) -> None:
        """Spend a use of `token` and record the certificate a zone issued for it."""
        self._call(
            self._zones.RedeemEnrollmentToken,
            zone_service_pb2.RedeemEnrollmentTokenRequest(
                token=token, subject=subject, certificate_der=certificate_der
            ),
        )

    def create_identity(
        self, name: str, role: str, csr: bytes
    ) -> identity_service_pb2.CreateIdentityResponse:
        """Certify the key of `csr` as a person's credential (`role`: admin, operator or
        auditor); the key itself stays with the caller."""
        response: identity_service_pb2.CreateIdentityResponse = self._call(
            self._identities.CreateIdentity,
            identity_service_pb2.CreateIdentityRequest(
                name=name,
                role=IDENTITY_ROLES.get(role, identity_service_pb2.IDENTITY_ROLE_UNSPECIFIED),
                csr=csr,
            ),
        )
        return response

    def list_identities(self, include_revoked: bool = False) -> list[identity_service_pb2.Identity]:
        response: identity_service_pb2.ListIdentitiesResponse = self._call(
            self._identities.ListIdentities,
            identity_service_pb2.ListIdentitiesRequest(include_revoked=include_revoked),
        )
        return list(response.identities)

    def revoke_identity(
        self, name: str, reason: str, confirm: bool, force: bool = False
    ) -> list[identity_service_pb2.Identity]:
        """Revoke every live credential of `name`; `force` as well for the one this
        client calls with."""
        response: identity_service_pb2.RevokeIdentityResponse = self._call(
            self._identities.RevokeIdentity,
            identity_service_pb2.RevokeIdentityRequest(
                name=name, reason=reason, confirm=confirm, force=force
            ),
        )
        return list(response.identities)

    # -- trust with peer servers (active/active) ------------------------------------------

    def request_trust(self, peer: str, peer_fingerprint: str) -> trust_service_pb2.TrustRequest:
        """Ask the server at `peer` (its bootstrap listener) for trust; the server checks
        that its root has `peer_fingerprint` first."""
        response: trust_service_pb2.RequestTrustResponse = self._call(
            self._peers.RequestTrust,
            trust_service_pb2.RequestTrustRequest(peer=peer, peer_fingerprint=peer_fingerprint),
        )
        return response.request

    def list_trust(self, history_size: int = 0) -> trust_service_pb2.ListTrustResponse:
        response: trust_service_pb2.ListTrustResponse = self._call(
            self._peers.ListTrust, trust_service_pb2.ListTrustRequest(history_size=history_size)
        )
        return response

    def approve_trust(self, request_id: str) -> trust_service_pb2.TrustedPeer:
        response: trust_service_pb2.ApproveTrustResponse = self._call(
            self._peers.ApproveTrust, trust_service_pb2.ApproveTrustRequest(id=request_id)
        )
        return response.peer

    def reject_trust(
        self, request_id: str, reason: str = ""
    ) -> trust_service_pb2.RejectTrustResponse:
        response: trust_service_pb2.RejectTrustResponse = self._call(
            self._peers.RejectTrust,
            trust_service_pb2.RejectTrustRequest(id=request_id, reason=reason),
        )
        return response

    def revoke_trust(self, peer: str, reason: str = "") -> trust_service_pb2.RevokeTrustResponse:
        response: trust_service_pb2.RevokeTrustResponse = self._call(
            self._peers.RevokeTrust, trust_service_pb2.RevokeTrustRequest(peer=peer, reason=reason)
        )
        return response

    def create_sign_in_link(self) -> console_service_pb2.CreateSignInLinkResponse:
        """A one-time link that signs this credential's identity in to the console."""
        response: console_service_pb2.CreateSignInLinkResponse = self._call(
            self._console.CreateSignInLink, console_service_pb2.CreateSignInLinkRequest()
        )
        return response
