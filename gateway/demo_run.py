"""``medgw demo``: two gateways on this machine exchange a document, end to end.

It is the product used for real, not a simulation: a demo PKI and two
institutions' configs are generated, both gateways run as separate ``medgw
run`` processes on 127.0.0.1 with mutual TLS, the lab drops an HL7 v2 result
into its outbox, the hospital's gateway delivers it to its inbox, and the
lab's gateway verifies the hospital's signed receipt.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit.files import trail_files
from gateway.errors import MedgwError

SAMPLE_HL7 = (
    b"MSH|^~\\&|KITA-LIS|KITA-LAB|SAKURA-EHR|SAKURA-HOSP|20261126093000||ORU^R01^ORU_R01|"
    b"MSG000123|P|2.5\r"
    b"PID|1||DEMO-0001^^^SAKURA^MR||DEMO^PATIENT||19700101|F\r"
    b"OBR|1|ORD-77|LAB-77|2951-2^Sodium^LN|||20261126080000\r"
    b"OBX|1|NM|2951-2^Sodium [Moles/volume] in Serum^LN||140|mmol/L|135-145|N|||F\r"
    b"OBX|2|NM|2823-3^Potassium [Moles/volume] in Serum^LN||4.1|mmol/L|3.5-5.1|N|||F\r"
)


class GatewayProcess:
    """A ``medgw run`` subprocess whose JSON log lines are collected as they come."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        """``prefix`` wraps the command, e.g. ``("ip", "netns", "exec", "lab")``."""
        self.config = config
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gateway", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None and seen == len(self.lines):
                    self._cond.wait(0.2)
                    if seen == len(self.lines):
                        raise MedgwError(
                            f"medgw ({self.config}) exited with code {self.proc.returncode}:\n"
                            + "\n".join(self.raw[-20:])
                        )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MedgwError(
                        f"timed out waiting for medgw ({self.config}); last output:\n"
                        + "\n".join(self.raw[-20:])
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        # A start on a busy host (recovery, a database to reach) can take many seconds.
        return self.wait_for(lambda line: line.get("event") == "daemon.ready", timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 60) -> int:
        """The exit code, once the process has ended and all its output has been read
        (``raw`` and ``lines`` are then complete); MedgwError with its last output if it
        is still running after ``timeout`` seconds."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MedgwError(
                f"medgw ({self.config}) still running after {timeout:.0f}s; last output:\n"
                + "\n".join(self.raw[-20:])
            ) from None
        self._reader.join(60)  # returns at its end of output: generous for a loaded machine
        return code

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout)
        except MedgwError:
            return self.kill()

    def kill(self) -> int:
        self.proc.kill()
        return self.wait_exit()


def free_port() -> int:
    return free_ports(1)[0]


# The kernel's range for the local ports of outgoing connections (Linux default).
_EPHEMERAL_DEFAULT = (32768, 60999)
# How many ports below that range listeners are chosen from.
_LISTENER_SPAN = 12000


def outgoing_port_range(
    path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range"),
) -> tuple[int, int]:
    try:
        low, high = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def listener_ports(ephemeral: tuple[int, int]) -> range:
    """Where a port for a listener that starts later is chosen: outside the kernel's
    range for outgoing connections.  A port offered by ``bind(0)`` comes from that range,
    and between choosing it and the listener's start any outgoing connection (to the
    spool's database, to a peer, through a test's proxy) may take it as its local port:
    the listener then fails with "address already in use".  Below the range if there is
    room, else above it."""
    low, high = ephemeral
    if low - 1024 >= _LISTENER_SPAN // 4:
        return range(max(1024, low - _LISTENER_SPAN), low)
    return range(high + 1, min(65536, high + 1 + _LISTENER_SPAN))


class _PortMemory:
    """The ports this process has handed out lately.  A port is chosen long before the
    gateway that listens on it starts, and meanwhile it may be offered again to the
    next caller (two settings of one configuration, chosen minutes apart, then collide
    and the second listener cannot bind), so a port is not handed out twice in a row."""

    def __init__(self, size: int) -> None:
        self._recent: collections.deque[int] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self._random = random.Random()

    def fresh(self, candidates: Sequence[int]) -> list[int]:
        with self._lock:
            fresh = [port for port in candidates if port not in self._recent]
            self._recent.extend(fresh)
            return fresh

    def pick(self, ports: range) -> int:
        with self._lock:
            return self._random.choice(ports)


# One per process, as the kernel's port space is one per host: the demo and the tests
# that build gateways choose all their ports here.
_HANDED_OUT = _PortMemory(size=4096)


def free_ports(count: int) -> list[int]:
    """``count`` distinct unused ports on 127.0.0.1 outside the kernel's range for
    outgoing connections (:func:`listener_ports`), none handed out lately by this
    process; each is checked free by binding it, the chosen ones held together until
    all are chosen."""
    ports: list[int] = []
    span = listener_ports(outgoing_port_range())
    with contextlib.ExitStack() as stack:
        for _ in range(100 * count):
            if len(ports) == count:
                break
            port = _HANDED_OUT.pick(span)
            if port in ports or not _HANDED_OUT.fresh([port]):
                continue
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (or lingering): another
                continue
            ports.append(port)
    if len(ports) == count:
        return ports
    raise MedgwError(
        f"found only {len(ports)} of {count} free ports on 127.0.0.1 in {span.start}-"
        f"{span.stop - 1}",
        fix="stop what listens there, or widen the kernel's free port space",
    )


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The complete records of a gateway's audit trail (the file at ``path`` and the files
    rotated out of it), which may be written as it is read: a last line not yet ended by
    its newline is not a record yet."""
    records: list[dict[str, Any]] = []
    for file in trail_files(path):
        with contextlib.suppress(FileNotFoundError):  # rotated meanwhile: read again later
            lines = file.read_bytes().split(b"\n")[:-1]
            records.extend(json.loads(line) for line in lines if line.strip())
    return records


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise MedgwError(f"timed out after {timeout:.0f}s waiting for {what}")


def drop_file(folder: Path, name: str, data: bytes) -> Path:
    """Write the way every outbox writer must: hidden temporary name, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    target = folder / name
    os.rename(tmp, target)
    return target


def run_demo(root: Path) -> int:
    from gateway.pki.demo import init_demo

    def say(text: str = "") -> None:
        print(text, flush=True)

    root = root.absolute()
    command = medgw_command()
    say(f"medgw demo: setting up in {root}")
    hospital_port, lab_port = free_ports(2)
    layout = init_demo(root, now=datetime.now(UTC), hospital_port=hospital_port, lab_port=lab_port)
    hospital, lab = layout.hospital, layout.lab
    say(f"  demo CA, certificates and configs for {hospital.as2_id} and {lab.as2_id} written")

    procs: list[GatewayProcess] = []
    try:
        for inst in (hospital, lab):
            proc = GatewayProcess(inst.config_path)
            procs.append(proc)
            proc.wait_ready()
            say(
                f"  {inst.as2_id:<16} medgw run (pid {proc.proc.pid}) listening on "
                f"https://127.0.0.1:{inst.port}/as2 (mutual TLS)"
            )
        name = "lab-result-MSG000123.hl7"
        drop_file(lab.outbox_dir / "hospital", name, SAMPLE_HL7)
        say(
            f"  lab dropped {name} ({len(SAMPLE_HL7)} bytes, HL7 v2 ORU^R01) into "
            f"{lab.outbox_dir / 'hospital'}"
        )
        delivered = hospital.inbox_dir / "lab" / name
        wait_until(lambda: delivered.exists(), 60, f"{delivered} to appear")
        if delivered.read_bytes() != SAMPLE_HL7:
            raise MedgwError(f"{delivered} differs from what the lab sent")
        say(f"  hospital delivered it to {delivered} (byte-for-byte identical)")

        def receipt() -> dict[str, Any] | None:
            for record in read_audit(lab.audit_log):
                if record["event"] in ("receipt.received", "receipt.invalid", "message.failed"):
                    return record
            return None

        record = wait_until(receipt, 60, "the signed receipt at the lab")
        if record["event"] != "receipt.received":
            raise MedgwError(f"the exchange failed: {record.get('reason')}")
        accepted = next(r for r in read_audit(lab.audit_log) if r["event"] == "message.accepted")
        received = next(
            r for r in read_audit(hospital.audit_log) if r["event"] == "message.received"
        )
    finally:
        codes = [p.stop() for p in procs]
    if any(codes):
        raise MedgwError(f"a gateway did not stop cleanly (exit codes {codes})")
    detail, sent, got = record["detail"], accepted["detail"], received["detail"]
    say("  both gateways stopped cleanly (SIGTERM, exit 0)")
    say()
    say("Summary")
    say(f"  document     {name}, {sent['size']} bytes, {sent['content_type']}")
    say(f"  from -> to   {lab.as2_id} (lab) -> {hospital.as2_id} (hospital)")
    say(f"  message id   {record['message_id']}")
    say("  channel      HTTPS, TLS 1.3, client and server certificates verified and pinned")
    say("  PKI          every peer certificate path-validated, revocation required (demo CA's CRL)")
    say(
        f"  object       signed {got['signature_algorithm']} with {got['digest']}, "
        f"encrypted {got['content_cipher']} / {got['key_transport']}"
    )
    say(f"  receipt      signed MDN from {detail['signer']}")
    say(
        f"               disposition '{detail['disposition']}', MIC {detail['mic']} "
        f"(matches what was sent)"
    )
    say()
    say("Where to look next")
    say(f"  delivered document  {delivered}")
    if "receipt_file" in detail:
        say(f"  receipt (as sent)   {detail['receipt_file']}")
    else:
        # Quoted as a shell reads it: a Message-ID's angle brackets would redirect.
        show = shlex.join(
            [*command, "queue", "show", record["message_id"], "--config", str(lab.config_path)]
        )
        say(f"  receipt (as sent)   kept in the lab's spool ({show})")
    say(f"  audit trails        {lab.audit_log}")
    say(f"                      {hospital.audit_log}")
    say(f"  configs             {lab.config_path}, {hospital.config_path}")
    check = shlex.join([*command, "check-config", "--config", str(hospital.config_path)])
    say(f"  try                 {check}")
    return 0


def medgw_command() -> list[str]:
    """How to run this medgw from any folder: ``medgw`` when that name on PATH is this
    installation's, else its script by absolute path, else this interpreter's module."""
    own = Path(sys.executable).absolute().parent / "medgw"
    if not own.is_file():
        return [str(Path(sys.executable).absolute()), "-m", "gateway"]
    found = shutil.which("medgw")
    if found is not None and Path(found).resolve() == own.resolve():
        return ["medgw"]
    return [str(own)]
