"""The maintenance listener: SSH (asyncssh) with a personal key and a one-time code.

Authentication is two steps on one connection: the person's public key (signature
verified), then keyboard-interactive with a TOTP code.  asyncssh completes
authentication on the first method that succeeds and has no "partial success"
(RFC 4252 section 5.1), so a verified key is recorded here and answered with a
failure whose list of remaining methods holds only keyboard-interactive; OpenSSH
and asyncssh's client go on with it.  Whether the account has expired or lies
outside an approved window is said only after both factors: a stranger learns
nothing about accounts.

The sealed break-glass credential (gateway.emergency) logs in the same two steps as
user ``emergency``: its key, then its code.  It needs no approved window; its use is
recorded durably before the session starts, raises an alert and declares an emergency,
and the session has the admin role.  That session lasts only while both hold: the
emergency it declared (or found on) is on, and its credential is the one sealed.  It
ends when the emergency is left or reaches its end (within a second), when a new
credential is sealed (at once), and at a reload that finds the credential file
removed, replaced or untrusted; each is a ``maintenance.logout`` that says why, and no
further command runs on it.

Refused, each with an audit event: a shell, subsystems (SFTP), local and remote port
forwarding (TCP and unix sockets), tunnels, agent and X11 forwarding (also switched
off in asyncssh's options).  A pseudo-terminal is refused by asyncssh.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.public_key import decode_ssh_public_key

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.audit.first import log_not_written, record_first
from gateway.clock import Clock, iso_time
from gateway.config.maintenance import Maintainer, MaintenanceSettings
from gateway.emergency.actions import Emergency
from gateway.emergency.credential import USER as BREAK_GLASS_USER
from gateway.emergency.credential import CredentialError, Sealed
from gateway.emergency.mode import Window
from gateway.errors import AuditNotWrittenError, MedgwError
from gateway.listening import bind_cause, bind_fix
from gateway.logs import Logger, make_logger
from gateway.maintenance import algorithms, commands, totp
from gateway.operations import Operations, Reloaded, ReloadRefused
from gateway.ratelimit import SourceBudget, address_source
from gateway.ratelimit import Window as RefusedWindow

LOGIN_TIMEOUT_SECONDS = 30
MAX_CODE_ATTEMPTS = 3
MAX_CODE_CHARS = 64  # a one-time code, or the break-glass envelope's longer code
# Wrong one-time codes in a row for one person, over any connections, lock that
# person's logins for LOCKOUT_SECONDS (or until an admin unlocks them).
LOCKOUT_FAILURES = 5
LOCKOUT_SECONDS = 900
SWEEP_SECONDS = 1.0  # how soon a session ends after its approved window
# Logins refused at the first factor (no such account, a key of no account): the first
# of each source (an IPv6 address: its /64) in a minute is recorded, the rest counted
# into one record when the minute is over, so that a scanner cannot flood the trail.
REFUSED_RECORDED = 1
REFUSED_WINDOW_SECONDS = 60.0
# Approved(person, now) -> whether an approved window covers now.
Approved = Callable[[str, float], bool]


def actor_of(person: str) -> str:
    return f"maintainer:{person}"


@dataclass
class _Session:
    """What one SSH connection has proven so far, and what it is."""

    id: str
    remote: str
    person: str | None = None
    fingerprint: str | None = None  # the verified key: the first factor
    offered_key: str | None = None  # the last key offered that no account holds
    role: str | None = None  # set once logged in
    code_failures: int = 0
    logged_in: bool = False
    ended: bool = False
    why_ended: str | None = None  # what ended a session that was logged in
    # A break-glass session: the serial of the credential used, the emergency it is for.
    break_glass: int | None = None
    emergency: Window | None = None
    conn: asyncssh.SSHServerConnection | None = field(default=None, repr=False)
    idle: asyncio.TimerHandle | None = field(default=None, repr=False)


class MaintenanceServer:
    def __init__(
        self,
        settings: MaintenanceSettings,
        operations: Callable[[], Operations],
        audit: Callable[[], AuditSink],
        clock: Clock,
        reload: Callable[[str], Awaitable[Reloaded | ReloadRefused]],
        approved: Approved,
        emergency: Emergency | None = None,
        log: Logger | None = None,
    ) -> None:
        self.settings = settings
        self._log = log or make_logger()
        self._emergency = emergency
        self._operations = operations
        self._audit = audit
        self._clock = clock
        self._reload = reload
        self._approved = approved
        self._sessions: dict[str, _Session] = {}
        self._last_step: dict[str, int] = {}  # person -> last code step used: no replay
        # Wrong codes in a row and lockouts, per configured person only: bounded.
        self._wrong: dict[str, int] = {}
        self._locked: dict[str, float] = {}  # person -> until
        self._refused = SourceBudget(
            clock, per_window=REFUSED_RECORDED, window_seconds=REFUSED_WINDOW_SECONDS
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._draining = False

    @property
    def port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.get_port())

    async def start(self) -> None:
        s = self.settings
        try:
            self._acceptor = await self._listen(s)
        except OSError as exc:
            raise MedgwError(
                f"cannot listen for maintenance on {s.address}:{s.port}: {bind_cause(exc)}",
                fix=bind_fix(exc, s.address, s.port, "[maintenance] listen"),
            ) from exc
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _listen(self, s: MaintenanceSettings) -> asyncssh.SSHAcceptor:
        return await asyncssh.create_server(
            lambda: _Connection(self),
            s.address,
            s.port,
            server_host_keys=[s.host_key],
            kex_algs=list(algorithms.KEX),
            encryption_algs=list(algorithms.CIPHERS),
            mac_algs=list(algorithms.MACS),
            compression_algs=["none"],
            signature_algs=list(algorithms.USER_SIGNATURES),
            server_version="medgw",
            login_timeout=LOGIN_TIMEOUT_SECONDS,
            password_auth=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            allow_scp=False,
            sftp_factory=None,
            keepalive_interval=60,
            keepalive_count_max=3,
        )

    def drain(self) -> None:
        """The daemon is stopping: sessions go on answering the commands that read (the
        queue, the peers, the trail) while the transfers in progress finish, and refuse
        any other (a retry, a suspension, a reload, an emergency)."""
        self._draining = True

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        for session in list(self._sessions.values()):
            self._end(session, "the gateway is stopping")
        self.write_summaries(everything=True)  # the last counts are not lost

    def update(self, settings: MaintenanceSettings) -> None:
        """A reload: the sessions of accounts removed, changed or expired end now (MNT-2),
        and break-glass sessions whose credential file no longer holds their credential."""
        self.settings = settings
        today = self._clock.now().date()
        for session in list(self._sessions.values()):
            if not session.logged_in or session.ended or session.person is None:
                continue
            if session.person == BREAK_GLASS_USER:
                why = self._break_glass_over(session, credential=True)
                if why is not None:
                    self._end(session, f"a reload: {why}")
                continue
            account = settings.maintainer(session.person)
            if account is None:
                why = "the account was removed"
            elif account.expired(today):
                why = "the account has expired"
            elif account.role != session.role or session.fingerprint not in account.fingerprints:
                why = "the account's role or keys changed"
            else:
                continue
            self._end(session, why)

    async def _sweep_loop(self) -> None:
        """Every second, for the server's life: a record the trail does not take (a full
        audit disk) is logged and the sweep goes on, so sessions still end on time."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.sweep()
            except Exception as exc:  # never the end of the sessions' time bounds
                self._log.error("maintenance.sweep_failed", error=str(exc))

    def sweep(self) -> None:
        """Sessions whose approved window has ended (or whose account expired) end now,
        not only at the next reload; the counts of refused logins whose minute is over
        are written."""
        self.write_summaries()
        now = self._clock.now().timestamp()
        for session in list(self._sessions.values()):
            if not session.logged_in or session.ended or session.person is None:
                continue
            if session.person == BREAK_GLASS_USER:
                why = self._break_glass_over(session, credential=False)
                if why is not None:
                    self._end(session, why)
                continue
            account = self.settings.maintainer(session.person)
            if account is None or self._refusal(account, now) is None:
                continue  # a removed account's session ends at the reload (update)
            if account.expired(self._clock.now().date()):
                self._end(session, "the account has expired")
            else:
                self._end(session, "the approved maintenance window has ended")

    def credential_sealed(self) -> None:
        """A new break-glass credential was sealed: the sessions of the old one end now."""
        for session in list(self._sessions.values()):
            if session.logged_in and not session.ended and session.break_glass is not None:
                why = self._break_glass_over(session, credential=True)
                if why is not None:
                    self._end(session, why)

    def _break_glass_over(self, session: _Session, *, credential: bool) -> str | None:
        """Why a break-glass session may no longer go on, or None: its emergency is over
        (in memory: cheap enough for every sweep), or (``credential``: read from the
        state folder) its credential is no longer the one sealed."""
        window = session.emergency
        found = self._emergency
        if window is None or found is None:
            return "the break-glass session has no emergency"
        now = found.mode.current()
        if now is None or now.id != window.id:
            how = "reached its end" if self._clock.now().timestamp() >= window.until else "was left"
            return f"emergency mode {window.id} {how}: the break-glass session ends with it"
        if not credential:
            return None
        try:
            sealed = found.credentials.current()
        except CredentialError as exc:
            return f"the break-glass credential is no longer trusted ({exc.message})"
        if sealed is None:
            return "the break-glass credential was removed from the state folder"
        if sealed.serial != session.break_glass or sealed.fingerprint != session.fingerprint:
            return (
                f"a new break-glass credential was sealed (serial {sealed.serial}): the session "
                f"of serial {session.break_glass} ends"
            )
        return None

    def locked_until(self, person: str) -> float | None:
        until = self._locked.get(person)
        if until is not None and until <= self._clock.now().timestamp():
            del self._locked[person]
            return None
        return until

    def unlock(self, person: str, actor: str) -> dict[str, Any]:
        """An admin lifts a person's lockout (and forgets their wrong codes), audited."""
        was = self.locked_until(person)
        event = AuditEvent(
            EventType.MAINTENANCE_UNLOCKED,
            actor=actor,
            detail={"person": person, "was_locked": was is not None},
        )
        record_first(self._audit(), self._trail(), f"unlocking {person}'s logins", event)
        self._locked.pop(person, None)
        self._wrong.pop(person, None)
        return {"person": person, "was_locked": was is not None}

    def _trail(self) -> Path:
        return self._operations().config.storage.audit_log

    # -- events of one connection ------------------------------------------------

    def emit(self, session: _Session, event: EventType, **fields: Any) -> None:
        self._audit().emit(self.event(session, event, **fields))

    def event(self, session: _Session, event: EventType, **fields: Any) -> AuditEvent:
        """The record of ``event`` on ``session``'s connection."""
        detail = {"session": session.id, **fields.pop("detail", {})}
        if session.fingerprint:
            detail.setdefault("key", session.fingerprint)
        return AuditEvent(
            event,
            actor=actor_of(session.person) if session.person else None,
            remote_address=session.remote,
            detail=detail,
            **fields,
        )

    def _login_first(self, session: _Session, what: str, event: AuditEvent) -> bool:
        """Record ``event`` (a login) before the session may run anything; if it cannot
        be written, the login is refused, logged, and the client told why."""
        try:
            record_first(self._audit(), self._trail(), what, event)
        except AuditNotWrittenError as exc:
            self._not_written(session, exc)
            return False
        return True

    def _not_written(self, session: _Session, exc: AuditNotWrittenError) -> None:
        """A login refused because its record could not be written: the daemon's log says
        why; the client, who has proven both factors, that the trail is the cause."""
        log_not_written(self._log, exc)
        session.ended = True
        if session.conn is not None:
            session.conn.disconnect(
                asyncssh.DISC_BY_APPLICATION,
                "login refused: the gateway cannot write its audit trail now, and nobody "
                "logs in without a record; tell the gateway's administrator",
            )

    def opened(self, session: _Session) -> bool:
        if len(self._sessions) >= self.settings.max_connections:
            self.emit(
                session,
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason=f"more than {self.settings.max_connections} maintenance connections",
            )
            return False
        self._sessions[session.id] = session
        return True

    def _arm_idle(self, session: _Session) -> None:
        """The session ends after ``idle_timeout_seconds`` without a command."""
        if session.idle is not None:
            session.idle.cancel()
        session.idle = asyncio.get_running_loop().call_later(
            self.settings.idle_timeout_seconds, self._end, session, "idle for too long"
        )

    def closed(self, session: _Session) -> None:
        self._sessions.pop(session.id, None)
        if session.idle is not None:
            session.idle.cancel()
        if session.ended:
            return
        session.ended = True
        if session.logged_in:
            self.emit(session, EventType.MAINTENANCE_LOGOUT, reason="the client closed it")
        elif session.person == BREAK_GLASS_USER and session.code_failures == 0:
            # Any attempt at the break-glass login is worth a look: a used or replaced
            # envelope, or someone trying the name.
            self.emit(
                session,
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason="no sealed break-glass credential matches (used, replaced, unsealed)",
                detail={"break_glass": "refused"},
            )
        elif session.fingerprint:
            self.emit(
                session,
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason="the key was verified, but no valid one-time code followed",
                detail={"second_factor": "missing"},
            )
        elif session.person is not None:
            self._refused_at_first_factor(session)

    def _refused_at_first_factor(self, session: _Session) -> None:
        """A login that offered a user name and never got past the key: a removed or
        unknown account, a key the account does not hold, or no key at all.  Recorded
        with the user name offered, the first per source and minute (the others are
        counted: :meth:`write_summaries`)."""
        assert session.person is not None
        if not self._refused.admit(address_source(session.remote), session.person):
            return
        if session.offered_key is None:
            reason = "no public key was offered"
        elif self.settings.maintainer(session.person) is None:
            reason = f"no account named {session.person!r} (never added, or removed)"
        else:
            reason = f"the key offered is not one of the keys of account {session.person!r}"
        detail: dict[str, Any] = {
            "session": session.id,
            "first_factor": "refused",
            "user": session.person,
        }
        if session.offered_key is not None:
            detail["offered_key"] = session.offered_key
        # No actor: the user name is the client's word, not a person who logged in.
        self._audit().emit(
            AuditEvent(
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                remote_address=session.remote,
                reason=reason,
                detail=detail,
            )
        )

    def write_summaries(self, *, everything: bool = False) -> None:
        """One record for each source whose refused logins were counted, not recorded
        one by one, with the user names they offered."""
        for window in self._refused.closed(everything=everything):
            self._write_summary(window)

    def _write_summary(self, window: RefusedWindow) -> None:
        try:
            self._audit().emit(
                AuditEvent(
                    EventType.MAINTENANCE_LOGIN_FAILED,
                    outcome=Outcome.FAILURE,
                    severity=Severity.WARNING,
                    remote_address=window.source,
                    reason=f"{window.held_back} more logins from {window.source} refused "
                    f"at the key within {self._refused.window_seconds:.0f} s, beyond the "
                    f"{self._refused.per_window} recorded one by one",
                    detail={
                        "first_factor": "refused",
                        "users": window.notes,
                        "more_users": window.more_notes,
                        "not_recorded_one_by_one": window.held_back,
                        "window_seconds": self._refused.window_seconds,
                    },
                )
            )
        except OSError as exc:  # the counts said in the log at least
            self._log.critical(
                "audit.write_failed",
                error=str(exc),
                audit_event=EventType.MAINTENANCE_LOGIN_FAILED.value,
                source=window.source,
                refused_logins=window.held_back,
                users=window.notes,
            )

    def _end(self, session: _Session, why: str) -> None:
        """End ``session`` for ``why``: its connection closed whether or not its logout
        record could be written (then logged: ``audit.write_failed``)."""
        try:
            if not session.ended and session.logged_in:
                session.ended = True
                session.why_ended = why
                logout = self.event(
                    session, EventType.MAINTENANCE_LOGOUT, severity=Severity.WARNING, reason=why
                )
                try:
                    self._audit().emit(logout)
                except OSError as exc:
                    self._log.critical(
                        "audit.write_failed",
                        error=str(exc),
                        audit_event=logout.event.value,
                        session=session.id,
                        person=session.person,
                        reason=why,
                    )
        finally:
            if session.conn is not None:
                session.conn.disconnect(asyncssh.DISC_BY_APPLICATION, why)

    def key_allowed(self, person: str, key: asyncssh.SSHKey) -> bool:
        if person == BREAK_GLASS_USER:
            found = self._emergency
            return found is not None and found.sealed_key(key.get_fingerprint("sha256"))
        account = self.settings.maintainer(person)
        return account is not None and key.get_fingerprint("sha256") in account.fingerprints

    def check_code(self, session: _Session, code: str) -> bool:
        """The second factor, then the account's expiry and approval: the login."""
        assert session.person is not None
        if session.person == BREAK_GLASS_USER:
            return self._break_glass(session, code)
        account = self.settings.maintainer(session.person)
        now = self._clock.now()
        step = (
            totp.matching_step(account.totp_secret, code, now.timestamp(), account.totp_algorithm)
            if account is not None
            else None
        )
        replayed = step is not None and step <= self._last_step.get(session.person, -1)
        # the key verified must be this person's (the user name cannot change in between)
        if account is not None and session.fingerprint not in account.fingerprints:
            account = None
        until = self.locked_until(session.person) if account is not None else None
        if until is not None:
            # The same answer as a wrong code: the client learns nothing of the lock.
            self._wrong_code(
                session,
                f"logins locked until {iso_time(until)} after {LOCKOUT_FAILURES} wrong codes "
                "(medgw maintenance unlock)",
            )
            return False
        if account is None or step is None or replayed:
            self._wrong_code(session, "one-time code already used" if replayed else None)
            if account is not None:
                self._count_wrong(session)
            return False
        self._wrong.pop(session.person, None)
        self._last_step[session.person] = step
        refusal = self._refusal(account, now.timestamp())
        if refusal is not None:
            session.ended = True
            self.emit(
                session,
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason=refusal,
                detail={"second_factor": "passed"},
            )
            if session.conn is not None:
                session.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, refusal)
            return False
        login = self.event(
            session,
            EventType.MAINTENANCE_LOGIN,
            detail={"second_factor": "passed", "role": account.role, "name": account.name},
        )
        if not self._login_first(session, f"the maintenance login of {session.person}", login):
            return False
        session.logged_in = True
        session.role = account.role
        self._arm_idle(session)
        return True

    def _wrong_code(self, session: _Session, reason: str | None = None) -> None:
        session.code_failures += 1
        self.emit(
            session,
            EventType.MAINTENANCE_LOGIN_FAILED,
            outcome=Outcome.FAILURE,
            severity=Severity.WARNING,
            reason=reason or "wrong one-time code",
            detail={"second_factor": "failed", "attempt": session.code_failures},
        )
        if session.code_failures >= MAX_CODE_ATTEMPTS and session.conn is not None:
            session.ended = True
            session.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "")

    def _count_wrong(self, session: _Session) -> None:
        assert session.person is not None
        count = self._wrong.get(session.person, 0) + 1
        self._wrong[session.person] = count
        if count < LOCKOUT_FAILURES:
            return
        until = self._clock.now().timestamp() + LOCKOUT_SECONDS
        self._locked[session.person] = until
        self._wrong.pop(session.person, None)
        self.emit(
            session,
            EventType.MAINTENANCE_LOCKED,
            outcome=Outcome.FAILURE,
            severity=Severity.ALERT,
            reason=f"{count} wrong one-time codes in a row: logins locked until "
            f"{iso_time(until)} (medgw maintenance unlock {session.person} lifts it)",
            detail={"until": iso_time(until)},
        )

    def _break_glass(self, session: _Session, code: str) -> bool:
        """The sealed credential's one use: its alert recorded first, then the use,
        durably, then emergency mode (EMG-3).  An alert that cannot be written refuses the
        login and leaves the credential unspent."""
        found = self._emergency
        assert found is not None and session.fingerprint is not None

        def alert(sealed: Sealed) -> AuditEvent:
            return self.event(
                session,
                EventType.EMERGENCY_BREAK_GLASS,
                severity=Severity.ALERT,
                reason="the sealed break-glass credential was used: it no longer works; "
                "seal a new one (medgw emergency seal)",
                detail={"serial": sealed.serial, "sealed_by": sealed.sealed_by},
            )

        try:
            sealed = found.break_glass(session.fingerprint, code, session.remote, alert)
            if sealed is None:
                self._wrong_code(session)
                return False
            window = found.enter_for_break_glass(actor_of(BREAK_GLASS_USER))
        except AuditNotWrittenError as exc:
            self._not_written(session, exc)
            return False
        login = self.event(
            session,
            EventType.MAINTENANCE_LOGIN,
            detail={
                "second_factor": "passed",
                "role": "admin",
                "break_glass": sealed.serial,
                "emergency": window.id,
            },
        )
        if not self._login_first(session, "the break-glass login", login):
            return False
        session.logged_in = True
        session.role = "admin"
        session.break_glass = sealed.serial
        session.emergency = window
        self._arm_idle(session)
        return True

    def _refusal(self, account: Maintainer, now: float) -> str | None:
        if account.expired(self._clock.now().date()):
            return (
                f"the account expired on {account.expires.isoformat()}: an administrator of "
                "the gateway extends it (expires in the person's maintainers.d file, then "
                "medgw reload) or adds a new one (medgw maintainer add)"
            )
        if self._approved(account.person, now):
            return None
        if account.role == "viewer" and self.settings.viewer_without_approval:
            return None
        return "no approved maintenance window now (medgw maintenance approve)"

    def refuse(self, session: _Session, what: str) -> None:
        self.emit(
            session,
            EventType.MAINTENANCE_REFUSED,
            outcome=Outcome.FAILURE,
            severity=Severity.WARNING,
            reason=f"{what} is not offered",
            detail={"request": what},
        )

    async def run(self, session: _Session, line: str) -> commands.Result:
        assert session.person is not None and session.role is not None
        over = (session.why_ended or "the session has ended") if session.ended else None
        if over is None and session.break_glass is not None:
            over = self._break_glass_over(session, credential=True)
        if over is not None:
            self.emit(
                session,
                EventType.MAINTENANCE_COMMAND,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                detail={"command": line[:200], "exit_status": 1, "refused": over},
            )
            self._end(session, over)
            return commands.Result(1, "the session has ended\n", refused=over)
        context = commands.Context(self._operations(), actor_of(session.person), self._reload)
        command, args, result = await commands.execute(
            context, session.role, line, stopping=self._draining
        )
        self._arm_idle(session)
        detail: dict[str, Any] = {
            "command": " ".join(command.words) if command else line[:200],
            "arguments": args[:16],
            "exit_status": result.status,
        }
        if result.refused is not None:
            detail["refused"] = result.refused
        if command is not None and command.reveals and result.shown:
            detail["reveals"] = command.reveals
            detail["shown"] = result.shown
        event = self.event(
            session,
            EventType.MAINTENANCE_COMMAND,
            outcome=Outcome.SUCCESS if result.status == 0 else Outcome.FAILURE,
            detail=detail,
            patient_ids=result.patients,
        )
        what = f"showing the answer to {detail['command']}"
        try:
            record_first(self._audit(), self._trail(), what, event)
        except AuditNotWrittenError as exc:
            # An answer is not shown without its record (a change the command makes is
            # refused on its own record, or done with its record owed, as its error
            # says); the daemon's log names the cause.
            log_not_written(self._log, exc)
            said = result.text if result.status != 0 else ""
            fix = f"fix: {exc.fix}\n" if exc.fix else ""
            return commands.Result(1, f"{said}{exc.message}\n{fix}")
        return result


_PROHIBITED = asyncssh.ChannelOpenError(
    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "forwarding is not offered"
)


class _Connection(asyncssh.SSHServer):
    def __init__(self, server: MaintenanceServer) -> None:
        self._server = server
        self._session = _Session(id=secrets.token_hex(8), remote="?")

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._session.remote = str(peer[0]) if peer else "?"
        self._session.conn = conn
        zone = self._server.settings.zone_of(self._session.remote)
        if zone is not None:
            # Linux accepts a packet for any of its addresses on any interface: a zone's
            # host that routes to the maintenance address reaches it.  Closed before a
            # word of SSH is said (asyncssh sends its version line after this call).
            self._session.ended = True
            self._server.emit(
                self._session,
                EventType.MAINTENANCE_LOGIN_FAILED,
                outcome=Outcome.FAILURE,
                severity=Severity.ALERT,
                reason=f"a connection from {self._session.remote}, inside the egress of zone "
                f"{zone!r}: the maintenance port is not for the zones' networks",
            )
            conn.abort()
            return
        if not self._server.opened(self._session):
            self._session.ended = True
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections")
            return
        verify = conn.validate_public_key

        async def first_factor(
            username: str, key_data: bytes, msg: bytes, signature: bytes
        ) -> bool:
            ok = await verify(username, key_data, msg, signature)
            if ok and msg:  # signed and verified: now the one-time code
                key = decode_ssh_public_key(key_data)
                self._session.fingerprint = key.get_fingerprint("sha256")
                return False
            return ok

        conn.validate_public_key = first_factor  # type: ignore[method-assign]

        # Switched off in asyncssh's options too; here each request is also audited.
        async def no_agent() -> bool:
            self._server.refuse(self._session, "agent forwarding")
            return False

        async def no_x11(chan: Any, auth_proto: bytes, auth_data: bytes, screen: int) -> None:
            self._server.refuse(self._session, "X11 forwarding")

        conn.create_agent_listener = no_agent  # type: ignore[method-assign]
        conn.attach_x11_listener = no_x11  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.closed(self._session)

    def begin_auth(self, username: str) -> bool:
        # A client may change the user name between requests: a key verified for one
        # person is never the first factor of another.
        if self._session.person != username[:64]:
            self._session.fingerprint = None
        self._session.person = username[:64]
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return self._session.fingerprint is None

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        allowed = self._server.key_allowed(username, key)
        if not allowed:
            self._session.offered_key = key.get_fingerprint("sha256")
        return allowed

    def kbdint_auth_supported(self) -> bool:
        return self._session.fingerprint is not None

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]]:
        return ("medgw maintenance", "", "", [("One-time code: ", False)])

    def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        if self._session.fingerprint is None or len(responses) != 1:
            return False
        return self._server.check_code(self._session, responses[0][:MAX_CODE_CHARS])

    def session_requested(self) -> asyncssh.SSHServerSession[str] | bool:
        if not self._session.logged_in or self._session.ended:
            return False
        return _CommandSession(self._server, self._session)

    def connection_requested(self, dest_host: str, dest_port: int, *_: Any) -> bool:
        self._server.refuse(self._session, f"port forwarding to {dest_host}:{dest_port}")
        raise _PROHIBITED

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._server.refuse(self._session, f"remote port forwarding from port {listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._server.refuse(self._session, "forwarding to a unix socket")
        raise _PROHIBITED

    def unix_server_requested(self, listen_path: str) -> bool:
        self._server.refuse(self._session, "remote forwarding of a unix socket")
        return False

    def tun_requested(self, unit: int | None) -> bool:
        self._server.refuse(self._session, "a tunnel device")
        return False

    def tap_requested(self, unit: int | None) -> bool:
        self._server.refuse(self._session, "a tap device")
        return False


class _CommandSession(asyncssh.SSHServerSession[str]):
    """One exec request: a command of the restricted set, its answer, its exit status."""

    def __init__(self, server: MaintenanceServer, session: _Session) -> None:
        self._server = server
        self._session = session
        self._command: str | None = None
        self._chan: asyncssh.SSHServerChannel[str] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        self._server.refuse(self._session, "a shell")
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        self._server.refuse(self._session, f"the {subsystem[:32]} subsystem")
        return False

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def eof_received(self) -> bool:
        return True  # the client sends no input (OpenSSH with stdin closed): answer still

    def session_started(self) -> None:
        assert self._chan is not None and self._command is not None
        task = asyncio.ensure_future(self._run(self._chan, self._command))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _run(self, chan: asyncssh.SSHServerChannel[str], line: str) -> None:
        result = await self._server.run(self._session, line)
        with contextlib.suppress(OSError, asyncssh.Error):
            if result.status == 0:
                chan.write(result.text)
            else:
                chan.write_stderr(result.text)
            chan.exit(result.status)
