"""CPU per audit record: the daemon's audit sinks and log, against a floor, in one run.

Run:  .venv/bin/python bench/audit_emit_bench.py [--records 20000] [--rounds 5]
      .venv/bin/python bench/audit_emit_bench.py --callgrind [--records 500]

Each round writes ``--records`` records of the shapes the pipelines write per
message (``message.accepted``, ``message.sent``, ``receipt.received`` at the
sender; ``message.received``, ``message.delivered``, ``receipt.sent`` at the
receiver; the same fields and detail as the pipelines fill) through the sinks
the daemon puts around its audit log (gateway.daemon.lifecycle: the metrics'
count, whom to call on an alert, the emergency mark) into a real
``AuditLog`` in a temporary folder, with the daemon's default rotation
settings.  Each record is emitted on its own (``emit``), as most steps do.

The log's fsync is the real one with ``--fsync``; by default it does nothing,
so that the figure is the Python work per record and not the disk (the fsync
scheme is not what this measures).

Export on: the audit export (gateway.audit.export) reads every record back
from the log, checks its chain link and formats it as an ATNA message in a
syslog frame: the same functions the exporter's worker thread runs, timed over
the records just written (the TLS write to the collector is left out).

Patients: the identifiers read from a 4 KiB HL7 v2 message
(gateway.audit.patients), as for every document's ``message.accepted`` and
``message.received`` records; per document.

Floor, measured in the same run: per record, ``json.dumps`` of the record as
written (sorted keys, compact) and one SHA-256 of it: what any hash-chained
JSON line costs at least.

CPU is ``time.process_time`` (user + system of this process), the best of the
rounds.  With ``--callgrind`` the same work is counted in instructions instead
(deterministic whatever else the machine runs): the script runs itself once
under ``valgrind --tool=callgrind --dump-before=os_getppid``, and calls
``os.getppid()`` between the parts (build the events; emit them; read them
back; the floor; the export; the patients), so that callgrind writes each part's count
apart; the cost of such a boundary, measured alone, is taken off each.  Use a
small ``--records`` there (the default, 500: a few minutes).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.alerts import AlertCalls
from gateway.audit import AuditEvent, AuditLog, AuditSink, EventType, PatientId
from gateway.audit.export.atna import atna_message
from gateway.audit.export.cursor import Position, read_forward
from gateway.audit.export.record import Source, describe
from gateway.audit.export.syslog import octet_counted, syslog_message
from gateway.audit.patients import patients_in
from gateway.audit.rotation import RotationSettings
from gateway.config.emergency import EmergencySettings
from gateway.daemon.observe import Observer
from gateway.emergency.mode import EmergencyMode, MarkingSink
from gateway.logs import make_logger

NODE = "KITA-LAB-1"
PEER = "sakura-hospital"
LAB = "kita-lab"


class StepClock:
    """Wall time moving 137 us per call, within one UTC day (no daily rotation)."""

    def __init__(self) -> None:
        self.at = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self.at += timedelta(microseconds=137)
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()

    def boottime(self) -> float:
        return self.monotonic()


def shapes(n: int) -> list[AuditEvent]:
    """The six records of one message's life, sender's and receiver's, for message ``n``."""
    message_id = f"<{n:08d}.{n * 7919:012x}@kita-lab.example>"
    filename = f"order-{n:06d}.hl7"
    digest = hashlib.sha256(message_id.encode()).hexdigest()
    mic = "Qm9ndXMgbWljIGZvciBiZW5jaA0KAAAAAAAAAAAAAAA=, sha-256"
    signer = "CN=sakura-hospital AS2 signing,O=Sakura Hospital,C=JP"
    patients = (PatientId("P-102938", "hl7v2", "1.2.392.200119.6.102.11310", "MR"),)

    def outbound(kind: EventType, **fields: Any) -> AuditEvent:
        return AuditEvent(kind, peer=PEER, message_id=message_id, direction="outbound", **fields)

    def inbound(kind: EventType, **fields: Any) -> AuditEvent:
        return AuditEvent(
            kind, peer="kita-lab", message_id=message_id, direction="inbound", **fields
        )

    return [
        outbound(
            EventType.MESSAGE_ACCEPTED,
            service="lab-results",
            actor="outbox:kita-lab (uid 1001)",
            patient_ids=patients,
            detail={
                "filename": filename,
                "content_type": "application/hl7-v2",
                "size": 4096,
                "mic": mic,
                "sha256": digest,
                "cipher": "aes256-gcm",
                "digest": "sha256",
                "key_transport": "rsaes-oaep",
            },
        ),
        outbound(
            EventType.MESSAGE_SENT,
            service="lab-results",
            detail={"attempt": 1, "receipt": "sync"},
        ),
        outbound(
            EventType.RECEIPT_RECEIVED,
            service="lab-results",
            detail={
                "disposition": "automatic-action/MDN-sent-automatically; processed",
                "mic": mic,
                "mic_verified": True,
                "signer": signer,
                "receipt_file": f"/var/lib/medgw/receipts/{PEER}/{n:08d}.mdn",
            },
        ),
        inbound(
            EventType.MESSAGE_RECEIVED,
            service="lab-results",
            remote_address="192.0.2.17:50412",
            actor="peer:kita-lab",
            patient_ids=patients,
            detail={
                "content_type": "application/hl7-v2",
                "filename": filename,
                "size": 4096,
                "sha256": digest,
                "signer": signer,
                "signature_algorithm": "rsassa-pkcs1v15",
                "digest": "sha256",
                "content_cipher": "aes256-gcm",
                "key_transport": "rsaes-oaep",
            },
        ),
        inbound(
            EventType.MESSAGE_DELIVERED,
            service="lab-results",
            detail={
                "inbox_file": f"/srv/medgw/inbox/kita-lab/{filename}",
                "size": 4096,
                "sha256": digest,
            },
        ),
        inbound(
            EventType.RECEIPT_SENT,
            service="lab-results",
            detail={
                "disposition": "automatic-action/MDN-sent-automatically; processed",
                "mic": mic,
                "inbox_file": f"/srv/medgw/inbox/kita-lab/{filename}",
                "handover": "none",
            },
        ),
    ]


def events(count: int) -> list[AuditEvent]:
    made: list[AuditEvent] = []
    n = 0
    while len(made) < count:
        made.extend(shapes(n))
        n += 1
    return made[:count]


def daemon_sinks(log: AuditLog, clock: StepClock, state_dir: Path) -> AuditSink:
    """What the daemon wraps its log in (gateway.daemon.lifecycle), emergency mode off."""
    mode = EmergencyMode(state_dir, clock, lambda: log, EmergencySettings)
    alerts = AlertCalls(MarkingSink(log, lambda: mode), (), make_logger("error"))
    observer = Observer(
        clock,
        make_logger("error"),
        config=lambda: None,
        spool=lambda: None,
        export_backlog=lambda: None,
    )
    return observer.sink(alerts)


def write(folder: Path, batch: Sequence[AuditEvent], fsync: bool) -> tuple[float, Path]:
    """CPU seconds to emit ``batch`` one by one through the daemon's sinks."""
    path = folder / "audit.jsonl"
    clock = StepClock()
    sync: Callable[[int], None] = os.fsync if fsync else (lambda fd: None)
    log = AuditLog(path, clock, node=NODE, sync=sync, rotation=RotationSettings())
    sink = daemon_sinks(log, clock, folder)
    gc.collect()
    began = time.process_time()
    for event in batch:
        sink.emit(event)
    spent = time.process_time() - began
    log.close()
    return spent, path


def export(path: Path, count: int) -> float:
    """CPU seconds for the exporter's work on the trail: read, check, format, frame."""
    source = Source(NODE, "Kita Lab")
    position = Position()
    broken: list[Any] = []
    sent = 0
    began = time.process_time()
    while True:
        reads = read_forward(path, position, 256, broken.append)
        if not reads:
            break
        for read in reads:
            body = atna_message(describe(read.record, source), source)
            octet_counted(syslog_message(read.record, body, hostname=NODE, message_format="atna"))
        sent += len(reads)
        position = reads[-1].after
    spent = time.process_time() - began
    if sent < count or broken:
        sys.exit(f"export read {sent} of {count} records, broken: {broken[:3]}")
    return spent


def floor(path: Path) -> float:
    """CPU seconds for json.dumps + one SHA-256 of each record as written."""
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    began = time.process_time()
    for record in records:
        hashlib.sha256(
            json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
    return time.process_time() - began


def hl7_document() -> bytes:
    """A 4 KiB HL7 v2 result message (one patient), as the lab sends."""
    head = (
        b"MSH|^~\\&|LIS|KITA-LAB|HIS|SAKURA|20261205010203||ORU^R01|MSG0001|P|2.5\r"
        b"PID|1||P-102938^^^1.2.392.200119.6.102.11310^MR||YAMADA^TARO||19700101|M\r"
    )
    return (head + b"OBX|1|NM|2345-7^GLUCOSE^LN||98|mg/dL|70-99|N|||F\r" * 80)[:4096]


def scan(count: int) -> float:
    """CPU seconds to read the patients of ``count`` documents (gateway.audit.patients:
    for the message.accepted and message.received records, once per document)."""
    document = hl7_document()
    began = time.process_time()
    for _ in range(count):
        patients_in(document)
    return time.process_time() - began


def mark() -> None:
    """A boundary between measured parts: under callgrind (``--dump-before=os_getppid``)
    the counts so far are written out and started again from zero."""
    os.getppid()


def counted_run(folder: Path, count: int, fsync: bool) -> None:
    """The work of the run under callgrind: each part between two marks."""
    mark()  # start-up and imports
    mark()  # nothing: what a mark itself costs
    batch = events(count)
    mark()  # the events built
    _, path = write(folder, batch, fsync)
    mark()  # emitted
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    mark()  # read back for the floor
    for record in records:
        hashlib.sha256(
            json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
    mark()  # the floor
    export(path, count)
    mark()  # the export
    document = hl7_document()
    for _ in range(count):
        patients_in(document)
    mark()  # the patients of as many documents


def counted(count: int, fsync: bool) -> None:
    """Instructions per record of each part, from one run of this script under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=os_getppid",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--records",
            str(count),
            "--under-callgrind",
            *(["--fsync"] if fsync else []),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.name.split(".")[-1]))
        totals = [_total(path) for path in dumps]
    if len(totals) < 8:
        raise SystemExit(f"callgrind wrote {len(totals)} dumps, not 8: is os_getppid visible?")
    _, empty, _built, emit, _loaded, floor_, export_, scanned = totals[:8]
    parts = (("emit", emit), ("floor", floor_), ("export", export_), ("patients", scanned))
    per = {name: (value - empty) / count for name, value in parts}
    print(
        f"{count} records under callgrind, fsync {'on' if fsync else 'off'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  floor    json.dumps + sha256        {per['floor']:9.0f} instructions/record")
    for name, label in PARTS:
        print(
            f"  {name:8} {label:26} {per[name]:9.0f} instructions/record  "
            f"{per[name] / per['floor']:5.2f} x floor"
        )


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no instruction count in {path}")


PARTS = (
    ("emit", "daemon's sinks + AuditLog"),
    ("export", "read + check + ATNA"),
    ("patients", "4 KiB HL7 v2, per doc"),
)


def timed(count: int, rounds: int, fsync: bool) -> None:
    batch = events(count)
    best = dict.fromkeys(("emit", "export", "floor", "patients"), float("inf"))
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            spent, path = write(Path(tmp), batch, fsync)
            best["emit"] = min(best["emit"], spent)
            best["export"] = min(best["export"], export(path, count))
            best["floor"] = min(best["floor"], floor(path))
            best["patients"] = min(best["patients"], scan(count))
    us = {name: seconds / count * 1e6 for name, seconds in best.items()}
    print(
        f"{count} records x {rounds} rounds, CPU best of the rounds, "
        f"fsync {'on' if fsync else 'off'}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  floor    json.dumps + sha256        {us['floor']:7.2f} us/record")
    for name, label in PARTS:
        print(
            f"  {name:8} {label:26} {us[name]:7.2f} us/record  "
            f"{us[name] / us['floor']:5.2f} x floor"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=None, help="20000; 500 with --callgrind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fsync", action="store_true", help="the log's real fsync per record")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--under-callgrind", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.under_callgrind:
        with tempfile.TemporaryDirectory() as tmp:
            counted_run(Path(tmp), args.records, args.fsync)
    elif args.callgrind:
        counted(args.records or 500, args.fsync)
    else:
        timed(args.records or 20_000, args.rounds, args.fsync)


if __name__ == "__main__":
    main()
