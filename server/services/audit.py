"""AuditService: pages of the audit log and a walk of its hash chain; thin over the
audit domain."""

from __future__ import annotations

import asyncio
import datetime
import json

from google.protobuf import timestamp_pb2

from keyplane.server.domain.audit import AuditLog, AuditQuery, ChainReport
from keyplane.server.services import convert
from keyplane.server.services.context import Context
from keyplane.server.store import AuditRecord
from keyplane.v1 import audit_service_pb2 as pb
from keyplane.v1 import audit_service_pb2_grpc
from keyplane.v1.audit_service_pb2 import AuditChainProblem

_PROBLEM_KINDS = {
    "edited": AuditChainProblem.KIND_EDITED,
    "inserted": AuditChainProblem.KIND_INSERTED,
    "missing": AuditChainProblem.KIND_MISSING,
}


def _time(request: object, field: str) -> datetime.datetime | None:
    if not request.HasField(field):  # type: ignore[attr-defined]
        return None
    value: timestamp_pb2.Timestamp = getattr(request, field)
    return value.ToDatetime(tzinfo=datetime.UTC)


def audit_event(record: AuditRecord) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=record.id,
        time=convert.timestamp(record.at),
        actor=record.actor,
        actor_fingerprint=record.actor_fingerprint,
        action=record.action,
        target=record.target,
        before_fingerprint=record.before_fingerprint,
        after_fingerprint=record.after_fingerprint,
        outcome=record.outcome,
        details_json=json.dumps(record.details, sort_keys=True),
        hash=record.hash,
    )


def chain_report(report: ChainReport) -> pb.VerifyAuditLogResponse:
    problem = report.problem
    return pb.VerifyAuditLogResponse(
        events_checked=report.checked,
        intact=problem is None,
        problem=(
            AuditChainProblem(
                kind=_PROBLEM_KINDS[problem.kind], event_id=problem.event_id, detail=problem.detail
            )
            if problem is not None
            else None
        ),
        head_id=report.head_id,
        head_hash=report.head_hash,
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    """Thin: converts, calls the audit domain, converts back."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        query = AuditQuery(
            _time(request, "since"), _time(request, "until"), request.actor, request.action
        )
        events, token = await asyncio.to_thread(
            self._audit.list, query, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            events=[audit_event(e) for e in events], next_page_token=token
        )

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Context
    ) -> pb.VerifyAuditLogResponse:
        return chain_report(await asyncio.to_thread(self._audit.verify))
