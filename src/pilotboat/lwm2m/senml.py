"""SenML-JSON (content format 110) and SenML-CBOR (112) as LwM2M uses them (RFC 8428).

A record's name is the current base name (``bn``, kept until the next ``bn``) followed by its ``n``, and
must be an LwM2M path. Value fields: ``v`` (number, plus ``bv`` when given), ``vs``, ``vb``, ``vd``
(base64url in JSON, a byte string in CBOR) and ``vlo`` (object link ``"3:0"``). A time is reported only
when the payload has ``bt`` or ``t``. Units and sums are ignored; unknown fields ending in ``_`` are
"must understand" and rejected, as RFC 8428 requires.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

import cbor2

from pilotboat.lwm2m.model import (
    CodecError,
    Entry,
    ObjLink,
    Path,
    Payload,
    Value,
    Values,
    as_entries,
    check_size,
    check_value,
)

#: SenML-CBOR integer labels (RFC 8428 section 6); ``vlo`` has none and stays a text key.
CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs", 0: "n", 1: "u", 2: "v", 3: "vs",
               4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
CBOR_KEYS = {name: label for label, name in CBOR_LABELS.items()}
VALUE_FIELDS = ("v", "vs", "vb", "vd", "vlo")
#: SenML is an array of flat maps; anything nested deeper is not SenML.
MAX_CBOR_DEPTH = 4


# --- decoding -----------------------------------------------------------------------------------


def _number(value: object, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{where} must be a number, not {type(value).__name__}")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{where} must be a text string, not {type(value).__name__}")
    return value


def _base64url(text: str, where: str) -> bytes:
    """RFC 8428 says base64url without padding; padding and the standard alphabet are tolerated."""
    cleaned = text.strip().rstrip("=").replace("+", "-").replace("/", "_")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CodecError(f"{where}: 'vd' is not base64url ({exc})") from exc


def _value(fields: dict[str, Any], base_value: float | None, where: str) -> Value:
    present = [name for name in VALUE_FIELDS if name in fields]
    if len(present) != 1:
        if not present:
            raise CodecError(f"{where} has no value (one of {', '.join(VALUE_FIELDS)})")
        raise CodecError(f"{where} has more than one value field ({', '.join(present)})")
    name = present[0]
    raw = fields[name]
    if name == "v":
        number = _number(raw, f"{where}: 'v'")
        return check_value(number + base_value if base_value is not None else number, where)
    if name == "vs":
        return _text(raw, f"{where}: 'vs'")
    if name == "vb":
        if not isinstance(raw, bool):
            raise CodecError(f"{where}: 'vb' must be a boolean, not {type(raw).__name__}")
        return raw
    if name == "vd":
        if isinstance(raw, bytes):
            return raw
        return _base64url(_text(raw, f"{where}: 'vd'"), where)
    return ObjLink.parse(_text(raw, f"{where}: 'vlo'"))


def _records(items: object, base: Path, what: str) -> Payload:
    if not isinstance(items, list):
        raise CodecError(f"{what}: the payload must be an array of records, not {type(items).__name__}")
    base_name = ""
    base_time: int | float | None = None
    base_value: int | float | None = None
    entries: list[Entry] = []
    for index, record in enumerate(items):
        where = f"{what} record {index}"
        if not isinstance(record, dict):
            raise CodecError(f"{where} must be a map, not {type(record).__name__}")
        fields: dict[str, Any] = {}
        for key, field in record.items():
            name = CBOR_LABELS.get(key) if isinstance(key, int) and not isinstance(key, bool) else key
            if isinstance(name, str):
                if name.endswith("_"):
                    raise CodecError(f"{where} has the must-understand field {name!r}, which is not supported")
                fields[name] = field
        if "bver" in fields and (isinstance(fields["bver"], bool) or not isinstance(fields["bver"], int)):
            raise CodecError(f"{where}: 'bver' must be an integer")
        if "bn" in fields:
            base_name = _text(fields["bn"], f"{where}: 'bn'")
        if "bt" in fields:
            base_time = _number(fields["bt"], f"{where}: 'bt'")
        if "bv" in fields:
            base_value = _number(fields["bv"], f"{where}: 'bv'")
        if "n" not in fields and not any(name in fields for name in VALUE_FIELDS):
            continue  # a record that only sets base fields
        name = base_name + _text(fields.get("n", ""), f"{where}: 'n'")
        try:
            path = Path.parse(name)
        except CodecError as exc:
            raise CodecError(f"{where}: the name {name!r} is not an LwM2M path ({exc})") from exc
        if not path.is_within(base):
            raise CodecError(f"{where}: {path} is not within the target path {base}")
        time = None
        if "t" in fields or base_time is not None:
            time = (base_time or 0) + _number(fields.get("t", 0), f"{where}: 't'")
        if path.depth < 3:
            raise CodecError(f"{where}: {path} is not a resource or resource instance, so it cannot hold a value")
        entries.append(Entry(path, _value(fields, base_value, where), time))
    return tuple(entries)


def _reject_constant(name: str) -> float:
    raise CodecError(f"SenML-JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise CodecError(f"SenML-JSON: the number {text[:40]} is out of range")
    return number


def decode_json(payload: bytes, base: Path) -> Payload:
    """The entries of a SenML-JSON payload; every name must lie within ``base``."""
    check_size(payload, "SenML-JSON")
    try:
        text = bytes(payload).decode()
        items = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except CodecError:
        raise
    except UnicodeDecodeError as exc:
        raise CodecError(f"SenML-JSON: the payload is not UTF-8 ({exc.reason})") from exc
    except RecursionError as exc:
        raise CodecError("SenML-JSON: the payload is nested too deeply") from exc
    except ValueError as exc:
        raise CodecError(f"SenML-JSON: not valid JSON ({exc})") from exc
    return _records(items, base, "SenML-JSON")


def decode_cbor(payload: bytes, base: Path) -> Payload:
    """The entries of a SenML-CBOR payload; every name must lie within ``base``."""
    check_size(payload, "SenML-CBOR")
    data = bytes(payload)
    stream = io.BytesIO(data)
    try:
        items = cbor2.CBORDecoder(stream, max_depth=MAX_CBOR_DEPTH).decode()
    except RecursionError as exc:
        raise CodecError("SenML-CBOR: the payload is nested too deeply") from exc
    except Exception as exc:  # cbor2 raises CBORDecodeError but also errors from its tag decoders
        raise CodecError(f"SenML-CBOR: not valid CBOR ({exc})") from exc
    if stream.tell() != len(data):
        raise CodecError(f"SenML-CBOR: {len(data) - stream.tell()} bytes follow the CBOR array")
    return _records(items, base, "SenML-CBOR")


# --- encoding -----------------------------------------------------------------------------------


def _records_out(values: Values, base: Path, binary: bool) -> list[dict[str, Any]]:
    entries = as_entries(values, base)
    same = all(entry.path == base for entry in entries)
    prefix = str(base) if same else str(base).rstrip("/") + "/"
    records = []
    for index, entry in enumerate(entries):
        record: dict[str, Any] = {}
        if index == 0:
            record["bn"] = prefix
        if not same:
            record["n"] = str(entry.path)[len(prefix) :]
        value = entry.value
        if isinstance(value, bool):
            record["vb"] = value
        elif isinstance(value, int | float):
            if not binary and isinstance(value, float) and not math.isfinite(value):
                raise CodecError(f"SenML-JSON: {entry.path} has the value {value}, which JSON cannot carry")
            record["v"] = value
        elif isinstance(value, str):
            record["vs"] = value
        elif isinstance(value, ObjLink):
            record["vlo"] = str(value)
        else:
            record["vd"] = bytes(value) if binary else base64.urlsafe_b64encode(value).decode().rstrip("=")
        if entry.time is not None:
            record["t"] = entry.time
        records.append(record)
    return records


def encode_json(values: Values, base: Path) -> bytes:
    """SenML-JSON: the first record carries ``bn`` (``base``), the others names relative to it."""
    records = _records_out(values, base, binary=False)
    try:
        return json.dumps(records, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, UnicodeEncodeError) as exc:
        raise CodecError(f"SenML-JSON: cannot encode ({exc})") from exc


def encode_cbor(values: Values, base: Path) -> bytes:
    """SenML-CBOR with integer labels (``vlo`` stays a text key)."""
    records = [{CBOR_KEYS.get(name, name): field for name, field in record.items()}
               for record in _records_out(values, base, binary=True)]
    try:
        return cbor2.dumps(records)
    except (cbor2.CBOREncodeError, UnicodeEncodeError, ValueError) as exc:
        raise CodecError(f"SenML-CBOR: cannot encode ({exc})") from exc
