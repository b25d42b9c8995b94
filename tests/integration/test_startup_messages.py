"""A bad setting stops a real service process with one line naming it, and exit code 2.

Each case starts ``python -m services.<name>`` with one variable set to a bad value: the
process must exit with ``EXIT_CONFIG`` before serving, print exactly one ``cannot start``
line naming the variable, its value and what is allowed, and no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.channel_adapter import config as channel_config
from services.merchant_auth import config as auth_config
from services.merchant_auth.pepper import PEPPER_FILE_VAR
from services.mesh import tls
from services.mesh.bootstrap import EXIT_CONFIG
from services.mesh.limits import ServerLimits
from services.mesh.page_tokens import KEY_FILE_VAR as PAGE_TOKEN_KEY_FILE_VAR
from services.mesh.tls import CA_FILE_VAR, CERT_FILE_VAR, INSECURE_VAR, KEY_FILE_VAR
from services.mesh.topology import SERVICES, Target, env_prefix
from services.notification import config as notification_config
from services.payment_gateway import config as gateway_config
from services.storage.idempotency import RETENTION_VAR
from services.storage.leases import LEASE_VAR
from services.tools.ports import free_port
from tests import servers

ROOT = Path(__file__).resolve().parents[2]

#: (service, variable, bad value, a fragment of what the message says is allowed).
CASES = [
    (Target.ORDER, "ORDER_SERVICE_ADMIN_ADDR", "nonsense", "is not host:port"),
    (Target.ORDER, "ORDER_SERVICE_ADMIN_ADDR", "127.0.0.1:99999", "outside 0-65535"),
    (Target.ORDER, "PAYMESH_GRACE_S", "soon", "number of seconds >= 0"),
    (Target.ORDER, "PAYMESH_GRACE_S", "-1", "number of seconds >= 0"),
    (Target.ORDER, "PAYMESH_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (Target.ORDER, "PAYMESH_LOG_FORMAT", "xml", "is not a log format; one of text, json"),
    (Target.ORDER, "PAYMESH_ACCESS_LOG_SAMPLE", "2", "is not a fraction from 0 to 1"),
    (Target.ORDER, "PAYMESH_ACCESS_LOG_SAMPLE", "some", "is not a fraction from 0 to 1"),
    (Target.ORDER, "PAYMESH_PORT_OFFSET", "ten", "is not an integer"),
    (Target.ORDER, "PAYMESH_PORT_OFFSET", "30000", "outside 1-65535"),
    (Target.ORDER, "PAYMESH_TLS_RELOAD_S", "0", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_READINESS_INTERVAL_S", "often", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_HEALTHZ_MAX_LAG_S", "-2", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_REFLECTION", "maybe", "0 (off) or 1 (on"),
    (Target.ORDER, "ORDER_SERVICE_ADDR", "order:port", "is not host:port"),
    (Target.ORDER, "ORDER_SERVICE_LISTEN_ADDR", "0.0.0.0", "is not host:port"),
    (Target.ORDER, "ORDER_SERVICE_HEALTH_ADDR", "0.0.0.0:70000", "outside 0-65535"),
    (Target.ORDER, "ORDER_SERVICE_MAX_IN_FLIGHT", "many", "positive whole number"),
    (Target.ORDER, "ORDER_SERVICE_DATABASE_URL", "mysql://db/orders", "sqlite:///path and post"),
    (Target.ORDER, "DATABASE_URL", "sqlite:///all.db", "must be a postgresql:// URL"),
    (Target.ORDER, "PAYMESH_POLICY_FILE", "/nonexistent/policy.toml", "cannot read"),
    (Target.ORDER, "PARTNER_SANDBOX_ADDR", "sandbox", "is not host:port"),
    (Target.ORDER, "GEO_IP_PARTNER_URL", "ftp://geo", "http:// or https://"),
    (Target.ORDER, "ODER_SERVICE_ADDR", "127.0.0.1:1", "names no service or partner"),
    (
        Target.ORDER,
        "ORDER_SERVICE_ADDR",
        "127.0.0.1:1,127.0.0.1:2",
        "LISTEN_ADDR to the one host:port",
    ),
    (Target.ORDER, "RISK_SERVICE_ADDR", "a.example:1,b.example:1", "takes IP addresses"),
    (Target.ORDER, "RISK_SERVICE_ADDR", "dns:///risk", "dns:///host:port"),
    (Target.ORDER, LEASE_VAR, "forever", "number of seconds from 1 to 3600"),
    (Target.ORDER, "PAYMESH_FAULT_INJECTION", "1", "PAYMESH_ADMIN_TOKEN_FILE"),
    (Target.CHANNEL_ADAPTER, "CHANNEL_ADAPTER_RATE_TTL_S", "-1", "seconds >= 0"),
    (Target.PAYMENT_GATEWAY, "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S", "x", "positive number"),
    (Target.PAYMENT_GATEWAY, "PAYMENT_GATEWAY_OUTBOX_BATCH_ITEMS", "65", "whole number of rows"),
    (Target.PAYMENT_GATEWAY, "PAYMENT_GATEWAY_OUTBOX_BATCH_ITEMS", "0", "whole number of rows"),
    (Target.MERCHANT_AUTH, "MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "-3", "at least 1"),
    (Target.NOTIFICATION, "NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY", "0", "positive whole"),
    (Target.NOTIFICATION, "NOTIFICATION_SERVICE_WEBHOOK_POOLS", "0", "positive whole"),
    (Target.NOTIFICATION, "NOTIFICATION_SERVICE_WEBHOOK_POOLS", "lots", "positive whole"),
    (Target.NOTIFICATION, "NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S", "-4", "positive number"),
    (Target.SETTLEMENT, "SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S", "0", "positive number"),
    (Target.ORDER, RETENTION_VAR, "a week", "number of seconds of at least 86400"),
    (Target.ORDER, RETENTION_VAR, "3600", "number of seconds of at least 86400"),
    (Target.ORDER, PAGE_TOKEN_KEY_FILE_VAR, "/nonexistent/page.key", "cannot read"),
    (Target.ORDER, INSECURE_VAR, "yes", "is not 1 (plaintext, development only) or 0"),
    (Target.ORDER, INSECURE_VAR, "true", "is not 1 (plaintext, development only) or 0"),
    (Target.ORDER, INSECURE_VAR, "2", "is not 1 (plaintext, development only) or 0"),
    (Target.ORDER, "ORDER_SERVICE_MAX_IN_FLIGHT", "-5", "positive whole number"),
    (Target.MERCHANT_AUTH, auth_config.STALE_VAR, "later", "seconds >= 0"),
    (Target.MERCHANT_AUTH, "MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "ten", "at least 1"),
    (Target.NOTIFICATION, notification_config.RETRY_MAX_VAR, "1", "max_backoff_s"),
    (Target.RISK, "REDIS_URL", "http://cache:6379", "redis://[:password@]host:port/db"),
    (Target.MERCHANT_AUTH, "REDIS_URL", "redis://cache:port/0", "redis://[:password@]host"),
    (Target.CHANNEL_ADAPTER, "REDIS_KEY_PREFIX", "pay mesh", "allowed: 1-64 of"),
    (
        Target.NOTIFICATION,
        notification_config.SECRETS_KEY_FILE_VAR,
        "/nonexistent/secrets.key",
        "cannot read",
    ),
]

#: Every numeric setting a service reads, from the code's own tables: (service, variable,
#: what the message says is allowed). Each is tried with ``nan``, which parses as a float but
#: is no setting, so a missing range check shows as well as a missing parse check.
NUMERIC = [
    *(
        (Target.ORDER, f"ORDER_SERVICE_{item.name.upper()}", "is not a positive")
        for item in dataclasses.fields(ServerLimits)
    ),
    (Target.ORDER, RETENTION_VAR, "at least 86400"),
    (Target.ORDER, LEASE_VAR, "from 1 to 3600"),
    (Target.CHANNEL_ADAPTER, channel_config.RATE_TTL_VAR, "seconds >= 0"),
    (Target.MERCHANT_AUTH, auth_config.STALE_VAR, "seconds >= 0"),
    (Target.MERCHANT_AUTH, auth_config.CACHE_VAR, "seconds >= 0"),
    (Target.MERCHANT_AUTH, auth_config.VERIFIED_KEY_CACHE_VAR, "seconds >= 0"),
    *((Target.MERCHANT_AUTH, var, "at least") for var in auth_config.LIMIT_VARS.values()),
    *(
        (Target.NOTIFICATION, var, "must be a positive")
        for var in (
            notification_config.RETRY_INITIAL_VAR,
            notification_config.RETRY_MAX_VAR,
            notification_config.RETRY_HORIZON_VAR,
            notification_config.DELIVERY_SCAN_VAR,
            notification_config.DELIVERY_CONCURRENCY_VAR,
            notification_config.INLINE_WAIT_VAR,
            notification_config.WEBHOOK_POOLS_VAR,
            notification_config.WEBHOOK_KEEPALIVE_VAR,
        )
    ),
    *(
        (Target.PAYMENT_GATEWAY, var, "positive number of seconds")
        for var in gateway_config._VARIABLES.values()
    ),
    (Target.PAYMENT_GATEWAY, gateway_config.OUTBOX_BATCH_ITEMS_VAR, "whole number of rows"),
    (Target.PAYMENT_GATEWAY, gateway_config.OUTBOX_GATHER_VAR, "from 0 to the outbox interval"),
    (Target.SETTLEMENT, "SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S", "positive number of seconds"),
    (Target.WITHDRAWAL, "WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_GRACE_S", "number of seconds >= 0"),
    (Target.ORDER, "PAYMESH_TLS_RELOAD_S", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_READINESS_INTERVAL_S", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_HEALTHZ_MAX_LAG_S", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_ACCESS_LOG_SAMPLE", "fraction from 0 to 1"),
]
#: Settings of ``services/<name>/config.py`` that name a file, not a number (tested apart).
FILE_SETTINGS = {
    notification_config.SECRETS_KEY_FILE_VAR,
    PEPPER_FILE_VAR,
}


def _start(
    name: Target, variable: str, value: str, tmp_path: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Start the service as ``make run`` would, its own ports ephemeral, one variable bad."""
    spec = next(s for s in SERVICES if s.name == name)
    prefix = env_prefix(name)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "gen"))),
        "PAYMESH_PKI_DIR": str(servers.test_pki_dir()),
        "PAYMESH_VAR_DIR": str(tmp_path),
        "OTEL_TRACES_EXPORTER": "none",
        f"{prefix}_ADDR": "127.0.0.1:0",
        f"{prefix}_ADMIN_ADDR": "127.0.0.1:0",
    }
    if spec.public_port is not None:
        environ[f"{prefix}_PUBLIC_ADDR"] = "127.0.0.1:0"
    environ.update(extra)
    environ[variable] = value
    return subprocess.run(
        [sys.executable, "-m", spec.module],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # a process that starts serving instead never exits: the test fails
        check=False,
    )


def _refusal(result: subprocess.CompletedProcess[str], name: Target) -> str:
    """The one ``cannot start`` line of a process that refused to start (the test fails
    on anything else: another exit code, a traceback, a second line, serving)."""
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "PAYMESH_READY" not in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert line.startswith(f"{name}: cannot start: "), line
    return line


@pytest.mark.parametrize(
    ("name", "variable", "value", "allowed"),
    CASES,
    ids=[f"{variable}={value}" for _, variable, value, _ in CASES],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(
    name: Target, variable: str, value: str, allowed: str, tmp_path: Path
) -> None:
    line = _refusal(_start(name, variable, value, tmp_path), name)
    assert variable in line, line
    assert value in line, line
    assert allowed in line, line


@pytest.mark.parametrize(
    ("name", "variable", "allowed"), NUMERIC, ids=[variable for _, variable, _ in NUMERIC]
)
def test_every_numeric_setting_refuses_nan_with_one_line_naming_it(
    name: Target, variable: str, allowed: str, tmp_path: Path
) -> None:
    line = _refusal(_start(name, variable, "nan", tmp_path), name)
    assert f"{variable}='nan'" in line, line
    assert allowed in line, line


def test_the_table_holds_every_setting_the_service_configs_define() -> None:
    config_files = sorted((ROOT / "services").glob("*/config.py"))
    defined = {
        match
        for path in config_files
        for match in re.findall(r'^[A-Z_]+_VAR = "([A-Z_]+)"', path.read_text(), re.MULTILINE)
    }
    assert len(config_files) >= 4 and defined
    assert defined - FILE_SETTINGS <= {variable for _, variable, _ in NUMERIC}


def test_a_page_token_key_file_too_short_stops_start_up_naming_the_variable(
    tmp_path: Path,
) -> None:
    key = tmp_path / "page.key"
    key.write_text("short")
    line = _refusal(_start(Target.ORDER, PAGE_TOKEN_KEY_FILE_VAR, str(key), tmp_path), Target.ORDER)
    assert f"{PAGE_TOKEN_KEY_FILE_VAR}={str(key)!r}" in line, line
    assert "at least 32 needed" in line, line


def test_half_a_tls_identity_stops_start_up_naming_the_three_files(tmp_path: Path) -> None:
    result = _start(Target.ORDER, CA_FILE_VAR, "/nonexistent/ca.pem", tmp_path)
    line = _refusal(result, Target.ORDER)
    assert f"{CA_FILE_VAR}, {CERT_FILE_VAR} and {KEY_FILE_VAR}" in line, line
    assert f"{CA_FILE_VAR}='/nonexistent/ca.pem' but not {CERT_FILE_VAR} or {KEY_FILE_VAR}" in line


def test_two_of_three_tls_files_name_the_two_set_and_the_one_missing(tmp_path: Path) -> None:
    result = _start(
        Target.ORDER, CERT_FILE_VAR, "/x/cert.pem", tmp_path, **{KEY_FILE_VAR: "/x/key.pem"}
    )
    line = _refusal(result, Target.ORDER)
    given = f"{CERT_FILE_VAR}='/x/cert.pem', {KEY_FILE_VAR}='/x/key.pem' but not {CA_FILE_VAR}"
    assert given in line, line


@pytest.mark.parametrize(("value", "plaintext"), [("1", True), ("0", False), ("", False)])
def test_insecure_takes_1_for_plaintext_and_0_or_unset_for_tls(value: str, plaintext: bool) -> None:
    assert tls.plaintext_requested({INSECURE_VAR: value}) is plaintext
    assert tls.plaintext_requested({}) is False


def test_a_postgresql_database_that_is_down_stops_start_up_with_one_line(tmp_path: Path) -> None:
    url = f"postgresql://paymesh:hunter2@127.0.0.1:{free_port()}/paymesh"
    result = _start(Target.ORDER, "DATABASE_URL", url, tmp_path)
    assert result.returncode == 1, result.stderr  # not a bad setting: the supervisor retries
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert line.startswith(f"{Target.ORDER}: cannot start: its database: "), line
    assert "hunter2" not in result.stderr
