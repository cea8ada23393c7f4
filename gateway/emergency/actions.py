"""What an administrator and the break-glass login do about emergencies, audited: seal
a credential, enter and leave emergency mode, see where things stand.  Used by the
control socket (the host's CLI) and the maintenance console alike."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, AuditSink, EventType, Severity
from gateway.audit.first import recorded
from gateway.clock import Clock, iso_time
from gateway.config.emergency import EmergencySettings
from gateway.config.maintenance import parse_public_key
from gateway.emergency.credential import (
    CredentialError,
    CredentialStore,
    Sealed,
    code_matches,
)
from gateway.emergency.mode import EmergencyMode, Window, end_of

HEX = re.compile(r"^[0-9a-f]+$")


class Emergency:
    def __init__(
        self,
        state_dir: Path,
        clock: Clock,
        audit: Callable[[], AuditSink],
        settings: Callable[[], EmergencySettings],
        *,
        trail: Path | None = None,
    ) -> None:
        """``trail``: the audit log, named when a record cannot be written there."""
        self._clock = clock
        self._audit = audit
        self._settings = settings
        self._trail = trail
        self.mode = EmergencyMode(state_dir, clock, audit, settings, trail=trail)
        self.credentials = CredentialStore(state_dir)
        # A new credential was sealed: the sessions of the old one end (gateway.maintenance).
        self.on_sealed: Callable[[], None] = lambda: None

    def _now(self) -> float:
        return self._clock.now().timestamp()

    # -- the sealed credential ---------------------------------------------------

    def seal(self, public_key: str, salt: str, verifier: str, actor: str) -> dict[str, Any]:
        """Store a new credential's verifier in place of the old one, audited."""
        key, why = parse_public_key(public_key)
        if key is None:
            raise CredentialError(f"the public key: {why}", fix="run medgw emergency seal again")
        if len(salt) != 32 or len(verifier) != 64 or not HEX.match(salt + verifier):
            raise CredentialError(
                "the code's verifier is not a 16-byte salt and an HMAC-SHA-256 in hex",
                fix="run medgw emergency seal again",
            )
        sealed, old = self.credentials.next_seal(
            public_key.strip(),
            key.get_fingerprint("sha256"),
            bytes.fromhex(salt),
            verifier,
            actor=actor,
            now=self._now(),
        )
        detail: dict[str, Any] = {"serial": sealed.serial, "key": sealed.fingerprint}
        if old is not None:
            detail["replaces"] = old.serial
            detail["replaced_was_used"] = old.used_at is not None
        event = AuditEvent(
            EventType.EMERGENCY_SEALED,
            severity=Severity.WARNING,
            actor=actor,
            reason="a new break-glass credential was sealed; any earlier one no longer works",
            detail=detail,
        )
        what = "sealing a break-glass credential"
        recorded(self._audit(), self._trail, what, event, lambda: self.credentials.store(sealed))
        self.on_sealed()
        return sealed.view() | {"sealed_at": iso_time(sealed.sealed_at)}

    def sealed_key(self, fingerprint: str) -> bool:
        """Whether ``fingerprint`` is the key of a sealed credential not yet used."""
        try:
            sealed = self.credentials.current()
        except CredentialError:
            return False
        return sealed is not None and sealed.used_at is None and sealed.fingerprint == fingerprint

    def break_glass(
        self,
        fingerprint: str,
        code: str,
        remote: str,
        record: Callable[[Sealed], AuditEvent],
    ) -> Sealed | None:
        """The credential, when key and code are right: its use recorded first (the
        alert ``record`` makes of it), then spent, durably.  None: wrong, used, or used
        or replaced meanwhile.  AuditNotWrittenError: the alert could not be written,
        and the credential is not spent."""
        try:
            sealed = self.credentials.current()
        except CredentialError:
            return None
        if (
            sealed is None
            or sealed.used_at is not None
            or sealed.fingerprint != fingerprint
            or not code_matches(sealed, code)
        ):
            return None

        def spend() -> None:
            if not self.credentials.use(sealed, remote, self._now()):
                raise CredentialError(
                    "the break-glass credential was used or sealed anew meanwhile",
                    fix="use the envelope of the credential sealed last",
                )

        try:
            recorded(self._audit(), self._trail, "the break-glass login", record(sealed), spend)
        except CredentialError:
            return None
        return sealed

    def enter_for_break_glass(self, actor: str) -> Window:
        """The break-glass login declares an emergency, unless one is on already."""
        on = self.mode.current()
        if on is not None:
            return on
        until = self._now() + self._settings().break_glass_hours * 3600
        return self.mode.enter("the break-glass credential was used", until, actor)

    # -- the mode ------------------------------------------------------------------

    def enter(
        self, reason: str, until: str | None, hours: float | None, actor: str
    ) -> dict[str, object]:
        end = end_of(until, hours, self._now(), self._settings().max_hours)
        return self.mode.enter(reason, end, actor).view()

    def leave(self, reason: str, actor: str) -> dict[str, object]:
        window, unrecorded = self.mode.leave(actor, reason)
        view = window.view()
        if unrecorded is not None:
            where = unrecorded.trail.parent if unrecorded.trail else "the audit log's folder"
            cause = unrecorded.cause
            view["warning"] = (
                "emergency mode was left (leaving gives the gateway its protections back, "
                "so it is done all the same), but its record (emergency.left) could not be "
                f"written to the audit log in {where} "
                f"({errno.errorcode.get(cause.errno or 0, 'error')}: {cause.strerror or cause}); "
                "it is written as soon as the audit log takes records again "
                f"(fix: {unrecorded.fix})"
            )
        return view

    def status(self) -> dict[str, Any]:
        window = self.mode.current()
        try:
            sealed = self.credentials.current()
            credential: dict[str, Any] | str | None = sealed.view() if sealed else None
        except CredentialError as exc:
            credential = f"not usable: {exc.message}"
        if isinstance(credential, dict):
            for key in ("sealed_at", "used_at"):
                credential[key] = iso_time(credential[key] or 0)
        return {
            "emergency_mode": window.view() if window else None,
            "relaxed_while_on": self._settings().relaxations(),
            "break_glass": credential,
        }
