"""The SSH algorithms the maintenance listener offers: CRYPTREC-listed ones only.

CRYPTREC e-Government Recommended Ciphers List: ECDH over P-256/P-384 for key
agreement, AES-128/256 in GCM or CTR for confidentiality, HMAC with SHA-256/SHA-512
for integrity, ECDSA P-256/P-384 and RSA (PKCS#1 v1.5 with SHA-256/512) for
signatures.  Not offered: curve25519/X25519 (the list's ECDH is over the NIST curves),
Ed25519 (maintainers' keys follow the certificates' ECDSA/RSA families),
chacha20-poly1305, UMAC, SHA-1 in kex or signatures, CBC modes, 3DES and arcfour.
The ``-etm`` MACs are the same HMACs applied to the ciphertext (encrypt-then-MAC).
"""

from __future__ import annotations

KEX = ("ecdh-sha2-nistp384", "ecdh-sha2-nistp256")
CIPHERS = ("aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr", "aes128-ctr")
MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
HOST_KEY = ("ecdsa-sha2-nistp384", "ecdsa-sha2-nistp256")
# What a maintainer's key may sign with (user authentication).
USER_SIGNATURES = (
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp256",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
USER_KEY_TYPES = ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ssh-rsa")
RSA_MIN_BITS = 2048
