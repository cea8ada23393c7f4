"""Step 3 of ``medgw diagnose``: the mutual-TLS handshake, and what its errors mean."""

from __future__ import annotations

import asyncio
import socket
import ssl

from cryptography import x509

from gateway.diagnose.base import Steps
from gateway.diagnose.result import (
    StepResult,
    closed,
    day_of,
    fingerprint,
    step_failed,
    step_ok,
    subject_of,
)
from gateway.pki.tls import NotPinnedError

# OpenSSL alerts *received from the peer* that say it refused our certificate.
_PEER_REFUSED_ALERTS = (
    ("certificate required", "the peer requires a client certificate it can accept"),
    ("unknown ca", "the peer does not trust the CA that issued our TLS certificate"),
    ("bad certificate", "the peer rejected our TLS certificate"),
    ("certificate unknown", "the peer could not accept our TLS certificate"),
    ("certificate expired", "the peer says our TLS certificate has expired"),
    ("certificate revoked", "the peer says our TLS certificate is revoked"),
    ("unsupported certificate", "the peer says our TLS certificate is not made for TLS clients"),
    ("access denied", "the peer's TLS server denies us access"),
)

# Errors that mean the two sides share no protocol version or cipher suite.
_MISMATCH = (
    "protocol version",
    "unsupported protocol",
    "no protocols available",
    "handshake failure",
    "no shared cipher",
    "no ciphers available",
    "insufficient security",
    "no suitable",
    "version too low",
)

# What OpenSSL says when the bytes that come back are no TLS record at all
# (a plain-HTTP server answers our ClientHello with "HTTP/1.1 400 ...").
_NOT_TLS = ("wrong version number", "http request", "packet length too long")

_UNKNOWN_CA_CODES = (2, 18, 19, 20, 21)  # issuer unknown, self-signed, unverifiable chain


def ssl_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{reason or ''} {exc}".replace("_", " ").lower()


class TlsSteps(Steps):
    """The handshake with the daemon's client context; who refused whom."""

    async def handshake(self, connection: socket.socket) -> StepResult:
        target = self._target
        address = str(connection.getpeername()[0])
        try:
            context = self._context()
        except (ssl.SSLError, OSError) as exc:
            return step_failed(
                "tls",
                f"our TLS settings cannot be loaded: {exc}",
                "this gateway's own TLS certificate, key or trust anchors are unusable",
                f"check [tls] in {self._config.source} (`medgw check-config`)",
            )
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    sock=connection,
                    ssl=context,
                    server_hostname=target.host,
                    ssl_handshake_timeout=self._connect_timeout,
                )
        except ssl.SSLCertVerificationError as exc:
            return await self._we_rejected(exc, address)
        except ssl.SSLError as exc:
            return self._tls_error(exc, after_handshake=False)
        except TimeoutError:
            return step_failed(
                "tls",
                f"{target.where}: no TLS handshake within {self._connect_timeout:g} s",
                "the peer accepts TCP connections but does not complete a TLS handshake in "
                "time: the path is very slow, the port serves something else, or the peer's "
                "gateway is overloaded or hung",
                "if the path is known to be slow, raise connect_timeout_seconds in [runtime]; "
                "otherwise ask the peer's administrator to check their gateway and which "
                f"service listens on port {target.port}",
            )
        except (OSError, asyncio.IncompleteReadError) as exc:
            return step_failed(
                "tls",
                f"{target.where}: the connection was closed during the handshake "
                f"({type(exc).__name__}: {exc})",
                "the peer closed the connection during the TLS handshake: it refused the "
                "handshake (often: no TLS version or cipher in common, or our certificate "
                "refused) or the port serves something else",
                "ask the peer's administrator what their TLS server logged for our address "
                "at this time",
            )
        ssl_object = writer.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object else "?"
        cipher = ssl_object.cipher()[0] if ssl_object and ssl_object.cipher() else "?"
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        presented = x509.load_der_x509_certificate(der) if der else None
        try:
            answer = await self._first_answer(reader, writer)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            answer = f"the connection was closed ({type(exc).__name__})"
        except ssl.SSLError as exc:
            return self._tls_error(exc, after_handshake=True)
        except TimeoutError:
            return step_failed(
                "tls",
                f"{version} handshake done, but no HTTP answer within {self._connect_timeout:g} s",
                "the TLS handshake completed but the peer answers no HTTP request: "
                "its gateway is overloaded or hung",
                "ask the peer's administrator to check their gateway",
            )
        except OSError as exc:
            answer = f"the connection failed ({exc.strerror or type(exc).__name__})"
        finally:
            writer.close()
            await closed(writer)
        if answer and not answer.startswith(("HTTP/", "the connection")):
            return step_failed(
                "tls",
                f"{version} handshake done, but the answer is not HTTP: {answer[:60]!r}",
                "something other than an AS2 (HTTPS) server answers at the peer's address",
                f"check `url` in {self._peer_file} against the peer's AS2 URL",
            )
        if not answer.startswith("HTTP/"):
            return step_failed(
                "tls",
                f"the peer rejected our certificate: {version} handshake done, then "
                f"{answer or 'the connection was closed'} instead of an HTTP answer",
                "the peer completed the TLS handshake and then closed the connection without "
                "answering: with TLS 1.3 this is how a server refuses a client certificate "
                "after the handshake, so the peer rejected our certificate (it is not "
                "listed for us there, or not trusted, or expired in their eyes)",
                f"send the peer our TLS certificate ({self._config.tls.identity.certificate_path}, "
                f"sha256 {fingerprint(self._config.tls.identity.certificate)}) and ask them "
                f"to list it for {self._config.as2_id} and reload their gateway",
            )
        who = f"{subject_of(presented)} (pinned)" if presented else "?"
        status = answer.split(" ", 2)[1] if answer.count(" ") >= 1 else "?"
        return step_ok(
            "tls",
            f"{version} {cipher}; the peer presented {who} and accepted ours "
            f"(test request answered HTTP {status})",
        )

    async def _first_answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str:
        request = (
            f"HEAD {self._target.path} HTTP/1.1\r\nHost: {self._target.where}\r\n"
            "User-Agent: medgw-diagnose\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(self._connect_timeout):
            writer.write(request.encode())
            await writer.drain()
            line = await reader.readline()
        return line.decode("latin-1").strip()

    async def _we_rejected(self, exc: ssl.SSLCertVerificationError, address: str) -> StepResult:
        code = getattr(exc, "verify_code", None)
        message = getattr(exc, "verify_message", None) or str(exc)
        presented = await self._peek_certificate(address)
        shown = (
            f"; it presented {subject_of(presented)}, issued by "
            f"{presented.issuer.rfc4514_string()}, valid until "
            f"{day_of(presented.not_valid_after_utc)}, sha256 {fingerprint(presented)}"
            if presented is not None
            else ""
        )
        peer_file = self._peer_file
        detail = f"we rejected the peer's certificate: {message}"
        if isinstance(exc, NotPinnedError):
            return step_failed(
                "tls",
                "we rejected the peer's certificate: not pinned (it chains to our trust "
                f"anchors but is not in tls_certificates of {peer_file})",
                "the peer presented a certificate we do not have configured for it: the peer "
                "renewed or replaced its TLS certificate without us adding it, or something "
                f"else answers at {self._target.where}{shown}",
                "get the peer's current TLS certificate through a trusted channel (not from "
                "this connection), confirm its SHA-256 fingerprint with the peer by phone, add "
                f"it to tls_certificates in {peer_file} and reload (systemctl reload medgw)",
            )
        if code == 10 or "expired" in message:
            return step_failed(
                "tls",
                detail,
                f"the peer's TLS certificate has expired{shown}",
                "the peer must renew its TLS certificate and send the new one; add it to "
                f"tls_certificates in {peer_file} and reload",
            )
        if code == 9 or "not yet valid" in message:
            return step_failed(
                "tls",
                detail,
                "the peer's TLS certificate is not valid yet, or the clock of this machine or "
                f"of the peer is wrong{shown}",
                "check the time on both machines (`timedatectl`, NTP); if the clocks are right, "
                "the peer installed its new certificate too early",
            )
        if code in _UNKNOWN_CA_CODES or "issuer" in message or "self-signed" in message:
            return step_failed(
                "tls",
                detail,
                "the peer's certificate was not issued by a CA in the trust_anchors of its zone "
                f"{self._peer.zone!r}: the peer changed its CA, or the connection reaches the "
                f"wrong server{shown}",
                "ask the peer which CA issued its certificate; obtain that CA certificate "
                "through a trusted channel and add it to trust_anchors of the [[zones]] table "
                f"{self._peer.zone!r} in {self._config.source}",
            )
        if code in (62, 64) or "mismatch" in message:
            return step_failed(
                "tls",
                detail,
                f"the peer's certificate is not issued for {self._target.host!r}, the host in "
                f"the peer's URL{shown}",
                f"check that `url` in {peer_file} uses the name or address the peer's "
                "certificate names (its subjectAltName), or ask the peer for a certificate "
                f"that names {self._target.host}",
            )
        if code == 23 or "revoked" in message:
            return step_failed(
                "tls",
                detail,
                f"the peer's TLS certificate has been revoked by its CA{shown}",
                "do not exchange with this server; ask the peer for its new certificate",
            )
        if code == 26 or "purpose" in message:
            return step_failed(
                "tls",
                detail,
                f"the peer's certificate is not made for a TLS server (extendedKeyUsage){shown}",
                "the peer needs a certificate with extendedKeyUsage serverAuth",
            )
        return step_failed(
            "tls",
            detail,
            f"we could not verify the peer's TLS certificate ({message}){shown}",
            f"compare the peer's certificate with the trust_anchors of zone {self._peer.zone!r} "
            f"and {peer_file}",
        )

    async def _peek_certificate(self, address: str) -> x509.Certificate | None:
        """The certificate the peer presents, read without trusting it (for the report only)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            async with asyncio.timeout(self._connect_timeout):
                sock = await self._route.open_socket(address, self._target.port)
                try:
                    _, writer = await asyncio.open_connection(
                        sock=sock, ssl=context, server_hostname=self._target.host
                    )
                except BaseException:
                    sock.close()
                    raise
        except (TimeoutError, OSError):
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        writer.close()
        await closed(writer)
        return x509.load_der_x509_certificate(der) if der else None

    def _tls_error(self, exc: ssl.SSLError, *, after_handshake: bool) -> StepResult:
        text = ssl_text(exc)
        when = "after the handshake" if after_handshake else "during the handshake"
        ours = self._config.tls.identity
        for key, what in _PEER_REFUSED_ALERTS:
            if key in text and "alert" in text:
                return step_failed(
                    "tls",
                    f"the peer rejected our certificate: TLS alert {when}: {exc}",
                    f"{what}: the peer does not accept our TLS certificate "
                    f"{subject_of(ours.certificate)} (valid until "
                    f"{day_of(ours.certificate.not_valid_after_utc)})",
                    f"send the peer our TLS certificate ({ours.certificate_path}, sha256 "
                    f"{fingerprint(ours.certificate)}) and our CA certificate; ask them to trust "
                    f"the CA and list the certificate for {self._config.as2_id}, then reload their "
                    "gateway",
                )
        if not after_handshake and any(key in text for key in _NOT_TLS):
            return step_failed(
                "tls",
                f"{self._target.where} does not speak TLS: {exc}",
                "the server on this port answered our TLS handshake with something that is "
                "not TLS: most likely plain HTTP (an http:// endpoint, or the peer's HTTP port), "
                "or another service",
                f"ask the peer for its HTTPS AS2 URL (host, port and path) and correct `url` in "
                f"{self._peer_file}; AS2 with us runs over mutual TLS only, so a plain-HTTP "
                "endpoint cannot be used",
            )
        if any(key in text for key in _MISMATCH):
            return step_failed(
                "tls",
                f"no common TLS protocol or cipher {when}: {exc}",
                "we and the peer share no TLS version or cipher suite: we accept TLS "
                f"{self._config.require_zone(self._peer.zone).min_version} or newer with "
                "ECDHE/AES-GCM only (CRYPTREC), "
                "or the port does not speak TLS at all",
                "ask the peer which TLS versions and cipher suites their server accepts; if it "
                f'can only do TLS 1.2, set min_version = "1.2" in the [[zones]] table '
                f"{self._peer.zone!r} of {self._config.source} (ECDHE + AES-GCM stay required)",
            )
        return step_failed(
            "tls",
            f"TLS error {when}: {exc}",
            f"the TLS connection failed {when} ({exc})",
            "ask the peer's administrator what their TLS server logged for our address at "
            "this time",
        )
