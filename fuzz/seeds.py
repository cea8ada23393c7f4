"""The first inputs of each target: messages medgw and openssl make here, so that a
clean clone has seeds, plus the interop fixtures of other AS2 products when
their folder is present."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from gateway.as2.mdn import Disposition, build_receipt
from gateway.cms.compressed import compress
from gateway.cms.enveloping import encrypt
from gateway.cms.mime import make_entity, parse_entity
from gateway.cms.signing import sign
from gateway.cms.smime import compress_entity, envelope_entity, sign_entity
from gateway.pki.keypair import KeyPair, PrivateKey

from .targets import CONFIG_PEER_SEPARATOR, STRICT, TARGETS, Material

# The interop fixtures live beside the repository, not in it.
VENDORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "as2-vendors"
AT = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
PAYLOAD = b"MSH|^~\\&|LAB|KITA|HIS|SAKURA|20260105090000||ORU^R01|1|P|2.5\r\nOBX|1|NM|x||42\r\n"


def _entity(payload: bytes = PAYLOAD) -> bytes:
    return make_entity(
        "application/edi-hl7",
        payload,
        [("Content-Disposition", 'attachment; filename="result.hl7"')],
    )


def _openssl_ber(m: Material) -> Iterator[bytes]:
    """BER as OpenSSL streams it (indefinite lengths, segmented OCTET STRINGs)."""
    rsa = m.work / "rsa"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.write_bytes(_entity())
        runs = [
            ["cms", "-encrypt", "-aes-256-cbc", "-recip", str(rsa / "encrypt.crt")],
            ["cms", "-encrypt", "-aes-128-gcm", "-recip", str(rsa / "encrypt.crt")],
            ["cms", "-sign", "-signer", str(rsa / "sign.crt"), "-inkey", str(rsa / "sign.key")],
            ["cms", "-compress"],
        ]
        for args in runs:
            done = subprocess.run(
                ["openssl", *args, "-stream", "-outform", "DER", "-binary", "-in", str(src)],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0:
                yield done.stdout


def own_seeds(m: Material) -> dict[str, list[bytes]]:
    """Seeds made with medgw's own writers and openssl, for every target."""
    sender = m.sender
    entity = _entity()
    signed_entity = sign_entity(
        entity, sender.certificate, sender.key, signing_time=AT, policy=STRICT
    )
    cms: list[bytes] = [
        sign(PAYLOAD, sender.certificate, sender.key, signing_time=AT, policy=STRICT),
        sign(
            entity,
            sender.certificate,
            sender.key,
            detached=False,
            signing_time=AT,
            policy=STRICT,
        ),
        compress(entity),
        *_openssl_ber(m),
    ]
    smime = [entity, signed_entity, compress_entity(signed_entity)]
    for party in m.recipients[:2]:
        for cipher in ("aes-256-gcm", "aes-128-cbc"):
            cms.append(encrypt(signed_entity, [party.certificate], cipher=cipher, policy=STRICT))
            ctype, der = envelope_entity(
                signed_entity, [party.certificate], cipher=cipher, policy=STRICT
            )
            smime.append(make_entity(ctype, der))
    headers, body = parse_entity(smime[-1])
    http = (
        b"AS2-Version: 1.2\r\nAS2-From: KITA-LAB\r\nAS2-To: SAKURA-HOSPITAL\r\n"
        b"Message-ID: <20260105090000.1@kita-lab>\r\n"
        b"Disposition-Notification-To: mdn@kita-lab\r\n"
        b"Disposition-Notification-Options: signed-receipt-protocol=optional, "
        b"pkcs7-signature; signed-receipt-micalg=optional, sha-256, sha-384\r\n"
        b"Receipt-Delivery-Option: https://lab.example:4080/as2\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\n"
    )
    as2 = [
        http + entity,
        http + signed_entity,
        http + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + body,
    ]
    signing = KeyPair(
        Path("sign.crt"), Path("sign.key"), sender.certificate, cast(PrivateKey, sender.key)
    )
    mdn = []
    for disposition in (Disposition.PROCESSED, Disposition.DECRYPTION_FAILED):
        receipt = build_receipt(
            original_message_id="<20260105090000.1@sakura-hospital>",
            our_as2_id="KITA-LAB",
            peer_as2_id="SAKURA-HOSPITAL",
            disposition=disposition,
            mic="mZ0ug3KDbQcs8Q6gO3BwfZC5kUvTJYc8zE8X1xzJwRg=, sha-256",
            signing=signing,
            digest="sha256",
            policy=STRICT,
            at=AT,
            details="signed by KITA-LAB",
        )
        mdn.append(
            b"".join(
                f"{k}: {v}\r\n".encode() for k, v in receipt.headers if k.lower() == "content-type"
            )
            + b"\r\n"
            + receipt.body
        )
    installation = m.demo_config.parent
    config = [
        m.demo_config.read_bytes()
        + CONFIG_PEER_SEPARATOR
        + (installation / "peers.d" / "lab.toml").read_bytes(),
        m.demo_config.read_bytes(),
    ]
    example = Path(__file__).resolve().parents[1] / "config" / "gateway.toml"
    if example.is_file():
        config.append(example.read_bytes())
    return {"cms": cms, "smime": smime, "as2": as2, "mdn": mdn, "config": config}


def vendor_seeds(vendors: Path) -> dict[str, list[bytes]]:
    """The interop fixtures: AS2 messages and receipts other products sent."""
    out: dict[str, list[bytes]] = {name: [] for name in TARGETS}
    for path in sorted(vendors.glob("*.as2")) + sorted(vendors.glob("*.msg")):
        raw = path.read_bytes()
        out["as2"].append(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        out["smime"].append(raw)
        _headers, body = parse_entity(raw)
        if body[:1] == b"\x30":
            out["cms"].append(body)
    for path in sorted(vendors.glob("*.mdn")):
        out["mdn"].append(path.read_bytes())
        out["smime"].append(path.read_bytes())
    return out


def write_seeds(corpus: Path, seeds: list[bytes]) -> int:
    """Write each seed into ``corpus`` under its SHA-1 name, as libFuzzer names inputs."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        name = hashlib.sha1(seed, usedforsecurity=False).hexdigest()
        (corpus / name).write_bytes(seed)
    return len(seeds)


def seed_all(
    m: Material, corpus_root: Path, vendors: Path | None, only: str | None = None
) -> dict[str, int]:
    """Seed ``corpus_root/<target>`` for every target (or ``only`` one); returns how many
    seeds each got."""
    seeds = own_seeds(m)
    if vendors is not None and vendors.is_dir():
        for name, more in vendor_seeds(vendors).items():
            seeds[name] += more
    names = [only] if only is not None else list(TARGETS)
    return {name: write_seeds(corpus_root / name, seeds[name]) for name in names}
