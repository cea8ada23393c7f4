"""``medgw demo`` and ``medgw pki init-demo``."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.pki.issue import KEY_KINDS

EXIT_FAILED = 1


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run two gateways on this machine and exchange a signed, encrypted document"
    )
    demo.add_argument(
        "--dir", type=Path, default=Path("demo"), help="scratch folder (default: demo)"
    )
    demo.set_defaults(handler=_demo)


def register_pki(pki_commands: Any) -> None:
    init_demo = pki_commands.add_parser(
        "init-demo",
        help="write a demo CA, certificates and two institutions' configs",
        description="Write a demo PKI (a root CA, its CRL) and two complete demo "
        "installations, a hospital and a laboratory, configured to exchange documents "
        "over 127.0.0.1: each with gateway.toml, peers.d/, and certs/ laid out as a real "
        "installation's /etc/medgw/certs (see certs/README.md). Demo keys: never for "
        "patient data.",
    )
    init_demo.add_argument("dir", type=Path, help="folder to create (a previous demo is replaced)")
    init_demo.add_argument(
        "--hospital-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the hospital's listener on 127.0.0.1 (default: a free port)",
    )
    init_demo.add_argument(
        "--lab-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the laboratory's listener on 127.0.0.1 (default: a free port)",
    )
    init_demo.add_argument(
        "--key-type",
        choices=KEY_KINDS,
        default="ec-p256",
        help="key type of the CA and every certificate (default ec-p256; rsa-2048 or "
        "rsa-3072 for partners whose AS2 software needs RSA)",
    )
    init_demo.set_defaults(handler=_init_demo)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo_run import run_demo

    return run_demo(args.dir)


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _init_demo(args: argparse.Namespace) -> int:
    from gateway.demo_run import free_ports
    from gateway.pki.demo import init_demo

    chosen = [args.hospital_port, args.lab_port]
    free = iter(port for port in free_ports(4) if port not in chosen)
    ports = [port or next(free) for port in chosen]
    for option, asked in (("--hospital-port", args.hospital_port), ("--lab-port", args.lab_port)):
        if asked and _port_in_use(asked):
            print(
                f"medgw: {option} {asked}: the port is in use on 127.0.0.1 "
                f"(fix: choose another port, or leave {option} out to get a free one)",
                file=sys.stderr,
            )
            return EXIT_FAILED
    layout = init_demo(
        args.dir,
        now=datetime.now(UTC),
        hospital_port=ports[0],
        lab_port=ports[1],
        key_kind=args.key_type,
    )
    hospital, lab = layout.hospital, layout.lab
    print(f"demo PKI ({args.key_type}) and configs written to {layout.root}")
    print(f"  hospital: {hospital.config_path} (listens on 127.0.0.1:{hospital.port})")
    print(f"  lab:      {lab.config_path} (listens on 127.0.0.1:{lab.port})")
    print("Next steps (each gateway in its own terminal):")
    for inst in (hospital, lab):
        print(f"  medgw check-config --config {inst.config_path}")
    for inst in (hospital, lab):
        print(f"  medgw run --config {inst.config_path}")
    print(f"  medgw send --config {lab.config_path} --to {hospital.name} FILE")
    print(f"Received documents appear in {hospital.inbox_dir};")
    print(f"the hospital's audit trail is {hospital.audit_log}.")
    return 0
