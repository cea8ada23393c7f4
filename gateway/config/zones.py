"""``[[zones]]``: the networks the gateway is attached to, and how each is trusted (NET-4)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.egress import ZonePath
from gateway.errors import MedgwError
from gateway.pki.store import describe, load_crls
from gateway.routing import Network
from gateway.tomlreader import Reader, Section

ZONE_KINDS = ("closed-network", "ip-vpn", "internet")
REVOCATION_POLICIES = ("require", "prefer", "off")


@dataclass(frozen=True)
class Zone:
    """One network the gateway is attached to (``[[zones]]``); see gateway.routing."""

    name: str
    kind: str  # "closed-network", "ip-vpn" or "internet"
    source_address: str | None  # outbound connections of this zone leave from it
    egress: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # where its peers live
    trust_anchor_paths: tuple[Path, ...]
    trust_anchors: tuple[x509.Certificate, ...]
    min_version: str  # "1.2" or "1.3"
    revocation: str  # "require", "prefer" or "off"
    crl_paths: tuple[Path, ...] = ()  # files or folders, maintained by the administrator
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    ocsp: bool = False  # ask the responders named in the certificates (AIA)
    crl_warn_days: int = 7  # alarm this many days before a CRL's nextUpdate
    # Download the CRLs named in the peers' certificates (gateway.pki.crlfetch) ...
    fetch_crls: bool = False
    crl_refresh_hours: int = 6  # ... at least this often
    # ... and the ones held now: set by the daemon, never read from a file.
    fetched_crls: tuple[x509.CertificateRevocationList, ...] = ()
    # Ranges taken out of ``egress`` as written (``egress`` is what is left).
    egress_except: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def crls_in_use(self) -> tuple[x509.CertificateRevocationList, ...]:
        """The CRLs paths are judged by: the files of ``crls`` and those fetched."""
        return (*self.crls, *self.fetched_crls)

    @property
    def network(self) -> ZonePath:
        """The zone's way out, for everything sent on its behalf (NET-4)."""
        return ZonePath(self.source_address, self.egress)


def load_zones(reader: Reader, root: Section) -> list[Zone]:
    """The ``[[zones]]`` tables, in file order (NET-4: every peer is in exactly one)."""
    zones: list[Zone] = []
    missing = (
        "no [[zones]] table: every listener and every peer must belong to a network zone",
        "add one [[zones]] table per network this gateway is attached to (see the example "
        'config/gateway.toml), then `zone = "<name>"` in each [[listeners]] and each peer file',
    )
    for item in root.tables("zones", missing=missing):
        name = item.string("name", example='"regional-vpn"')
        kind = item.string("kind", example=f'"{ZONE_KINDS[1]}"')
        if kind and kind not in ZONE_KINDS:
            item.problem(
                "kind",
                f"{kind!r} is not one of {', '.join(ZONE_KINDS)}",
                f"set kind to one of: {', '.join(ZONE_KINDS)}",
            )
        source_address = item.string("source_address", default="") or None
        if source_address is not None:
            try:
                source_ip = ipaddress.ip_address(source_address)
            except ValueError:
                item.problem(
                    "source_address",
                    f"{source_address!r} is not an IP address",
                    "give this host's address on the zone's network, or remove the key",
                )
            else:
                if source_ip.is_unspecified:
                    item.problem(
                        "source_address",
                        f"{source_address} is the any-address, not an interface's",
                        "give this host's address on the zone's network, or remove the key",
                    )
        egress: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in item.string_list(
            "egress", empty_fix='name the ranges the zone\'s peers live in, e.g. ["10.20.0.0/16"]'
        ):
            try:
                egress.append(ipaddress.ip_network(entry, strict=True))
            except ValueError as exc:
                item.problem(
                    "egress",
                    f"{entry!r} is not an address range ({exc})",
                    'write CIDR ranges with the network address, e.g. "10.20.0.0/16"; '
                    'the whole internet is ["0.0.0.0/0", "::/0"]',
                )
        egress, egress_except = _egress_except(item, egress)
        anchor_paths = tuple(
            reader.path(p)
            for p in item.string_list(
                "trust_anchors", empty_fix="name the CA certificate file(s) of this zone's peers"
            )
        )
        anchors: list[x509.Certificate] = []
        for anchor_path in anchor_paths:
            for anchor in reader.certificates(item, "trust_anchors", anchor_path):
                if _is_ca(anchor):
                    anchors.append(anchor)
                    continue
                if anchor.issuer == anchor.subject:
                    # Self-issued: an X.509 v1 root (no basicConstraints at all), or a
                    # partner's self-signed certificate trusted as its own anchor.  Path
                    # validation accepts either; only the second is worth a word, and so
                    # is a v3 certificate without basicConstraints, which no CA certificate
                    # may be (RFC 5280 4.2.1.9).
                    anchors.append(anchor)
                    if _says_not_ca(anchor):
                        item.problem(
                            "trust_anchors",
                            f"{anchor_path} holds {describe(anchor)}, a self-signed "
                            "certificate that is not a CA certificate (basicConstraints cA "
                            "false): it is trusted as its own anchor, and it cannot be "
                            "revoked (no CA issues a CRL for it)",
                            "ask the partner for a certificate issued by a CA and put that "
                            "CA's root certificate here; until then keep the zone's "
                            "revocation as it is and replace this file when the partner's "
                            "certificate changes",
                            severity="warning",
                        )
                    elif anchor.version is not x509.Version.v1:
                        item.problem(
                            "trust_anchors",
                            f"{anchor_path} holds {describe(anchor)}, a self-signed "
                            "X.509 v3 certificate without basicConstraints, which RFC 5280 "
                            "(4.2.1.9) requires of every CA certificate: it is trusted as "
                            "its own anchor; if it is a partner's own certificate, it cannot "
                            "be revoked (no CA issues a CRL for it)",
                            "if it is your PKI's root, have the CA reissue it with "
                            "basicConstraints cA true; if it is a partner's own certificate, "
                            "ask for one issued by a CA and put that CA's root certificate "
                            "here, and until then replace this file when it changes",
                            severity="warning",
                        )
                    continue
                item.problem(
                    "trust_anchors",
                    f"{anchor_path} holds {describe(anchor)}, issued by "
                    f"{anchor.issuer.rfc4514_string()}, which is not a CA certificate "
                    "(its basicConstraints does not say cA): a trust anchor is the CA that "
                    "issues the peers' certificates, never a peer's own certificate",
                    "put the CA's root certificate here (the one that issued the peers' "
                    "certificates), and the peer's own certificate in its peers.d file",
                )
        min_version = item.choice("min_version", ("1.3", "1.2"), default="1.3")
        revocation = item.choice("revocation", REVOCATION_POLICIES, default="require")
        crl_paths = tuple(reader.path(p) for p in item.string_list("crls", required=False))
        crls: list[x509.CertificateRevocationList] = []
        for crl_path in crl_paths:
            try:
                crls.extend(load_crls(crl_path))
            except MedgwError as exc:
                item.problem("crls", exc.message, exc.fix or "give CRL files (PEM or DER)")
        ocsp = item.boolean("ocsp", default=False)
        crl_warn_days = item.integer("crl_warn_days", default=7, minimum=1, maximum=90)
        fetch_crls = item.boolean("fetch_crls", default=False)
        crl_refresh_hours = item.integer("crl_refresh_hours", default=6, minimum=1, maximum=168)
        if revocation == "require" and not crl_paths and not ocsp and not fetch_crls:
            item.problem(
                "revocation",
                'revocation = "require" but the zone has no `crls`, `fetch_crls = false` and '
                "`ocsp = false`: no certificate's status could ever be established, so every "
                "peer would be refused",
                "set `fetch_crls = true` (medgw downloads the CRLs the certificates name), "
                "list the CA's CRL files in `crls`, set `ocsp = true`, or, knowingly, "
                'revocation = "prefer"',
            )
        if revocation == "off":
            item.problem(
                "revocation",
                'revocation = "off": a revoked certificate of this zone\'s peers is still accepted',
                'set revocation = "require" with the CA\'s CRLs in `crls` (or `ocsp = true`), '
                'or at least "prefer"',
                "warning",
            )
        item.finish()
        zones.append(
            Zone(
                name=name,
                kind=kind,
                source_address=source_address,
                egress=tuple(egress),
                trust_anchor_paths=anchor_paths,
                trust_anchors=tuple(anchors),
                min_version=min_version,
                revocation=revocation,
                crl_paths=crl_paths,
                crls=tuple(crls),
                ocsp=ocsp,
                crl_warn_days=crl_warn_days,
                egress_except=tuple(egress_except),
                fetch_crls=fetch_crls,
                crl_refresh_hours=crl_refresh_hours,
            )
        )
    return zones


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _says_not_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries basicConstraints saying it is no CA (a v1 certificate,
    with no extensions, says nothing)."""
    try:
        return not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _egress_except(item: Section, egress: list[Network]) -> tuple[list[Network], list[Network]]:
    """``egress`` without the ranges of ``egress_except`` (each inside one of them), and
    those ranges: an internet zone's ["0.0.0.0/0"] less another zone's network."""
    excluded: list[Network] = []
    for entry in item.string_list("egress_except", required=False):
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            item.problem(
                "egress_except",
                f"{entry!r} is not an address range ({exc})",
                'write CIDR ranges with the network address, e.g. "10.20.0.0/16"',
            )
            continue
        if not any(r.version == network.version and network.subnet_of(r) for r in egress):  # type: ignore[arg-type]
            item.problem(
                "egress_except",
                f"{network} is not inside any of the egress ranges "
                f"({', '.join(str(r) for r in egress) or 'none'})",
                "list only ranges taken out of this zone's egress, or remove it",
            )
            continue
        excluded.append(network)
    if not excluded:
        return egress, []
    left: list[Network] = []
    for network in egress:
        parts = [network]
        for hole in excluded:
            rest: list[Network] = []
            for part in parts:
                if hole.version != part.version or not hole.overlaps(part):
                    rest.append(part)
                elif hole.subnet_of(part):  # type: ignore[arg-type]
                    rest.extend(part.address_exclude(hole))  # type: ignore[arg-type]
            parts = rest
        left.extend(parts)
    if not left:
        # An empty egress means "no ranges given" to the connect-time checks.
        item.problem(
            "egress_except",
            "takes out every address of the egress: the zone would reach nothing",
            "take out only the ranges of other networks, or remove the zone",
        )
        return egress, excluded
    v4 = [n for n in left if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in left if isinstance(n, ipaddress.IPv6Network)]
    collapsed: list[Network] = [*ipaddress.collapse_addresses(v4)]
    collapsed += ipaddress.collapse_addresses(v6)
    return collapsed, excluded
