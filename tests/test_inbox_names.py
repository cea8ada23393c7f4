"""A document never replaces anything in the inbox, whatever its name and Message-ID.

Hostile names and Message-IDs from a configured peer: a name another document
took, the suffixed name the next clash would take, a folder's name, a link's
name, a service's name.  Every document lands in a file of its own, every
earlier file keeps its content, and a service's folder stays a folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.delivery.inbox import choose_target, remove_stale_work_files, work_name
from gateway.demo_run import drop_file
from gateway.errors import DeliveryError
from gateway.pki.demo import DemoLayout
from tests import as2client
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import lab_post, receipt_of
from tests.helpers.internal_system import set_services


def _send(layout: DemoLayout, filename: str, message_id: str, payload: bytes) -> None:
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        payload,
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        filename=filename,
        message_id=message_id,
    )
    answer = lab_post(layout, built.headers, built.body)
    assert answer.status == 200
    assert receipt_of(layout, answer).processed, filename


def test_hostile_names_and_message_ids_never_replace_a_file(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    inbox = layout.hospital.inbox_dir / "lab"
    inbox.mkdir(parents=True)
    (inbox / "folder.hl7").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the inbox's")
    (inbox / "link.hl7").symlink_to(outside)
    (inbox / "dangling.hl7").symlink_to(tmp_path / "nowhere")
    processes.start(layout.hospital.config_path)

    second = "<second@KITA-LAB>"
    # What the Message-ID-derived suffix of the next clash would have been.
    predicted = f"x-{hashlib.sha256(second.encode()).hexdigest()[:12]}.hl7"
    sent = [
        ("x.hl7", "<first@KITA-LAB>"),
        (predicted, "<squatter@KITA-LAB>"),
        ("x.hl7", second),
        ("x.hl7", "<third@KITA-LAB>"),
        ("../x.hl7", "<climber@KITA-LAB>"),
        ("X.HL7", "<upper@KITA-LAB>"),
        ("folder.hl7", "<folder@KITA-LAB>"),
        ("link.hl7", "<link@KITA-LAB>"),
        ("dangling.hl7", "<dangling@KITA-LAB>"),
        (".x.hl7.0123456789ab.delivering", "<work@KITA-LAB>"),
        ("", "<nameless@KITA-LAB>"),
        ("", "<nameless@KITA-LAB>".upper()),
    ]
    payloads = {}
    for number, (filename, message_id) in enumerate(sent):
        payloads[message_id] = f"document {number}: {filename} {message_id}".encode()
        _send(layout, filename, message_id, payloads[message_id])

    delivered = wait_for_events(layout.hospital.audit_log, "message.delivered", count=len(sent))
    assert len(delivered) == len(sent)
    files = {e["message_id"]: Path(e["detail"]["inbox_file"]) for e in delivered}
    assert len(set(files.values())) == len(sent), "two documents share a file"
    for message_id, path in files.items():
        assert path.parent == inbox and not path.is_symlink()
        assert path.read_bytes() == payloads[message_id], path.name
    assert files["<first@KITA-LAB>"].name == "x.hl7"
    assert files["<squatter@KITA-LAB>"].name == predicted
    assert files["<climber@KITA-LAB>"].name not in ("x.hl7", predicted)
    assert (inbox / "folder.hl7").is_dir() and not any((inbox / "folder.hl7").iterdir())
    assert outside.read_bytes() == b"not the inbox's"
    assert (inbox / "dangling.hl7").is_symlink() and not (tmp_path / "nowhere").exists()
    assert not [p for p in inbox.iterdir() if p.name.startswith(".")]  # no work file left
    assert files["<work@KITA-LAB>"].name == "x.hl7.0123456789ab.delivering"  # not hidden


def test_a_document_named_like_a_service_leaves_the_service_folder_alone(
    layout: DemoLayout, processes: Any
) -> None:
    set_services(layout, hospital_accepts='["lab-results"]', lab_sends='["lab-results"]')
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    _send(layout, "lab-results", "<named-like-a-service@KITA-LAB>", b"no service")
    _send(layout, "LAB-RESULTS", "<upper-case@KITA-LAB>", b"no service either")
    drop_file(layout.lab.outbox_for("hospital") / "lab-results", "r1.hl7", b"MSH|r1\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")

    inbox = layout.hospital.inbox_dir / "lab"
    assert (inbox / "lab-results").is_dir()
    assert (inbox / "lab-results" / "r1.hl7").read_bytes() == b"MSH|r1\r"
    loose = sorted(p.read_bytes() for p in inbox.iterdir() if p.is_file())
    assert loose == [b"no service", b"no service either"]
    assert all(
        p.name.startswith(("lab-results-", "LAB-RESULTS-")) for p in inbox.iterdir() if p.is_file()
    )


def test_a_file_where_a_service_folder_belongs_is_named_with_the_fix(
    layout: DemoLayout, processes: Any
) -> None:
    """An inbox from before: a document took the service's folder name."""
    set_services(layout, hospital_accepts='["lab-results"]', lab_sends='["lab-results"]')
    blocker = layout.hospital.inbox_dir / "lab" / "lab-results"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"an old document")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital") / "lab-results", "r1.hl7", b"MSH|r1\r")
    [failure] = wait_for_events(layout.lab.audit_log, "message.failed")
    assert failure["detail"]["disposition"] == "processed/error: unexpected-processing-error"
    [rejected] = wait_for_events(layout.hospital.audit_log, "message.rejected")
    assert f"{blocker} is a file, where medgw keeps a folder" in rejected["reason"]
    assert "move" in rejected["reason"] and "File exists" not in rejected["reason"]
    assert blocker.read_bytes() == b"an old document"
    assert not [p for p in blocker.parent.iterdir() if p.name.startswith(".")]


def test_the_suffix_of_a_clash_is_random_and_checked(tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "a.hl7").write_bytes(b"")
    names = {choose_target(tmp_path, "lab", "a.hl7", "<m@x>").name for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("a-") and n.endswith(".hl7") for n in names)

    # Every name taken, or claimed by a delivery in progress: none is chosen.
    with pytest.raises(DeliveryError, match="no free name"):
        choose_target(tmp_path, "lab", "a.hl7", "<m@x>", claimed=lambda _path: True)


def test_only_unrecorded_work_files_are_removed_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "lab" / "svc"
    folder.mkdir(parents=True)
    recorded, orphan = work_name(folder / "a.hl7", "gw-a"), work_name(folder / "b.hl7", "gw-a")
    others = [folder / ".a.hl7.0123456789ab.partial", folder / ".b.delivering", folder / "c"]
    for path in (recorded, orphan, *others):
        path.write_bytes(b"")
    assert remove_stale_work_files(tmp_path, {recorded}) == [orphan]
    assert sorted(os.listdir(folder)) == sorted(p.name for p in (recorded, *others))


def test_at_start_a_nodes_own_young_work_files_go_and_other_nodes_wait_a_lease(
    tmp_path: Path,
) -> None:
    """A kill between creating a work file and recording it leaves it unrecorded: the
    node removes its own at once, another node's (sharing the inbox) only once old."""
    folder = tmp_path / "lab"
    folder.mkdir()
    own, other = work_name(folder / "a.hl7", "gw-a"), work_name(folder / "b.hl7", "gw-b")
    old = work_name(folder / "c.hl7", "gw-b")
    for path in (own, other, old):
        path.write_bytes(b"partial")
    os.utime(old, (1_000.0, 1_000.0))
    removed = remove_stale_work_files(tmp_path, set(), older_than=2_000.0, own="gw-a")
    assert sorted(removed) == sorted([own, old])
    assert sorted(os.listdir(folder)) == [other.name]
