"""Structured logging (structlog) for every KME process.

JSON lines when stderr is not a terminal (a file, a pipe, journald, a container runtime: what log
shippers parse), a readable console layout on one; ``[logging] format`` or ``qkms serve
--log-format`` forces either. Library loggers (uvicorn, alembic) go through the same renderer, so a
JSON log holds no plain line. Each line starts with ``timestamp``, ``level`` and ``event``; lines
written while an API request is served also carry its ``request_id`` and caller
(``kms.api.request_log``, bound with structlog's contextvars). Events carry IDs, counts and outcomes,
never key material (docs/OPERATIONS.md "Logs", DECISIONS.md D-37).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Literal

import structlog
from structlog.types import EventDict, Processor

LogFormat = Literal["auto", "json", "console"]
_FIRST = ("timestamp", "level", "event", "request_id")


def resolve_format(fmt: str, stream: IO[str]) -> Literal["json", "console"]:
    """``auto``: console on a terminal, JSON anywhere else."""
    if fmt == "json":
        return "json"
    if fmt == "console":
        return "console"
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


# One encoder for every line: ``json.dumps`` with arguments builds a new one per call (about 10 us of
# the ~25 us a line would cost; a request line is on the delivery hot path).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=repr)
_second: list[Any] = [-1, ""]  # the current UTC second and its ISO 8601 text


def add_timestamp(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """``timestamp``: UTC, ISO 8601, microseconds (``2026-12-05T20:55:20.715827Z``); the text of the
    second is formatted once per second (structlog's TimeStamper takes ~6 us a line, this ~0.5)."""
    ns = time.time_ns()
    sec, rest = divmod(ns, 1_000_000_000)
    cached = _second
    if cached[0] != sec:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        cached[0] = sec
    event_dict["timestamp"] = f"{cached[1]}.{rest // 1000:06d}Z"
    return event_dict


def render_json(_: Any, __: str, event_dict: EventDict) -> str:
    """One compact JSON object; ``timestamp``, ``level``, ``event`` and ``request_id`` first."""
    ordered = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    ordered.update(event_dict)
    return _ENCODER.encode(ordered)


def configure_logging(level: str = "info", fmt: str = "auto") -> Literal["json", "console"]:
    """Configure structlog and the standard library's root logger for this process; returns the
    format chosen."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    chosen = resolve_format(fmt, sys.stderr)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
    ]
    if chosen == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer: Processor = render_json
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # httpx logs every request it sends at info: one line per peer message, which the peer's own
    # request line and qkms_peer_requests_total already cover. Shown at debug.
    quiet = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(quiet)
    return chosen
