"""Interop with an AS2 implementation nobody here wrote: pyas2lib (PyPI).

Both directions run over real mutual TLS on 127.0.0.1 against a real
``medgw run`` process, with a demo PKI of RSA-3072 keys (pyas2lib signs and
decrypts with RSA only).

* pyas2lib builds a signed and encrypted message, it is POSTed to the hospital
  gateway, and pyas2lib verifies the signed MDN that comes back: disposition
  ``processed`` and a Received-Content-MIC equal to the MIC pyas2lib computed.
* The lab gateway sends to a receiver whose AS2 processing is pyas2lib's (it
  verifies our signature against the lab's certificate and CA, computes the
  MIC and builds and signs the MDN); the lab gateway must verify that MDN and
  record the message as delivered.

The hospital's AS2 name is ``SAKURA/HOSPITAL``: a plain (atomic) AS2 name by
RFC 4130 section 6.2, but not an HTTP token, so it exercises header quoting.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.as2.headers import quote_as2_id, unquote_as2_id
from gateway.clock import SystemClock
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, SqliteSpool
from tests.helpers.atrest import kept_receipt
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import lab_post, new_demo
from tests.oscrypto_fix import load_pyas2lib

as2 = load_pyas2lib()

HOSPITAL_AS2 = "SAKURA/HOSPITAL"
LAB_AS2 = "KITA-LAB"


def _accept_cbc(layout: DemoLayout) -> None:
    """The hospital accepts AES-CBC from the lab: pyas2lib cannot encrypt with AES-GCM."""
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    assert "accept_cbc = false" in text
    peer.write_text(text.replace("accept_cbc = false", "accept_cbc = true"))


def _accept_legacy(layout: DemoLayout, *names: str, at_lab: bool = False) -> None:
    """The hospital's view of the lab (or, ``at_lab``, the lab's view of the hospital):
    accept these monitored-list algorithms (e.g. RSAES-PKCS1-v1_5, SHA-1 signatures)."""
    site, other = (layout.lab, "hospital") if at_lab else (layout.hospital, "lab")
    peer = site.root / "peers.d" / f"{other}.toml"
    text = peer.read_text()
    assert "accept_legacy = []" in text
    listed = ", ".join(f'"{n}"' for n in names)
    peer.write_text(text.replace("accept_legacy = []", f"accept_legacy = [{listed}]"))


@pytest.fixture
def rsa_layout(tmp_path: Path) -> DemoLayout:
    layout = new_demo(tmp_path / "demo", key_kind="rsa-3072")
    for config in (layout.hospital.config_path, layout.lab.root / "peers.d" / "hospital.toml"):
        text = config.read_text()
        assert 'as2_id = "SAKURA-HOSPITAL"' in text
        config.write_text(text.replace('"SAKURA-HOSPITAL"', f'"{HOSPITAL_AS2}"'))
    return layout


def _pem(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


# -- pyas2lib sends, medgw receives ---------------------------------------------------------


def _pyas2lib_lab(layout: DemoLayout, digest: str = "sha256") -> tuple[Any, Any]:
    """pyas2lib configured as the lab: its keys, and the hospital as its partner."""
    mine = layout.lab.root / "certs"
    theirs = mine / "peers" / "hospital"
    org = as2.Organization(
        as2_name=LAB_AS2,
        sign_key=_pem(mine / "sign.key", mine / "sign.crt"),
        decrypt_key=_pem(mine / "encrypt.key", mine / "encrypt.crt"),
    )
    partner = as2.Partner(
        as2_name=HOSPITAL_AS2,
        verify_cert=_pem(theirs / "sign.crt"),
        verify_cert_ca=_pem(layout.ca_certificate),
        encrypt_cert=_pem(theirs / "encrypt.crt"),
        encrypt_cert_ca=_pem(layout.ca_certificate),
        encrypt=True,
        enc_alg="aes_256_cbc",
        sign=True,
        digest_alg=digest,
        mdn_mode="SYNC",
        mdn_digest_alg="sha256",
    )
    return org, partner


@dataclass
class _Sent:
    message: Any
    status: str | None
    detail: str | None
    lookups: list[tuple[str, str | None]]
    mdn_fields: dict[str, str]


def _send_with_pyas2lib(
    layout: DemoLayout, payload: bytes, content_type: str, digest: str = "sha256"
) -> _Sent:
    org, partner = _pyas2lib_lab(layout, digest)
    message = as2.Message(org, partner)
    message.build(payload, filename="result.hl7", content_type=content_type)
    answer = lab_post(layout, tuple(message.headers.items()), message.content)
    assert answer.status == 200, answer.body[:200]
    lookups: list[tuple[str, str | None]] = []

    def find_message(message_id: str, recipient: str | None) -> Any:
        lookups.append((message_id, recipient))
        return message if message_id == message.message_id else None

    mdn = as2.Mdn()
    raw = f"Content-Type: {answer.content_type}\r\n\r\n".encode() + answer.body
    status, detail = mdn.parse(raw, find_message_cb=find_message)
    fields: dict[str, str] = {}
    if mdn.payload is not None:
        for part in mdn.payload.walk():
            if part.get_content_type() == "message/disposition-notification":
                fields = {k.lower(): v for k, v in part.get_payload()[0].items()}
    return _Sent(message, status, detail, lookups, fields)


@pytest.mark.parametrize(
    ("content_type", "payload"),
    [
        # Binary: every byte value, bare CRs and LFs; pyas2lib sends it with
        # Content-Transfer-Encoding: binary, so it must arrive byte for byte.
        ("application/octet-stream", bytes(range(256)) + os.urandom(4096) + b"\r\r\n\n\x00"),
        # HL7 v2 as text: pyas2lib canonicalises text to CRLF line ends before it signs.
        ("application/hl7-v2", b"MSH|^~\\&|KITA-LIS|KITA-LAB\rPID|1||DEMO-0001\rOBX|1|NM|140\r"),
    ],
    ids=["binary", "hl7-text"],
)
def test_pyas2lib_message_is_received_and_our_signed_mdn_verifies_with_its_mic(
    rsa_layout: DemoLayout, processes: Any, content_type: str, payload: bytes
) -> None:
    layout = rsa_layout
    # pyas2lib 1.4.4 always wraps the content key with RSAES-PKCS1-v1_5 (Message.build
    # ignores Partner.key_enc_alg): a monitored-list algorithm, accepted only from a
    # peer whose accept_legacy names it, and audited.
    _accept_legacy(layout, "rsaes-pkcs1-v1_5")
    _accept_cbc(layout)
    processes.start(layout.hospital.config_path)

    sent = _send_with_pyas2lib(layout, payload, content_type)

    assert (sent.status, sent.detail) == ("processed", None)
    # pyas2lib only compares a MIC that is present; require it, and equal to its own.
    value, _, algorithm = sent.mdn_fields["received-content-mic"].partition(",")
    assert value.strip() == sent.message.mic.decode()
    assert algorithm.strip() == "sha-256"
    # The MDN names the original message and us by our plain AS2 name, so that
    # pyas2lib (and products built on it) find the original message again.
    assert sent.lookups == [(sent.message.message_id, HOSPITAL_AS2)]

    received = wait_for_events(layout.hospital.audit_log, "message.received")
    assert len(received) == 1
    assert received[0]["detail"]["key_transport"] == "rsaes-pkcs1-v1_5"
    assert received[0]["detail"]["signature_algorithm"] == "rsassa-pkcs1-v1_5"
    warnings = wait_for_events(layout.hospital.audit_log, "policy.compat_algorithm_used")
    assert all(w["severity"] == "warning" for w in warnings)
    receipt = wait_for_events(layout.hospital.audit_log, "receipt.sent")
    assert receipt[-1]["detail"]["mic"] == f"{sent.message.mic.decode()}, sha-256"
    delivered = (layout.hospital.inbox_dir / "lab" / "result.hl7").read_bytes()
    if content_type == "application/octet-stream":
        assert delivered == payload
    else:
        assert delivered == payload.replace(b"\r", b"\r\n")


def test_pyas2lib_rsaes_pkcs1_v15_is_refused_unless_accepted_and_pyas2lib_reads_why(
    rsa_layout: DemoLayout, processes: Any
) -> None:
    layout = rsa_layout
    _accept_cbc(layout)
    processes.start(layout.hospital.config_path)

    sent = _send_with_pyas2lib(layout, b"MSH|^~\\&|refused\r", "application/octet-stream")

    assert (sent.status, sent.detail) == ("processed/error", "decryption-failed")
    assert "received-content-mic" not in sent.mdn_fields
    failed = wait_for_events(layout.hospital.audit_log, "decryption.failed")
    assert "rsaes-pkcs1-v1_5" in failed[0]["reason"].lower()
    assert not (layout.hospital.inbox_dir / "lab").exists() or not any(
        (layout.hospital.inbox_dir / "lab").iterdir()
    )


def test_pyas2lib_sha1_signed_message_is_received_if_accepted_and_audited(
    rsa_layout: DemoLayout, processes: Any
) -> None:
    """SHA-1 (CRYPTREC monitored list) from a peer whose accept_legacy names it (and
    RSAES-PKCS1-v1_5, which pyas2lib always wraps with): verified, delivered, audited as a
    warning; the MIC we return is still SHA-256, never SHA-1."""
    layout = rsa_layout
    _accept_legacy(layout, "rsaes-pkcs1-v1_5", "sha1")
    _accept_cbc(layout)
    processes.start(layout.hospital.config_path)
    payload = b"MSH|^~\\&|KITA-LIS|KITA-LAB\rOBX|1|NM|K^Potassium||4.1|mmol/L\r"

    sent = _send_with_pyas2lib(layout, payload, "application/octet-stream", digest="sha1")

    assert sent.message.digest_alg == "sha1"
    # pyas2lib compares the MIC value with its own, which it computes with its signing
    # digest (SHA-1) whatever micalg it asked for (sha256): it flags ours.
    assert (sent.status, sent.detail) == ("processed/warning", "Message Integrity check failed.")
    value, _, algorithm = sent.mdn_fields["received-content-mic"].partition(",")
    assert algorithm.strip() == "sha-256"
    assert (layout.hospital.inbox_dir / "lab" / "result.hl7").read_bytes() == payload
    [received] = wait_for_events(layout.hospital.audit_log, "message.received")
    assert received["detail"]["digest"] == "sha1"
    sha1 = wait_for_events(
        layout.hospital.audit_log,
        "policy.compat_algorithm_used",
        where=lambda w: "sha1" in w["reason"],
    )
    assert len(sha1) == 1 and sha1[0]["severity"] == "warning"
    assert sha1[0]["direction"] == "inbound" and sha1[0]["message_id"] == received["message_id"]
    [receipt] = wait_for_events(layout.hospital.audit_log, "receipt.sent")
    assert receipt["detail"]["mic"] == f"{value.strip()}, sha-256"


def test_pyas2lib_sha1_signature_is_refused_when_only_its_key_transport_is_accepted(
    rsa_layout: DemoLayout, processes: Any
) -> None:
    """Admitting RSAES-PKCS1-v1_5 for a partner does not admit its SHA-1 signatures: the
    message is opened, then refused naming SHA-1 and the permission it would need."""
    layout = rsa_layout
    _accept_legacy(layout, "rsaes-pkcs1-v1_5")
    _accept_cbc(layout)
    processes.start(layout.hospital.config_path)

    sent = _send_with_pyas2lib(layout, b"MSH|^~\\&|sha1\r", "application/octet-stream", "sha1")

    assert sent.status is not None and sent.status.lower() == "processed/error", sent.status
    assert sent.detail == "integrity-check-failed"
    [failed] = events(layout.hospital.audit_log, "signature.failed")
    assert "sha1" in failed["reason"].lower() and 'accept_legacy = ["sha1"]' in failed["reason"]
    warnings = events(layout.hospital.audit_log, "policy.compat_algorithm_used")
    assert [w["detail"]["algorithm"] for w in warnings] == ["rsaes-pkcs1-v1_5"]
    assert not events(layout.hospital.audit_log, "message.delivered")
    inbox = layout.hospital.inbox_dir / "lab"
    assert not inbox.exists() or not any(inbox.iterdir())


def test_a_reload_with_compat_true_is_refused_and_admits_nothing_more(
    rsa_layout: DemoLayout, processes: Any
) -> None:
    """An upgraded peer file still saying compat = true: the reload is refused naming
    accept_legacy, and the running configuration stays exactly as it was (a SHA-1 signed
    message, which compat = true used to admit, is still refused)."""
    layout = rsa_layout
    _accept_legacy(layout, "rsaes-pkcs1-v1_5")
    _accept_cbc(layout)
    hospital = processes.start(layout.hospital.config_path)
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    peer.write_text(
        peer.read_text().replace('accept_legacy = ["rsaes-pkcs1-v1_5"]', "compat = true")
    )
    hospital.signal(signal.SIGHUP)
    [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "compat" in failed["reason"] and "accept_legacy" in failed["reason"]

    sent = _send_with_pyas2lib(layout, b"MSH|^~\\&|sha1\r", "application/octet-stream", "sha1")

    assert sent.detail == "integrity-check-failed"
    assert events(layout.hospital.audit_log, "signature.failed")
    assert not events(layout.hospital.audit_log, "message.delivered")


# -- medgw sends, pyas2lib receives ---------------------------------------------------------


@dataclass
class _Pyas2libReceiver:
    """An HTTPS AS2 endpoint (mutual TLS) whose AS2 processing is pyas2lib's.

    pyas2lib's decryption (oscrypto) knows RSAES-PKCS1-v1_5 and RSAES-OAEP with
    SHA-1 only, and CBC ciphers, while we send RSAES-OAEP with SHA-256 unless the
    peer's key_transport says otherwise.  So by default ``openssl cms`` removes
    the envelope, and pyas2lib does everything AS2 with the rest: parses the
    headers, checks the lab's certificate against the CA, verifies the
    signature, computes the MIC, and builds and signs the MDN.  With
    ``pyas2lib_decrypts`` pyas2lib is given the message as it arrived and
    decrypts it itself; ``openssl cms -decrypt`` still opens a copy, for the
    record (``openssl_opened``).
    """

    layout: DemoLayout
    verify_cert: Path
    mdn_digest: str | None = None  # sign the MDN with this instead of the micalg asked for
    pyas2lib_decrypts: bool = False
    server: ThreadingHTTPServer | None = None
    received: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        certs = self.layout.hospital.root / "certs"
        org = as2.Organization(
            as2_name=HOSPITAL_AS2,
            sign_key=_pem(certs / "sign.key", certs / "sign.crt"),
            decrypt_key=_pem(certs / "encrypt.key", certs / "encrypt.crt"),
        )
        partner = as2.Partner(
            as2_name=LAB_AS2,
            verify_cert=_pem(self.verify_cert),
            verify_cert_ca=_pem(self.layout.ca_certificate),
            sign=True,
        )
        received = self.received
        mdn_digest = self.mdn_digest
        pyas2lib_decrypts = self.pyas2lib_decrypts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                openssl = subprocess.run(
                    [
                        *("openssl", "cms", "-decrypt", "-binary", "-inform", "DER"),
                        *("-recip", str(certs / "encrypt.crt")),
                        *("-inkey", str(certs / "encrypt.key")),
                    ],
                    input=body,
                    capture_output=True,
                    timeout=60,
                    check=not pyas2lib_decrypts,
                )
                opened = openssl.stdout if openssl.returncode == 0 else None
                entity_headers = {"content-type", "content-length", "content-transfer-encoding"}
                as2_headers = "".join(
                    f"{k}: {v}\r\n"
                    for k, v in self.headers.items()
                    if k.lower() not in entity_headers | {"content-disposition", "mime-version"}
                )
                if mdn_digest is not None:  # pyas2lib signs its MDN with the micalg asked for
                    options = self.headers["Disposition-Notification-Options"]
                    as2_headers = as2_headers.replace(
                        options, options.rpartition(",")[0] + f", {mdn_digest}"
                    )
                if pyas2lib_decrypts:  # the message as it arrived, envelope and all
                    raw = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode()
                    raw += b"\r\n" + body
                else:
                    assert opened is not None
                    raw = as2_headers.encode() + opened
                message = as2.Message()
                status, (error, _trace), mdn = message.parse(
                    raw,
                    find_org_cb=lambda name: org if name == HOSPITAL_AS2 else None,
                    find_partner_cb=lambda name: partner if name == LAB_AS2 else None,
                )
                tls = self.connection
                assert isinstance(tls, ssl.SSLSocket)
                received.append(
                    {
                        "status": status,
                        "error": error,
                        "message": message,
                        "payload": message.content,
                        "as2_from": self.headers["AS2-From"],
                        "as2_to": self.headers["AS2-To"],
                        "client_cert": tls.getpeercert(binary_form=True),
                        "openssl_opened": opened,
                    }
                )
                answer = mdn.content
                self.send_response(200)
                for name, value in mdn.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
        context.load_verify_locations(self.layout.ca_certificate)
        context.verify_mode = ssl.CERT_REQUIRED
        server = ThreadingHTTPServer(("127.0.0.1", self.layout.hospital.port), Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def pyas2lib_receiver(rsa_layout: DemoLayout) -> Iterator[_Pyas2libReceiver]:
    # It plays the hospital: its TLS identity (the lab pins that certificate) on
    # the hospital's port, which the lab's peers.d/hospital.toml points at.
    receiver = _Pyas2libReceiver(
        rsa_layout, rsa_layout.hospital.root / "certs" / "peers" / "lab" / "sign.crt"
    )
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _outbound_state(layout: DemoLayout, message_id: str) -> Any:
    spool = SqliteSpool(layout.lab.root / "state" / "spool.sqlite3", SystemClock())
    try:
        return spool.get(message_id)
    finally:
        spool.close()


def test_gateway_sends_to_pyas2lib_which_verifies_it_and_we_verify_its_mdn(
    rsa_layout: DemoLayout, pyas2lib_receiver: _Pyas2libReceiver, processes: Any
) -> None:
    layout = rsa_layout
    processes.start(layout.lab.config_path)
    document = b"MSH|^~\\&|KITA-LIS|KITA-LAB\rPID|1||DEMO-0001\rOBX|1|NM|140|mmol/L\r"
    drop_file(layout.lab.outbox_for("hospital"), "result.hl7", document)

    [record] = wait_for_events(
        layout.lab.audit_log, ("receipt.received", "receipt.invalid", "message.failed")
    )
    [got] = pyas2lib_receiver.received
    assert got["status"] == "processed", got["error"]
    assert got["message"].signed and got["message"].digest_alg == "sha256"
    assert got["payload"] == document
    assert unquote_as2_id(got["as2_to"]) == HOSPITAL_AS2 and got["as2_from"] == LAB_AS2
    lab_tls = (layout.lab.root / "certs" / "tls.crt").read_bytes()
    assert ssl.DER_cert_to_PEM_cert(got["client_cert"]).strip() == lab_tls.decode().strip()

    assert record["event"] == "receipt.received", record
    assert record["detail"]["disposition"] == "processed"
    assert record["detail"]["mic_verified"] is True
    [accepted] = events(layout.lab.audit_log, "message.accepted")
    mic = got["message"].mic.decode()
    assert accepted["detail"]["mic"] == f"{mic}, sha-256"
    assert record["detail"]["mic"].partition(",")[0] == mic
    stored = _outbound_state(layout, record["message_id"])
    assert stored is not None and stored.state is OutboundState.DELIVERED
    assert stored.disposition == "processed"


@pytest.mark.parametrize(
    ("option", "key_transport"),
    [
        ('key_transport = "rsaes-oaep-sha1"', "rsaes-oaep-sha1"),
        (
            'key_transport = "rsaes-pkcs1-v1_5"\nlegacy_send_rsaes_pkcs1_v1_5 = true',
            "rsaes-pkcs1-v1_5",
        ),
        ('key_transport = "rsaes-oaep-sha256"', "rsaes-oaep-sha256"),
    ],
    ids=["oaep-sha1", "pkcs1-v1_5", "default"],
)
def test_pyas2lib_decrypts_what_we_send_with_the_peers_key_transport(
    rsa_layout: DemoLayout, processes: Any, option: str, key_transport: str
) -> None:
    """pyas2lib opens what the lab gateway sends itself, envelope included, once the
    hospital's key_transport (at the lab) is one it can decrypt; openssl opens the same
    message whatever the option.  The default, RSAES-OAEP with SHA-256, pyas2lib cannot
    decrypt: its answer is a decryption failure.  Every message's audit record names the
    key transport; a non-default one is also a warning per message."""
    layout = rsa_layout
    peer = layout.lab.root / "peers.d" / "hospital.toml"
    text = peer.read_text()
    for line in ('cipher = "aes-256-gcm"', 'key_transport = "rsaes-oaep-sha256"'):
        assert line in text
        text = text.replace(line, "")
    text = text.replace("legacy_send_rsaes_pkcs1_v1_5 = false", "")
    peer.write_text(f'{text}\ncipher = "aes-256-cbc"\n{option}\n')  # pyas2lib: CBC only
    receiver = _Pyas2libReceiver(
        layout,
        layout.hospital.root / "certs" / "peers" / "lab" / "sign.crt",
        pyas2lib_decrypts=True,
    )
    receiver.start()
    document = b"MSH|^~\\&|KITA-LIS|KITA-LAB\rPID|1||DEMO-0001\rOBX|1|NM|140|mmol/L\r"
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "result.hl7", document)

        [record] = wait_for_events(
            layout.lab.audit_log, ("receipt.received", "receipt.invalid", "message.failed")
        )

    finally:
        receiver.stop()
    [got] = receiver.received
    assert got["openssl_opened"] is not None  # openssl cms -decrypt opened it
    [accepted] = events(layout.lab.audit_log, "message.accepted")
    assert accepted["detail"]["key_transport"] == key_transport
    warnings = events(layout.lab.audit_log, "policy.compat_algorithm_used")
    if key_transport == "rsaes-oaep-sha256":
        assert got["status"] == "processed/Error" and "decrypt" in str(got["error"]).lower()
        assert record["event"] == "message.failed", record
        assert not warnings
        return
    assert got["status"] == "processed", got["error"]
    assert got["payload"] == document
    assert record["event"] == "receipt.received", record
    assert record["detail"]["mic_verified"] is True
    [warning] = warnings
    assert warning["severity"] == "warning" and warning["direction"] == "outbound"
    assert warning["message_id"] == accepted["message_id"]
    assert warning["detail"]["algorithm"] == key_transport


@pytest.mark.parametrize(
    "accepted",
    [(), ("rsaes-pkcs1-v1_5", "des-ede3-cbc"), ("sha1",)],
    ids=["strict", "others", "sha1"],
)
def test_gateway_takes_a_sha1_signed_mdn_only_from_a_peer_that_may_use_sha1(
    rsa_layout: DemoLayout, processes: Any, accepted: tuple[str, ...]
) -> None:
    """pyas2lib signs its MDN with SHA-1 (CRYPTREC monitored list): refused naming SHA-1 and
    the rule unless the peer's accept_legacy names "sha1" (other legacy permissions do not
    admit it); then the delivery is recorded, with a warning."""
    layout = rsa_layout
    compat = "sha1" in accepted
    _accept_legacy(layout, *accepted, at_lab=True)
    receiver = _Pyas2libReceiver(
        layout, layout.hospital.root / "certs" / "peers" / "lab" / "sign.crt", mdn_digest="sha1"
    )
    receiver.start()
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "result.hl7", b"MSH|^~\\&|sha1-mdn\r")

        [record] = wait_for_events(
            layout.lab.audit_log, ("receipt.received", "receipt.invalid", "message.failed")
        )
    finally:
        receiver.stop()
    [got] = receiver.received
    assert got["status"] == "processed", got["error"]
    stored = _outbound_state(layout, record["message_id"])
    assert stored is not None and stored.receipt_kept
    kept = kept_receipt(layout.lab.config_path, record["message_id"])
    assert b'micalg="sha1"' in kept.partition(b"\r\n\r\n")[0]  # kept encrypted at rest
    warnings = events(layout.lab.audit_log, "policy.compat_algorithm_used")
    if not compat:
        assert record["event"] in ("receipt.invalid", "message.failed"), record
        text = str(record.get("reason")) + str(record.get("detail"))
        assert "sha1" in text and "CRYPTREC" in text and 'accept_legacy = ["sha1"]' in text
        assert stored.state is not OutboundState.DELIVERED
        assert not warnings
        return
    assert record["event"] == "receipt.received", record
    assert record["detail"]["mic_verified"] is True
    assert stored.state is OutboundState.DELIVERED
    [warning] = warnings
    assert warning["severity"] == "warning" and warning["direction"] == "outbound"
    assert warning["message_id"] == record["message_id"] and "sha1" in warning["reason"]


def test_gateway_records_pyas2lib_authentication_failure_as_failed(
    rsa_layout: DemoLayout, processes: Any
) -> None:
    """pyas2lib is told the lab signs with another key: its negative MDN must not pass."""
    layout = rsa_layout
    wrong = layout.lab.root / "certs" / "peers" / "hospital" / "sign.crt"
    receiver = _Pyas2libReceiver(layout, wrong)
    receiver.start()
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "result.hl7", b"MSH|^~\\&|x\r")
        [record] = wait_for_events(layout.lab.audit_log, "message.failed")
    finally:
        receiver.stop()
    [got] = receiver.received
    assert got["status"] == "processed/Error"
    assert record["detail"]["disposition"] == "processed/Error: authentication-failed"
    assert not events(layout.lab.audit_log, "receipt.received")
    stored = _outbound_state(layout, record["message_id"])
    assert stored is not None and stored.state is OutboundState.FAILED


# -- header quoting, both ways ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("KITA-LAB", "KITA-LAB"),
        ("JP/1310000001@sakura", "JP/1310000001@sakura"),
        ("Sakura General Hospital", '"Sakura General Hospital"'),
        ('say "hi"\\now', '"say \\"hi\\"\\\\now"'),
    ],
)
def test_as2_names_quote_like_rfc4130_and_pyas2lib(name: str, wire: str) -> None:
    from pyas2lib.utils import (  # type: ignore[import-untyped]
        quote_as2name,
        unquote_as2name,
    )

    assert quote_as2_id(name) == wire
    assert unquote_as2name(quote_as2_id(name)) == name
    assert unquote_as2_id(quote_as2name(name)) == name
    assert unquote_as2_id(wire) == name
