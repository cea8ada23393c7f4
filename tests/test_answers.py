"""Every answer to a peer's AS2 request is decided in one place (gateway.channel.answers).

Each kind of answer maps to exactly one HTTP status, one text and, for a refusal,
one audit event type; the handler of the daemon and the inbound pipeline name
kinds and never write a status of their own (read from their source, so that a
status added elsewhere later fails here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway.audit import EventType, Outcome
from gateway.channel.answers import ANSWERS, Answer, refusal_event, response

ROOT = Path(__file__).resolve().parent.parent / "gateway"
# Where AS2 requests are answered: they name kinds of answer, never a status.
DECIDERS = [*sorted((ROOT / "daemon").rglob("*.py")), *sorted((ROOT / "inbound").rglob("*.py"))]
# Refusals that are only logged: nothing is wrong with the request itself.
LOGGED_ONLY = {Answer.INCOMPLETE, Answer.TRUST_CHANGED, Answer.RECEIPT_NOT_BUILT}


def test_every_kind_has_exactly_one_status_text_and_event_type() -> None:
    assert set(ANSWERS) == set(Answer)
    for answer, rule in ANSWERS.items():
        assert isinstance(rule.status, int) and 200 <= rule.status <= 599, answer
        assert rule.event is None or isinstance(rule.event, EventType), answer
        if rule.status >= 400:
            assert rule.text.endswith("\n") and len(rule.text) < 80, answer
            assert (rule.event is None) == (answer in LOGGED_ONLY), answer
        else:
            assert rule.event is None, answer  # a receipt's outcome is audited with its check


def test_the_answer_a_peer_gets_is_the_tables_and_nothing_more() -> None:
    for answer, rule in ANSWERS.items():
        given = response(answer)
        assert given.status == rule.status
        assert given.body == rule.text.encode()
        assert given.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert given.headers.get("Retry-After") == (
            str(rule.retry_after) if rule.retry_after is not None else None
        )
        assert given.keep_alive is (False if rule.close else None), answer
    # a receipt's headers replace the refusal's
    mdn = response(Answer.RECEIPT, headers=(("Content-Type", "multipart/report"),), body=b"x")
    assert (mdn.status, mdn.headers["Content-Type"], mdn.body) == (200, "multipart/report", b"x")


def test_statuses_of_one_kind_of_failure_answer_the_same() -> None:
    # Who was refused for what is in the audit trail; the peer learns the status only.
    by_status: dict[int, set[str]] = {}
    for rule in ANSWERS.values():
        by_status.setdefault(rule.status, set()).add(rule.text)
    assert by_status[403] == {"forbidden\n"}
    assert by_status[400] == {"bad request\n", "incomplete request\n"}


@pytest.mark.parametrize("answer", [a for a in Answer if ANSWERS[a].event is not None])
def test_each_refusal_is_audited_with_its_event_type(answer: Answer) -> None:
    rule = ANSWERS[answer]
    event = refusal_event(answer, reason="why", remote="192.0.2.1", peer="lab", detail={"k": 1})
    assert (event.event, event.severity, event.outcome) == (
        rule.event,
        rule.severity,
        Outcome.FAILURE,
    )
    assert (event.direction, event.remote_address, event.peer) == ("inbound", "192.0.2.1", "lab")
    assert (event.reason, event.detail) == ("why", {"k": 1})


def _status_literals(path: Path) -> list[str]:
    """Calls in ``path`` that give an HTTP status as a number: web.Response(status=403),
    InboundResponse(200, ...), web.HTTPForbidden() and the like."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        numbers = [
            arg
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "status")]
            if isinstance(arg, ast.Constant) and type(arg.value) is int and 100 <= arg.value <= 599
        ]
        if numbers and ("Response" in name or "status" in {k.arg for k in node.keywords}):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
        elif name.startswith("web.HTTP"):
            found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_no_status_is_decided_outside_the_table() -> None:
    assert [p for p in DECIDERS if p.exists()] == DECIDERS
    assert [hit for path in DECIDERS for hit in _status_literals(path)] == []


def test_the_source_reader_finds_a_status_written_by_hand(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from aiohttp import web\n"
        "a = web.Response(status=403, text='no')\n"
        "b = InboundResponse(503, (), b'')\n"
        "c = web.HTTPForbidden()\n"
        "d = response(Answer.SUSPENDED)\n"
    )
    assert [hit.split(":")[1] for hit in _status_literals(sample)] == ["2", "3", "4"]
