"""The bounds every server runs with: message and metadata sizes, streams, keepalive, calls.

Nothing a peer sends is unbounded: a message above ``max_receive_bytes`` is refused by gRPC
(RESOURCE_EXHAUSTED), metadata above ``max_metadata_bytes`` likewise, a connection carries at
most ``max_concurrent_streams`` calls, pings faster than the keepalive policy allows get the
connection closed, a TLS handshake must finish in ``handshake_timeout_s``, connections are
recycled after ``max_connection_age_s`` (so rotated certificates take effect and clients
re-resolve, spreading over new replicas),
and beyond ``max_in_flight`` calls a service sheds at once instead of queueing to the deadline.
Each is overridable per service by ``<PREFIX>_<FIELD>`` (``ORDER_SERVICE_MAX_IN_FLIGHT=64``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class LimitsError(ValueError):
    """A limit override is not a positive number; the message names the variable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """The bounds of one gRPC server."""

    max_receive_bytes: int = 256 * 1024
    """Largest request message accepted (every request of ours is far smaller)."""
    max_send_bytes: int = 4 * 1024 * 1024
    """Largest response message sent (a page of 500 items fits)."""
    max_metadata_bytes: int = 16 * 1024
    """Largest total of request headers (metadata) accepted."""
    max_concurrent_streams: int = 100
    """Calls one connection may have open at once."""
    max_in_flight: int = 256
    """Calls the service serves at once; the next is refused with RESOURCE_EXHAUSTED."""
    max_pending_requests: int = 10_000
    """Calls gRPC core queues for the event loop before resetting the excess; far above
    ``max_in_flight``, so a burst reaches the shedding (RESOURCE_EXHAUSTED with RetryInfo)
    instead of being reset as CANCELLED, which no caller retries."""
    handshake_timeout_s: float = 5.0
    """Time a new connection has to finish its TLS/HTTP2 handshake."""
    max_connection_age_s: float = 300.0
    """Age after which a connection is asked to go away (GOAWAY): its client re-resolves the
    service's address, so replicas started since (a DNS name's new addresses) get calls
    within this bound; rotated certificates take effect too."""
    max_connection_age_grace_s: float = 30.0
    """Time calls in flight get to finish on a connection that was told to go away."""
    max_connection_idle_s: float = 600.0
    """Idle time after which a connection is closed."""
    keepalive_time_s: float = 60.0
    """Interval of the server's own pings on an idle connection (dead peers are found)."""
    keepalive_timeout_s: float = 20.0
    """Time a ping has to be answered before the connection is closed."""
    min_ping_interval_s: float = 10.0
    """Pings from a client closer together than this are strikes."""
    max_ping_strikes: int = 2
    """Strikes after which the connection is closed (GOAWAY too_many_pings)."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value <= 0:
                raise LimitsError(f"{item.name} must be positive, got {value!r}")

    @classmethod
    def from_environ(cls, prefix: str, environ: Mapping[str, str]) -> ServerLimits:
        """The defaults with ``<prefix>_<FIELD>`` overrides applied.

        Raises:
            LimitsError: an override is not a positive number of the field's type.
        """
        changes: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            var = f"{prefix}_{item.name.upper()}"
            raw = environ.get(var)
            if raw is None:
                continue
            kind = int if item.type in (int, "int") else float
            noun = "whole number" if kind is int else "number"
            try:
                value = kind(raw)
            except ValueError:
                value = math.nan
            # nan and inf parse as floats but bound nothing.
            if not (math.isfinite(value) and value > 0):
                raise LimitsError(
                    f"{var}={raw!r} is not a positive {noun} (default {getattr(cls(), item.name)})"
                )
            changes[item.name] = value
        return cls(**changes)

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Server channel arguments enforcing these bounds."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        return [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.max_send_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.max_metadata_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.server.max_pending_requests", self.max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self.max_pending_requests),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]
