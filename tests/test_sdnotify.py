"""The systemd notifications the daemon sends, to a real notification socket."""

from __future__ import annotations

from pathlib import Path

from gateway.sdnotify import Notifier
from tests.helpers.notify import NotifySocket


def test_once_stopping_no_ready_or_reloading_follows(tmp_path: Path) -> None:
    """A reload that ends during the drain (its READY) or one that begins then (its
    RELOADING) must not tell systemd that the stopping service runs again."""
    socket = NotifySocket(tmp_path / "notify.sock")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(socket.path)})
        notifier.ready("serving")
        notifier.reloading()
        notifier.stopping()
        notifier.ready("configuration reloaded")
        notifier.reloading()
        notifier.status("stopped")
    finally:
        socket.close()
    states = socket.states()
    assert [s for s in states if not s.startswith(("MAINPID", "STATUS"))] == [
        "READY=1",
        "RELOADING=1",
        "STOPPING=1",
    ], states
    assert states[-1] == "STATUS=stopped", states
