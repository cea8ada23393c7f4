"""Every error the gateway raises on purpose is a MedgwError naming the input, the rule
and the fix (one exception tree, gateway/errors.py).  Those that replaced a bare
ValueError, TypeError or KeyError stay one too, so a caller catching it keeps working.

Each case triggers the error through the real function with a real bad value and
checks its type, its message (the input it names and the rule) and that it has a fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.patients import declared_patients
from gateway.audit.seal import CheckpointKeys
from gateway.audit.verify import parse_checkpoint
from gateway.clock import SystemClock
from gateway.cms import stream
from gateway.cms.contentinfo import load_content_info
from gateway.cms.decrypting import decrypt
from gateway.cms.enveloping import encrypt, encrypt_chunks
from gateway.cms.mime import make_entity
from gateway.cms.signing import sign
from gateway.cms.trust import TrustAnchors
from gateway.config import load_config
from gateway.errors import (
    ContentChangedError,
    InvalidTypeError,
    InvalidValueError,
    MedgwError,
    ObjectSecurityError,
    UnknownNameError,
)
from gateway.fairpool import FairPool
from gateway.pki.crl import crl_findings
from gateway.pki.demo import DemoLayout, init_demo
from gateway.pki.issue import Issued, issue, make_ca, new_key
from gateway.pki.tls import delivery_tls_context
from gateway.pki.validate import Purpose, RevocationPolicy, validate
from gateway.policy import AlgorithmPolicy
from gateway.routing import Origin
from gateway.spool import SqliteSpool

NOW = datetime.now(UTC)
NAIVE = datetime(2026, 1, 1, 9, 30)
POLICY = AlgorithmPolicy()


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("Error Tree CA", now=NOW)


@pytest.fixture(scope="module")
def signer(ca: Issued) -> Issued:
    return issue(ca, "Error Tree Signer", purpose="smime-sign", now=NOW)


@pytest.fixture(scope="module")
def recipient(ca: Issued) -> Issued:
    return issue(ca, "Error Tree Recipient", purpose="smime-encrypt", now=NOW)


def check(
    raised: pytest.ExceptionInfo[Any], kind: type[MedgwError], legacy: type[Exception], *names: str
) -> None:
    """``raised`` is a ``kind`` (and still a ``legacy``), its message names each of
    ``names`` (the input and the rule), and it says how to fix it."""
    error = raised.value
    assert type(error) is kind
    assert isinstance(error, MedgwError) and isinstance(error, legacy)
    for name in names:
        assert name in error.message, (name, error.message)
    assert error.fix, error.message
    assert f"(fix: {error.fix})" in str(error)


def raises(call: Callable[[], Any], kind: type[MedgwError]) -> pytest.ExceptionInfo[Any]:
    with pytest.raises(kind) as raised:
        call()
    return raised


# -- naive times: every time handed to the crypto and the PKI has a time zone -------------


def test_signing_time_without_a_time_zone(signer: Issued) -> None:
    raised = raises(
        lambda: sign(b"x", signer.certificate, signer.key, signing_time=NAIVE, policy=POLICY),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, "signing_time=2026-01-01T09:30:00", "time zone")


def test_rsa_padding_that_is_neither_pss_nor_pkcs1(ca: Issued) -> None:
    rsa = issue(ca, "RSA Signer", purpose="smime-sign", now=NOW, key_kind="rsa-2048")
    raised = raises(
        lambda: sign(
            b"x",
            rsa.certificate,
            rsa.key,
            rsa_padding="oaep",  # type: ignore[arg-type]
            signing_time=NOW,
            policy=POLICY,
        ),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, "rsa_padding='oaep'", "PSS or PKCS#1 v1.5")


def test_signer_judged_at_a_time_without_a_time_zone(ca: Issued, signer: Issued) -> None:
    anchors = TrustAnchors((ca.certificate,), NAIVE)
    raised = raises(lambda: anchors(signer.certificate, ()), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "at=2026-01-01T09:30:00", "time zone")


def test_crl_freshness_at_a_time_without_a_time_zone() -> None:
    raised = raises(lambda: crl_findings([], at=NAIVE), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "at=2026-01-01T09:30:00", "time zone")


def test_certificate_issued_at_a_time_without_a_time_zone(ca: Issued) -> None:
    raised = raises(lambda: issue(ca, "x", purpose="tls", now=NAIVE), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "now=2026-01-01T09:30:00", "time zone")


def test_path_validated_at_a_time_without_a_time_zone(ca: Issued, signer: Issued) -> None:
    raised = raises(
        lambda: asyncio.run(
            validate(
                signer.certificate,
                anchors=[ca.certificate],
                purpose=Purpose.SMIME_SIGN,
                at=NAIVE,
                revocation=RevocationPolicy.OFF,
                policy=POLICY,
            )
        ),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, "at=2026-01-01T09:30:00", "time zone")


def test_ocsp_without_a_client(ca: Issued, signer: Issued) -> None:
    """OCSP asked for without the client that says how its requests leave is the caller's
    mistake, said as one (as a time without a time zone is), not a certificate that
    "could not be validated: internal error"."""
    raised = raises(
        lambda: asyncio.run(
            validate(
                signer.certificate,
                anchors=[ca.certificate],
                purpose=Purpose.SMIME_SIGN,
                at=NOW,
                revocation=RevocationPolicy.PREFER,
                ocsp=True,
                policy=POLICY,
            )
        ),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, "ocsp=True without an ocsp_client", "NET-4")


# -- values out of their range ------------------------------------------------------------


def test_certificate_valid_for_no_days(ca: Issued) -> None:
    raised = raises(lambda: issue(ca, "x", purpose="tls", now=NOW, days=0), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "days=0", "positive number of days")


def test_unknown_key_kind() -> None:
    raised = raises(lambda: new_key("dsa-1024"), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "'dsa-1024'", "key kind")
    assert "ec-p256" in (raised.value.fix or "")


def test_unknown_certificate_purpose(ca: Issued) -> None:
    raised = raises(lambda: issue(ca, "x", purpose="code-signing", now=NOW), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "'code-signing'", "purpose")
    assert "smime-sign" in (raised.value.fix or "")


@pytest.mark.parametrize(
    ("ports", "names"),
    [((0, 18444), ("port 0", "1..65535")), ((18443, 18443), ("18443", "different ports"))],
)
def test_demo_ports(tmp_path: Path, ports: tuple[int, int], names: tuple[str, ...]) -> None:
    raised = raises(
        lambda: init_demo(tmp_path, now=NOW, hospital_port=ports[0], lab_port=ports[1]),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, *names)


def test_one_keys_share_of_the_workers() -> None:
    raised = raises(lambda: FairPool(4, 5), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "per_key=5", "1..4")


def test_policy_with_an_unknown_legacy_algorithm() -> None:
    raised = raises(lambda: AlgorithmPolicy(accept_legacy=frozenset({"md5"})), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "md5", "not a legacy algorithm")


def test_policy_with_an_unknown_key_transport() -> None:
    raised = raises(lambda: AlgorithmPolicy(key_transport="rsa-kem"), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "'rsa-kem'", "not a key transport to send with")


def test_origin_naming_a_peer_without_its_zone() -> None:
    raised = raises(lambda: Origin(peer="lab"), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "peer='lab'", "both the peer and its zone")


def test_checkpoint_that_is_not_seq_and_hash() -> None:
    raised = raises(lambda: parse_checkpoint("12:abc"), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "'12:abc'", "SEQ:HASH")


def test_checkpoint_keys_that_are_not_ecdsa(ca: Issued) -> None:
    rsa = issue(ca, "Audit RSA", purpose="smime-sign", now=NOW, key_kind="rsa-2048")
    raised = raises(lambda: CheckpointKeys([rsa.certificate]), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "CN=Audit RSA", "P-256 or P-384")


@pytest.mark.parametrize(
    ("header", "names"),
    [
        (["a|"], ("an empty patient identifier",)),
        (["ok|1\x07"], ("control characters",)),
        ([",".join(str(i) for i in range(1000))], ("patient identifiers",)),
    ],
)
def test_declared_patients(header: list[str], names: tuple[str, ...]) -> None:
    raised = raises(lambda: declared_patients(header), InvalidValueError)
    check(raised, InvalidValueError, ValueError, *names)
    assert "AUTHORITY|ID" in (raised.value.fix or "")


def test_queued_message_with_two_bodies(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        raised = raises(
            lambda: spool.mark_queued("<m@x>", tmp_path / "body", [], "mic", 1, body=b"x"),
            InvalidValueError,
        )
    finally:
        spool.close()
    check(raised, InvalidValueError, ValueError, "<m@x>", "exactly one of them")


def test_hand_over_without_a_ca() -> None:
    raised = raises(lambda: delivery_tls_context([]), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "no CA certificate", "[delivery] ca")


# -- MIME headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "names"),
    [
        ([("Bad Name", "x")], ("'Bad Name'", "token")),
        ([("X-A", "a\r\nBcc: b")], ("X-A", "CR, LF or NUL")),
        ([("X-A", "résultat")], ("X-A", "not ASCII")),
        ([("Content-Type", "text/plain")], ("'text/plain'", "own argument")),
    ],
)
def test_mime_headers(headers: list[tuple[str, str]], names: tuple[str, ...]) -> None:
    raised = raises(lambda: make_entity("application/edi-x12", b"x", headers), InvalidValueError)
    check(raised, InvalidValueError, ValueError, *names)


# -- encryption --------------------------------------------------------------------------


def test_encryption_for_nobody() -> None:
    raised = raises(lambda: encrypt(b"x", [], policy=POLICY), InvalidValueError)
    check(raised, InvalidValueError, ValueError, "no recipient certificate", "at least one")


def _drain(chunks: Iterator[bytes]) -> None:
    for _ in chunks:
        pass


@pytest.mark.parametrize(
    ("given", "length", "names"),
    [
        ([b"abc"], -1, ("length=-1", "0 or more")),
        ([b"abcd"], 3, ("more than the announced 3 bytes", "written before")),
        ([b"ab"], 3, ("2 bytes given, 3 announced", "written before")),
    ],
)
def test_encrypt_chunks_length(
    recipient: Issued, given: list[bytes], length: int, names: tuple[str, ...]
) -> None:
    raised = raises(
        lambda: _drain(encrypt_chunks(given, length, [recipient.certificate], policy=POLICY)),
        InvalidValueError,
    )
    check(raised, InvalidValueError, ValueError, *names)


# -- wrong types -------------------------------------------------------------------------


def test_content_info_from_text() -> None:
    raised = raises(lambda: load_content_info("MIAG", "signed message"), InvalidTypeError)  # type: ignore[arg-type]
    check(raised, InvalidTypeError, TypeError, "signed message is a str", "from bytes")


def test_decrypting_text(recipient: Issued) -> None:
    raised = raises(
        lambda: decrypt("MIAG", recipient.certificate, recipient.key, policy=POLICY),  # type: ignore[arg-type]
        InvalidTypeError,
    )
    check(raised, InvalidTypeError, TypeError, "encrypted message is a str", "from bytes")


# -- configuration look-ups --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoLayout:
    return init_demo(tmp_path_factory.mktemp("demo"), now=NOW)


def test_unknown_zone_and_peer(demo: DemoLayout) -> None:
    config = load_config(demo.lab.config_path)
    raised = raises(lambda: config.require_zone("moon"), UnknownNameError)
    check(raised, UnknownNameError, KeyError, "no zone 'moon'", str(config.source))
    raised = raises(lambda: config.require_peer("pharmacy"), UnknownNameError)
    check(raised, UnknownNameError, KeyError, "no peer 'pharmacy'", "peers.d")
    assert "peers.d/pharmacy.toml" in (raised.value.fix or "")


# -- a document that changes while it is signed ------------------------------------------


def test_document_changed_while_signed(
    tmp_path: Path, signer: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program appends to the document between the pass that signs it and the
    pass that writes it out: what was signed is not what would be sent."""
    document = tmp_path / "entity"
    entity, more = b"Content-Type: text/plain\r\n\r\nresult 1\r\n", b"result 2\r\n"
    document.write_bytes(entity)
    first_pass = stream._frame

    def frame_then_another_writer(src: Path, *args: Any, **kwargs: Any) -> Any:
        frame = first_pass(src, *args, **kwargs)
        with src.open("ab") as other_program:
            other_program.write(more)
        return frame

    monkeypatch.setattr(stream, "_frame", frame_then_another_writer)
    raised = raises(
        lambda: stream.sign_entity_file(
            document,
            tmp_path / "signed",
            signer.certificate,
            signer.key,
            signing_time=NOW,
            policy=POLICY,
        ),
        ContentChangedError,
    )
    check(raised, ContentChangedError, ObjectSecurityError, str(document), "must not change")
    signed, read = len(entity), len(entity) + len(more)
    assert f"({signed} bytes signed, {read} read)" in raised.value.message
    assert not (tmp_path / "signed").exists()
