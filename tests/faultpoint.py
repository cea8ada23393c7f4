"""Run a command of ``python -m <module>`` that SIGKILLs itself at one named point.

For crash tests that must stop a daemon at an exact place in the code, not by
luck.  It is a wrapper, used as the command prefix of a test's ``medgw run``
(:class:`gateway.demo_run.GatewayProcess`)::

    python tests/faultpoint.py --kill-after gateway.delivery.inbox:finish -- \\
        python -m gateway run --config gateway.toml

It replaces the named function, in this process only, with one that calls it
and then kills the process (``--kill-after``), or kills it before the call
(``--kill-before``), or makes its first call fail with an I/O error
(``--fail-once``), or makes each call fail so until a file exists (``--fail-until``
with ``--until-file PATH``: each failed call adds a line to ``PATH.failed``), or
holds its first call until a file exists (``--hold-before`` with ``--until-file
PATH``: ``PATH.reached`` is created when the call is held), or makes each call
refused by the gateway's own checks (PolicyError, as a signing key the policy no
longer takes) until a file exists (``--refuse-until`` with ``--until-file PATH``);
``--kill-after-event NAME`` kills it right after the audit
record of event NAME is written; ``--fail-once-at-event NAME`` makes the first
write of that record fail instead (as on a full disk); ``--group-of N`` makes the
receiver's first group of receipts wait until N documents wait to be stored in it;
``--clock-ahead SECONDS`` sets the process's wall clock (gateway.clock.SystemClock)
that far ahead of the host's (a node whose clock is wrong).
The product has no hook of its own: this file is not part of the installed package,
and nothing an administrator sets can make a ``medgw`` process stop like this.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import runpy
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

HOLD_SECONDS = 120.0  # a held call goes on after this long, whatever the test does


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(spec: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``spec`` ``package.module:Name[.attr]``: replace that function with ``wrap(it)``."""
    module_name, _, path = spec.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)  # AttributeError: the fault point no longer exists
    setattr(owner, name, functools.wraps(original)(wrap(original)))


def _after(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        _kill()

    return call


def _before(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        _kill()

    return call


def _fail_once(original: Callable[..., Any]) -> Callable[..., Any]:
    failed: list[bool] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise OSError(errno.EIO, "Input/output error (faultpoint.py)")
        return original(*args, **kwargs)

    return call


def _io_error() -> Exception:
    return OSError(errno.EIO, "Input/output error (faultpoint.py)")


def _refused() -> Exception:
    from gateway.errors import PolicyError

    return PolicyError(
        "RSA-1024", "the signing key is refused (faultpoint.py)", fix="use a longer key"
    )


def _fail_until(
    path: Path, error: Callable[[], Exception] = _io_error
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every call fails with ``error()`` (an I/O error, as a failing disk's) until ``path``
    exists; each one failed adds a line to ``path``.failed."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not path.exists():
                with path.with_name(path.name + ".failed").open("a") as failed:
                    failed.write(f"{getattr(original, '__qualname__', original)}\n")
                raise error()
            return original(*args, **kwargs)

        return call

    return wrap


def _hold_until(path: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The first call waits (in its own thread) until ``path`` exists, at most
    HOLD_SECONDS; ``path``.reached says it is waiting."""
    held: list[bool] = []

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not held:
                held.append(True)
                path.with_name(path.name + ".reached").touch()
                deadline = time.monotonic() + HOLD_SECONDS
                while not path.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            return original(*args, **kwargs)

        return call

    return wrap


def _after_event(event: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Patches AuditLog._wait, which every emit (and every wait for a record written
    before) goes through: killed once the records written together with one of
    ``event`` are durable."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def wait(self: Any, ticket: Any, owed: Any, records: Any, now: Any) -> None:
            original(self, ticket, owed, records, now)
            if any(record.event.value == event for record in records):
                _kill()

        return wait

    return wrap


def _fail_once_at_event(event: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The first audit write with a record of ``event`` writes nothing: it raises, as on a
    full disk (so do the records written together with it).  Patches AuditLog._write_all,
    where a write to the file fails: the log handles it as its own."""
    failed: list[bool] = []

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def write_all(self: Any, records: Any) -> None:
            if not failed and any(record["event"] == event for record in records):
                failed.append(True)
                raise OSError(errno.ENOSPC, "No space left on device (faultpoint.py)")
            original(self, records)

        return write_all

    return wrap


def _group_of(count: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Patches ReceiptGroups._company (gateway.inbound.settling), which takes the next
    group of receipts to store: the first group is taken once ``count`` documents wait
    (at most HOLD_SECONDS), so that it holds them all."""
    taken: list[bool] = []

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def company(self: Any) -> Any:
            if not taken:
                taken.append(True)
                with self._changed:  # told of each document handed in
                    self._changed.wait_for(lambda: len(self._waiting) >= count, HOLD_SECONDS)
            return original(self)

        return company

    return wrap


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", metavar="MODULE:FUNCTION")
    parser.add_argument("--kill-before", metavar="MODULE:FUNCTION")
    parser.add_argument("--fail-once", metavar="MODULE:FUNCTION")
    parser.add_argument("--fail-until", metavar="MODULE:FUNCTION")
    parser.add_argument("--hold-before", metavar="MODULE:FUNCTION")
    parser.add_argument("--refuse-until", metavar="MODULE:FUNCTION")
    parser.add_argument("--until-file", metavar="PATH", type=Path)
    parser.add_argument("--kill-after-event", metavar="EVENT")
    parser.add_argument("--fail-once-at-event", metavar="EVENT")
    parser.add_argument("--group-of", metavar="N", type=int)
    parser.add_argument("--clock-ahead", metavar="SECONDS", type=float)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.kill_after:
        _patch(args.kill_after, _after)
    if args.kill_before:
        _patch(args.kill_before, _before)
    if args.fail_once:
        _patch(args.fail_once, _fail_once)
    if args.fail_until:
        _patch(args.fail_until, _fail_until(args.until_file))
    if args.refuse_until:
        _patch(args.refuse_until, _fail_until(args.until_file, _refused))
    if args.hold_before:
        _patch(args.hold_before, _hold_until(args.until_file))
    if args.kill_after_event:
        _patch("gateway.audit.log:AuditLog._wait", _after_event(args.kill_after_event))
    if args.fail_once_at_event:
        failing = _fail_once_at_event(args.fail_once_at_event)
        _patch("gateway.audit.log:AuditLog._write_all", failing)
    if args.group_of:
        _patch("gateway.inbound.settling:ReceiptGroups._company", _group_of(args.group_of))
    if args.clock_ahead:
        ahead = timedelta(seconds=args.clock_ahead)
        _patch("gateway.clock:SystemClock.now", lambda now: lambda self: now(self) + ahead)
    # The command: python -m MODULE ARGS...
    at = command.index("-m")
    module, rest = command[at + 1], command[at + 2 :]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
