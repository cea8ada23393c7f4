"""OCSP client (RFC 6960) over HTTP POST, with nonce and a cache until ``nextUpdate``.

The client only *fetches*: it builds the request (SHA-256 CertID, a random
nonce), posts it to the responder named in the certificate's
authorityInformationAccess, and checks what can be checked without a trust
decision: the response status, that the response answers our CertID, and
that it echoes our nonce (replay protection).  The response signature and the
responder's authorisation (the issuing CA itself, or a delegated responder
certificate issued by that CA with extendedKeyUsage OCSPSigning) are judged
during path validation in :mod:`gateway.pki.validate`, which also decides
what enters the cache: only responses that validated, until their
``nextUpdate``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import aiohttp
from asn1crypto import algos
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from gateway.egress import Route
from gateway.errors import EgressRefused, MedgwError
from gateway.httpbody import read_capped

MAX_RESPONSE_BYTES = 256 * 1024
CONTENT_TYPE_REQUEST = "application/ocsp-request"
CONTENT_TYPE_RESPONSE = "application/ocsp-response"


class OcspError(MedgwError):
    """No usable OCSP response could be obtained."""


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) OCSP responder URLs in the certificate's authorityInformationAccess."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        desc.access_location.value
        for desc in aia
        if desc.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(desc.access_location, x509.UniformResourceIdentifier)
        and desc.access_location.value.lower().startswith(("http://", "https://"))
    ]


def _cert_id(cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate) -> asn1_ocsp.CertId:
    return asn1_ocsp.CertId(
        {
            "hash_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "issuer_name_hash": issuer.subject.sha256,
            "issuer_key_hash": issuer.public_key.sha256,
            "serial_number": cert.serial_number,
        }
    )


def build_request(
    cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate, nonce: bytes
) -> asn1_ocsp.OCSPRequest:
    return asn1_ocsp.OCSPRequest(
        {
            "tbs_request": {
                "request_list": [{"req_cert": _cert_id(cert, issuer)}],
                "request_extensions": [
                    {"extn_id": "nonce", "critical": False, "extn_value": nonce}
                ],
            }
        }
    )


def _matches(
    single: asn1_ocsp.SingleResponse, cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate
) -> bool:
    cid = single["cert_id"]
    algo = cid["hash_algorithm"]["algorithm"].native
    if cid["serial_number"].native != cert.serial_number:
        return False
    name_hash = getattr(issuer.subject, algo, None)
    key_hash = getattr(issuer.public_key, algo, None)
    return bool(
        name_hash == cid["issuer_name_hash"].native and key_hash == cid["issuer_key_hash"].native
    )


@dataclass(frozen=True)
class OcspAnswer:
    """A response that answers our question, with its validity window."""

    url: str
    response: asn1_ocsp.OCSPResponse
    status: str  # "good", "revoked" or "unknown" (as the responder said; not yet trusted)
    this_update: datetime
    next_update: datetime | None


def parse_response(
    body: bytes,
    *,
    url: str,
    cert: asn1_x509.Certificate,
    issuer: asn1_x509.Certificate,
    nonce: bytes | None,
    at: datetime,
    skew: timedelta = timedelta(minutes=5),
) -> OcspAnswer:
    """Check a response's form, CertID, nonce and time window (not its signature)."""
    try:
        response = asn1_ocsp.OCSPResponse.load(body)
        status = response["response_status"].native
        if status != "successful":
            raise OcspError(f"OCSP responder {url} answered {status!r} instead of a status")
        if response["response_bytes"]["response_type"].native != "basic_ocsp_response":
            raise OcspError(f"OCSP responder {url} sent an unsupported response type")
        tbs = response.basic_ocsp_response["tbs_response_data"]
        singles = [s for s in tbs["responses"] if _matches(s, cert, issuer)]
        response_nonce = None
        for ext in tbs["response_extensions"] or []:
            if ext["extn_id"].native == "nonce":
                response_nonce = ext["extn_value"].parsed.native
        if not singles:
            raise OcspError(f"OCSP responder {url} sent no status for the certificate asked for")
        single = singles[0]
        this_update = single["this_update"].native
        next_update = single["next_update"].native
        cert_status = single["cert_status"].name
    except (ValueError, TypeError, KeyError) as exc:
        raise OcspError(f"OCSP responder {url} sent a malformed response ({exc})") from None
    if nonce is not None and response_nonce != nonce:
        what = "no nonce" if response_nonce is None else "a different nonce"
        raise OcspError(
            f"OCSP response from {url} carries {what} than the request (possible replay)",
            fix="configure the responder to echo request nonces (RFC 8954)",
        )
    if this_update > at + skew:
        raise OcspError(f"OCSP response from {url} is dated in the future ({this_update})")
    if next_update is not None and next_update < at:
        raise OcspError(f"OCSP response from {url} is stale (nextUpdate {next_update})")
    return OcspAnswer(url, response, cert_status, this_update, next_update)


@dataclass
class OcspClient:
    """Fetches OCSP responses; one client (and its cache) per trust store.

    ``require_nonce``: refuse responses that do not echo our nonce.
    ``timeout``: seconds for one request.
    ``route``: how the requests leave - for a zone's peers, the zone's route:
    from its source address, to responders inside its egress ranges only (NET-4).
    """

    route: Route
    timeout: float = 10.0
    require_nonce: bool = True
    _cache: dict[tuple[bytes, int], OcspAnswer] = field(default_factory=dict, repr=False)

    def via(self, route: Route) -> OcspClient:
        """This client with its requests going through ``route``; the cache is shared."""
        return OcspClient(route, self.timeout, self.require_nonce, self._cache)

    @staticmethod
    def _key(cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate) -> tuple[bytes, int]:
        return (issuer.public_key.sha256 + issuer.subject.sha256, cert.serial_number)

    def cached(
        self, cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate, at: datetime
    ) -> OcspAnswer | None:
        answer = self._cache.get(self._key(cert, issuer))
        if answer is None:
            return None
        if answer.next_update is None or not answer.this_update <= at < answer.next_update:
            self._cache.pop(self._key(cert, issuer), None)
            return None
        return answer

    def remember(
        self, cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate, answer: OcspAnswer
    ) -> None:
        """Keep a response that validated, until its nextUpdate (none: not kept)."""
        if answer.next_update is not None:
            self._cache[self._key(cert, issuer)] = answer

    async def fetch(
        self,
        cert: asn1_x509.Certificate,
        issuer: asn1_x509.Certificate,
        url: str,
        *,
        at: datetime,
    ) -> OcspAnswer:
        nonce = secrets.token_bytes(16)
        request = build_request(cert, issuer, nonce).dump()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                self.route.session(timeout=timeout, force_close=True) as session,
                session.post(
                    url,
                    data=request,
                    headers={"Content-Type": CONTENT_TYPE_REQUEST},
                    allow_redirects=False,
                ) as reply,
            ):
                if reply.status != 200:
                    raise OcspError(f"OCSP responder {url} answered HTTP {reply.status}")
                body = await read_capped(reply.content, MAX_RESPONSE_BYTES)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, EgressRefused):
                raise OcspError(
                    f"OCSP responder {url} not asked: {exc.os_error.message}",
                    fix="add the responder's address range to the zone's egress if it is "
                    "reached through this zone's network, or give the zone CRLs (`crls`) "
                    "instead",
                ) from None
            raise OcspError(
                f"OCSP responder {url} unreachable ({exc})",
                fix="check that the responder is running and reachable from this host",
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise OcspError(
                f"OCSP responder {url} unreachable ({detail})",
                fix="check that the responder is running and reachable from this host",
            ) from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise OcspError(f"OCSP response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
        return parse_response(
            body,
            url=url,
            cert=cert,
            issuer=issuer,
            nonce=nonce if self.require_nonce else None,
            at=at,
        )
