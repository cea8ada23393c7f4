"""How to reach the PostgreSQL spool: what ``[spool]`` in gateway.toml says, checked.

The configuration layer reads the section and builds :class:`PostgresSettings`;
this module turns it into libpq connection parameters.  Over the network the
connection is always TLS with the server's certificate verified against a
configured CA and its name checked (``verify-full``); a Unix socket (a local
server) needs no TLS.  The password, if any, is read from a file only the
gateway's account can read, never from gateway.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.errors import SpoolError, UnsafeFileError
from gateway.fsutil import read_private


@dataclass(frozen=True)
class PostgresSettings:
    dbname: str
    user: str
    host: str | None = None  # a host name or address (TLS), or None with socket_dir
    port: int = 5432
    socket_dir: Path | None = None  # the folder of the server's Unix socket
    password_file: Path | None = None  # mode 0600, the password on its first line
    ca_file: Path | None = None  # the CA that issued the server's certificate (TLS)
    cert_file: Path | None = None  # a client certificate, if the server asks for one
    key_file: Path | None = None
    connect_timeout: int = 5  # seconds to wait for the server to answer
    connections: int = 4  # at most this many connections from this gateway

    @property
    def where(self) -> str:
        """The server as an administrator names it, for messages."""
        place = f"{self.socket_dir}" if self.socket_dir is not None else f"{self.host}"
        return f"database {self.dbname!r} on {place}:{self.port}"

    def connect_args(self, application: str = "medgw") -> dict[str, str | int]:
        """The libpq parameters, the session named ``application`` (what
        ``pg_stat_activity`` shows); reads the password file (SpoolError if it cannot)."""
        args: dict[str, str | int] = {
            "dbname": self.dbname,
            "user": self.user,
            "port": self.port,
            "connect_timeout": self.connect_timeout,
            "application_name": application,
            # Bounds: no statement of the spool runs for a minute (a lock another node
            # forgot, a server that hangs), and a peer host that vanished without a
            # reset is noticed within about half a minute, not at TCP's hours: by this
            # node (keepalives below) and by the server (tcp_*: its session, and the
            # node name's lock it holds, go within that time of a node's host crashing,
            # so the node restarted there takes its name back instead of being refused
            # for the two hours of the server host's default keepalive).  On Linux the
            # server's tcp_user_timeout (30 s) decides when probes left unanswered end
            # the session, not the probe count; measured: 30.5 s from the node's link
            # going down (tests/test_spool_postgres.py, the vanished node's test).
            "options": "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=60000"
            " -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
            " -c tcp_user_timeout=30000",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        if self.socket_dir is not None:
            args["host"] = str(self.socket_dir)
            args["sslmode"] = "disable"  # a Unix socket does not leave the machine
        else:
            assert self.host is not None and self.ca_file is not None
            args["host"] = self.host
            args["sslmode"] = "verify-full"
            args["sslrootcert"] = str(self.ca_file)
            args["ssl_min_protocol_version"] = "TLSv1.2"
            args["tcp_user_timeout"] = 30_000  # ms: data sent and not acknowledged
            if self.cert_file is not None and self.key_file is not None:
                args["sslcert"] = str(self.cert_file)
                args["sslkey"] = str(self.key_file)
        if self.password_file is not None:
            args["password"] = self.password()
        return args

    def password(self) -> str:
        """The first line of ``password_file``: a file of this account, mode 600."""
        assert self.password_file is not None
        fix = (
            "write the password on the first line of that file, owned by the gateway's "
            "account, mode 600 (chmod 600)"
        )
        try:
            data = read_private(self.password_file, 4096)
        except UnsafeFileError as exc:
            raise SpoolError(
                f"the spool database password file is not private: {exc.message}", fix=fix
            ) from exc
        if not data:
            raise SpoolError(
                f"the spool database password file {self.password_file} is missing or empty",
                fix=fix,
            )
        return data.decode("utf-8", "replace").splitlines()[0]
