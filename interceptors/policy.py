"""Policy value objects of the client chain and the one configuration they are loaded from.

Defaults, then per target service, then per method (``/pkg.Service/Method``) overrides, read
from TOML (``services/mesh/policy.toml``, or ``$PAYMESH_POLICY_FILE``) and validated at start: an
unknown key or a bad value is a ``PolicyError`` naming its key path. No gRPC import here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interceptors import codes

#: Environment variable that points the chain at another policy file.
POLICY_FILE_VAR = "PAYMESH_POLICY_FILE"
DEFAULT_POLICY_FILE = Path(__file__).resolve().parent.parent / "services" / "mesh" / "policy.toml"


class PolicyError(ValueError):
    """The policy is invalid; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise PolicyError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise PolicyError(name, f"must be >= 1, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a failed call is repeated (only when safe)."""

    max_attempts: int = 4
    """Attempts including the first; 1 disables retries."""
    initial_backoff_s: float = 0.05
    """Upper bound of the first retry's jittered sleep."""
    backoff_multiplier: float = 2.0
    """Growth of that bound per retry."""
    max_backoff_s: float = 1.0
    """Cap of the bound, whatever the retry number."""
    retryable_codes: frozenset[str] = codes.DEFAULT_RETRYABLE
    """Code names retried without a server-given delay (UNAVAILABLE, and DEADLINE_EXCEEDED
    while the overall deadline has time left); RESOURCE_EXHAUSTED and ABORTED are retried
    anyway when the server pushed back with a delay."""

    def __post_init__(self) -> None:
        if isinstance(self.retryable_codes, str):
            raise PolicyError("retryable_codes", "must be a list of status code names")
        unknown = sorted(set(self.retryable_codes) - set(codes.TABLE))
        if unknown:
            raise PolicyError(
                "retryable_codes",
                f"unknown status code {unknown[0]!r}; known: {', '.join(codes.TABLE)}",
            )
        if not isinstance(self.retryable_codes, frozenset):
            object.__setattr__(self, "retryable_codes", frozenset(self.retryable_codes))
        if self.max_attempts < 1:
            raise PolicyError("max_attempts", f"must be >= 1, got {self.max_attempts!r}")
        _positive("initial_backoff_s", self.initial_backoff_s, allow_zero=True)
        _positive("max_backoff_s", self.max_backoff_s, allow_zero=True)
        if self.backoff_multiplier < 1:
            raise PolicyError(
                "backoff_multiplier", f"must be >= 1, got {self.backoff_multiplier!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetPolicy:
    """How much extra load retries may add to one target (Finagle/Envoy style)."""

    retry_ratio: float = 0.2
    """Retries allowed per first attempt within the window (0.2 = at most 20 % extra)."""
    min_retries: int = 10
    """Floor of retries per window, so a quiet client can still retry."""
    window_s: float = 10.0
    """Length of the sliding window the ratio is computed over."""

    def __post_init__(self) -> None:
        _positive("retry_ratio", self.retry_ratio, allow_zero=True)
        if self.min_retries < 0:
            raise PolicyError("min_retries", f"must be >= 0, got {self.min_retries!r}")
        _positive("window_s", self.window_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a target's breaker opens, how it probes for recovery, and its calls in flight.

    Any one rule trips it: the failure rate of the time window, ``consecutive_failures``
    in a row, or the slow-call rate of the last calls.
    """

    minimum_calls: int = 5
    """Calls within the window before the failure rate can trip it."""
    failure_rate: float = 0.6
    """Share of failed calls within the window that trips it."""
    window_s: float = 60.0
    """Sliding window the failure rate is computed over: a call counts in it for more than
    ``window_s`` and at most one bucket (``window_s / window_buckets``) longer."""
    window_buckets: int = 60
    """Buckets the window is counted in (resilience4j's time-based window: 1 s each of 60 s),
    so a call costs the same however many the window holds."""
    open_s: float = 30.0
    """How long it stays open before admitting trial calls."""
    half_open_calls: int = 3
    """Trial calls admitted when half-open; all must succeed, none slowly, to close."""
    consecutive_failures: int = 5
    """Failures in a row that trip it, whatever the window still holds (Envoy's
    ``consecutive_5xx``, Finagle's failure accrual: 5)."""
    slow_call_duration_s: float = 2.5
    """A call this slow is slow, even if it succeeds; one still in flight counts as slow as
    soon as it has run this long (a hung target never finishes one)."""
    slow_call_rate: float = 0.6
    """Share of slow calls among the last ``slow_call_window_calls`` that trips it."""
    slow_call_window_calls: int = 5
    """Calls the slow-call rate is taken over (count-based, as resilience4j's COUNT_BASED
    window); a window not yet full counts its empty places as fast calls."""
    max_concurrent_calls: int = 100
    """Attempts in flight to the target beyond which a call is refused at once, locally
    (Envoy's ``max_requests``, resilience4j's bulkhead ``maxConcurrentCalls``)."""

    def __post_init__(self) -> None:
        for name in ("minimum_calls", "half_open_calls", "consecutive_failures"):
            _at_least_one(name, getattr(self, name))
        for name in ("window_buckets", "slow_call_window_calls", "max_concurrent_calls"):
            _at_least_one(name, getattr(self, name))
        for name in ("failure_rate", "slow_call_rate"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PolicyError(name, f"must be in (0, 1], got {value!r}")
        _positive("window_s", self.window_s)
        _positive("open_s", self.open_s, allow_zero=True)
        _positive("slow_call_duration_s", self.slow_call_duration_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancingPolicy:
    """Load balancing, health checking and outlier ejection of one target's replicas.

    gRPC counts every call that ends in a status other than OK against the replica that
    served it. A replica whose failures in one ``outlier_interval_s`` are more than
    ``failure_percent`` % of at least ``request_volume`` calls is ejected (the native
    stand-in for "consecutive failures": a replica failing every call is ejected at the next
    sweep once it served ``request_volume`` calls). It stays out ``base_ejection_s`` times
    the number of times it was ejected (each clean interval takes one off), at most
    ``max_ejection_s``; at most ``max_ejection_percent`` % of the endpoints are out at once,
    and with fewer than ``minimum_hosts`` endpoints nothing is ejected.
    """

    health_check: bool = True
    """Whether replicas' health (the served service's readiness) decides who gets calls."""
    outlier_interval_s: float = 1.0
    """Period of the ejection sweep; calls are counted per period."""
    base_ejection_s: float = 10.0
    """Time out of rotation after a first ejection; multiplied by the ejections in a row."""
    max_ejection_s: float = 120.0
    """Longest time out of rotation, however often a replica was ejected."""
    max_ejection_percent: int = 50
    """Most endpoints (in %) out at once: the rest serve even when all look bad."""
    failure_percent: int = 85
    """Failure share (in %) of one period above which a replica is ejected."""
    request_volume: int = 5
    """Calls a replica must have served in one period to be judged."""
    minimum_hosts: int = 2
    """Fewest endpoints for ejection to run (one endpoint is never ejected)."""

    def __post_init__(self) -> None:
        for name in ("outlier_interval_s", "base_ejection_s", "max_ejection_s"):
            _positive(name, getattr(self, name))
        for name in ("max_ejection_percent", "failure_percent"):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise PolicyError(name, f"must be a percentage 0-100, got {value!r}")
        _at_least_one("request_volume", self.request_volume)
        _at_least_one("minimum_hosts", self.minimum_hosts)


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPolicy:
    """Everything the chain needs to know about one call to one method of one target."""

    timeout_s: float = 5.0
    """Overall deadline of a call and all its retries when the caller set a shorter none."""
    deadline_margin_s: float = 0.05
    """Kept back from an incoming deadline so the handler can still answer its caller."""
    wait_for_ready: bool = False
    """Whether first attempts wait for a connection; retries after UNAVAILABLE always do."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry schedule of the method."""
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)
    """Retry budget of the target (per target: per-method values are refused)."""
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    """Breaker of the target (per target: per-method values are refused)."""
    balancing: BalancingPolicy = field(default_factory=BalancingPolicy)
    """How calls spread over the target's replicas (per target)."""

    def __post_init__(self) -> None:
        _positive("timeout_s", self.timeout_s)
        _positive("deadline_margin_s", self.deadline_margin_s, allow_zero=True)


_SECTIONS: dict[str, type[Any]] = {
    "retry": RetryPolicy,
    "budget": BudgetPolicy,
    "breaker": BreakerPolicy,
    "balancing": BalancingPolicy,
}
_TARGET_ONLY = frozenset({"budget", "breaker", "balancing"})


def _merge(base: CallPolicy, data: Mapping[str, Any], path: str, *, per_method: bool) -> CallPolicy:
    """``base`` with the keys of one table applied, validated, errors naming ``path``."""
    if not isinstance(data, Mapping):
        raise PolicyError(path, "must be a table")
    known = {f.name for f in dataclasses.fields(CallPolicy)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}"
        if key not in known:
            raise PolicyError(key_path, f"unknown key; known: {', '.join(sorted(known))}")
        if per_method and key in _TARGET_ONLY:
            raise PolicyError(key_path, "is per target service, not per method")
        if key in _SECTIONS:
            changes[key] = _section(getattr(base, key), value, key_path)
        else:
            changes[key] = _scalar(value, key_path, type(getattr(base, key)))
    try:
        return dataclasses.replace(base, **changes)
    except PolicyError as exc:
        raise PolicyError(f"{path}.{exc.key}", exc.problem) from None


def _section(base: Any, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise PolicyError(path, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise PolicyError(f"{path}.{key}", f"unknown key; known: {', '.join(sorted(fields))}")
        changes[key] = _scalar(value, f"{path}.{key}", type(getattr(base, key)))
    try:
        return dataclasses.replace(base, **changes)
    except PolicyError as exc:
        raise PolicyError(f"{path}.{exc.key}", exc.problem) from None


def _scalar(value: Any, path: str, kind: type[Any]) -> Any:
    if kind is frozenset:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(path, f"must be a list of status code names, got {value!r}")
        return frozenset(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise PolicyError(path, f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(path, f"must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise PolicyError(path, f"must be an integer, got {value!r}")
    return kind(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """The validated policy of every target and method; ``policy_for`` resolves one call."""

    defaults: CallPolicy = field(default_factory=CallPolicy)
    """Policy of every call no override names."""
    targets: Mapping[str, CallPolicy] = field(default_factory=dict)
    """Per target service (mesh name or HTTP partner), defaults applied."""
    methods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Raw per-method tables, applied over the target's policy: a gRPC method
    (``/pkg.Service/Method``) or a partner route (``/<partner>/<VERB> <path>``, see
    :func:`partner_route`)."""

    def __post_init__(self) -> None:
        for method in self.methods:
            if not is_method_name(method):
                raise PolicyError(
                    f"methods.{method}",
                    "must be spelled /pkg.Service/Method or /<partner>/<VERB> <path>",
                )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, known_targets: Collection[str] | None = None
    ) -> PolicyConfig:
        """Validate a parsed configuration; PolicyError names the first bad key."""
        unknown = set(data) - {"defaults", "targets", "methods"}
        if unknown:
            raise PolicyError(sorted(unknown)[0], "unknown key; known: defaults, methods, targets")
        defaults = _merge(CallPolicy(), data.get("defaults", {}), "defaults", per_method=False)
        targets: dict[str, CallPolicy] = {}
        for name, table in _table(data, "targets").items():
            if known_targets is not None and name not in known_targets:
                raise PolicyError(f"targets.{name}", "names no service or partner of the mesh")
            targets[name] = _merge(defaults, table, f"targets.{name}", per_method=False)
        methods = dict(_table(data, "methods"))
        config = cls(defaults=defaults, targets=targets, methods=methods)
        for method, table in methods.items():
            _merge(defaults, table, f"methods.{method}", per_method=True)
        return config

    @classmethod
    def load(
        cls, path: str | None = None, *, known_targets: Collection[str] | None = None
    ) -> PolicyConfig:
        """Read and validate TOML from ``path``, ``$PAYMESH_POLICY_FILE`` or the default file."""
        chosen = Path(path or os.environ.get(POLICY_FILE_VAR) or DEFAULT_POLICY_FILE)
        try:
            with chosen.open("rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError("", f"cannot read policy file {chosen}: {exc}") from exc
        try:
            return cls.from_mapping(data, known_targets=known_targets)
        except PolicyError as exc:
            raise PolicyError(exc.key, f"{exc.problem} (in {chosen})") from None

    def target_policy(self, target: str) -> CallPolicy:
        """Policy of a target before any per-method override (breaker and budget live here)."""
        return self.targets.get(target, self.defaults)

    def policy_for(self, target: str, method: str) -> CallPolicy:
        """Policy of one call: defaults, then the target's, then the method's overrides."""
        base = self.target_policy(target)
        table = self.methods.get(method)
        if table is None:
            return base
        return _merge(base, table, f"methods.{method}", per_method=True)


#: Verbs a partner route may name.
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def partner_route(partner: str, verb: str, path: str) -> str:
    """The method name of a partner call, as ``[methods]`` spells it: ``/<partner>/<VERB> <path>``.

    Named like a gRPC method (``/<service>/<method>``), with the partner as the service and
    the verb and path template as the method: ``/exchange-rate/GET /rates/{}``.
    """
    return f"/{partner}/{verb.upper()} {path}"


def is_method_name(name: str) -> bool:
    """Whether ``name`` is a gRPC method or a partner route, as ``[methods]`` keys are."""
    service, slash, rest = name[1:].partition("/")
    if not (name.startswith("/") and service and slash and rest):
        return False
    verb, space, path = rest.partition(" ")
    if space:
        return verb in HTTP_VERBS and path.startswith("/")
    return "/" not in rest


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise PolicyError(key, "must be a table")
    return value
