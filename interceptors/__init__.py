"""PayMesh's policy chain: client-side deadline, retry and breaker; server-side mapping."""

from interceptors.breaker import (
    HALF_OPEN_READY,
    BreakerOpen,
    BreakerReadout,
    BreakerRegistry,
    CallRefused,
    ConcurrencyLimited,
    Outcome,
    TargetBreaker,
)
from interceptors.budget import RetryBudget
from interceptors.chain import RECONNECT_OPTIONS, ClientChain, build_client_chain
from interceptors.deadline import (
    DeadlineExhausted,
    OutgoingDeadline,
    deadline_left,
    incoming_deadline,
    outgoing_deadline,
    set_incoming_deadline,
)
from interceptors.errors import (
    CIRCUIT_OPEN_REASON,
    CONCURRENCY_LIMITED_REASON,
    CallError,
    PartnerCallError,
)
from interceptors.http import PartnerClient, PartnerResponse
from interceptors.policy import (
    BreakerPolicy,
    BudgetPolicy,
    CallPolicy,
    PolicyConfig,
    PolicyError,
    RetryPolicy,
)
from interceptors.server import ServerPolicyInterceptor
from interceptors.telemetry import ChainTelemetry

__all__ = [
    "CIRCUIT_OPEN_REASON",
    "CONCURRENCY_LIMITED_REASON",
    "HALF_OPEN_READY",
    "RECONNECT_OPTIONS",
    "BreakerOpen",
    "BreakerPolicy",
    "BreakerReadout",
    "BreakerRegistry",
    "BudgetPolicy",
    "CallError",
    "CallPolicy",
    "CallRefused",
    "ChainTelemetry",
    "ClientChain",
    "ConcurrencyLimited",
    "DeadlineExhausted",
    "Outcome",
    "OutgoingDeadline",
    "PartnerCallError",
    "PartnerClient",
    "PartnerResponse",
    "PolicyConfig",
    "PolicyError",
    "RetryBudget",
    "RetryPolicy",
    "ServerPolicyInterceptor",
    "TargetBreaker",
    "build_client_chain",
    "deadline_left",
    "incoming_deadline",
    "outgoing_deadline",
    "set_incoming_deadline",
]
