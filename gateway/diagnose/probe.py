"""Step 5 of ``medgw diagnose``: a signed, encrypted test message and its signed receipt."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from gateway.as2.headers import PROBE_HEADER, PROBE_PREFIX, PROBE_SUFFIX, new_message_id
from gateway.as2.mdn import Disposition, mic_matches, parse_receipt
from gateway.as2.message import MessageSpec, build_message
from gateway.channel.client import MAX_RECEIPT_BYTES
from gateway.diagnose.base import Steps
from gateway.diagnose.result import (
    StepResult,
    fingerprint,
    step_failed,
    step_ok,
    subject_of,
)
from gateway.errors import (
    MalformedMessageError,
    MedgwError,
    PolicyError,
    ProtocolError,
    SignatureError,
    SignerNotTrustedError,
)
from gateway.httpbody import read_capped


class ProbeSteps(Steps):
    """The probe message, the HTTP answer and the receipt."""

    async def probe(self) -> StepResult:
        config, peer = self._config, self._peer
        now = self._clock.now()
        filename = f"{PROBE_PREFIX}{now:%Y%m%dT%H%M%SZ}{PROBE_SUFFIX}"
        payload = (
            f"medgw diagnose test message from {config.as2_id} to {peer.as2_id}, "
            f"sent {now.isoformat(timespec='seconds')}.\r\n"
            "It checks the AS2 path and carries no patient data; it can be deleted.\r\n"
        ).encode()
        message_id = new_message_id(config.as2_id)
        try:
            spec = MessageSpec(
                filename=filename,
                content_type="text/plain",
                message_id=message_id,
                sender_as2_id=config.as2_id,
                receiver_as2_id=peer.as2_id,
                signing=config.smime.signing,
                recipients=peer.encryption_certificates,
                digest=peer.digest,
                cipher=peer.cipher,
                policy=peer.policy,
                at=now,
            )
            built = await asyncio.to_thread(build_message, payload, spec)
        except MedgwError as exc:
            return step_failed(
                "as2",
                f"the test message could not be built: {exc}",
                "our signing key or the peer's encryption certificate cannot be used with the "
                "algorithm policy",
                f"check [smime] in {config.source} and encryption_certificates, cipher and "
                f"digest in {self._peer_file}",
            )
        sent = f"probe {filename} {message_id}"
        headers = [*built.headers, (PROBE_HEADER, "1")]
        try:
            context = self._context()
            async with (
                self._route.session(
                    tls=context,
                    force_close=True,
                    timeout=aiohttp.ClientTimeout(
                        total=self._probe_timeout, sock_connect=self._connect_timeout
                    ),
                ) as session,
                session.post(
                    peer.url, data=built.body, headers=headers, allow_redirects=False
                ) as response,
            ):
                body = await read_capped(response.content, MAX_RECEIPT_BYTES)
                status = response.status
                content_type = response.headers.get("Content-Type", "")
        except TimeoutError:
            return step_failed(
                "as2",
                f"{sent}: no answer within {self._probe_timeout:g} s",
                "the peer accepted the connection but did not answer with a receipt in time: "
                "its gateway is overloaded or stuck, or the path is very slow; real messages "
                "would time out too and be retried",
                "ask the peer's administrator whether their gateway is healthy and how long "
                "it takes to answer; check the line's latency and bandwidth. If the peer is "
                "just slow, raise request_timeout_seconds in [runtime]",
            )
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            return step_failed(
                "as2",
                f"{sent}: the exchange broke off ({type(exc).__name__}: {exc})",
                "the connection failed while sending the test message, although the earlier "
                "steps passed: the path or the peer is unstable",
                "run `medgw diagnose` again; if it keeps failing here, ask the peer's "
                "administrator what their gateway logged for our address",
            )
        if status != 200:
            return self._http_error(status, sent, body)
        if len(body) > MAX_RECEIPT_BYTES:
            return step_failed(
                "as2",
                f"{sent}: the answer is larger than any receipt",
                "the peer's answer is not an AS2 receipt",
                f"check that `url` in {self._peer_file} is the peer's AS2 endpoint",
            )
        return await self._judge_receipt(content_type, body, message_id, built.mic, sent)

    def _http_error(self, status: int, sent: str, body: bytes) -> StepResult:
        said = body[:200].decode("utf-8", "replace").strip()
        detail = f"{sent}: the peer answered HTTP {status}" + (f" ({said})" if said else "")
        if status == 503:
            return step_failed(
                "as2",
                detail,
                "the exchange is suspended by the peer: it refuses messages from us for now "
                "(a medgw peer answers 503 when its operator suspended the exchange with us, "
                "e.g. for maintenance or an incident; other AS2 products when in maintenance "
                "or overloaded)",
                "contact the peer's administrator: ask why the exchange is suspended and when "
                "they will resume it (`medgw peers resume` on their side). Our messages stay "
                "queued and are retried; nothing is lost",
            )
        if status in (401, 403):
            return step_failed(
                "as2",
                detail,
                "the peer's gateway accepted our TLS certificate but refuses our request: its "
                "configuration no longer lists us as a peer (for example after a reload)",
                f"ask the peer's administrator to check their configuration for "
                f"{self._config.as2_id}",
            )
        if status in (404, 405):
            return step_failed(
                "as2",
                detail,
                f"there is no AS2 endpoint at {self._target.path} on the peer's server",
                f"check the path in `url` of {self._peer_file} against the peer's AS2 URL",
            )
        if status == 413:
            return step_failed(
                "as2",
                detail,
                "the peer refuses even a small message as too large",
                "ask the peer's administrator to check their maximum message size",
            )
        if 500 <= status < 600:
            return step_failed(
                "as2",
                detail,
                "the peer's AS2 software failed while handling our message (server error)",
                "ask the peer's administrator to look at their gateway's log for our address "
                "at this time",
            )
        return step_failed(
            "as2",
            detail,
            f"the peer refused the AS2 message with HTTP {status}",
            "ask the peer's administrator what their gateway logged for our message",
        )

    async def _judge_receipt(
        self, content_type: str, body: bytes, message_id: str, mic: str, sent: str
    ) -> StepResult:
        peer = self._peer
        signers = f"signing_certificates in {self._peer_file}"
        try:
            receipt = await asyncio.to_thread(
                parse_receipt,
                content_type,
                body,
                trusted_signers=peer.signing_certificates,
                policy=peer.policy,
            )
        except SignerNotTrustedError as exc:
            return step_failed(
                "as2",
                f"{sent}: receipt signed by a certificate we do not trust ({exc.message})",
                f"the receipt is signed with a certificate that is not in {signers}: the "
                "peer signs with a new certificate, or the answer does not come from the peer",
                "obtain the peer's current signing certificate through a trusted channel, "
                f"confirm its fingerprint by phone, add it to {signers} and reload",
            )
        except (SignatureError, MalformedMessageError) as exc:
            return step_failed(
                "as2",
                f"{sent}: the receipt's signature does not verify ({exc.message})",
                "the receipt was altered on the way, or the peer's software signs it wrongly; "
                "it proves nothing",
                "ask the peer's administrator to check their receipt signing; a proxy that "
                "rewrites content is a suspect",
            )
        except PolicyError as exc:
            return step_failed(
                "as2",
                f"{sent}: the receipt uses a refused algorithm ({exc.message})",
                "the peer signs receipts with an algorithm the CRYPTREC policy refuses",
                exc.fix or "ask the peer to sign with SHA-256 or stronger",
            )
        except ProtocolError as exc:
            return step_failed(
                "as2",
                f"{sent}: {exc.message}",
                "the peer's answer is not a signed receipt, so it proves nothing about delivery",
                "ask the peer to send signed receipts (signed-receipt-protocol=pkcs7-signature) "
                "in RFC 8098 form",
            )
        except MedgwError as exc:
            return step_failed(
                "as2",
                f"{sent}: the receipt is invalid ({exc})",
                "the peer's receipt could not be verified",
                "ask the peer's administrator to check their receipts",
            )
        if receipt.original_message_id != message_id:
            return step_failed(
                "as2",
                f"{sent}: the receipt is for {receipt.original_message_id!r}",
                "the peer answered with a receipt for another message",
                "ask the peer's administrator to check their AS2 software",
            )
        if not receipt.processed:
            return self._negative(receipt.disposition, sent)
        if not mic_matches(mic, receipt.mic):
            return step_failed(
                "as2",
                f"{sent}: receipt MIC {receipt.mic!r}, we computed {mic!r}",
                "the receipt says processed but its MIC does not match what we sent: the peer "
                "did not receive the document intact (or computes the MIC wrongly); such a "
                "receipt is never counted as delivery",
                "ask the peer's administrator to check their MIC computation (RFC 4130 7.3.1); "
                "a proxy that rewrites content is a suspect",
            )
        return step_ok(
            "as2",
            f"{sent}: signed receipt from {subject_of(receipt.signer)}, processed, MIC matches",
        )

    def _negative(self, disposition: str, sent: str) -> StepResult:
        detail = f"{sent}: the peer reported {disposition!r}"
        normalized = disposition.strip().lower()
        peer_file = self._peer_file
        our_sign = self._config.smime.signing
        if normalized == Disposition.DECRYPTION_FAILED.value:
            ours = ", ".join(
                f"{subject_of(c)} sha256 {fingerprint(c)[:16]}..."
                for c in self._peer.encryption_certificates
            )
            return step_failed(
                "as2",
                detail,
                "the peer cannot decrypt: it does not have the private key for the encryption "
                f"certificate we use; check {peer_file} encryption_certificates (we encrypt "
                f"for {ours})",
                "get the peer's current encryption certificate through a trusted channel, "
                f"confirm its fingerprint by phone, put it in encryption_certificates of "
                f"{peer_file} and reload. Until then every message to this peer fails the "
                "same way",
            )
        if normalized == Disposition.AUTHENTICATION_FAILED.value:
            return step_failed(
                "as2",
                detail,
                "the peer does not accept us as the sender: our signing certificate "
                f"{subject_of(our_sign.certificate)} is not among the signing certificates the "
                f"peer has configured for us, or the AS2 ids do not match (we send AS2-From "
                f"{self._config.as2_id!r} to AS2-To {self._peer.as2_id!r})",
                f"send the peer our signing certificate ({our_sign.certificate_path}, sha256 "
                f"{fingerprint(our_sign.certificate)}) and ask them to list it for "
                f"{self._config.as2_id}; confirm both AS2 ids with them",
            )
        if normalized == Disposition.INTEGRITY_CHECK_FAILED.value:
            return step_failed(
                "as2",
                detail,
                "the peer decrypted the message but its signature does not match the content: "
                "it was altered on the way, or the two products frame MIME differently",
                "run diagnose again; if it persists, ask the peer's administrator to look up "
                "this Message-ID in their log. A proxy that rewrites content is a suspect",
            )
        if normalized == Disposition.UNEXPECTED_ERROR.value:
            return step_failed(
                "as2",
                detail,
                "the peer verified the message but failed to process it (for example its "
                "inbox disk is full, a folder permission is wrong, or the Message-ID clashed)",
                "ask the peer's administrator to look up this Message-ID in their audit trail",
            )
        return step_failed(
            "as2",
            detail,
            f"the peer did not process the test message: {disposition}",
            "ask the peer's administrator to look up this Message-ID in their log",
        )
