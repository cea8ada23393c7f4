"""``[runtime]``: timing, sizes, retries and the log level."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.httpbody import BODY_IDLE_SECONDS, BODY_MIN_BYTES_PER_SECOND
from gateway.tomlreader import Section

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Runtime:
    shutdown_deadline_seconds: float
    outbox_poll_seconds: float
    retry_initial_seconds: float
    retry_max_seconds: float
    connect_timeout_seconds: float
    request_timeout_seconds: float
    max_message_bytes: int
    message_expiry_seconds: float
    max_attempts: int
    log_level: str
    # A peer's request body may pause at most body_idle_seconds, and must average at
    # least body_min_bytes_per_second after that long (gateway.httpbody).
    body_idle_seconds: float = BODY_IDLE_SECONDS
    body_min_bytes_per_second: float = BODY_MIN_BYTES_PER_SECOND


def load_runtime(root: Section) -> Runtime:
    """The optional ``[runtime]`` table; every key has a default."""
    rt = root.table("runtime", required=False)
    runtime = Runtime(
        shutdown_deadline_seconds=rt.number("shutdown_deadline_seconds", default=20, minimum=1),
        outbox_poll_seconds=rt.number("outbox_poll_seconds", default=1.0, minimum=0.05),
        retry_initial_seconds=rt.number("retry_initial_seconds", default=10, minimum=0.1),
        retry_max_seconds=rt.number("retry_max_seconds", default=900, minimum=1),
        connect_timeout_seconds=rt.number("connect_timeout_seconds", default=15, minimum=0.5),
        request_timeout_seconds=rt.number("request_timeout_seconds", default=600, minimum=1),
        max_message_bytes=int(
            rt.number("max_message_bytes", default=4 * 1024**3, minimum=1024, maximum=2**40)
        ),
        message_expiry_seconds=rt.number("message_expiry_seconds", default=72 * 3600, minimum=60),
        max_attempts=rt.integer("max_attempts", default=200, minimum=1, maximum=100_000),
        log_level=rt.choice("log_level", LOG_LEVELS, default="info"),
        body_idle_seconds=rt.number(
            "body_idle_seconds", default=BODY_IDLE_SECONDS, minimum=1, maximum=3600
        ),
        body_min_bytes_per_second=rt.number(
            "body_min_bytes_per_second", default=BODY_MIN_BYTES_PER_SECOND, minimum=1
        ),
    )
    rt.finish()
    return runtime
