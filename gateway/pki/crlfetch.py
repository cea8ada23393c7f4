"""CRLs kept fresh by the daemon: fetched from the certificates' distribution points.

For a zone with ``fetch_crls = true`` the daemon collects the http URLs in the
cRLDistributionPoints of its peers' certificates, and for each one keeps the
newest CRL it could get:

* fetched only through the zone's route (:mod:`gateway.egress`): from its
  source address, to a distribution point inside its egress ranges; any other
  is refused there, and audited as ``zone.egress_refused``;
* bounded: at most :data:`MAX_CRL_BYTES`, :data:`FETCH_SECONDS` per request,
  no redirects (a redirect could lead out of the zone);
* accepted only when it is signed by the CA that issued the certificates
  pointing at it (one of the zone's trust anchors, whose keyUsage allows CRL
  signing, with the CRL's issuer name), is not dated in the future, and is
  not older than the CRL already held (no replay of an old CRL);
* cached on disk (written atomically), and the cache is verified again when
  it is read at start-up: an unverified CRL is never used;
* refreshed well before its ``nextUpdate`` (at half to three fifths of the
  time left, at most ``refresh_hours`` later, at least a minute later unless
  the CRL lapses sooner), with jitter, and after a failure again with a
  back-off that grows from one minute to an hour.

What this module does not decide: whether a certificate is revoked (that is
path validation, :mod:`gateway.pki.validate`, with the CRLs held here), and
what to tell the operator (the daemon audits each fetch and raises
``pki.crl_stale`` when a CRL cannot be had and the one held goes stale).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.clock import Clock
from gateway.egress import Route
from gateway.errors import EgressRefused, MedgwError, UnsafeFileError
from gateway.fsutil import private_folder, read_private, write_atomic
from gateway.httpbody import read_capped
from gateway.pki.crl import CrlFinding, crl_findings
from gateway.pki.store import parse_crls

MAX_CRL_BYTES = 16 << 20  # a large CA's CRL is a few MiB
FETCH_SECONDS = 30.0  # one request, connect to last byte
SKEW = timedelta(minutes=5)  # a CRL may be dated this far ahead of our clock
FIRST_RETRY_SECONDS = 60.0
MAX_RETRY_SECONDS = 3600.0
MIN_REFRESH_SECONDS = 60.0  # between two fetches of a point, unless its CRL lapses sooner
SOONEST_REFRESH_SECONDS = 1.0  # between two fetches of a point, ever
DEFAULT_REFRESH_HOURS = 6
PARALLEL_FETCHES = 4


class CrlFetchError(MedgwError):
    """No usable CRL could be fetched from a distribution point."""


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http URLs in the certificate's cRLDistributionPoints (full names only;
    other schemes and CRL issuers other than the certificate's are not fetched)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        if point.crl_issuer or not point.full_name:
            continue
        for name in point.full_name:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                "http://"
            ):
                urls.append(name.value)
    return urls


def _signs_crls(ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.crl_sign


def verify_crl(
    crl: x509.CertificateRevocationList, issuers: Iterable[x509.Certificate], url: str
) -> x509.Certificate:
    """The CA among ``issuers`` that signed ``crl``, or :class:`CrlFetchError`."""
    candidates = [ca for ca in issuers if ca.subject == crl.issuer]
    if not candidates:
        raise CrlFetchError(
            f"the CRL from {url} is issued by {crl.issuer.rfc4514_string()!r}, not by the CA "
            "of the certificates that point to it; not used",
            fix="check the distribution point URL in the CA's certificates with the CA",
        )
    for ca in candidates:
        try:
            valid = crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError):
            valid = False
        if valid and _signs_crls(ca):
            return ca
    raise CrlFetchError(
        f"the CRL from {url} does not carry a valid signature of its issuer "
        f"{crl.issuer.rfc4514_string()!r} (a trust anchor of the zone); not used",
        fix="check that the distribution point serves the CA's own CRL",
    )


@dataclass(frozen=True)
class Wanted:
    """One distribution point a zone needs, and the CAs its CRL may be signed by."""

    zone: str
    url: str
    issuers: tuple[x509.Certificate, ...]


def wanted_points(
    zone: str, anchors: Iterable[x509.Certificate], certificates: Iterable[x509.Certificate]
) -> list[Wanted]:
    """The distribution points of ``certificates`` issued by one of ``anchors``."""
    anchors = tuple(anchors)
    found: dict[str, dict[bytes, x509.Certificate]] = {}
    for cert in certificates:
        issuers = [ca for ca in anchors if ca.subject == cert.issuer]
        for url in distribution_points(cert):
            known = found.setdefault(url, {})
            for ca in issuers:
                known[ca.fingerprint(hashes.SHA256())] = ca
    return [Wanted(zone, url, tuple(cas.values())) for url, cas in sorted(found.items()) if cas]


@dataclass(frozen=True)
class FetchOutcome:
    """What one attempt gave, for the audit trail and the log."""

    zone: str
    url: str
    crl: x509.CertificateRevocationList | None  # the new CRL; None when the attempt failed
    error: CrlFetchError | None = None
    next_attempt: datetime | None = None


@dataclass
class _Point:
    wanted: Wanted
    crl: x509.CertificateRevocationList | None = None
    next_attempt: datetime | None = None  # None: at once
    failures: int = 0
    last_error: str | None = None


@dataclass
class CrlKeeper:
    """The CRLs of every zone that fetches them; one per daemon, kept across reloads.

    ``folder``: the cache (``state_dir/crls``); ``route``: a zone's route by name.
    """

    folder: Path
    clock: Clock
    route: Callable[[str], Route]
    rng: random.Random = field(default_factory=random.Random)
    refresh_hours: Mapping[str, int] = field(default_factory=dict)
    _points: dict[tuple[str, str], _Point] = field(default_factory=dict, repr=False)

    # -- what to keep -------------------------------------------------------

    def plan(
        self,
        wanted: Iterable[Wanted],
        refresh_hours: Mapping[str, int],
        *,
        fetch_now: bool = False,
    ) -> None:
        """Keep exactly ``wanted`` (a configuration's points): new ones are read from the
        cache (verified) and fetched at once, gone ones forgotten (their files stay);
        ``fetch_now``: every one is due at once (an operator's reload)."""
        self.refresh_hours = dict(refresh_hours)
        keep: dict[tuple[str, str], _Point] = {}
        for item in wanted:
            key = (item.zone, item.url)
            point = self._points.get(key)
            if point is None or point.wanted.issuers != item.issuers:
                point = _Point(item, self._read_cache(item))
            if fetch_now:
                point.next_attempt = None
            keep[key] = point
        self._points = keep

    def crls(self, zone: str) -> tuple[x509.CertificateRevocationList, ...]:
        """The CRLs held for ``zone`` now (every one verified)."""
        return tuple(
            p.crl for (z, _), p in sorted(self._points.items()) if z == zone and p.crl is not None
        )

    def urls(self, zone: str) -> list[str]:
        """The distribution points kept for ``zone``."""
        return [url for z, url in sorted(self._points) if z == zone]

    def holds(self, crl: x509.CertificateRevocationList) -> bool:
        return any(p.crl is crl for p in self._points.values())

    def findings(self, zone: str, *, warn_days: int) -> list[CrlFinding]:
        """What the operator must act on for ``zone``'s fetched CRLs: a stale one always
        (an alert); one nearing its nextUpdate only while its refresh fails; a
        distribution point whose CRL could never be had."""
        at = self.clock.now()
        out: list[CrlFinding] = []
        for (z, url), point in sorted(self._points.items()):
            if z != zone:
                continue
            if point.crl is None:
                if point.last_error is not None:
                    out.append(
                        CrlFinding(
                            url,
                            "error",
                            f"no CRL could be fetched from {url}: {point.last_error}",
                            "make the distribution point reachable through the zone's egress, "
                            "or put the CA's CRL in the zone's `crls` folder and reload",
                            None,
                        )
                    )
                continue
            for finding in crl_findings([point.crl], at=at, warn_days=warn_days):
                if finding.severity == "error" or (
                    finding.severity == "warning" and point.last_error is not None
                ):
                    why = f"; fetching from {url} fails: {point.last_error}"
                    out.append(
                        CrlFinding(
                            finding.issuer,
                            finding.severity,
                            finding.message + (why if point.last_error else ""),
                            "make the distribution point reachable through the zone's egress, "
                            "or put the CA's current CRL in the zone's `crls` folder and reload",
                            finding.next_update,
                        )
                    )
        return out

    # -- when ---------------------------------------------------------------

    def next_due(self) -> datetime | None:
        """When the next attempt is due (None: nothing to fetch)."""
        now = self.clock.now()
        times = [p.next_attempt or now for p in self._points.values()]
        return min(times) if times else None

    def _due(self) -> list[_Point]:
        now = self.clock.now()
        return [
            p
            for _, p in sorted(self._points.items())
            if p.next_attempt is None or p.next_attempt <= now
        ]

    def _after_success(self, point: _Point, crl: x509.CertificateRevocationList) -> datetime:
        now = self.clock.now()
        cap = timedelta(hours=self.refresh_hours.get(point.wanted.zone, DEFAULT_REFRESH_HOURS))
        wait = cap * self.rng.uniform(0.9, 1.0)
        floor = timedelta(seconds=MIN_REFRESH_SECONDS)
        if crl.next_update_utc is not None:
            left = crl.next_update_utc - now
            wait = min(wait, left * self.rng.uniform(0.5, 0.6))
            if left > timedelta(0):
                # A CRL that lapses sooner than the floor is still refreshed before its
                # nextUpdate (at half the time left), at most once a second; one already
                # lapsed waits the floor: no distribution point is asked in a tight loop.
                soonest = timedelta(seconds=SOONEST_REFRESH_SECONDS)
                floor = min(floor, max(left * 0.5, soonest))
        return now + max(wait, floor)

    def _after_failure(self, point: _Point) -> datetime:
        base = min(FIRST_RETRY_SECONDS * 2 ** min(point.failures - 1, 16), MAX_RETRY_SECONDS)
        return self.clock.now() + timedelta(seconds=base * self.rng.uniform(0.8, 1.2))

    # -- fetching -----------------------------------------------------------

    async def refresh_due(self, route: Callable[[str], Route] | None = None) -> list[FetchOutcome]:
        """Fetch every point that is due (a few at once, so that one slow point costs
        FETCH_SECONDS, not its share of all); what each attempt gave.  ``route``: a zone's
        route for these requests (default: the keeper's)."""
        slots = asyncio.Semaphore(PARALLEL_FETCHES)

        async def one(point: _Point) -> FetchOutcome:
            async with slots:
                return await self._refresh(point, route or self.route)

        return list(await asyncio.gather(*(one(p) for p in self._due())))

    async def _refresh(self, point: _Point, route: Callable[[str], Route]) -> FetchOutcome:
        wanted = point.wanted
        try:
            crl = await self.fetch(wanted, route)
        except CrlFetchError as exc:
            point.failures += 1
            point.last_error = exc.message
            point.next_attempt = self._after_failure(point)
            return FetchOutcome(wanted.zone, wanted.url, None, exc, point.next_attempt)
        point.failures = 0
        point.last_error = None
        changed = point.crl is None or crl.public_bytes(Encoding.DER) != point.crl.public_bytes(
            Encoding.DER
        )
        if changed:
            self._write_cache(wanted, crl)
            point.crl = crl
        point.next_attempt = self._after_success(point, crl)
        return FetchOutcome(
            wanted.zone, wanted.url, crl if changed else None, None, point.next_attempt
        )

    async def fetch(
        self, wanted: Wanted, route: Callable[[str], Route] | None = None
    ) -> x509.CertificateRevocationList:
        """One CRL from ``wanted.url`` through the zone's route, verified."""
        url = wanted.url
        timeout = aiohttp.ClientTimeout(total=FETCH_SECONDS)
        try:
            async with (
                (route or self.route)(wanted.zone).session(
                    timeout=timeout, force_close=True
                ) as session,
                session.get(url, allow_redirects=False) as reply,
            ):
                if reply.status != 200:
                    raise CrlFetchError(
                        f"the distribution point {url} answered HTTP {reply.status}"
                    )
                body = await read_capped(reply.content, MAX_CRL_BYTES)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, EgressRefused):
                raise CrlFetchError(
                    f"the distribution point {url} was not asked: {exc.os_error.message}",
                    fix="add the distribution point's address range to the zone's egress if it "
                    "is reached through this zone's network, or keep the zone's CRLs in `crls`",
                ) from None
            raise CrlFetchError(f"the distribution point {url} is unreachable ({exc})") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise CrlFetchError(f"the distribution point {url} is unreachable ({detail})") from None
        if len(body) > MAX_CRL_BYTES:
            raise CrlFetchError(
                f"the CRL from {url} is larger than {MAX_CRL_BYTES} bytes; not used"
            )
        return self.accept(wanted, body, source=url)

    def accept(self, wanted: Wanted, body: bytes, *, source: str) -> x509.CertificateRevocationList:
        """``body`` as the CRL of ``wanted`` if it is one, verified, current and not older
        than the one held; else :class:`CrlFetchError`."""
        try:
            found = parse_crls(body, source)
        except MedgwError as exc:
            raise CrlFetchError(f"{source} did not serve a CRL ({exc.message})") from None
        if len(found) != 1:
            raise CrlFetchError(f"{source} served {len(found)} CRLs where one was expected")
        crl = found[0]
        verify_crl(crl, wanted.issuers, wanted.url)
        now = self.clock.now()
        if crl.last_update_utc > now + SKEW:
            raise CrlFetchError(
                f"the CRL from {wanted.url} is dated {crl.last_update_utc:%Y-%m-%d %H:%M}Z, in "
                "the future; not used",
                fix="check this machine's clock",
            )
        held = self._points.get((wanted.zone, wanted.url))
        if (
            held is not None
            and held.crl is not None
            and crl.last_update_utc < (held.crl.last_update_utc)
        ):
            raise CrlFetchError(
                f"the CRL from {wanted.url} (thisUpdate {crl.last_update_utc:%Y-%m-%d %H:%M}Z) "
                "is older than the one held; not used",
                fix="check that the distribution point serves the CA's current CRL",
            )
        return crl

    # -- the cache ----------------------------------------------------------

    def _cache_path(self, wanted: Wanted) -> Path:
        digest = hashlib.sha256(wanted.url.encode()).hexdigest()[:32]
        return self.folder / wanted.zone / f"{digest}.crl"

    def _write_cache(self, wanted: Wanted, crl: x509.CertificateRevocationList) -> None:
        path = self._cache_path(wanted)
        private_folder(self.folder)
        private_folder(path.parent)
        write_atomic(path, [crl.public_bytes(Encoding.DER)], mode=0o600)

    def _read_cache(self, wanted: Wanted) -> x509.CertificateRevocationList | None:
        """The cached CRL of ``wanted``, verified again; None when there is none usable
        (missing, not a private regular file of ours, or over :data:`MAX_CRL_BYTES`:
        never read further than that)."""
        path = self._cache_path(wanted)
        try:
            body = read_private(path, MAX_CRL_BYTES)
        except (OSError, UnsafeFileError):
            return None
        if body is None or len(body) > MAX_CRL_BYTES:
            return None
        try:
            return self.accept(wanted, body, source=str(path))
        except CrlFetchError:
            return None
