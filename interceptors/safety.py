"""Whether repeating a gRPC call is safe: the method's declared idempotency, or a request_id.

Read from the protobuf descriptor pool (the generated ``*_pb2`` module registers the method
with its ``idempotency_level`` option when a stub imports it), cached per method. A request
carrying a non-empty ``request_id`` is safe too: the server dedupes it (AIP-155).
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor_pb2 import MethodOptions

_SAFE_LEVELS = frozenset({MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT})


@functools.lru_cache(maxsize=4096)
def method_is_idempotent(method: str) -> bool:
    """Whether ``/pkg.Service/Method`` declares NO_SIDE_EFFECTS or IDEMPOTENT."""
    full_name = method.lstrip("/").replace("/", ".")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(full_name)
    except KeyError:
        return False  # unknown method: never assume it is safe
    return descriptor.GetOptions().idempotency_level in _SAFE_LEVELS


def request_is_safe(method: str, request: Any) -> bool:
    """Whether this call may be repeated: an idempotent method or a non-empty ``request_id``."""
    return method_is_idempotent(method) or carries_request_id(request)


def carries_request_id(request: Any) -> bool:
    """Whether ``request`` has a non-empty ``request_id`` (the server dedupes it)."""
    return bool(getattr(request, "request_id", ""))


def method_name(raw: str | bytes) -> str:
    """The ``/pkg.Service/Method`` name of call details (aio passes bytes)."""
    return raw.decode() if isinstance(raw, bytes) else raw
