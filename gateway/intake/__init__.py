"""Local intake: how internal systems hand documents to the gateway."""
