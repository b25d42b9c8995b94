"""One HTTP server that plays every external partner: exchange rates, geo-IP, the payment
channel (PSP), the bank and the merchants' webhook endpoints.

It behaves like the real ones where it matters to the mesh: the PSP and the bank dedupe by
``Idempotency-Key``, and faults (delay, error rate, status) are switchable at run time per
partner through ``/_control/faults``, like Envoy's fault filter, so tests and ``make chaos``
can make a partner slow or failing. Those switches are off unless ``PAYMESH_FAULT_INJECTION=1``
and then take the admin token (:mod:`services.mesh.admin_token`); ``/_control/stats``
stays readable. ``GET /healthz`` and ``GET /<partner>/healthz`` answer as the sandbox (its
name, the partner's name), so a probe can tell it from any other HTTP server.
It runs on aiohttp within the admin endpoint's bounds (:class:`BoundedHttpServer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.mesh import logs
from services.mesh.admin import BoundedHttpServer, HttpLimits, bounded_app, peer_of
from services.mesh.admin_token import AdminTokenError, ControlAccess
from services.mesh.bootstrap import die_with_supervisor, serve_http_member
from services.mesh.faults import MAX_DELAY_MS
from services.mesh.topology import PARTNER_SANDBOX_VAR, PARTNERS, Topology, parse_hostport

log = logging.getLogger("paymesh.partners")

#: The name the sandbox answers ``/healthz`` with, and logs and reports under.
SANDBOX_NAME = "partner-sandbox"
#: Units of each currency per 1 USD, as decimal strings (never floats on the wire).
USD_RATES = {
    "USD": "1",
    "EUR": "0.92",
    "GBP": "0.79",
    "JPY": "151.30",
    "CNY": "7.24",
    "CAD": "1.37",
    "AUD": "1.53",
    "CHF": "0.88",
    "SGD": "1.35",
    "HKD": "7.82",
}
#: Countries the geo-IP partner reports for the first octet of an address, for test control.
HIGH_RISK_COUNTRIES = ("KP", "IR")
#: The admin endpoint's bounds, but room for the whole mesh's partner calls at once
#: (``make bench`` runs 64 payments concurrently, each with several partner calls).
SANDBOX_LIMITS = HttpLimits(max_connections=256)
#: Pending connections the kernel queues before they are accepted: a burst of the whole
#: mesh's partner calls waits there instead of being dropped (a 1 s SYN retransmit each).
LISTEN_BACKLOG = 1024
#: Control routes that switch behaviour, so sit behind the control gate.
GUARDED_CONTROL = frozenset({("POST", "faults"), ("DELETE", "faults")})
#: Methods the partners answer; any other is 501.
METHODS = frozenset({"GET", "POST", "DELETE"})


@dataclass(slots=True)
class Fault:
    """A fault injected into one partner's responses."""

    delay_ms: int = 0
    """Added latency before answering."""
    error_rate: float = 0.0
    """Share of requests answered with ``status`` instead of the real answer."""
    status: int = 503
    """Status of an injected error."""


@dataclass(slots=True)
class SandboxState:
    """Everything the partners remember, guarded by one lock (tests read it from their thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    charge_keys: dict[str, str] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfer_keys: dict[str, str] = field(default_factory=dict)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    webhook_keys: set[str] = field(default_factory=set)
    #: Deliveries accepted per Idempotency-Key, repeats included (``/received`` shows them).
    webhook_accepted: dict[str, int] = field(default_factory=dict)
    #: ``GET /<partner>/healthz`` answered per partner (the probes of Diagnostics).
    health_probes: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _country_of(ip: str) -> str:
    """A stable country per address; 203.0.113.x (TEST-NET-3) is high risk on purpose."""
    if ip.startswith("203.0.113."):
        return HIGH_RISK_COUNTRIES[0]
    countries = ("US", "DE", "GB", "FR", "JP", "CN", "CA", "AU", "SG", "BR")
    return countries[int(hashlib.sha256(ip.encode()).hexdigest(), 16) % len(countries)]


@dataclass(frozen=True, slots=True)
class PartnerCall:
    """One request to a partner, as its behaviour needs it."""

    method: str
    """HTTP method, upper case."""
    rest: list[str]
    """Path segments after the partner's own."""
    query: dict[str, str]
    """Query parameters (first value wins)."""
    body: dict[str, Any]
    """The JSON object body; empty when there is none or it is not an object."""
    idempotency_key: str
    """The ``Idempotency-Key`` header, empty without one."""


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _json_object(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


class Sandbox:
    """The partners and their shared state, served on aiohttp; ``/<partner>/...`` routes to
    the partner's behaviour."""

    def __init__(
        self,
        *,
        access: ControlAccess | None = None,
        limits: HttpLimits = SANDBOX_LIMITS,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        self.state = SandboxState()
        self.access = access or ControlAccess()  # who may switch faults: nobody by default
        self.limits = limits
        self.backlog = backlog
        self._partners = {p.path.strip("/"): p.name for p in PARTNERS}
        self._http: BoundedHttpServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        app = bounded_app(self.limits)
        app.router.add_route("*", "/{path:.*}", self._route)
        self._http = BoundedHttpServer(app, self.limits, backlog=self.backlog)
        return await self._http.start(host, port)

    async def stop(self) -> None:
        """Stop listening and end open connections."""
        http, self._http = self._http, None
        if http is not None:
            await http.stop()

    # -- plumbing ---------------------------------------------------------
    async def _route(self, request: web.Request) -> web.Response:
        method = request.method
        if method not in METHODS:
            return _json(501, {"error": f"unsupported method {method}"})
        parts = [p for p in request.path.split("/") if p]
        query: dict[str, str] = {}
        for name, value in request.query.items():
            if value:
                query.setdefault(name, value)  # first wins, blanks dropped
        body = _json_object(await request.read())  # read already, within the bounds
        if parts[:1] == ["_control"] and (method, "/".join(parts[1:])) in GUARDED_CONTROL:
            refusal = self.access.refusal(request.headers.get("Authorization"))
            if refusal is not None:
                log.warning(
                    "refused %s %s from %s: %s",
                    method,
                    request.path,
                    peer_of(request) or "?",
                    refusal.reason,
                )
                return _json(refusal.status, refusal.as_json(), dict(refusal.headers))
        if not parts:
            return _json(404, {"error": "no such partner"})
        partner, rest = parts[0], parts[1:]
        if partner == "healthz":
            return _json(200, {"status": "ok", "service": SANDBOX_NAME})
        if partner == "_control":
            return _json(*self._control(method, rest, body))
        state = self.state
        with state.lock:
            state.requests[partner] = state.requests.get(partner, 0) + 1
            fault = state.faults.get(partner)
            failing = fault is not None and state.rng.random() < fault.error_rate
        if fault and fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault and failing:
            return _json(fault.status, {"error": f"injected fault in {partner}"})
        handler = getattr(self, f"_partner_{partner.replace('-', '_')}", None)
        if handler is None:
            return _json(404, {"error": f"no partner {partner!r}"})
        if method == "GET" and rest == ["healthz"]:
            with state.lock:
                state.health_probes[partner] = state.health_probes.get(partner, 0) + 1
            name = self._partners.get(partner, partner)
            return _json(200, {"status": "ok", "partner": name, "service": SANDBOX_NAME})
        call = PartnerCall(method, rest, query, body, request.headers.get("Idempotency-Key", ""))
        return _json(*handler(call))

    # -- control ----------------------------------------------------------
    def _control(self, method: str, rest: list[str], body: dict[str, Any]) -> tuple[int, Any]:
        state = self.state
        if rest == ["faults"] and method == "POST":
            partner = str(body.get("partner", ""))
            try:
                fault = Fault(
                    delay_ms=int(body.get("delay_ms", 0)),
                    error_rate=float(body.get("error_rate", 0.0)),
                    status=int(body.get("status", 503)),
                )
            except (TypeError, ValueError):
                return 400, {"error": "delay_ms, error_rate and status must be numbers"}
            if not (
                0 <= fault.delay_ms <= MAX_DELAY_MS
                and 0.0 <= fault.error_rate <= 1.0
                and 100 <= fault.status <= 599
            ):
                return 400, {
                    "error": f"want delay_ms 0..{MAX_DELAY_MS}, error_rate 0..1, status 100..599"
                }
            with state.lock:
                state.faults[partner] = fault
            return 200, {"partner": partner, "fault": dataclasses.asdict(fault)}
        if rest == ["faults"] and method == "DELETE":
            with state.lock:
                state.faults.clear()
            return 200, {"faults": {}}
        if rest == ["stats"] and method == "GET":
            with state.lock:
                return 200, {
                    "requests": dict(state.requests),
                    "health_probes": dict(state.health_probes),
                    "charges": len(state.charges),
                    "transfers": len(state.transfers),
                    "webhooks": len(state.webhooks),
                }
        return 404, {"error": "unknown control endpoint"}

    # -- partners ---------------------------------------------------------
    def _partner_exchange_rate(self, call: PartnerCall) -> tuple[int, Any]:
        method, rest, query = call.method, call.rest, call.query
        source, target = query.get("from", "").upper(), query.get("to", "").upper()
        if method != "GET" or rest != ["rates"]:
            return 404, {"error": "GET /rates?from=XXX&to=YYY"}
        if source not in USD_RATES or target not in USD_RATES:
            return 422, {"error": f"unsupported currency pair {source}/{target}"}
        from decimal import Decimal

        rate = Decimal(USD_RATES[target]) / Decimal(USD_RATES[source])
        return 200, {"from": source, "to": target, "rate": f"{rate:.6f}", "as_of": _now()}

    def _partner_geo_ip(self, call: PartnerCall) -> tuple[int, Any]:
        method, rest, query = call.method, call.rest, call.query
        ip = query.get("ip", "")
        if method != "GET" or rest != ["lookup"] or not ip:
            return 400, {"error": "GET /lookup?ip=ADDRESS"}
        country = _country_of(ip)
        return 200, {
            "ip": ip,
            "country": country,
            "proxy": ip.startswith("198.51.100."),
            "high_risk": country in HIGH_RISK_COUNTRIES,
        }

    def _idempotent_create(
        self,
        store: dict[str, dict[str, Any]],
        keys: dict[str, str],
        prefix: str,
        call: PartnerCall,
        build: Any,
    ) -> tuple[int, Any]:
        key, body = call.idempotency_key, call.body
        state = self.state
        with state.lock:
            if key and key in keys:
                return 200, store[keys[key]]
            record = build(f"{prefix}_{uuid.uuid4().hex[:20]}", body)
            store[record["id"]] = record
            if key:
                keys[key] = record["id"]
        return 201, record

    def _partner_payment_channel(self, call: PartnerCall) -> tuple[int, Any]:
        method, rest, query, body = call.method, call.rest, call.query, call.body
        state = self.state
        if method == "POST" and rest == ["charges"]:
            amount, currency = int(body.get("amount_minor", 0)), str(body.get("currency", ""))
            if amount <= 0 or currency not in USD_RATES:
                return 422, {"error": "amount_minor must be > 0 and currency supported"}

            def build(charge_id: str, data: dict[str, Any]) -> dict[str, Any]:
                declined = str(data.get("card_token", "")).startswith("tok_decline")
                return {
                    "id": charge_id,
                    "amount_minor": amount,
                    "currency": currency,
                    "reference": str(data.get("reference", "")),
                    "status": "declined" if declined else "captured",
                    "decline_code": "card_declined" if declined else "",
                    "refunded_minor": 0,
                    "created_at": _now(),
                }

            return self._idempotent_create(state.charges, state.charge_keys, "ch", call, build)
        if method == "GET" and rest == ["charges"]:
            reference = query.get("reference")
            with state.lock:
                found = [c for c in state.charges.values() if reference in (None, c["reference"])]
            return 200, {"charges": found}
        if method == "GET" and len(rest) == 2 and rest[0] == "charges":
            with state.lock:
                charge = state.charges.get(rest[1])
            return (200, charge) if charge else (404, {"error": "no such charge"})
        if (
            method == "POST"
            and len(rest) == 3
            and rest[0] == "charges"
            and rest[2] in ("refunds", "void")
        ):
            key = call.idempotency_key
            with state.lock:
                charge = state.charges.get(rest[1])
                if charge is None:
                    return 404, {"error": "no such charge"}
                if key and key in state.refunds:
                    return 200, state.refunds[key]
                amount = int(
                    body.get("amount_minor", charge["amount_minor"] - charge["refunded_minor"])
                )
                if charge["status"] not in ("captured", "partially_refunded"):
                    return 409, {"error": f"charge is {charge['status']}"}
                if amount <= 0 or amount > charge["amount_minor"] - charge["refunded_minor"]:
                    return 422, {"error": "refund exceeds the captured amount"}
                charge["refunded_minor"] += amount
                full = charge["refunded_minor"] == charge["amount_minor"]
                charge["status"] = (
                    ("voided" if rest[2] == "void" else "refunded")
                    if full
                    else "partially_refunded"
                )
                refund = {
                    "id": f"re_{uuid.uuid4().hex[:20]}",
                    "charge_id": charge["id"],
                    "amount_minor": amount,
                    "status": "succeeded",
                }
                if key:
                    state.refunds[key] = refund
            return 201, refund
        return 404, {"error": "unknown payment-channel endpoint"}

    def _partner_bank_transfer(self, call: PartnerCall) -> tuple[int, Any]:
        method, rest, body = call.method, call.rest, call.body
        state = self.state
        if method == "POST" and rest == ["transfers"]:
            amount = int(body.get("amount_minor", 0))
            if amount <= 0 or not body.get("account"):
                return 422, {"error": "amount_minor must be > 0 and account set"}

            def build(transfer_id: str, data: dict[str, Any]) -> dict[str, Any]:
                return {
                    "id": transfer_id,
                    "amount_minor": amount,
                    "currency": str(data.get("currency", "")),
                    "account": str(data.get("account")),
                    "status": "completed",
                    "created_at": _now(),
                }

            return self._idempotent_create(state.transfers, state.transfer_keys, "tr", call, build)
        if method == "GET" and len(rest) == 2 and rest[0] == "transfers":
            with state.lock:
                transfer = state.transfers.get(rest[1])
            return (200, transfer) if transfer else (404, {"error": "no such transfer"})
        return 404, {"error": "unknown bank-transfer endpoint"}

    def _partner_merchant_webhooks(self, call: PartnerCall) -> tuple[int, Any]:
        method, rest, query, body = call.method, call.rest, call.query, call.body
        state = self.state
        if method == "POST" and rest == ["deliver"]:
            key = call.idempotency_key
            with state.lock:
                duplicate = bool(key) and key in state.webhook_keys
                if not duplicate:
                    state.webhooks.append({**body, "idempotency_key": key, "received_at": _now()})
                    if key:
                        state.webhook_keys.add(key)
                if key:
                    state.webhook_accepted[key] = state.webhook_accepted.get(key, 0) + 1
            return 200, {"received": True, "duplicate": duplicate}
        if method == "GET" and rest == ["received"]:
            merchant = query.get("merchant_id")
            with state.lock:
                # "accepted": how often this key was delivered and answered 200 (1 if no key).
                found = [
                    {**w, "accepted": state.webhook_accepted.get(w["idempotency_key"], 1)}
                    for w in state.webhooks
                    if merchant in (None, w.get("merchant_id"))
                ]
            return 200, {"deliveries": found}
        return 404, {"error": "unknown merchant-webhooks endpoint"}


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    die_with_supervisor()
    try:
        logs.configure(SANDBOX_NAME, os.environ, level="INFO")
    except logs.LogConfigError as exc:
        print(f"{SANDBOX_NAME}: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    topology = Topology()
    host, port = parse_hostport(topology.sandbox_address(), variable=PARTNER_SANDBOX_VAR)
    try:
        access = ControlAccess.from_environ(topology.environ)
    except AdminTokenError as exc:
        print(f"{SANDBOX_NAME}: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    if access.enabled:
        log.warning("fault injection is ON: /_control/faults takes the admin token")
    sys.exit(asyncio.run(_serve(host, port, access)))


async def _serve(host: str, port: int, access: ControlAccess) -> int:
    return await serve_http_member(SANDBOX_NAME, Sandbox(access=access), host, port)
