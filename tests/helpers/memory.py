"""A daemon's memory, as the kernel counts it."""

from __future__ import annotations

from pathlib import Path


def peak_rss_kib(pid: int) -> int:
    """The peak resident memory (VmHWM) of process ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
