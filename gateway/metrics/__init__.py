"""What the monitoring team sees: Prometheus metrics and health endpoints on a local
address (``[metrics]``), never on a zone listener."""
