"""A real PostgreSQL server for the tests, from Debian's ``postgresql`` package.

One server per test session (initdb takes seconds), run as the ``postgres``
system user (initdb refuses root) from a temporary folder it owns, listening
on a Unix socket there and on 127.0.0.1 at a free port.  Each test gets a
database of its own.  A test may run a server of its own elsewhere: on the
address of a network namespace, its nodes in another (tests/helpers/netns.py).
Without the binaries the tests that need them are skipped, naming the package
to install (CI installs it: .ci/run).  bench/e2e_bench.py runs its PostgreSQL
spool on a server started the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from gateway.clock import SystemClock
from gateway.demo_run import free_port
from gateway.pki.issue import issue, make_ca, write_pem
from gateway.spool import Claimant
from gateway.spool.postgres import PostgresSettings, PostgresSpool

SKIP_REASON = (
    "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/postgres): "
    "install Debian's package postgresql (apt-get install postgresql)"
)
SUPERUSER = "postgres"
USER = "medgw"  # the role the gateway connects as
PASSWORD = "medgw-test-password"  # its password (over TCP the server asks for it)


def _bin_dir() -> Path | None:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class PostgresServer:
    """A PostgreSQL server of the test session (see module doc).

    ``address``: where it listens over TCP; another than 127.0.0.1 is named in its
    certificate too, and ``clients`` (a network) may connect from there with the
    password.  ``prefix``: the command it is started under (``ip netns exec NS``)."""

    def __init__(
        self,
        bin_dir: Path,
        root: Path,
        *,
        durable: bool = False,
        address: str = "127.0.0.1",
        clients: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.durable = durable  # fsync on (bench): else off, as nothing here must survive a crash
        self.address = address
        self.clients = clients
        self.prefix = tuple(prefix)
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "run"
        self.port = free_port()
        self.log = root / "server.log"
        # TLS for connections over the network: a CA of the session, and the server's
        # certificate for the name "localhost" (not 127.0.0.1: a test of the name) and an
        # address other than 127.0.0.1 it listens on.
        self.ca_file = root / "tls" / "ca.pem"
        self._account = pwd.getpwnam(SUPERUSER)
        self._names = itertools.count(1)

    def _as_postgres(
        self, *argv: str, check: bool = True, under: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program as the ``postgres`` account (as root: it refuses root),
        under the command ``under`` (run as root)."""
        account = self._account
        prefix = (
            ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"]
            if os.geteuid() == 0
            else []
        )
        return subprocess.run(
            [*under, *prefix, *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
        )

    def init(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.socket_dir):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        tls = self._tls()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"ssl = on\nssl_cert_file = '{tls / 'server.pem'}'\n"
                f"ssl_key_file = '{tls / 'server.key'}'\nssl_min_protocol_version = 'TLSv1.2'\n"
            )
            conf.write(
                f"listen_addresses = '{self.address}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"fsync = {'on' if self.durable else 'off'}\nmax_connections = 200\n"
            )
        if self.clients is not None:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"hostssl all {USER} {self.clients} scram-sha-256\n")

    def _tls(self) -> Path:
        now = datetime.now(UTC)
        ca = make_ca("medgw test database CA", now=now)
        addresses = [self.address] if self.address != "127.0.0.1" else []
        server = issue(
            ca, "localhost", purpose="tls", now=now, dns_names=["localhost"], ip_addresses=addresses
        )
        folder = self.ca_file.parent
        folder.mkdir()
        write_pem(self.ca_file, ca.certificate)
        write_pem(folder / "server.pem", server.certificate)
        write_pem(folder / "server.key", server.key)  # mode 600
        if os.geteuid() == 0:
            for path in (folder, folder / "server.pem", folder / "server.key"):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        return folder

    def start(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            *("-D", str(self.data), "-l", str(self.log), "-w", "start"),
            under=self.prefix,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        status = self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "status", check=False
        )
        return status.returncode == 0

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
        )

    def new_database(self) -> PostgresSettings:
        """A new, empty database owned by the gateway's role; settings over the socket."""
        name = f"spool_{next(self._names)}"
        with self.admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}" OWNER "{USER}"')
        return PostgresSettings(dbname=name, user=USER, socket_dir=self.socket_dir, port=self.port)

    def setup_role(self) -> None:
        with self.admin() as admin:
            admin.execute(f"CREATE ROLE \"{USER}\" LOGIN PASSWORD '{PASSWORD}'")


def spool_section(settings: PostgresSettings) -> str:
    """The ``[spool]`` table of a gateway.toml that keeps the spool in ``settings``'
    database, over the server's Unix socket."""
    return (
        f'\n[spool]\nbackend = "postgresql"\nsocket_dir = "{settings.socket_dir}"\n'
        f'port = {settings.port}\ndbname = "{settings.dbname}"\nuser = "{settings.user}"\n'
    )


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (None: none, see SKIP_REASON)."""
    bin_dir = _bin_dir()
    return bin_dir if bin_dir is not None and shutil.which("setpriv") is not None else None


@contextlib.contextmanager
def running_server(
    bin_dir: Path,
    *,
    durable: bool = False,
    address: str = "127.0.0.1",
    clients: str | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[PostgresServer]:
    """A server started for the caller and stopped after (tests/conftest.py, bench/);
    ``address``, ``clients`` and ``prefix``: see :class:`PostgresServer`."""
    root = Path(tempfile.mkdtemp(prefix="medgw-pg-"))
    server = PostgresServer(
        bin_dir, root, durable=durable, address=address, clients=clients, prefix=prefix
    )
    try:
        server.init()
        server.start()
        server.setup_role()
        yield server
    finally:
        if server.running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def holding_node(settings: PostgresSettings, node: str) -> list[str]:
    """The command of a running node's spool over TCP (``settings``: host, TLS CA and
    password file): it holds the name ``node``, says ``holding`` on a line, and keeps it
    until its standard input closes.  Run under ``ip netns exec``: a node on another host."""
    assert settings.host is not None and settings.ca_file and settings.password_file
    return [
        *(sys.executable, "-m", "tests.helpers.postgres", "hold-name", node, settings.host),
        *(str(settings.port), settings.dbname, settings.user),
        *(str(settings.ca_file), str(settings.password_file)),
    ]


def _hold_name(argv: list[str]) -> int:
    node, host, port, dbname, user, ca_file, password_file = argv
    settings = PostgresSettings(
        dbname=dbname,
        user=user,
        host=host,
        port=int(port),
        ca_file=Path(ca_file),
        password_file=Path(password_file),
    )
    spool = PostgresSpool(settings, SystemClock(), Claimant(node, 60), hold_name=True)
    print("holding", flush=True)
    sys.stdin.read()
    spool.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["hold-name"]:
        sys.exit("usage: python -m tests.helpers.postgres hold-name NODE HOST PORT ...")
    sys.exit(_hold_name(sys.argv[2:]))
