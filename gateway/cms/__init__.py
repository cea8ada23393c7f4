"""Object security: our own CMS (RFC 5652) on asn1crypto + cryptography.

SignedData, EnvelopedData and AuthEnvelopedData, plus S/MIME framing in
:mod:`gateway.cms.smime` and a byte-exact MIME helper in :mod:`gateway.cms.mime`.
Every algorithm decision goes through :class:`gateway.policy.AlgorithmPolicy`.
"""

from .decrypting import decrypt
from .envelope_algorithms import Decrypted
from .enveloping import encrypt
from .signing import compute_mic, sign
from .verification import VerifiedSignature, verify

__all__ = [
    "Decrypted",
    "VerifiedSignature",
    "compute_mic",
    "decrypt",
    "encrypt",
    "sign",
    "verify",
]
