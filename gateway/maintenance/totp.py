"""Time-based one-time passwords (RFC 6238) for the maintainers' second factor.

HMAC-SHA1 with 30-second steps and 6 digits is what every authenticator app reads from
an ``otpauth://`` URI, so it is the default.  HMAC-SHA1 here is a keyed MAC, not a
signature or a collision-resistant hash: CRYPTREC's restriction of SHA-1 is about
signatures, and HMAC-SHA1 stays listed as a MAC.  ``sha256`` is offered for
authenticators that support it (RFC 6238 section 1.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
STEP_SECONDS = 30
DIGITS = 6
SECRET_BYTES = 20  # 160 bits, the length RFC 4226 recommends
# A code is accepted one step either side of now: the phone's clock may be 30 s off.
DRIFT_STEPS = 1


def new_secret() -> str:
    """A fresh secret, base32 as authenticator apps take it."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=")


def decode_secret(secret: str) -> bytes:
    """The secret's bytes; ValueError when it is not base32."""
    text = secret.strip().replace(" ", "").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def code_at(key: bytes, step: int, algorithm: str = "sha1") -> str:
    mac = hmac.new(key, struct.pack(">Q", step), ALGORITHMS[algorithm]).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**DIGITS).zfill(DIGITS)


def step_of(unix_time: float) -> int:
    return int(unix_time // STEP_SECONDS)


def matching_step(key: bytes, code: str, unix_time: float, algorithm: str = "sha1") -> int | None:
    """The time step whose code ``code`` is (within the allowed drift), or None.  Every
    candidate is compared in constant time, so the answer's timing tells nothing."""
    now = step_of(unix_time)
    found = None
    for step in range(now - DRIFT_STEPS, now + DRIFT_STEPS + 1):
        if hmac.compare_digest(code_at(key, step, algorithm).encode(), code.strip().encode()):
            found = step
    return found


def otpauth_uri(secret: str, account: str, issuer: str, algorithm: str = "sha1") -> str:
    """The ``otpauth://totp/`` URI authenticator apps scan (Key Uri Format)."""
    query = urlencode(
        {
            "secret": secret,
            "issuer": issuer,
            "algorithm": algorithm.upper(),
            "digits": DIGITS,
            "period": STEP_SECONDS,
        }
    )
    return f"otpauth://totp/{quote(issuer)}:{quote(account)}?{query}"
