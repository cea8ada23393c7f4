"""The crash tests' run: documents dropped into outboxes while daemons are SIGKILLed at
random and started again, the receiving side's inbox watched all along.

Most documents are small (sealed in memory, their body kept in the spool row);
every tenth is larger than ``INLINE_BODY_BYTES``, so that its body goes through
a file.  The run's seed is printed first (pytest shows it with a failing test's
output) and noted on any failure in the run; the caller names it in its own
assertions.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.demo_run import GatewayProcess, drop_file, wait_until
from gateway.outbound import INLINE_BODY_BYTES
from tests.inboxwatch import InboxWatch

# What a crash test's limit in pytest (``pytest.mark.timeout``) allows beyond the wait for
# the deliveries (``timeout``): the drops with a kill and a restart after each burst
# (each start usually well under 30 s even on a loaded machine: a typical figure, not a
# bound), and each daemon's stop.
LIMIT_BEYOND_DELIVERIES = 600


class Starts(Protocol):
    """What starts the daemons (the tests' ``processes`` fixture)."""

    def start(self, config: Path) -> GatewayProcess: ...


@dataclass(frozen=True)
class Crashed:
    """What a run did: its seed, the documents dropped (file name -> SHA-256) and the
    SIGKILLs."""

    seed: int
    sent: dict[str, str]
    kills: int


def drop_while_killing(
    processes: Starts,
    configs: Mapping[str, Path],
    outboxes: Sequence[Path],
    inbox: Path,
    all_delivered: Callable[[], bool],
    *,
    messages: int,
    timeout: float,
) -> Crashed:
    """Start the daemons of ``configs``; drop ``messages`` documents into ``outboxes`` (one
    chosen at random for each) in bursts, after each burst SIGKILLing one daemon chosen at
    random and starting it again; wait up to ``timeout`` seconds until ``all_delivered``;
    stop every daemon (each must exit cleanly).  No document may be written into ``inbox``
    twice meanwhile."""
    seed = random.randrange(1 << 30)
    print(f"crash test seed {seed}")
    rng = random.Random(seed)
    sent: dict[str, str] = {}
    kills = 0
    try:
        running = {name: processes.start(path) for name, path in configs.items()}
        with InboxWatch(inbox) as watch:
            while len(sent) < messages:
                for _ in range(min(rng.randint(5, 25), messages - len(sent))):
                    number = len(sent)
                    line = f"MSH|^~\\&|LIS|LAB|{number}|{rng.random()}\r".encode()
                    data = line * rng.randint(1, 50)
                    if number % 10 == 0:  # larger than INLINE_BODY_BYTES: its body is a file
                        data = rng.randbytes(INLINE_BODY_BYTES + rng.randint(1, 64 * 1024))
                    name = f"result-{number:04d}.hl7"
                    drop_file(rng.choice(outboxes), name, data)
                    sent[name] = hashlib.sha256(data).hexdigest()
                time.sleep(rng.uniform(0.05, 0.6))
                victim = rng.choice(list(configs))
                running[victim].kill()
                kills += 1
                time.sleep(rng.uniform(0.0, 0.3))
                running[victim] = processes.start(configs[victim])

            wait_until(all_delivered, timeout, f"all {messages} messages delivered")
            for proc in running.values():
                assert proc.stop() == 0, f"{proc.config} did not stop cleanly"
        assert watch.rewritten == [], "written into the inbox again"
        assert watch.looks > 100
    except BaseException as exc:
        exc.add_note(f"crash test seed {seed}")
        raise
    return Crashed(seed, sent, kills)
