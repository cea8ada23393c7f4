"""Human-readable summaries of a configuration for ``check-config``."""

from __future__ import annotations

from cryptography import x509

from gateway.config import GatewayConfig


def _cert_line(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def describe_config(config: GatewayConfig) -> str:
    lines = [
        f"gateway  {config.name}  AS2 id {config.as2_id}",
        f"  TLS      {_cert_line(config.tls.identity.certificate)}; "
        f"TLS >= {config.tls.min_version}, client certificates required",
        f"  signing  {_cert_line(config.smime.signing.certificate)}",
        f"  decrypt  {_cert_line(config.smime.encryption.certificate)}",
        "listeners (all HTTPS with mutual TLS; no plaintext listener exists)",
    ]
    for listener in config.listeners:
        lines.append(
            f"  {listener.name:<16} https://{listener.address}:{listener.port}{listener.path}"
        )
    lines.append("peers")
    for peer in config.peers:
        lines.append(f"  {peer.name:<16} AS2 id {peer.as2_id:<20} {peer.url}")
        lines.append(
            f"  {'':<16} cipher {peer.cipher}, digest {peer.digest}"
            f"{', COMPAT (monitored algorithms accepted inbound)' if peer.compat else ''}"
        )
    if not config.peers:
        lines.append("  (none: add one file per peer in peers.d/)")
    return "\n".join(lines)
