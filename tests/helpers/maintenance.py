"""A demo site with the SSH maintenance listener on a loopback address of its own,
maintainer accounts and keys, and what the session left in the audit trail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

from gateway.demo_run import free_ports
from gateway.maintenance import totp
from gateway.pki.demo import DemoInstitution, DemoLayout
from tests.helpers.audit import events


def enable_maintenance(root: Path, config: Path, listen: str) -> Path:
    """The SSH maintenance listener on ``listen`` for the installation in ``root``: a new
    host key in certs/, an empty maintainers.d/, and ``[maintenance]`` added to
    ``config``; the host key's path."""
    host_key = root / "certs" / "ssh_host_ecdsa_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(host_key)],
        check=True,
    )
    (root / "maintainers.d").mkdir(mode=0o700)
    with config.open("a") as handle:
        handle.write(f'\n[maintenance]\nlisten = "{listen}"\nhost_key = "{host_key}"\n')
    return host_key


class Site:
    """The SSH maintenance listener of one demo installation (the lab's unless told)."""

    def __init__(self, layout: DemoLayout, installation: DemoInstitution | None = None) -> None:
        installation = installation or layout.lab
        self.root = installation.root
        self.config = installation.config_path
        self.audit = installation.audit_log
        self.port = free_ports(1)[0]
        self.host_key = enable_maintenance(self.root, self.config, f"{ADDRESS}:{self.port}")
        self.folder = self.root / "maintainers.d"
        self.secrets: dict[str, str] = {}
        self.known_hosts = self.root / "known_hosts"
        public = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[{ADDRESS}]:{self.port} {public[0]} {public[1]}\n")

    def key(self, person: str) -> Path:
        path = self.root / f"{person}_id"
        if not path.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f", str(path)],
                check=True,
            )
        return path

    def add(self, person: str, role: str, expires: str = "2099-12-31") -> None:
        secret = totp.new_secret()
        self.secrets[person] = secret
        public = self.key(person).with_suffix(".pub").read_text().strip()
        path = self.folder / f"{person}.toml"
        path.write_text(
            f'name = "{person.title()}"\nrole = "{role}"\npublic_keys = ["{public}"]\n'
            f'totp_secret = "{secret}"\nexpires = {expires}\n'
        )
        path.chmod(0o600)

    def code(self, person: str, offset: int = 0) -> str:
        key = totp.decode_secret(self.secrets[person])
        return totp.code_at(key, totp.step_of(time.time()) + offset)

    def approve(self, person: str) -> None:
        until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 3600))
        command = ["maintenance", "approve", person, "--until", until, "--reason", "CRL"]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def events(self, event: str) -> list[dict[str, Any]]:
        return events(self.audit, event)

    def ssh(
        self,
        person: str,
        *args: str,
        command: str | None = None,
        code: str | None = None,
        prog: str = "ssh",
        env: dict[str, str] | None = None,
    ) -> Any:
        argv, environment = self._client(person, args, command, code, prog, env)
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=environment,
            stdin=subprocess.DEVNULL,
        )

    def master(self, person: str, control: Path, code: str) -> Any:
        """``ssh -f -N -o ControlMaster=yes -o ControlPath=CONTROL``, as the README shows
        the break-glass holder: logs in with the key and ``code``, then goes on in the
        background as the one session that ``ssh -o ControlPath=CONTROL`` runs each
        command on.  Returns once logged in (or refused); its messages go to
        ``CONTROL.log``."""
        argv, environment = self._client(
            person,
            ("-f", "-N", "-o", "ControlMaster=yes", "-o", f"ControlPath={control}"),
            None,
            code,
            "ssh",
            None,
        )
        with control.with_suffix(".log").open("a") as log:
            # the background ssh keeps its output open: a file, not a pipe to wait on
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
                timeout=60,
                check=False,
            )

    def _client(
        self,
        person: str,
        args: Sequence[str],
        command: str | None,
        code: str | None,
        prog: str,
        env: dict[str, str] | None,
    ) -> tuple[list[str], dict[str, str]]:
        askpass = self.root / f"askpass-{person}"
        askpass.write_text(f"#!/bin/sh\necho {code or '000000'}\n")
        askpass.chmod(0o700)
        options = [
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-i",
            str(self.key(person)),
            "-o",
            f"BatchMode={'no' if code else 'yes'}",
        ]
        target = [f"{person}@{ADDRESS}"]
        port = ["-P" if prog == "sftp" else "-p", str(self.port)]
        environment = {
            **(env or {}),
            "PATH": os.environ["PATH"],
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": ":0",
        }
        argv = [prog, *port, *options, *args, *target, *([command] if command else [])]
        return argv, environment

    async def connect(self, person: str, code: str | None) -> asyncssh.SSHClientConnection:
        class Answer(asyncssh.SSHClient):
            def kbdint_auth_requested(self) -> str:
                return ""

            def kbdint_challenge_received(self, name, instructions, lang, prompts):
                return [code] * len(prompts) if code is not None else None

        host = asyncssh.read_public_key(self.host_key.with_suffix(".pub"))
        conn, _ = await asyncssh.create_connection(
            Answer,
            ADDRESS,
            self.port,
            username=person,
            client_keys=[str(self.key(person))],
            known_hosts=([host], [], []),
            agent_path=None,
            preferred_auth=["publickey", "keyboard-interactive"],
        )
        return conn


ADDRESS = "127.0.0.2"  # a loopback address of its own: not the zone listener's 127.0.0.1
