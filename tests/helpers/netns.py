"""Two hosts on a wire: Linux network namespaces joined by a veth pair.

For tests of what a peer sees when the host at the other end vanishes (crashed,
powered off, unplugged): :meth:`Wire.cut` takes the far end's interface down, so
nothing it sends leaves and nothing sent to it is answered, not even with a reset.
Needs root and ``ip netns`` (Debian's iproute2; CI installs it and runs as root);
skipped, saying why, where that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Wire:
    """The namespaces ``near`` and ``far``, each with its end of the wire up at its address
    (one /24) and its own loopback."""

    near: str
    far: str
    near_address: str
    far_address: str
    far_device: str

    @staticmethod
    def exec(ns: str) -> tuple[str, ...]:
        """The command prefix that runs a program in namespace ``ns``."""
        return ("ip", "netns", "exec", ns)

    def cut(self) -> None:
        """The far host vanishes: its end of the wire goes down, without a word."""
        _ip("-n", self.far, "link", "set", self.far_device, "down")


@contextlib.contextmanager
def wire(near_address: str, far_address: str) -> Iterator[Wire]:
    """Two new namespaces on a wire, deleted after (with their interfaces); a program
    still running in one keeps it until it ends, so stop them first."""
    if sys.platform != "linux":
        pytest.skip("network namespaces need Linux")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (Debian package iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CI runs as root)")
    tag = f"{os.getpid() % 10_000_000}"
    near, far = f"mgwn{tag}", f"mgwf{tag}"
    near_device, far_device = f"mwn{tag}", f"mwf{tag}"
    created: list[str] = []
    try:
        try:
            for ns in (near, far):
                _ip("netns", "add", ns)
                created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", near_device, "type", "veth", "peer", "name", far_device)
            for ns, device, address in (
                (near, near_device, near_address),
                (far, far_device, far_address),
            ):
                _ip("link", "set", device, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", device)
                _ip("-n", ns, "link", "set", device, "up")
        except RuntimeError as exc:
            pytest.skip(f"network namespaces are not available here: {exc}")
        yield Wire(near, far, near_address, far_address, far_device)
    finally:
        # A namespace's veth end goes with it, and the peer end with that.
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", near_device], capture_output=True, check=False)
