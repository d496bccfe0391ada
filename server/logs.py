"""What keyplane's processes log, and what they keep out: grpc-python logs a traceback
at ERROR each time a handler's answer cannot be sent because its client has gone (a
deadline, a cancel, a dropped connection). That is a client's choice, not a server
error: it is logged here at DEBUG, in one line."""

from __future__ import annotations

import logging

GRPC_LOGGER = "grpc._cython.cygrpc"


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
