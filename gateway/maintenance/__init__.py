"""Accountable remote maintenance over SSH: personal accounts with a second factor,
a restricted command set, every session in the audit trail (NET-7, MNT-1 to MNT-4)."""
