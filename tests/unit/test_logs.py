"""Log lines as text (the default) or one JSON object per line; bad settings name the variable."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from services.mesh.logs import (
    GRPC_SERVER_LOGGER,
    LogConfigError,
    WatcherGoneFilter,
    access_log_sample,
    configure,
    log_format_name,
)


@pytest.fixture
def root_restored() -> Iterator[None]:
    """``configure`` replaces the root handlers (pytest's too): put them back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _lines(environ: dict[str, str], emit: Callable[[], None]) -> list[str]:
    stream = io.StringIO()
    configure("order-service", environ, level="INFO", stream=stream)
    emit()
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("root_restored")
def test_text_is_the_default_format() -> None:
    (line,) = _lines({}, lambda: logging.getLogger("paymesh.test").info("hello %s", "there"))

    assert " order-service INFO paymesh.test trace_id=-: hello there" in line


@pytest.mark.usefixtures("root_restored")
def test_json_writes_one_object_per_line_with_the_fields_shippers_read() -> None:
    (line,) = _lines(
        {"PAYMESH_LOG_FORMAT": "JSON"},
        lambda: logging.getLogger("paymesh.test").warning("stock is %d", 3),
    )

    record = json.loads(line)
    assert record == {
        "time": record["time"],
        "level": "WARNING",
        "service": "order-service",
        "trace_id": None,  # outside a trace
        "logger": "paymesh.test",
        "method": None,
        "code": None,
        "duration_ms": None,
        "message": "stock is 3",
    }
    assert datetime.fromisoformat(record["time"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


@pytest.mark.usefixtures("root_restored")
def test_json_carries_the_access_fields_and_an_exception_as_one_string() -> None:
    def emit() -> None:
        access = logging.getLogger("paymesh.access")
        access.info("rpc", extra={"method": "/a.B/C", "code": "NOT_FOUND", "duration_ms": 1.5})
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            logging.getLogger("paymesh.test").exception("failed")

    access, failure = (json.loads(line) for line in _lines({"PAYMESH_LOG_FORMAT": "json"}, emit))

    assert (access["method"], access["code"], access["duration_ms"]) == ("/a.B/C", "NOT_FOUND", 1.5)
    assert failure["message"] == "failed"
    assert "RuntimeError: boom\nsecond line" in failure["exception"]


@pytest.mark.parametrize("value", ["xml", "logfmt", "1"])
def test_an_unknown_log_format_names_the_variable_and_the_choices(value: str) -> None:
    with pytest.raises(LogConfigError, match=r"PAYMESH_LOG_FORMAT=.*one of text, json"):
        log_format_name({"PAYMESH_LOG_FORMAT": value})


def test_the_access_sample_is_a_fraction_defaulting_to_none() -> None:
    assert access_log_sample({}) == 0.0
    assert access_log_sample({"PAYMESH_ACCESS_LOG_SAMPLE": "0.01"}) == 0.01


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "often"])
def test_an_access_sample_outside_0_to_1_names_the_variable(value: str) -> None:
    with pytest.raises(LogConfigError, match="PAYMESH_ACCESS_LOG_SAMPLE"):
        access_log_sample({"PAYMESH_ACCESS_LOG_SAMPLE": value})


def _grpc_record(message: str, method: str) -> logging.LogRecord:
    """A record as grpc.aio's server logs a handler's failure (its message and argument)."""
    return logging.LogRecord(
        GRPC_SERVER_LOGGER, logging.ERROR, "server.pyx.pxi", 1, message, (method,), None
    )


@pytest.mark.parametrize(
    "message",
    [
        "ExecuteBatchError raised in core by servicer method [%s]",
        "Exception not handled by _handle_exceptions in servicer method [%s]",
    ],
)
@pytest.mark.usefixtures("root_restored")
def test_a_health_watcher_leaving_at_stop_writes_no_traceback(message: str) -> None:
    stream = io.StringIO()
    configure("order-service", {}, level="INFO", stream=stream)
    logger = logging.getLogger(GRPC_SERVER_LOGGER)
    logger.handle(_grpc_record(message, "/grpc.health.v1.Health/Watch"))
    # The same report of any other method is a failure worth its traceback.
    logger.handle(_grpc_record(message, "/paymesh.order.v1.OrderService/GetOrder"))
    logger.handle(_grpc_record("Unexpected [%s]", "/grpc.health.v1.Health/Watch"))
    written = stream.getvalue()
    assert "Health/Watch]" in written and "Unexpected" in written
    assert "OrderService/GetOrder" in written
    assert written.count("servicer method") == 1


@pytest.mark.usefixtures("root_restored")
def test_the_watcher_filter_is_added_once() -> None:
    configure("order-service", {}, level="INFO", stream=io.StringIO())
    configure("order-service", {}, level="INFO", stream=io.StringIO())
    filters = logging.getLogger(GRPC_SERVER_LOGGER).filters
    assert sum(isinstance(f, WatcherGoneFilter) for f in filters) == 1
