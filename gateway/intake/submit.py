"""Submitting a document over HTTP: shared by the local API and the control socket.

``POST /v1/messages?to=PEER[&service=S][&filename=NAME]`` with the document as the request
body (any size: it is streamed to the spool, never held in memory) and its
media type as ``Content-Type``.  The answer (202) carries the Message-ID once
the document is durably spooled, signed and encrypted; ``GET
/v1/messages/{id}`` then tells its state and, once a receipt came back, the
receipt as verified again from the stored copy (disposition, MIC, signer).
Who submitted it is recorded with the message and in the audit trail (NET-3);
a local API client sees only its own messages.

An ``X-Medgw-Patient: AUTHORITY|ID[, ...]`` header names the patients the document
concerns, for the audit trail (with those the document itself names: see
gateway.audit.patients).

An ``Idempotency-Key`` header (draft-ietf-httpapi-idempotency-key-header: 1 to
MAX_IDEMPOTENCY_KEY visible ASCII characters, bare or as a quoted string) makes a
resend safe: a submission whose submitter's key already names a message is not
spooled again (its body is read within the usual bounds and dropped) and is answered
200 with that message's view, ``"resent": true``; the same key with another peer,
service, file name, media type or content (the document's SHA-256, kept with the key)
is refused (422): a changed document is a new submission, with a new key.

``service`` names one of the destination peer's ``services`` (a routing key
agreed with it); the receiving medgw delivers the document into
``inbox/<us>/<service>/``.  A service the peer does not have is refused.
"""

from __future__ import annotations

import asyncio
import pwd
import re
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit import PatientId
from gateway.audit.patients import PATIENT_HEADER, declared_patients
from gateway.config import SERVICE_NAME
from gateway.errors import InvalidValueError, MedgwError

CHUNK = 1 << 20
# A body that stops arriving for this long is given up (408): a hung client must not
# hold its connection and a partial spool file for ever.
BODY_IDLE_SECONDS = 60.0
# A connection with no request in progress is closed after this long (aiohttp's own
# default is an hour): any local user can connect, so idle connections must not pile up.
IDLE_CONNECTION_SECONDS = 30.0
MAX_FILENAME = 255
MAX_PEER_NAME = 255  # a peer is named by its file in peers.d
IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 128
# Visible ASCII but the quote and the backslash (no escapes to undo); a quoted string
# (a Structured Field string, as the draft writes it) or bare.
_KEY_CHARS = rf"[!#-\[\]-~]{{1,{MAX_IDEMPOTENCY_KEY}}}"
_KEY = re.compile(rf'"({_KEY_CHARS})"|({_KEY_CHARS})')
# A key's value as a client gives it (without quotes), and the rule in words.
KEY_VALUE = re.compile(_KEY_CHARS)
KEY_RULE = f"1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters, without '\"' or '\\' inside"
# The view's field that says a submission was a resend of the message it names.
RESENT = "resent"


def _printable(text: str) -> bool:
    """No control characters (C0, DEL, C1), no formatting ones (bidirectional overrides,
    zero-width: they make a name show as another in a terminal), no U+FFFD (the
    sender's bytes were not UTF-8): what ``medgw queue list`` prints is what was sent."""
    return not any(c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf") for c in text)


_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")


def account_name(uid: int) -> str:
    """The name of a local account (its number when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class Submission:
    peer: str
    filename: str
    content_type: str
    # "api:<client>", "operator:<account> (uid N)"; outbox files: "outbox:<owner> (uid N)"
    submitter: str
    service: str | None = None  # one of the peer's services (checked on submission)
    patients: tuple[PatientId, ...] = ()  # named by the submitter (X-Medgw-Patient)
    idempotency_key: str | None = None  # the submitter's Idempotency-Key (its value)
    # Whose message and key it is in the spool when that is not ``submitter``: on the
    # control socket the account the kernel reports, without the name sudo passes (only
    # claimed, and anyone acting as that account can set it: it stays in the audit
    # trail's actor), so that a resend run under another claimed name is still the
    # same submitter's.
    account: str | None = None

    @property
    def owner(self) -> str:
        """Recorded in the spool as the message's submitter; its keys are its own."""
        return self.account or self.submitter


class SubmissionRefused(MedgwError):
    """A submission the gateway will not take; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, *, fix: str, status: int) -> None:
        super().__init__(message, fix=fix)
        self.status = status


SubmitFn = Callable[[Submission, AsyncIterator[bytes]], Awaitable[dict[str, Any]]]
# The message's view (state, receipt, submitted_by), or None when there is no such message
# or (with a submitter given) it is not that submitter's.
StatusFn = Callable[[str, str | None], Awaitable[dict[str, Any] | None]]


def json_error(status: int, message: str, fix: str) -> web.Response:
    return web.json_response({"error": message, "fix": fix}, status=status)


def parse_submission(
    request: web.Request, submitter: str, account: str | None = None
) -> Submission | web.Response:
    """The submission a request asks for, or the error response to give (nothing read yet);
    ``account`` as :attr:`Submission.account`."""
    peer = request.query.get("to", "")
    filename = request.query.get("filename", "")
    service = request.query.get("service")
    if service is not None and not SERVICE_NAME.match(service):
        return json_error(
            400,
            f"service {service[:80]!r} is not a service name",
            "give one of the destination peer's `services` (letters, digits, '.', '_', '-'), "
            "or leave the parameter out",
        )
    if not peer:
        return json_error(
            400,
            "the destination peer is missing",
            "POST /v1/messages?to=PEER&filename=NAME with the document as the body",
        )
    if len(peer) > MAX_PEER_NAME or not _printable(peer):
        return json_error(
            400,
            f"to={peer[:80]!r} is not a peer name",
            "give the name of a peer file in peers.d without .toml, e.g. to=kita-lab",
        )
    if (
        len(filename) > MAX_FILENAME
        or not _printable(filename)
        or any(c in "/\\" for c in filename)
    ):
        return json_error(
            400,
            f"filename must be a plain file name of at most {MAX_FILENAME} characters, in "
            "UTF-8, without control or formatting characters",
            "send the base name only, e.g. filename=result.hl7",
        )
    raw_type = request.headers.get("Content-Type", "application/octet-stream")
    content_type = raw_type.split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":  # what curl -d sends by default
        content_type = "application/octet-stream"
    if not _MEDIA_TYPE.match(content_type):
        return json_error(
            400,
            f"Content-Type {raw_type[:80]!r} is not a media type",
            "send e.g. Content-Type: application/hl7-v2, application/fhir+json, "
            "application/pdf, application/dicom or application/octet-stream",
        )
    try:
        patients = declared_patients(request.headers.getall(PATIENT_HEADER, []))
    except InvalidValueError as exc:
        return json_error(400, f"{PATIENT_HEADER}: {exc.message}", exc.fix or "")
    keys = request.headers.getall(IDEMPOTENCY_KEY, [])
    key = None
    if keys:
        found = _KEY.fullmatch(keys[0]) if len(keys) == 1 else None
        if found is None:
            return json_error(
                400,
                f"{IDEMPOTENCY_KEY} must be one value of {KEY_RULE} (bare or in quotes)",
                f'send one per document, e.g. {IDEMPOTENCY_KEY}: "a UUID made for it", and '
                "the same one when sending that document again",
            )
        key = found.group(1) or found.group(2)
    return Submission(peer, filename, content_type, submitter, service, patients, key, account)


async def submit(
    request: web.Request,
    submission: Submission,
    submit_fn: SubmitFn,
    *,
    idle_seconds: float = BODY_IDLE_SECONDS,
) -> web.Response:
    async def chunks() -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(idle_seconds):
                    chunk = await request.content.read(CHUNK)
            except TimeoutError:
                raise SubmissionRefused(
                    f"the request body stopped arriving (nothing for {idle_seconds:g} s); "
                    "nothing was spooled",
                    fix="send the whole document without pausing, then submit it again",
                    status=408,
                ) from None
            if not chunk:
                return
            yield chunk

    try:
        view = await submit_fn(submission, chunks())
    except SubmissionRefused as exc:
        return json_error(exc.status, exc.message, exc.fix or "")
    return web.json_response(view, status=200 if view.get(RESENT) else 202)


async def status(request: web.Request, submitter: str | None, status_fn: StatusFn) -> web.Response:
    """``submitter=None`` sees every message (the administrator on the control socket)."""
    view = await status_fn(request.match_info["message_id"], submitter)
    if view is None or (submitter is not None and view.get("submitted_by") != submitter):
        # The same answer for "not there" and "not yours": a client learns nothing of others.
        return json_error(404, "no such message", "use the message_id the submission returned")
    return web.json_response(view)
