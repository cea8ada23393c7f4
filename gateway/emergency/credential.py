"""The sealed break-glass credential (EMG-3).

``medgw emergency seal`` makes a new SSH key pair and a random code on the host, shows
the private key and the code once (for the envelope in the safe), and hands the daemon
only what verifies them: the public key and a salted HMAC-SHA-256 of the code.  Neither
secret is stored anywhere.  The verifier lives in ``emergency-credential.json`` in the
state folder, mode 600; a copy anyone else can read or write, or another user owns,
is refused, not trusted.

A login as ``emergency`` with that key and code works once.  Its use is written to
the file (fsynced, atomically) before the session starts, so a crash or a restart
cannot give it a second life; a new seal replaces it (and a sealed but unused one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gateway.errors import MedgwError, UnsafeFileError
from gateway.fsutil import read_private, write_atomic

USER = "emergency"  # the SSH user name of the break-glass login
FILE_NAME = "emergency-credential.json"
CODE_BYTES = 20  # 160 random bits: the code is its own strength, no slow hash needed
SALT_BYTES = 16
MAX_FILE_BYTES = 16 * 1024


class CredentialError(MedgwError):
    """The break-glass credential cannot be sealed or read."""


@dataclass(frozen=True)
class Sealed:
    serial: int  # counts the seals: the envelope names it
    public_key: str  # OpenSSH public key line
    fingerprint: str  # SHA256:...
    salt: str  # hex
    verifier: str  # hex HMAC-SHA-256(salt, code)
    sealed_at: float
    sealed_by: str
    used_at: float | None = None
    used_from: str | None = None

    def view(self) -> dict[str, Any]:
        """What an administrator may see: never the verifier."""
        found = asdict(self)
        del found["salt"], found["verifier"]
        return found


def new_code() -> str:
    """The second secret of the envelope, in groups of four for reading aloud."""
    text = base64.b32encode(secrets.token_bytes(CODE_BYTES)).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def normal_code(code: str) -> bytes:
    return "".join(c for c in code.upper() if c.isalnum()).encode("ascii", "replace")


def verifier_of(code: str, salt: bytes) -> str:
    return hmac.new(salt, normal_code(code), hashlib.sha256).hexdigest()


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


class CredentialStore:
    """The one sealed credential of a state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def current(self) -> Sealed | None:
        """The sealed credential, or None when there is none.  A file others can read or
        write, or one that cannot be read whole, is a CredentialError: never trusted."""
        try:
            data = read_private(self.path, MAX_FILE_BYTES)
        except UnsafeFileError as exc:
            raise CredentialError(
                f"{exc.message}: the break-glass credential is not trusted",
                fix="seal a new credential with `medgw emergency seal` (the envelope "
                "may have been read)",
            ) from None
        if data is None:
            return None
        try:
            fields = json.loads(data)
            return Sealed(**fields)
        except (ValueError, TypeError):
            raise CredentialError(
                f"{self.path} is not a sealed credential", fix="seal a new credential"
            ) from None

    def seal(
        self,
        public_key: str,
        fingerprint: str,
        salt: bytes,
        verifier: str,
        *,
        actor: str,
        now: float,
    ) -> tuple[Sealed, Sealed | None]:
        """Store a new credential in place of the old one; both are returned."""
        sealed, old = self.next_seal(public_key, fingerprint, salt, verifier, actor=actor, now=now)
        self.store(sealed)
        return sealed, old

    def next_seal(
        self,
        public_key: str,
        fingerprint: str,
        salt: bytes,
        verifier: str,
        *,
        actor: str,
        now: float,
    ) -> tuple[Sealed, Sealed | None]:
        """The credential :meth:`seal` would store (not stored yet: :meth:`store`), and
        the one it replaces."""
        try:
            old = self.current()
        except CredentialError:
            old = None
        sealed = Sealed(
            (old.serial if old else 0) + 1,
            public_key,
            fingerprint,
            salt.hex(),
            verifier,
            now,
            actor,
        )
        return sealed, old

    def store(self, sealed: Sealed) -> None:
        """Store ``sealed`` in place of the credential there."""
        self._write(sealed)

    def use(self, sealed: Sealed, remote: str, now: float) -> bool:
        """Record the one use of ``sealed``, durably, before its session starts.  False
        when it was used or replaced in between."""
        current = self.current()
        if current is None or current != sealed or current.used_at is not None:
            return False
        self._write(replace(current, used_at=now, used_from=remote))
        return True

    def _write(self, sealed: Sealed) -> None:
        text = json.dumps(asdict(sealed), sort_keys=True).encode()
        write_atomic(self.path, [text], mode=0o600)


def code_matches(sealed: Sealed, code: str) -> bool:
    """Constant time: the answer's timing tells nothing of the code."""
    expected = verifier_of(code, bytes.fromhex(sealed.salt))
    return hmac.compare_digest(expected, sealed.verifier)
