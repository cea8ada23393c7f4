"""The demo hospital's AS2 listener run in the test's own event loop, on a free port of
127.0.0.1, requiring a client certificate from the demo CA."""

from __future__ import annotations

import io
import ssl
from dataclasses import replace
from typing import Any

from gateway.audit import AuditSink
from gateway.channel.server import As2Server, RequestHandler
from gateway.clock import Clock
from gateway.config import load_config
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout


def hospital_listener(
    layout: DemoLayout,
    handler: RequestHandler,
    audit: AuditSink,
    clock: Clock,
    log: io.StringIO | None = None,
    **limits: Any,
) -> As2Server:
    """``handler`` answers the requests; ``log`` collects the JSON log lines (none:
    dropped); ``limits`` are As2Server's (``max_handshakes``, ...)."""
    config = load_config(layout.hospital.config_path)
    certs = layout.hospital.root / "certs"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(layout.ca_certificate)
    listener = replace(config.listeners[0], address="127.0.0.1", port=0)
    return As2Server(
        listener,
        lambda: context,
        handler,
        audit,
        make_logger("info", log if log is not None else io.StringIO()),
        1 << 20,
        clock,
        **limits,
    )
