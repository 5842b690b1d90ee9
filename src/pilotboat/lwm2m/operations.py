"""Device management operations as pure functions: an operation, a path and JSON input become a
``DeviceRequest``; a ``Reply`` becomes a JSON-friendly result (decoded values, discovered links, or the
device's error). No I/O: the services send and wait.

JSON forms of LwM2M values: booleans, numbers and strings as themselves; opaque bytes as
``{"base64": "..."}`` and object links as ``{"objlnk": "3:0"}``. On writes a resource of known type
also takes base64 text (opaque) or ``"3:0"`` (object link), and integers for floats.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.lwm2m.messages import DeviceRequest, Reply
from pilotboat.lwm2m.model import (
    CodecError,
    Entry,
    ObjLink,
    Path,
    ResourceType,
    Value,
    as_dict,
    check_value,
)

#: Longest diagnostic text of a device's error kept in a result.
MAX_DIAGNOSTIC_CHARS = 256
#: Values one write may carry.
MAX_WRITE_VALUES = 1000
MAX_ARGUMENTS_CHARS = 1024


class Operation(enum.StrEnum):
    READ = "read"
    DISCOVER = "discover"
    WRITE = "write"
    WRITE_PARTIAL = "write-partial"
    WRITE_ATTRIBUTES = "write-attributes"
    EXECUTE = "execute"
    CREATE = "create"
    DELETE = "delete"
    OBSERVE = "observe"


#: Path depths each operation accepts (1 object, 2 instance, 3 resource, 4 resource instance).
DEPTHS: dict[Operation, tuple[int, ...]] = {
    Operation.READ: (1, 2, 3, 4),
    Operation.DISCOVER: (1, 2, 3),
    Operation.WRITE: (2, 3, 4),
    Operation.WRITE_PARTIAL: (2,),
    Operation.WRITE_ATTRIBUTES: (1, 2, 3, 4),
    Operation.EXECUTE: (3,),
    Operation.CREATE: (1,),
    Operation.DELETE: (2,),
    Operation.OBSERVE: (1, 2, 3, 4),
}
_LEVELS = {1: "an object (/3)", 2: "an object instance (/3/0)", 3: "a resource (/3/0/1)", 4: "a resource instance (/3/0/7/0)"}

#: Format names callers use, and the names results show.
FORMATS: dict[str, int] = {
    "tlv": content.TLV, "senml-json": content.SENML_JSON, "senml-cbor": content.SENML_CBOR, "text": content.TEXT,
    "opaque": content.OPAQUE,
}
_LABELS: dict[int, str] = {
    **{number: name for name, number in FORMATS.items()},
    content.TLV_LEGACY: "tlv-legacy", content.LINK_FORMAT: "link-format", content.CBOR: "cbor",
    content.JSON_LEGACY: "json-legacy", content.LWM2M_JSON: "lwm2m-json", content.LWM2M_CBOR: "lwm2m-cbor",
}

#: Types of the IPSO reusable resources (ids 5500 and up, the same meaning in every IPSO object).
IPSO_RESOURCE_TYPES: dict[int, ResourceType | None] = {
    5500: ResourceType.BOOLEAN, 5501: ResourceType.INTEGER, 5518: ResourceType.TIME, 5601: ResourceType.FLOAT,
    5602: ResourceType.FLOAT, 5603: ResourceType.FLOAT, 5604: ResourceType.FLOAT, 5605: None,
    5700: ResourceType.FLOAT, 5701: ResourceType.STRING, 5750: ResourceType.STRING, 5850: ResourceType.BOOLEAN,
    5851: ResourceType.INTEGER, 5852: ResourceType.INTEGER,
}
#: The first object id of the IPSO Smart Objects.
IPSO_FIRST_OBJECT = 3200

#: Write-Attributes parameters: the integer ones (seconds) and the numeric thresholds.
PERIOD_ATTRIBUTES = ("pmin", "pmax", "epmin", "epmax")
THRESHOLD_ATTRIBUTES = ("gt", "lt", "st")
ATTRIBUTES = PERIOD_ATTRIBUTES + THRESHOLD_ATTRIBUTES

#: Execute arguments (LwM2M 1.1 §5.4.5): ``digit[='text']`` separated by commas.
_ARGUMENTS = re.compile(r"[0-9](='[^']*')?(,[0-9](='[^']*')?)*")


class OperationError(ValueError):
    """Input that does not make a valid operation; ``field`` names what was wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SecurityObjectRefused(OperationError):
    """The operation touches the Security object (/0), which a management server must not access."""


# --- paths and types ------------------------------------------------------------------------------


def target(text: str, operation: Operation) -> Path:
    """The path an operation addresses (``"/3/0/1"`` or ``"3/0/1"``), checked against what the
    operation accepts; the Security object (/0) is refused."""
    try:
        path = Path.parse(text if text.startswith("/") else "/" + text)
    except CodecError as exc:
        raise OperationError(str(exc), field="path") from None
    if path.depth and path.object_id == objects.SECURITY:
        raise SecurityObjectRefused(
            "the management server does not access the Security object (/0): it holds the device's keys", field="path",
        )
    if path.depth not in DEPTHS[operation]:
        wanted = " or ".join(_LEVELS[depth] for depth in DEPTHS[operation])
        raise OperationError(f"{operation} addresses {wanted}, not {path}", field="path")
    return path


def post_operation(text: str) -> Operation:
    """What a POST on ``text`` asks: create on an object, execute on anything else (``target`` then
    refuses what is not a resource)."""
    try:
        path = Path.parse(text if text.startswith("/") else "/" + text)
    except CodecError:
        return Operation.EXECUTE
    return Operation.CREATE if path.depth == 1 else Operation.EXECUTE


def resource_type(path: Path) -> ResourceType | None:
    """The type of the resource at ``path`` when known (core objects, IPSO reusable resources)."""
    if path.depth < 3:
        return None
    known = objects.resource_type(path)
    if known is None and (path.object_id or 0) >= IPSO_FIRST_OBJECT:
        known = IPSO_RESOURCE_TYPES.get(path.resource_id or 0)
    return known


def is_executable(path: Path) -> bool:
    """Whether ``path`` is a resource known to be executable (it has no value)."""
    if path.depth != 3:
        return False
    table = objects.RESOURCE_TYPES.get(path.object_id or 0)
    if table is None and (path.object_id or 0) >= IPSO_FIRST_OBJECT:
        table = IPSO_RESOURCE_TYPES
    return table is not None and path.resource_id in table and table[path.resource_id or 0] is None


def server_instances(links: Iterable[str]) -> list[int]:
    """The Server object instances (``/1/x``) among a registration's object links, lowest first."""
    found = set()
    for link in links:
        try:
            path = Path.parse(link)
        except CodecError:
            continue
        if path.depth == 2 and path.object_id == objects.SERVER:
            found.add(path.instance_id or 0)
    return sorted(found)


def format_number(name: str) -> int:
    """The content format of a caller's format name (``tlv``, ``senml-json``…)."""
    number = FORMATS.get(name.strip().lower())
    if number is None:
        raise OperationError(f"format must be one of {', '.join(FORMATS)}, not {name!r}", field="format")
    return number


def format_label(number: int | None) -> str | None:
    return None if number is None else _LABELS.get(number, str(number))


def write_format(lwm2m_version: str, content_formats: Iterable[int]) -> int:
    """The format to write to a device in: SenML-CBOR (or SenML-JSON) when its registration announced
    it, else TLV (legacy 1542 when only that was announced), which every LwM2M 1.0 client reads."""
    announced = set(content_formats)
    for preferred in (content.SENML_CBOR, content.SENML_JSON, content.TLV):
        if preferred in announced:
            return preferred
    if content.TLV_LEGACY in announced and lwm2m_version == "1.0":
        return content.TLV_LEGACY
    return content.TLV


def read_accept(content_formats: Iterable[int]) -> int | None:
    """What to ask a device for when the caller names no format: a SenML format it announced (typed
    values), else nothing (the device chooses)."""
    announced = set(content_formats)
    for preferred in (content.SENML_CBOR, content.SENML_JSON):
        if preferred in announced:
            return preferred
    return None


# --- JSON values ------------------------------------------------------------------------------------


def json_value(value: Value) -> Any:
    """An LwM2M value as JSON (see the module docstring)."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, ObjLink):
        return {"objlnk": str(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def json_values(entries: Iterable[Entry]) -> dict[str, Any]:
    """Path text → JSON value; for a time series the last value of each path."""
    return {str(path): json_value(value) for path, value in as_dict(entries).items()}


def _base64(text: str, where: Path) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise OperationError(f"{where}: not valid base64", field="values") from None


def _tagged(raw: dict[Any, Any], where: Path) -> Value:
    if len(raw) == 1 and isinstance(raw.get("base64"), str):
        return _base64(raw["base64"], where)
    if len(raw) == 1 and isinstance(raw.get("objlnk"), str):
        try:
            return ObjLink.parse(raw["objlnk"])
        except CodecError as exc:
            raise OperationError(str(exc), field="values") from None
    raise OperationError(f'{where}: an object value is {{"base64": "..."}} or {{"objlnk": "3:0"}}', field="values")


def _typed(value: Value, kind: ResourceType, path: Path) -> Value | None:
    """``value`` as a value of a ``kind`` resource, or None when it does not fit."""
    integral = isinstance(value, int) and not isinstance(value, bool)
    if kind is ResourceType.BOOLEAN:
        return value if isinstance(value, bool) else None
    if kind in (ResourceType.INTEGER, ResourceType.TIME):
        return value if integral else None
    if kind is ResourceType.UNSIGNED:
        return value if integral and value >= 0 else None  # type: ignore[operator]
    if kind is ResourceType.FLOAT:
        if not (integral or isinstance(value, float)):
            return None
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:
            return None
    if kind is ResourceType.OPAQUE:
        return _base64(value, path) if isinstance(value, str) else value if isinstance(value, bytes) else None
    if kind is ResourceType.OBJLNK:
        return _tagged({"objlnk": value}, path) if isinstance(value, str) else value if isinstance(value, ObjLink) else None
    return value if isinstance(value, str) else None  # string, corelnk


def lwm2m_value(raw: Any, path: Path) -> Value:
    """A JSON value written to ``path``, checked against the resource's type when it is known."""
    if is_executable(path):
        raise OperationError(f"{path} is executable: it has no value to write (use POST to execute it)", field="values")
    if isinstance(raw, dict):
        value: Value | None = _tagged(raw, path)
    elif isinstance(raw, bool | int | float | str):
        value = raw
    else:
        raise OperationError(f"{path}: {type(raw).__name__} is not an LwM2M value", field="values")
    kind = resource_type(path)
    if kind is not None:
        value = _typed(value, kind, path)
        if value is None:
            shown = json.dumps(raw)[:40]
            raise OperationError(f"{path} is a resource of type {kind.value}: {shown} does not fit", field="values")
    if isinstance(value, float) and not math.isfinite(value):
        raise OperationError(f"{path}: the number must be finite", field="values")
    try:
        return check_value(value, path)
    except CodecError as exc:
        raise OperationError(str(exc), field="values") from None


_MISSING: Any = object()


@dataclass(frozen=True)
class WriteInput:
    """The body of a write or create: ``values`` (path text → JSON value) or one ``value`` for the target."""

    values: Mapping[str, Any] | None = None
    value: Any = _MISSING

    @property
    def has_value(self) -> bool:
        return self.value is not _MISSING


def write_values(body: WriteInput, at: Path) -> dict[Path, Value]:
    """The values of a write to ``at``: each path within ``at`` and checked against its type."""
    if body.values is not None and body.has_value:
        raise OperationError('give either "values" or "value", not both', field="values")
    if body.has_value:
        if at.depth < 3:
            raise OperationError(f'"value" writes one resource; {at} is not one: give "values"', field="value")
        return {at: lwm2m_value(body.value, at)}
    if not body.values:
        raise OperationError('give "values" (a map of paths to values) or "value"', field="values")
    if len(body.values) > MAX_WRITE_VALUES:
        raise OperationError(f"at most {MAX_WRITE_VALUES} values per write", field="values")
    values: dict[Path, Value] = {}
    for key, raw in body.values.items():
        try:
            path = Path.parse(key if key.startswith("/") else "/" + key)
        except CodecError as exc:
            raise OperationError(f"values: {exc}", field="values") from None
        if path.depth < 3:
            raise OperationError(f"values: {path} is not a resource (/object/instance/resource)", field="values")
        if not path.is_within(at):
            raise OperationError(f"values: {path} is not within the target {at}", field="values")
        values[path] = lwm2m_value(raw, path)
    return values


# --- attributes and arguments -------------------------------------------------------------------------


def _number_text(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(value)
    return format(Decimal(text), "f") if "e" in text or "E" in text else text


def attributes_query(attributes: Mapping[str, Any], at: Path) -> tuple[str, ...]:
    """The query of a Write-Attributes request: ``name=value`` to set, a bare ``name`` to clear (None)."""
    if not attributes:
        raise OperationError(f"give at least one attribute of {', '.join(ATTRIBUTES)}", field="attributes")
    query: list[str] = []
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise OperationError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTES)}", field=name)
        if name in THRESHOLD_ATTRIBUTES and at.depth < 3:
            raise OperationError(f"{name} applies to a numeric resource, not to {at}", field=name)
        if value is None:
            query.append(name)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise OperationError(f"{name} must be a number (or null to clear it)", field=name)
        if name in PERIOD_ATTRIBUTES and (not isinstance(value, int) or value < 0):
            raise OperationError(f"{name} is a whole number of seconds, 0 or more", field=name)
        if name == "st" and value < 0:
            raise OperationError("st (step) must be 0 or more", field=name)
        query.append(f"{name}={_number_text(value)}")
    given = {name: value for name, value in attributes.items() if value is not None}
    for low, high in (("pmin", "pmax"), ("epmin", "epmax")):
        if low in given and high in given and given[low] > given[high]:
            raise OperationError(f"{low} must not exceed {high}", field=low)
    if "lt" in given and "gt" in given:
        if given["lt"] >= given["gt"]:
            raise OperationError("lt must be below gt", field="lt")
        if "st" in given and given["lt"] + 2 * given["st"] >= given["gt"]:
            raise OperationError("lt + 2 × st must be below gt", field="st")
    return tuple(query)


def execute_arguments(arguments: str | None) -> bytes:
    """The payload of an Execute: ``0='value',1`` (digits, optional quoted values), or nothing."""
    if not arguments:
        return b""
    if len(arguments) > MAX_ARGUMENTS_CHARS or not arguments.isascii() or not arguments.isprintable():
        raise OperationError(f"arguments: printable ASCII of at most {MAX_ARGUMENTS_CHARS} characters", field="arguments")
    if _ARGUMENTS.fullmatch(arguments) is None:
        raise OperationError("arguments: a comma-separated list of 0..9, each optionally ='text' (e.g. 0='on',1)",
                             field="arguments")
    return arguments.encode()


# --- requests -----------------------------------------------------------------------------------------


def _encoded(fmt: int, values: Mapping[Path, Value], at: Path) -> bytes:
    try:
        return content.encode(fmt, values, at)
    except CodecError as exc:
        raise OperationError(f"cannot write these values as {format_label(fmt)}: {exc}", field="values") from None


def read_request(at: Path, accept: int | None) -> DeviceRequest:
    return DeviceRequest("GET", at, accept=accept)


def observe_request(at: Path, accept: int | None) -> DeviceRequest:
    """The GET that starts an observation (the door adds Observe: 0)."""
    return DeviceRequest("GET", at, accept=accept)


def discover_request(at: Path) -> DeviceRequest:
    return DeviceRequest("GET", at, accept=content.LINK_FORMAT)


def write_request(at: Path, values: Mapping[Path, Value], fmt: int, *, partial: bool = False) -> DeviceRequest:
    """Write (replace: PUT; partial update: POST on the instance)."""
    return DeviceRequest("POST" if partial else "PUT", at, payload=_encoded(fmt, values, at), content_format=fmt)


def create_request(at: Path, values: Mapping[Path, Value], fmt: int) -> DeviceRequest:
    """Create one instance of object ``at``: every value under one ``/object/instance``."""
    instances = {path.instance_id for path in values}
    if len(instances) != 1:
        raise OperationError("create makes one instance: give values of one /object/instance", field="values")
    return DeviceRequest("POST", at, payload=_encoded(fmt, values, at), content_format=fmt)


def execute_request(at: Path, arguments: str | None) -> DeviceRequest:
    payload = execute_arguments(arguments)
    return DeviceRequest("POST", at, payload=payload, content_format=content.TEXT if payload else None)


def delete_request(at: Path) -> DeviceRequest:
    return DeviceRequest("DELETE", at)


def attributes_request(at: Path, attributes: Mapping[str, Any]) -> DeviceRequest:
    return DeviceRequest("PUT", at, query=attributes_query(attributes, at))


# --- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the device answered, ready for JSON."""

    code: str
    ok: bool
    format: str | None
    values: dict[str, Any] | None = None
    links: list[dict[str, Any]] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "ok": self.ok, "format": self.format}
        for name in ("values", "links", "error"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return {**body, **self.extra}


def diagnostic(reply: Reply) -> str:
    """The device's explanation of an error: its diagnostic payload, or the code's name."""
    text = reply.payload.decode("utf-8", "replace").strip() if reply.payload else ""
    if not text or not text.isprintable():
        major, minor = reply.code.split(".")
        text = Code(int(major) * 32 + int(minor)).name_printable
    return text[:MAX_DIAGNOSTIC_CHARS]


def decode_values(reply: Reply, at: Path) -> dict[str, Any]:
    """The values of a read or notification; ``CodecError`` when the payload cannot be read."""
    if not reply.payload:
        return {}
    fmt = reply.content_format
    if fmt is None:  # no Content-Format: plain text is all a device may send so
        fmt = content.TEXT
    return json_values(content.decode(fmt, reply.payload, at, resource_type))


def discovered_links(payload: bytes) -> list[dict[str, Any]]:
    """Discover's link-format as ``[{"path": "/3/0", "attributes": {"pmin": "5", "obs": true}}]``."""
    return [
        {"path": link.target, "attributes": {name: True if value is None else value for name, value in link.params}}
        for link in linkformat.decode(payload)
    ]


def outcome(operation: Operation, reply: Reply, at: Path) -> Outcome:
    """The JSON-ready result of ``operation`` on ``at`` answered with ``reply``."""
    label = format_label(reply.content_format)
    if not reply.ok:
        return Outcome(reply.code, False, label, error=diagnostic(reply))
    try:
        if operation is Operation.DISCOVER:
            return Outcome(reply.code, True, label, links=discovered_links(reply.payload))
        if operation in (Operation.READ, Operation.OBSERVE):
            return Outcome(reply.code, True, label or ("text" if reply.payload else None), values=decode_values(reply, at))
    except CodecError as exc:
        return Outcome(reply.code, True, label, error=f"the device's answer could not be read: {exc}",
                       extra={"payload": base64.b64encode(reply.payload).decode()})
    return Outcome(reply.code, True, label)
