"""The mesh console in a real browser: ``make run``'s launcher serves it, headless Chromium shows
an edge's breaker open while its target fails (``/faults``), then closed once it is healed.

merchant-auth-service calls merchant-service on every IssueApiKey; the policy file gives that
edge a small breaker window and a short open time, so it opens after a few failed calls and
closes on the first good trial after the fault is removed. The page is only read through its
DOM (``data-edge``, ``data-tile``, ``data-breaker``), polled with deadlines; a screenshot of it
with the breaker open is left in ``var/console.png``.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from services.mesh.admin_token import FAULT_INJECTION_VAR, admin_authorization
from services.mesh.tls import operator_security
from services.tools.launcher import ephemeral_environ
from tests.chaos.launched import LaunchedMesh
from tests.integration.harness import poll_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "var" / "console.png"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CALLER, DOWNSTREAM = "merchant-auth-service", "merchant-service"
EDGE = f"{CALLER}->{DOWNSTREAM}"
#: What stays restarted for the members table (a leaf: nothing else depends on it to start).
VICTIM = "analytics-service"
#: Long enough that the page's figures and its screenshot are taken while it is still open.
OPEN_S = 8.0
POLICY = f"""
[targets."{DOWNSTREAM}"]
timeout_s = 0.5

[targets."{DOWNSTREAM}".retry]
max_attempts = 1

[targets."{DOWNSTREAM}".breaker]
minimum_calls = 3
failure_rate = 0.5
window_s = 60.0
open_s = {OPEN_S}
half_open_calls = 1
"""
#: Every call of merchant-service fails; its health (another service) stays SERVING.
FAULT = [{"method": "/paymesh.merchant.v1.MerchantService/*", "abort_code": "UNAVAILABLE"}]
#: Chromium as a test wants it: no window, no network of its own, nothing from before.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1400",
)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedMesh]:
    var_dir = tmp_path_factory.mktemp("console-mesh")
    policy = var_dir / "policy.toml"
    policy.write_text(POLICY)
    environ = ephemeral_environ()
    environ.update({"PAYMESH_POLICY_FILE": str(policy), FAULT_INJECTION_VAR: "1"})
    mesh = LaunchedMesh(environ, var_dir)
    mesh.start(timeout_s=180)
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} missing (Debian: apt-get install chromium "
            "chromium-driver; .ci/run installs them)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # The system's chromedriver, so Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _console_url(mesh: LaunchedMesh) -> str:
    """The console's address as the launcher printed it in its start output."""
    line = poll_until(
        "the launcher to print the console's address",
        lambda: next(
            (x for x in mesh.log_path.read_text().splitlines() if x.startswith("mesh console:")),
            None,
        ),
        timeout_s=30,
    )
    return str(line.split(": ", 1)[1].strip())


def _admin(mesh: LaunchedMesh, method: str, body: object = None) -> None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://{mesh.mesh.topology.admin_address(DOWNSTREAM)}/faults",
        data=data,
        method=method,
        headers={**admin_authorization(mesh.environ), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200


def _issue_api_key(mesh: LaunchedMesh) -> None:
    """One call through the edge; whether it fails is the point, so its outcome is ignored."""
    address = mesh.mesh.topology.address(CALLER)
    with operator_security(mesh.environ).sync_channel(CALLER, address) as channel:
        stub = merchant_auth_pb2_grpc.MerchantAuthServiceStub(channel)
        request = merchant_auth_pb2.IssueApiKeyRequest(
            request_id=str(uuid.uuid4()), merchant_id="m_1", label="console"
        )
        with contextlib.suppress(grpc.RpcError):
            stub.IssueApiKey(request, timeout=5)


def _shown(driver: Any, selector: str, attribute: str) -> str | None:
    value = driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? e.getAttribute(arguments[1]) : null;",
        selector,
        attribute,
    )
    return None if value is None else str(value)


def _breaker_shown(driver: Any) -> tuple[str | None, str | None]:
    """The edge's breaker as the graph line and as its tile say it."""
    return (
        _shown(driver, f'line[data-edge="{EDGE}"]', "data-breaker"),
        _shown(driver, f'[data-tile="{EDGE}"]', "data-breaker"),
    )


@pytest.fixture(scope="module")
def page(launched: LaunchedMesh, browser: Any) -> Any:
    browser.get(_console_url(launched))
    poll_until(
        "the page to draw the eleven services",
        lambda: (
            browser.execute_script(
                "return document.querySelectorAll('[data-node][data-health=\"serving\"]').length"
            )
            >= 11
        ),
        timeout_s=60,
    )
    return browser


def test_the_page_shows_an_open_breaker_then_closed_once_the_fault_is_removed(
    launched: LaunchedMesh, page: Any
) -> None:
    # No call crossed the edge yet: its breaker is made on first use, so none or closed.
    assert _breaker_shown(page)[0] in {"none", "closed"}
    _admin(launched, "PUT", FAULT)
    try:

        def shown_open() -> bool:
            _issue_api_key(launched)  # keeps it failing, so it stays (or opens again) open
            return _breaker_shown(page) == ("open", "open")

        poll_until(f"the page to show {EDGE} open", shown_open, timeout_s=90)
        assert _shown(page, "#summary", "data-open-breakers") == "1"
        assert page.execute_script(
            f"return document.querySelector('[data-tile=\"{EDGE}\"]').textContent"
        ).count("s left")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert page.save_screenshot(str(SCREENSHOT))
        errors = page.execute_script(
            f"return document.querySelector('#errors [data-error=\"{EDGE}\"]')?.textContent"
        )
        assert errors and "merchant-service" in errors  # with its time, and what failed
    finally:
        _admin(launched, "DELETE")

    def shown_closed() -> bool:
        _issue_api_key(launched)  # the trial call that closes it once its open time is over
        return _breaker_shown(page) == ("closed", "closed")

    poll_until(f"the page to show {EDGE} closed again", shown_closed, timeout_s=OPEN_S + 90)


def test_the_members_table_shows_a_restart(launched: LaunchedMesh, page: Any) -> None:
    launched.kill(VICTIM)
    comeback = launched.wait_back(VICTIM, 60.0)
    assert comeback.serving_after_s is not None, comeback

    def restart_shown() -> bool:
        row = page.execute_script(
            f"return document.querySelector('[data-member=\"{VICTIM}\"]')?.textContent || ''"
        )
        return "SIGKILL" in row

    poll_until("the members table to show the restart", restart_shown, timeout_s=30)


def test_the_page_needs_nothing_but_the_console(page: Any) -> None:
    resources = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    origin = page.execute_script("return location.origin")
    assert resources and all(name.startswith(origin) for name in resources), resources
