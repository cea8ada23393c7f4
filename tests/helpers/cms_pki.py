"""The test PKI of the CMS tests: a CA and one party per key kind (RSA 2048/3072,
P-256/P-384, a second RSA and P-256 party, RSA 1024 for refusals, and a rogue
party with the issuer and serial of rsa2048 but another key), written to files
for openssl, with the fixed times and policies the tests sign and verify with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.policy import LEGACY_ALGORITHMS, AlgorithmPolicy

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2049, 12, 31, tzinfo=UTC)
SIGNING_TIME = datetime(2025, 6, 1, 9, 30, 15, tzinfo=UTC)
STRICT = AlgorithmPolicy()
ALL_LEGACY = AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS))


# name -> key spec
PARTY_KEYS: dict[str, tuple[str, Any]] = {
    "rsa2048": ("rsa", 2048),
    "rsa3072": ("rsa", 3072),
    "p256": ("ec", ec.SECP256R1()),
    "p384": ("ec", ec.SECP384R1()),
    "other-rsa": ("rsa", 2048),
    "other-p256": ("ec", ec.SECP256R1()),
    "rsa1024": ("rsa", 1024),
}


PAYLOADS: dict[str, bytes] = {
    "empty": b"",
    "hl7-bare-cr": b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rPID|||12345||DOE^JANE\r",
    "binary": bytes(range(256)) * 3 + b"\r\n\r\n--boundary\r\n\x00\r",
    "mime-crlf": b"Content-Type: text/plain\r\n\r\nline one\r\nline two\r\n",
}


@dataclass(frozen=True)
class Party:
    name: str
    key: Any
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca_cert: x509.Certificate
    ca_path: Path
    parties: dict[str, Party]

    def __getitem__(self, name: str) -> Party:
        return self.parties[name]


def _new_key(spec: tuple[str, Any]) -> Any:
    kind, arg = spec
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=arg)
    return ec.generate_private_key(arg)


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path = directory / f"{name}.crt.pem"
    key_path = directory / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _issue(
    subject_cn: str,
    key: Any,
    ca_cert: x509.Certificate | None,
    ca_key: Any,
    *,
    serial: int | None = None,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medgw test"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    is_ca = ca_cert is None
    issuer = subject if ca_cert is None else ca_cert.subject
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    )
    if is_ca:
        ku = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        is_rsa = isinstance(pub, rsa.RSAPublicKey)
        ku = x509.KeyUsage(
            digital_signature=True,
            content_commitment=True,
            key_encipherment=is_rsa,
            data_encipherment=False,
            key_agreement=not is_rsa,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        assert ca_cert is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    builder = builder.add_extension(ku, critical=True)
    return builder.sign(ca_key, hashes.SHA256())


def build_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("medgw test CA", ca_key, None, ca_key)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    parties: dict[str, Party] = {}
    for name, spec in PARTY_KEYS.items():
        key = _new_key(spec)
        cert = _issue(f"{name}.medgw.test", key, ca_cert, ca_key)
        cert_path, key_path = _write(directory, name, cert, key)
        parties[name] = Party(name, key, cert, cert_path, key_path)
    # "rogue": same subject/issuer/serial as rsa2048, different key, issued by another CA
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = x509.CertificateBuilder(
        issuer_name=ca_cert.subject,
        subject_name=ca_cert.subject,
        public_key=rogue_ca_key.public_key(),
        serial_number=1,
        not_valid_before=NOT_BEFORE,
        not_valid_after=NOT_AFTER,
    ).sign(rogue_ca_key, hashes.SHA256())
    rogue_key = _new_key(("rsa", 2048))
    rogue_cert = _issue(
        "rsa2048.medgw.test",
        rogue_key,
        rogue_ca,
        rogue_ca_key,
        serial=parties["rsa2048"].cert.serial_number,
    )
    cert_path, key_path = _write(directory, "rogue", rogue_cert, rogue_key)
    parties["rogue"] = Party("rogue", rogue_key, rogue_cert, cert_path, key_path)
    return Pki(directory, ca_cert, ca_path, parties)
