"""LwM2M content-format codecs: TLV known-answer vectors, unit tests per codec, hypothesis round trips,
and a fuzz test that every decoder either decodes or raises ``CodecError`` on hostile bytes."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path as FsPath
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilotboat.lwm2m import content, linkformat, senml, tlv
from pilotboat.lwm2m.linkformat import Link
from pilotboat.lwm2m.model import (
    MAX_PAYLOAD_BYTES,
    ROOT,
    CodecError,
    Entry,
    ObjLink,
    Path,
    ResourceType,
    UnsupportedFormat,
    as_dict,
)

T = ResourceType

#: The project's known-answer vectors (a copy of the shared LwM2M TLV vectors).
TLV_VECTORS: list[dict[str, Any]] = json.loads(
    (FsPath(__file__).parent / "vectors" / "lwm2m-tlv.json").read_text()
)["vectors"]

#: Resource types of the Security (0) and Server (1) objects, as far as the vectors use them.
SCHEMA = {
    0: {0: T.STRING, 1: T.BOOLEAN, 2: T.INTEGER, 3: T.OPAQUE, 4: T.OPAQUE, 5: T.OPAQUE, 10: T.INTEGER},
    1: {0: T.INTEGER, 1: T.INTEGER, 6: T.BOOLEAN, 7: T.STRING},
}


def schema_types(path: Path) -> ResourceType | None:
    return SCHEMA.get(path.object_id or 0, {}).get(path.resource_id or 0)


def vector_values(vector: dict[str, Any]) -> dict[Path, Any]:
    """The vector's resources as path → value; opaque resources as bytes."""
    base = Path.parse(vector["path"])
    values: dict[Path, Any] = {}
    for key, value in vector["resources"].items():
        rid, _, encoding = key.partition("_")
        path = base.child(int(rid))
        if encoding == "utf8":
            value = value.encode()
        elif encoding == "hex":
            value = bytes.fromhex(value)
        elif schema_types(path) is T.OPAQUE:
            value = value.encode()
        values[path] = value
    return values


# --- vectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", TLV_VECTORS, ids=[v["path"] for v in TLV_VECTORS])
def test_tlv_vectors_encode(vector: dict[str, Any]) -> None:
    base = Path.parse(vector["path"])
    assert tlv.encode(vector_values(vector), base).hex() == vector["tlv_hex"]
    # The vectors' empty strings are empty opaque values: both encode to a zero-length TLV.
    if not any("_" in key for key in vector["resources"]):
        raw = {base.child(int(key)): value for key, value in vector["resources"].items()}
        assert tlv.encode(raw, base).hex() == vector["tlv_hex"]
    assert content.encode(content.TLV, vector_values(vector), base).hex() == vector["tlv_hex"]


@pytest.mark.parametrize("content_format", [content.TLV, content.TLV_LEGACY])
@pytest.mark.parametrize("vector", TLV_VECTORS, ids=[v["path"] for v in TLV_VECTORS])
def test_tlv_vectors_decode(vector: dict[str, Any], content_format: int) -> None:
    base = Path.parse(vector["path"])
    payload = bytes.fromhex(vector["tlv_hex"])
    expected = vector_values(vector)
    decoded = content.decode(content_format, payload, base, schema_types)
    assert as_dict(decoded) == expected
    assert [entry.path for entry in decoded] == list(expected)
    # The same bytes written to the object (/0, /1) address the instance through the wrapper.
    assert as_dict(tlv.decode(payload, base.parent, schema_types)) == expected
    # Without types the values are the raw bytes.
    untyped = as_dict(tlv.decode(payload, base))
    assert all(isinstance(value, bytes) for value in untyped.values())
    assert untyped[base.child(0)] == tlv.encode_value(expected[base.child(0)])


# --- paths and values ---------------------------------------------------------------------------


def test_path_parse_and_format() -> None:
    assert Path.parse("/3/0/1") == Path(3, 0, 1)
    assert str(Path(3, 0, 1, 2)) == "/3/0/1/2"
    assert Path.parse("/") == ROOT and str(ROOT) == "/"
    assert Path.parse("/3/0/") == Path(3, 0)
    assert Path.parse("/65535").object_id == 65535
    assert Path(3, 0, 1).depth == 3 and Path(3, 0, 1).parent == Path(3, 0)
    assert Path(3, 0, 1).is_within(Path(3)) and not Path(3, 0).is_within(Path(3, 0, 1))
    assert Path(3, 0, 1, 7).relative_to(Path(3, 0)) == (1, 7)


@pytest.mark.parametrize(
    "text", ["", "3/0", "/3//1", "/a", "/-1", "/+1", "/ 1", "/65536", "/1/2/3/4/5", "//", "/١", "/000000"]
)
def test_path_rejects(text: str) -> None:
    with pytest.raises(CodecError):
        Path.parse(text)


def test_path_and_objlink_construction_errors() -> None:
    with pytest.raises(CodecError, match="lower level"):
        Path(3, None, 1)
    with pytest.raises(CodecError):
        Path(70000)
    with pytest.raises(CodecError):
        ObjLink(1, -1)
    assert ObjLink.parse("3:0") == ObjLink(3, 0) and str(ObjLink(65535, 65535)) == "65535:65535"
    for bad in ("3", "3:", ":0", "3:0:1", "a:b", "3:70000"):
        with pytest.raises(CodecError):
            ObjLink.parse(bad)
    with pytest.raises(CodecError, match="resources or resource instances"):
        Entry(Path(3, 0), 1)
    with pytest.raises(CodecError, match="64 bits"):
        Entry(Path(3, 0, 1), 1 << 64)


# --- TLV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hex_value"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "0080"),
        (-128, "80"),
        (-129, "ff7f"),
        (32767, "7fff"),
        (32768, "00008000"),
        (2**31, "0000000080000000"),
        (-(2**63), "8000000000000000"),
        (2**64 - 1, "ffffffffffffffff"),
        (True, "01"),
        (False, "00"),
        (1.5, "3fc00000"),
        (0.1, "3fb999999999999a"),
        (1e300, "7e37e43c8800759c"),
        ("é", "c3a9"),
        (b"\x00\xff", "00ff"),
        (ObjLink(3, 65535), "0003ffff"),
    ],
)
def test_tlv_value_encoding(value: Any, hex_value: str) -> None:
    assert tlv.encode_value(value).hex() == hex_value


def test_tlv_read_value() -> None:
    assert tlv.read_value(b"\xff\xff", T.INTEGER) == -1
    assert tlv.read_value(b"\xff\xff", T.UNSIGNED) == 65535
    assert tlv.read_value(bytes.fromhex("3fc00000"), T.FLOAT) == 1.5
    assert tlv.read_value(b"\x00\x03\x00\x01", T.OBJLNK) == ObjLink(3, 1)
    assert tlv.read_value(b"\x01", T.BOOLEAN) is True
    for raw, kind in [(b"\x00" * 3, T.INTEGER), (b"", T.INTEGER), (b"\x02", T.BOOLEAN), (b"\x00" * 5, T.FLOAT),
                      (b"\xff", T.STRING), (b"\x00", T.OBJLNK)]:
        with pytest.raises(CodecError):
            tlv.read_value(raw, kind)


def test_tlv_lengths_and_wide_identifiers() -> None:
    for size in (7, 8, 255, 256, 65535, 65536):
        data = tlv.encode({Path(3, 0, 300): b"x" * size}, Path(3, 0))
        assert as_dict(tlv.decode(data, Path(3, 0))) == {Path(3, 0, 300): b"x" * size}
    assert tlv.encode({Path(3, 0, 1): b"ab"}, Path(3, 0, 1)).hex() == "c2016162"
    assert tlv.encode({Path(3, 0, 300): b""}, Path(3, 0, 300)).hex() == "e0012c"
    assert tlv.encode({Path(3, 0, 1): b"x" * 256}, Path(3, 0, 1))[:4].hex() == "d0010100"
    assert tlv.encode({Path(3, 0, 1): b"x" * 65536}, Path(3, 0, 1))[:5].hex() == "d801010000"


def test_tlv_multiple_resource_forms() -> None:
    values = {Path(0, 1, 16, 0): 0xC0A8, Path(0, 1, 16, 5): 0xC02B}
    multiple = tlv.encode(values, Path(0, 1, 16))
    # 0xC0A8 needs 4 bytes as a signed integer; the instances sit in a multiple resource with id 16
    assert multiple.hex() == "88100c" + "44000000c0a8" + "44050000c02b"
    assert as_dict(tlv.decode(multiple, Path(0, 1, 16), lambda p: T.UNSIGNED)) == values
    assert as_dict(tlv.decode(multiple, Path(0, 1), lambda p: T.UNSIGNED)) == values
    # Resource instances directly under a resource target, and a single resource instance.
    bare = bytes.fromhex("44000000c0a8" + "44050000c02b")
    assert as_dict(tlv.decode(bare, Path(0, 1, 16), lambda p: T.UNSIGNED)) == values
    assert tlv.encode({Path(0, 1, 16, 5): 1}, Path(0, 1, 16, 5)).hex() == "410501"
    assert as_dict(tlv.decode(bytes.fromhex("410501"), Path(0, 1, 16, 5))) == {Path(0, 1, 16, 5): b"\x01"}


def test_tlv_object_level_encodes_every_instance() -> None:
    values = {Path(1, 0, 0): 1, Path(1, 2, 0): 2}
    data = tlv.encode(values, Path(1))
    assert data.hex() == "0300c10001" + "0302c10002"
    assert as_dict(tlv.decode(data, Path(1), lambda p: T.INTEGER)) == values
    assert tlv.encode({}, Path(1)) == b""
    assert tlv.decode(b"", Path(1)) == ()


@pytest.mark.parametrize(
    ("hex_payload", "base", "message"),
    [
        ("c10100", "/0", "cannot appear"),
        ("0801", "/0", "cut off"),
        ("c8", "/0/1", "cut off"),
        ("c80105", "/0/1", "claims 5 bytes but only 0 remain"),
        ("d801ffffff00", "/0/1", "claims 16777215 bytes"),
        ("080203c10100", "/0/1", "cannot appear"),  # wrapper id 2 for target /0/1
        ("0801034100aa", "/0", "holds a resource instance"),
        ("0801050003c10100", "/0", "holds a object instance"),
        ("8801034101aa".replace("4101", "c101"), "/0/1", "holds a resource"),
        ("410100", "/0/1", "cannot appear"),
        ("c10100", "/", "cannot say which object"),
        ("c10200", "/0/1/1", "cannot appear"),
    ],
)
def test_tlv_malformed(hex_payload: str, base: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        tlv.decode(bytes.fromhex(hex_payload), Path.parse(base))


def test_tlv_encode_errors() -> None:
    with pytest.raises(CodecError, match="both"):
        tlv.encode({Path(0, 1, 16): 1, Path(0, 1, 16, 0): 2}, Path(0, 1))
    with pytest.raises(CodecError, match="not within"):
        tlv.encode({Path(1, 0, 1): 1}, Path(0, 1))
    with pytest.raises(CodecError, match="timestamp"):
        tlv.encode([Entry(Path(3, 0, 1), 1, time=5)], Path(3, 0))
    with pytest.raises(CodecError, match="more than once"):
        tlv.encode([Entry(Path(3, 0, 1), 1), Entry(Path(3, 0, 1), 2)], Path(3, 0))
    with pytest.raises(CodecError, match="UTF-8"):
        tlv.encode({Path(3, 0, 1): "\ud800"}, Path(3, 0))


# --- SenML --------------------------------------------------------------------------------------


def test_senml_json_device_object_example() -> None:
    payload = (
        b'[{"bn":"/3/0/","n":"0","vs":"Open Mobile Alliance"},{"n":"9","v":95},'
        b'{"n":"6/0","v":1},{"n":"6/1","v":5},{"n":"13","v":1.5e9},{"n":"17","vb":false},'
        b'{"n":"22","vd":"AP8"},{"n":"23","vlo":"3:0"}]'
    )
    assert as_dict(senml.decode_json(payload, Path(3, 0))) == {
        Path(3, 0, 0): "Open Mobile Alliance",
        Path(3, 0, 9): 95,
        Path(3, 0, 6, 0): 1,
        Path(3, 0, 6, 1): 5,
        Path(3, 0, 13): 1.5e9,
        Path(3, 0, 17): False,
        Path(3, 0, 22): b"\x00\xff",
        Path(3, 0, 23): ObjLink(3, 0),
    }


def test_senml_base_name_time_and_value() -> None:
    payload = json.dumps(
        [
            {"bn": "/3303/0/5700", "bt": 1000, "v": 20.5},
            {"t": 10, "v": 21},
            {"bn": "/3303/1/", "n": "5700", "bv": 10, "v": 1},
            {"bn": "/4/0/"},
            {"n": "0", "vd": "AP8="},
            {"n": "1", "vs": "x", "u": "Cel", "custom": 1},
        ]
    ).encode()
    decoded = senml.decode_json(payload, ROOT)
    assert [(str(e.path), e.value, e.time) for e in decoded] == [
        ("/3303/0/5700", 20.5, 1000),
        ("/3303/0/5700", 21, 1010),
        ("/3303/1/5700", 11, 1000),
        ("/4/0/0", b"\x00\xff", 1000),
        ("/4/0/1", "x", 1000),
    ]
    # Without bt or t, no time.
    assert senml.decode_json(b'[{"n":"/3/0/1","vs":"a"}]', ROOT)[0].time is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{}", "array of records"),
        (b"[1]", "must be a map"),
        (b'[{"n":"/3/0/1"}]', "has no value"),
        (b'[{"n":"/3/0/1","v":1,"vs":"a"}]', "more than one value"),
        (b'[{"n":"/3/0/1","v":true}]', "must be a number"),
        (b'[{"n":"/3/0/1","vb":1}]', "must be a boolean"),
        (b'[{"n":"/3/0/1","vd":"*"}]', "not base64url"),
        (b'[{"n":"/3/0/1","vlo":"3"}]', "not 'object:instance'"),
        (b'[{"n":"3/0/1","v":1}]', "not an LwM2M path"),
        (b'[{"n":"/3/0","v":1}]', "cannot hold a value"),
        (b'[{"n":"/4/0/1","v":1}]', "not within"),
        (b'[{"n":"/3/0/1","v":1,"x_":1}]', "must-understand"),
        (b'[{"n":"/3/0/1","v":NaN}]', "not a JSON number"),
        (b'[{"n":"/3/0/1","v":1e999}]', "out of range"),
        (b'[{"n":"/3/0/1","v":18446744073709551616}]', "64 bits"),
        (b'[{"n":5,"v":1}]', "text string"),
        (b'[{"bt":"x","n":"/3/0/1","v":1}]', "must be a number"),
        (b"\xff", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply|not valid JSON"),
        (b'[{"n":"/3/0/1","v":1}', "not valid JSON"),
    ],
)
def test_senml_json_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        senml.decode_json(payload, Path(3))


def test_senml_json_encoding() -> None:
    values = {Path(3, 0, 0): "A", Path(3, 0, 6, 1): 5, Path(3, 0, 22): b"\x00\xff", Path(3, 0, 23): ObjLink(3, 0),
              Path(3, 0, 17): True}
    assert json.loads(senml.encode_json(values, Path(3, 0))) == [
        {"bn": "/3/0/", "n": "0", "vs": "A"},
        {"n": "6/1", "v": 5},
        {"n": "22", "vd": "AP8"},
        {"n": "23", "vlo": "3:0"},
        {"n": "17", "vb": True},
    ]
    assert json.loads(senml.encode_json({Path(3, 0, 1): 1.5}, Path(3, 0, 1))) == [{"bn": "/3/0/1", "v": 1.5}]
    assert json.loads(senml.encode_json([Entry(Path(1, 0, 1), 2, time=7)], ROOT)) == [
        {"bn": "/", "n": "1/0/1", "v": 2, "t": 7}
    ]
    with pytest.raises(CodecError, match="JSON cannot carry"):
        senml.encode_json({Path(3, 0, 1): math.inf}, Path(3, 0))


def test_senml_cbor_labels() -> None:
    payload = cbor2.dumps(
        [{-2: "/3/0/", 0: "0", 3: "Anjay"}, {0: "9", 2: 95}, {0: "22", 8: b"\x01"}, {0: "23", "vlo": "1:2"},
         {0: "17", 4: True}, {-3: 100, 0: "13", 6: 5, 2: 0.5}]
    )
    decoded = senml.decode_cbor(payload, Path(3, 0))
    assert as_dict(decoded) == {Path(3, 0, 0): "Anjay", Path(3, 0, 9): 95, Path(3, 0, 22): b"\x01",
                                Path(3, 0, 23): ObjLink(1, 2), Path(3, 0, 17): True, Path(3, 0, 13): 0.5}
    assert decoded[-1].time == 105
    encoded = cbor2.loads(senml.encode_cbor({Path(3, 0, 0): "A", Path(3, 0, 23): ObjLink(1, 2)}, Path(3, 0)))
    assert encoded == [{-2: "/3/0/", 0: "0", 3: "A"}, {0: "23", "vlo": "1:2"}]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x81", "not valid CBOR"),
        (b"\x80\x00", "follow the CBOR array"),
        (b"\x81" * 1000 + b"\x80", "depth|nested"),
        (b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", "not valid CBOR"),
        (cbor2.dumps([{0: "/3/0/1", 2: 2**70}]), "64 bits"),
        (cbor2.dumps([{0: "/3/0/1", 8: "AP8"}]), ""),
        (cbor2.dumps([{0: "/3/0/1", 2: cbor2.CBORTag(4, [1, 5])}]), "must be a number"),
        (cbor2.dumps({0: 1}), "array of records"),
    ],
)
def test_senml_cbor_malformed(payload: bytes, message: str) -> None:
    if not message:  # a text vd in CBOR is tolerated
        assert senml.decode_cbor(payload, ROOT)[0].value == b"\x00\xff"
        return
    with pytest.raises(CodecError, match=message):
        senml.decode_cbor(payload, ROOT)


# --- link-format --------------------------------------------------------------------------------


def test_linkformat_lenient_register_payload() -> None:
    payload = (
        b' </>;rt="oma.lwm2m";ct=110 , </1/0> ; ssid=101 ;VER=1.1,\n'
        b'</3>;ver="1.0",</0/1>;uri=coap://bs.example.com;ct="110 112",'
        b'/5/0 ;;obs;title="a \\"b\\", c",,'
    )
    links = linkformat.decode(payload)
    assert [link.target for link in links] == ["/", "/1/0", "/3", "/0/1", "/5/0"]
    assert links[0].get("rt") == "oma.lwm2m" and links[0].get("ct") == "110"
    assert links[1].params == (("ssid", "101"), ("ver", "1.1"))
    assert links[1].path == Path(1, 0) and links[0].path == ROOT
    assert links[3].get("uri") == "coap://bs.example.com" and links[3].get("ct") == "110 112"
    assert links[4].has("obs") and links[4].get("obs") is None and links[4].get("title") == 'a "b", c'
    assert linkformat.decode(b"") == () and linkformat.decode(b" , ,") == ()
    assert Link("/rd").path is None


def test_linkformat_strict_output() -> None:
    links = [
        Link("/", (("rt", "oma.lwm2m"), ("ct", "110 112"))),
        Link("/0/1", (("ssid", "101"), ("ver", "1.1"), ("uri", "coap://x:5683"))),
        Link("/3", (("obs", None), ("title", 'say "hi"'), ("e", ""))),
    ]
    assert linkformat.encode(links) == (
        b'</>;rt="oma.lwm2m";ct="110 112",</0/1>;ssid=101;ver=1.1;uri=coap://x:5683,'
        b'</3>;obs;title="say \\"hi\\"";e=""'
    )
    assert linkformat.decode(linkformat.encode(links)) == tuple(links)
    for bad in (Link("/a b"), Link("/a>"), Link("/a", (("bad name", "1"),)), Link("/a", (("x", "a\nb"),))):
        with pytest.raises(CodecError):
            linkformat.encode([bad])


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"</1/0", "no '>'"), (b'</1/0>;rt="x', "not closed"), (b"</1/0> x", "unexpected"),
     (b"</1/0>;=3", "no name"), (b";a", "expected a link target"), (b"\xc3", "not UTF-8")],
)
def test_linkformat_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        linkformat.decode(payload)


# --- plain text, opaque and dispatch -------------------------------------------------------------


def test_text_and_opaque() -> None:
    base = Path(3, 0, 9)
    assert content.decode(content.TEXT, b"95", base) == (Entry(base, "95"),)
    assert content.decode(content.TEXT, b" -95 ", base, lambda p: T.INTEGER)[0].value == -95
    assert content.decode(content.TEXT, b"1.5", base, lambda p: T.FLOAT)[0].value == 1.5
    assert content.decode(content.TEXT, b"1", base, lambda p: T.BOOLEAN)[0].value is True
    assert content.decode(content.TEXT, b"AP8=", base, lambda p: T.OPAQUE)[0].value == b"\x00\xff"
    assert content.decode(content.TEXT, b"3:1", base, lambda p: T.OBJLNK)[0].value == ObjLink(3, 1)
    assert content.decode(content.OPAQUE, b"\x00\x01", base) == (Entry(base, b"\x00\x01"),)
    for value, text in [(95, b"95"), (True, b"1"), (1.5, b"1.5"), ("é", "é".encode()), (b"\x00\xff", b"AP8="),
                        (ObjLink(3, 1), b"3:1")]:
        assert content.encode(content.TEXT, {base: value}, base) == text
    assert content.encode(content.OPAQUE, {base: b"\x01"}, base) == b"\x01"
    for kind, text in [(T.INTEGER, b"1.5"), (T.INTEGER, b"99999999999999999999"), (T.UNSIGNED, b"-1"),
                       (T.FLOAT, b"x"), (T.BOOLEAN, b"2"), (T.OPAQUE, b"***"), (T.OBJLNK, b"3")]:
        with pytest.raises(CodecError):
            content.decode(content.TEXT, text, base, lambda p, kind=kind: kind)
    with pytest.raises(CodecError, match="must be a resource"):
        content.decode(content.TEXT, b"1", Path(3, 0))
    with pytest.raises(CodecError, match="exactly one value"):
        content.encode(content.TEXT, [Entry(base, 1), Entry(base, 2)], base)
    with pytest.raises(CodecError, match="must be bytes"):
        content.encode(content.OPAQUE, {base: "x"}, base)


def test_dispatch_formats() -> None:
    base = Path(1, 0)
    values = {Path(1, 0, 0): 101, Path(1, 0, 7): "U"}
    for fmt in (content.TLV, content.TLV_LEGACY, content.SENML_JSON, content.SENML_CBOR):
        decoded = content.decode(fmt, content.encode(fmt, values, base), base, schema_types)
        assert as_dict(decoded) == values
    for fmt in (content.LINK_FORMAT, content.LWM2M_CBOR, content.LWM2M_JSON, 9999):
        with pytest.raises(UnsupportedFormat):
            content.decode(fmt, b"", base)
        with pytest.raises(UnsupportedFormat):
            content.encode(fmt, values, base)
    assert issubclass(UnsupportedFormat, CodecError) and issubclass(CodecError, ValueError)


def test_payload_size_limit() -> None:
    big = b"\x00" * (MAX_PAYLOAD_BYTES + 1)
    for decoder in decoders():
        with pytest.raises(CodecError, match="larger than"):
            decoder(big)


# --- property tests: round trips ----------------------------------------------------------------

ids = st.integers(0, 65535)
clean_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
objlinks = st.builds(ObjLink, ids, ids)
typed_values = st.one_of(
    st.tuples(st.just(T.INTEGER), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just(T.UNSIGNED), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(T.FLOAT), st.floats(allow_nan=False)),
    st.tuples(st.just(T.BOOLEAN), st.booleans()),
    st.tuples(st.just(T.STRING), clean_text),
    st.tuples(st.just(T.OPAQUE), st.binary(max_size=300)),
    st.tuples(st.just(T.OBJLNK), objlinks),
)


@st.composite
def typed_resources(draw: st.DrawFn) -> tuple[dict[int, dict[int, Any]], dict[tuple[int, int], ResourceType]]:
    """instance → resource → value or {resource instance → value}, and the type of each resource."""
    instances: dict[int, dict[int, Any]] = {}
    types: dict[tuple[int, int], ResourceType] = {}
    for iid in draw(st.lists(ids, min_size=1, max_size=3, unique=True)):
        resources: dict[int, Any] = {}
        for rid in draw(st.lists(ids, max_size=5, unique=True)):
            kind, value = draw(typed_values)
            types[(iid, rid)] = kind
            if draw(st.booleans()):
                resources[rid] = value
            else:
                resources[rid] = {
                    riid: draw(typed_values.filter(lambda tv, kind=kind: tv[0] is kind))[1]
                    for riid in draw(st.lists(ids, min_size=1, max_size=3, unique=True))
                }
        instances[iid] = resources
    return instances, types


def flatten(object_id: int, instances: dict[int, dict[int, Any]]) -> dict[Path, Any]:
    values: dict[Path, Any] = {}
    for iid, resources in instances.items():
        for rid, value in resources.items():
            if isinstance(value, dict):
                values.update({Path(object_id, iid, rid, riid): v for riid, v in value.items()})
            else:
                values[Path(object_id, iid, rid)] = value
    return values


ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ROUND_TRIP
@given(ids, typed_resources())
def test_tlv_round_trip(object_id: int, resources: tuple[dict[int, dict[int, Any]], dict[Any, ResourceType]]) -> None:
    instances, types = resources

    def lookup(path: Path) -> ResourceType:
        return types[(path.instance_id, path.resource_id)]

    values = flatten(object_id, instances)
    data = tlv.encode(values, Path(object_id))
    assert as_dict(tlv.decode(data, Path(object_id), lookup)) == values
    first = next(iter(instances))
    instance_values = flatten(object_id, {first: instances[first]})
    data = tlv.encode(instance_values, Path(object_id, first))
    assert as_dict(tlv.decode(data, Path(object_id, first), lookup)) == instance_values
    for path in instance_values:
        resource = Path(*path.ids[:3])
        single = {p: v for p, v in instance_values.items() if p.is_within(resource)}
        assert as_dict(tlv.decode(tlv.encode(single, resource), resource, lookup)) == single


senml_values = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    clean_text,
    st.binary(max_size=100),
    objlinks,
)
entries = st.builds(
    Entry,
    st.builds(Path, ids, ids, ids, st.none() | ids),
    senml_values,
    st.none() | st.integers(0, 2**40) | st.floats(0, 2**40),
)


@ROUND_TRIP
@given(st.lists(entries, max_size=8), st.integers(0, 2))
def test_senml_round_trip(items: list[Entry], base_depth: int) -> None:
    base = Path.of(*items[0].path.ids[:base_depth]) if items else ROOT
    items = [item for item in items if item.path.is_within(base)]
    for encode, decode in ((senml.encode_json, senml.decode_json), (senml.encode_cbor, senml.decode_cbor)):
        assert list(decode(encode(items, base), base)) == items


@ROUND_TRIP
@given(st.builds(Entry, st.builds(Path, ids, ids, ids, st.none() | ids), senml_values))
def test_senml_round_trip_single_resource_target(item: Entry) -> None:
    for fmt in (content.SENML_JSON, content.SENML_CBOR):
        assert content.decode(fmt, content.encode(fmt, [item], item.path), item.path) == (item,)


link_targets = st.one_of(
    st.builds(lambda *i: str(Path.of(*i)), ids) | st.builds(lambda *i: str(Path.of(*i)), ids, ids),
    st.from_regex(r"[A-Za-z0-9/._~:?#@!$&'()*+,;=%-]{0,20}", fullmatch=True),
)
link_params = st.lists(
    st.tuples(
        st.from_regex(r"[a-z0-9!#$&+\-.^_`|~]{1,8}", fullmatch=True),
        st.none() | st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=20),
    ),
    max_size=5,
)


@ROUND_TRIP
@given(st.lists(st.builds(Link, link_targets, link_params.map(tuple)), max_size=6))
def test_linkformat_round_trip(links: list[Link]) -> None:
    assert linkformat.decode(linkformat.encode(links)) == tuple(links)


# --- fuzz: every decoder decodes or raises CodecError --------------------------------------------


def decoders() -> list[Any]:
    def typed(kind: ResourceType) -> Any:
        return lambda path: kind

    result: list[Any] = []
    for base in (Path(0), Path(0, 1), Path(0, 1, 16), Path(0, 1, 16, 0)):
        result.append(lambda data, base=base: tlv.decode(data, base))
        result.append(lambda data, base=base: tlv.decode(data, base, schema_types))
        result.append(lambda data, base=base: content.decode(content.TLV_LEGACY, data, base, typed(T.OBJLNK)))
    for kind in ResourceType:
        result.append(lambda data, kind=kind: content.decode(content.TEXT, data, Path(3, 0, 1), typed(kind)))
        result.append(lambda data, kind=kind: tlv.decode(data, Path(3, 0), typed(kind)))
    for base in (ROOT, Path(3, 0)):
        result.append(lambda data, base=base: senml.decode_json(data, base))
        result.append(lambda data, base=base: senml.decode_cbor(data, base))
    result.append(lambda data: content.decode(content.OPAQUE, data, Path(3, 0, 1)))
    result.append(linkformat.decode)
    return result


DECODERS = decoders()
VALID_SAMPLES = [bytes.fromhex(vector["tlv_hex"]) for vector in TLV_VECTORS] + [
    tlv.encode({Path(0, 1, 16, 0): 1, Path(0, 1, 16, 300): 2**40}, Path(0, 1)),
    senml.encode_json({Path(3, 0, 0): "A", Path(3, 0, 6, 1): 1.5, Path(3, 0, 22): b"\x00"}, Path(3, 0)),
    senml.encode_cbor([Entry(Path(3, 0, 0), "A", 5), Entry(Path(3, 0, 23), ObjLink(1, 2))], Path(3, 0)),
    b'</>;rt="oma.lwm2m";ct="110 112",</1/0>;ssid=101;ver=1.1,</0/1>;uri=coap://x',
    b"12345",
    b"AP8=",
]


def check_decoders(data: bytes) -> None:
    for decoder in DECODERS:
        try:
            result = decoder(data)
        except CodecError:
            continue
        assert isinstance(result, tuple)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_decoders(data)


@settings(max_examples=800, deadline=None)
@given(st.text("[]{}\",:0123456789.-+eE/<>;= \\abnvstdlo_", max_size=80))
def test_fuzz_text_shaped_input(text: str) -> None:
    check_decoders(text.encode())


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(VALID_SAMPLES), st.data())
def test_fuzz_mutated_valid_encodings(sample: bytes, data: st.DataObject) -> None:
    buffer = bytearray(sample)
    for _ in range(data.draw(st.integers(1, 6))):
        operation = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        index = data.draw(st.integers(0, max(len(buffer) - 1, 0)))
        if operation == "flip" and buffer:
            buffer[index] ^= 1 << data.draw(st.integers(0, 7))
        elif operation == "set" and buffer:
            buffer[index] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x18, 0x38, 0x5B, 0x9F, 0xBF]))
        elif operation == "insert":
            buffer[index:index] = data.draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete" and buffer:
            del buffer[index]
        elif operation == "truncate":
            del buffer[index:]
    check_decoders(bytes(buffer))


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 200_000,
        b"{" * 200_000,
        b"\x81" * 200_000,
        b"\x9f" * 200_000,
        b"\xbf" * 200_000,
        b"<" * 200_000,
        b'</a>;x="' + b"\\" * 200_000,
        b"\x08\x01\xff" * 50_000,
        b"\x88\x01\x10" + b"\x41\x00" * 100_000,
        struct.pack(">B", 0xDF) + b"\x00\x01\xff\xff\xff",
        base64.b64encode(b"\x00" * 500_000),
    ],
    ids=lambda data: data[:8].hex(),
)
def test_fuzz_hostile_inputs(data: bytes) -> None:
    check_decoders(data)
