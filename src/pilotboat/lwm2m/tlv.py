"""OMA TLV (content format 11542, legacy 1542): the binary format every LwM2M client understands.

TLV carries no data types: decoding gives ``bytes`` unless a ``ResourceType`` lookup says how to read a
resource. Encoding picks the wire form from the Python type (integers in the smallest of 1/2/4/8 bytes,
floats in 4 bytes when exact, else 8). Decoding checks every length against the remaining buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from pilotboat.lwm2m.model import (
    CodecError,
    Entry,
    ObjLink,
    Path,
    Payload,
    ResourceType,
    Value,
    Values,
    as_entries,
    check_size,
    check_value,
)

OBJECT_INSTANCE = 0
RESOURCE_INSTANCE = 1
MULTIPLE_RESOURCE = 2
RESOURCE_VALUE = 3
_KIND_NAMES = ("object instance", "resource instance", "multiple resource", "resource")

TypeLookup = Callable[[Path], ResourceType | None]


# --- values -------------------------------------------------------------------------------------


def encode_value(value: Value) -> bytes:
    """The TLV value bytes of one resource value."""
    value = check_value(value, "TLV value")
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        for size in (1, 2, 4, 8):
            if -(1 << (8 * size - 1)) <= value < (1 << (8 * size - 1)):
                return value.to_bytes(size, "big", signed=True)
        return value.to_bytes(8, "big")  # an unsigned integer of 2**63 .. 2**64-1
    if isinstance(value, float):
        try:
            single = struct.pack(">f", value)
        except OverflowError:
            return struct.pack(">d", value)
        return single if struct.unpack(">f", single)[0] == value else struct.pack(">d", value)
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError as exc:
            raise CodecError(f"TLV value: the string is not encodable as UTF-8 ({exc.reason})") from exc
    if isinstance(value, ObjLink):
        return struct.pack(">HH", value.object_id, value.instance_id)
    return bytes(value)


def read_value(raw: bytes, kind: ResourceType, where: object = "TLV value") -> Value:
    """Interpret the value bytes of a resource of type ``kind``."""
    if kind in (ResourceType.INTEGER, ResourceType.TIME, ResourceType.UNSIGNED):
        if len(raw) not in (1, 2, 4, 8):
            raise CodecError(f"{where}: an integer takes 1, 2, 4 or 8 bytes, not {len(raw)}")
        return int.from_bytes(raw, "big", signed=kind is not ResourceType.UNSIGNED)
    if kind is ResourceType.FLOAT:
        if len(raw) == 4:
            return float(struct.unpack(">f", raw)[0])
        if len(raw) == 8:
            return float(struct.unpack(">d", raw)[0])
        raise CodecError(f"{where}: a float takes 4 or 8 bytes, not {len(raw)}")
    if kind is ResourceType.BOOLEAN:
        if raw not in (b"\x00", b"\x01"):
            raise CodecError(f"{where}: a boolean is one byte 0 or 1, not {raw.hex() or 'empty'}")
        return raw == b"\x01"
    if kind in (ResourceType.STRING, ResourceType.CORELNK):
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise CodecError(f"{where}: the string is not valid UTF-8 ({exc.reason})") from exc
    if kind is ResourceType.OBJLNK:
        if len(raw) != 4:
            raise CodecError(f"{where}: an object link takes 4 bytes, not {len(raw)}")
        object_id, instance_id = struct.unpack(">HH", raw)
        return ObjLink(object_id, instance_id)
    return bytes(raw)


# --- decoding -----------------------------------------------------------------------------------


def _items(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(kind, identifier, value start, value end)`` of each TLV between ``start`` and ``end``."""
    pos = start
    while pos < end:
        offset = pos
        type_byte = data[pos]
        id_size = 2 if type_byte & 0x20 else 1
        length_size = (type_byte >> 3) & 0x03
        pos += 1
        if pos + id_size + length_size > end:
            raise CodecError(f"TLV: the header at byte {offset} is cut off")
        identifier = int.from_bytes(data[pos : pos + id_size], "big")
        pos += id_size
        if length_size:
            length = int.from_bytes(data[pos : pos + length_size], "big")
            pos += length_size
        else:
            length = type_byte & 0x07
        if length > end - pos:
            raise CodecError(
                f"TLV: the {_KIND_NAMES[type_byte >> 6]} at byte {offset} claims {length} bytes "
                f"but only {end - pos} remain"
            )
        yield type_byte >> 6, identifier, pos, pos + length
        pos += length


def _misplaced(kind: int, identifier: int, base: Path) -> CodecError:
    return CodecError(f"TLV: a {_KIND_NAMES[kind]} with id {identifier} cannot appear in a payload for {base}")


def _resource(data: bytes, kind: int, start: int, end: int, path: Path, out: list[tuple[Path, bytes]]) -> None:
    if kind == RESOURCE_VALUE:
        out.append((path, data[start:end]))
        return
    for inner, identifier, value_start, value_end in _items(data, start, end):
        if inner != RESOURCE_INSTANCE:
            raise CodecError(f"TLV: the multiple resource {path} holds a {_KIND_NAMES[inner]}")
        out.append((path.child(identifier), data[value_start:value_end]))


def decode(payload: bytes, base: Path, types: TypeLookup | None = None) -> Payload:
    """The entries of a TLV payload addressed to ``base`` (an object, instance, resource or resource
    instance). Instance and resource wrappers whose id repeats ``base`` are accepted, as clients send
    both forms. Values are ``bytes`` unless ``types`` gives the resource's type."""
    check_size(payload, "TLV")
    data = bytes(payload)
    if base.depth == 0:
        raise CodecError("TLV: a payload for '/' cannot say which object it belongs to")
    raw: list[tuple[Path, bytes]] = []
    for kind, identifier, start, end in _items(data, 0, len(data)):
        if kind == OBJECT_INSTANCE:
            if base.depth == 1:
                instance = base.child(identifier)
            elif base.depth == 2 and identifier == base.instance_id:
                instance = base
            else:
                raise _misplaced(kind, identifier, base)
            for inner, resource_id, value_start, value_end in _items(data, start, end):
                if inner not in (RESOURCE_VALUE, MULTIPLE_RESOURCE):
                    raise CodecError(f"TLV: the object instance {instance} holds a {_KIND_NAMES[inner]}")
                _resource(data, inner, value_start, value_end, instance.child(resource_id), raw)
        elif kind in (RESOURCE_VALUE, MULTIPLE_RESOURCE):
            if base.depth == 2:
                resource = base.child(identifier)
            elif base.depth == 3 and identifier == base.resource_id:
                resource = base
            else:
                raise _misplaced(kind, identifier, base)
            _resource(data, kind, start, end, resource, raw)
        else:
            if base.depth == 3:
                path = base.child(identifier)
            elif base.depth == 4 and identifier == base.resource_instance_id:
                path = base
            else:
                raise _misplaced(kind, identifier, base)
            raw.append((path, data[start:end]))
    entries = []
    for path, value in raw:
        kind_of = types(path) if types is not None else None
        entries.append(Entry(path, read_value(value, kind_of, path) if kind_of is not None else value))
    return tuple(entries)


# --- encoding -----------------------------------------------------------------------------------


def _tlv(kind: int, identifier: int, value: bytes) -> bytes:
    type_byte = kind << 6
    header = bytearray()
    if identifier > 0xFF:
        type_byte |= 0x20
        header += identifier.to_bytes(2, "big")
    else:
        header.append(identifier)
    length = len(value)
    if length < 8:
        type_byte |= length
    elif length < 1 << 8:
        type_byte |= 0x08
        header += length.to_bytes(1, "big")
    elif length < 1 << 16:
        type_byte |= 0x10
        header += length.to_bytes(2, "big")
    elif length < 1 << 24:
        type_byte |= 0x18
        header += length.to_bytes(3, "big")
    else:
        raise CodecError(f"TLV: a value of {length} bytes exceeds the 24-bit length field")
    return bytes([type_byte]) + bytes(header) + value


def _resource_tlv(path: Path, group: list[Entry]) -> bytes:
    single = [entry for entry in group if entry.path.depth == 3]
    if single:
        if len(group) != 1:
            raise CodecError(f"TLV: {path} is given both as a single value and with resource instances")
        return _tlv(RESOURCE_VALUE, path.resource_id or 0, encode_value(single[0].value))
    body = b"".join(
        _tlv(RESOURCE_INSTANCE, entry.path.resource_instance_id or 0, encode_value(entry.value)) for entry in group
    )
    return _tlv(MULTIPLE_RESOURCE, path.resource_id or 0, body)


def encode(values: Values, base: Path) -> bytes:
    """TLV for ``values`` (a path → value mapping or entries) written to ``base``. Instances are
    wrapped in an object-instance TLV also when ``base`` is the instance itself."""
    entries = as_entries(values, base)
    if base.depth == 0:
        raise CodecError("TLV: a payload for '/' cannot say which object it belongs to")
    seen: set[Path] = set()
    tree: dict[int, dict[int, list[Entry]]] = {}
    for entry in entries:
        if entry.time is not None:
            raise CodecError(f"TLV: {entry.path} has a timestamp, which TLV cannot carry")
        if entry.path in seen:
            raise CodecError(f"TLV: {entry.path} is given more than once")
        seen.add(entry.path)
        instance_id, resource_id = entry.path.ids[1:3]
        tree.setdefault(instance_id, {}).setdefault(resource_id, []).append(entry)
    if not entries:
        return b""
    if base.depth == 4:
        return _tlv(RESOURCE_INSTANCE, base.resource_instance_id or 0, encode_value(entries[0].value))
    if base.depth == 3:
        return _resource_tlv(base, list(entries))
    object_id = base.object_id or 0
    return b"".join(
        _tlv(
            OBJECT_INSTANCE,
            instance_id,
            b"".join(
                _resource_tlv(Path(object_id, instance_id, resource_id), group)
                for resource_id, group in resources.items()
            ),
        )
        for instance_id, resources in tree.items()
    )
