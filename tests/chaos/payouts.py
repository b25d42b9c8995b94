"""Settlements the run creates as the operator, and the ledger sampled the whole run long.

The run settles part of each merchant's balance before and during the bank partner's outage
and never asks again: after the outage, the recovery loops must finish them by themselves.
About once a second a sample reads every balance of the run's merchants and the platform
accounts. The ledger has no snapshot RPC, so a sample reads them all twice: two reads in a
row with the same entry count on every account saw no posting in between (entries are only
ever added), so they are the ledger at one instant, and must sum to zero per currency. A
sample also records each settlement's status, so the run knows when each one completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.accounting import accounts
from services.mesh.tls import TransportSecurity
from services.settlement.servicer import settlement_id_for
from tests.chaos.invariants import Check, pages
from tests.chaos.load import Merchant

CURRENCY = "EUR"
BANK_ACCOUNT = "DE89370400440532013000"
SAMPLE_EVERY_S = 1.0
#: Reads per sample to find two in a row that agree (postings land ~10 times a second).
SNAPSHOT_READS = 12
#: The longest the run may go without a consistent sample (accounting down, say).
MAX_SAMPLE_GAP_S = 15.0
#: After the bank went down, a confirmation already on its way may still be posted; and the
#: samples that judge the outage end this long before the heal, so none saw the bank back.
BANK_GRACE_S = 2.0
COMPLETED = settlement_pb2.SettlementStatus.Name(settlement_pb2.SETTLEMENT_STATUS_COMPLETED)
PENDING = settlement_pb2.SettlementStatus.Name(settlement_pb2.SETTLEMENT_STATUS_PENDING)
#: Where money is, as the samples sum it over the run's merchants (see README "Healing").
KINDS = ("available", "settling", "payout_in_transit", "psp_clearing", "bank_payouts")

#: (account id, currency) -> (balance, entry count)
Reading = dict[tuple[str, str], tuple[int, int]]


@dataclass(slots=True)
class SettlementRun:
    """One settlement the run asked for, once; times in seconds since the run's start."""

    request_id: str
    merchant_id: str
    amount_minor: int
    phase: str
    """``before`` or ``during`` the bank's outage."""
    created_at: float
    settlement_id: str
    answered: str = ""
    """The status CreateSettlement answered, or its error code."""
    completed_at: float | None = None
    """When a sample first saw it COMPLETED."""
    final: str = ""
    """Its status at the end of the run."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "settlement_id": self.settlement_id,
            "merchant_id": self.merchant_id,
            "amount_minor": self.amount_minor,
            "phase": self.phase,
            "created_at_s": round(self.created_at, 2),
            "answered": self.answered,
            "completed_at_s": None if self.completed_at is None else round(self.completed_at, 2),
            "final": self.final,
        }


@dataclass(frozen=True, slots=True)
class LedgerSample:
    """The ledger at one instant (between two agreeing reads), and the settlements after it."""

    t: float
    kinds: dict[str, int]
    """EUR per kind of account, summed over the run's merchants."""
    net: dict[str, int]
    """Per currency, the sum over every account: zero in a balanced ledger."""
    reads: int
    """Reads it took to find two that agree."""
    settlements: dict[str, str] = field(default_factory=dict)
    """Status name of every settlement of the run's merchants, read right after."""

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 2), **self.kinds, "net": self.net, "reads": self.reads}


def kind_of(account_id: str) -> str:
    """``available`` of ``merchants/m/available``; a platform account by its own name."""
    if account_id == accounts.PSP_CLEARING:
        return "psp_clearing"
    if account_id == accounts.BANK_PAYOUTS:
        return "bank_payouts"
    return account_id.rsplit("/", 1)[-1]


def agreeing(first: Reading, second: Reading) -> bool:
    """Whether two reads saw the same entries on every account (so nothing was posted between)."""
    return {k: n for k, (_, n) in first.items()} == {k: n for k, (_, n) in second.items()}


def sample_of(t: float, reading: Reading, reads: int) -> LedgerSample:
    """The sample a consistent reading makes."""
    kinds = dict.fromkeys(KINDS, 0)
    net: dict[str, int] = {}
    for (account_id, currency), (balance, _) in reading.items():
        net[currency] = net.get(currency, 0) + balance
        if currency == CURRENCY:
            kind = kind_of(account_id)
            kinds[kind] = kinds.get(kind, 0) + balance
    return LedgerSample(t=t, kinds=kinds, net=net, reads=reads)


class Payouts:
    """Creates the run's settlements and samples the ledger until stopped."""

    def __init__(
        self,
        addresses: dict[str, str],
        merchants: list[Merchant],
        operator: TransportSecurity,
        now: Callable[[], float],
    ) -> None:
        self.addresses = addresses
        self.merchants = merchants
        self.operator = operator
        self.now = now
        self.settlements: list[SettlementRun] = []
        self.samples: list[LedgerSample] = []
        self.missed = 0
        """Samples that found no two agreeing reads, or no answer (accounting down)."""
        self.final: LedgerSample | None = None
        """The sample taken once stopped (after the drain): the run's end state."""

    # -- settlements ----------------------------------------------------------------
    async def create(self, phase: str) -> list[SettlementRun]:
        """Settle half of each merchant's settleable balance, as the operator, once each."""
        made = []
        async with self.operator.aio_channel(
            "settlement-service", self.addresses["settlement-service"]
        ) as channel:
            stub = settlement_pb2_grpc.SettlementServiceStub(channel)
            for merchant in self.merchants:
                balance = await stub.GetSettleableBalance(
                    settlement_pb2.GetSettleableBalanceRequest(
                        merchant_id=merchant.merchant_id, currency_code=CURRENCY
                    ),
                    timeout=10,
                )
                amount = balance.settleable_amount.amount_minor // 2
                if amount <= 0:
                    continue
                request_id = f"chaos-settle-{uuid.uuid4().hex}"
                run = SettlementRun(
                    request_id=request_id,
                    merchant_id=merchant.merchant_id,
                    amount_minor=amount,
                    phase=phase,
                    created_at=self.now(),
                    settlement_id=settlement_id_for(request_id),
                )
                self.settlements.append(run)
                made.append(run)
                try:
                    reply = await stub.CreateSettlement(
                        settlement_pb2.CreateSettlementRequest(
                            request_id=request_id,
                            merchant_id=merchant.merchant_id,
                            currency_code=CURRENCY,
                            amount=common_pb2.Money(amount_minor=amount, currency_code=CURRENCY),
                            bank_account_reference=BANK_ACCOUNT,
                        ),
                        timeout=20,
                    )
                except aio.AioRpcError as exc:
                    run.answered = exc.code().name  # never asked again: recovery must finish it
                    continue
                run.answered = settlement_pb2.SettlementStatus.Name(reply.settlement.status)
                if reply.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED:
                    run.completed_at = self.now()
        return made

    async def settlement_statuses(
        self, stub: settlement_pb2_grpc.SettlementServiceAsyncStub
    ) -> dict[str, str]:
        """Status name of every settlement of the run's merchants."""
        statuses: dict[str, str] = {}
        for merchant in self.merchants:
            for settlement in await pages(
                stub.ListSettlements,
                settlement_pb2.ListSettlementsRequest(
                    merchant_id=merchant.merchant_id, page_size=500
                ),
                "settlements",
                rpc_timeout_s=5,
            ):
                statuses[settlement.settlement_id] = settlement_pb2.SettlementStatus.Name(
                    settlement.status
                )
        return statuses

    async def withdrawals(self) -> list[Any]:
        """Every withdrawal of the run's merchants."""
        async with self.operator.aio_channel(
            "withdrawal-service", self.addresses["withdrawal-service"]
        ) as channel:
            stub = withdrawal_pb2_grpc.WithdrawalServiceStub(channel)
            found: list[Any] = []
            for merchant in self.merchants:
                found += await pages(
                    stub.ListWithdrawals,
                    withdrawal_pb2.ListWithdrawalsRequest(
                        merchant_id=merchant.merchant_id, page_size=500
                    ),
                    "withdrawals",
                )
        return found

    # -- the ledger -----------------------------------------------------------------
    async def _read(self, ledger: accounting_pb2_grpc.AccountingServiceAsyncStub) -> Reading:
        """Every balance of the run's merchants and of the platform accounts, read at once."""
        lists = await asyncio.gather(
            *(
                pages(
                    ledger.ListBalances,
                    accounting_pb2.ListBalancesRequest(merchant_id=m.merchant_id, page_size=500),
                    "balances",
                    rpc_timeout_s=5,
                )
                for m in self.merchants
            )
        )
        reading: Reading = {}
        for balances in lists:
            for b in balances:
                reading[(b.account_id, b.balance.currency_code)] = (
                    b.balance.amount_minor,
                    b.entry_count,
                )
        currencies = sorted({c for _, c in reading} | {CURRENCY})
        platform = [
            (a, c) for a in (accounts.PSP_CLEARING, accounts.BANK_PAYOUTS) for c in currencies
        ]
        replies = await asyncio.gather(
            *(
                ledger.GetBalance(
                    accounting_pb2.GetBalanceRequest(account_id=a, currency_code=c), timeout=5
                )
                for a, c in platform
            )
        )
        for (account_id, currency), reply in zip(platform, replies, strict=True):
            reading[(account_id, currency)] = (
                reply.balance.balance.amount_minor,
                reply.balance.entry_count,
            )
        return reading

    async def sample(
        self,
        ledger: accounting_pb2_grpc.AccountingServiceAsyncStub,
        settlements: settlement_pb2_grpc.SettlementServiceAsyncStub | None = None,
    ) -> LedgerSample | None:
        """One consistent sample, or None (recorded as missed)."""
        try:
            previous = await self._read(ledger)
            for reads in range(2, SNAPSHOT_READS + 1):
                t = self.now()
                current = await self._read(ledger)
                if agreeing(previous, current):
                    sample = sample_of(t, current, reads)
                    break
                previous = current
            else:
                self.missed += 1
                return None
            if settlements is not None:
                sample.settlements.update(await self.settlement_statuses(settlements))
        except aio.AioRpcError:
            self.missed += 1
            return None
        self.samples.append(sample)
        seen = self.now()  # the statuses were read after the ledger: they are this late
        for run in self.settlements:
            if run.completed_at is None and sample.settlements.get(run.settlement_id) == COMPLETED:
                run.completed_at = seen
        return sample

    async def run(self, stop: asyncio.Event) -> None:
        """A sample about every second until ``stop``, then a last one."""
        async with (
            self.operator.aio_channel(
                "accounting-service", self.addresses["accounting-service"]
            ) as a_channel,
            self.operator.aio_channel(
                "settlement-service", self.addresses["settlement-service"]
            ) as s_channel,
        ):
            ledger = accounting_pb2_grpc.AccountingServiceStub(a_channel)
            settlements = settlement_pb2_grpc.SettlementServiceStub(s_channel)
            while not stop.is_set():
                await self.sample(ledger, settlements)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            for _ in range(SNAPSHOT_READS):  # the last one is the end state: it must be taken
                self.final = await self.sample(ledger, settlements)
                if self.final is not None:
                    break
                await asyncio.sleep(SAMPLE_EVERY_S)
            for run in self.settlements:
                run.final = self.final.settlements.get(run.settlement_id, "") if self.final else ""


def bank_transfer(sandbox_address: str, transfer_id: str) -> dict[str, Any] | None:
    """The bank partner's record of one transfer, None if it has none."""
    try:
        with urllib.request.urlopen(
            f"http://{sandbox_address}/bank-transfer/transfers/{transfer_id}", timeout=10
        ) as reply:
            return dict(json.load(reply))
    except urllib.error.HTTPError:
        return None


# -- checks ----------------------------------------------------------------------------
def check_ledger_samples(payouts: Payouts, duration_s: float) -> Check:
    """Every consistent sample sums to zero per currency, and samples cover the whole run."""
    samples = payouts.samples
    bad = [s for s in samples if any(v != 0 for v in s.net.values())]
    times = [0.0, *(s.t for s in samples), duration_s]
    gap = max(b - a for a, b in itertools.pairwise(times))
    return Check(
        "the ledger balances at every sample (sum of every account of the run's merchants "
        "and the platform, per currency, is 0)",
        bool(samples) and not bad and gap <= MAX_SAMPLE_GAP_S,
        f"{len(samples)} consistent samples ({payouts.missed} missed); unbalanced: "
        f"{[(round(s.t, 1), s.net) for s in bad[:3]]}; longest gap {gap:.1f} s "
        f"(at most {MAX_SAMPLE_GAP_S:g})",
    )


def check_bank_outage(payouts: Payouts, down_at: float, healed_at: float) -> list[Check]:
    """While the bank was down: nothing paid out, the pending settlements' money in transit."""
    window = [
        s for s in payouts.samples if down_at + BANK_GRACE_S <= s.t < healed_at - BANK_GRACE_S
    ]
    during = [r for r in payouts.settlements if r.phase == "during"]
    paid = [s.kinds["bank_payouts"] for s in window]
    checks = [
        Check(
            "while the bank was down, nothing reached platform/bank_payouts",
            len(window) >= 2 and max(paid) == min(paid),
            f"{len(window)} samples; platform/bank_payouts from {paid[:1]} to {paid[-1:]}",
        )
    ]
    if window:
        last = window[-1]
        pending = [
            r for r in payouts.settlements if last.settlements.get(r.settlement_id) == PENDING
        ]
        owed = sum(r.amount_minor for r in pending)
        in_transit = last.kinds["payout_in_transit"]
        checks.append(
            Check(
                "while the bank was down, the pending settlements' money was in "
                "payout_in_transit (not paid out)",
                bool(pending) and in_transit == owed,
                f"at {last.t:.1f} s: {len(pending)} pending settlements of {owed} EUR minor; "
                f"payout_in_transit {in_transit}, settling {last.kinds['settling']}",
            )
        )
    early = [r for r in during if r.completed_at is not None and r.completed_at < healed_at]
    checks.append(
        Check(
            "the settlements created while the bank was down did not complete before it was back",
            bool(during) and not early,
            f"{len(during)} created during the outage, answered "
            f"{sorted({r.answered for r in during})}; completed early: "
            f"{[r.settlement_id for r in early]}",
        )
    )
    return checks


def check_settlements_completed(payouts: Payouts, healed_at: float | None) -> Check:
    """Every settlement of the run completed, those of the outage by themselves afterwards."""
    runs = payouts.settlements
    unfinished = [r for r in runs if r.final != COMPLETED]
    after = [
        r.completed_at - healed_at
        for r in runs
        if r.phase == "during" and r.completed_at is not None and healed_at is not None
    ]
    return Check(
        "every settlement completed by itself, without a client replay",
        bool(runs) and not unfinished,
        f"{len(runs)} settlements, {len(runs) - len(unfinished)} COMPLETED; those of the outage "
        f"completed {min(after, default=0):.1f}-{max(after, default=0):.1f} s after the bank "
        f"was back; not completed: {[(r.settlement_id, r.final) for r in unfinished[:3]]}",
    )


def check_payouts_at_end(
    payouts: Payouts, withdrawals: list[Any], bank_entries: list[Any], sandbox_address: str
) -> Check:
    """At the end: nothing settling or in transit, each payout once at the bank and the ledger."""
    last = payouts.final
    completed = [w for w in withdrawals if w.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED]
    paid_total = sum(w.amount.amount_minor for w in completed)
    posted = [e.transaction_id for e in bank_entries]
    expected = sorted(f"txn:{w.withdrawal_id}:paid" for w in completed)
    wrong_at_bank = []
    for w in completed:
        transfer = bank_transfer(sandbox_address, w.bank_transfer_reference)
        if transfer is None or transfer["amount_minor"] != w.amount.amount_minor:
            wrong_at_bank.append(w.withdrawal_id)
    settled = {r.settlement_id for r in payouts.settlements}
    without = sorted(settled - {w.settlement_id for w in withdrawals})
    passed = (
        last is not None
        and last.kinds["settling"] == 0
        and last.kinds["payout_in_transit"] == 0
        and last.kinds["bank_payouts"] == paid_total
        and sorted(posted) == expected
        and not wrong_at_bank
        and not without
        and len(completed) == len(withdrawals)
    )
    kinds = last.kinds if last is not None else {}
    return Check(
        "at the end nothing is settling or in transit, and each payout was paid once by the "
        "bank and posted once to platform/bank_payouts",
        passed,
        f"{len(completed)} of {len(withdrawals)} withdrawals COMPLETED ({paid_total} EUR minor); "
        f"settling {kinds.get('settling')}, in transit {kinds.get('payout_in_transit')}, "
        f"bank_payouts {kinds.get('bank_payouts')}; {len(posted)} payouts posted "
        f"(expected {len(expected)}); wrong at the bank: {wrong_at_bank[:3]}; "
        f"settlements without a withdrawal: {without[:3]}",
    )
