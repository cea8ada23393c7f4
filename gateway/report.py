"""Human-readable summaries of a configuration for ``check-config``."""

from __future__ import annotations

from cryptography import x509

from gateway.config import GatewayConfig
from gateway.routing import egress_text, proof


def _cert_line(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def describe_config(config: GatewayConfig) -> str:
    lines = [
        f"gateway  {config.name}  AS2 id {config.as2_id}",
        f"  TLS      {_cert_line(config.tls.identity.certificate)}; "
        "client certificates required (trust and TLS version per zone)",
        f"  signing  {_cert_line(config.smime.signing.certificate)}",
        f"  decrypt  {_cert_line(config.smime.encryption.certificate)}",
        "zones",
    ]
    for zone in config.zones:
        lines.append(
            f"  {zone.name:<16} {zone.kind}; source address "
            f"{zone.source_address or '(chosen by the OS)'}; egress {egress_text(zone)}"
        )
        lines.append(
            f"  {'':<16} TLS >= {zone.min_version}, revocation {zone.revocation}, trust anchors: "
            + "; ".join(c.subject.rfc4514_string() for c in zone.trust_anchors)
        )
    lines.append("listeners (all HTTPS with mutual TLS; no plaintext listener exists)")
    for listener in config.listeners:
        lines.append(
            f"  {listener.name:<16} https://{listener.address}:{listener.port}{listener.path}"
            f"  zone {listener.zone}"
        )
    lines += _internal_side(config)
    lines.append("peers")
    for peer in config.peers:
        lines.append(f"  {peer.name:<16} AS2 id {peer.as2_id:<20} {peer.url}  zone {peer.zone}")
        lines.append(
            f"  {'':<16} cipher {peer.cipher}, digest {peer.digest}, "
            f"key transport {peer.key_transport}"
            + (
                f", ACCEPTS LEGACY: {', '.join(sorted(peer.accept_legacy))}"
                if peer.accept_legacy
                else ""
            )
        )
    if not config.peers:
        lines.append("  (none: add one file per peer in peers.d/)")
    lines.append("")
    lines.append(proof_table(config))
    return "\n".join(lines)


def _internal_side(config: GatewayConfig) -> list[str]:
    """The gateway's internal side: the local API and the hand-over targets."""
    lines = ["internal side (this host and the hospital's own systems, never a zone)"]
    if config.api is None:
        lines.append("  local API        off (no [api]): internal systems use the outbox folder")
    else:
        lines.append(
            f"  local API        {', '.join(config.api.endpoints())} "
            "(plain HTTP on this host only; each client a bearer token)"
        )
        for client in config.api.clients:
            lines.append(f"  {'':<16} client {client.name}: may send to {', '.join(client.peers)}")
    delivery = config.delivery
    targets = [("all documents", delivery.http_url)] if delivery and delivery.http_url else []
    targets += [(f"service {s.name}", s.http_url) for s in (delivery.services if delivery else ())]
    if not targets:
        lines.append("  hand-over        off (no [delivery]): documents stay in the inbox folder")
    for what, url in targets:
        lines.append(f"  hand-over        {what}: {url or 'inbox folder only'}")
    return lines


def proof_table(config: GatewayConfig) -> str:
    """NET-1 / NET-4 as a table: each rule, whether it holds, and the evidence (NET-8)."""
    rows = proof(config)
    check_width = max(len(r.check) for r in rows)
    header = f"{'req':<6} {'check':<{check_width}}  {'result':<8} evidence"
    lines = ["network separation proof (NET-8: NET-1 and NET-4 hold)", header, "-" * len(header)]
    for row in rows:
        result = "holds" if row.holds else "VIOLATED"
        for index, evidence in enumerate(row.evidence):
            if index == 0:
                lines.append(
                    f"{row.requirement:<6} {row.check:<{check_width}}  {result:<8} {evidence}"
                )
            else:
                lines.append(f"{'':<6} {'':<{check_width}}  {'':<8} {evidence}")
    zone_header = f"{'zone':<16} {'kind':<15} {'TLS':<6} {'revocation':<10} peers"
    lines += ["", "zone TLS profiles", zone_header, "-" * len(zone_header)]
    for zone in config.zones:
        peers = ", ".join(p.name for p in config.peers if p.zone == zone.name) or "-"
        lines.append(
            f"{zone.name:<16} {zone.kind:<15} {'>= ' + zone.min_version:<6} "
            f"{zone.revocation:<10} {peers}"
        )
    return "\n".join(lines)
