"""Whether a restore's load into a database with no spool table committed, when the
``pg_restore`` that ran it ended badly: told by the load's own session leaving the
server (real PostgreSQL), whatever other sessions do meanwhile."""

from __future__ import annotations

import threading

import psycopg

from gateway.backup import pgspool
from gateway.spool.postgres import PostgresSettings
from gateway.spool.postgres.schema import SCHEMA_LOCK

LOAD = "medgw-restore-0123456789abcdef"


def _session(settings: PostgresSettings, name: str) -> psycopg.Connection:
    return psycopg.connect(**settings.connect_args(name))  # type: ignore[arg-type]


def test_a_committed_load_is_told_while_a_starting_node_waits_for_the_restores_lock(
    postgres: PostgresSettings,
) -> None:
    with pgspool.held(postgres):  # the restore's lock, as replace_spool runs under it
        with _session(postgres, LOAD) as load:  # the dump's load, committed
            load.execute("CREATE TABLE outbound (x int)")
        node = _session(postgres, "medgw")  # a node starting meanwhile: waits, active
        waiting = threading.Thread(
            target=lambda: node.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        )
        waiting.start()
        assert pgspool._created(postgres, LOAD) is True
    waiting.join()
    node.close()


def test_a_load_whose_commit_is_not_read_yet_is_waited_for(postgres: PostgresSettings) -> None:
    """A killed pg_restore whose COMMIT its server process has not read yet: the session
    is idle in its transaction.  The answer waits for it to end, and is then right."""
    load = _session(postgres, LOAD)
    load.execute("CREATE TABLE outbound (x int)")  # in its transaction
    asked = threading.Event()

    def commit_later() -> None:
        asked.wait(10)
        load.commit()
        load.close()

    committing = threading.Thread(target=commit_later)
    committing.start()
    asked.set()
    assert pgspool._created(postgres, LOAD) is True
    committing.join()


def test_a_load_that_committed_nothing_is_told(postgres: PostgresSettings) -> None:
    load = _session(postgres, LOAD)
    load.execute("CREATE TABLE outbound (x int)")
    load.rollback()
    load.close()
    assert pgspool._created(postgres, LOAD) is False
