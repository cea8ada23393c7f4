"""Delivery of received documents to the internal side."""
