"""A submitter's resend under its Idempotency-Key is never a second document: the
spool's unique index on (submitter, key) on both backends, across nodes, and the
local API's answers on real daemons.  Nor is a changed document under a key taken
for a resend: the document's SHA-256 is kept with the key."""

from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, Intake
from gateway.spool.postgres import PostgresSpool
from gateway.spool.postgres.schema import VERSION
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.conftest import MakeSpool
from tests.helpers.audit import events, wait_for_events
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.local_api import LIS_TOKEN, RIS_TOKEN, Api, enable_api
from tests.helpers.postgres import PostgresServer, spool_section

DOCUMENT = b"MSH|^~\\&|LIS|KITA|EHR|SAKURA|20260101||ORU^R01|IDEM-1|P|2.5\r"


def _intake(
    tmp_path: Path, message_id: str, key: str | None, by: str = "api:lis", sha256: str | None = None
) -> Intake:
    return Intake(
        message_id,
        "hospital",
        "a.hl7",
        "application/hl7-v2",
        tmp_path / "a",
        tmp_path / "a",
        submitted_by=by,
        idempotency_key=key,
        content_sha256=sha256,
    )


def test_a_key_names_one_message_per_submitter(tmp_path: Path, make_spool: MakeSpool) -> None:
    spool = make_spool(TickingClock())
    assert spool.add_intakes([_intake(tmp_path, "<1@lab>", "k1")]) == {}
    # The same submitter and key again: nothing recorded, the first one named.
    assert spool.add_intakes([_intake(tmp_path, "<2@lab>", "k1")]) == {"<2@lab>": "<1@lab>"}
    assert spool.get("<2@lab>") is None and spool.submitter("<2@lab>") is None
    assert spool.submitter("<1@lab>") == "api:lis"
    # Another submitter's key is its own; and without a key, as ever.
    assert spool.add_intakes([_intake(tmp_path, "<3@lab>", "k1", by="api:ris")]) == {}
    assert spool.add_intakes([_intake(tmp_path, "<4@lab>", None)]) == {}
    assert spool.add_intakes([_intake(tmp_path, "<5@lab>", None)]) == {}
    # Two with one key in one batch: the second is the first's resend.
    assert spool.add_intakes(
        [_intake(tmp_path, "<6@lab>", "k2"), _intake(tmp_path, "<7@lab>", "k2")]
    ) == {"<7@lab>": "<6@lab>"}
    assert (
        spool.add_intake(
            "<8@lab>",
            "hospital",
            "a.hl7",
            "application/hl7-v2",
            tmp_path / "a",
            tmp_path / "a",
            submitted_by="api:lis",
            idempotency_key="k2",
        )
        == "<6@lab>"
    )
    recorded = {r.message_id for r in spool.list_outbound()}
    assert recorded == {"<1@lab>", "<3@lab>", "<4@lab>", "<5@lab>", "<6@lab>"}
    # An intake abandoned (a submission answered 503) takes its key with it: a resend
    # under it is a new submission.
    assert spool.abandon_intake("<1@lab>")
    assert spool.add_intakes([_intake(tmp_path, "<9@lab>", "k1")]) == {}
    assert spool.get("<9@lab>") is not None


def test_a_spool_from_before_keys_gets_them_on_upgrade(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    old = make_spool(TickingClock())
    old.add_intakes([_intake(tmp_path, "<old@lab>", None)])
    # As a spool of the version before: no key column, no index on it.
    statements = [
        "DROP INDEX submissions_key",
        "ALTER TABLE submissions DROP COLUMN idempotency_key",
    ]
    if isinstance(old, PostgresSpool):
        statements.append(f"UPDATE spool_schema SET version={VERSION - 2}")
    old._transact(lambda db: [db.execute(statement, ()) for statement in statements])  # type: ignore[attr-defined]
    old.close()
    spool = make_spool(TickingClock())
    assert spool.submitter("<old@lab>") == "api:lis"
    assert spool.add_intakes([_intake(tmp_path, "<1@lab>", "k1")]) == {}
    assert spool.add_intakes([_intake(tmp_path, "<2@lab>", "k1")]) == {"<2@lab>": "<1@lab>"}
    assert {r.message_id for r in spool.list_outbound()} == {"<old@lab>", "<1@lab>"}


def test_the_documents_fingerprint_is_kept_with_its_key(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    first, other = "a" * 64, "b" * 64
    assert spool.add_intakes([_intake(tmp_path, "<1@lab>", "k1", sha256=first)]) == {}
    assert spool.submitted_sha256("<1@lab>") == first
    # A resend names the first message; the first one's fingerprint stays as it was.
    assert spool.add_intakes([_intake(tmp_path, "<2@lab>", "k1", sha256=other)]) == {
        "<2@lab>": "<1@lab>"
    }
    assert spool.submitted_sha256("<1@lab>") == first
    assert spool.submitted_sha256("<2@lab>") is None
    # Without a key nothing is kept (nothing to compare a resend with).
    assert spool.add_intakes([_intake(tmp_path, "<3@lab>", None, sha256=other)]) == {}
    assert spool.submitted_sha256("<3@lab>") is None


def test_a_key_from_before_fingerprints_has_none_after_the_upgrade(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    old = make_spool(TickingClock())
    old.add_intakes([_intake(tmp_path, "<old@lab>", "k1")])
    # As a spool of the version before: no fingerprint column.
    statements = ["ALTER TABLE submissions DROP COLUMN content_sha256"]
    if isinstance(old, PostgresSpool):
        statements.append(f"UPDATE spool_schema SET version={VERSION - 1}")
    old._transact(lambda db: [db.execute(statement, ()) for statement in statements])  # type: ignore[attr-defined]
    old.close()
    spool = make_spool(TickingClock())
    assert spool.submitted_sha256("<old@lab>") is None
    assert spool.add_intakes([_intake(tmp_path, "<again@lab>", "k1", sha256="c" * 64)]) == {
        "<again@lab>": "<old@lab>"
    }
    assert spool.add_intakes([_intake(tmp_path, "<new@lab>", "k2", sha256="d" * 64)]) == {}
    assert spool.submitted_sha256("<new@lab>") == "d" * 64


def test_two_nodes_submitting_one_key_at_once_record_one_message(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Two handles on one spool (on PostgreSQL: two nodes), each taking the same
    submitter's key at the same moment, 40 keys in turn: the unique index decides,
    one message per key, the other submission told its id."""
    nodes = [make_spool(TickingClock(), Claimant(f"node-{n}", 300.0)) for n in (1, 2)]
    answers: dict[str, list[tuple[str, str | None]]] = {}
    lock = threading.Lock()
    keys = [f"key-{i}" for i in range(40)]
    start = threading.Barrier(2)

    def submitter(n: int) -> None:
        for key in keys:
            start.wait(timeout=60)
            message_id = f"<{key}.{n}@lab>"
            earlier = nodes[n].add_intake(
                message_id,
                "hospital",
                "a.hl7",
                "application/hl7-v2",
                tmp_path / "a",
                tmp_path / "a",
                submitted_by="api:lis",
                idempotency_key=key,
            )
            with lock:
                answers.setdefault(key, []).append((message_id, earlier))

    threads = [threading.Thread(target=submitter, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    recorded = sorted(r.message_id for r in nodes[0].list_outbound())
    assert len(recorded) == len(keys)
    for key in keys:
        pair = answers[key]
        [winner] = [m for m, earlier in pair if earlier is None]
        [(loser, named)] = [(m, e) for m, e in pair if e is not None]
        assert named == winner and winner in recorded and loser not in recorded


def _post(
    api: Api, key: str | None, filename: str = "result.hl7", body: bytes = DOCUMENT, **kw: Any
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/hl7-v2"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return api.request(
        "POST",
        f"/v1/messages?to=hospital&filename={filename}",
        token=kw.pop("token", LIS_TOKEN),
        body=body,
        headers=headers,
        **kw,
    )


def _queued(layout: DemoLayout) -> list[dict[str, Any]]:
    listed = medgw("queue", "list", "--config", str(layout.lab.config_path), "--json")
    assert listed.returncode == 0, listed.stderr
    found: list[dict[str, Any]] = json.loads(listed.stdout)
    return found


def _inbox(layout: DemoLayout) -> list[Path]:
    return sorted(p for p in (layout.hospital.inbox_dir / "lab").glob("*") if p.is_file())


def test_a_resend_under_one_key_is_one_document_for_the_peer(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    status, first = _post(api, "order-1")
    assert status == 202, first
    assert "resent" not in first
    # The submitter heard nothing (say) and sends it again, on the unix socket too.
    for unix in (False, True):
        status, again = _post(api, '"order-1"' if unix else "order-1", unix=unix)
        assert status == 200, again
        assert again["message_id"] == first["message_id"] and again["resent"] is True
        assert again["submitted_by"] == "api:lis"
    # Another client's same key is its own document.
    status, other = _post(api, "order-1", filename="other.hl7", token=RIS_TOKEN)
    assert status == 202 and other["message_id"] != first["message_id"], other
    # Two submissions with one key at the same moment: one message.
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: _post(api, "order-2", filename="twice.hl7"), range(2)))
    assert sorted(s for s, _ in both) == [200, 202], both
    assert both[0][1]["message_id"] == both[1][1]["message_id"]
    # The key reused for another document: refused, nothing spooled.
    status, reused = _post(api, "order-1", filename="another.hl7")
    assert status == 422 and first["message_id"] in reused["error"], reused
    assert "key of its own" in reused["fix"]

    for message_id in (first["message_id"], other["message_id"], both[0][1]["message_id"]):
        assert (
            api.wait_final(
                message_id, LIS_TOKEN if message_id != other["message_id"] else RIS_TOKEN
            )["state"]
            == "delivered"
        )
    assert [p.name for p in _inbox(layout)] == ["other.hl7", "result.hl7", "twice.hl7"]
    assert len(_queued(layout)) == 3
    duplicates = wait_for_events(layout.lab.audit_log, "message.duplicate", count=4)
    assert sorted(d["outcome"] for d in duplicates) == ["failure", "success", "success", "success"]
    assert {d["detail"]["idempotency_key"] for d in duplicates} == {"order-1", "order-2"}
    # Each message accepted once.
    assert len(events(layout.lab.audit_log, "message.accepted")) == 3


def test_a_malformed_key_is_refused_before_anything_is_spooled(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.lab.config_path)
    for key in ("", "a b", "x" * 129, '""', '"a\\b"', 'a"b', "caf\u00e9"):
        status, answer = _post(api, key)
        assert status == 400, (key, answer)
        assert "Idempotency-Key" in answer["error"] and "same one" in answer["fix"]
    # Two Idempotency-Key headers: which one is meant is not known.
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/messages?to=hospital")
        for header, value in (
            ("Authorization", f"Bearer {LIS_TOKEN}"),
            ("Idempotency-Key", "a"),
            ("Idempotency-Key", "b"),
            ("Content-Length", "1"),
        ):
            connection.putheader(header, value)
        connection.endheaders(b"x")
        response = connection.getresponse()
        assert response.status == 400, response.read()
    finally:
        connection.close()
    status, longest = _post(api, "x" * 128)
    assert status == 202, longest
    assert len(_queued(layout)) == 1


def test_a_node_killed_before_its_answer_answers_the_resend_with_that_message(
    layout: DemoLayout, processes: Any
) -> None:
    """Killed right after the intake's commit, before the 202: the submitter saw the
    connection drop and sends again with its key; the restarted node names the message
    it recorded, and the peer gets one document."""
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path,
        prefix=killed_at("--kill-after", "gateway.spool.sqlite.outbound:OutboundQueue.add_intake"),
    )
    try:
        answer: tuple[int, Any] | None = _post(api, "order-9")
    except (http.client.HTTPException, ConnectionError):
        answer = None
    assert answer is None, answer
    wait_killed(lab)
    processes.start(layout.lab.config_path)
    status, again = _post(api, "order-9")
    assert status == 200 and again["resent"] is True, again
    assert api.wait_final(again["message_id"], LIS_TOKEN)["state"] == "delivered"
    assert [m["message_id"] for m in _queued(layout)] == [again["message_id"]]
    assert [p.read_bytes() for p in _inbox(layout)] == [DOCUMENT]


def _drop_fingerprints(layout: DemoLayout, server: PostgresServer | None, dbname: str) -> None:
    """Make the lab's spool (stopped) one of the release before fingerprints were kept."""
    if server is None:
        db = sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3")
        try:
            db.execute("ALTER TABLE submissions DROP COLUMN content_sha256")
            db.commit()
        finally:
            db.close()
        return
    with server.admin(dbname) as admin:
        admin.execute("ALTER TABLE submissions DROP COLUMN content_sha256")
        admin.execute(f"UPDATE spool_schema SET version={VERSION - 1}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_changed_document_under_a_key_is_refused_not_answered_with_the_first(
    layout: DemoLayout, processes: Any, request: pytest.FixtureRequest, backend: str
) -> None:
    """The administrator fixed the document and sent it again under its key: refused
    (422), nothing spooled; the unchanged document is still a resend.  A key recorded
    before the upgrade that keeps fingerprints cannot tell: refused too."""
    api = enable_api(layout)
    server: PostgresServer | None = None
    dbname = ""
    if backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        settings = server.new_database()
        dbname = settings.dbname
        with layout.lab.config_path.open("a") as config:
            config.write(spool_section(settings))
    lab = processes.start(layout.lab.config_path)  # the peer is down: the first stays queued
    status, first = _post(api, "order-1")
    assert status == 202, first
    message_id = first["message_id"]

    changed = DOCUMENT.replace(b"IDEM-1", b"IDEM-2")
    status, refused = _post(api, "order-1", body=changed)
    assert status == 422, refused
    assert set(refused) == {"error", "fix"}, refused
    assert "'order-1'" in refused["error"] and message_id in refused["error"]
    assert "SHA-256 differs" in refused["error"]
    assert refused["fix"].startswith(
        "a changed document is a new submission: send it with a new key"
    )
    # The same document again: a resend, as ever.
    status, again = _post(api, "order-1")
    assert status == 200 and again["resent"] is True, again
    assert again["message_id"] == message_id
    assert [m["message_id"] for m in _queued(layout)] == [message_id]
    refusal, resend = wait_for_events(layout.lab.audit_log, "message.duplicate", count=2)
    assert refusal["outcome"] == "failure" and refusal["message_id"] == message_id
    assert "changed document" in refusal["reason"]
    assert refusal["detail"]["idempotency_key"] == "order-1"
    assert refusal["detail"]["content_sha256"] == hashlib.sha256(changed).hexdigest()
    assert refusal["detail"]["earlier_content_sha256"] == hashlib.sha256(DOCUMENT).hexdigest()
    assert resend["outcome"] == "success" and "content_sha256" not in resend["detail"]

    # Upgraded from the release before: the key's fingerprint is not known.
    assert lab.stop() == 0
    _drop_fingerprints(layout, server, dbname)
    processes.start(layout.lab.config_path)
    status, unknown = _post(api, "order-1")
    assert status == 422, unknown
    assert message_id in unknown["error"] and "cannot tell" in unknown["error"]
    assert f"taken already as {message_id}" in unknown["fix"]
    assert "send it with a new key" in unknown["fix"]
    # A new key is a new document.
    status, fixed = _post(api, "order-1b", body=changed)
    assert status == 202, fixed
    assert {m["message_id"] for m in _queued(layout)} == {message_id, fixed["message_id"]}
    duplicates = wait_for_events(layout.lab.audit_log, "message.duplicate", count=3)
    assert duplicates[2]["outcome"] == "failure"
    assert duplicates[2]["detail"]["earlier_content_sha256"] is None
