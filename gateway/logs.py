"""Operational logs: structured JSON lines on stdout (journald picks them up).

Log lines say what the gateway is doing; they never contain payload bytes or
patient data (document names and contents belong only in the audit trail).
The logger is built here and passed down; nothing configures a global logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

Logger = Any  # structlog's BoundLogger is dynamically typed


def make_logger(level: str = "info", stream: TextIO | None = None) -> Logger:
    return structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        cache_logger_on_first_use=False,
    ).bind(service="medgw")
