"""A bad setting stops a real service process with one line naming it, and exit code 2.

Each case starts ``python -m services.<name>`` with one variable set to a bad value: the
process must exit with ``EXIT_CONFIG`` before serving, print exactly one ``cannot start``
line naming the variable, its value and what is allowed, and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.mesh.bootstrap import EXIT_CONFIG
from services.mesh.topology import SERVICES, Target, env_prefix
from tests import servers

ROOT = Path(__file__).resolve().parents[2]

#: (service, variable, bad value, a fragment of what the message says is allowed).
CASES = [
    (Target.ORDER, "ORDER_SERVICE_ADMIN_ADDR", "nonsense", "is not host:port"),
    (Target.ORDER, "ORDER_SERVICE_ADMIN_ADDR", "127.0.0.1:99999", "outside 0-65535"),
    (Target.ORDER, "PAYMESH_GRACE_S", "soon", "number of seconds >= 0"),
    (Target.ORDER, "PAYMESH_GRACE_S", "-1", "number of seconds >= 0"),
    (Target.ORDER, "PAYMESH_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (Target.ORDER, "PAYMESH_TLS_RELOAD_S", "0", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_READINESS_INTERVAL_S", "often", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_HEALTHZ_MAX_LAG_S", "-2", "positive number of seconds"),
    (Target.ORDER, "PAYMESH_REFLECTION", "maybe", "0 (off) or 1 (on"),
    (Target.ORDER, "ORDER_SERVICE_ADDR", "order:port", "is not host:port"),
    (Target.ORDER, "ORDER_SERVICE_MAX_IN_FLIGHT", "many", "positive whole number"),
    (Target.ORDER, "ORDER_SERVICE_DATABASE_URL", "postgres://db/orders", "sqlite:///path"),
    (Target.ORDER, "PAYMESH_POLICY_FILE", "/nonexistent/policy.toml", "cannot read"),
    (Target.ORDER, "PARTNER_SANDBOX_ADDR", "sandbox", "is not host:port"),
    (Target.ORDER, "GEO_IP_PARTNER_URL", "ftp://geo", "http:// or https://"),
    (Target.ORDER, "ODER_SERVICE_ADDR", "127.0.0.1:1", "names no service or partner"),
    (Target.ORDER, "PAYMESH_FAULT_INJECTION", "1", "PAYMESH_ADMIN_TOKEN_FILE"),
    (Target.CHANNEL_ADAPTER, "CHANNEL_ADAPTER_RATE_TTL_S", "-1", "seconds >= 0"),
    (Target.PAYMENT_GATEWAY, "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S", "x", "positive number"),
    (Target.MERCHANT_AUTH, "MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "-3", "at least 1"),
    (Target.NOTIFICATION, "NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY", "0", "positive whole"),
    (Target.SETTLEMENT, "SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S", "0", "positive number"),
]


def _start(
    name: Target, variable: str, value: str, tmp_path: Path
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


@pytest.mark.parametrize(
    ("name", "variable", "value", "allowed"),
    CASES,
    ids=[f"{variable}={value}" for _, variable, value, _ in CASES],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(
    name: Target, variable: str, value: str, allowed: str, tmp_path: Path
) -> None:
    result = _start(name, variable, value, tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "PAYMESH_READY" not in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert line.startswith(f"{name}: cannot start: "), line
    assert variable in line, line
    assert value in line, line
    assert allowed in line, line


def test_half_a_tls_identity_stops_start_up_naming_the_three_files(tmp_path: Path) -> None:
    result = _start(Target.ORDER, "PAYMESH_TLS_CA_FILE", "/nonexistent/ca.pem", tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert "PAYMESH_TLS_CA_FILE, PAYMESH_TLS_CERT_FILE and PAYMESH_TLS_KEY_FILE" in line, line
