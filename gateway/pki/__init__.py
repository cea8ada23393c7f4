"""PKI: trust stores, chain validation, revocation, peer identity, TLS contexts.

``gateway.pki.issue`` creates keys and certificates (demo and tests);
``gateway.pki.demo`` lays out a two-institution demo installation.
"""
