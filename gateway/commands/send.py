"""``medgw send FILE --to PEER [--service S]``: send through the running gateway, await the receipt.

The file is streamed over the control socket (any size; a progress bar on
stderr for large files when stderr is a terminal), then the command follows
the message until it reaches a final state and prints the verified receipt.
Every upload carries an ``Idempotency-Key`` (``--idempotency-key K``, else a new
random one): a resend with the same key is recognised by the gateway (answered
with the first message, ``"resent": true``) instead of spooled a second time; a
changed file under that key is refused (exit 1): it is a new document, sent with a
new key.
Exit codes: 0 delivered, 1 failed / expired / dead / cancelled or refused
before it was spooled (the reason is printed), 2 usage error, 3 outcome
unknown: the command lost contact with the daemon after the document may have
been spooled.  With 3 the command prints how to run it again with its key: that
resend is the same document, never a second one for the peer.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import shlex
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from gateway.audit.patients import PATIENT_HEADER
from gateway.commands import DEFAULT_CONFIG, add_config_option
from gateway.commands.queue import control_client
from gateway.config import load_config
from gateway.control.client import ControlClient, NotRunningError, RefusedError
from gateway.errors import ConfigError, MedgwError
from gateway.intake.outbox import CONTENT_TYPES
from gateway.intake.submit import IDEMPOTENCY_KEY, KEY_RULE, KEY_VALUE, RESENT, account_name

PROGRESS_ABOVE = 4 << 20  # files up to this size get no progress bar
MAX_FILENAME = 255
MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_CODES = (
    "exit status: 0 delivered; 1 failed, expired, dead or cancelled, or refused before it "
    "was spooled; 2 usage error; 3 outcome unknown: contact with the gateway was lost after "
    "the document was (or may have been) spooled - run again only the command it prints, "
    "with the same --idempotency-key (the gateway recognises that resend and does not send "
    "the document twice), never without it"
)
MIB = 1 << 20
KEY_BYTES = 24  # a new key: 32 URL-safe characters (192 random bits)


def register(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="send a file to a peer through the running gateway and wait for the receipt",
        description="Send FILE to PEER through the running gateway (over its control socket) "
        "and wait for the signed receipt.",
        epilog=EXIT_CODES,
    )
    send.add_argument("file", type=Path, metavar="FILE", help="the document to send")
    send.add_argument("--to", required=True, metavar="PEER", help="the peer's name (peers.d/)")
    send.add_argument(
        "--service",
        metavar="S",
        help="one of the peer's services (peers.d/<peer>.toml `services`); the peer "
        "delivers the document into its inbox folder for that service",
    )
    send.add_argument(
        "--content-type",
        help="media type; default from the file suffix (.hl7 application/hl7-v2, "
        ".json application/fhir+json, .pdf, .dcm, .xml), else application/octet-stream",
    )
    send.add_argument(
        "--patient",
        action="append",
        default=[],
        metavar="[AUTHORITY|]ID",
        help="a patient the document concerns, for the audit trail (besides those medgw "
        "reads from HL7 v2, CDA and FHIR documents); may be given several times",
    )
    send.add_argument(
        "--no-wait", action="store_true", help="print the Message-ID once spooled; do not wait"
    )
    send.add_argument(
        "--idempotency-key",
        metavar="K",
        help=f"the document's key ({KEY_RULE}): the gateway answers a resend with the same "
        "key with the message it already has instead of sending the document twice; default "
        "a new random key, printed with the command to run again if contact is lost (one "
        "that begins with '-' is given as --idempotency-key=K)",
    )
    add_config_option(send)
    send.set_defaults(handler=_send)


def _usage(message: str, fix: str) -> int:
    print(f"medgw send: {message}\n  fix: {fix}", file=sys.stderr)
    return EXIT_USAGE


class Progress:
    """A one-line progress bar on a terminal; nothing at all elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.enabled = total > PROGRESS_ABOVE and stream.isatty()
        self._shown = -1

    def __call__(self, sent: int) -> None:
        if not self.enabled:
            return
        percent = sent * 100 // self.total
        if percent == self._shown:
            return
        self._shown = percent
        bar = "#" * (percent // 4)
        self.stream.write(
            f"\r  uploading [{bar:<25}] {percent:3d}%  {sent / MIB:.1f}/{self.total / MIB:.1f} MiB"
        )
        if sent >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _send(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        return _usage(f"{path} is not a readable regular file", "give the path of the document")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return _usage(f"cannot read {path}: {exc.strerror}", "check the path and permissions")
    refused = (
        _check_filename(path.name)
        or _check_content_type(args.content_type)
        or _check_text("--to", args.to)
        or _check_text("--service", args.service)
        or _check_key(args.idempotency_key)
    )
    if refused is not None:
        return _usage(*refused)
    client = control_client(args.config)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # The running daemon uses its previous valid configuration and checks --to and
        # --service itself: a mistake on disk must not stop an urgent send.
        print(
            f"medgw send: note: {args.config} does not load ({len(exc.problems)} problem(s); "
            "medgw check-config lists them); the running gateway checks the peer itself",
            file=sys.stderr,
        )
    else:
        peer = config.peer(args.to)
        if peer is None:
            known = ", ".join(p.name for p in config.peers) or "(none configured)"
            return _usage(f"no peer named {args.to!r}", f"use one of: {known}")
        if args.service is not None and args.service not in peer.services:
            configured = ", ".join(peer.services) or "none"
            return _usage(
                f"peer {args.to!r} has no service {args.service!r} (its services: {configured})",
                f"use one of its services, leave --service out, or add it to `services` in "
                f"{peer.source} once agreed with the peer",
            )
    content_type = args.content_type or CONTENT_TYPES.get(
        path.suffix.lower(), "application/octet-stream"
    )
    query = urlencode(
        {"to": args.to, "filename": path.name}
        | ({"service": args.service} if args.service is not None else {})
    )
    key = args.idempotency_key or secrets.token_urlsafe(KEY_BYTES)
    again = _resend_command(args, path, key)
    size = path.stat().st_size
    progress = Progress(size, sys.stderr)
    headers = {IDEMPOTENCY_KEY: key}
    if args.patient:
        headers[PATIENT_HEADER] = ", ".join(args.patient)
    try:
        view = client.upload(
            f"/v1/messages?{query}", path, content_type, progress, extra_headers=headers
        )
    except NotRunningError:
        raise  # nothing was sent: exit 1, "medgw is not running"
    except RefusedError as exc:
        if exc.status == HTTPStatus.UNPROCESSABLE_ENTITY:
            # The gateway's own words: only it knows whether the key names another
            # document, a changed one, or one it cannot compare (kept before fingerprints,
            # perhaps this very document, already taken and on its way).
            print(
                f"medgw send: refused: {exc.message}; nothing new was spooled under the "
                f"idempotency key {key!r}\n"
                f"  fix: {exc.fix or 'give each document a key of its own'} (leave "
                "--idempotency-key out and a new key is made)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if exc.status < HTTPStatus.INTERNAL_SERVER_ERROR:
            raise  # the gateway answered and refused it: nothing was spooled
        # 503 (it cannot store documents just now), or an internal error: perhaps
        # recorded all the same (then it is sent); the same key tells.
        print(
            f"medgw send: the gateway could not take {path.name} (HTTP {exc.status}: "
            f"{exc.message}); it may have been recorded all the same, and is then sent",
            file=sys.stderr,
        )
        _tell_resend(again, "later, run exactly this")
        return EXIT_UNKNOWN
    except (MedgwError, OSError) as exc:
        if isinstance(exc, MedgwError) and not _connection_lost(exc):
            raise  # not a lost answer: nothing was sent
        print(
            f"medgw send: lost contact with the daemon before it confirmed {path.name} "
            f"({exc}); it may have been spooled",
            file=sys.stderr,
        )
        _tell_resend(again, "once medgw runs again, run exactly this")
        print(f"  (or look for it: medgw queue list --peer {args.to})", file=sys.stderr)
        return EXIT_UNKNOWN
    message_id = view["message_id"]
    if view.get(RESENT):
        print(
            f"medgw send: {path.name} was already spooled as {message_id} under idempotency "
            f"key {key!r}: the gateway recognised this resend and did not spool or send it "
            "again",
            file=sys.stderr,
        )
    if args.no_wait:
        print(message_id)
        return 0
    if not view.get(RESENT):
        print(f"medgw send: {path.name} ({size} bytes) spooled as {message_id}", file=sys.stderr)
    try:
        final = _follow(client, view)
    except KeyboardInterrupt:
        print(
            f"\nmedgw send: stopped waiting; the message stays in the gateway's queue "
            f"(medgw queue show '{message_id}')",
            file=sys.stderr,
        )
        return 130
    except (MedgwError, OSError) as exc:
        # The message is in the spool and the daemon goes on with it (now, or once it
        # runs again): a resend without its key would give the peer the document twice.
        print(
            f"medgw send: lost contact with the daemon ({exc}); {message_id} is still in "
            "the queue and goes out once medgw runs again - do not send the document "
            f"without its key; see medgw queue show '{message_id}'",
            file=sys.stderr,
        )
        _tell_resend(again, "to follow it once medgw runs again, run exactly this")
        return EXIT_UNKNOWN
    return _report(final)


def _resend_command(args: argparse.Namespace, path: Path, key: str) -> str:
    """This command with ``key``, as a shell line that works from any folder (and
    through sudo as the same account: a key belongs to the account that sent it)."""
    words = ["medgw", "send", str(path.absolute()), "--to", args.to]
    if args.service is not None:
        words += ["--service", args.service]
    if args.content_type is not None:
        words += ["--content-type", args.content_type]
    for patient in args.patient:
        words += ["--patient", patient]
    if args.no_wait:
        words.append("--no-wait")
    if args.config != DEFAULT_CONFIG:
        words += ["--config", str(Path(args.config).absolute())]
    words.append(f"--idempotency-key={key}")  # one word: a key may begin with '-'
    account = account_name(os.getuid())
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != account:
        words = ["sudo", "-u", account, *words]
    return shlex.join(words)


def _tell_resend(command: str, what: str) -> None:
    print(
        f"  {what} - the gateway recognises the document by its idempotency key and "
        "answers with the message it has instead of sending it twice (it spools it only "
        "if it never got it):\n"
        f"    {command}\n"
        "  do NOT send the document again without --idempotency-key: the peer could "
        "receive it twice",
        file=sys.stderr,
    )


def _check_key(key: str | None) -> tuple[str, str] | None:
    """--idempotency-key must be a key the gateway takes (gateway.intake.submit)."""
    if key is None or KEY_VALUE.fullmatch(key):
        return None
    return (
        f"--idempotency-key {key!a} is not an idempotency key: {KEY_RULE}",
        "give the key medgw send printed for this document, or leave the option out "
        "(a new key is made)",
    )


def _check_filename(name: str) -> tuple[str, str] | None:
    """The gateway's rule for the name the peer receives (gateway.intake.submit), up front."""
    if not _encodes(name):
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return (
            f"the file name '{shown}' is not valid UTF-8 (the peer receives the document "
            "under its file name, which must be UTF-8 text)",
            "copy or rename the file to a UTF-8 name, e.g. cp -- FILE result.hl7",
        )
    if len(name) > MAX_FILENAME or any(ord(c) < 32 or c in "/\\" for c in name):
        return (
            f"the file name {name!r} is not a plain file name of at most {MAX_FILENAME} "
            "characters (no control characters, no backslash)",
            "copy or rename the file to a plain name",
        )
    return None


def _check_text(option: str, value: str | None) -> tuple[str, str] | None:
    if value is None or (value.isprintable() and _encodes(value)):
        return None
    return (
        f"{option} {value!a} holds bytes that are not UTF-8 text, or control characters",
        f"give {option} as it is written in the configuration (peers.d/)",
    )


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_content_type(value: str | None) -> tuple[str, str] | None:
    """--content-type must be a media type the gateway takes (gateway.intake.submit)."""
    if value is None:
        return None
    media_type = value.split(";")[0].strip()
    if value.isascii() and value.isprintable() and MEDIA_TYPE.match(media_type):
        return None
    return (
        f"--content-type {value!r} is not a media type: type/subtype in ASCII letters, digits "
        "and !#$&^_.+- (optionally ; parameters), no spaces or line breaks in the type",
        "give e.g. application/hl7-v2, application/fhir+json, application/pdf, "
        "application/dicom or application/octet-stream, or leave it out",
    )


def _connection_lost(exc: MedgwError) -> bool:
    """The request went out but no answer came back (the daemon stopped or crashed)."""
    return isinstance(exc.__cause__, http.client.HTTPException | OSError)


def _follow(client: ControlClient, view: dict[str, Any]) -> dict[str, Any]:
    """Poll the message until it is final, telling retries on stderr."""
    url = f"/v1/messages/{quote(view['message_id'], safe='')}"
    seen = (view["state"], view["attempts"])
    delay = 0.2
    while not view["final"]:
        time.sleep(delay)
        delay = min(2.0, delay * 1.5)
        view = client.call("GET", url)
        now = (view["state"], view["attempts"])
        if now != seen and view["state"] == "queued" and view["last_error"]:
            print(
                f"medgw send: attempt {view['attempts']} failed ({view['last_error']}); "
                "the gateway retries",
                file=sys.stderr,
            )
        seen = now
    return view


def _report(view: dict[str, Any]) -> int:
    receipt = view.get("receipt") or {}
    lines = [f"{view['state']:<12} {view['message_id']}", f"{'peer':<12} {view['peer']}"]
    if view.get("service"):
        lines.append(f"{'service':<12} {view['service']}")
    if receipt.get("verified"):
        lines.append(f"{'disposition':<12} {receipt['disposition']}")
        match = "matches what was sent" if receipt["mic_matches"] else "DOES NOT MATCH"
        lines.append(f"{'MIC':<12} {receipt['mic']} ({match})")
        lines.append(f"{'signed by':<12} {receipt['signer']}")
    elif receipt.get("altered"):
        lines.append(f"{'receipt':<12} NOT SHOWN, altered: {receipt['error']}")
    elif receipt:
        lines.append(f"{'receipt':<12} cannot be verified now: {receipt['error']}")
    elif view.get("disposition"):
        lines.append(f"{'disposition':<12} {view['disposition']}")
    if view.get("receipt_file"):
        lines.append(f"{'receipt file':<12} {view['receipt_file']}")
    elif view.get("receipt_kept") == "spool":
        lines.append(f"{'receipt':<12} kept in the spool")
    print("\n".join(lines))
    if receipt.get("altered"):  # the spool's own word that it was delivered is in doubt
        print(
            f"medgw send: {view['message_id']} is recorded as {view['state']}, but its stored"
            " receipt is not the one medgw kept: the spool was altered outside medgw",
            file=sys.stderr,
        )
        print(
            "  fix: find out how; restore the spool from a backup, and run medgw audit verify",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if view["state"] == "delivered":
        return 0
    reason = view.get("last_error") or view["state"]
    print(f"medgw send: not delivered ({view['state']}): {reason}", file=sys.stderr)
    print(
        f"  fix: see medgw queue show '{view['message_id']}' and medgw diagnose {view['peer']}; "
        "medgw queue retry puts it back in the queue",
        file=sys.stderr,
    )
    return EXIT_FAILED
