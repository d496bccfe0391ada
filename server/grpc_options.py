"""The gRPC server options the server and every zone server use.

Clients ping every 60 s on a quiet connection (a trust-state watch), keepalive_time_ms
in clients/client.py; a server accepts pings down to half that without data, so a
quiet watch is never told `too_many_pings` (tests/test_keepalive.py pins the two), and
pings its clients itself so that a silently dead watcher is noticed.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
# The least time between a client's pings that carry no data, as servers allow it.
MIN_PING_INTERVAL_MS = 30_000
SERVER_PING_MS = 60_000
SERVER_PING_TIMEOUT_MS = 20_000


def server_options(min_ping_interval_ms: int = MIN_PING_INTERVAL_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Several worker processes may listen on one port (--workers).
        ("grpc.so_reuseport", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", SERVER_PING_MS),
        ("grpc.keepalive_timeout_ms", SERVER_PING_TIMEOUT_MS),
    ]
