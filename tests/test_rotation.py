"""Certificate rotation with an overlap, in both directions, while documents flow: none lost."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.clock import SystemClock
from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, write_pem
from gateway.spool import OutboundState, SqliteSpool
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import demo_ca, edit, reload


class Traffic:
    """Drops a document each way every few hundred milliseconds until stopped."""

    def __init__(self, layout: DemoLayout) -> None:
        self.layout = layout
        self.sent: dict[str, list[str]] = {"lab": [], "hospital": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            for sender, receiver, outbox in (
                ("lab", "hospital", self.layout.lab.outbox_dir),
                ("hospital", "lab", self.layout.hospital.outbox_dir),
            ):
                name = f"{sender}-{n:04d}.hl7"
                drop_file(outbox / receiver, name, f"MSH|{sender}|{n}\r".encode())
                self.sent[sender].append(name)
            n += 1
            time.sleep(0.3)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def all_delivered(root: Path, count: int) -> bool:
    spool = SqliteSpool(root / "state" / "spool.sqlite3", SystemClock())
    try:
        records = spool.all_outbound()
    finally:
        spool.close()
    return len(records) == count and all(r.state is OutboundState.DELIVERED for r in records)


def test_rotation_of_all_lab_certificates_with_overlap_loses_no_message(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    traffic = Traffic(layout)
    try:
        # The lab obtains new certificates from its CA.
        now = datetime.now(UTC) - timedelta(minutes=1)
        ca = demo_ca(layout)
        certs = layout.lab.root / "certs"
        for role, purpose in (("tls", "tls"), ("sign", "smime-sign"), ("encrypt", "smime-encrypt")):
            new = issue(
                ca,
                "KITA-LAB",
                purpose=purpose,
                now=now,
                organization="Kita Lab 2027",
                ip_addresses=["127.0.0.1"] if role == "tls" else (),
                dns_names=["localhost"] if role == "tls" else (),
            )
            write_pem(certs / f"{role}-new.crt", new.certificate)
            write_pem(certs / f"{role}-new.key", new.key)
            peer_copy = layout.hospital.root / "certs" / "peers" / "lab" / f"{role}-new.crt"
            write_pem(peer_copy, new.certificate)
        time.sleep(1)

        # 1. The lab can already decrypt with the new key (before anyone encrypts to it).
        with layout.lab.config_path.open("a") as handle:
            handle.write(
                '\n[[smime.decryption_keys]]\ncertificate = "certs/encrypt-new.crt"\n'
                'key = "certs/encrypt-new.key"\n'
            )
        reload(lab, layout.lab.audit_log)
        time.sleep(1)

        # 2. The hospital accepts old and new (overlap) and encrypts to the newest.
        peer_file = layout.hospital.root / "peers.d" / "lab.toml"
        for role, key in (
            ("tls", "tls_certificates"),
            ("sign", "signing_certificates"),
            ("encrypt", "encryption_certificates"),
        ):
            edit(
                peer_file,
                f'{key} = ["certs/peers/lab/{role}.crt"]',
                f'{key} = ["certs/peers/lab/{role}.crt", "certs/peers/lab/{role}-new.crt"]',
            )
        reload(hospital, layout.hospital.audit_log)
        time.sleep(1)

        # 3. The lab switches to its new identity; the old decryption key stays for a while.
        config = layout.lab.config_path
        for role in ("tls", "sign", "encrypt"):
            edit(config, f'"certs/{role}.crt"', f'"certs/{role}-new.crt"')
            edit(config, f'"certs/{role}.key"', f'"certs/{role}-new.key"')
        edit(
            config,
            'certificate = "certs/encrypt-new.crt"\nkey = "certs/encrypt-new.key"',
            'certificate = "certs/encrypt.crt"\nkey = "certs/encrypt.key"',
        )
        reload(lab, layout.lab.audit_log)
        time.sleep(1.5)

        # 4. The overlap ends: the hospital forgets the old certificates.
        for role in ("tls", "sign", "encrypt"):
            edit(peer_file, f'"certs/peers/lab/{role}.crt", ', "")
        reload(hospital, layout.hospital.audit_log)
        time.sleep(1.5)
    finally:
        traffic.stop()

    sent_by_lab, sent_by_hospital = traffic.sent["lab"], traffic.sent["hospital"]
    wait_until(lambda: all_delivered(layout.lab.root, len(sent_by_lab)), 120, "lab's documents")
    wait_until(
        lambda: all_delivered(layout.hospital.root, len(sent_by_hospital)),
        120,
        "hospital's documents",
    )
    for receiver, names in (
        (layout.hospital.inbox_dir / "lab", sent_by_lab),
        (layout.lab.inbox_dir / "hospital", sent_by_hospital),
    ):
        assert sorted(p.name for p in receiver.iterdir()) == sorted(names)
    # Messages sent after the switch used the new identity end to end.
    received = wait_for_events(
        layout.hospital.audit_log, "message.received", count=len(sent_by_lab)
    )

    assert "Kita Lab 2027" in received[-1]["detail"]["signer"]
    assert len(sent_by_lab) >= 10
