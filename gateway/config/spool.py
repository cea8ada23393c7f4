"""``[spool]``: where the spool is kept: SQLite in the state folder (the default), or a
PostgreSQL database that several nodes can share.

Over the network the connection to PostgreSQL is always TLS with the server's
certificate verified against ``ca_file`` and its name checked (libpq's
``verify-full``): there is no setting that turns this off.  A Unix socket
(``socket_dir``: a server on this host) needs none.  A password is read from
``password_file`` (mode 600), never written in gateway.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.spool.postgres import PostgresSettings
from gateway.tomlreader import Reader, Section

BACKENDS = ("sqlite", "postgresql")
_POSTGRES_KEYS = (
    "host",
    "port",
    "socket_dir",
    "dbname",
    "user",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "connect_timeout_seconds",
    "connections",
)


@dataclass(frozen=True)
class SpoolSettings:
    backend: str = "sqlite"
    postgres: PostgresSettings | None = None  # with backend = "postgresql"


SQLITE = SpoolSettings()


def load_spool(reader: Reader, root: Section) -> SpoolSettings:
    """The optional ``[spool]`` table (absent: SQLite in ``[storage] state_dir``)."""
    section = root.optional_table("spool")
    if section is None:
        return SQLITE
    backend = section.choice("backend", BACKENDS, default="sqlite")
    if backend == "sqlite":
        for key in _POSTGRES_KEYS:
            if section.has(key):
                section.mark_seen(key)
                section.problem(
                    key,
                    'applies only to a PostgreSQL spool (backend = "postgresql")',
                    'remove it, or set backend = "postgresql"',
                )
        section.finish()
        return SQLITE
    settings = _postgres(reader, section)
    section.finish()
    return SpoolSettings(backend, settings)


def _file(reader: Reader, section: Section, key: str, what: str) -> Path | None:
    """The file named by ``key`` (None: no such key); a problem if it cannot be read, if
    a secret one is not private, or if the password file is empty."""
    if not section.has(key):
        return None
    path = reader.path(section.string(key))
    data = reader.read_file(section, key, path, what)
    if data is not None and key in ("password_file", "key_file"):
        reader.check_private_mode(section, key, path, what)
    if data is not None and key == "password_file" and not data.strip():
        section.problem(key, f"{path} is empty", "write the database password on its first line")
    return path


def _postgres(reader: Reader, section: Section) -> PostgresSettings | None:
    dbname = section.string("dbname", example='"medgw"')
    user = section.string("user", example='"medgw"')
    port = section.integer("port", default=5432, minimum=1, maximum=65535)
    timeout = section.integer("connect_timeout_seconds", default=5, minimum=1, maximum=300)
    connections = section.integer("connections", default=4, minimum=1, maximum=64)
    host = section.string("host", default="") or None
    socket_dir = reader.path(section.string("socket_dir")) if section.has("socket_dir") else None
    if (host is None) == (socket_dir is None):
        section.problem(
            "host",
            "a PostgreSQL spool needs exactly one of host (a server over the network, "
            "with TLS) and socket_dir (a server on this host, over its Unix socket)",
            'set host = "db.example.org" (and ca_file), or socket_dir = "/run/postgresql"',
        )
    password_file = _file(reader, section, "password_file", "the spool database password file")
    ca_file = _file(reader, section, "ca_file", "the spool database server's CA certificate")
    cert_file = _file(reader, section, "cert_file", "this gateway's spool database certificate")
    key_file = _file(reader, section, "key_file", "this gateway's spool database key")
    if host is not None and ca_file is None:
        section.problem(
            "ca_file",
            f"the spool database on {host} is reached over the network, always with TLS and "
            "the server's certificate verified (verify-full): this needs the CA that issued it",
            'add ca_file = "/etc/medgw/spool-db-ca.pem" (the PEM certificate of that CA)',
        )
    if socket_dir is not None and ca_file is not None:
        section.problem(
            "ca_file",
            "a Unix socket (socket_dir) does not use TLS, so ca_file would not be used",
            "remove ca_file, or reach the server by host instead of socket_dir",
        )
    if (cert_file is None) != (key_file is None):
        section.problem(
            "cert_file" if cert_file is None else "key_file",
            "a client certificate needs both cert_file and key_file",
            "set both, or neither",
        )
    if not dbname or not user:
        return None
    return PostgresSettings(
        dbname=dbname,
        user=user,
        host=host,
        port=port,
        socket_dir=socket_dir,
        password_file=password_file,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        connect_timeout=timeout,
        connections=connections,
    )
