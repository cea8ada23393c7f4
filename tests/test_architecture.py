"""The arrows between the parts of gateway/ point one way (see ARCHITECTURE.md).

The imports are read from the source with ``ast`` (every import: at the top,
inside a function, or only for type checking, since each is knowledge of the
other module), so the rules stay true as the code changes:

- no import cycles between modules;
- the lower layers (message formats, crypto, trust, algorithm policy) know
  nothing of the configuration, the daemon, delivery, diagnosis or the command
  line, not even through a module they import;
- only the command line knows the command line;
- nothing below the daemon imports it, and its parts do not reach back into
  its life cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

LOWER = ("gateway.cms", "gateway.pki", "gateway.as2", "gateway.policy")
UPPER = (
    "gateway.config",
    "gateway.daemon",
    "gateway.delivery",
    "gateway.diagnose",
    "gateway.commands",
    "gateway.cli",
)
CLI = ("gateway.cli", "gateway.commands", "gateway.__main__")
# What the configuration is read with and judged by: these know nothing of it.
BELOW_CONFIG = (
    "gateway.routing",
    "gateway.egress",
    "gateway.httpbody",
    "gateway.tomlreader",
    "gateway.places",
    "gateway.spool",
    "gateway.atrest",
    "gateway.audit",
    "gateway.errors",
    "gateway.clock",
    "gateway.fsutil",
    "gateway.textbounds",
)
# The parts that run: flows, listeners and workers, the process, the command line.  The
# configuration describes them and is read by them; it never uses one.
RUNNING = (
    "gateway.inbound",
    "gateway.outbound",
    "gateway.channel",
    "gateway.intake",
    "gateway.delivery",
    "gateway.control",
    "gateway.operations",
    "gateway.maintenance.server",
    "gateway.maintenance.commands",
    "gateway.daemon",
    "gateway.httpfront",
    "gateway.diagnose",
    "gateway.commands",
    "gateway.cli",
)
# Where an administrator's configuration is judged (a ConfigProblem names its file,
# key and fix): the configuration package, the readers it is built with, and
# check-config's report.
CONFIGURATION = (
    "gateway.config",
    "gateway.tomlreader",
    "gateway.places",
    "gateway.report",
    "gateway.errors",
)


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def imports_of(name: str, path: Path, is_package: bool, known: Mapping[str, object]) -> set[str]:
    """The modules of the package that ``name`` imports."""
    tree = _tree(path)
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return {m for m in found if m in known and m != name}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def names_imported(path: Path) -> set[str]:
    """Every name ``path`` imports with ``from ... import``."""
    return {
        alias.name
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imports_of(name, path, pkg, known) for name, (path, pkg) in known.items()}


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def reachable(edges: Mapping[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` reaches, with one import path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    del paths[start]
    return paths


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return graph()


def test_the_reader_sees_the_imports_it_must_judge(edges: dict[str, set[str]]) -> None:
    # absolute, relative, "from package import module", and imports inside functions
    assert "gateway.config" in edges["gateway.daemon.lifecycle"]
    assert "gateway.cms.common" in edges["gateway.cms.enveloping"]  # from .common import
    assert "gateway.pki.tlsnative" in edges["gateway.pki.tls"]  # from gateway.pki import tlsnative
    assert "gateway.commands.daemon" in edges["gateway.cli"]


def test_cycles_and_upward_paths_are_found() -> None:
    made_up = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(made_up) == [["a", "b", "c"]]
    assert reachable(made_up, "d")["c"] == ["d", "a", "b", "c"]


def test_no_import_cycles(edges: dict[str, set[str]]) -> None:
    assert cycles(edges) == []


def test_lower_layers_never_reach_up(edges: dict[str, set[str]]) -> None:
    wrong = [
        " -> ".join(path)
        for name in sorted(edges)
        if _within(name, LOWER)
        for target, path in reachable(edges, name).items()
        if _within(target, UPPER)
    ]
    assert wrong == []


def test_only_the_command_line_knows_the_command_line(edges: dict[str, set[str]]) -> None:
    wrong = [
        f"{name} -> {target}"
        for name, targets in sorted(edges.items())
        if not _within(name, CLI)
        for target in sorted(targets)
        if _within(target, CLI)
    ]
    assert wrong == []


def test_the_configuration_is_built_on_what_knows_nothing_of_it(
    edges: dict[str, set[str]],
) -> None:
    # the zone and address rules, the readers, the state: none reaches back into config
    wrong = [
        " -> ".join(path)
        for name in sorted(edges)
        if _within(name, BELOW_CONFIG)
        for target, path in reachable(edges, name).items()
        if _within(target, ("gateway.config",))
    ]
    assert wrong == []


def test_only_the_configuration_layer_judges_the_configuration() -> None:
    """Configuration rules live with the configuration, not in routing or trust: only
    the configuration layer makes a ConfigProblem (a feature's settings loader reports
    through a tomlreader Section)."""
    wrong = [
        name
        for name, (path, _) in sorted(modules().items())
        if "ConfigProblem" in names_imported(path) and not _within(name, CONFIGURATION)
    ]
    assert wrong == []


def test_the_configuration_uses_none_of_the_parts_that_run(edges: dict[str, set[str]]) -> None:
    wrong = [
        " -> ".join(path)
        for name in sorted(edges)
        if _within(name, ("gateway.config",))
        for target, path in reachable(edges, name).items()
        if _within(target, RUNNING)
    ]
    assert wrong == []


DAEMON = ("gateway.daemon",)


def test_nothing_below_the_daemon_imports_it(edges: dict[str, set[str]]) -> None:
    # The daemon assembles the gateway; only the command line starts it.
    wrong = [
        f"{name} -> {target}"
        for name, targets in sorted(edges.items())
        if not _within(name, DAEMON + CLI)
        for target in sorted(targets)
        if _within(target, DAEMON)
    ]
    assert wrong == []


def test_the_daemons_parts_do_not_reach_back_into_its_life_cycle(
    edges: dict[str, set[str]],
) -> None:
    # lifecycle assembles the other modules of gateway/daemon; none of them knows it.
    top = ("gateway.daemon", "gateway.daemon.lifecycle")
    wrong = [
        f"{name} -> {target}"
        for name, targets in sorted(edges.items())
        if _within(name, DAEMON) and name not in top
        for target in sorted(targets)
        if target in top
    ]
    assert wrong == []
    assert "gateway.daemon.as2_handler" in edges["gateway.daemon.lifecycle"]


def test_the_answers_to_a_peer_know_nothing_of_who_decides_them(
    edges: dict[str, set[str]],
) -> None:
    # gateway.channel.answers is below both the handler and the inbound pipeline.
    reached = reachable(edges, "gateway.channel.answers")
    assert not [t for t in reached if _within(t, ("gateway.daemon", "gateway.inbound"))]


def test_delivery_to_the_inbox_knows_nothing_of_the_request(
    edges: dict[str, set[str]],
) -> None:
    # The request pipeline uses exactly-once delivery and recovery; they never reach back.
    lower = ("gateway.inbound.exactly_once", "gateway.inbound.recovery")
    wrong = [
        " -> ".join(path)
        for name in lower
        for target, path in reachable(edges, name).items()
        if target in ("gateway.inbound", "gateway.inbound.pipeline")
    ]
    assert wrong == []
    assert "gateway.inbound.exactly_once" in edges["gateway.inbound.pipeline"]


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/helpers (or conftest): a test module imported by
    another runs its own set-up twice and ties the two files' changes together."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name} imports {n}" for n in names if n.startswith("tests.test_")]
    assert not offenders, "\n".join(offenders)
