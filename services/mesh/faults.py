"""Server-side fault injection, like Envoy's fault filter: delay and abort per method at a rate.

A service's faults are switched at run time through its admin endpoint (``PUT /faults``,
which is off unless ``PAYMESH_FAULT_INJECTION=1`` and then takes the admin token), so the
chaos suite can make one downstream slow or failing while the mesh runs. With no fault set,
the cost per call is one tuple check.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import grpc

_CODES = {code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}
#: Longest injected delay: beyond every deadline of ours, longer only ties up handlers.
MAX_DELAY_MS = 60_000
#: Most rules one service holds (each call checks them in order).
MAX_FAULTS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One fault rule."""

    method: str = "*"
    """``/pkg.Service/Method``, ``/pkg.Service/*`` or ``*`` for every method."""
    delay_ms: int = 0
    """Latency added before the handler runs."""
    abort_code: str = ""
    """gRPC code name to fail with instead of running the handler (empty: do not abort)."""
    rate: float = 1.0
    """Share of matching calls the fault applies to, 0..1."""

    def __post_init__(self) -> None:
        if not (self.method == "*" or self.method.startswith("/")):
            raise ValueError(f"method {self.method!r}: use '*', '/pkg.Service/*' or a full name")
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be within 0..{MAX_DELAY_MS}, got {self.delay_ms}")
        if self.abort_code and self.abort_code not in _CODES:
            raise ValueError(f"abort_code {self.abort_code!r} is not a gRPC code name")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, got {self.rate}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Fault:
        """A fault from JSON; ValueError naming an unknown key."""
        unknown = set(data) - {"method", "delay_ms", "abort_code", "rate"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        return cls(
            method=str(data.get("method", "*")),
            delay_ms=int(data.get("delay_ms", 0)),
            abort_code=str(data.get("abort_code", "")).upper(),
            rate=float(data.get("rate", 1.0)),
        )

    def matches(self, method: str) -> bool:
        """Whether the rule covers ``method``."""
        if self.method == "*":
            return True
        if self.method.endswith("/*"):
            return method.startswith(self.method[:-1])
        return method == self.method

    @property
    def code(self) -> grpc.StatusCode | None:
        """The abort code, if the fault aborts."""
        return _CODES.get(self.abort_code)


@dataclass(frozen=True, slots=True)
class Injection:
    """What to do to one call: wait, then maybe fail."""

    delay_s: float
    """Seconds to wait before going on."""
    code: grpc.StatusCode | None
    """Code to fail with, or None to run the handler."""


class FaultInjector:
    """The faults of one service; read by the server interceptor on every call."""

    def __init__(self, *, rng: Callable[[], float] = random.random) -> None:
        self._faults: tuple[Fault, ...] = ()
        self._rng = rng

    def set(self, faults: Iterable[Fault]) -> None:
        """Replace the faults; ValueError (nothing replaced) beyond ``MAX_FAULTS`` rules."""
        rules = tuple(faults)
        if len(rules) > MAX_FAULTS:
            raise ValueError(f"at most {MAX_FAULTS} faults, got {len(rules)}")
        self._faults = rules

    def clear(self) -> None:
        """Remove every fault."""
        self._faults = ()

    @property
    def active(self) -> bool:
        """Whether any fault is set: without one the server skips injection altogether."""
        return bool(self._faults)

    def snapshot(self) -> list[dict[str, Any]]:
        """The faults as JSON-ready dicts."""
        return [asdict(f) for f in self._faults]

    def injection(self, method: str) -> Injection | None:
        """What the first matching fault does to a call of ``method`` (None: nothing)."""
        for fault in self._faults:
            if fault.matches(method) and self._rng() < fault.rate:
                return Injection(delay_s=fault.delay_ms / 1000, code=fault.code)
        return None
