"""One rule for the whole ``medgw`` command line, read off the parser itself.

An admin meets the same conventions everywhere: every command has a
description, every option and argument says what it is for, sub-commands are
all called COMMAND, and every command that reads the configuration takes
``--config PATH`` with the same default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from gateway.cli import build_parser
from gateway.commands import DEFAULT_CONFIG


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("medgw",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _subcommand_groups(
    parser: argparse.ArgumentParser,
) -> list[argparse._SubParsersAction[argparse.ArgumentParser]]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def test_every_command_has_a_description() -> None:
    missing = [" ".join(path) for path, p in _commands(build_parser()) if not p.description]
    assert missing == []


def test_every_option_and_argument_has_help_text() -> None:
    missing = []
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_sub_commands_are_all_called_command() -> None:
    names = {
        group.metavar
        for _, parser in _commands(build_parser())
        for group in _subcommand_groups(parser)
    }
    assert names == {"COMMAND"}


def test_every_config_option_has_the_same_default() -> None:
    seen = []
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if "--config" in action.option_strings:
                seen.append(" ".join(path))
                # audit verify takes --config or --file, and falls back to the default itself
                if path[-2:] != ("audit", "verify"):
                    assert action.default == DEFAULT_CONFIG, path
                assert not action.required, path
    assert {"medgw run", "medgw check-config", "medgw queue list", "medgw peers list"} <= set(seen)
