"""A receipt kept in a message's spool row and replaced outside medgw by another that
the same peer validly signed (another message's) is not shown as that message's: the
readers of row receipts compare it with the SHA-256 recorded when it settled the
message, and say the spool was altered.  Real daemons, on each backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import MAGIC, seal_bytes
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.outbound.status import ALTERED_FIX, MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.spool import open_spool
from gateway.spool.postgres import PostgresSettings
from gateway.spool.records import receipt_item
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.cluster import add_node
from tests.helpers.local_api import LIS_TOKEN, Api, enable_api, two_delivered

ALTERED = "does not match the receipt recorded when the message was settled"


@pytest.fixture(params=["sqlite", "postgresql"])
def lab_spool(request: pytest.FixtureRequest) -> PostgresSettings | None:
    """The lab's spool: SQLite (None), or a database of its own on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return None
    settings: PostgresSettings = request.getfixturevalue("postgres")
    return settings


def _configure(layout: DemoLayout, postgres: PostgresSettings | None) -> None:
    """The lab's spool in PostgreSQL, if given (after its [api], if any)."""
    if postgres is not None:
        add_node(layout.lab, "lab-a", postgres)


def _replace_receipt(
    layout: DemoLayout, postgres: PostgresSettings | None, victim: str, donor: str
) -> None:
    """``victim``'s row receipt replaced by ``donor``'s, sealed at rest under the victim's
    own data key (as one who can write the spool and read the key folder would): it
    opens and verifies as the victim's receipt would."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None and config.at_rest.enabled
    spool = open_spool(config.storage.spool_path, SystemClock(), postgres)
    try:
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        stored = spool.stored_receipt(donor, MAX_SEALED_RECEIPT)
        assert stored is not None
        plain = vault.open_bytes(receipt_item(donor), stored)
        item = receipt_item(victim)
        sealed = seal_bytes(vault._key(item), item, plain)
        spool._write("UPDATE outbound SET receipt=? WHERE message_id=?", (sealed, victim))  # type: ignore[attr-defined]
        assert (
            vault.open_bytes(item, spool.stored_receipt(victim, MAX_SEALED_RECEIPT) or b"") == plain
        )
    finally:
        spool.close()


def _copy_sealed(
    layout: DemoLayout, postgres: PostgresSettings | None, victim: str, donor: str
) -> None:
    """``victim``'s row receipt replaced by ``donor``'s as stored, sealed under the donor's
    data key (as one who can write the spool, but not read the keys, would)."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None and config.at_rest.enabled  # the receipts are sealed
    spool = open_spool(config.storage.spool_path, SystemClock(), postgres)
    try:
        stored = spool.stored_receipt(donor, MAX_SEALED_RECEIPT)
        assert stored is not None and stored.startswith(MAGIC), stored
        spool._write("UPDATE outbound SET receipt=? WHERE message_id=?", (stored, victim))  # type: ignore[attr-defined]
    finally:
        spool.close()


def _lab_and_hospital(
    layout: DemoLayout, processes: Any, postgres: PostgresSettings | None
) -> tuple[Api, Any]:
    """Both daemons running, the lab's local API enabled and its spool in PostgreSQL if
    ``postgres`` is given: the lab's API, and the lab's process."""
    api = enable_api(layout)
    _configure(layout, postgres)
    processes.start(layout.hospital.config_path)
    return api, processes.start(layout.lab.config_path)


def test_a_row_receipt_copied_from_another_row_is_reported_altered_and_audited_once(
    layout: DemoLayout, processes: Any, lab_spool: PostgresSettings | None
) -> None:
    """A sealed receipt copied from another row fails its at-rest check (it is sealed
    under the other message's key, for the other message): the status says the spool
    was altered, with the fix for that (not the fix of a body that failed its check,
    which is to cancel the message), and shows neither it nor the row's disposition."""
    api, lab = _lab_and_hospital(layout, processes, lab_spool)
    victim, donor = two_delivered(api)
    _copy_sealed(layout, lab_spool, victim, donor)
    for _ in range(2):
        status, view = api.request("GET", f"/v1/messages/{victim}", token=LIS_TOKEN)
        assert status == 200, view
        receipt = view["receipt"]
        assert receipt["verified"] is False and receipt["altered"] is True, receipt
        assert not {"disposition", "signer", "original_message_id"} & set(receipt)
        error = receipt["error"]
        assert f"outbound-receipt:{victim}" in error and "fails its integrity check" in error
        assert ALTERED_FIX in error and "cancel" not in error, error
        assert view["state"] == "delivered" and view["disposition"] is None, view
    [alert] = wait_for_events(layout.lab.audit_log, "atrest.integrity_failed")
    assert alert["message_id"] == victim and alert["severity"] == "alert", alert
    assert alert["detail"]["fix"] == ALTERED_FIX and alert["detail"]["receipt"] == "spool"
    assert len(events(layout.lab.audit_log, "atrest.integrity_failed")) == 1
    assert lab.stop() == 0


def test_the_local_api_does_not_show_a_row_receipt_replaced_by_another(
    layout: DemoLayout, processes: Any, lab_spool: PostgresSettings | None
) -> None:
    api, lab = _lab_and_hospital(layout, processes, lab_spool)
    sent = two_delivered(api)
    victim, donor = sent
    _replace_receipt(layout, lab_spool, victim, donor)

    status, view = api.request("GET", f"/v1/messages/{victim}", token=LIS_TOKEN)
    assert status == 200, view
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert victim in receipt["error"] and ALTERED in receipt["error"]
    assert "restore the spool from a backup" in receipt["error"]
    assert not {"disposition", "signer", "original_message_id"} & set(receipt)
    # The row's disposition is the altered spool's word: not shown as if verified.
    assert view["state"] == "delivered" and view["disposition"] is None, view
    # An alert in the audit trail (written before the answer); once, however often the
    # client asks again.
    [alert] = wait_for_events(layout.lab.audit_log, "atrest.integrity_failed")
    assert alert["message_id"] == victim and alert["severity"] == "alert", alert
    assert ALTERED in alert["reason"] and "restore them" in alert["detail"]["fix"], alert
    status, view = api.request("GET", f"/v1/messages/{victim}", token=LIS_TOKEN)
    assert status == 200 and view["receipt"]["altered"] is True, view
    assert len(events(layout.lab.audit_log, "atrest.integrity_failed")) == 1
    status, view = api.request("GET", f"/v1/messages/{donor}", token=LIS_TOKEN)
    assert status == 200 and view["receipt"]["verified"] is True, view  # its own, untouched
    assert view["disposition"] == "processed", view
    assert lab.stop() == 0


def test_medgw_send_does_not_show_a_row_receipt_replaced_by_another(
    layout: DemoLayout, processes: Any, lab_spool: PostgresSettings | None, tmp_path: Path
) -> None:
    """``medgw send`` (the control socket's status, followed until final): a resend
    under the same idempotency key reports the message it has, receipt included."""
    _configure(layout, lab_spool)
    config = str(layout.lab.config_path)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    documents = [tmp_path / "a.hl7", tmp_path / "b.hl7"]
    sent = []
    for document in documents:
        document.write_bytes(b"MSH|" + document.name.encode() + b"\r")
        done = medgw(
            "send",
            document,
            "--to",
            "hospital",
            "--idempotency-key",
            document.stem,
            "--config",
            config,
        )
        assert done.returncode == 0, done.stderr
        assert "signed by" in done.stdout, done.stdout
        first = done.stdout.splitlines()[0].split()
        assert first[0] == "delivered", done.stdout
        sent.append(first[1])
    victim, donor = sent
    _replace_receipt(layout, lab_spool, victim, donor)

    again = medgw(
        "send", documents[0], "--to", "hospital", "--idempotency-key", "a", "--config", config
    )
    assert again.returncode == 1, again.stderr  # not "delivered and verified"
    assert "already spooled as" in again.stderr, again.stderr
    assert "the spool was altered outside medgw" in again.stderr, again.stderr
    assert again.stdout.splitlines()[0].split() == ["delivered", victim], again.stdout
    assert "NOT SHOWN, altered" in again.stdout and ALTERED in again.stdout, again.stdout
    assert "restore the spool from a backup" in again.stdout
    assert "signed by" not in again.stdout and "disposition" not in again.stdout
    assert lab.stop() == 0
