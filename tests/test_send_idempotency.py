"""``medgw send`` sends every document with an Idempotency-Key over the control socket:
a resend with that key is the same document (one message, one copy at the peer), and
the command printed when contact is lost is that resend.  Real daemons, real sockets."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.postgres import spool_section

DOCUMENT = b"MSH|^~\\&|LIS|KITA|EHR|SAKURA|20260101||ORU^R01|SENDKEY-1|P|2.5\r"
# A new key as medgw send makes it: secrets.token_urlsafe(24).
NEW_KEY = re.compile(r"[A-Za-z0-9_-]{32}")


def _env(**extra: str) -> dict[str, str]:
    """This environment without a name passed by sudo, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    return env | extra


def _send(layout: DemoLayout, *args: str | Path, **extra: str) -> Any:
    return medgw("send", *args, "--config", layout.lab.config_path, env=_env(**extra), timeout=180)


def _keys(layout: DemoLayout) -> dict[str, str | None]:
    """Message-ID -> the idempotency key the lab's spool recorded with it."""
    spool = sqlite3.connect(f"file:{layout.lab.root / 'state' / 'spool.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(spool.execute("SELECT message_id, idempotency_key FROM submissions"))
    finally:
        spool.close()


def _queued(layout: DemoLayout) -> list[str]:
    listed = medgw("queue", "list", "--config", layout.lab.config_path, "--json")
    assert listed.returncode == 0, listed.stderr
    return [m["message_id"] for m in json.loads(listed.stdout)]


def _inbox(layout: DemoLayout) -> list[Path]:
    return sorted(p for p in (layout.hospital.inbox_dir / "lab").glob("*") if p.is_file())


def _delivered_id(stdout: str) -> str:
    """The Message-ID of the report medgw send prints once the message is final."""
    first = stdout.splitlines()[0].split()
    assert first[0] == "delivered", stdout
    return first[1]


def _printed_resend(stderr: str, sudo: list[str]) -> list[str]:
    """The command the failed send printed to run again (after ``sudo``), as argv with
    this interpreter."""
    [line] = [line for line in stderr.splitlines() if line.startswith("    ") and "send" in line]
    words = shlex.split(line)
    assert words[: len(sudo) + 2] == [*sudo, "medgw", "send"], line
    return [sys.executable, "-m", "gateway", *words[len(sudo) + 1 :]]


def test_the_key_is_recorded_and_a_resend_under_it_is_one_document(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = tmp_path / "result.hl7"
    document.write_bytes(DOCUMENT)
    first = _send(layout, document, "--to", "hospital", "--idempotency-key", "order-7")
    assert first.returncode == 0, first.stderr
    message_id = _delivered_id(first.stdout)
    assert _keys(layout) == {message_id: "order-7"}

    # The same document sent again with its key, by another person through sudo as the
    # same account: the gateway answers with the first message; nothing new is spooled.
    again = _send(
        layout, document, "--to", "hospital", "--idempotency-key", "order-7", SUDO_USER="night"
    )
    assert again.returncode == 0, again.stderr
    assert f"already spooled as {message_id} under idempotency key 'order-7'" in again.stderr
    assert _delivered_id(again.stdout) == message_id
    assert _queued(layout) == [message_id]
    assert [p.read_bytes() for p in _inbox(layout)] == [DOCUMENT]
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
    [duplicate] = wait_for_events(layout.lab.audit_log, "message.duplicate")
    assert duplicate["outcome"] == "success" and duplicate["message_id"] == message_id
    assert duplicate["detail"]["idempotency_key"] == "order-7"
    assert "claims to be night" in duplicate["detail"]["submitted_by"]
    [accepted] = events(layout.lab.audit_log, "message.accepted")
    assert accepted["message_id"] == message_id

    # Without --idempotency-key a new random key goes with each document.
    other = tmp_path / "other.hl7"
    other.write_bytes(DOCUMENT.replace(b"SENDKEY-1", b"SENDKEY-2"))
    sent = _send(layout, other, "--to", "hospital", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    second = sent.stdout.strip()
    keys = _keys(layout)
    assert set(keys) == {message_id, second}
    assert NEW_KEY.fullmatch(keys[second] or ""), keys


def test_exit_3_before_the_answer_prints_the_resend_that_finds_the_document(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """The daemon is killed right after the commit that spooled the document, before it
    answered: send exits 3 with a command; run once medgw is back, that command is
    answered with the spooled message, which the peer receives once."""
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path,
        prefix=killed_at("--kill-after", "gateway.spool.sqlite.outbound:OutboundQueue.add_intake"),
    )
    document = tmp_path / "urgent.hl7"
    document.write_bytes(DOCUMENT)
    # Run through sudo by a person: the command to run again says which account.
    lost = _send(layout, document, "--to", "hospital", "--patient", "P-1", SUDO_USER="night")
    assert lost.returncode == 3, lost.stdout + lost.stderr
    assert "lost contact with the daemon before it confirmed urgent.hl7" in lost.stderr
    assert "recognises the document by its idempotency key" in lost.stderr
    assert "Traceback" not in lost.stderr
    resend = _printed_resend(lost.stderr, ["sudo", "-u", pwd.getpwuid(os.getuid()).pw_name])
    [key] = [w.removeprefix("--idempotency-key=") for w in resend if w.startswith("--idem")]
    assert NEW_KEY.fullmatch(key), resend
    assert resend[3:] == [
        "send",
        str(document),
        "--to",
        "hospital",
        "--patient",
        "P-1",
        "--config",
        str(layout.lab.config_path),
        f"--idempotency-key={key}",
    ]
    wait_killed(lab)
    [recorded] = _queued(layout)  # spooled before the kill
    assert _keys(layout) == {recorded: key}

    processes.start(layout.lab.config_path)
    done = _run(resend, tmp_path, SUDO_USER="night")  # as sudo runs it
    assert done.returncode == 0, done.stderr
    assert f"already spooled as {recorded}" in done.stderr
    assert _delivered_id(done.stdout) == recorded
    assert _queued(layout) == [recorded]
    assert [p.read_bytes() for p in _inbox(layout)] == [DOCUMENT]
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1


def test_an_internal_error_exits_3_and_the_resend_spools_what_was_never_recorded(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """The spool's first write of a submission fails (an I/O error): the gateway
    answers 500, which says nothing of whether the document was recorded; send exits 3,
    and the printed command, run at once, spools it now: one document for the peer."""
    processes.start(layout.hospital.config_path)
    processes.start(
        layout.lab.config_path,
        prefix=killed_at("--fail-once", "gateway.spool.sqlite.outbound:OutboundQueue.add_intake"),
    )
    document = tmp_path / "late.hl7"
    document.write_bytes(DOCUMENT)
    failed = _send(layout, document, "--to", "hospital", "--idempotency-key", "order-500")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "the gateway could not take late.hl7 (HTTP 500" in failed.stderr
    assert "Traceback" not in failed.stderr
    resend = _printed_resend(failed.stderr, [])
    assert resend[-1] == "--idempotency-key=order-500"
    assert _queued(layout) == []
    done = _run(resend, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "already spooled" not in done.stderr and "spooled as <" in done.stderr
    [message_id] = _queued(layout)
    assert _delivered_id(done.stdout) == message_id
    assert _keys(layout) == {message_id: "order-500"}
    assert [p.read_bytes() for p in _inbox(layout)] == [DOCUMENT]


def test_a_document_the_gateway_cannot_store_now_exits_3_with_the_resend(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """Storing the upload fails (an I/O error on the spool's disk): answered 503, the
    gateway cannot store it just now; send exits 3 (not 1, "refused": with a key, a
    document answered 503 may have been recorded and is then sent) and its command,
    run again, spools it once."""
    processes.start(layout.hospital.config_path)
    processes.start(
        layout.lab.config_path,
        prefix=killed_at("--fail-once", "gateway.outbound.submit:_rename_durably"),
    )
    document = tmp_path / "disk.hl7"
    document.write_bytes(DOCUMENT)
    failed = _send(layout, document, "--to", "hospital")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "the gateway could not take disk.hl7 (HTTP 503: the gateway cannot store" in (
        failed.stderr
    )
    assert "it may have been recorded all the same" in failed.stderr
    assert "later, run exactly this" in failed.stderr and "Traceback" not in failed.stderr
    resend = _printed_resend(failed.stderr, [])
    assert _queued(layout) == []
    done = _run(resend, tmp_path)
    assert done.returncode == 0, done.stderr
    [message_id] = _queued(layout)
    assert _delivered_id(done.stdout) == message_id
    assert [p.read_bytes() for p in _inbox(layout)] == [DOCUMENT]


def _run(argv: list[str], cwd: Path, **extra: str) -> Any:
    """``argv`` from another folder, as an administrator would later."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=180, check=False, env=_env(**extra), cwd=cwd
    )


def test_a_key_reused_for_another_document_is_refused(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.lab.config_path)  # the peer is down: the first stays queued
    first = tmp_path / "first.hl7"
    first.write_bytes(DOCUMENT)
    # A key may begin with '-': given in the --option=value form.
    sent = _send(layout, first, "--to", "hospital", "--idempotency-key=-k1", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    second = tmp_path / "second.hl7"
    second.write_bytes(DOCUMENT)
    refused = _send(layout, second, "--to", "hospital", "--idempotency-key=-k1", "--no-wait")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused: Idempotency-Key '-k1' names an earlier submission" in refused.stderr
    assert "with another peer, service, file name or media type" in refused.stderr
    assert message_id in refused.stderr and "nothing new was spooled" in refused.stderr
    assert "fix: send each document with a key of its own" in refused.stderr
    assert refused.stdout == "" and "Traceback" not in refused.stderr
    assert _queued(layout) == [message_id]
    [duplicate] = wait_for_events(layout.lab.audit_log, "message.duplicate")
    assert duplicate["outcome"] == "failure"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_changed_file_run_again_with_its_key_is_refused(
    layout: DemoLayout, processes: Any, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """The administrator fixed the file and ran the command with its key again: exit 1,
    nothing spooled (the peer must not get the first version as if it were the fix);
    the file as it was first sent is still a resend."""
    if backend == "postgresql":
        settings = request.getfixturevalue("postgres")
        with layout.lab.config_path.open("a") as config:
            config.write(spool_section(settings))
    processes.start(layout.lab.config_path)  # the peer is down: the first stays queued
    document = tmp_path / "result.hl7"
    document.write_bytes(DOCUMENT)
    sent = _send(layout, document, "--to", "hospital", "--idempotency-key=rx-7", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()

    document.write_bytes(DOCUMENT.replace(b"SENDKEY-1", b"SENDKEY-1-FIXED"))
    refused = _send(layout, document, "--to", "hospital", "--idempotency-key=rx-7", "--no-wait")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused: Idempotency-Key 'rx-7' names an earlier submission" in refused.stderr
    assert message_id in refused.stderr and "SHA-256 differs" in refused.stderr
    assert "nothing new was spooled" in refused.stderr
    assert "a changed document is a new submission: send it with a new key" in refused.stderr
    assert refused.stdout == "" and "Traceback" not in refused.stderr
    assert _queued(layout) == [message_id]

    document.write_bytes(DOCUMENT)
    again = _send(layout, document, "--to", "hospital", "--idempotency-key=rx-7", "--no-wait")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == message_id
    assert f"already spooled as {message_id}" in again.stderr
    assert _queued(layout) == [message_id]
    refusal, resend = wait_for_events(layout.lab.audit_log, "message.duplicate", count=2)
    assert refusal["outcome"] == "failure" and "changed document" in refusal["reason"]
    assert resend["outcome"] == "success"


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("", "''"),
        ("a b", "'a b'"),
        ("x" * 129, repr("x" * 129)),
        ('a"b', "'a\"b'"),
        ("a\\b", "'a\\\\b'"),
        ("caf\u00e9", "'caf\\xe9'"),
    ],
)
def test_a_key_that_is_not_one_is_a_usage_error(
    layout: DemoLayout, tmp_path: Path, key: str, shown: str
) -> None:
    document = tmp_path / "a.hl7"
    document.write_bytes(DOCUMENT)
    result = _send(layout, document, "--to", "hospital", f"--idempotency-key={key}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--idempotency-key {shown} is not an idempotency key" in result.stderr
    assert "1 to 128 visible ASCII characters, without '\"' or '\\' inside" in result.stderr
    assert "fix: give the key medgw send printed" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_kept_before_fingerprints_is_refused_saying_the_document_may_be_on_its_way(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """A key recorded by a release that kept no fingerprint: the gateway cannot tell
    whether the file is the same one.  Told so, with the message it may already be: never
    that it 'names another document', which would have the admin send it twice."""
    processes.start(layout.lab.config_path)  # the peer is down: the first stays queued
    document = tmp_path / "result.hl7"
    document.write_bytes(DOCUMENT)
    sent = _send(layout, document, "--to", "hospital", "--idempotency-key=rx-8", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    spool = sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3", timeout=30)
    with spool:  # as a spool of the release before fingerprints has it
        spool.execute("UPDATE submissions SET content_sha256 = NULL")
    spool.close()

    refused = _send(layout, document, "--to", "hospital", "--idempotency-key=rx-8", "--no-wait")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "another document" not in refused.stderr
    assert "it cannot tell whether this is the same document" in refused.stderr
    assert f"it was taken already as {message_id}: follow that message" in refused.stderr
    assert refused.stdout == "" and "Traceback" not in refused.stderr
    assert _queued(layout) == [message_id]
