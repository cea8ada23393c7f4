"""``medgw diagnose PEER``: check each segment of the path to a peer, name the one that fails.

The steps run in order and stop at the first failure (NET-6 "isolating the
failed segment"):

1. ``resolve``: name resolution of the host in the peer's URL;
2. ``tcp``: a TCP connection to it (refused, timed out and unreachable mean
   different things);
3. ``tls``: the mutual-TLS handshake with the same client context the daemon
   uses (trust anchors, pinning, host name), followed by one HTTP request,
   because with TLS 1.3 a server that refuses our certificate says so only
   after the client has finished its handshake.  "We rejected the peer's
   certificate", "the peer rejected ours" and "no common protocol or cipher"
   are told apart;
4. ``certificates``: the validity windows and purposes of our certificates
   and of the ones configured for the peer (expiring within 30 days is a
   warning);
5. ``as2``: a small signed and encrypted test document (the *probe*), whose
   signed receipt must verify, be for that message, say ``processed`` and
   carry the MIC we computed.

The probe is named ``medgw-diagnose-<UTC time>.txt`` and carries the HTTP
header ``X-Medgw-Probe: 1``.  A medgw receiver verifies it like any message,
audits it as ``probe.received`` and answers with a normal signed receipt, but
does not deliver it to its inbox.  Other AS2 products deliver the small text
file; it can be deleted there.

Every step returns a :class:`StepResult`; the result of a step that fails
carries what it means and what to do, for an administrator on call.  Time
comes from an injected :class:`~gateway.clock.Clock`.

One module per segment: ``network`` (steps 1-2), ``tls`` (3), ``certificates`` (4),
``probe`` (5); ``result`` holds what they return.
"""

from __future__ import annotations

import socket

from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.diagnose.certificates import CertificateSteps
from gateway.diagnose.network import NetworkSteps
from gateway.diagnose.probe import ProbeSteps
from gateway.diagnose.result import STEP_AREAS, STEPS, Diagnosis, Status, StepResult
from gateway.diagnose.tls import TlsSteps

__all__ = ["STEPS", "STEP_AREAS", "Diagnoser", "Diagnosis", "Status", "StepResult", "diagnose"]


class Diagnoser(NetworkSteps, TlsSteps, CertificateSteps, ProbeSteps):
    """Runs the steps for one peer with this gateway's configuration."""

    async def run(self) -> Diagnosis:
        steps: list[StepResult] = []
        addresses: list[str] = []
        # Step 3 upgrades the connection step 2 opened: no bare TCP connection is left
        # for the peer to log as a failed handshake.
        connection: socket.socket | None = None

        async def resolve() -> StepResult:
            nonlocal addresses
            result, addresses = await self.resolve()
            return result

        async def connect() -> StepResult:
            nonlocal connection
            result, connection = await self.connect(addresses)
            return result

        async def handshake() -> StepResult:
            assert connection is not None
            return await self.handshake(connection)

        async def certificates() -> StepResult:
            result = self.certificates()
            if result.status is Status.FAIL:
                return result
            refused = await self.peer_trust()
            if refused is None or (refused.status is Status.WARN and result.status is Status.WARN):
                return result
            return refused

        plan = (
            ("resolve", resolve),
            ("tcp", connect),
            ("tls", handshake),
            ("certificates", certificates),
            ("as2", self.probe),
        )
        failed: StepResult | None = None
        try:
            for name, step in plan:
                if failed is not None:
                    skipped = f"not run: step {failed.number} ({failed.title}) failed"
                    steps.append(StepResult(name, Status.SKIP, skipped))
                    continue
                result = await step()
                steps.append(result)
                if result.status is Status.FAIL:
                    failed = result
        finally:
            if connection is not None:
                connection.close()
        return Diagnosis(self._peer.name, self._peer.as2_id, self._peer.url, tuple(steps))


async def diagnose(config: GatewayConfig, peer: Peer, clock: Clock) -> Diagnosis:
    return await Diagnoser(config, peer, clock).run()
