"""medgw: a secure medical data exchange gateway (AS2 over mutual TLS, S/MIME)."""

__version__ = "0.1.0"
