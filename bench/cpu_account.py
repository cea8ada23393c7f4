"""Where a message's CPU goes: both daemons of bench/e2e_bench.py profiled in steady state.

Run:  .venv/bin/python bench/cpu_account.py [--messages 3000] [--keys rsa-2048]
                                            [--tools perf,pyspy,strace,files,none]
                                            [--window 15] [--strace-window 5] [--out DIR]
      .venv/bin/python bench/cpu_account.py --report DIR      (the tables again, from --out)

For each key type and tool, one run of e2e_bench's two daemons (SQLite spool, the
bench's own configuration): ``--messages`` 4 KiB documents dropped into the lab's
outbox at once.  Two windows per run:

* the lab's intake: from the drop until the lab's trail holds every
  ``message.accepted`` (perf and py-spy watch the lab meanwhile);
* then ``--window`` seconds (``--strace-window`` for strace and files) while the
  lab sends and the hospital receives, the tool on both daemons at once:

  - ``perf``:   ``perf record -g -F 499 -p PID``; every sample charged by the code it was
    in: kernel (by the system call it was made in), libpython, cryptography's
    native module (by primitive: RSA private-key math, other bignum, EC,
    AES-GCM, SHA, the rest), the system's libssl/libcrypto (TLS; hashlib),
    SQLite, libc, the rest;
  - ``pyspy``:  ``py-spy record --gil --native --format raw --rate 200`` (py-spy
    from the bench's environment, bench/.venv); each sample of the thread
    holding the GIL charged to the part of medgw or of its libraries named by
    the frame nearest the leaf that names one;
  - ``strace``: ``strace -f -c -p PID`` (it slows what it watches: calls are
    counted, not timed);
  - ``files``:  ``strace -f -e trace=openat,rename,...``: files created, renamed,
    linked and removed, by folder;
  - ``none``:   nothing: the CPU per message undisturbed.

In every window: CPU time (user + system) of each daemon and of its event loop's
thread against the others (/proc/PID/task/*/stat), voluntary context switches, the
documents finished meanwhile (lab: ``receipt.received``, hospital:
``message.delivered`` records its trail gained; the intake: documents taken in)
and the load average, so every figure is also given per message.  With perf and
py-spy both run, the interpreter's share of perf's samples (libpython, libc,
Python's own extension modules) is divided among medgw's parts in the
proportions py-spy found, and the buckets are summed into one table per key type
in ms of CPU per message (lab intake, lab sending, lab, hospital), beside the
crypto floor: the operations one message costs each daemon, measured alone with
cryptography in this process.  Counts and shares hold under other load on the
host; ms per message move with it.  perf, py-spy and strace need the right to trace
the daemons (root, or ptrace and perf_event permissions).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import e2e_bench
import pyas2lib_ref

import gateway
from gateway.demo_run import drop_file

SIDES = ("lab", "hospital")
DONE_EVENT = {"lab": "receipt.received", "hospital": "message.delivered"}

# ---------------------------------------------------------------- the window's counters


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


@dataclass
class Snapshot:
    at: float
    load: str
    threads: dict[str, dict[int, float]]
    cpu: dict[str, float]
    switches: dict[str, int]
    done: dict[str, int]


def snapshot(pids: dict[str, int], tails: dict[str, e2e_bench.AuditTail]) -> Snapshot:
    for tail in tails.values():
        tail.poll()
    return Snapshot(
        at=time.monotonic(),
        load=Path("/proc/loadavg").read_text().split(" ", 1)[0],
        threads={s: thread_cpu(pids[s]) for s in SIDES},
        cpu={s: e2e_bench.cpu_seconds(pids[s]) for s in SIDES},
        switches={s: e2e_bench.context_switches(pids[s]) for s in SIDES},
        done={s: sum(r["event"] == DONE_EVENT[s] for r in tails[s].records) for s in SIDES},
    )


@dataclass
class Window:
    tool: str
    keys: str
    seconds: float
    load: tuple[str, str]
    done: dict[str, int]
    cpu_ms: dict[str, float]  # per message
    switches: dict[str, float]  # per message
    loop_ms: dict[str, float]  # the main thread's (the event loop's) CPU per message
    workers_ms: dict[str, float]  # the other threads' CPU per message
    busy_threads: dict[str, int]  # threads that used CPU in the window
    outlasted: bool  # the lab's last receipt came before the window ended
    sent: int = 0  # intake windows: receipts the lab verified meanwhile
    files: dict[str, Path] = field(default_factory=dict)


def window(
    before: Snapshot,
    after: Snapshot,
    pids: dict[str, int],
    tool: str,
    keys: str,
    taken_in: int | None = None,
) -> Window:
    """The counters' differences; per message finished in the window, or per document
    the lab took in (``taken_in``, its intake's window)."""
    done = {s: after.done[s] - before.done[s] for s in SIDES}
    if taken_in is not None:
        done["lab"] = taken_in
    per = {s: max(done[s], 1) for s in SIDES}
    loop = {
        s: after.threads[s].get(pids[s], 0.0) - before.threads[s].get(pids[s], 0.0) for s in SIDES
    }
    total = {s: after.cpu[s] - before.cpu[s] for s in SIDES}
    busy = {
        s: sum(
            1
            for tid, cpu in after.threads[s].items()
            if cpu - before.threads[s].get(tid, 0.0) > 0.0
        )
        for s in SIDES
    }
    return Window(
        tool=tool,
        keys=keys,
        seconds=after.at - before.at,
        load=(before.load, after.load),
        done=done,
        cpu_ms={s: total[s] * 1000 / per[s] for s in SIDES},
        switches={s: (after.switches[s] - before.switches[s]) / per[s] for s in SIDES},
        loop_ms={s: loop[s] * 1000 / per[s] for s in SIDES},
        workers_ms={s: (total[s] - loop[s]) * 1000 / per[s] for s in SIDES},
        busy_threads=busy,
        outlasted=False,
    )


# ------------------------------------------------------------------------ one run


PERF_HZ = 499  # at its default 4000 Hz, perf added 30-80 % to the CPU of what it watched


def tool_commands(tool: str, pid: int, out: Path, seconds: float) -> list[str]:
    if tool == "perf":
        return [
            "perf",
            "record",
            "-q",
            "-g",
            "-F",
            str(PERF_HZ),
            "-p",
            str(pid),
            "-o",
            str(out),
            "--",
            "sleep",
            f"{seconds}",
        ]
    if tool == "pyspy":
        pyspy = pyas2lib_ref.environment().parent / "py-spy"
        return [
            str(pyspy),
            "record",
            "--gil",
            "--native",
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            f"{round(seconds)}",
            "--pid",
            str(pid),
            "--output",
            str(out),
        ]
    if tool == "strace":
        return ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)]
    if tool == "files":
        calls = "openat,rename,renameat,renameat2,link,linkat,unlink,unlinkat,mkdir"
        return ["strace", "-f", "-e", f"trace={calls}", "-o", str(out), "-p", str(pid)]
    if tool == "none":
        return ["sleep", f"{seconds}"]
    raise SystemExit(f"--tools: unknown tool {tool!r} (perf, pyspy, strace, files, none)")


def one_run(
    tmp: Path, out: Path, keys: str, tool: str, messages: int, seconds: float
) -> list[Window]:
    """One run of the two daemons with ``tool`` on them: the lab's intake window (the
    lab alone, from the drop until its last ``message.accepted``; strace and files
    skip it), then the window of ``seconds`` on both daemons."""
    layout = e2e_bench.demo(tmp / f"demo-{keys}-{tool}", keys)
    with contextlib.ExitStack() as stack:
        sides = e2e_bench.start_sides(layout, None, 1, stack)
        pids = {"lab": sides.lab[0].proc.pid, "hospital": sides.hospital[0].proc.pid}
        tails = {
            "lab": e2e_bench.AuditTail(layout.lab.audit_log),
            "hospital": e2e_bench.AuditTail(layout.hospital.audit_log),
        }
        windows = []
        intake_files = {
            "lab": out / f"{keys}-{tool}-intake-lab.{'data' if tool == 'perf' else 'txt'}"
        }
        watching = tool in ("perf", "pyspy", "none")
        intake_tools = (
            [
                subprocess.Popen(
                    tool_commands(tool, pids["lab"], intake_files["lab"], 600),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            ]
            if tool in ("perf", "pyspy")
            else []
        )
        if tool == "pyspy":
            time.sleep(1.0)  # py-spy attached before the first document
        before = snapshot(pids, tails)
        payload = os.urandom(4096)
        for i in range(messages):
            drop_file(sides.outboxes[0], f"doc-{i:05d}.bin", payload)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the lab's intake over: it only sends now
            tails["lab"].poll()
            if sum(r["event"] == "message.accepted" for r in tails["lab"].records) >= messages:
                break
            time.sleep(0.05)
        for proc in intake_tools:
            proc.send_signal(signal.SIGINT)
        for proc in intake_tools:
            proc.wait(timeout=120)
        after = snapshot(pids, tails)
        intake = window(before, after, pids, f"{tool}-intake", keys, taken_in=messages)
        intake.sent = after.done["lab"] - before.done["lab"]
        intake.files = intake_files
        files = {s: out / f"{keys}-{tool}-{s}.{'data' if tool == 'perf' else 'txt'}" for s in SIDES}
        before = snapshot(pids, tails)
        procs = [
            subprocess.Popen(
                tool_commands(tool, pids[s], files[s], seconds),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for s in SIDES
        ]
        if tool in ("strace", "files"):
            time.sleep(seconds)
            for proc in procs:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(timeout=seconds + 120)
        after = snapshot(pids, tails)
        result = window(before, after, pids, tool, keys)
        result.files = files
        receipts = e2e_bench.wait_receipts([tails["lab"]], messages, 600)
        result.outlasted = len(receipts) <= after.done["lab"]
        if watching:
            windows.append(intake)
        windows.append(result)
        return windows


# --------------------------------------------------------------------- perf samples

SYSCALL = re.compile(r"__(?:x64|ia32)_sys_(\w+)|__do_sys_(\w+)|ksys_(\w+)")
KERNEL_BY_SYSCALL = {
    "fsync": "kernel: fsync, fdatasync",
    "fdatasync": "kernel: fsync, fdatasync",
    "futex": "kernel: futex (GIL, locks, thread hand-offs)",
    "epoll_wait": "kernel: epoll (event loop)",
    "epoll_ctl": "kernel: epoll (event loop)",
    "sendto": "kernel: sockets",
    "recvfrom": "kernel: sockets",
    "sendmsg": "kernel: sockets",
    "recvmsg": "kernel: sockets",
    "getsockopt": "kernel: sockets",
    "mmap": "kernel: memory",
    "munmap": "kernel: memory",
    "brk": "kernel: memory",
    "madvise": "kernel: memory",
    "mprotect": "kernel: memory",
}
RUST_CRYPTO = [  # symbol in cryptography's native module (its own OpenSSL linked in)
    (
        re.compile(r"gather5|power5|powerx5|scatter5|rsaz|mod_exp_mont_consttime"),
        "crypto: RSA private-key math",
    ),
    (
        re.compile(r"^(?:bn_|BN_|ossl_bn|bn_mul|bn_sqr|bn_from|bn_to|bn_div|bn_mod)"),
        "crypto: other bignum (RSA public, CRT)",
    ),
    (re.compile(r"ecp_nistz256|ecp_nistp|ossl_ec|^ec_|^EC_|ecdsa|ECDSA|ecdh"), "crypto: EC math"),
    (re.compile(r"aes|AES|gcm|GCM|ghash|chacha|poly1305"), "crypto: symmetric (AES-GCM)"),
    (re.compile(r"sha|SHA|keccak|Keccak|md5|MD5"), "crypto: hashing (SHA)"),
    (
        re.compile(r"pyo3|cryptography|asn1|x509|core::|alloc::|_ZN|rust"),
        "cryptography: Rust (DER, X.509, binding)",
    ),
]
SYSTEM_LIBCRYPTO = [  # the system's libcrypto: TLS's record crypto and hashlib
    (re.compile(r"aes|AES|gcm|GCM|ghash|chacha|poly1305"), "TLS: record crypto (AES-GCM)"),
    (re.compile(r"sha|SHA|keccak|Keccak"), "hashlib: SHA (audit chain, digests)"),
]


def perf_buckets(data: Path) -> collections.Counter[str]:
    """perf's samples of one daemon, weighted by period, by the code they were in."""
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "tid,period,ip,sym,dso", "--no-inline"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    buckets: collections.Counter[str] = collections.Counter()
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        head = lines[0].split()
        try:
            period = int(head[-1])
        except (ValueError, IndexError):
            continue
        frames = [_frame(line) for line in lines[1:]]
        if not frames:
            continue
        buckets[_perf_bucket(frames)] += period
    return buckets


def _frame(line: str) -> tuple[str, str]:
    """(symbol, dso) of one callchain line: ``addr sym+0x1f (dso)``."""
    match = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
    if not match:
        return "", ""
    sym = re.sub(r"\+0x[0-9a-f]+$", "", match.group(1))
    return sym, os.path.basename(match.group(2))


def _perf_bucket(frames: list[tuple[str, str]]) -> str:
    sym, dso = frames[0]
    if dso.startswith("[kernel") or (
        dso == "[unknown]" and any(d.startswith("[kernel") for _, d in frames)
    ):
        return _kernel_bucket(frames)
    if dso.startswith("_rust.abi3"):
        return next(
            (b for pattern, b in RUST_CRYPTO if pattern.search(sym)), "cryptography: OpenSSL glue"
        )
    if dso.startswith("libcrypto"):
        return next(
            (b for pattern, b in SYSTEM_LIBCRYPTO if pattern.search(sym)),
            "TLS: libssl, libcrypto (rest)",
        )
    if dso.startswith("libssl"):
        return "TLS: libssl, libcrypto (rest)"
    if dso.startswith("libsqlite3"):
        return "SQLite (library)"
    if dso.startswith("libpython"):
        return "Python: interpreter (libpython)"
    if dso.startswith("libc.so") or dso.startswith("libm.so") or dso.startswith("ld-linux"):
        return "Python: libc (allocations, copies)"
    if ".cpython-" in dso:
        return "Python: extension modules (" + dso.split(".cpython-")[0] + ")"
    return "Python: other native"


def _kernel_bucket(frames: list[tuple[str, str]]) -> str:
    syms = [s for s, _ in frames]
    joined = " ".join(syms)
    call = next((next(g for g in m.groups() if g) for s in syms if (m := SYSCALL.search(s))), None)
    if call in KERNEL_BY_SYSCALL:
        return KERNEL_BY_SYSCALL[call]
    if "tcp_" in joined or "sock_" in joined or "inet_" in joined:
        return "kernel: sockets"
    if call is not None:
        return f"kernel: {call}"
    if "page_fault" in joined:
        return "kernel: memory"
    return "kernel: interrupts, preemption, scheduling"


# -------------------------------------------------------------------- py-spy samples

PYSPY_PARTS = [  # (in the frame's file or name, the part of the daemon): nearest the leaf wins
    ("structlog", "logging"),
    ("/logging/", "logging"),
    ("gateway/logs.py", "logging"),
    ("prometheus_client", "metrics"),
    ("gateway/metrics/", "metrics"),
    ("gateway/audit/", "audit records"),
    ("gateway/atrest/", "at-rest vault"),
    ("sqlite3", "spool (Python side)"),
    ("gateway/spool/", "spool (Python side)"),
    ("asyncio/sslproto.py", "TLS (Python side)"),
    ("/ssl.py", "TLS (Python side)"),
    ("aiohttp", "HTTP (aiohttp)"),
    ("multidict", "HTTP (aiohttp)"),
    ("yarl", "HTTP (aiohttp)"),
    ("gateway/channel/", "HTTP (aiohttp)"),
    ("gateway/httpbody.py", "HTTP (aiohttp)"),
    ("gateway/httpfront.py", "HTTP (aiohttp)"),
    ("gateway/fsutil.py", "files (write, sync, rename)"),
    ("cryptography/", "crypto (Python side)"),
    ("gateway/cms/", "MIME, DER, CMS (Python)"),
    ("gateway/as2/", "MIME, DER, CMS (Python)"),
    ("/email/", "MIME, DER, CMS (Python)"),
    ("asn1crypto", "MIME, DER, CMS (Python)"),
    ("gateway/pki/", "certificates, trust (Python)"),
    ("concurrent/futures", "thread hand-offs"),
    ("asyncio/threads.py", "thread hand-offs"),
    ("/threading.py", "thread hand-offs"),
    ("/queue.py", "thread hand-offs"),
    ("asyncio/", "event loop"),
    ("selectors.py", "event loop"),
    ("gateway/outbound/", "pipeline steps (medgw)"),
    ("gateway/inbound/", "pipeline steps (medgw)"),
    ("gateway/daemon/", "pipeline steps (medgw)"),
    ("gateway/intake/", "pipeline steps (medgw)"),
    ("gateway/delivery/", "pipeline steps (medgw)"),
    ("gateway/", "pipeline steps (medgw)"),
]
NATIVE_MEASURED = re.compile(r"_rust\.abi3|libcrypto|libssl|libsqlite3")


def pyspy_parts(raw: Path) -> tuple[collections.Counter[str], int]:
    """The GIL holder's samples by part; and how many were in native code perf counts on its own
    (cryptography, libssl/libcrypto, SQLite), left out of the parts."""
    parts: collections.Counter[str] = collections.Counter()
    native = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if NATIVE_MEASURED.search(frames[-1]):
            native += int(count)
            continue
        part = "other"
        for frame in reversed(frames):
            hit = next((p for marker, p in PYSPY_PARTS if marker in frame), None)
            if hit is not None:
                part = hit
                break
        parts[part] += int(count)
    return parts, native


def strace_counts(summary: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in summary.read_text().splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[-1] not in ("total", "syscall") and cols[3].isdigit():
            counts[cols[-1]] = int(cols[3])
    return counts


# ------------------------------------------------------------------ the crypto floor


def crypto_floor(keys: str) -> dict[str, list[tuple[str, str, float]]]:
    """Per daemon, the cryptographic operations one 4 KiB message costs it, each as
    (kind, operation, CPU ms) measured alone in this process with cryptography (best
    of 5 rounds): the floor no pipeline can go below."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(4096)
    attrs = os.urandom(200)  # signed attributes: what the signature covers

    def cost(call: Callable[[], object], rounds: int = 5, count: int = 200) -> float:
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(count):
                call()
            best = min(best, (time.process_time() - start) * 1000 / count)
        return best

    aead, nonce = AESGCM(AESGCM.generate_key(256)), os.urandom(12)
    sealed = aead.encrypt(nonce, data, None)
    symmetric = {
        "lab": (
            "AES-256-GCM of 4 KiB twice (CMS, the copy at rest)",
            2 * cost(lambda: aead.encrypt(nonce, data, None)),
        ),
        "hospital": ("AES-256-GCM open of 4 KiB", cost(lambda: aead.decrypt(nonce, sealed, None))),
    }

    def sha() -> object:
        h = hashes.Hash(hashes.SHA256())
        h.update(data)
        return h.finalize()

    hashing = ("SHA-256 of 4 KiB twice (signature digest, MIC)", 2 * cost(sha))
    if keys == "rsa-2048":
        key = rsa.generate_private_key(65537, 2048)
        pub = key.public_key()
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        signature = key.sign(attrs, padding.PKCS1v15(), hashes.SHA256())
        wrapped = pub.encrypt(os.urandom(32), oaep)
        sign = cost(lambda: key.sign(attrs, padding.PKCS1v15(), hashes.SHA256()))
        verify = cost(lambda: pub.verify(signature, attrs, padding.PKCS1v15(), hashes.SHA256()))
        encrypt = cost(lambda: pub.encrypt(os.urandom(32), oaep))
        decrypt = cost(lambda: key.decrypt(wrapped, oaep))
        ops = {
            "lab": [
                ("private", "RSA sign (document)", sign),
                ("public", "RSA-OAEP key transport", encrypt),
                ("public", "RSA verify (receipt)", verify),
            ],
            "hospital": [
                ("private", "RSA-OAEP decrypt (key transport)", decrypt),
                ("private", "RSA sign (receipt)", sign),
                ("public", "RSA verify (document)", verify),
            ],
        }
    else:
        eckey = ec.generate_private_key(ec.SECP256R1())
        ecpub = eckey.public_key()
        ecsig = eckey.sign(attrs, ec.ECDSA(hashes.SHA256()))
        sign = cost(lambda: eckey.sign(attrs, ec.ECDSA(hashes.SHA256())))
        verify = cost(lambda: ecpub.verify(ecsig, attrs, ec.ECDSA(hashes.SHA256())))
        derive = cost(lambda: eckey.exchange(ec.ECDH(), ecpub))
        ephemeral = cost(lambda: ec.generate_private_key(ec.SECP256R1()).exchange(ec.ECDH(), ecpub))
        ops = {
            "lab": [
                ("private", "ECDSA sign (document)", sign),
                ("private", "ECDH, ephemeral key made and derived", ephemeral),
                ("public", "ECDSA verify (receipt)", verify),
            ],
            "hospital": [
                ("private", "ECDH derive (key agreement)", derive),
                ("private", "ECDSA sign (receipt)", sign),
                ("public", "ECDSA verify (document)", verify),
            ],
        }
    return {s: ops[s] + [("symmetric", *symmetric[s]), ("hashing", *hashing)] for s in SIDES}


# ------------------------------------------------------------------------ the report

PYTHON_SIDE = "Python: "


def report(windows: list[Window]) -> None:
    floors = {}
    for keys in dict.fromkeys(w.keys for w in windows):
        load = Path("/proc/loadavg").read_text().split(" ", 1)[0]
        print(f"\ncrypto floor, {keys}, cryptography alone in this process (load average {load}):")
        floors[keys] = crypto_floor(keys)
        for side, ops in floors[keys].items():
            print(f"  {side:<9} {sum(ms for _, _, ms in ops):.3f} ms per message")
            for kind, what, ms in ops:
                print(f"    {kind:<10} {what:<52} {ms:.3f} ms")
    for w in windows:
        print(
            f"\n[{w.keys}, {w.tool}] window {w.seconds:.1f} s, "
            f"load average {w.load[0]} -> {w.load[1]}"
            + ("  (WARNING: the lab finished before the window ended)" if w.outlasted else "")
        )
        for s in SIDES if not w.tool.endswith("-intake") else ("lab",):
            print(
                f"  {s:<9} {w.done[s]:5d} done, CPU/msg {w.cpu_ms[s]:.2f} ms (event loop thread "
                f"{w.loop_ms[s]:.2f}, other threads {w.workers_ms[s]:.2f}; "
                f"{w.busy_threads[s]} threads "
                f"busy), waits/msg {w.switches[s]:.1f}"
                + (f"; {w.sent} receipts verified meanwhile" if w.tool.endswith("-intake") else "")
            )
    for keys in dict.fromkeys(w.keys for w in windows):
        by_tool = {w.tool: w for w in windows if w.keys == keys}
        perf, spy = by_tool.get("perf"), by_tool.get("pyspy")
        trace, opened = by_tool.get("strace"), by_tool.get("files")
        sending: dict[str, dict[str, float]] = {}
        for s in SIDES:
            print(f"\n==== {keys}, {s}, while the lab sends and the hospital receives")
            if perf is not None:
                sending[s] = _account(perf, spy, s)
            if spy is not None and spy.files[s].exists():
                _print_parts(spy, s)
            if trace is not None:
                counts = strace_counts(trace.files[s])
                per = max(trace.done[s], 1)
                print(
                    f"  strace, {trace.done[s]} documents in {trace.seconds:.1f} s: "
                    "calls per document"
                )
                for call, n in sorted(counts.items(), key=lambda kv: -kv[1])[:16]:
                    print(f"    {call:<20} {n / per:7.2f}")
                print(f"    {'all':<20} {sum(counts.values()) / per:7.2f}")
            if opened is not None:
                per = max(opened.done[s], 1)
                print(
                    f"  files, {opened.done[s]} documents in {opened.seconds:.1f} s: per document"
                )
                for what, n in file_calls(opened.files[s]).most_common(14):
                    print(f"    {what:<64} {n / per:6.2f}")
        intake_perf, intake_spy = by_tool.get("perf-intake"), by_tool.get("pyspy-intake")
        if intake_perf is not None:
            print(f"\n==== {keys}, lab, its intake (documents taken in, signed, encrypted, queued)")
            rows = _account(intake_perf, intake_spy, "lab")
            if intake_spy is not None and intake_spy.files["lab"].exists():
                _print_parts(intake_spy, "lab")
            if len(sending) == 2:
                # The intake window also sent some: per message, the lab's whole cost is the
                # intake window's per document plus the sending still to do at the sending
                # window's cost.
                left = 1 - intake_perf.sent / intake_perf.done["lab"]
                whole = {
                    k: rows.get(k, 0.0) + left * sending["lab"].get(k, 0.0)
                    for k in rows.keys() | sending["lab"].keys()
                }
                ec = {s: _ec_private(floors[keys][s]) for s in SIDES}
                lab = items(whole, ec["lab"])
                send = items(sending["lab"], ec["lab"])
                item_table(
                    keys,
                    {
                        "lab intake": {k: lab[k] - send[k] for k in lab},
                        "lab sending": send,
                        "lab": lab,
                        "hospital": items(sending["hospital"], ec["hospital"]),
                    },
                )
                print(
                    f"  (lab intake: its window's {intake_perf.sent} receipts' sending left out, "
                    "at the sending window's cost)"
                )


ITEMS = [  # (the table's item, is it the crypto floor, the buckets it sums)
    ("crypto: private-key operations", True, ("crypto: RSA private-key math", "EC private")),
    (
        "crypto: public-key operations (and RSA CRT bignum)",
        True,
        ("crypto: other bignum (RSA public, CRT)", "EC public"),
    ),
    ("crypto: symmetric (AES-GCM)", True, ("crypto: symmetric (AES-GCM)",)),
    (
        "crypto: hashing (SHA-256, cryptography and hashlib)",
        True,
        ("crypto: hashing (SHA)", "hashlib: SHA (audit chain, digests)"),
    ),
    (
        "crypto library around the operations (OpenSSL glue, Rust DER/X.509, Python wrappers)",
        False,
        (
            "cryptography: OpenSSL glue",
            "cryptography: Rust (DER, X.509, binding)",
            "Python: crypto (Python side)",
        ),
    ),
    (
        "TLS record layer (libssl, its AES-GCM, ssl.py/sslproto)",
        False,
        (
            "TLS: record crypto (AES-GCM)",
            "TLS: libssl, libcrypto (rest)",
            "Python: TLS (Python side)",
        ),
    ),
    ("HTTP (aiohttp client or server, medgw's channel)", False, ("Python: HTTP (aiohttp)",)),
    ("sockets (kernel)", False, ("kernel: sockets",)),
    ("event loop (asyncio, epoll)", False, ("Python: event loop", "kernel: epoll (event loop)")),
    ("thread hand-offs (executor, futures, queues)", False, ("Python: thread hand-offs",)),
    (
        "GIL waits, wake-ups (kernel futex)",
        False,
        ("kernel: futex (GIL, locks, thread hand-offs)",),
    ),
    (
        "kernel: interrupts, preemption, scheduling",
        False,
        ("kernel: interrupts, preemption, scheduling",),
    ),
    ("fsync, fdatasync (kernel)", False, ("kernel: fsync, fdatasync",)),
    ("file creation (kernel openat: ext4 inode search)", False, ("kernel: openat",)),
    (
        "SQLite spool (library, sqlite3 module, medgw's spool code)",
        False,
        ("SQLite (library)", "Python: spool (Python side)"),
    ),
    (
        "page writes and reads (kernel pwrite64, pread64: SQLite)",
        False,
        ("kernel: pwrite64", "kernel: pread64"),
    ),
    ("audit records (Python)", False, ("Python: audit records",)),
    (
        "MIME, DER, CMS reading and writing (Python)",
        False,
        ("Python: MIME, DER, CMS (Python)", "Python: certificates, trust (Python)"),
    ),
    ("at-rest vault (Python)", False, ("Python: at-rest vault",)),
    (
        "files: receipts, work files (fsutil, other file calls)",
        False,
        ("Python: files (write, sync, rename)", "kernel: FILES"),
    ),
    ("logging (structlog)", False, ("Python: logging",)),
    ("metrics (prometheus_client)", False, ("Python: metrics",)),
    (
        "medgw's pipeline steps (intake, send, settle, receive: own code)",
        False,
        ("Python: pipeline steps (medgw)", "Python: other"),
    ),
]


def _item_of(bucket: str) -> str:
    for item, _, buckets in ITEMS:
        if bucket in buckets:
            return item
    if bucket.startswith("kernel: "):
        return "files: receipts, work files (fsutil, other file calls)"
    return "medgw's pipeline steps (intake, send, settle, receive: own code)"


def items(rows: dict[str, float], ec_private: float) -> dict[str, float]:
    """Buckets summed into the table's items; EC math split into private and public by
    ``ec_private`` (the private operations' part of the EC floor)."""
    out = dict.fromkeys((item for item, _, _ in ITEMS), 0.0)
    for bucket, ms in rows.items():
        if bucket == "crypto: EC math":
            out[_item_of("EC private")] += ms * ec_private
            out[_item_of("EC public")] += ms * (1 - ec_private)
        else:
            out[_item_of(bucket)] += ms
    return out


def item_table(keys: str, columns: dict[str, dict[str, float]]) -> None:
    names = list(columns)
    print(f"\n==== {keys}: ms of CPU per message, by item (* the crypto floor)")
    print(f"  {'':<88}" + "".join(f"{n:>12}" for n in names))
    for item, floor, _ in ITEMS:
        print(
            f"  {('* ' if floor else '  ') + item:<88}"
            + "".join(f"{columns[n][item]:12.3f}" for n in names)
        )
    print(f"  {'  all':<88}" + "".join(f"{sum(columns[n].values()):12.3f}" for n in names))


def _ec_private(ops: list[tuple[str, str, float]]) -> float:
    private = sum(ms for kind, _, ms in ops if kind == "private")
    public = sum(ms for kind, _, ms in ops if kind == "public")
    return private / (private + public)


def _print_parts(spy: Window, side: str) -> None:
    parts, native = pyspy_parts(spy.files[side])
    total = sum(parts.values()) + native
    print(
        f"  py-spy, GIL holder's samples: {total} ({native / total:.1%} in native code perf counts)"
    )
    for part, n in parts.most_common():
        print(f"    {part:<44} {n / total:6.1%}")


def file_calls(trace: Path) -> collections.Counter[str]:
    """What an ``strace -e trace=openat,rename,...`` log did to files: files created
    (O_CREAT), renamed, linked and removed, by folder (the demo's root left out)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in trace.read_text().splitlines():
        match = re.search(r"(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if not match or match.group(3).startswith("-"):
            continue
        call, args = match.group(1), match.group(2)
        paths = re.findall(r'"([^"]*)"', args)
        if not paths:
            continue
        if call == "openat" and "O_CREAT" not in args:
            continue
        what = {"openat": "create"}.get(call, call)
        counts[f"{what} {_folder(paths[-1])}"] += 1
    return counts


def _folder(path: str) -> str:
    parent = re.sub(r"^/tmp/[^/]+/demo-[^/]+/", "", path.rsplit("/", 1)[0] if "/" in path else ".")
    return parent + "/"


def _account(perf: Window, spy: Window | None, side: str) -> dict[str, float]:
    """perf's shares (the Python side divided by py-spy's), in ms per message: of the
    CPU per message in perf's own window (the run without a tool, ``none``, is
    another run minutes apart: on a shared host its CPU per message differs by more
    than perf's own cost at PERF_HZ)."""
    buckets = perf_buckets(perf.files[side])
    total = sum(buckets.values())
    ms = perf.cpu_ms[side]
    print(f"  perf: {total} sample periods; CPU per message in its window {ms:.2f} ms")
    python_share = sum(v for k, v in buckets.items() if k.startswith(PYTHON_SIDE)) / total
    rows: list[tuple[str, float]] = [
        (k, v / total) for k, v in buckets.items() if not k.startswith(PYTHON_SIDE)
    ]
    if spy is not None and not spy.files[side].exists():
        spy = None
    if spy is not None:
        parts, _ = pyspy_parts(spy.files[side])
        spied = sum(parts.values())
        rows += [(f"Python: {p}", python_share * n / spied) for p, n in parts.items()]
    else:
        rows += [(k, v / total) for k, v in buckets.items() if k.startswith(PYTHON_SIDE)]
    for name, share in sorted(rows, key=lambda r: -r[1]):
        print(f"    {name:<52} {share:6.1%} {share * ms:6.3f} ms")
    if spy is not None:
        print(
            f"    (the Python rows divide perf's interpreter share {python_share:.1%} "
            "by py-spy's parts)"
        )
        for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])[:6]:
            if k.startswith(PYTHON_SIDE):
                print(f"      of which {k:<46} {v / total:6.1%}")
    return {name: share * ms for name, share in rows}


def _save(out: Path, windows: list[Window]) -> None:
    saved = [
        dataclasses.asdict(w) | {"files": {k: str(v) for k, v in w.files.items()}} for w in windows
    ]
    (out / "windows.json").write_text(json.dumps(saved))


def _window_from(saved: dict[str, Any]) -> Window:
    saved["load"] = tuple(saved["load"])
    saved["files"] = {k: Path(v) for k, v in saved["files"].items()}
    return Window(**saved)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--keys", default="rsa-2048", help="rsa-2048, ec-p256, comma-separated")
    parser.add_argument(
        "--tools", default="perf,pyspy,strace,files,none", help="perf, pyspy, strace, files, none"
    )
    parser.add_argument("--window", type=float, default=15.0, help="seconds of perf and py-spy")
    parser.add_argument("--strace-window", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None, help="keep the tools' output here")
    parser.add_argument(
        "--report", type=Path, default=None, help="only report again from an earlier --out"
    )
    args = parser.parse_args()
    if args.report is not None:
        saved = json.loads((args.report / "windows.json").read_text())
        report([_window_from(w) for w in saved])
        return 0
    os.chdir(Path(gateway.__file__).resolve().parents[1])  # as e2e_bench: the daemons run this tree
    out = args.out or Path(tempfile.mkdtemp(prefix="cpu-account-"))
    out.mkdir(parents=True, exist_ok=True)
    windows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for keys in args.keys.split(","):
            for tool in args.tools.split(","):
                seconds = args.strace_window if tool in ("strace", "files") else args.window
                windows += one_run(Path(tmp_name), out, keys, tool, args.messages, seconds)
                print(f"ran {keys} {tool}", file=sys.stderr)
                _save(out, windows)
    print(f"tools' output in {out}")
    report(windows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
