"""How many of each repeated part a received CMS message or S/MIME entity may carry.

A real message has one signer with its certificate and a short chain, one or
two recipients and a handful of attributes (Mendelson, OpenAS2, Sterling,
pyas2, OpenSSL and medgw itself send 1 SignerInfo, 1-3 certificates, no CRL,
4-7 signed attributes and 1 recipient).  Without a bound, a peer could make one
message cost gigabytes of memory and minutes of CPU (a million SignerInfos, each
checked) and write megabytes into the audit trail.  Each bound is far above
what any real message carries and is checked while the structure is read,
before anything is built from the elements counted; a message beyond one is
refused like any other malformed message (:class:`TooMany`).
"""

from __future__ import annotations

from ..errors import MalformedMessageError

MAX_SIGNER_INFOS = 8
MAX_DIGEST_ALGORITHMS = 8
MAX_CERTIFICATES = 32  # in a SignedData or an originatorInfo
MAX_CRLS = 8  # in a SignedData or an originatorInfo
MAX_ATTRIBUTES = 32  # signed or unsigned attributes of one signer; attributes of an envelope
MAX_ATTRIBUTE_VALUES = 16  # values of one attribute (RFC 5652's own have exactly one)
MAX_RECIPIENT_INFOS = 16
MAX_RECIPIENT_KEYS = 16  # recipientEncryptedKeys of one KeyAgreeRecipientInfo
MAX_MIME_HEADERS = 200  # header lines of one MIME entity or part
MAX_REPORT_PARTS = 16  # parts of a receipt's multipart/report (a real one has 2 or 3)
# The parts of a message read whole into memory, besides the content: the
# RecipientInfos (and an originatorInfo), and a detached signature part.  A real one
# is a few KiB (the signature part base64, with the certificate chain).
MAX_HEADER_ELEMENT = 1 << 20
MAX_SIGNATURE_PART = 1 << 20
# A signed entity that cannot be verified as a stream (opaque signed-data, or a
# multipart/signed whose line endings were converted in transit) is verified in
# memory, which takes several copies of it (about 9 times its size at the peak):
# only up to this size.
MAX_IN_MEMORY_ENTITY = 16 << 20


class TooMany(MalformedMessageError):
    """More of one part than any real message carries."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(
            f"the message carries more than {limit} {what}, more than any real message has "
            "(a limit against messages built to exhaust the receiver)",
            fix="ask the peer to send a standard message; if its product really sends "
            "this many, tell the medgw maintainers",
        )
        self.what = what
        self.limit = limit


def check_count(count: int, limit: int, what: str) -> None:
    """Raise :class:`TooMany` if ``count`` is above ``limit``."""
    if count > limit:
        raise TooMany(what, limit)
