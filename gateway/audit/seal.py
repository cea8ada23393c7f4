"""Signed checkpoints: what makes the hash chain evidence against an insider.

A hash chain alone proves nothing to someone who can write the log: they can
delete a record and compute the chain again.  So, every N records, every M
seconds and at shutdown, the log appends a checkpoint record (event
``audit.checkpoint``) whose ``detail`` holds an ECDSA signature, made with an
audit key kept outside the state folder, over the sequence number and hash of
the last record it seals.  Since each hash covers every record before it, one
signature seals the whole trail up to that point.  A reviewer verifies with the
certificate alone.  A checkpoint is an ordinary audit record: whatever carries
records off the box carries checkpoints too, and the last one seen outside is
what a truncated trail is detected against (``medgw audit verify
--last-checkpoint SEQ:HASH``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import InvalidValueError

CHECKPOINT_EVENT = "audit.checkpoint"
CURVES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}  # CRYPTREC-listed curves


@dataclass(frozen=True)
class SealSettings:
    """``[audit]`` in gateway.toml: the checkpoint key and how often it signs."""

    signing_key: ec.EllipticCurvePrivateKey = field(compare=False)  # the certificate's key
    certificate: x509.Certificate
    every_records: int = 1000
    every_seconds: float = 300.0


def key_id(public: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, hex: which key signed a checkpoint."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _hash_for(public: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    return CURVES[public.curve.name]()


def signed_bytes(node: str, seq: int, sealed_hash: str, previous: int) -> bytes:
    """What a checkpoint's signature covers: the checkpoint's place and what it seals."""
    payload = {
        "checkpoint": seq,
        "node": node,
        "previous_checkpoint": previous,
        "sealed_hash": sealed_hash,
        "sealed_seq": seq - 1,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


class Sealer:
    """Signs checkpoints with the audit key."""

    def __init__(self, settings: SealSettings) -> None:
        self.settings = settings
        self._key_id = key_id(settings.signing_key.public_key())

    def detail(
        self, node: str, seq: int, sealed_hash: str, previous: int, trigger: str
    ) -> dict[str, Any]:
        key = self.settings.signing_key
        signature = key.sign(
            signed_bytes(node, seq, sealed_hash, previous),
            ec.ECDSA(_hash_for(key.public_key())),
        )
        return {
            "sealed_seq": seq - 1,
            "sealed_hash": sealed_hash,
            "previous_checkpoint": previous,
            "trigger": trigger,
            "key_id": self._key_id,
            "signature": base64.b64encode(signature).decode(),
        }


class CheckpointKeys:
    """The public keys a reviewer trusts checkpoints from, by key id."""

    def __init__(self, certificates: list[x509.Certificate]) -> None:
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for cert in certificates:
            public = cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
                raise InvalidValueError(
                    f"certificate {cert.subject.rfc4514_string()} does not hold an ECDSA "
                    "P-256 or P-384 key: checkpoints are signed only with those",
                    fix="give the certificate of the audit checkpoint key ([audit] "
                    "certificate in gateway.toml)",
                )
            self._keys[key_id(public)] = public

    def __bool__(self) -> bool:
        return bool(self._keys)

    def problem(self, record: dict[str, Any]) -> str | None:
        """Why checkpoint ``record`` is not validly signed, or None if it is."""
        detail = record.get("detail")
        if not isinstance(detail, dict):
            return "a checkpoint without its signature"
        public = self._keys.get(str(detail.get("key_id")))
        if public is None:
            return f"a checkpoint signed by a key not given (key id {detail.get('key_id')})"
        seq = record.get("seq")
        if (
            not isinstance(seq, int)
            or detail.get("sealed_seq") != seq - 1
            or detail.get("sealed_hash") != record.get("prev")
        ):
            return "a checkpoint that does not seal the record before it"
        try:
            signature = base64.b64decode(str(detail.get("signature")), validate=True)
            public.verify(
                signature,
                signed_bytes(
                    str(record.get("node")),
                    seq,
                    str(record.get("prev")),
                    int(detail.get("previous_checkpoint", -1)),
                ),
                ec.ECDSA(_hash_for(public)),
            )
        except (InvalidSignature, ValueError, TypeError):
            return "the checkpoint's signature does not verify: the records it seals were changed"
        return None
