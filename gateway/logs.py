"""Operational logs: structured JSON lines on stdout (journald picks them up).

Log lines say what the gateway is doing; they never contain payload bytes or
patient data (document names and contents belong only in the audit trail).
The logger is built here and passed down; nothing configures a global logger.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from gateway.textbounds import MAX_TEXT, bounded

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

Logger = Any  # structlog's BoundLogger is dynamically typed


# A traceback (the "exception" field) may be longer than other values, but not unbounded.
MAX_TRACEBACK = 16_000


def _bounded(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """Every value of a line bounded (gateway.textbounds): a peer's input cannot make a
    log line megabytes long."""
    return {
        key: bounded(value, limit=MAX_TRACEBACK if key == "exception" else MAX_TEXT)
        for key, value in event.items()
    }


def make_logger(level: str = "info", stream: TextIO | None = None) -> Logger:
    return structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _bounded,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        cache_logger_on_first_use=False,
    ).bind(service="medgw")
