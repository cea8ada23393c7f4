"""``[[responsible]]``: who answers for communication, encryption, authentication
and incidents (NET-6b)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.tomlreader import Reader, Section

# What an administrator named in [[responsible]] answers for (NET-6b); "incidents" is
# called about every alert.
RESPONSIBILITIES = ("communication", "encryption", "authentication", "incidents")
MAX_RESPONSIBLE_TEXT = 200


@dataclass(frozen=True)
class Responsible:
    """An administrator named in ``[[responsible]]`` (NET-6b): who to call."""

    name: str
    role: str  # the position, e.g. "医療情報システム管理者" or "network administrator"
    contact: str  # telephone, extension, mail: how to reach them
    responsible_for: tuple[str, ...]  # of RESPONSIBILITIES

    def describe(self) -> str:
        return f"{self.name} ({self.role}; {self.contact})"


def who_to_call(people: Sequence[Responsible], area: str) -> tuple[Responsible, ...]:
    """Those responsible for ``area`` and for incidents; everyone named if none is."""
    found = tuple(
        p for p in people if area in p.responsible_for or "incidents" in p.responsible_for
    )
    return found or tuple(people)


def load_responsible(reader: Reader, root: Section, source: Path) -> tuple[Responsible, ...]:
    """``[[responsible]]``: the administrators for communication, encryption and
    authentication (NET-6b).  None named, or an area without anyone, is a warning: the
    gateway runs, but an alert would not say who to call."""
    people: list[Responsible] = []
    for item in root.tables("responsible") if root.has("responsible") else []:
        texts = {}
        for key, example in (
            ("name", '"Hanako Sato"'),
            ("role", '"medical information systems manager"'),
            ("contact", '"ext. 4321, it-security@hospital.example"'),
        ):
            text = item.string(key, example=example)
            if len(text) > MAX_RESPONSIBLE_TEXT or not text.isprintable():
                item.problem(
                    key,
                    f"must be one line of at most {MAX_RESPONSIBLE_TEXT} characters",
                    f"shorten it, e.g. {key} = {example}",
                )
            texts[key] = text
        areas = item.string_list("responsible_for", empty_fix=f"name some of {RESPONSIBILITIES}")
        for area in areas:
            if area not in RESPONSIBILITIES:
                item.problem(
                    "responsible_for",
                    f"{area!r} is not one of {', '.join(RESPONSIBILITIES)}",
                    f"use some of: {', '.join(RESPONSIBILITIES)}",
                )
        item.finish()
        people.append(Responsible(texts["name"], texts["role"], texts["contact"], tuple(areas)))
    root.mark_seen("responsible")
    for area in RESPONSIBILITIES[:3]:
        if not any(area in p.responsible_for for p in people):
            reader.add(
                source,
                "responsible",
                f"no one is named responsible for {area} (NET-6b): alerts, check-config "
                "and diagnose cannot say who to call",
                "add a [[responsible]] table with name, role, contact and "
                f'responsible_for = ["{area}", ...] to gateway.toml',
                "warning",
            )
    return tuple(people)
