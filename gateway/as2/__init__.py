"""AS2 (RFC 4130) messages and MDN receipts (RFC 8098): building and parsing, no I/O."""
