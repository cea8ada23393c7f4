"""Backups safe to carry out (OUT-1): a signed, encrypted bundle of the gateway's state."""
