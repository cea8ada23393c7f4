"""Configuration: TOML files -> typed, frozen dataclasses.

An installation has one ``gateway.toml`` (this institution) and a folder
``peers.d/`` with one ``<peer>.toml`` per peer institution; the file's stem is
the peer's name.  Relative paths inside a file are resolved against the folder
of ``gateway.toml``.

Loading never stops at the first mistake: every problem found is collected as
a :class:`~gateway.errors.ConfigProblem` naming the file, the key and the fix,
and :class:`~gateway.errors.ConfigError` carries all of them.  Unknown keys are
errors, because a misspelt security option silently falling back to a default
is exactly the surprise an administrator must not get.

The parts:

* :mod:`~gateway.config.load` -- :func:`load_config`: reads the sections in
  order, then the rules that span them;
* :mod:`~gateway.config.model` -- :class:`GatewayConfig`, the whole loaded
  configuration;
* one module per section, each with its frozen dataclass and its reader:
  :mod:`~gateway.config.identity` (``[gateway]``, ``[tls]``),
  :mod:`~gateway.config.zones`, :mod:`~gateway.config.listeners`,
  :mod:`~gateway.config.smime`, :mod:`~gateway.config.storage`,
  :mod:`~gateway.config.runtime`, :mod:`~gateway.config.api`,
  :mod:`~gateway.config.delivery`, :mod:`~gateway.config.audit`,
  :mod:`~gateway.config.responsible`, :mod:`~gateway.config.metrics`,
  :mod:`~gateway.config.emergency`, :mod:`~gateway.config.cluster`,
  :mod:`~gateway.config.retention`
  (``[retention]``, applied by :mod:`gateway.retention`),
  :mod:`~gateway.config.maintenance` (``[maintenance]`` and ``maintainers.d/``),
  and the peer files: :mod:`~gateway.config.peers` with
  :mod:`~gateway.config.peer_algorithms`;
* :mod:`~gateway.config.network_rules` -- the rules across sections (NET-4).

Typed values, and the problems a key can have, are read with
:mod:`gateway.tomlreader`.  ``[audit.export]`` is read by
:mod:`gateway.audit.export.settings`, beside the exporter that uses it (the audit
trail sits below the configuration and knows nothing of it).
"""

from gateway.config.api import ApiClient, ApiSettings
from gateway.config.delivery import DeliverySettings, ServiceDelivery
from gateway.config.identity import TlsSettings
from gateway.config.listeners import Listener
from gateway.config.load import load_config
from gateway.config.metrics import MetricsSettings
from gateway.config.model import GatewayConfig
from gateway.config.peers import SERVICE_NAME, Peer
from gateway.config.responsible import Responsible, who_to_call
from gateway.config.runtime import Runtime
from gateway.config.smime import SmimeSettings
from gateway.config.storage import Storage
from gateway.config.zones import Zone

__all__ = [
    "SERVICE_NAME",
    "ApiClient",
    "ApiSettings",
    "DeliverySettings",
    "GatewayConfig",
    "Listener",
    "MetricsSettings",
    "Peer",
    "Responsible",
    "Runtime",
    "ServiceDelivery",
    "SmimeSettings",
    "Storage",
    "TlsSettings",
    "Zone",
    "load_config",
    "who_to_call",
]
