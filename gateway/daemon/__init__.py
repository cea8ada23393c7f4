"""The ``medgw run`` daemon, one module per job:

* ``lifecycle``: start, signals, ready, drain and stop (systemd ``Type=notify``);
* ``state``: the runtime state built from one configuration, swapped whole;
* ``trust``: the verdicts on the peers' certificates, and the alerts about them;
* ``reload``: SIGHUP and trust refreshes (build, validate, swap);
* ``as2_handler``: a peer's AS2 request, from the TLS certificate to the answer;
* ``sending``: outbox intake and one sender loop per peer;
* ``tasks``: background loops, supervised and stopped together;
* ``reports``: queued messages a configuration leaves stranded;
* ``export``: the audit export, by the configuration in force;
* ``crls``: the zones' CRLs from their distribution points, kept fresh;
* ``observe``: the metrics snapshot and readiness.
"""

from gateway.daemon.lifecycle import Daemon
from gateway.daemon.state import RuntimeState, StartupError

__all__ = ["Daemon", "RuntimeState", "StartupError"]
