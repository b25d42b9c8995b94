"""How every PayMesh process logs: one line per record, as text (the default) or as one JSON
object per line (``PAYMESH_LOG_FORMAT=json``) for log shippers, and which successful calls
the access log writes (``PAYMESH_ACCESS_LOG_SAMPLE``; errors are always written).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from services.mesh.tracing import TraceIdFilter, log_format

FORMAT_VAR = "PAYMESH_LOG_FORMAT"
#: Names ``PAYMESH_LOG_FORMAT`` may take; the first is the default.
LOG_FORMATS = ("text", "json")
ACCESS_SAMPLE_VAR = "PAYMESH_ACCESS_LOG_SAMPLE"

#: Fields of an access-log line (``extra=`` of the record); null on every other line.
ACCESS_FIELDS = ("method", "code", "duration_ms")


class LogConfigError(ValueError):
    """A logging variable has a value it cannot take; the message names it."""


def log_format_name(environ: Mapping[str, str]) -> str:
    """``PAYMESH_LOG_FORMAT`` (any case), default ``text``.

    Raises:
        LogConfigError: it names no format.
    """
    raw = environ.get(FORMAT_VAR, "")
    name = raw.strip().lower() or LOG_FORMATS[0]
    if name not in LOG_FORMATS:
        raise LogConfigError(f"{FORMAT_VAR}={raw!r} is not a log format; one of text, json")
    return name


def access_log_sample(environ: Mapping[str, str]) -> float:
    """``PAYMESH_ACCESS_LOG_SAMPLE``: the fraction (0-1) of successful calls logged at INFO.

    0, the default, logs none of them (they cost CPU on every call); at ``DEBUG`` every one is.

    Raises:
        LogConfigError: it is not a number from 0 to 1.
    """
    raw = environ.get(ACCESS_SAMPLE_VAR, "")
    try:
        rate = float(raw.strip() or "0")
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:  # also false for NaN
        raise LogConfigError(
            f"{ACCESS_SAMPLE_VAR}={raw!r} is not a fraction from 0 to 1 (example: 0.01)"
        )
    return rate


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601 UTC), level, service, trace_id, logger,
    method, code, duration_ms (null but on access-log lines), message, and exception."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        trace_id = getattr(record, "trace_id", None)
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            # TraceIdFilter's "-" (outside a trace) reads as null here, as a shipper expects.
            "trace_id": None if trace_id in (None, "-") else trace_id,
            "logger": record.name,
            **{name: getattr(record, name, None) for name in ACCESS_FIELDS},
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a record's extra may hold anything; a log line must never raise.
        return json.dumps(line, default=str, ensure_ascii=False)


#: The logger grpc.aio's server reports its handlers' failures on.
GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"
#: The health watch stream: a watcher that goes away while the server stops is normal.
_WATCH = "[/grpc.health.v1.Health/Watch]"
#: grpc.aio's words for a stream whose peer or event loop went first (its traceback says
#: nothing more): the status could not be sent to a watcher that had cancelled, or the
#: closing loop cancelled a handler still waiting.
_WATCH_GONE = ("ExecuteBatchError raised in core", "Exception not handled by _handle_exceptions")


class WatcherGoneFilter(logging.Filter):
    """Drops grpc.aio's traceback for a health watcher that left as the server stopped.

    A grpc.health.v1 ``Watch`` stream lives as long as its watcher; during a graceful stop
    the watcher (a kubelet, a balancer's health check) and the stopping server race to end
    it, and whichever way the race goes grpc.aio logs an ERROR with a traceback although
    nothing failed. Any other method's report, and any other report of ``Watch``, passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (_WATCH in message and message.startswith(_WATCH_GONE))


def formatter(service: str, format_name: str) -> logging.Formatter:
    """The formatter of ``format_name`` (``text`` or ``json``) for process ``service``."""
    if format_name == "json":
        return JsonFormatter(service)
    return logging.Formatter(log_format(service))


def configure(
    service: str, environ: Mapping[str, str], *, level: str, stream: TextIO | None = None
) -> None:
    """Replace the root handlers with one writing ``service``'s records to ``stream``
    (stderr), in the format ``PAYMESH_LOG_FORMAT`` names, each with its trace id.

    Raises:
        LogConfigError: ``PAYMESH_LOG_FORMAT`` names no format.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(service, log_format_name(environ)))
    handler.addFilter(TraceIdFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    grpc_server = logging.getLogger(GRPC_SERVER_LOGGER)
    if not any(isinstance(f, WatcherGoneFilter) for f in grpc_server.filters):
        grpc_server.addFilter(WatcherGoneFilter())
