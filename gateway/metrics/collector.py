"""The gateway's metrics, in one registry per daemon (no global state).

Two kinds:

* counted as things happen, from the audit events the daemon records
  (:class:`MetricsSink`): retries, failed TLS handshakes by reason, receipt
  and end-to-end latency;
* read when Prometheus scrapes, from a :class:`Snapshot` the daemon builds
  then: messages by state and peer, certificate days to expiry, CRL age and
  time to nextUpdate, audit export backlog, spool size, readiness.

Label values are bounded: a peer label is a configured peer's name (anything
else is ``other``), a reason one of :data:`HANDSHAKE_REASONS`; no string a
remote party sent ever becomes a label.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.audit import AuditEvent, AuditSink, EventType, Pending
from gateway.audit.log import Then
from gateway.clock import Clock

OTHER = "other"  # the label of a peer that is not configured (now)
# Why a TLS handshake on a zone listener failed, from the TLS library's reason.
HANDSHAKE_REASONS = (
    "no_certificate",
    "certificate_expired",
    "certificate_revoked",
    "certificate_untrusted",
    "protocol_version",
    "no_shared_cipher",
    "other",
    "repeated",  # beyond the failures audited one by one per address (counted in summaries)
)
_REASON_WORDS = (
    ("certificate_expired", ("expired", "not yet valid")),
    ("certificate_revoked", ("revoked",)),
    ("no_certificate", ("peer did not return a certificate", "no certificate")),
    (
        "certificate_untrusted",
        ("unable to get", "self-signed", "self signed", "verify failed", "unknown ca", "issuer"),
    ),
    ("protocol_version", ("version", "protocol")),
    ("no_shared_cipher", ("cipher", "group", "sigalg", "signature algorithm")),
)
# Seconds: a receipt or a whole exchange takes from well under a second (a synchronous
# receipt on a LAN) to hours (an asynchronous receipt, a peer down for a while).
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
MAX_TRACKED = 100_000  # messages whose send time is remembered for the receipt latency


def handshake_reason(reason: str | None) -> str:
    """The fixed label for a TLS library's failure text."""
    text = (reason or "").lower()
    for label, words in _REASON_WORDS:
        if any(word in text for word in words):
            return label
    return "other"


@dataclass(frozen=True)
class Certificate:
    owner: str  # "self" (our own) or the peer's name
    use: str  # "tls", "signing", "encryption"
    sha256: str  # a short fingerprint prefix: several certificates per use in a rotation
    not_after: datetime


@dataclass(frozen=True)
class Crl:
    zone: str
    issuer: str  # the CA's subject: a trust anchor the configuration names
    this_update: datetime
    next_update: datetime | None
    fetched: bool  # kept by the daemon from a distribution point (else from `crls` files)


@dataclass(frozen=True)
class Snapshot:
    """What the daemon holds now, read at each scrape."""

    messages: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (peer, state)
    certificates: Sequence[Certificate] = ()
    crls: Sequence[Crl] = ()
    export_backlog_bytes: int | None = None  # None: no [audit.export]
    spool_bytes: int | None = None  # the spool database's size (None: not read yet)
    not_ready: Sequence[str] = ()  # why the gateway is not ready (empty: ready)
    node: str = ""  # this node's name ([cluster] node_name; empty: not yet known)


class GatewayMetrics:
    """The registry of one daemon: counters and histograms, and the snapshot gauges."""

    def __init__(
        self,
        clock: Clock,
        snapshot: Callable[[], Snapshot],
        peers: Callable[[], Collection[str]],
    ) -> None:
        """``peers``: the names of the configured peers (called for every event: a set kept
        while the configuration stays the same)."""
        self._clock = clock
        self._peers = peers
        self.registry = CollectorRegistry(auto_describe=True)
        self.retries = Counter(
            "medgw_send_retries",
            "Sends that failed and will be retried, by peer",
            ["peer"],
            registry=self.registry,
        )
        self.handshake_failures = Counter(
            "medgw_tls_handshake_failures",
            "Failed TLS handshakes on the zone listeners, by listener and reason",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.messages_total = Counter(
            "medgw_messages",
            "Messages by direction (outbound: taken in, delivered, failed; inbound: "
            "received, rejected) and peer",
            ["direction", "event", "peer"],
            registry=self.registry,
        )
        self.receipt_seconds = Histogram(
            "medgw_receipt_latency_seconds",
            "From a message's send to its verified receipt, by peer",
            ["peer"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            "medgw_end_to_end_latency_seconds",
            "From a message's intake to its verified receipt, by peer",
            ["peer"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(clock, snapshot, self.peer_label))
        self._lock = threading.Lock()
        self._taken_in: OrderedDict[str, datetime] = OrderedDict()
        self._sent: OrderedDict[str, datetime] = OrderedDict()
        # Each metric's child per label values (prometheus_client's labels() costs more
        # than the count itself); as bounded as the labels are.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def peer_label(self, name: str | None) -> str:
        return name if name is not None and name in self._peers() else OTHER

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, event: AuditEvent) -> None:
        """Count what ``event`` says happened."""
        kind = event.event
        if kind is EventType.TLS_HANDSHAKE_FAILED:
            listener = str(event.detail.get("listener", ""))[:64] or "unknown"
            held_back = event.detail.get("not_recorded_one_by_one")
            if isinstance(held_back, int):
                self._child(self.handshake_failures, listener, "repeated").inc(held_back)
            else:
                reason = handshake_reason(event.reason)
                self._child(self.handshake_failures, listener, reason).inc()
            return
        peer = self.peer_label(event.peer)
        if kind is EventType.MESSAGE_SEND_FAILED:
            self._child(self.retries, peer).inc()
        elif kind is EventType.MESSAGE_ACCEPTED and event.message_id:
            self._child(self.messages_total, "outbound", "accepted", peer).inc()
            self._remember(self._taken_in, event.message_id, self._clock.now())
        elif kind is EventType.MESSAGE_SENT and event.message_id:
            self._remember(self._sent, event.message_id, self._clock.now())
        elif kind is EventType.RECEIPT_RECEIVED and event.message_id:
            now = self._clock.now()
            self._child(self.messages_total, "outbound", "delivered", peer).inc()
            with self._lock:
                sent = self._sent.pop(event.message_id, None)
                taken_in = self._taken_in.pop(event.message_id, None)
            if sent is not None:
                self._child(self.receipt_seconds, peer).observe((now - sent).total_seconds())
            if taken_in is not None:
                self._child(self.end_to_end_seconds, peer).observe((now - taken_in).total_seconds())
        elif kind in (EventType.MESSAGE_FAILED, EventType.MESSAGE_DEAD, EventType.MESSAGE_EXPIRED):
            self._child(self.messages_total, "outbound", kind.value.split(".")[1], peer).inc()
        elif kind is EventType.MESSAGE_RECEIVED:
            self._child(self.messages_total, "inbound", "received", peer).inc()
        elif kind is EventType.MESSAGE_REJECTED:
            self._child(self.messages_total, "inbound", "rejected", peer).inc()

    def _remember(self, table: OrderedDict[str, datetime], message_id: str, at: datetime) -> None:
        with self._lock:
            table.setdefault(message_id, at)
            while len(table) > MAX_TRACKED:
                table.popitem(last=False)


class MetricsSink:
    """An audit sink that counts each event, then passes it on."""

    def __init__(self, inner: AuditSink, metrics: GatewayMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def emit(self, event: AuditEvent) -> None:
        self._inner.emit(event)
        self._metrics.observe(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self._inner.emit_all(events)
        for event in events:
            self._metrics.observe(event)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        kept = tuple(events)

        def observe() -> None:
            for event in kept:
                self._metrics.observe(event)

        return Then(self._inner.emit_later(kept), observe)


class _SnapshotCollector(Collector):
    def __init__(
        self,
        clock: Clock,
        snapshot: Callable[[], Snapshot],
        peer_label: Callable[[str | None], str],
    ) -> None:
        self._clock = clock
        self._snapshot = snapshot
        self._peer_label = peer_label

    def collect(self) -> Iterator[Metric]:
        now = self._clock.now()
        snap = self._snapshot()
        queue = GaugeMetricFamily(
            "medgw_outbound_messages",
            "Outbound messages in the spool, by peer and state",
            labels=["peer", "state"],
        )
        by_label: dict[tuple[str, str], int] = {}
        for (peer, state), count in snap.messages.items():
            key = (self._peer_label(peer), state)
            by_label[key] = by_label.get(key, 0) + count
        for (peer, state), count in sorted(by_label.items()):
            queue.add_metric([peer, state], count)
        yield queue
        days = GaugeMetricFamily(
            "medgw_certificate_expiry_days",
            "Days until a configured certificate expires (negative: expired), ours "
            "(owner=self, with the CA certificates sent with them: use=ca) and the peers'",
            labels=["owner", "use", "sha256"],
        )
        for cert in snap.certificates:
            remaining = (cert.not_after - now).total_seconds() / 86400
            days.add_metric([cert.owner, cert.use, cert.sha256], round(remaining, 3))
        yield days
        age = GaugeMetricFamily(
            "medgw_crl_age_seconds",
            "Seconds since the thisUpdate of each CRL in use, by zone and issuer",
            labels=["zone", "issuer", "source"],
        )
        left = GaugeMetricFamily(
            "medgw_crl_next_update_seconds",
            "Seconds until the nextUpdate of each CRL in use (negative: stale)",
            labels=["zone", "issuer", "source"],
        )
        for crl in snap.crls:
            labels = [crl.zone, crl.issuer, "fetched" if crl.fetched else "file"]
            age.add_metric(labels, (now - crl.this_update).total_seconds())
            if crl.next_update is not None:
                left.add_metric(labels, (crl.next_update - now).total_seconds())
        yield age
        yield left
        if snap.export_backlog_bytes is not None:
            yield GaugeMetricFamily(
                "medgw_audit_export_backlog_bytes",
                "Bytes of audit records waiting for the collector of [audit.export]",
                value=snap.export_backlog_bytes,
            )
        if snap.spool_bytes is not None:
            yield GaugeMetricFamily(
                "medgw_spool_bytes",
                "Size of the spool database on disk: SQLite's file with its write-ahead "
                "log, or PostgreSQL's pg_database_size",
                value=snap.spool_bytes,
            )
        if snap.node:
            info = GaugeMetricFamily(
                "medgw_node_info",
                "Always 1, labelled with this node's name ([cluster] node_name)",
                labels=["node"],
            )
            info.add_metric([snap.node], 1)
            yield info
        yield GaugeMetricFamily(
            "medgw_ready",
            "1 when listeners, spool and trust are up and the last reload succeeded",
            value=0 if snap.not_ready else 1,
        )
