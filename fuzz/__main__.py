"""Coverage-guided fuzzing of medgw's readers of outside input (see fuzz/README.md).

    python -m fuzz list
    python -m fuzz run TARGET [--work DIR] [--seconds N] [--vendors DIR] [--reseed]
                         [-- LIBFUZZER-ARGS]
    python -m fuzz replay TARGET FILE...     (no atheris needed)

Exit status: 0 when no input broke the target's contract; otherwise not 0, with the
input written to ``<work>/findings/<target>-crash-<sha1>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_WORK = Path(__file__).resolve().parent / "work"
TARGET_NAMES = ("cms", "smime", "as2", "mdn", "config")


def _vendors(value: str | None) -> Path | None:
    if value == "":
        return None
    if value is not None:
        return Path(value)
    from .seeds import VENDORS

    return VENDORS if VENDORS.is_dir() else None


def _run(args: argparse.Namespace) -> int:
    import atheris  # the fuzzing engine: only this subcommand needs it

    # Instrument medgw and its ASN.1 reader, so that the fuzzer sees which branches
    # an input reached.
    with atheris.instrument_imports(include=["gateway", "asn1crypto"]):
        from . import targets

    from .seeds import seed_all

    work = Path(args.work).absolute()
    vendors = _vendors(args.vendors)
    material = targets.material(work, vendors)
    corpus = work / "corpus" / args.target
    # The first run seeds the corpus; later runs go on from what it grew to.
    fresh = not corpus.is_dir() or not any(corpus.iterdir())
    if fresh or args.reseed:
        seed_all(material, work / "corpus", vendors, only=args.target)
    seeded = sum(1 for _ in corpus.iterdir())
    findings = work / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    target = targets.TARGETS[args.target]
    print(
        f"fuzz {args.target}: {seeded} inputs in {corpus}, "
        f"vendors {vendors or 'absent'}, {args.seconds} s",
        file=sys.stderr,
    )

    def one_input(data: bytes) -> None:
        if len(data) <= targets.MAX_INPUT_BYTES:
            target(material, data)

    engine = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={args.seconds}",
        f"-max_len={targets.MAX_INPUT_BYTES}",
        "-timeout=30",  # wall clock, for a hang (the CPU bound is checked per input)
        "-rss_limit_mb=2048",
        f"-artifact_prefix={findings}/{args.target}-",
        *args.engine,
    ]
    atheris.Setup(engine, one_input)
    atheris.Fuzz()  # exits the process
    return 0


def _replay(args: argparse.Namespace) -> int:
    from . import targets

    work = Path(args.work).absolute()
    material = targets.material(work, _vendors(args.vendors))
    broken = 0
    for name in args.files:
        try:
            targets.TARGETS[args.target](material, Path(name).read_bytes())
        except targets.ContractBroken as exc:
            broken += 1
            print(f"{name}: {exc}", file=sys.stderr)
        else:
            print(f"{name}: contract kept")
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the targets")
    for name in ("run", "replay"):
        p = sub.add_parser(name)
        p.add_argument("target", choices=TARGET_NAMES)
        p.add_argument("--work", default=str(DEFAULT_WORK), help="keys, corpus and findings")
        p.add_argument(
            "--vendors",
            default=None,
            help="interop fixtures folder ('' for none; default ../shared/testdata/as2-vendors)",
        )
        if name == "run":
            p.add_argument("--seconds", type=int, default=600, help="how long (default 600)")
            p.add_argument(
                "--reseed", action="store_true", help="add the seeds to a corpus that has grown"
            )
            p.add_argument("engine", nargs="*", help="more libFuzzer options, after --")
        else:
            p.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(TARGET_NAMES))
        return 0
    return _run(args) if args.command == "run" else _replay(args)


if __name__ == "__main__":
    sys.exit(main())
