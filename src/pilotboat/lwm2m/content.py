"""Content-format numbers, the single-resource formats (plain text 0, opaque 42) and the one
``decode`` / ``encode`` dispatch the rest of the server uses for resource values.

Link-format (40) carries links rather than values and has its own module, ``linkformat``.
"""

from __future__ import annotations

import base64
import binascii

from pilotboat.lwm2m import senml, tlv
from pilotboat.lwm2m.model import (
    CodecError,
    Entry,
    ObjLink,
    Path,
    Payload,
    ResourceType,
    UnsupportedFormat,
    Value,
    Values,
    as_entries,
    check_size,
    check_value,
)
from pilotboat.lwm2m.tlv import TypeLookup

TEXT = 0
LINK_FORMAT = 40
OPAQUE = 42
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112
TLV_LEGACY = 1542
JSON_LEGACY = 1543
TLV = 11542
LWM2M_JSON = 11543
LWM2M_CBOR = 11544

NAMES = {
    TEXT: "text/plain",
    LINK_FORMAT: "application/link-format",
    OPAQUE: "application/octet-stream",
    CBOR: "application/cbor",
    SENML_JSON: "application/senml+json",
    SENML_CBOR: "application/senml+cbor",
    TLV_LEGACY: "application/vnd.oma.lwm2m+tlv (legacy 1542)",
    JSON_LEGACY: "application/vnd.oma.lwm2m+json (legacy 1543)",
    TLV: "application/vnd.oma.lwm2m+tlv",
    LWM2M_JSON: "application/vnd.oma.lwm2m+json",
    LWM2M_CBOR: "application/vnd.oma.lwm2m+cbor",
}
#: The value formats ``decode`` and ``encode`` handle.
SUPPORTED = frozenset({TEXT, OPAQUE, SENML_JSON, SENML_CBOR, TLV, TLV_LEGACY})


def format_name(content_format: int) -> str:
    return NAMES.get(content_format, f"content format {content_format}")


# --- single-resource formats --------------------------------------------------------------------


def _single_target(base: Path, what: str) -> None:
    if base.depth < 3:
        raise CodecError(f"{what}: carries one resource value, so the target must be a resource, not {base}")


def _single_entry(values: Values, base: Path, what: str) -> Entry:
    _single_target(base, what)
    entries = as_entries(values, base)
    if len(entries) != 1 or entries[0].path != base:
        raise CodecError(f"{what}: needs exactly one value, at {base}")
    return entries[0]


def text_value(text: str, kind: ResourceType, where: object = "text") -> Value:
    """Plain-text ``text`` read as a resource of type ``kind`` (opaque values are base64)."""
    stripped = text.strip()
    if kind in (ResourceType.INTEGER, ResourceType.TIME, ResourceType.UNSIGNED):
        digits = stripped[1:] if stripped[:1] in "+-" else stripped
        if not (digits.isascii() and digits.isdecimal()) or len(digits) > 20:
            raise CodecError(f"{where}: {text[:40]!r} is not an integer")
        number = int(stripped)
        if kind is ResourceType.UNSIGNED and number < 0:
            raise CodecError(f"{where}: {number} is not an unsigned integer")
        return check_value(number, where)
    if kind is ResourceType.FLOAT:
        if len(stripped) > 400:
            raise CodecError(f"{where}: the number is too long")
        try:
            return float(stripped)
        except ValueError as exc:
            raise CodecError(f"{where}: {text[:40]!r} is not a number") from exc
    if kind is ResourceType.BOOLEAN:
        flag = stripped.lower()
        if flag not in ("0", "1", "true", "false"):
            raise CodecError(f"{where}: {text[:40]!r} is not a boolean (0 or 1)")
        return flag in ("1", "true")
    if kind is ResourceType.OPAQUE:
        try:
            return base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CodecError(f"{where}: opaque plain text must be base64 ({exc})") from exc
    if kind is ResourceType.OBJLNK:
        return ObjLink.parse(stripped)
    return text


def decode_text(payload: bytes, base: Path, kind: ResourceType | None = None) -> Payload:
    """The one value of a plain-text payload: a ``str`` unless ``kind`` says otherwise."""
    check_size(payload, "text")
    _single_target(base, "text")
    try:
        text = bytes(payload).decode()
    except UnicodeDecodeError as exc:
        raise CodecError(f"text: the payload is not UTF-8 ({exc.reason})") from exc
    return (Entry(base, text_value(text, kind, base) if kind is not None else text),)


def encode_text(values: Values, base: Path) -> bytes:
    value = _single_entry(values, base, "text").value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, bytes):
        return base64.b64encode(value)
    if isinstance(value, int | float | ObjLink):
        return str(value).encode()
    try:
        return value.encode()
    except UnicodeEncodeError as exc:
        raise CodecError(f"text: the string is not encodable as UTF-8 ({exc.reason})") from exc


def decode_opaque(payload: bytes, base: Path) -> Payload:
    check_size(payload, "opaque")
    _single_target(base, "opaque")
    return (Entry(base, bytes(payload)),)


def encode_opaque(values: Values, base: Path) -> bytes:
    value = _single_entry(values, base, "opaque").value
    if not isinstance(value, bytes):
        raise CodecError(f"opaque: {base} must be bytes, not {type(value).__name__}")
    return value


# --- dispatch -----------------------------------------------------------------------------------


def _unsupported(content_format: int) -> UnsupportedFormat:
    if content_format == LINK_FORMAT:
        return UnsupportedFormat("link-format carries links, not resource values (use lwm2m.linkformat)")
    return UnsupportedFormat(f"{format_name(content_format)} is not supported for resource values")


def decode(content_format: int, payload: bytes, base: Path, types: TypeLookup | None = None) -> Payload:
    """The entries of ``payload`` in ``content_format`` addressed to ``base``. ``types`` gives resource
    types for the untyped formats (TLV values stay ``bytes`` and text values ``str`` without it)."""
    if content_format in (TLV, TLV_LEGACY):
        return tlv.decode(payload, base, types)
    if content_format == SENML_JSON:
        return senml.decode_json(payload, base)
    if content_format == SENML_CBOR:
        return senml.decode_cbor(payload, base)
    if content_format == TEXT:
        return decode_text(payload, base, types(base) if types is not None and base.depth >= 3 else None)
    if content_format == OPAQUE:
        return decode_opaque(payload, base)
    raise _unsupported(content_format)


def encode(content_format: int, values: Values, base: Path) -> bytes:
    """``values`` (a path → value mapping or entries) in ``content_format`` for a request to ``base``."""
    if content_format in (TLV, TLV_LEGACY):
        return tlv.encode(values, base)
    if content_format == SENML_JSON:
        return senml.encode_json(values, base)
    if content_format == SENML_CBOR:
        return senml.encode_cbor(values, base)
    if content_format == TEXT:
        return encode_text(values, base)
    if content_format == OPAQUE:
        return encode_opaque(values, base)
    raise _unsupported(content_format)
