"""What keyplane's serving processes log, in which form, and what they keep out.

- `configure_logging` sets up one handler on stderr: `text` (a line per record) or
  `json` (one JSON object per line: time, level, logger, event, message, and the RPC,
  the caller and the key fingerprint where they are known). Nothing logged carries a
  secret: messages name keys by fingerprint and settings by name, and change events
  come from audit entries, which hold none.
- `log_changes` logs what the audit log records, at info, once it has committed: every
  change (enrollments, renewals, revocations, settings, tokens, trust, backups,
  rotations) is one `keyplane.events` record whose event is the audit action.
- gRPC's C core logs on its own (`I1201 … ssl_transport_security.cc`), bypassing
  Python: it is kept quiet by `GRPC_VERBOSITY`, which the `keyplane` command sets
  before gRPC loads unless the user set it (clients/entry.py).
- grpc-python logs a traceback at ERROR each time a handler's answer cannot be sent
  because its client has gone (a deadline, a cancel, a dropped connection). That is a
  client's choice, not a server error: it is logged at DEBUG, in one line.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

GRPC_LOGGER = "grpc._cython.cygrpc"
EVENTS_LOGGER = "keyplane.events"
LOG_FORMATS = ("text", "json")

# The RPC being served and who called it, set by the interceptor for each call, so that
# what a call logs (and the changes it commits) name them.
current_rpc: contextvars.ContextVar[str] = contextvars.ContextVar("current_rpc", default="")
current_caller: contextvars.ContextVar[str] = contextvars.ContextVar("current_caller", default="")

# LogRecord attributes a record may carry (logging's `extra`) that the JSON form shows.
_FIELDS = ("rpc", "caller", "fingerprint", "target", "outcome", "count", "details")
_events = logging.getLogger(EVENTS_LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is None and name == "rpc":
                value = current_rpc.get() or None
            if value is None and name == "caller":
                value = current_caller.get() or None
            if value not in (None, "", [], {}):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log at `level` (DEBUG, INFO, WARNING, ERROR) to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = "" if worker is None else f" worker{worker}"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))


def _fingerprint(before: str, after: str) -> str:
    return after or before


def log_changes(entries: Sequence[Sequence[str]], rpc: str) -> None:
    """Log committed audit entries (actor, action, target, details JSON, actor's
    fingerprint, before and after fingerprints, outcome) at info, refused calls at
    warning. Entries of one action in one call (a batch) make one record, with a count."""
    if not _events.isEnabledFor(logging.INFO):
        return
    groups: dict[str, list[Sequence[str]]] = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    for action, group in groups.items():
        actor, _, target, details = group[0][:4]
        before = group[0][5] if len(group[0]) > 5 else ""
        after = group[0][6] if len(group[0]) > 6 else ""
        outcome = group[0][7] if len(group[0]) > 7 else "ok"
        level = logging.WARNING if outcome == "refused" else logging.INFO
        extra: dict[str, Any] = {"event": action, "caller": actor, "rpc": rpc or None}
        if len(group) == 1:
            extra.update(
                target=target,
                fingerprint=_fingerprint(before, after) or None,
                outcome=outcome,
                details=json.loads(details) if details else None,
            )
            _events.log(level, "%s %s by %s", action, target, actor, extra=extra)
        else:
            extra.update(
                count=len(group),
                target=[e[2] for e in group],
                fingerprint=[
                    _fingerprint(e[5] if len(e) > 5 else "", e[6] if len(e) > 6 else "")
                    for e in group
                ],
                outcome=outcome,
            )
            _events.log(level, "%s x%d by %s", action, len(group), actor, extra=extra)


def log_event(event: str, message: str, *args: object, **fields: object) -> None:
    """Log a change that has no audit entry (a zone server's own work) at info."""
    _events.info(message, *args, extra={"event": event, **fields})


class _ClientGone(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "ExecuteBatchError" in record.getMessage():
            if not logging.getLogger("keyplane.server").isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info = (
                "an answer was not sent: its client had gone (%s)",
                (record.getMessage().rsplit("[", 1)[-1].rstrip("]"),),
                None,
            )
        return True


_FILTER = _ClientGone()


def quiet_client_cancellations() -> None:
    """Log an answer its client did not wait for at DEBUG, without a traceback."""
    logger = logging.getLogger(GRPC_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
