"""``medgw diagnose PEER``: check each segment of the path to a peer, name the one that fails.

The steps run in order and stop at the first failure (NET-6 "isolating the
failed segment"):

1. ``resolve``: name resolution of the host in the peer's URL;
2. ``tcp``: a TCP connection to it (refused, timed out and unreachable mean
   different things);
3. ``tls``: the mutual-TLS handshake with the same client context the daemon
   uses (trust anchors, pinning, host name), followed by one HTTP request,
   because with TLS 1.3 a server that refuses our certificate says so only
   after the client has finished its handshake.  "We rejected the peer's
   certificate", "the peer rejected ours" and "no common protocol or cipher"
   are told apart;
4. ``certificates``: the validity windows and purposes of our certificates
   and of the ones configured for the peer (expiring within 30 days is a
   warning);
5. ``as2``: a small signed and encrypted test document (the *probe*), whose
   signed receipt must verify, be for that message, say ``processed`` and
   carry the MIC we computed.

The probe is named ``medgw-diagnose-<UTC time>.txt`` and carries the HTTP
header ``X-Medgw-Probe: 1``.  A medgw receiver verifies it like any message,
audits it as ``probe.received`` and answers with a normal signed receipt, but
does not deliver it to its inbox.  Other AS2 products deliver the small text
file; it can be deleted there.

Every step returns a :class:`StepResult`; the result of a step that fails
carries what it means and what to do, for an administrator on call.  Time
comes from an injected :class:`~gateway.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.as2.headers import PROBE_HEADER, PROBE_PREFIX, PROBE_SUFFIX, new_message_id
from gateway.as2.mdn import Disposition, mic_matches, parse_receipt
from gateway.as2.message import MessageSpec, build_message
from gateway.channel.client import MAX_RECEIPT_BYTES
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.egress import Network
from gateway.errors import (
    MalformedMessageError,
    MedgwError,
    PolicyError,
    ProtocolError,
    SignatureError,
    SignerNotTrustedError,
)
from gateway.httpbody import read_capped
from gateway.pki.ocsp import OcspClient
from gateway.pki.peers import TrustSettings, assess_peer
from gateway.pki.tls import NotPinnedError, client_context
from gateway.pki.validate import Purpose, check_purpose

# Whose area a failing step is (NET-6b: who to call; see config.who_to_call).
STEP_AREAS: dict[str, str] = {
    "resolve": "communication",
    "tcp": "communication",
    "tls": "authentication",
    "certificates": "authentication",
    "as2": "encryption",
}
EXPIRY_WARNING = timedelta(days=30)
DEFAULT_PROBE_TIMEOUT = 60.0

STEPS: dict[str, str] = {
    "resolve": "name resolution",
    "tcp": "TCP connect",
    "tls": "TLS handshake",
    "certificates": "certificate validity",
    "as2": "AS2 test message and receipt",
}


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step; ``meaning`` and ``action`` are set when it failed or warned."""

    name: str  # one of STEPS
    status: Status
    detail: str
    meaning: str = ""
    action: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.WARN)

    @property
    def number(self) -> int:
        return list(STEPS).index(self.name) + 1

    @property
    def title(self) -> str:
        return STEPS[self.name]

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.number,
            "name": self.name,
            "title": self.title,
            "status": self.status.value,
            "ok": self.ok,
            "detail": self.detail,
            "meaning": self.meaning or None,
            "action": self.action or None,
        }


@dataclass(frozen=True)
class Diagnosis:
    peer: str
    as2_id: str
    url: str
    steps: tuple[StepResult, ...]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def first_failure(self) -> StepResult | None:
        return next((s for s in self.steps if s.status is Status.FAIL), None)

    def to_json(self) -> dict[str, Any]:
        failure = self.first_failure
        return {
            "peer": self.peer,
            "as2_id": self.as2_id,
            "url": self.url,
            "ok": self.ok,
            "failed_step": failure.name if failure else None,
            "steps": [s.to_json() for s in self.steps],
        }


def _ok(name: str, detail: str) -> StepResult:
    return StepResult(name, Status.OK, detail)


def _fail(name: str, detail: str, meaning: str, action: str) -> StepResult:
    return StepResult(name, Status.FAIL, detail, meaning, action)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: str

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# -- step 3: what the TLS errors mean ---------------------------------------------

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


def _ssl_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{reason or ''} {exc}".replace("_", " ").lower()


class Diagnoser:
    """Runs the steps for one peer with this gateway's configuration."""

    def __init__(
        self,
        config: GatewayConfig,
        peer: Peer,
        clock: Clock,
        *,
        connect_timeout: float | None = None,
        probe_timeout: float | None = None,
    ) -> None:
        self._config = config
        self._peer = peer
        self._clock = clock
        self._connect_timeout = connect_timeout or config.runtime.connect_timeout_seconds
        self._probe_timeout = probe_timeout or min(
            config.runtime.request_timeout_seconds, DEFAULT_PROBE_TIMEOUT
        )
        parts = urlsplit(peer.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._target = _Target(parts.hostname or "", parts.port or 443, path)
        self._peer_file = f"peers.d/{peer.source.name}"
        # The daemon's connect path for the peer's zone (NET-4), judged by this configuration.
        self._route = Network.fixed(config.network_map).zone(peer.zone)

    async def run(self) -> Diagnosis:
        steps: list[StepResult] = []
        addresses: list[str] = []
        # Step 3 upgrades the connection step 2 opened: no bare TCP connection is left
        # for the peer to log as a failed handshake.
        connection: socket.socket | None = None

        async def resolve() -> StepResult:
            nonlocal addresses
            result, addresses = await self.resolve()
            return result

        async def connect() -> StepResult:
            nonlocal connection
            result, connection = await self.connect(addresses)
            return result

        async def handshake() -> StepResult:
            assert connection is not None
            return await self.handshake(connection)

        async def certificates() -> StepResult:
            result = self.certificates()
            if result.status is Status.FAIL:
                return result
            refused = await self.peer_trust()
            if refused is None or (refused.status is Status.WARN and result.status is Status.WARN):
                return result
            return refused

        plan = (
            ("resolve", resolve),
            ("tcp", connect),
            ("tls", handshake),
            ("certificates", certificates),
            ("as2", self.probe),
        )
        failed: StepResult | None = None
        try:
            for name, step in plan:
                if failed is not None:
                    skipped = f"not run: step {failed.number} ({failed.title}) failed"
                    steps.append(StepResult(name, Status.SKIP, skipped))
                    continue
                result = await step()
                steps.append(result)
                if result.status is Status.FAIL:
                    failed = result
        finally:
            if connection is not None:
                connection.close()
        return Diagnosis(self._peer.name, self._peer.as2_id, self._peer.url, tuple(steps))

    # -- 1 --------------------------------------------------------------------

    async def resolve(self) -> tuple[StepResult, list[str]]:
        host, port = self._target.host, self._target.port
        if not host:
            return _fail(
                "resolve",
                f"the peer's url {self._peer.url!r} has no host",
                "the configured endpoint of the peer is not a usable URL",
                f'correct `url` in {self._peer_file}, e.g. url = "https://as2.example.jp/as2"',
            ), []
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            refused = self._route.judge(host, port)[1]
            if refused is not None:
                return self._outside_zone(host, [host], refused), []
            return _ok("resolve", f"{host} is an IP address: nothing to resolve"), [host]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            return _fail(
                "resolve",
                f"no answer for {host} within {self._connect_timeout:g} s",
                "this machine's DNS servers do not answer (or answer too slowly)",
                "check /etc/resolv.conf and that this host can reach its DNS servers "
                f"(`getent hosts {host}`); on a closed network, ask who runs its DNS",
            ), []
        except socket.gaierror as exc:
            temporary = exc.errno == socket.EAI_AGAIN
            return _fail(
                "resolve",
                f"{host}: {exc.strerror}",
                (
                    "the DNS servers failed to answer for now (temporary failure)"
                    if temporary
                    else f"the name {host} does not exist for this machine's resolver "
                    "(DNS or /etc/hosts): it is misspelt, or not published on this network"
                ),
                f"check the host in `url` of {self._peer_file} against what the peer gave you; "
                f"test with `getent hosts {host}`; on a closed network the name may need an "
                "/etc/hosts entry or the network's own DNS server",
            ), []
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # the daemon connects only to addresses its zone route allows (NET-4)
        verdicts = {a: self._route.judge(a, port)[1] for a in found}
        allowed = [a for a in found if verdicts[a] is None]
        if not allowed:
            return self._outside_zone(host, found, next(iter(verdicts.values())) or ""), []
        found = allowed
        return _ok("resolve", f"{host} -> {', '.join(found)}"), found

    def _outside_zone(self, host: str, found: list[str], refused: str) -> StepResult:
        zone = self._config.require_zone(self._peer.zone)
        ranges = ", ".join(str(n) for n in zone.egress)
        shown = host if found == [host] else f"{host} -> {', '.join(found)}"
        return _fail(
            "resolve",
            f"{shown}, none inside the egress of zone {zone.name!r} ({ranges}): {refused}",
            f"the address is outside the network of the peer's zone {zone.name!r} (or is "
            "one of this gateway's own listeners), and the gateway never sends a zone's "
            "messages through another network: this machine's resolver gives another "
            "address than the peer's on that network (DNS or /etc/hosts), or the peer "
            "belongs to another zone",
            f"compare `getent hosts {host}` with the peer's address on the zone's "
            "network and fix the DNS or /etc/hosts entry; or correct `url` or `zone` in "
            f"{self._peer_file}, or egress of the [[zones]] table {zone.name!r} in "
            f"{self._config.source}",
        )

    # -- 2 --------------------------------------------------------------------

    async def connect(self, addresses: list[str]) -> tuple[StepResult, socket.socket | None]:
        """A TCP connection to the first address that accepts; step 3 upgrades it to TLS."""
        port = self._target.port
        # The daemon's connections to this peer leave from its zone's source address (NET-4).
        errors: list[tuple[str, BaseException]] = []
        for address in addresses:
            started = self._clock.monotonic()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    sock = await self._route.open_socket(address, port)
            except (TimeoutError, OSError) as exc:
                errors.append((address, exc))
                continue
            elapsed = (self._clock.monotonic() - started) * 1000
            return _ok("tcp", f"{address} port {port} accepted ({elapsed:.1f} ms)"), sock
        if not errors:
            return _fail(
                "tcp",
                "no address to connect to",
                "name resolution gave no address",
                f"check the host in `url` of {self._peer_file}",
            ), None
        first_address, first_error = errors[0]
        tried = ", ".join(a for a, _ in errors)
        return self._connect_failure(first_address, port, first_error, tried), None

    def _connect_failure(
        self, address: str, port: int, exc: BaseException, tried: str
    ) -> StepResult:
        detail_where = f"{tried} port {port}"
        if isinstance(exc, ConnectionRefusedError):
            return _fail(
                "tcp",
                f"{detail_where}: connection refused",
                f"the host {address} answered, but nothing accepts connections on port {port}: "
                "the peer's gateway is not running, listens on another port, or a firewall "
                "rejects the connection",
                "call the peer's on-call administrator: is their gateway running and listening "
                f"on port {port}? Compare with `url` in {self._peer_file}. Our messages for "
                "them stay queued and are retried; nothing is lost",
            )
        if isinstance(exc, TimeoutError):
            return _fail(
                "tcp",
                f"{detail_where}: no answer within {self._connect_timeout:g} s",
                "packets to the peer get no answer: a firewall (ours, theirs or in between) "
                "drops them, the line or VPN to the peer is down, or the host is off",
                f"check the firewall rules for {address}:{port} on both sides and the state of "
                f"the line or VPN (`traceroute -T -p {port} {address}`); ask the peer whether "
                "their host is up",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            source = self._config.require_zone(self._peer.zone).source_address
            return _fail(
                "tcp",
                f"{detail_where}: {exc.strerror}",
                f"connections to this peer leave from the source_address {source} of its zone "
                f"{self._peer.zone!r}, and this machine cannot use that address (it is not "
                "configured on any interface, or is of the other IP family than the peer's "
                "address)",
                f"check `ip -brief address` for {source}; correct source_address of the "
                f"[[zones]] table {self._peer.zone!r} in {self._config.source}, or bring up "
                "the interface of that network",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return _fail(
                "tcp",
                f"{detail_where}: {exc.strerror}",
                f"there is no route from this machine to {address}: the network interface, "
                "VPN or closed-network link towards the peer is down, or a router reports the "
                "host unreachable",
                f"check `ip route get {address}` and the link or VPN to the peer's network; "
                "contact your network carrier if the line is down",
            )
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return _fail(
            "tcp",
            f"{detail_where}: {text}",
            f"the TCP connection to the peer failed: {text}",
            f"check the network path to {address}:{port} and `url` in {self._peer_file}",
        )

    # -- 3 --------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        zone = self._config.require_zone(self._peer.zone)  # trust and TLS version are per zone
        return client_context(
            self._config.tls.identity,
            zone.trust_anchors,
            self._peer.tls_certificates,
            zone.min_version,
        )

    async def handshake(self, connection: socket.socket) -> StepResult:
        target = self._target
        address = str(connection.getpeername()[0])
        try:
            context = self._context()
        except (ssl.SSLError, OSError) as exc:
            return _fail(
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
            return _fail(
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
            return _fail(
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
            return _fail(
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
            await _closed(writer)
        if answer and not answer.startswith(("HTTP/", "the connection")):
            return _fail(
                "tls",
                f"{version} handshake done, but the answer is not HTTP: {answer[:60]!r}",
                "something other than an AS2 (HTTPS) server answers at the peer's address",
                f"check `url` in {self._peer_file} against the peer's AS2 URL",
            )
        if not answer.startswith("HTTP/"):
            return _fail(
                "tls",
                f"the peer rejected our certificate: {version} handshake done, then "
                f"{answer or 'the connection was closed'} instead of an HTTP answer",
                "the peer completed the TLS handshake and then closed the connection without "
                "answering: with TLS 1.3 this is how a server refuses a client certificate "
                "after the handshake, so the peer rejected our certificate (it is not "
                "listed for us there, or not trusted, or expired in their eyes)",
                f"send the peer our TLS certificate ({self._config.tls.identity.certificate_path}, "
                f"sha256 {_sha256(self._config.tls.identity.certificate)}) and ask them to list "
                f"it for {self._config.as2_id} and reload their gateway",
            )
        who = f"{_subject(presented)} (pinned)" if presented else "?"
        status = answer.split(" ", 2)[1] if answer.count(" ") >= 1 else "?"
        return _ok(
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
            f"; it presented {_subject(presented)}, issued by "
            f"{presented.issuer.rfc4514_string()}, valid until "
            f"{_day(presented.not_valid_after_utc)}, sha256 {_sha256(presented)}"
            if presented is not None
            else ""
        )
        peer_file = self._peer_file
        detail = f"we rejected the peer's certificate: {message}"
        if isinstance(exc, NotPinnedError):
            return _fail(
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
            return _fail(
                "tls",
                detail,
                f"the peer's TLS certificate has expired{shown}",
                "the peer must renew its TLS certificate and send the new one; add it to "
                f"tls_certificates in {peer_file} and reload",
            )
        if code == 9 or "not yet valid" in message:
            return _fail(
                "tls",
                detail,
                "the peer's TLS certificate is not valid yet, or the clock of this machine or "
                f"of the peer is wrong{shown}",
                "check the time on both machines (`timedatectl`, NTP); if the clocks are right, "
                "the peer installed its new certificate too early",
            )
        if code in _UNKNOWN_CA_CODES or "issuer" in message or "self-signed" in message:
            return _fail(
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
            return _fail(
                "tls",
                detail,
                f"the peer's certificate is not issued for {self._target.host!r}, the host in "
                f"the peer's URL{shown}",
                f"check that `url` in {peer_file} uses the name or address the peer's "
                "certificate names (its subjectAltName), or ask the peer for a certificate "
                f"that names {self._target.host}",
            )
        if code == 23 or "revoked" in message:
            return _fail(
                "tls",
                detail,
                f"the peer's TLS certificate has been revoked by its CA{shown}",
                "do not exchange with this server; ask the peer for its new certificate",
            )
        if code == 26 or "purpose" in message:
            return _fail(
                "tls",
                detail,
                f"the peer's certificate is not made for a TLS server (extendedKeyUsage){shown}",
                "the peer needs a certificate with extendedKeyUsage serverAuth",
            )
        return _fail(
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
        await _closed(writer)
        return x509.load_der_x509_certificate(der) if der else None

    def _tls_error(self, exc: ssl.SSLError, *, after_handshake: bool) -> StepResult:
        text = _ssl_text(exc)
        when = "after the handshake" if after_handshake else "during the handshake"
        ours = self._config.tls.identity
        for key, what in _PEER_REFUSED_ALERTS:
            if key in text and "alert" in text:
                return _fail(
                    "tls",
                    f"the peer rejected our certificate: TLS alert {when}: {exc}",
                    f"{what}: the peer does not accept our TLS certificate "
                    f"{_subject(ours.certificate)} (valid until "
                    f"{_day(ours.certificate.not_valid_after_utc)})",
                    f"send the peer our TLS certificate ({ours.certificate_path}, sha256 "
                    f"{_sha256(ours.certificate)}) and our CA certificate; ask them to trust the "
                    f"CA and list the certificate for {self._config.as2_id}, then reload their "
                    "gateway",
                )
        if not after_handshake and any(key in text for key in _NOT_TLS):
            return _fail(
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
            return _fail(
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
        return _fail(
            "tls",
            f"TLS error {when}: {exc}",
            f"the TLS connection failed {when} ({exc})",
            "ask the peer's administrator what their TLS server logged for our address at "
            "this time",
        )

    # -- 4 --------------------------------------------------------------------

    def certificates(self) -> StepResult:
        """Validity windows and purposes of our certificates and the peer's, at ``clock.now()``."""
        now = self._clock.now()
        config, peer = self._config, self._peer
        ours = str(config.source)
        roles: tuple[tuple[str, tuple[x509.Certificate, ...], Purpose, str, bool], ...] = (
            ("our TLS certificate", (config.tls.identity.certificate,), Purpose.TLS_CLIENT,
             f"[tls] certificate in {ours}", True),
            ("our signing certificate", (config.smime.signing.certificate,), Purpose.SMIME_SIGN,
             f"[smime] signing_certificate in {ours}", True),
            ("our encryption certificate", (config.smime.encryption.certificate,),
             Purpose.SMIME_ENCRYPT, f"[smime] encryption_certificate in {ours}", True),
            ("the peer's TLS certificate", peer.tls_certificates, Purpose.TLS_SERVER,
             f"tls_certificates in {self._peer_file}", False),
            ("the peer's signing certificate", peer.signing_certificates, Purpose.SMIME_SIGN,
             f"signing_certificates in {self._peer_file}", False),
            ("the peer's encryption certificate", peer.encryption_certificates,
             Purpose.SMIME_ENCRYPT, f"encryption_certificates in {self._peer_file}", False),
        )  # fmt: skip
        failures: list[tuple[str, str, bool]] = []  # (problem, where, ours)
        warnings: list[tuple[str, str, bool]] = []
        earliest: tuple[datetime, str] | None = None
        count = 0
        for role, certs, purpose, where, is_ours in roles:
            usable = []
            for cert in certs:
                count += 1
                start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
                label = f"{role} {_subject(cert)}"
                if now > end:
                    problem = f"{label} expired on {_day(end)}"
                elif now < start:
                    problem = f"{label} is not valid before {_day(start)}"
                else:
                    problem = check_purpose(cert, purpose) or ""
                if problem:
                    (warnings if len(certs) > 1 else failures).append((problem, where, is_ours))
                    continue
                usable.append(cert)
                if end - now < EXPIRY_WARNING:
                    days = (end - now).days
                    warnings.append(
                        (f"{label} expires in {days} day(s), on {_day(end)}", where, is_ours)
                    )
                if earliest is None or end < earliest[0]:
                    earliest = (end, role)
            if certs and not usable and len(certs) > 1:
                failures.append((f"none of {role}s is valid now", where, is_ours))
                warnings = [w for w in warnings if w[1] != where]
        if failures:
            problem, where, is_ours = failures[0]
            also = f" (and {len(failures) - 1} more problem(s))" if len(failures) > 1 else ""
            if is_ours:
                meaning = (
                    f"{problem}: peers refuse what we sign, encrypt or present with it; "
                    "every exchange that needs it fails"
                )
                action = (
                    f"get a new certificate from your CA, install it at {where}, send it to "
                    "every peer (they must list it for us), then reload: systemctl reload medgw"
                )
            else:
                meaning = (
                    f"{problem}: the peer has probably renewed it and we still have the old one; "
                    "exchanges that need it fail"
                )
                action = (
                    "ask the peer for its current certificate through a trusted channel, confirm "
                    f"its fingerprint by phone, put it in {where} and reload: "
                    "systemctl reload medgw"
                )
            return _fail("certificates", problem + also, meaning, action)
        if warnings:
            problem, where, is_ours = warnings[0]
            also = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
            return StepResult(
                "certificates",
                Status.WARN,
                problem + also,
                "it still works, but will fail when the certificate runs out",
                (
                    f"renew it in time: new certificate at {where}, send it to every peer"
                    if is_ours
                    else f"ask the peer for its next certificate and add it to {where}"
                )
                + "; the peer's certificates are also validated (revocation included) "
                "as the daemon validates them",
            )
        until = (
            f"; the first to expire is {earliest[1]}, on {_day(earliest[0])}" if earliest else ""
        )
        return _ok("certificates", f"{count} certificates valid now and for 30 days{until}")

    async def peer_trust(self) -> StepResult | None:
        """The peer's certificates validated the way the daemon does before it uses them
        (chain, revocation by the zone's CRLs or OCSP, algorithm policy): a failure when a
        role has no acceptable certificate left, a warning when some are refused, else None."""
        peer = self._peer
        zone = self._config.require_zone(peer.zone)
        trust = await assess_peer(
            peer.name,
            tls=peer.tls_certificates,
            signing=peer.signing_certificates,
            encryption=peer.encryption_certificates,
            trust=TrustSettings.of_zone(zone, self._route),
            at=self._clock.now(),
            policy=peer.policy,
            ocsp_client=OcspClient(self._route),
        )
        roles = (
            ("TLS certificate", trust.tls, "tls_certificates"),
            ("signing certificate", trust.signing, "signing_certificates"),
            ("encryption certificate", trust.encryption, "encryption_certificates"),
        )
        for failing in (True, False):
            for role, verdicts, key in roles:
                refused = [v for v in verdicts if not v.valid]
                if not refused or failing != (len(refused) == len(verdicts)):
                    continue
                verdict = refused[0]
                where = f"{key} in {self._peer_file}"
                detail = (
                    f"the peer's {role} {verdict.subject} (sha256 {verdict.fingerprint[:16]}...) "
                    f"is refused: {verdict.result.reason}"
                )
                if not failing:
                    return StepResult(
                        "certificates",
                        Status.WARN,
                        detail,
                        f"the gateway does not use this certificate; another one in {where} "
                        "is still accepted",
                        f"remove it from {where}, or ask the peer for its current one, and reload",
                    )
                revoked = "revoked" in (verdict.result.reason or "")
                return _fail(
                    "certificates",
                    detail,
                    (
                        "the peer's CA has revoked it"
                        if revoked
                        else f"it does not validate under zone {zone.name!r} (trust anchors, "
                        f"revocation = {zone.revocation!r} with its CRLs or OCSP)"
                    )
                    + f": the gateway refuses it, and {where} holds no other acceptable one, "
                    "so every exchange that needs it fails",
                    (
                        "do not use it; ask the peer for its new certificate through a trusted "
                        f"channel, confirm its fingerprint by phone, put it in {where} and "
                        "reload: systemctl reload medgw"
                        if revoked
                        else "if a CRL is missing or out of date, fetch the CA's current CRL into "
                        f"crls of the [[zones]] table {zone.name!r} in {self._config.source} and "
                        "reload; otherwise ask the peer for its current certificate and put it "
                        f"in {where}"
                    ),
                )
        return None

    # -- 5 --------------------------------------------------------------------

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
            return _fail(
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
            return _fail(
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
            return _fail(
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
            return _fail(
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
            return _fail(
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
            return _fail(
                "as2",
                detail,
                "the peer's gateway accepted our TLS certificate but refuses our request: its "
                "configuration no longer lists us as a peer (for example after a reload)",
                f"ask the peer's administrator to check their configuration for "
                f"{self._config.as2_id}",
            )
        if status in (404, 405):
            return _fail(
                "as2",
                detail,
                f"there is no AS2 endpoint at {self._target.path} on the peer's server",
                f"check the path in `url` of {self._peer_file} against the peer's AS2 URL",
            )
        if status == 413:
            return _fail(
                "as2",
                detail,
                "the peer refuses even a small message as too large",
                "ask the peer's administrator to check their maximum message size",
            )
        if 500 <= status < 600:
            return _fail(
                "as2",
                detail,
                "the peer's AS2 software failed while handling our message (server error)",
                "ask the peer's administrator to look at their gateway's log for our address "
                "at this time",
            )
        return _fail(
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
            return _fail(
                "as2",
                f"{sent}: receipt signed by a certificate we do not trust ({exc.message})",
                f"the receipt is signed with a certificate that is not in {signers}: the "
                "peer signs with a new certificate, or the answer does not come from the peer",
                "obtain the peer's current signing certificate through a trusted channel, "
                f"confirm its fingerprint by phone, add it to {signers} and reload",
            )
        except (SignatureError, MalformedMessageError) as exc:
            return _fail(
                "as2",
                f"{sent}: the receipt's signature does not verify ({exc.message})",
                "the receipt was altered on the way, or the peer's software signs it wrongly; "
                "it proves nothing",
                "ask the peer's administrator to check their receipt signing; a proxy that "
                "rewrites content is a suspect",
            )
        except PolicyError as exc:
            return _fail(
                "as2",
                f"{sent}: the receipt uses a refused algorithm ({exc.message})",
                "the peer signs receipts with an algorithm the CRYPTREC policy refuses",
                exc.fix or "ask the peer to sign with SHA-256 or stronger",
            )
        except ProtocolError as exc:
            return _fail(
                "as2",
                f"{sent}: {exc.message}",
                "the peer's answer is not a signed receipt, so it proves nothing about delivery",
                "ask the peer to send signed receipts (signed-receipt-protocol=pkcs7-signature) "
                "in RFC 8098 form",
            )
        except MedgwError as exc:
            return _fail(
                "as2",
                f"{sent}: the receipt is invalid ({exc})",
                "the peer's receipt could not be verified",
                "ask the peer's administrator to check their receipts",
            )
        if receipt.original_message_id != message_id:
            return _fail(
                "as2",
                f"{sent}: the receipt is for {receipt.original_message_id!r}",
                "the peer answered with a receipt for another message",
                "ask the peer's administrator to check their AS2 software",
            )
        if not receipt.processed:
            return self._negative(receipt.disposition, sent)
        if not mic_matches(mic, receipt.mic):
            return _fail(
                "as2",
                f"{sent}: receipt MIC {receipt.mic!r}, we computed {mic!r}",
                "the receipt says processed but its MIC does not match what we sent: the peer "
                "did not receive the document intact (or computes the MIC wrongly); such a "
                "receipt is never counted as delivery",
                "ask the peer's administrator to check their MIC computation (RFC 4130 7.3.1); "
                "a proxy that rewrites content is a suspect",
            )
        return _ok(
            "as2",
            f"{sent}: signed receipt from {_subject(receipt.signer)}, processed, MIC matches",
        )

    def _negative(self, disposition: str, sent: str) -> StepResult:
        detail = f"{sent}: the peer reported {disposition!r}"
        normalized = disposition.strip().lower()
        peer_file = self._peer_file
        our_sign = self._config.smime.signing
        if normalized == Disposition.DECRYPTION_FAILED.value:
            ours = ", ".join(
                f"{_subject(c)} sha256 {_sha256(c)[:16]}..."
                for c in self._peer.encryption_certificates
            )
            return _fail(
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
            return _fail(
                "as2",
                detail,
                "the peer does not accept us as the sender: our signing certificate "
                f"{_subject(our_sign.certificate)} is not among the signing certificates the "
                f"peer has configured for us, or the AS2 ids do not match (we send AS2-From "
                f"{self._config.as2_id!r} to AS2-To {self._peer.as2_id!r})",
                f"send the peer our signing certificate ({our_sign.certificate_path}, sha256 "
                f"{_sha256(our_sign.certificate)}) and ask them to list it for "
                f"{self._config.as2_id}; confirm both AS2 ids with them",
            )
        if normalized == Disposition.INTEGRITY_CHECK_FAILED.value:
            return _fail(
                "as2",
                detail,
                "the peer decrypted the message but its signature does not match the content: "
                "it was altered on the way, or the two products frame MIME differently",
                "run diagnose again; if it persists, ask the peer's administrator to look up "
                "this Message-ID in their log. A proxy that rewrites content is a suspect",
            )
        if normalized == Disposition.UNEXPECTED_ERROR.value:
            return _fail(
                "as2",
                detail,
                "the peer verified the message but failed to process it (for example its "
                "inbox disk is full, a folder permission is wrong, or the Message-ID clashed)",
                "ask the peer's administrator to look up this Message-ID in their audit trail",
            )
        return _fail(
            "as2",
            detail,
            f"the peer did not process the test message: {disposition}",
            "ask the peer's administrator to look up this Message-ID in their log",
        )


CLOSE_WAIT_SECONDS = 2.0


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait briefly for a connection to close.  A TLS close waits for the peer's
    close_notify, up to 30 s: a hung peer never sends it, and diagnose has said all
    it can by then, so after a moment the connection is dropped instead."""
    try:
        async with asyncio.timeout(CLOSE_WAIT_SECONDS):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the connection is gone either way (SSLError too)


async def diagnose(config: GatewayConfig, peer: Peer, clock: Clock) -> Diagnosis:
    return await Diagnoser(config, peer, clock).run()
