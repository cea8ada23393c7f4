"""The README, followed literally: the quick start and "Installing, step by step".

Every ```sh block of the install walk-through is run in order, as written,
with bash.  Only what a test machine cannot have is stood in for:

* the server's folders (``/etc/medgw``, ``/var/lib/medgw``, ``/opt/medgw``...)
  are folders of a scratch root, and the example's addresses are mapped onto
  127.0.0.1 (``on_this_machine``): the same text substitution is applied to
  the commands and, in the step where the README sends the admin to an
  editor, to the configuration files;
* ``sudo``, ``useradd`` and ``chown`` (no medgw user exists here), ``install``
  without ``-o``/``-g``, and ``systemctl`` (``enable --now`` starts the unit's
  own ``ExecStart`` with a real ``NOTIFY_SOCKET`` and waits for READY=1, as
  systemd does for ``Type=notify``) are small stand-ins on PATH;
* ``python3`` is the interpreter running the tests (a server's system Python is
  whichever supported version it ships), so each supported version installs;
* the people outside: the CA (real ``openssl x509 -req``, with the demo CA)
  and the partner's administrator (a demo laboratory gateway, ``medgw run``,
  given our certificates).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.helpers.demo import new_demo

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SERVER_PATHS = (
    "/etc/systemd/system",
    "/etc/medgw",
    "/var/lib/medgw",
    "/var/log/medgw",
    "/run/medgw",
    "/opt/medgw",
    "/usr/bin/medgw",
    "/usr/share/doc/medgw",
)


def sh_blocks(section: str) -> list[str]:
    """The ```sh blocks of one ``## `` section of the README, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.DOTALL)


def steps() -> dict[int, str]:
    """Each "### Step N" of the walk-through with its one ```sh block."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Installing, step by step\n")
    end = text.index("\n## ", start + 1)
    found = {}
    for match in re.finditer(
        r"### Step (\d+): [^\n]*\n(.*?)(?=\n### |\Z)", text[start:end], flags=re.DOTALL
    ):
        blocks = re.findall(r"```sh\n(.*?)```", match.group(2), flags=re.DOTALL)
        assert len(blocks) == 1, f"Step {match.group(1)} should have one ```sh block"
        found[int(match.group(1))] = blocks[0]
    return found


class Machine:
    """A scratch server root, the stand-ins on PATH, and the example mapped onto it."""

    def __init__(self, tmp: Path, partner: DemoLayout) -> None:
        self.root = tmp / "server"
        self.home = tmp / "admin"  # where the admin saves what the CA and the partner send
        self.state = tmp / "systemd"  # the stand-in systemctl's pid, log and notify socket
        self.bin = tmp / "bin"
        for folder in (self.root, self.home, self.state, self.bin):
            folder.mkdir(parents=True)
        (self.root / "etc" / "systemd" / "system").mkdir(parents=True)
        (self.root / "usr" / "bin").mkdir(parents=True)
        self.partner = partner
        self.mapping = [(p, f"{self.root}{p}") for p in SERVER_PATHS] + [
            ("192.0.2.10", "127.0.0.1"),
            ("198.51.100.0/24", "127.0.0.0/8"),
            ("as2.kita-lab.example:4443", f"localhost:{partner.lab.port}"),
        ]
        self._write_stand_ins()

    def on_this_machine(self, text: str) -> str:
        for example, here in self.mapping:
            text = text.replace(example, here)
        return text

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{self.root}/usr/bin:{env['PATH']}"
        env["WALKTHROUGH_MAP"] = json.dumps(self.mapping)
        env["WALKTHROUGH_STATE"] = str(self.state)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def run(self, block: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        script = "set -euo pipefail\n" + self.on_this_machine(block)
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"README block failed (exit {result.returncode}):\n{block}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        return result

    def _write_stand_ins(self) -> None:
        real_install = shutil.which("install")
        assert real_install is not None
        scripts = {
            # sudo: run the command as this user (there is no medgw user here)
            "sudo": """#!/bin/bash
                while [[ $# -gt 0 ]]; do
                  case "$1" in -u|-g) shift 2 ;; -*) shift ;; *) break ;; esac
                done
                exec "$@"
            """,
            "useradd": "#!/bin/bash\nexit 0\n",
            "chown": "#!/bin/bash\nexit 0\n",
            # install: the same, without the owner and group this machine lacks
            "install": f"""#!/bin/bash
                args=()
                while [[ $# -gt 0 ]]; do
                  case "$1" in -o|-g) shift 2 ;; *) args+=("$1"); shift ;; esac
                done
                exec {real_install} "${{args[@]}}"
            """,
            "systemctl": f"#!{sys.executable}\n" + SYSTEMCTL,
        }
        for name, text in scripts.items():
            path = self.bin / name
            path.write_text(textwrap.dedent(text).lstrip())
            path.chmod(0o755)
        # The base interpreter behind this one (a virtual environment's python links to it).
        (self.bin / "python3").symlink_to(Path(sys.executable).resolve())

    def stop_service(self) -> None:
        pid_file = self.state / "medgw.pid"
        if pid_file.exists():
            subprocess.run(["systemctl", "stop", "medgw"], env=self.env(), check=False, timeout=60)


# The stand-in systemctl: daemon-reload, enable --now / start (Type=notify: waits for
# READY=1 on NOTIFY_SOCKET), is-active, reload (ExecReload: SIGHUP), stop.
SYSTEMCTL = r"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

state = Path(os.environ["WALKTHROUGH_STATE"])
mapping = json.loads(os.environ["WALKTHROUGH_MAP"])

def here(text):
    for example, local in mapping:
        text = text.replace(example, local)
    return text

words = [a for a in sys.argv[1:] if not a.startswith("-")]
verb, unit = words[0], (words[1] if len(words) > 1 else "medgw")
unit_file = Path(here(f"/etc/systemd/system/{unit.removesuffix('.service')}.service"))
pid_file = state / "medgw.pid"

def pid():
    try:
        number = int(pid_file.read_text())
        os.kill(number, 0)
        return number
    except (OSError, ValueError):
        return None

if verb == "daemon-reload":
    sys.exit(0 if unit_file.is_file() else 1)
if verb in ("enable", "start"):
    if verb == "enable" and "--now" not in sys.argv:
        sys.exit(0)
    lines = unit_file.read_text().splitlines()
    [exec_start] = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStart=")]
    notify = state / "notify.sock"
    notify.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(1.0)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    log = open(state / "medgw.log", "ab")
    proc = subprocess.Popen(here(exec_start).split(), env=env, stdout=log, stderr=log,
                            start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.stderr.write((state / "medgw.log").read_text()[-4000:])
            sys.exit(1)
        try:
            if b"READY=1" in listener.recv(4096):
                sys.exit(0)
        except TimeoutError:
            pass
    sys.exit(1)
if verb == "is-active":
    print("active" if pid() else "inactive")
    sys.exit(0 if pid() else 3)
if verb == "reload":
    os.kill(pid(), signal.SIGHUP)
    sys.exit(0)
if verb == "stop":
    number = pid()
    if number:
        os.kill(number, signal.SIGTERM)
        for _ in range(600):
            try:
                os.kill(number, 0)
            except OSError:
                break
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    sys.exit(0)
sys.exit(f"systemctl stand-in: {verb} is not supported")
"""


def sign_as_the_ca(partner: DemoLayout, csr: Path, out: Path) -> None:
    """What the network's CA does with a CSR: real openssl, the requested extensions kept."""
    ca = partner.root / "ca"
    subprocess.run(
        [
            "openssl", "x509", "-req", "-in", str(csr),
            "-CA", str(ca / "ca.crt"), "-CAkey", str(ca / "ca.key"),
            "-copy_extensions", "copyall", "-days", "365", "-out", str(out),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


def fingerprint(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    partner = new_demo(tmp_path / "partner")
    machine = Machine(tmp_path, partner)
    try:
        yield machine
    finally:
        machine.stop_service()


def test_the_install_walk_through_works_as_written(
    machine: Machine, processes: Any, tmp_path: Path
) -> None:
    walk = steps()
    assert sorted(walk) == list(range(1, len(walk) + 1)) and len(walk) >= 10
    partner = machine.partner
    server = machine.root
    certs = server / "etc" / "medgw" / "certs"

    # Step 1, from the unpacked source (a copy: pip builds in it).
    source = tmp_path / "medgw-source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "demo", "*.egg-info", "build", "__pycache__", ".*_cache"
        ),
    )
    machine.run(walk[1], cwd=source)
    assert (server / "usr" / "bin" / "medgw").resolve().is_file()

    # Step 2: keys and CSRs, on the server.
    machine.run(walk[2], cwd=machine.home)
    for role in ("tls", "sign", "encrypt"):
        assert (certs / f"{role}.key").stat().st_mode & 0o077 == 0

    # The CA signs the requests and sends its certificate and CRL.
    for role in ("tls", "sign", "encrypt"):
        sign_as_the_ca(partner, certs / f"{role}.csr", machine.home / f"{role}.crt")
    shutil.copy(partner.ca_certificate, machine.home / "regional-vpn-ca.crt")
    shutil.copy(partner.root / "ca" / "ca.crl", machine.home / "regional-vpn.crl")
    machine.run(walk[3], cwd=machine.home)

    # The partner's administrator and we swap certificates.
    theirs = machine.home / "kita-lab"
    theirs.mkdir()
    lab_certs = partner.lab.root / "certs"
    for role in ("tls", "sign", "encrypt"):
        shutil.copy(lab_certs / f"{role}.crt", theirs / f"{role}.crt")
        shutil.copy(certs / f"{role}.crt", lab_certs / "peers" / "hospital" / f"{role}.crt")
    printed = machine.run(walk[4], cwd=machine.home).stdout
    # ... and read the fingerprints out to each other: what the loop printed is what is
    # in the files each side installed.
    for path in [certs / f"{r}.crt" for r in ("tls", "sign", "encrypt")] + [
        certs / "peers" / "kita-lab" / f"{r}.crt" for r in ("tls", "sign", "encrypt")
    ]:
        assert f"sha256 Fingerprint={fingerprint(path)}" in printed, path

    # Step 5, then the editor: the example's addresses become this machine's.
    machine.run(walk[5], cwd=machine.home)
    gateway_toml = server / "etc" / "medgw" / "gateway.toml"
    peer_toml = server / "etc" / "medgw" / "peers.d" / "kita-lab.toml"
    for path in (gateway_toml, peer_toml):
        path.write_text(machine.on_this_machine(path.read_text()))
    gateway_toml.write_text(
        gateway_toml.read_text().replace("port = 4443", f"port = {partner.hospital.port}")
    )

    checked = machine.run(walk[6], cwd=machine.home)
    assert "configuration is valid" in checked.stdout

    machine.run(walk[7], cwd=machine.home)
    # The partner's gateway runs, with our certificates.
    processes.start(partner.lab.config_path)
    diagnosed = machine.run(walk[8], cwd=machine.home)
    assert "[FAIL]" not in diagnosed.stdout

    sent = machine.run(walk[9], cwd=machine.home)
    assert "first-test.txt" in sent.stdout and "delivered" in sent.stdout
    inbox = partner.lab.inbox_dir / "hospital" / "first-test.txt"
    assert inbox.read_text() == "medgw installation test from Sakura General Hospital\n"

    audit_log = server / "var" / "log" / "medgw" / "audit.jsonl"
    verified = machine.run(walk[10], cwd=machine.home)
    assert "hash chain intact" in verified.stdout
    events = {record["event"] for record in read_audit(audit_log)}
    assert {"message.accepted", "receipt.received"} <= events, events
    wait_until(
        lambda: any(r["event"] == "message.delivered" for r in read_audit(partner.lab.audit_log)),
        30,
        "the partner's delivery record",
    )


def test_the_install_and_the_unit_name_no_python_minor_version() -> None:
    """A server runs whichever of 3.11 to 3.13 its distribution ships, and keeps
    running medgw after an upgrade to the next: nothing an admin types from the README
    or the unit starts names one minor version."""
    minor = re.compile(r"python3\.\d+")
    assert not minor.search(steps()[1]), steps()[1]
    unit = (REPO / "systemd" / "medgw.service").read_text()
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == "ExecStart=/usr/bin/medgw run --config /etc/medgw/gateway.toml"
    assert "sudo ln -s /opt/medgw/bin/medgw /usr/bin/medgw" in steps()[1]


def test_the_quick_start_demo_runs_as_written(tmp_path: Path) -> None:
    [quick] = sh_blocks("Quick start")
    commands = [line for line in quick.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    # `make demo` as written (its scratch folder moved out of the checkout); `make test`
    # is what is running this test.
    result = subprocess.run(
        ["make", "demo"],
        cwd=REPO,
        env=dict(os.environ, DEMO_DIR=str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processed" in result.stdout


def test_the_readme_contents_list_every_section_of_the_admin_guide() -> None:
    text = README.read_text(encoding="utf-8")
    contents = text[text.index("## Contents\n") : text.index("# Admin guide")]
    listed = re.findall(r"\[(.+?)\]\(#([\w-]+)\)", contents)
    guide = text[text.index("# Admin guide") :]
    headings = re.findall(r"(?m)^#{2,3} (.+)$", guide)
    assert [title for title, _ in listed] == headings

    def anchor(title: str) -> str:  # GitHub's rule: lower case, punctuation dropped
        return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")

    assert [a for _, a in listed] == [anchor(h) for h in headings]
