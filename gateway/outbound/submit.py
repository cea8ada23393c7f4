"""Documents submitted over HTTP (the local API, the control socket).

The body is streamed to a temporary file in the spool, fsync'ed and renamed,
then the ``intake`` row is written together with who submitted it, and from
there on it is prepared exactly like a document from the outbox.  A payload
file without a row (killed between the rename and the row) is removed at
start-up (see :mod:`gateway.outbound.recover`): its submitter never got a
Message-ID and submits again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gateway.as2.headers import new_message_id
from gateway.atrest import new_data_key, storing
from gateway.atrest.chunked import SealingWriter
from gateway.audit import EventType, Outcome, Severity
from gateway.errors import SpoolError
from gateway.fsutil import fsync_dir, storage_fix
from gateway.intake.submit import RESENT, Submission, SubmissionRefused
from gateway.outbound.context import Context
from gateway.outbound.seal import Sealer
from gateway.outbound.status import MessageStatus
from gateway.routing import LOCAL_INTAKE
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.records import payload_item

WRITE_BATCH = 1 << 20  # bytes gathered from the request before one write in a worker thread


@dataclass(frozen=True)
class _Unknown:
    """A submission answered 503 that the spool may have recorded all the same: its
    document's copy (kept until that is known) and what it asked for."""

    payload_path: Path
    submission: Submission


class Submissions:
    """Documents streamed by local submitters, spooled and handed to the sealer."""

    def __init__(self, context: Context, sealer: Sealer, status: MessageStatus) -> None:
        self._ctx = context
        self._sealer = sealer
        self._status = status
        # Submissions answered 503 that the spool may have recorded all the same (a
        # commit whose outcome is unknown: its connection lost), settled before the next
        # submission is taken: one without an Idempotency-Key is removed, so that the
        # resend is the one message; one with a key is prepared (a resend under it, on
        # any node, is answered with it: it must be the document sent); one another
        # node holds meanwhile stays.
        self._unabandoned: dict[str, _Unknown] = {}

    async def submit(self, submission: Submission, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Spool a document streamed from a local submitter; returns the message's view.

        Memory use does not grow with the body: chunks are gathered up to
        WRITE_BATCH and written, and added to the document's SHA-256, by a worker
        thread.  Raises SubmissionRefused (unknown peer, empty, too large) before
        anything is recorded; and (422) for a resend under an Idempotency-Key that
        names another document (see :meth:`_resent`).
        """
        peer = self._ctx.config.peer(submission.peer)
        if peer is None:
            known = ", ".join(p.name for p in self._ctx.config.peers) or "(none)"
            raise SubmissionRefused(
                f"no peer named {submission.peer!r}",
                fix=f"use one of: {known}",
                status=404,
            )
        if submission.service is not None and submission.service not in peer.services:
            configured = ", ".join(peer.services) or "none"
            raise SubmissionRefused(
                f"peer {peer.name!r} has no service {submission.service!r} "
                f"(its services: {configured})",
                fix=f"use one of its services, leave the service out, or add it to `services` "
                f"in {peer.source.name} once agreed with the peer",
                status=400,
            )
        limit = self._ctx.config.runtime.max_message_bytes
        message_id = new_message_id(self._ctx.config.as2_id)
        item = payload_item(message_id)
        # Encrypted at rest as it arrives, under a key wrapped only once it is stored
        # with the row (a key rotation does not wait for a slow upload).
        dek = new_data_key(self._ctx.vault)
        token = os.urandom(12).hex()
        payload_path = self._ctx.payloads / token
        partial = self._ctx.payloads / f".{token}.{secrets.token_hex(6)}.partial"
        # The document's fingerprint as submitted (before it is encrypted at rest), kept
        # with its Idempotency-Key: a resend under that key must be the same bytes.
        digest = hashlib.sha256()
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb", closefd=True) as out:
                sink = out if dek is None else SealingWriter(dek, item, out)
                size = 0
                batch: list[bytes] = []
                batched = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise SubmissionRefused(
                            f"the document is larger than runtime.max_message_bytes ({limit})",
                            fix="send a smaller document, or raise max_message_bytes in "
                            "gateway.toml (the peer must accept it too)",
                            status=413,
                        )
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= WRITE_BATCH:
                        await asyncio.to_thread(_write_batch, sink, batch, digest)
                        batch, batched = [], 0
                if size == 0:
                    raise SubmissionRefused(
                        "the request body is empty", fix="send the document as the body", status=400
                    )
                await asyncio.to_thread(_finish_file, out, sink, batch, digest)
            await asyncio.to_thread(_rename_durably, partial, payload_path)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                # This disk, not the submitter (who may have hung up: ConnectionError).
                error = f"cannot write a submitted document: {exc.strerror or exc}"
                raise self._not_stored(
                    error, storage_fix(exc, self._ctx.payloads, daemon=True)
                ) from exc
            raise
        fingerprint = digest.hexdigest()

        stored: list[bool] = []  # the row is recorded, as far as is known
        resent: list[str] = []  # the message the submitter's idempotency key names already
        # The fingerprint kept with that message's key (None: recorded before they were).
        resent_sha256: list[str | None] = []
        unknown: list[bool] = []  # perhaps recorded: its copy kept (see _unabandoned)
        kept: list[tuple[OutboundRecord, _Unknown]] = []  # earlier ones, to prepare

        def record() -> OutboundRecord:
            """The intake row, with who submitted it (worker thread: a spool database
            that does not answer never holds the event loop)."""
            kept.extend(self._abandon_unknown())
            with storing(self._ctx.vault, item) as sealing:
                sealing.adopt(dek)
                try:
                    earlier = self._ctx.spool.add_intake(
                        message_id,
                        peer.name,
                        submission.filename,
                        submission.content_type,
                        payload_path,
                        payload_path,
                        expires_at=self._ctx.clock.now().timestamp()
                        + self._ctx.config.runtime.message_expiry_seconds,
                        zone=peer.zone,
                        origin=LOCAL_INTAKE,
                        submitted_by=submission.owner,
                        service=submission.service,
                        data_key=sealing.key,
                        idempotency_key=submission.idempotency_key,
                        content_sha256=fingerprint,
                    )
                except BaseException:
                    # Perhaps recorded all the same.  Only now: a submission in progress
                    # on another thread must not remove this one's row while it commits.
                    self._unabandoned[message_id] = _Unknown(payload_path, submission)
                    unknown.append(True)
                    raise
                if earlier is None:
                    stored.append(True)
                else:
                    resent.append(earlier)
                    resent_sha256.append(self._ctx.spool.submitted_sha256(earlier))
            recorded = self._ctx.spool.get(earlier or message_id)
            if recorded is None:  # the earlier one disposed of meanwhile (retention)
                raise SpoolError(
                    f"message {earlier} named by an idempotency key is gone",
                    fix="none needed: the submitter sends the document again",
                )
            return recorded

        async def spool_and_prepare() -> OutboundRecord:
            try:
                taken = await self._ctx.in_thread(record)
            except BaseException as exc:
                if not stored and not unknown:  # not recorded (perhaps: see _abandon_unknown)
                    payload_path.unlink(missing_ok=True)
                if isinstance(exc, SpoolError):
                    raise self._not_stored(exc.message, exc.fix or "") from exc
                raise
            for earlier, settled in kept:
                await self._prepare_kept(earlier, settled)
            if resent:
                payload_path.unlink(missing_ok=True)  # a copy of what is spooled already
                return taken
            # The patients the submitter named go into message.accepted with the
            # document's own; they are not kept in the spool (only the audit trail holds
            # patient ids), so a preparation finished after a restart records the
            # document's only.
            await self._sealer.prepare(
                taken, peer, submitted_by=submission.submitter, declared=submission.patients
            )
            return taken

        # Once recorded, durable: finished even if the submitter hangs up meanwhile.
        taken = await asyncio.shield(spool_and_prepare())
        if resent:
            self._resent(submission, taken, fingerprint, resent_sha256[0])
        view = await self._status.status(taken.message_id)
        assert view is not None
        return {**view, RESENT: True} if resent else view

    def _resent(
        self,
        submission: Submission,
        earlier: OutboundRecord,
        sha256: str,
        earlier_sha256: str | None,
    ) -> None:
        """A resend under an idempotency key that names ``earlier``: audited, or refused
        (422) if it is not the same document's submission (the key reused): another
        peer, service, file name or media type, or other content (``sha256``, the
        document's as submitted now, is not ``earlier_sha256``, kept with the key).

        A key recorded before fingerprints were kept (``earlier_sha256`` None) cannot
        tell a changed document from the same one: refused too, naming the message, so
        that neither a changed document is silently dropped nor one sent twice."""
        key = submission.idempotency_key
        same_request = (earlier.peer, earlier.service, earlier.filename, earlier.content_type) == (
            submission.peer,
            submission.service,
            submission.filename,
            submission.content_type,
        )
        refusal: SubmissionRefused | None = None
        if not same_request:
            reason = (
                "Idempotency-Key of this message reused for another submission "
                f"(to {submission.peer!r}, service {submission.service!r}, file name "
                f"{submission.filename!r}, {submission.content_type}): refused (422)"
            )
            refusal = SubmissionRefused(
                f"Idempotency-Key {key!r} names an earlier submission "
                f"({earlier.message_id}) with another peer, service, file name or media type",
                fix="send each document with a key of its own, and a resend with the same "
                "query and Content-Type as the first time",
                status=422,
            )
        elif earlier_sha256 is None:
            reason = (
                "Idempotency-Key of this message, recorded before document fingerprints "
                "were kept, sent again: whether the document changed is not known; "
                "refused (422)"
            )
            refusal = SubmissionRefused(
                f"Idempotency-Key {key!r} names an earlier submission ({earlier.message_id}) "
                "recorded before this gateway kept each document's SHA-256: it cannot tell "
                "whether this is the same document",
                fix=f"if it is the same document, it was taken already as "
                f"{earlier.message_id}: follow that message; if it changed, a changed "
                "document is a new submission: send it with a new key",
                status=422,
            )
        elif earlier_sha256 != sha256:
            reason = (
                "Idempotency-Key of this message reused for a changed document (the same "
                "peer, service, file name and media type, other content): refused (422)"
            )
            refusal = SubmissionRefused(
                f"Idempotency-Key {key!r} names an earlier submission ({earlier.message_id}) "
                "of other content: this document's SHA-256 differs from the one sent first "
                "under the key",
                fix="a changed document is a new submission: send it with a new key (a "
                "resend under a key must be the same document, byte for byte)",
                status=422,
            )
        else:
            reason = (
                "resend of a submitted document (the same Idempotency-Key): not spooled "
                "again, answered with this message"
            )
        detail: dict[str, Any] = {"submitted_by": submission.submitter, "idempotency_key": key}
        if refusal is not None:
            detail["content_sha256"] = sha256
            detail["earlier_content_sha256"] = earlier_sha256
        self._ctx.record(
            EventType.MESSAGE_DUPLICATE,
            peer=earlier.peer,
            message_id=earlier.message_id,
            outcome=Outcome.SUCCESS if refusal is None else Outcome.FAILURE,
            severity=Severity.INFO if refusal is None else Severity.WARNING,
            service=earlier.service,
            reason=reason,
            detail=detail,
        )
        if refusal is not None:
            raise refusal

    async def settle_unknown(self) -> None:
        """Settle the earlier submissions answered 503 without waiting for the next one
        (the outbox intake's round calls this): one recorded after all, with an
        Idempotency-Key, may have been acknowledged to its submitter's resend by
        another node, and is prepared here now, not when this node next takes a
        submission.  SpoolError while the spool does not answer."""
        if not self._unabandoned:
            return
        for record, unknown in await self._ctx.in_thread(self._abandon_unknown):
            await self._prepare_kept(record, unknown)

    def _abandon_unknown(self) -> list[tuple[OutboundRecord, _Unknown]]:
        """Settle the earlier submissions answered 503 (see ``_unabandoned``); returns
        those recorded after all, with an Idempotency-Key, that this node prepares now.
        SpoolError while the spool does not answer (those not settled stay)."""
        to_prepare = []
        for message_id in sorted(self._unabandoned):
            # Taken out while settled: a submission on another thread leaves it alone.
            unknown = self._unabandoned.pop(message_id, None)
            if unknown is None:
                continue
            try:
                keyed = unknown.submission.idempotency_key is not None
                if not keyed and self._ctx.spool.abandon_intake(message_id):
                    unknown.payload_path.unlink(missing_ok=True)
                    continue
                record = self._ctx.spool.get(message_id)
            except BaseException:
                self._unabandoned.setdefault(message_id, unknown)
                raise
            if record is None:  # never recorded
                unknown.payload_path.unlink(missing_ok=True)
            elif record.state is OutboundState.INTAKE:
                if keyed and record.node in (None, self._ctx.spool.node):
                    to_prepare.append((record, unknown))
                else:  # claimed by another node meanwhile: settled once it lets go
                    self._unabandoned.setdefault(message_id, unknown)
        return to_prepare

    async def _prepare_kept(self, record: OutboundRecord, unknown: _Unknown) -> None:
        """Prepare a submission answered 503 and recorded after all (its Idempotency-Key
        names it); while the spool does not answer, it is settled at the next one."""
        peer = self._ctx.config.peer(record.peer)
        if peer is None:
            return  # recovery at the next start marks it failed, saying why
        try:
            await self._sealer.prepare(
                record,
                peer,
                submitted_by=unknown.submission.submitter,
                declared=unknown.submission.patients,
            )
        except SpoolError:
            self._unabandoned.setdefault(record.message_id, unknown)

    def _not_stored(self, error: str, fix: str) -> SubmissionRefused:
        """The answer to a submission this gateway cannot store now (its disk is full, say).

        The administrator gets the cause and the fix in the log; the submitter, who can
        do nothing about them, is told to send again later (503), not our paths.
        """
        self._ctx.log.error(
            "submission.not_stored",
            error=error,
            fix=f"{fix}; the submitter was answered 503 and sends again",
        )
        return SubmissionRefused(
            "the gateway cannot store the document just now",
            fix="send it again later, with the same Idempotency-Key as this request (send "
            "one: a document recorded after all is then not sent twice); if this goes on, "
            "tell the gateway administrator",
            status=503,
        )


def _write_batch(
    sink: IO[bytes] | SealingWriter, batch: list[bytes], digest: hashlib._Hash
) -> None:
    for chunk in batch:
        digest.update(chunk)
        sink.write(chunk)


def _finish_file(
    out: IO[bytes], sink: IO[bytes] | SealingWriter, batch: list[bytes], digest: hashlib._Hash
) -> None:
    _write_batch(sink, batch, digest)
    if isinstance(sink, SealingWriter):
        sink.finish()
    out.flush()
    os.fsync(out.fileno())


def _rename_durably(source: Path, target: Path) -> None:
    os.rename(source, target)
    fsync_dir(target.parent)
