"""Replicas behind one address: the forms a ``*_ADDR`` takes, the service config channels get,
and where the launcher places replica k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interceptors.balancing import service_config
from interceptors.policy import BalancingPolicy, PolicyConfig, PolicyError
from services.mesh.topology import LOCAL_POSTGRESQL_PORT, Topology, TopologyError, replica_port_step
from services.tools import postgres
from services.tools.launcher import local_engines
from services.tools.replicas import ReplicasError, callers_environ, parse_replicas, plan
from services.tools.status import replicas_of, with_replicas
from services.tools.supervisor import LauncherReport, MemberReport


def test_a_list_of_ipv4_endpoints_dials_through_the_ipv4_resolver() -> None:
    topology = Topology(environ={"ORDER_SERVICE_ADDR": "10.0.0.7:40004, 10.0.0.8:40004"})
    dial = topology.dial("order-service")
    assert dial.target == "ipv4:10.0.0.7:40004,10.0.0.8:40004"
    assert dial.endpoints == ("10.0.0.7:40004", "10.0.0.8:40004")


def test_a_list_of_ipv6_endpoints_dials_through_the_ipv6_resolver() -> None:
    topology = Topology(environ={"ORDER_SERVICE_ADDR": "[::1]:1,[::1]:2"})
    assert topology.dial("order-service").target == "ipv6:[::1]:1,[::1]:2"


def test_a_dns_name_is_dialled_as_given_and_re_resolved() -> None:
    address = "dns:///order-service.paymesh:40004"
    dial = Topology(environ={"ORDER_SERVICE_ADDR": address}).dial("order-service")
    assert (dial.target, dial.dns) == (address, True)


def test_one_endpoint_stays_as_written() -> None:
    assert Topology(environ={}).dial("order-service").target == "127.0.0.1:40004"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a.example:1,b.example:2", "is a name"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        ("127.0.0.1:1,127.0.0.1:1", "twice"),
        ("dns:///order-service", "dns:///host:port"),
        ("127.0.0.1:1,", "not host:port"),
    ],
)
def test_bad_replica_address_is_refused_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(TopologyError, match=f"ORDER_SERVICE_ADDR=.*{problem}"):
        Topology(environ={"ORDER_SERVICE_ADDR": value})


def test_a_replica_does_not_listen_on_a_list() -> None:
    topology = Topology(environ={"ORDER_SERVICE_ADDR": "127.0.0.1:1,127.0.0.1:2"})
    with pytest.raises(TopologyError, match="ORDER_SERVICE_LISTEN_ADDR to the one host:port"):
        topology.bind_address("order-service")


def test_a_replica_behind_a_list_listens_on_its_listen_address() -> None:
    topology = Topology(
        environ={
            "ORDER_SERVICE_ADDR": "127.0.0.1:1,127.0.0.1:2",
            "ORDER_SERVICE_LISTEN_ADDR": "127.0.0.1:2",
        }
    )
    assert topology.bind_address("order-service") == ("127.0.0.1", 2)


def test_service_config_is_round_robin_under_outlier_ejection_with_health() -> None:
    config = service_config(BalancingPolicy(), health_service="paymesh.order.v1.OrderService")
    (outlier,) = (
        entry["outlier_detection_experimental"] for entry in config["loadBalancingConfig"]
    )
    assert outlier["childPolicy"] == [{"round_robin": {}}]
    assert outlier["failurePercentageEjection"]["threshold"] == 85
    assert outlier["interval"] == "1.000s"
    assert config["healthCheckConfig"] == {"serviceName": "paymesh.order.v1.OrderService"}
    assert "retryPolicy" not in json.dumps(config)  # the chain retries, gRPC does not


def test_health_checking_can_be_switched_off_per_target() -> None:
    policy = PolicyConfig.from_mapping(
        {"targets": {"order-service": {"balancing": {"health_check": False}}}}
    ).target_policy("order-service")
    assert "healthCheckConfig" not in service_config(policy.balancing)


def test_the_shipped_policy_file_balances_every_target() -> None:
    config = PolicyConfig.load()
    assert config.defaults.balancing == BalancingPolicy()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"failure_percent": 101}, "defaults.balancing.failure_percent"),
        ({"outlier_interval_s": 0}, "defaults.balancing.outlier_interval_s"),
        ({"minimum_hosts": 0}, "defaults.balancing.minimum_hosts"),
    ],
)
def test_bad_balancing_value_names_its_path(table: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"defaults": {"balancing": table}})
    assert caught.value.key == key


def test_balancing_per_method_is_refused() -> None:
    with pytest.raises(PolicyError, match="per target"):
        PolicyConfig.from_mapping({"methods": {"/a.B/C": {"balancing": {"health_check": False}}}})


def test_replica_k_listens_on_every_port_plus_k_steps() -> None:
    replicas = plan(Topology(environ={}), parse_replicas("payment-gateway=2"), 100)
    second = replicas["payment-gateway"][1]
    assert second.name == "payment-gateway#1"
    assert (second.address, second.admin_address, second.public_address) == (
        "127.0.0.1:40103",
        "127.0.0.1:41103",
        "127.0.0.1:42103",
    )
    assert callers_environ(replicas) == {"PAYMENT_GATEWAY_ADDR": "127.0.0.1:40003,127.0.0.1:40103"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [("ledger=2", "not <service>=<count>"), ("order-service=0", "1-9"), ("order-service", "not")],
)
def test_bad_replicas_are_refused_naming_the_value(text: str, problem: str) -> None:
    with pytest.raises(ReplicasError, match=problem):
        parse_replicas(text)


def test_bad_port_step_is_refused() -> None:
    with pytest.raises(TopologyError, match="PAYMESH_REPLICA_PORT_STEP='0'"):
        replica_port_step({"PAYMESH_REPLICA_PORT_STEP": "0"})


def _member(name: str, address: str) -> MemberReport:
    return MemberReport(
        name=name,
        address=address,
        pid=1,
        running=True,
        restarts=0,
        last_exit="",
        last_exit_code=None,
        last_exit_time=None,
        crash_looping=False,
        next_restart_in_s=None,
        up_since_time=None,
    )


def test_status_asks_every_replica_the_running_launcher_reports() -> None:
    report = LauncherReport(
        pid=1,
        started_time=0.0,
        updated_time=0.0,
        heartbeat_s=2.0,
        members=(
            _member("payment-gateway", "127.0.0.1:40003"),
            _member("payment-gateway#1", "127.0.0.1:40103"),
        ),
    )
    topology = with_replicas(Topology(environ={}), report)
    assert replicas_of(topology, "payment-gateway") == [
        ("payment-gateway", "127.0.0.1:40003"),
        ("payment-gateway#1", "127.0.0.1:40103"),
    ]
    assert replicas_of(topology, "order-service") == [("order-service", "127.0.0.1:40004")]


def test_local_engines_are_started_postgresql_first_on_the_topologys_shifted_ports(
    tmp_path: Path,
) -> None:
    if postgres.bin_dir() is None:
        pytest.skip("PostgreSQL binaries are not installed (apt-get install postgresql)")
    engines = local_engines("redis,postgresql", {"PAYMESH_PORT_OFFSET": "7"}, tmp_path)
    assert [engine.name for engine in engines] == ["postgresql", "redis"]
    assert isinstance(engines[0], postgres.PostgresEngine)
    assert engines[0].cluster.port == LOCAL_POSTGRESQL_PORT + 7
    assert engines[0].cluster.directory == tmp_path.resolve() / "postgres"


@pytest.mark.parametrize("spec", ["mysql", "redis,redis", "postgresql,memcached"])
def test_unknown_or_repeated_local_engines_are_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name each of postgresql, redis at most once"):
        local_engines(spec, {}, tmp_path)


def test_no_local_engines_by_default(tmp_path: Path) -> None:
    assert local_engines("", {}, tmp_path) == []
