"""The chaos run's merchants: open-loop CreatePayment with a real merchant's retries, plus reads.

Each payment gets a unique ``request_id``; a failed attempt (UNAVAILABLE, DEADLINE_EXCEEDED,
ABORTED, ...) is retried with the same key and body after a jittered backoff, no sooner than
the answer's ``google.rpc.RetryInfo`` asks, as a merchant's integration would, until it gets a
definite answer or gives up. An UNAVAILABLE before any side effect keeps no payment (the key
stays free, the retry runs afresh); one after a charge may exist names the payment it kept
PENDING (the retry joins it). Either way only the request's final answer counts. Every attempt
is recorded with its start, end, code, ErrorInfo reason and deadline, so the timeline and the
invariants are computed from what the clients saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc import aio

from interceptors.errors import error_info, retry_delay_of, status_from_metadata
from paymesh.common.v1 import common_pb2
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from services.mesh.tls import TransportSecurity

#: Codes after which a merchant retries with the same request_id.
RETRIED_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
#: The longest a merchant waits between two attempts, whatever RetryInfo asks.
MAX_RETRY_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Merchant:
    """An onboarded merchant and its API key."""

    merchant_id: str
    api_key: str


@dataclass(slots=True)
class Attempt:
    """One client call as the client saw it; times in seconds since the run's start."""

    kind: str
    """``create`` or ``read``."""
    started: float
    ended: float
    code: str
    """Final status code name."""
    timeout_s: float
    """The deadline the client gave the call."""
    outcome: str = ""
    """For an answered create: the payment's status name; else the code name."""
    answered: bool = True
    """Whether the mesh answered (a reply or a status it sent) before the deadline it got;
    False only when the client's own deadline expired with no answer."""
    reason: str = ""
    """The error's google.rpc.ErrorInfo reason (``CIRCUIT_OPEN``, ...), empty if none."""
    retry_delay_s: float | None = None
    """The error's google.rpc.RetryInfo delay, None if it carried none."""
    detail: str = ""
    """The error's message (its first 160 characters)."""
    kept_payment: str = ""
    """The payment an UNAVAILABLE answer says was kept PENDING (ErrorInfo ``payment_id``);
    empty when nothing was kept and the key was left free."""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        """The mesh answered OK (for a create, whatever the payment's status)."""
        return self.code == "OK"

    @property
    def succeeded(self) -> bool:
        """Success as the merchant sees it: a read answered, a payment SUCCEEDED."""
        return self.ok and (self.kind != "create" or self.outcome == "PAYMENT_STATUS_SUCCEEDED")


@dataclass(slots=True)
class PaymentRun:
    """One merchant payment across its attempts."""

    request_id: str
    merchant_id: str
    amount_minor: int
    attempts: int = 0
    payment_id: str = ""
    final: str = ""
    """Status name of the definite answer, ``GAVE_UP``, or an error code name."""
    transient: int = 0
    """Attempts answered UNAVAILABLE with RetryInfo before the final answer."""
    transient_kept: int = 0
    """Of those, the ones that kept the payment PENDING (the rest left the key free)."""
    started_at: float | None = None
    """When the merchant first tried it, in seconds since the run's start."""


@dataclass(slots=True)
class LoadRecord:
    """Everything the load saw."""

    attempts: list[Attempt] = field(default_factory=list)
    payments: list[PaymentRun] = field(default_factory=list)


async def onboard(
    merchant_address: str, auth_address: str, count: int, operator: TransportSecurity
) -> list[Merchant]:
    """Create ``count`` merchants and an API key each, as the operator (retried: the mesh has
    just started)."""
    merchants = []
    async with (
        operator.aio_channel("merchant-service", merchant_address) as m,
        operator.aio_channel("merchant-auth-service", auth_address) as a,
    ):
        merchant_stub = merchant_pb2_grpc.MerchantServiceStub(m)
        auth_stub = merchant_auth_pb2_grpc.MerchantAuthServiceStub(a)
        for i in range(count):
            tag = uuid.uuid4().hex[:8]
            created = await merchant_stub.CreateMerchant(
                merchant_pb2.CreateMerchantRequest(
                    request_id=f"chaos-onboard-{tag}",
                    name=f"Chaos Shop {i}",
                    email=f"shop{i}@example.com",
                    country_code="DE",
                    default_currency_code="EUR",
                    webhook_url="https://merchant.example/hooks",
                ),
                timeout=10,
                wait_for_ready=True,
            )
            key = await auth_stub.IssueApiKey(
                merchant_auth_pb2.IssueApiKeyRequest(
                    request_id=f"chaos-key-{tag}",
                    merchant_id=created.merchant.merchant_id,
                    label="chaos",
                ),
                timeout=10,
                wait_for_ready=True,
            )
            merchants.append(Merchant(created.merchant.merchant_id, key.secret))
    return merchants


class MerchantLoad:
    """Open-loop payments and reads against the gateway until ``stop`` is set."""

    def __init__(
        self,
        gateway_address: str,
        merchants: list[Merchant],
        *,
        security: TransportSecurity,
        creates_per_s: float = 12.0,
        reads_per_s: float = 4.0,
        attempt_timeout_s: float = 8.0,
        give_up_after_s: float = 40.0,
        rng: random.Random | None = None,
    ) -> None:
        self.gateway_address = gateway_address
        self.security = security
        self.merchants = merchants
        self.creates_per_s = creates_per_s
        self.reads_per_s = reads_per_s
        self.attempt_timeout_s = attempt_timeout_s
        self.give_up_after_s = give_up_after_s
        self.rng = rng or random.Random(7)
        self.record = LoadRecord()
        self.t0 = time.monotonic()
        self._succeeded: list[tuple[str, Merchant]] = []
        self._gateways: dict[str, payment_gateway_pb2_grpc.PaymentGatewayServiceStub] = {}

    def now(self) -> float:
        """Seconds since the run's start."""
        return time.monotonic() - self.t0

    async def run(self, stop: asyncio.Event) -> None:
        """Spawn payments and reads at their rates until ``stop``; then wait for them."""
        # The merchant's view: the gateway's public TLS port, each merchant's key in metadata,
        # each merchant on its own connection (as separate integrations are).
        async with contextlib.AsyncExitStack() as stack:
            for merchant in self.merchants:
                channel = await stack.enter_async_context(
                    self.security.merchant_aio_channel("payment-gateway", self.gateway_address)
                )
                self._gateways[merchant.merchant_id] = (
                    payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)
                )
            tasks: set[asyncio.Task[None]] = set()
            n = 0
            reads_due = 0.0
            started = self.now()
            while not stop.is_set():
                due = started + n / self.creates_per_s
                await asyncio.sleep(max(0.0, due - self.now()))
                task = asyncio.create_task(self._payment(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                reads_due += self.reads_per_s / self.creates_per_s
                while reads_due >= 1:
                    reads_due -= 1
                    read = asyncio.create_task(self._read())
                    tasks.add(read)
                    read.add_done_callback(tasks.discard)
                n += 1
            if tasks:
                await asyncio.gather(*tasks)

    async def _call(
        self, kind: str, call: asyncio.Future[object] | object
    ) -> tuple[Attempt, object]:
        started = self.now()
        code, reply, answered, reason, delay, detail, kept = "OK", None, True, "", None, "", ""
        try:
            reply = await call  # type: ignore[misc]
        except aio.AioRpcError as err:
            code = err.code().name
            trailing = tuple(err.trailing_metadata() or ())
            # A status the mesh sent carries its rich details; the client's own timer does not.
            answered = err.code() != grpc.StatusCode.DEADLINE_EXCEEDED or any(
                key == "grpc-status-details-bin" for key, _ in trailing
            )
            status = status_from_metadata(err.code(), err.details() or "", trailing)
            info = error_info(status)
            reason = info.reason if info is not None else ""
            kept = info.metadata.get("payment_id", "") if info is not None else ""
            delay = retry_delay_of(status)
            detail = (err.details() or "")[:160]
        outcome = code
        if isinstance(reply, pg.CreatePaymentResponse):
            outcome = pg.PaymentStatus.Name(reply.payment.status)
        attempt = Attempt(
            kind,
            started,
            self.now(),
            code,
            self.attempt_timeout_s,
            outcome,
            answered,
            reason,
            delay,
            detail,
            kept,
        )
        self.record.attempts.append(attempt)
        return attempt, reply

    async def _payment(self, n: int) -> None:
        merchant = self.merchants[n % len(self.merchants)]
        gateway = self._gateways[merchant.merchant_id]
        run = PaymentRun(
            request_id=f"chaos-{uuid.uuid4().hex}",
            merchant_id=merchant.merchant_id,
            amount_minor=self.rng.randrange(500, 5000),
            started_at=self.now(),
        )
        self.record.payments.append(run)
        request = pg.CreatePaymentRequest(
            request_id=run.request_id,
            merchant_id=merchant.merchant_id,
            amount=common_pb2.Money(amount_minor=run.amount_minor, currency_code="EUR"),
            payment_method_token="tok_visa",
            customer_ip="192.0.2.10",
            description=f"chaos payment {n}",
        )
        first = self.now()
        backoff = 0.5
        while True:
            run.attempts += 1
            attempt, reply = await self._call(
                "create",
                gateway.CreatePayment(
                    request, timeout=self.attempt_timeout_s, metadata=_bearer(merchant)
                ),
            )
            code = attempt.code
            if code == "OK":
                assert isinstance(reply, pg.CreatePaymentResponse)
                run.payment_id = reply.payment.payment_id
                run.final = pg.PaymentStatus.Name(reply.payment.status)
                if reply.payment.status == pg.PAYMENT_STATUS_SUCCEEDED:
                    self._succeeded.append((run.payment_id, merchant))
                return
            if grpc.StatusCode[code] not in RETRIED_CODES:
                run.final = code
                return
            if code == "UNAVAILABLE" and attempt.retry_delay_s is not None:
                run.transient += 1
                run.transient_kept += bool(attempt.kept_payment)
            if self.now() - first > self.give_up_after_s:
                run.final = "GAVE_UP"
                return
            # Jittered backoff, but never sooner than the mesh asked (an open breaker's time
            # left), a little later at random so the merchants do not all come back at once.
            asked = (attempt.retry_delay_s or 0.0) * (1 + 0.2 * self.rng.random())
            wait = max(backoff * (0.5 + self.rng.random()), asked)
            await asyncio.sleep(min(wait, MAX_RETRY_WAIT_S))
            backoff = min(5.0, backoff * 2)

    async def _read(self) -> None:
        if self._succeeded and self.rng.random() < 0.75:
            payment_id, owner = self.rng.choice(self._succeeded)
            await self._call(
                "read",
                self._gateways[owner.merchant_id].GetPayment(
                    pg.GetPaymentRequest(payment_id=payment_id),
                    timeout=self.attempt_timeout_s,
                    metadata=_bearer(owner),
                ),
            )
        else:
            merchant = self.rng.choice(self.merchants)
            await self._call(
                "read",
                self._gateways[merchant.merchant_id].ListPayments(
                    pg.ListPaymentsRequest(merchant_id=merchant.merchant_id, page_size=20),
                    timeout=self.attempt_timeout_s,
                    metadata=_bearer(merchant),
                ),
            )


def _bearer(merchant: Merchant) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {merchant.api_key}"),)
