"""One exception tree for the whole gateway.

Every error carries a human-readable ``message`` that names the input and the
rule that was broken, and, where there is one, a ``fix`` an administrator can
act on.  Errors raised while handling a remote peer's request are never shown
to that peer verbatim: the channel layer maps them to a generic AS2
disposition and keeps the detail for the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MedgwError(Exception):
    """Base class of every error the gateway raises on purpose."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} (fix: {self.fix})"
        return self.message


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration: where, what, and how to fix it."""

    file: str
    key: str
    message: str
    fix: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{self.severity}: {where}: {self.message} (fix: {self.fix})"


class InvalidValueError(MedgwError, ValueError):
    """A value handed to the gateway breaks a rule: an argument of the command line or
    of a function (a time without a time zone, an unknown option, a number out of
    range), a header a local submitter sent.  A ``ValueError`` too, so that a caller
    that asks for a value and catches ``ValueError`` keeps working."""


class InvalidTypeError(MedgwError, TypeError):
    """A value of the wrong type handed to the gateway (bytes expected, say).  A
    ``TypeError`` too."""


class UnknownNameError(MedgwError, KeyError):
    """A name looked up in the loaded configuration that it does not have (a peer, a
    zone).  A ``KeyError`` too."""


class ConfigError(MedgwError):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...]) -> None:
        self.problems = tuple(problems)
        summary = "; ".join(str(p) for p in self.problems) or "invalid configuration"
        super().__init__(summary)


class PolicyError(MedgwError):
    """An algorithm or key size is not allowed by the CRYPTREC policy."""

    def __init__(self, algorithm: str, rule: str, fix: str) -> None:
        self.algorithm = algorithm
        self.rule = rule
        super().__init__(f"algorithm {algorithm} refused: {rule}", fix=fix)


class ObjectSecurityError(MedgwError):
    """Signing, verification, encryption or decryption of a payload failed."""


class ContentChangedError(ObjectSecurityError):
    """A document changed while it was being signed: what was signed is not what
    would be sent."""


class MalformedMessageError(ObjectSecurityError):
    """The CMS / S/MIME structure cannot be parsed."""


class SignatureError(ObjectSecurityError):
    """A signature or a signed attribute does not verify (content altered)."""


class SignerNotTrustedError(ObjectSecurityError):
    """The signature is intact but the signer is not an accepted signer."""


class DecryptionError(ObjectSecurityError):
    """The payload cannot be decrypted with our keys."""


class ProtocolError(MedgwError):
    """An AS2 request or receipt does not follow the protocol."""


class RoutingError(MedgwError):
    """A message has no permitted route."""


class EgressRefused(RoutingError, OSError):
    """The connect path refused an outbound connection: the address is outside the
    route's zone, inside a zone for the internal side, or one of our own listeners
    (NET-4).  An ``OSError`` too, so that HTTP clients report it as a failed connect."""


class TransportError(MedgwError):
    """The peer could not be reached or did not answer; the send will be retried.

    ``refused``: the connect path refused the address (outside the zone's egress,
    NET-4): trying again helps only once the configuration is corrected.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class SpoolError(MedgwError):
    """The durable spool cannot store or change a message."""


class SpoolUnavailableError(SpoolError):
    """The spool cannot be written for now, whatever the change, until something outside
    medgw passes or is done: its database server does not answer, another process holds
    its database, its disk is full.  Every change tried meanwhile fails alike (each
    after its own wait): a caller with several to make does not try them one by one."""


class SpoolUnreachableError(SpoolUnavailableError):
    """The spool's database server does not answer (for now: it is tried again)."""


class SpoolBusyError(SpoolUnavailableError):
    """Another process (a medgw command, a backup, a ``sqlite3`` shell left in a
    transaction) held the SQLite spool's database for longer than medgw waits for it."""


class SpoolFullError(SpoolUnavailableError):
    """No space is left for the spool's database: on the file system of a SQLite spool,
    on the PostgreSQL server's disk (SQLSTATE 53100).  A :class:`SpoolError`, unlike
    :class:`StorageFullError` (the inbox's): every caller of the spool takes it as one."""


class SpoolOutcomeUnknownError(SpoolUnreachableError):
    """The connection to the spool's database was lost during a COMMIT, and the database
    could not be asked since whether it was recorded: the change may or may not be
    there, and the caller must leave what is safe either way."""


class SpoolReplacedError(SpoolUnreachableError):
    """The spool database was replaced (restored from a backup) while this node was
    running: what the node holds in memory (claims, leases, owed records) belongs to the
    spool it started on.  Every further call fails with this error, for good: the node
    writes nothing more and stops; a restart reads the restored spool."""


class NodeNameTakenError(SpoolReplacedError):
    """Another live node holds this node's ``[cluster] node_name`` on the shared PostgreSQL
    spool: the claims, the interrupted work and the owed audit records under that name
    are that node's.  A start refuses; a running node whose hold on the name went with a
    lost session, and which finds the name taken meanwhile, stops as when its spool was
    replaced (every further call fails with this error)."""


class StoredReceiptRefusedError(SpoolError):
    """The receipt a spool row keeps is not one the gateway stored (the row was changed
    outside medgw): refused before its bytes are read."""


class StoredReceiptTooLargeError(StoredReceiptRefusedError):
    """The receipt a spool row keeps is larger than any the gateway stores: refused by
    its size, its bytes never read."""


class StoredReceiptNotBytesError(StoredReceiptRefusedError):
    """The receipt a spool row keeps is not stored as bytes (SQLite: a TEXT value, whose
    length the database counts in characters up to a first NUL, so its size cannot
    bound what a read would take): refused by its type, its bytes never read."""


class ClaimHeldError(SpoolError):
    """Another node holds the claim on this message (it is sending, or delivering, it),
    and its lease has not run out: this node leaves it alone."""


class DeliveryError(MedgwError):
    """A received document cannot be delivered to the internal side."""


class UnsafeFileError(MedgwError):
    """A private state file that another user could have written or read."""


class AtRestError(MedgwError):
    """What the gateway keeps encrypted at rest cannot be read or written: its key is
    missing or destroyed, or the stored bytes are not what was written."""


class AtRestTamperedError(AtRestError):
    """Stored ciphertext that fails authentication: changed, truncated, reordered, or
    another item's."""


class DataKeyMissingError(AtRestError):
    """A sealed item whose data key is not in the spool: disposed of (the record naming
    it is cleared in the same transaction), or the spool was altered or replaced."""


class DataKeyAlteredError(AtRestError):
    """A sealed item whose data key in the spool does not unwrap under its key-encryption
    key while another data key wrapped under that same key does: the key is the right
    one, and this item's data key was changed outside medgw."""


class InboxUnavailableError(DeliveryError):
    """Where a received document goes cannot be written for now, for a cause the
    administrator removes on the host without changing the configuration.

    Unlike other delivery errors this one passes once that is done: the peer is asked
    to resend instead of being told the delivery failed.  ``folder``: the inbox folder
    the document was to be stored in.
    """

    def __init__(self, message: str, *, fix: str | None = None, folder: Path | None = None):
        super().__init__(message, fix=fix)
        self.folder = folder


class StorageFullError(InboxUnavailableError):
    """No space is left where a received document goes (disk full, quota)."""


class InboxNotWritableError(InboxUnavailableError):
    """The user medgw runs as may not write where a received document goes (EACCES,
    EPERM), or it lies on a file system mounted read-only (EROFS)."""


class AuditNotWrittenError(MedgwError):
    """An accountable action refused, not done, because its audit record could not be
    written (a full disk under the audit log, say): no action without its audit record.
    ``trail``: the audit log (None where the caller does not know it); ``cause``: the
    error the write gave (its ``errno``: ENOSPC for a full disk)."""

    def __init__(self, message: str, *, fix: str, trail: Path | None, cause: OSError) -> None:
        super().__init__(message, fix=fix)
        self.trail = trail
        self.cause = cause


class AuditRecordOwedError(AuditNotWrittenError):
    """A change committed in the spool (a message retried or cancelled, a hand-over
    retried) whose record could not be written yet: the change is done, and its record
    owed; medgw writes it once the audit log takes records again, or at its next start
    (gateway.audit.owed).  Not recorded first: the spool keeps which record it owes."""
