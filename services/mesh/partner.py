"""Calling an HTTP partner from a servicer: one answer shape, one failure.

The client comes from the factory (the policy chain's HTTP wrapper); an answer below 5xx is
returned as ``(status, body)``; an outage the chain gave up on becomes ``Unavailable`` with
pushback ``-1``, naming the partner, so callers above do not retry what was already retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from interceptors.errors import CallError, Reason
from interceptors.http import PartnerClient
from services.mesh.errors import Unavailable


def path_of(template: str, *segments: str) -> str:
    """``template`` with each ``{}`` replaced by a URL-quoted path segment."""
    return template.format(*(quote(s, safe="") for s in segments))


async def call_partner(
    client: PartnerClient,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    json: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    reason: Reason = Reason.DOWNSTREAM_UNAVAILABLE,
) -> tuple[int, Any]:
    """Send one request through the chain; the answer's ``(status, body)`` below 5xx.

    Raises:
        Unavailable: the partner is unreachable, answered 5xx, or its breaker is open.
    """
    try:
        reply = await client.request(
            method, path, query=query, json=json, idempotency_key=idempotency_key
        )
    except CallError as exc:
        local = {
            "breaker_open": Reason.CIRCUIT_OPEN,
            "concurrency_limited": Reason.CONCURRENCY_LIMITED,
        }
        raise Unavailable(
            f"partner {client.partner} is unavailable: {exc.details()}",
            reason=local.get(exc.stop_reason or "", reason),
            metadata={"partner": client.partner, "stop_reason": exc.stop_reason or ""},
            pushback_ms=-1,
        ) from exc
    return reply.status, reply.body
