"""``python -m tests.audit_writer``: append records to an audit trail with rotation on.

For crash tests: run under tests/faultpoint.py, it is killed at a named step of a
rotation; the test then opens the trail again in-process and checks what is there.
Each record is ``message.sent`` with ``message_id`` ``<N@writer>``; time moves one
second per record from ``--start``, so that size rotation is never held back by
the one-rotation-a-second rule.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.rotation import RotationSettings
from gateway.audit.seal import Sealer, SealSettings


class StepClock:
    """Each ``now()`` one second after the last."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def now(self) -> datetime:
        self.at += timedelta(seconds=1)
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()

    def boottime(self) -> float:
        return self.monotonic()


def sealer(key: Path, cert: Path, every: int = 1000) -> Sealer:
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    return Sealer(SealSettings(private, certificate, every_records=every))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("--first", type=int, default=0, help="the first record's number N")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rotate-bytes", type=int, required=True)
    parser.add_argument("--start", type=datetime.fromisoformat, required=True)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--cert", type=Path)
    args = parser.parse_args()
    seal = sealer(args.key, args.cert) if args.key else None
    log = AuditLog(
        args.path,
        StepClock(args.start),
        node="HOSP",
        sealer=seal,
        rotation=RotationSettings(args.rotate_bytes, daily=False),
    )
    for n in range(args.first, args.first + args.count):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@writer>"))
    log.close()


if __name__ == "__main__":
    main()
