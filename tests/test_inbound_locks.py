"""Requests for one (peer, Message-ID) are handled one at a time, whichever
InboundProcessor (before or after a reload) handles them."""

from __future__ import annotations

import threading
import time

from gateway.inbound import InboundLocks


def test_one_request_per_message_at_a_time_others_go_on() -> None:
    locks = InboundLocks()
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with locks.exclusive(("lab", "<m1@lab>")):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    def resend() -> None:
        inside.wait()
        with locks.exclusive(("lab", "<m1@lab>")):
            order.append("resend")

    def other() -> None:
        inside.wait()
        with locks.exclusive(("lab", "<m2@lab>")):
            order.append("other message")

    threads = [threading.Thread(target=f) for f in (first, resend, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == ["other message", "first done", "resend"]
    assert locks._busy == {}  # nothing kept once every request is done
