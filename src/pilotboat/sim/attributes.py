"""Notification attributes a management server sets with Write-Attributes (``PUT /path?pmin=…&gt=…``):
kept per path, inherited object -> instance -> resource, shown by Discover and used by observations.

``pmin``/``pmax`` (and ``epmin``/``epmax``) are seconds: the simulator accepts fractions so that tests
can run fast. ``gt``/``lt``/``st`` apply to numeric resources only. A name without a value removes that
attribute. A request with anything invalid changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from pilotboat.lwm2m.model import Path, ResourceType
from pilotboat.sim.objects import Refused, resource_type

PERIODS = ("pmin", "pmax", "epmin", "epmax")
THRESHOLDS = ("gt", "lt", "st")
NAMES = PERIODS + THRESHOLDS
NUMERIC = frozenset({ResourceType.INTEGER, ResourceType.UNSIGNED, ResourceType.FLOAT, ResourceType.TIME})
#: Longest accepted attribute value (a number).
MAX_VALUE_CHARS = 32

Attributes = dict[str, float]


def _number(name: str, text: str) -> float:
    if len(text) > MAX_VALUE_CHARS:
        raise Refused(f"attribute {name}: the value is too long")
    try:
        value = float(text)
    except ValueError:
        raise Refused(f"attribute {name}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Refused(f"attribute {name}: {text!r} is not a finite number")
    if name in PERIODS + ("st",) and value < 0:
        raise Refused(f"attribute {name} must not be negative")
    return value


def parse(query: Iterable[str], path: Path) -> dict[str, float | None]:
    """The attributes of a Write-Attributes query: name -> value, or None to remove it."""
    changes: dict[str, float | None] = {}
    for option in query:
        name, sep, text = option.partition("=")
        if name not in NAMES:
            raise Refused(f"{name!r} is not a notification attribute ({', '.join(NAMES)})")
        if name in changes:
            raise Refused(f"attribute {name} is given twice")
        if name in THRESHOLDS and resource_type(path) not in NUMERIC:
            raise Refused(f"attribute {name} applies to numeric resources only, not {path}")
        changes[name] = _number(name, text) if sep else None
    if not changes:
        raise Refused("Write-Attributes names no attribute")
    return changes


class AttributeStore:
    """The attributes attached to each path (``/`` never has any)."""

    def __init__(self) -> None:
        self._by_path: dict[Path, Attributes] = {}

    def write(self, path: Path, query: Iterable[str]) -> None:
        """Apply a Write-Attributes query to ``path``; ``Refused`` (and no change) when it is invalid or
        leaves ``lt`` + 2 ``st`` not below ``gt``."""
        if not path.depth:
            raise Refused("attributes cannot be attached to /")
        attached = dict(self._by_path.get(path, {}))
        for name, value in parse(query, path).items():
            if value is None:
                attached.pop(name, None)
            else:
                attached[name] = value
        if {"gt", "lt"} <= attached.keys() and attached["lt"] + 2 * attached.get("st", 0.0) >= attached["gt"]:
            raise Refused("attributes: lt + 2 * st must be below gt")
        if attached:
            self._by_path[path] = attached
        else:
            self._by_path.pop(path, None)

    def at(self, path: Path) -> Attributes:
        """The attributes attached to exactly ``path``."""
        return dict(self._by_path.get(path, {}))

    def effective(self, path: Path) -> Attributes:
        """The attributes in force at ``path``: the object's, overridden by the instance's, overridden
        by the resource's (and the resource instance's)."""
        merged: Attributes = {}
        for depth in range(1, path.depth + 1):
            merged.update(self._by_path.get(Path.of(*path.ids[:depth]), {}))
        return merged

    def forget(self, path: Path) -> None:
        """Drop the attributes of ``path`` and below it (a deleted instance)."""
        for attached in [attached for attached in self._by_path if attached.is_within(path)]:
            del self._by_path[attached]

    def clear(self) -> None:
        self._by_path.clear()

    def link_params(self, path: Path) -> tuple[tuple[str, str], ...]:
        """The attributes attached to ``path`` as link-format parameters, in the order of ``NAMES``."""
        attached = self._by_path.get(path, {})
        return tuple((name, _text(attached[name])) for name in NAMES if name in attached)


def _text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
