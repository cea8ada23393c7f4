"""A real syslog-over-TLS collector for tests: Debian's rsyslogd with its OpenSSL
network stream driver, run in the foreground on 127.0.0.1 with its own configuration
in a temporary folder, mutual TLS, writing what it receives to a file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from gateway.demo_run import free_port
from gateway.pki.issue import Issued, issue, make_ca, write_pem

RSYSLOGD = shutil.which("rsyslogd") or (
    "/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None
)
CLIENT_NAME = "medgw-audit"
_LINE = re.compile(
    r'^(?P<facility>\d+) (?P<severity>\d+) (?P<msgid>\S+) \[medgw@32473 seq="(?P<seq>\d+)" '
    r'event="(?P<event>[^"]*)" hash="(?P<hash>[0-9a-f]*)"\] ?(?P<body>.*)$'
)


def require_rsyslog() -> str:
    """rsyslogd's path; without it the test fails under CI (which installs it) and is
    skipped elsewhere, saying why."""
    module = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_ossl.so")
    found = RSYSLOGD is not None and (
        module.exists() or any(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so"))
    )
    if found:
        assert RSYSLOGD is not None
        return RSYSLOGD
    why = "rsyslogd with its TLS module is not installed (apt-get install rsyslog rsyslog-openssl)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@dataclass(frozen=True)
class Received:
    facility: int
    severity: int
    msgid: str
    seq: int
    event: str
    hash: str
    body: str


class Collector:
    def __init__(self, folder: Path, *, now: datetime) -> None:
        self.binary = require_rsyslog()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "work").mkdir(exist_ok=True)
        self.ca = make_ca("Monitoring Test CA", now=now)
        server = issue(
            self.ca,
            "collector",
            purpose="tls",
            now=now,
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
        )
        self.client: Issued = issue(
            self.ca, CLIENT_NAME, purpose="tls", now=now, dns_names=(CLIENT_NAME,)
        )
        self.ca_path = folder / "ca.crt"
        write_pem(self.ca_path, self.ca.certificate)
        write_pem(folder / "server.crt", server.certificate)
        write_pem(folder / "server.key", server.key)
        self.client_cert = folder / "client.crt"
        self.client_key = folder / "client.key"
        write_pem(self.client_cert, self.client.certificate)
        write_pem(self.client_key, self.client.key)
        os.chmod(self.client_key, 0o600)
        self.port = free_port()
        self.output = folder / "received.log"
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            f"""\
global(
  workDirectory="{folder / "work"}"
  maxMessageSize="64k"
  defaultNetstreamDriver="ossl"
  defaultNetstreamDriverCAFile="{self.ca_path}"
  defaultNetstreamDriverCertFile="{folder / "server.crt"}"
  defaultNetstreamDriverKeyFile="{folder / "server.key"}"
)
module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1"
       streamDriver.authMode="x509/name" permittedPeer=["{CLIENT_NAME}"])
template(name="line" type="string"
         string="%syslogfacility% %syslogseverity% %msgid% %structured-data% %msg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{self.output}" template="line" flushOnTXEnd="on"
         asyncWriting="off")
}}
input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="audit")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise AssertionError(f"rsyslogd exited {self.proc.returncode}: {out}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"rsyslogd did not listen on 127.0.0.1:{self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def received(self) -> list[Received]:
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _LINE.match(line)
            if match is None:
                continue
            found.append(
                Received(
                    int(match["facility"]),
                    int(match["severity"]),
                    match["msgid"],
                    int(match["seq"]),
                    match["event"],
                    match["hash"],
                    match["body"].lstrip("\ufeff"),
                )
            )
        return found

    def lines(self) -> list[str]:
        return self.output.read_text().splitlines() if self.output.exists() else []
