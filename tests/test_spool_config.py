"""``[spool]`` as an administrator meets it in ``medgw check-config``: SQLite by
default, PostgreSQL only with TLS verified over the network and a private
password file, and every mistake named with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.pki.demo import DemoLayout
from tests.helpers.check_config import check_config, reported


def with_spool(layout: DemoLayout, text: str) -> Path:
    config = layout.hospital.config_path
    with config.open("a") as handle:
        handle.write(f"\n[spool]\n{text}\n")
    return config


def test_without_a_spool_section_the_spool_is_sqlite_in_the_state_folder(
    layout: DemoLayout,
) -> None:
    config = load_config(layout.hospital.config_path)
    assert config.spool.backend == "sqlite" and config.spool.postgres is None


def test_a_postgresql_spool_over_the_network_is_read_with_its_files(
    layout: DemoLayout, tmp_path: Path
) -> None:
    ca, password = tmp_path / "db-ca.pem", tmp_path / "db.password"
    ca.write_bytes(layout.ca_certificate.read_bytes())
    password.write_text("s3cret\n")
    password.chmod(0o600)
    with_spool(
        layout,
        f'backend = "postgresql"\nhost = "db.example.org"\ndbname = "medgw"\nuser = "gw"\n'
        f'ca_file = "{ca}"\npassword_file = "{password}"\nconnections = 8',
    )
    settings = load_config(layout.hospital.config_path).spool.postgres
    assert settings is not None
    assert (settings.host, settings.port, settings.connections) == ("db.example.org", 5432, 8)
    args = settings.connect_args()
    assert args["sslmode"] == "verify-full" and args["sslrootcert"] == str(ca)
    assert args["password"] == "s3cret"  # read from the file, never from gateway.toml


@pytest.mark.parametrize(
    ("text", "key", "words", "fix"),
    [
        (
            'backend = "postgresql"\nhost = "db.example.org"\ndbname = "m"\nuser = "u"',
            "spool.ca_file",
            "always with TLS and the server's certificate verified",
            "ca_file =",
        ),
        (
            'backend = "postgresql"\nhost = "db"\nsocket_dir = "/run/postgresql"\n'
            'dbname = "m"\nuser = "u"',
            "spool.host",
            "exactly one of host",
            "socket_dir =",
        ),
        (
            'backend = "postgresql"\nsocket_dir = "/run/postgresql"\nuser = "u"',
            "spool.dbname",
            "required key is missing",
            "dbname =",
        ),
        ('dbname = "m"', "spool.dbname", "applies only to a PostgreSQL spool", "backend ="),
        ('backend = "oracle"', "spool.backend", "is not one of sqlite, postgresql", "postgresql"),
        (
            'backend = "postgresql"\nsocket_dir = "/run/postgresql"\ndbname = "m"\nuser = "u"\n'
            'sslmode = "disable"',
            "spool.sslmode",
            "unknown key",
            "remove it",
        ),
    ],
)
def test_check_config_names_each_spool_mistake_and_its_fix(
    layout: DemoLayout, text: str, key: str, words: str, fix: str
) -> None:
    config = with_spool(layout, text)
    result = check_config(config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert reported(result, config, key, words, fix), result.stdout + result.stderr


def test_a_password_file_others_can_read_is_refused(layout: DemoLayout, tmp_path: Path) -> None:
    password = tmp_path / "db.password"
    password.write_text("s3cret\n")
    password.chmod(0o644)
    config = with_spool(
        layout,
        'backend = "postgresql"\nsocket_dir = "/run/postgresql"\ndbname = "m"\nuser = "u"\n'
        f'password_file = "{password}"',
    )
    result = check_config(config)
    assert result.returncode == 1
    assert reported(result, config, "spool.password_file", "accessible by other users", "chmod 600")
