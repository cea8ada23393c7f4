"""Retention and disposal of what the gateway keeps after a message is finished (DSP-1)."""
