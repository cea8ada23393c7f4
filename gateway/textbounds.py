"""Bounds on what goes into an audit record or a log line.

Much of an audit record's text comes from outside: a peer's Message-ID, the
names in its certificates, what its message says about itself, a parser's
complaint about its bytes.  Every string is cut to MAX_TEXT characters (the
cut says how many were left out), every list or mapping to MAX_ITEMS items,
and nesting to MAX_DEPTH levels, so that no single record or line can be made
megabytes long, whatever the caller forgot to bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_TEXT = 2000  # characters of one string
MAX_ITEMS = 64  # items of one list or mapping
MAX_DEPTH = 6  # levels of nested lists and mappings


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def bounded(value: Any, *, limit: int = MAX_TEXT, depth: int = 0) -> Any:
    """``value`` with every string clipped and every container cut (see the module)."""
    kind = type(value)
    if kind is str:  # the common case first: every log line and audit record
        return value if len(value) <= limit else clip(value, limit)
    if kind is int or kind is bool or value is None:
        return value
    if isinstance(value, str):
        return clip(value, limit)
    if kind is dict and depth < MAX_DEPTH and _flat_and_short(value, limit):
        return value  # nothing to cut: what the copy below would be, without copying
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return clip(repr(value), limit)
        items = list(value.items())
        out = {
            clip(str(k), 200): bounded(v, limit=limit, depth=depth + 1)
            for k, v in items[:MAX_ITEMS]
        }
        if len(items) > MAX_ITEMS:
            out["..."] = f"{len(items) - MAX_ITEMS} more items"
        return out
    if isinstance(value, list | tuple):
        if depth >= MAX_DEPTH:
            return clip(repr(value), limit)
        items = list(value)
        shown = [bounded(v, limit=limit, depth=depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            shown.append(f"... {len(items) - MAX_ITEMS} more items")
        return shown
    return value


def _flat_and_short(value: dict[Any, Any], limit: int) -> bool:
    """Whether ``value`` (a dict) holds nothing :func:`bounded` would change: at most
    MAX_ITEMS items, each key a string of at most 200 characters, each value a string of
    at most ``limit`` characters, a number, a bool or None.  The detail of almost every
    audit record, looked at without a call per item."""
    if len(value) > MAX_ITEMS:
        return False
    for key, item in value.items():
        if type(key) is not str or len(key) > 200:
            return False
        kind = type(item)
        if kind is str:
            if len(item) > limit:
                return False
        elif not (item is None or kind is int or kind is bool or kind is float):
            return False
    return True
