"""The ``medgw run`` daemon (see :mod:`gateway.daemon.lifecycle`)."""

from gateway.daemon.lifecycle import Daemon, RuntimeState, StartupError

__all__ = ["Daemon", "RuntimeState", "StartupError"]
