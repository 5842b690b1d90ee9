"""LwM2M value types shared by the codecs: paths, object links, resource values and decoded entries.

Pure data and validation: no I/O. Anything built from untrusted input that does not fit the LwM2M data
model raises ``CodecError`` with a message that says what was wrong.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The largest payload any decoder accepts (registrations and bootstrap configurations are far smaller).
MAX_PAYLOAD_BYTES = 1 << 20
MAX_ID = 65535
INT_MIN = -(1 << 63)
#: Unsigned integers may use the full 64 bits.
INT_MAX = (1 << 64) - 1


class CodecError(ValueError):
    """A payload, path or value that does not fit its content format or the LwM2M data model."""


class UnsupportedFormat(CodecError):
    """A content format this server does not read or write (CoAP 4.15 on writes, 4.06 on reads)."""


def check_size(payload: bytes, what: str) -> None:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"{what}: the payload must be bytes, not {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"{what}: the payload is larger than {MAX_PAYLOAD_BYTES} bytes")


@dataclass(frozen=True)
class Path:
    """``/object/instance/resource/resource-instance``; trailing levels are None (all None: ``/``)."""

    object_id: int | None = None
    instance_id: int | None = None
    resource_id: int | None = None
    resource_instance_id: int | None = None

    def __post_init__(self) -> None:
        ids = self.ids_with_none()
        seen_none = False
        for value in ids:
            if value is None:
                seen_none = True
            elif seen_none:
                raise CodecError(f"path: a lower level is set without the one above it ({ids})")
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
                raise CodecError(f"path: identifiers are integers 0..{MAX_ID}, not {value!r}")

    def ids_with_none(self) -> tuple[int | None, ...]:
        return (self.object_id, self.instance_id, self.resource_id, self.resource_instance_id)

    @property
    def ids(self) -> tuple[int, ...]:
        """The identifiers that are set, outermost first."""
        return tuple(value for value in self.ids_with_none() if value is not None)

    @property
    def depth(self) -> int:
        """0 for ``/``, 1 for an object, 2 instance, 3 resource, 4 resource instance."""
        return len(self.ids)

    @classmethod
    def of(cls, *ids: int) -> Path:
        if len(ids) > 4:
            raise CodecError(f"path: at most 4 levels, not {len(ids)}")
        return cls(*ids)

    @classmethod
    def parse(cls, text: str) -> Path:
        """``"/3/0/1"`` (a leading slash is required; one trailing slash is tolerated, ``"/"`` is root)."""
        if not isinstance(text, str) or not text.startswith("/"):
            raise CodecError(f"path: {text!r} must start with '/'")
        body = text[1:]
        if body.endswith("/") and body != "/":
            body = body[:-1]
        if not body:
            return cls()
        parts = body.split("/")
        if len(parts) > 4:
            raise CodecError(f"path: {text!r} has more than 4 levels")
        ids = []
        for part in parts:
            # isdecimal() rules out signs, spaces and non-ASCII digits that int() would accept.
            if not (part.isascii() and part.isdecimal()) or len(part) > 5:
                raise CodecError(f"path: {text!r} has a segment {part!r} that is not an identifier")
            ids.append(int(part))
        return cls.of(*ids)

    def child(self, identifier: int) -> Path:
        return Path.of(*self.ids, identifier)

    @property
    def parent(self) -> Path:
        if not self.depth:
            raise CodecError("path: the root has no parent")
        return Path.of(*self.ids[:-1])

    def is_within(self, other: Path) -> bool:
        """True when this path equals ``other`` or lies below it."""
        return self.ids[: other.depth] == other.ids

    def relative_to(self, other: Path) -> tuple[int, ...]:
        if not self.is_within(other):
            raise CodecError(f"path: {self} is not within {other}")
        return self.ids[other.depth :]

    def __str__(self) -> str:
        return "/" + "/".join(str(value) for value in self.ids)


ROOT = Path()


@dataclass(frozen=True, order=True)
class ObjLink:
    """An object link ``object:instance``; ``65535:65535`` is the null link."""

    object_id: int
    instance_id: int

    def __post_init__(self) -> None:
        for value in (self.object_id, self.instance_id):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
                raise CodecError(f"objlnk: identifiers are integers 0..{MAX_ID}, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> ObjLink:
        """``"3:0"`` as SenML ``vlo`` and plain text carry it."""
        left, sep, right = text.partition(":")
        if not sep or not all(part.isascii() and part.isdecimal() and len(part) <= 5 for part in (left, right)):
            raise CodecError(f"objlnk: {text!r} is not 'object:instance'")
        return cls(int(left), int(right))

    def __str__(self) -> str:
        return f"{self.object_id}:{self.instance_id}"


#: A resource value as the codecs carry it. ``bytes`` is also what untyped formats (TLV) decode to
#: until a ``ResourceType`` says how to read the bytes.
Value = bool | int | float | str | bytes | ObjLink


class ResourceType(enum.Enum):
    """The data types of the LwM2M object model (``time`` is an integer of seconds)."""

    STRING = "string"
    INTEGER = "integer"
    UNSIGNED = "unsigned"
    FLOAT = "float"
    BOOLEAN = "boolean"
    OPAQUE = "opaque"
    TIME = "time"
    OBJLNK = "objlnk"
    CORELNK = "corelnk"


def check_value(value: object, where: object) -> Value:
    """``value`` if it is a representable LwM2M value, else a ``CodecError`` naming ``where``."""
    if isinstance(value, bool | str | bytes | ObjLink):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CodecError(f"{where}: integer {value} does not fit 64 bits")
        return value
    if isinstance(value, float):
        return value
    raise CodecError(f"{where}: {type(value).__name__} is not an LwM2M value")


@dataclass(frozen=True)
class Entry:
    """One decoded value: where it belongs, the value, and its SenML time when the payload gave one."""

    path: Path
    value: Value
    time: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            raise CodecError(f"entry: the path must be a Path, not {type(self.path).__name__}")
        if self.path.depth < 3:
            raise CodecError(f"{self.path}: values belong to resources or resource instances")
        check_value(self.value, self.path)
        if self.time is not None and (isinstance(self.time, bool) or not isinstance(self.time, int | float)):
            raise CodecError(f"{self.path}: time must be a number")


#: What every decoder returns: the entries in payload order.
Payload = tuple[Entry, ...]
Values = Mapping[Path, Value] | Iterable[Entry]


def as_entries(values: Values, base: Path) -> Payload:
    """Entries from a mapping or an iterable of entries, each checked to lie within ``base``."""
    if isinstance(values, Mapping):
        entries = tuple(Entry(path, value) for path, value in values.items())
    else:
        entries = tuple(values)
        for entry in entries:
            if not isinstance(entry, Entry):
                raise CodecError(f"expected Entry objects, not {type(entry).__name__}")
    for entry in entries:
        if not entry.path.is_within(base):
            raise CodecError(f"{entry.path} is not within the target path {base}")
    return entries


def as_dict(payload: Iterable[Entry]) -> dict[Path, Value]:
    """Path → value; for repeated paths (a SenML time series) the last entry wins."""
    return {entry.path: entry.value for entry in payload}
