"""The topology is the one source of names, ports and edges; bad ones stop start-up."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from services.mesh.authz import method_paths
from services.mesh.topology import (
    ALL_METHODS,
    CONSOLE_PORT,
    PARTNER_SANDBOX_PORT,
    PARTNERS,
    SERVICES,
    Topology,
    TopologyError,
    parse_hostport,
    validate,
)
from services.tools.prometheus_config import render

ROOT = Path(__file__).resolve().parents[2]

SEED_PORTS = {
    "merchant-service": 40002,
    "payment-gateway": 40003,
    "order-service": 40004,
    "channel-adapter": 40005,
    "risk-service": 40006,
    "accounting-service": 40007,
    "notification-service": 40008,
    "analytics-service": 40009,
    "merchant-auth-service": 40011,
    "settlement-service": 40013,
    "withdrawal-service": 40014,
}

SEED_EDGES = {
    ("payment-gateway", "order-service"),
    ("payment-gateway", "channel-adapter"),
    ("payment-gateway", "risk-service"),
    ("merchant-service", "analytics-service"),
    ("merchant-service", "accounting-service"),
    ("merchant-service", "risk-service"),
    ("merchant-service", "notification-service"),
    ("merchant-service", "payment-gateway"),
    ("settlement-service", "accounting-service"),
    ("settlement-service", "withdrawal-service"),
    ("withdrawal-service", "accounting-service"),
    ("withdrawal-service", "notification-service"),
    ("merchant-auth-service", "merchant-service"),
}


def test_declares_the_seed_services_on_the_seed_ports() -> None:
    assert {s.name: s.port for s in SERVICES} == SEED_PORTS


def test_declares_every_seed_edge() -> None:
    edges = {(s.name, target) for s in SERVICES for target in s.calls}
    assert edges >= SEED_EDGES


def test_default_address_is_loopback_and_declared_port() -> None:
    assert Topology(environ={}).address("order-service") == "127.0.0.1:40004"


def test_override_replaces_the_address() -> None:
    topology = Topology(environ={"ORDER_SERVICE_ADDR": "10.0.0.7:9000"})
    assert topology.address("order-service") == "10.0.0.7:9000"


def test_override_variable_name_follows_the_service_name() -> None:
    assert (
        Topology(environ={"PAYMENT_GATEWAY_ADDR": "[::1]:5000"}).address("payment-gateway")
        == "[::1]:5000"
    )


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1:", ":40004", "host:port", "h:99999"])
def test_bad_override_names_the_variable(value: str) -> None:
    with pytest.raises(TopologyError, match="ORDER_SERVICE_ADDR"):
        Topology(environ={"ORDER_SERVICE_ADDR": value})


def test_override_of_an_unknown_service_names_the_variable() -> None:
    with pytest.raises(TopologyError, match="ODER_SERVICE_ADDR"):
        Topology(environ={"ODER_SERVICE_ADDR": "127.0.0.1:1"})


def test_partner_url_override_must_be_http() -> None:
    with pytest.raises(TopologyError, match="GEO_IP_PARTNER_URL"):
        Topology(environ={"GEO_IP_PARTNER_URL": "ftp://x"})


def test_unknown_service_lookup_is_a_clear_error() -> None:
    with pytest.raises(TopologyError, match="unknown service 'ledger-service'"):
        Topology(environ={}).address("ledger-service")


def test_duplicate_port_is_rejected() -> None:
    clash = dataclasses.replace(SERVICES[1], name="clone-service", admin_port=1)
    with pytest.raises(TopologyError, match="port 40003 is declared by both"):
        validate((*SERVICES, clash), PARTNERS)


def test_duplicate_name_is_rejected() -> None:
    with pytest.raises(TopologyError, match="declared twice"):
        validate((*SERVICES, SERVICES[0]), PARTNERS)


def test_edge_to_an_undeclared_service_is_rejected() -> None:
    rogue = dataclasses.replace(SERVICES[2], calls={"ledger-service": ALL_METHODS})
    with pytest.raises(TopologyError, match="'ledger-service' is not declared"):
        validate((*SERVICES[:2], rogue, *SERVICES[3:]), PARTNERS)


def test_edge_that_grants_no_method_is_rejected() -> None:
    rogue = dataclasses.replace(SERVICES[2], calls={"accounting-service": ()})
    with pytest.raises(TopologyError, match="grants no method"):
        validate((*SERVICES[:2], rogue, *SERVICES[3:]), PARTNERS)


def test_merchant_methods_need_a_public_port_and_a_key_check() -> None:
    no_port = dataclasses.replace(SERVICES[2], merchant_methods=("GetOrder",))
    with pytest.raises(TopologyError, match="public port"):
        validate((*SERVICES[:2], no_port, *SERVICES[3:]), PARTNERS)
    no_check = dataclasses.replace(no_port, public_port=42004)
    with pytest.raises(TopologyError, match="AuthenticateApiKey"):
        validate((*SERVICES[:2], no_check, *SERVICES[3:]), PARTNERS)


def test_a_grant_naming_no_method_of_the_target_stops_authorization() -> None:
    spec = dataclasses.replace(SERVICES[2], operator_methods=("DropAllOrders",))
    with pytest.raises(TopologyError, match="has no method DropAllOrders"):
        method_paths(spec, spec.operator_methods)


def test_edge_to_an_undeclared_partner_is_rejected() -> None:
    rogue = dataclasses.replace(SERVICES[2], partners=("fax-gateway",))
    with pytest.raises(TopologyError, match="no such partner"):
        validate((*SERVICES[:2], rogue, *SERVICES[3:]), PARTNERS)


def test_parse_hostport_accepts_ipv6_brackets() -> None:
    assert parse_hostport("[::1]:40004", variable="X") == ("[::1]", 40004)


#: ``host:port`` in a string (localhost:8004, 127.0.0.1:40004, [::1]:40004, order.svc:9000).
_HOST_PORT = re.compile(
    r"(?:localhost|\d+\.\d+\.\d+\.\d+|\]|[a-z][\w-]*\.[a-z][\w.-]*):(\d{2,5})\b"
)
#: A number given to something named like a port or address (port=8004, ORDER_PORT = 8004).
_NAMED_PORT = re.compile(r"(?i)\w*(?:port|addr)\w*\s*(?::\s*\w+\s*)?[=:]\s*[\"']?(\d{2,5})\b")
#: Every port the topology declares, wherever it appears as a literal.
_DECLARED = {str(p) for s in SERVICES for p in (s.port, s.admin_port)} | {
    str(PARTNER_SANDBOX_PORT),
    str(CONSOLE_PORT),
}
_ALLOWED = {ROOT / "services" / "mesh" / "topology.py"}


def _port_literals(path: Path) -> list[str]:
    hits = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        found = [m.group(1) for m in _HOST_PORT.finditer(code)]
        found += [m.group(1) for m in _NAMED_PORT.finditer(code)]
        found += [n for n in re.findall(r"(?<![\w.])\d{4,5}(?![\w.])", code) if n in _DECLARED]
        if any(n != "0" and int(n) > 0 for n in found):
            hits.append(f"{path.name}:{number}: {line.strip()}")
    return hits


def test_no_port_literal_outside_the_topology() -> None:
    """The old gateway called 8004 while order-service listened on 40004: never again."""
    files = [
        p
        for folder in ("services", "interceptors")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p not in _ALLOWED
    ]
    assert files, "no source files found"
    hits = [hit for path in files for hit in _port_literals(path)]
    assert not hits, "port literals outside services/mesh/topology.py:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    [
        'ORDER_URL = "http://localhost:8004"',
        'target = "127.0.0.1:40004"',
        "order_port = 8004",
        "channel = grpc.insecure_channel(f'{host}:{40005}')",
        "DEFAULT = 40006",
    ],
)
def test_port_literal_scan_catches_a_drifted_port(tmp_path: Path, line: str) -> None:
    drifted = tmp_path / "order_client.py"
    drifted.write_text(line + "\n")
    assert _port_literals(drifted)


@pytest.mark.parametrize(
    "line",
    ['"not an ISO 4217 code"', "max_entries: int = 4096", '"ISO 3166-1 alpha-2"', "x = a[:80]"],
)
def test_port_literal_scan_ignores_other_numbers(tmp_path: Path, line: str) -> None:
    source = tmp_path / "rules.py"
    source.write_text(line + "\n")
    assert not _port_literals(source)


def test_console_address_defaults_to_the_loopback_and_honours_its_override() -> None:
    assert Topology(environ={}).console_address() == f"127.0.0.1:{CONSOLE_PORT}"
    moved = Topology(environ={"PAYMESH_CONSOLE_ADDR": "127.0.0.1:1234"})
    assert moved.console_address() == "127.0.0.1:1234"


def test_console_address_override_that_is_no_address_is_refused() -> None:
    with pytest.raises(TopologyError, match="PAYMESH_CONSOLE_ADDR"):
        Topology(environ={"PAYMESH_CONSOLE_ADDR": "nowhere"}).console_address()


def test_console_port_is_no_port_of_a_service() -> None:
    declared = {p for s in SERVICES for p in (s.port, s.admin_port, s.public_port)}
    assert CONSOLE_PORT not in declared | {PARTNER_SANDBOX_PORT}


def test_port_offset_shifts_every_default_port() -> None:
    topology = Topology(environ={"PAYMESH_PORT_OFFSET": "1000"})

    assert topology.address("order-service") == "127.0.0.1:41004"
    assert topology.admin_address("order-service") == "127.0.0.1:42004"
    assert topology.public_address("payment-gateway") == "127.0.0.1:43003"
    assert topology.sandbox_address() == f"127.0.0.1:{PARTNER_SANDBOX_PORT + 1000}"
    assert topology.console_address() == f"127.0.0.1:{CONSOLE_PORT + 1000}"
    assert (
        topology.partner_url("geo-ip") == f"http://127.0.0.1:{PARTNER_SANDBOX_PORT + 1000}/geo-ip"
    )


def test_a_negative_port_offset_shifts_down() -> None:
    assert Topology(environ={"PAYMESH_PORT_OFFSET": "-4"}).address("order-service") == (
        "127.0.0.1:40000"
    )


def test_explicit_address_wins_over_the_port_offset() -> None:
    topology = Topology(
        environ={"PAYMESH_PORT_OFFSET": "1000", "ORDER_SERVICE_ADDR": "127.0.0.1:9000"}
    )

    assert topology.address("order-service") == "127.0.0.1:9000"
    assert topology.address("risk-service") == "127.0.0.1:41006"


def test_default_port_is_the_one_function_new_ports_go_through() -> None:
    assert Topology(environ={"PAYMESH_PORT_OFFSET": "7"}).default_port(40030) == 40037
    assert Topology(environ={}).default_port(40030) == 40030


@pytest.mark.parametrize("value", ["ten", "1.5", "0x10", "1000 2"])
def test_a_port_offset_that_is_not_an_integer_names_the_variable(value: str) -> None:
    with pytest.raises(TopologyError, match=r"PAYMESH_PORT_OFFSET=.* is not an integer"):
        Topology(environ={"PAYMESH_PORT_OFFSET": value})


@pytest.mark.parametrize("value", ["30000", "-40002"])
def test_a_port_offset_that_leaves_1_to_65535_names_the_variable(value: str) -> None:
    with pytest.raises(TopologyError, match=r"PAYMESH_PORT_OFFSET=.*outside 1-65535"):
        Topology(environ={"PAYMESH_PORT_OFFSET": value})


def test_prometheus_config_follows_the_port_offset() -> None:
    text = render(Topology(environ={"PAYMESH_PORT_OFFSET": "500"}))

    assert '"127.0.0.1:41502"' in text
    assert '"127.0.0.1:41002"' not in text
