"""One HTTP server that plays every external partner: exchange rates, geo-IP, the payment
channel (PSP), the bank and the merchants' webhook endpoints.

It behaves like the real ones where it matters to the mesh: the PSP and the bank dedupe by
``Idempotency-Key``, and faults (delay, error rate, status) are switchable at run time per
partner through ``/_control/faults``, like Envoy's fault filter, so tests and ``make chaos``
can make a partner slow or failing. Those switches are off unless ``PAYMESH_FAULT_INJECTION=1``
and then take the admin token (:mod:`services.mesh.admin_token`); ``/_control/stats``
stays readable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.mesh.admin import HttpLimits
from services.mesh.admin_token import AdminTokenError, ControlAccess
from services.mesh.bootstrap import die_with_supervisor
from services.mesh.faults import MAX_DELAY_MS
from services.mesh.topology import PARTNER_SANDBOX_VAR, Topology, parse_hostport
from services.tools.sandbox.bounded_http import BoundedHTTPServer, BoundedRequestHandler

log = logging.getLogger("paymesh.partners")

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
#: The admin endpoint's bounds, but room for the whole mesh's partner calls at once (each
#: partner call is one connection, and ``make bench`` runs 64 payments concurrently).
SANDBOX_LIMITS = HttpLimits(max_connections=256)
#: Control routes that switch behaviour, so sit behind the control gate.
GUARDED_CONTROL = frozenset({("POST", "faults"), ("DELETE", "faults")})


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
    """Everything the partners remember, guarded by one lock."""

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
    rng: random.Random = field(default_factory=random.Random)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _country_of(ip: str) -> str:
    """A stable country per address; 203.0.113.x (TEST-NET-3) is high risk on purpose."""
    if ip.startswith("203.0.113."):
        return HIGH_RISK_COUNTRIES[0]
    countries = ("US", "DE", "GB", "FR", "JP", "CN", "CA", "AU", "SG", "BR")
    return countries[int(hashlib.sha256(ip.encode()).hexdigest(), 16) % len(countries)]


class SandboxHandler(BoundedRequestHandler):
    """Routes ``/<partner>/...`` to the partner's behaviour."""

    server: SandboxServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ---------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        data = self.read_body()  # read whatever the method, so the next request starts clean
        if not data:
            return {}
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()  # bounded; read even when refused, so the answer is not reset
        if parts[:1] == ["_control"] and (method, "/".join(parts[1:])) in GUARDED_CONTROL:
            refusal = self.server.access.refusal(self.headers.get("Authorization"))
            if refusal is not None:
                log.warning(
                    "refused %s %s from %s: %s",
                    method,
                    url.path,
                    self.address_string(),
                    refusal.reason,
                )
                self.reply(refusal.status, refusal.as_json(), refusal.headers)
                return
        if not parts:
            self.reply(404, {"error": "no such partner"})
            return
        partner, rest = parts[0], parts[1:]
        if partner == "healthz":
            self.reply(200, {"status": "ok"})
            return
        if partner == "_control":
            self._control(method, rest, body)
            return
        state = self.server.state
        with state.lock:
            state.requests[partner] = state.requests.get(partner, 0) + 1
            fault = state.faults.get(partner)
            failing = fault is not None and state.rng.random() < fault.error_rate
        if fault and fault.delay_ms:
            time.sleep(fault.delay_ms / 1000)
        if fault and failing:
            self.reply(fault.status, {"error": f"injected fault in {partner}"})
            return
        handler = getattr(self, f"_partner_{partner.replace('-', '_')}", None)
        if handler is None:
            self.reply(404, {"error": f"no partner {partner!r}"})
            return
        status, reply = handler(method, rest, query, body)
        self.reply(status, reply)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- control ----------------------------------------------------------
    def _control(self, method: str, rest: list[str], body: dict[str, Any]) -> None:
        state = self.server.state
        if rest == ["faults"] and method == "POST":
            partner = str(body.get("partner", ""))
            try:
                fault = Fault(
                    delay_ms=int(body.get("delay_ms", 0)),
                    error_rate=float(body.get("error_rate", 0.0)),
                    status=int(body.get("status", 503)),
                )
            except (TypeError, ValueError):
                self.reply(400, {"error": "delay_ms, error_rate and status must be numbers"})
                return
            if not (
                0 <= fault.delay_ms <= MAX_DELAY_MS
                and 0.0 <= fault.error_rate <= 1.0
                and 100 <= fault.status <= 599
            ):
                self.reply(
                    400,
                    {"error": f"want delay_ms 0..{MAX_DELAY_MS}, error_rate 0..1, status 100..599"},
                )
                return
            with state.lock:
                state.faults[partner] = fault
            self.reply(
                200,
                {
                    "partner": partner,
                    "fault": dataclasses.asdict(fault),
                },
            )
        elif rest == ["faults"] and method == "DELETE":
            with state.lock:
                state.faults.clear()
            self.reply(200, {"faults": {}})
        elif rest == ["stats"] and method == "GET":
            with state.lock:
                stats = {
                    "requests": dict(state.requests),
                    "charges": len(state.charges),
                    "transfers": len(state.transfers),
                    "webhooks": len(state.webhooks),
                }
            self.reply(200, stats)
        else:
            self.reply(404, {"error": "unknown control endpoint"})

    # -- partners ---------------------------------------------------------
    def _partner_exchange_rate(
        self, method: str, rest: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        source, target = query.get("from", "").upper(), query.get("to", "").upper()
        if method != "GET" or rest != ["rates"]:
            return 404, {"error": "GET /rates?from=XXX&to=YYY"}
        if source not in USD_RATES or target not in USD_RATES:
            return 422, {"error": f"unsupported currency pair {source}/{target}"}
        from decimal import Decimal

        rate = Decimal(USD_RATES[target]) / Decimal(USD_RATES[source])
        return 200, {"from": source, "to": target, "rate": f"{rate:.6f}", "as_of": _now()}

    def _partner_geo_ip(
        self, method: str, rest: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
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
        body: dict[str, Any],
        build: Any,
    ) -> tuple[int, Any]:
        key = self.headers.get("Idempotency-Key", "")
        state = self.server.state
        with state.lock:
            if key and key in keys:
                return 200, store[keys[key]]
            record = build(f"{prefix}_{uuid.uuid4().hex[:20]}", body)
            store[record["id"]] = record
            if key:
                keys[key] = record["id"]
        return 201, record

    def _partner_payment_channel(
        self, method: str, rest: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        state = self.server.state
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

            return self._idempotent_create(state.charges, state.charge_keys, "ch", body, build)
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
            key = self.headers.get("Idempotency-Key", "")
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

    def _partner_bank_transfer(
        self, method: str, rest: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        state = self.server.state
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

            return self._idempotent_create(state.transfers, state.transfer_keys, "tr", body, build)
        if method == "GET" and len(rest) == 2 and rest[0] == "transfers":
            with state.lock:
                transfer = state.transfers.get(rest[1])
            return (200, transfer) if transfer else (404, {"error": "no such transfer"})
        return 404, {"error": "unknown bank-transfer endpoint"}

    def _partner_merchant_webhooks(
        self, method: str, rest: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        state = self.server.state
        if method == "POST" and rest == ["deliver"]:
            key = self.headers.get("Idempotency-Key", "")
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


class SandboxServer(BoundedHTTPServer):
    """The bounded threading HTTP server with the partners' shared state."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        access: ControlAccess | None = None,
        limits: HttpLimits = SANDBOX_LIMITS,
    ) -> None:
        self.allow_reuse_address = True
        super().__init__(address, SandboxHandler, limits=limits)
        self.state = SandboxState()
        self.access = access or ControlAccess()  # who may switch faults: nobody by default


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    die_with_supervisor()
    logging.basicConfig(
        level="INFO", format="%(asctime)s partner-sandbox %(levelname)s %(message)s"
    )
    topology = Topology()
    host, port = parse_hostport(topology.sandbox_address(), variable=PARTNER_SANDBOX_VAR)
    try:
        access = ControlAccess.from_environ(topology.environ)
    except AdminTokenError as exc:
        print(f"partner-sandbox: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    if access.enabled:
        log.warning("fault injection is ON: /_control/faults takes the admin token")
    try:
        server = SandboxServer((host.strip("[]"), port), access=access)
    except OSError as exc:
        print(f"partner-sandbox: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(2)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"PAYMESH_READY service=partner-sandbox address={host}:{server.server_port}", flush=True)
    server.serve_forever()
    server.server_close()
    sys.exit(0)
