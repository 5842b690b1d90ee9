"""Device operations as pure functions: paths, values from JSON, the requests built, and results
decoded from TLV, SenML-JSON, SenML-CBOR, text, opaque and link-format answers."""

from __future__ import annotations

import base64
import json
import struct

import cbor2
import pytest

from pilotboat.lwm2m import content, linkformat, tlv
from pilotboat.lwm2m.messages import Reply
from pilotboat.lwm2m.model import ObjLink, Path, ResourceType
from pilotboat.lwm2m.operations import (
    Operation,
    OperationError,
    SecurityObjectRefused,
    WriteInput,
    attributes_query,
    attributes_request,
    create_request,
    decode_values,
    delete_request,
    diagnostic,
    discover_request,
    execute_arguments,
    execute_request,
    format_label,
    format_number,
    is_executable,
    json_value,
    lwm2m_value,
    outcome,
    post_operation,
    read_accept,
    read_request,
    resource_type,
    server_instances,
    target,
    write_format,
    write_request,
    write_values,
)

P = Path.parse


# --- paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "operation", "expected"), [
    ("3/0/1", Operation.READ, P("/3/0/1")),
    ("/3303/0/5700", Operation.OBSERVE, P("/3303/0/5700")),
    ("/3/0/", Operation.READ, P("/3/0")),
    ("/3/0/7/1", Operation.WRITE, P("/3/0/7/1")),
    ("/3303", Operation.CREATE, P("/3303")),
    ("/3303/1", Operation.DELETE, P("/3303/1")),
    ("/3/0/4", Operation.EXECUTE, P("/3/0/4")),
    ("/3/0", Operation.WRITE_PARTIAL, P("/3/0")),
])
def test_target_accepts(text: str, operation: Operation, expected: Path) -> None:
    assert target(text, operation) == expected


@pytest.mark.parametrize(("text", "operation", "message"), [
    ("/3/0", Operation.EXECUTE, "execute addresses a resource (/3/0/1), not /3/0"),
    ("/3", Operation.DELETE, "delete addresses an object instance (/3/0), not /3"),
    ("/3/0", Operation.CREATE, "create addresses an object (/3), not /3/0"),
    ("/3/0/1", Operation.WRITE_PARTIAL, "write-partial addresses an object instance"),
    ("/3", Operation.WRITE, "write addresses an object instance (/3/0) or a resource (/3/0/1) or"),
    ("/3/0/1/2", Operation.DISCOVER, "discover addresses an object"),
    ("/", Operation.READ, "read addresses an object (/3) or"),
    ("/3/x", Operation.READ, "segment 'x' that is not an identifier"),
    ("/3/0/1/2/3", Operation.READ, "more than 4 levels"),
    ("/3/70000", Operation.READ, "identifiers are integers 0..65535"),
    ("/3/-1", Operation.READ, "segment '-1'"),
])
def test_target_refuses(text: str, operation: Operation, message: str) -> None:
    with pytest.raises(OperationError, match=None) as raised:
        target(text, operation)
    assert message in str(raised.value) and raised.value.field == "path"
    assert not isinstance(raised.value, SecurityObjectRefused)


@pytest.mark.parametrize("text", ["/0", "0/1", "/0/1/5", "/0/0/3/0"])
@pytest.mark.parametrize("operation", [Operation.READ, Operation.WRITE_ATTRIBUTES, Operation.OBSERVE])
def test_security_object_refused(text: str, operation: Operation) -> None:
    with pytest.raises(SecurityObjectRefused, match="Security object"):
        target(text, operation)


def test_post_is_create_on_objects_and_execute_below() -> None:
    assert post_operation("/3303") is Operation.CREATE
    assert post_operation("3/0/4") is Operation.EXECUTE
    assert post_operation("/3/0") is Operation.EXECUTE  # refused later by target()
    assert post_operation("/3/zero") is Operation.EXECUTE
    with pytest.raises(OperationError, match="not an identifier"):
        target("/3/zero", post_operation("/3/zero"))


def test_resource_types_and_executables() -> None:
    assert resource_type(P("/3/0/0")) is ResourceType.STRING
    assert resource_type(P("/3/0/9")) is ResourceType.INTEGER
    assert resource_type(P("/1/0/1")) is ResourceType.INTEGER
    assert resource_type(P("/3303/0/5700")) is ResourceType.FLOAT
    assert resource_type(P("/3303/0/5701")) is ResourceType.STRING
    assert resource_type(P("/3303/0/5518")) is ResourceType.TIME
    assert resource_type(P("/3/0")) is None
    assert resource_type(P("/3/0/999")) is None
    assert resource_type(P("/20000/0/5700")) is ResourceType.FLOAT
    assert resource_type(P("/100/0/5700")) is None  # IPSO ids mean nothing outside IPSO objects
    assert [is_executable(P(text)) for text in ("/3/0/4", "/1/0/8", "/1/0/9", "/3303/0/5605", "/3/0/0", "/3/0", "/9/0/4")] == [
        True, True, True, True, False, False, False,
    ]


def test_server_instances() -> None:
    assert server_instances(["/1/3", "/3/0", "/1/0", "/1", "</bad>", "/1/0", "/3303/0"]) == [0, 3]
    assert server_instances(["/1", "/3/0"]) == []


# --- formats -----------------------------------------------------------------------------------------


def test_format_names() -> None:
    assert [format_number(name) for name in ("tlv", "SenML-JSON", "senml-cbor", "text", "opaque")] == [
        content.TLV, content.SENML_JSON, content.SENML_CBOR, content.TEXT, content.OPAQUE,
    ]
    with pytest.raises(OperationError, match="format must be one of tlv, senml-json"):
        format_number("json")
    assert [format_label(number) for number in (None, 11542, 1542, 112, 40, 65000)] == [
        None, "tlv", "tlv-legacy", "senml-cbor", "link-format", "65000",
    ]


@pytest.mark.parametrize(("version", "announced", "expected"), [
    ("1.0", (), content.TLV),
    ("1.1", (), content.TLV),
    ("1.1", (content.SENML_JSON,), content.SENML_JSON),
    ("1.1", (content.SENML_JSON, content.SENML_CBOR), content.SENML_CBOR),
    ("1.1", (content.TLV, content.SENML_JSON), content.SENML_JSON),
    ("1.0", (content.TLV_LEGACY,), content.TLV_LEGACY),
    ("1.0", (content.TLV,), content.TLV),
])
def test_write_format(version: str, announced: tuple[int, ...], expected: int) -> None:
    assert write_format(version, announced) == expected


def test_read_accept() -> None:
    assert read_accept(()) is None
    assert read_accept((content.TLV,)) is None
    assert read_accept((content.TLV, content.SENML_JSON)) == content.SENML_JSON
    assert read_accept((content.SENML_JSON, content.SENML_CBOR)) == content.SENML_CBOR


# --- values from JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "raw", "expected"), [
    ("/3303/0/5700", 21, 21.0),
    ("/3303/0/5700", 21.5, 21.5),
    ("/3/0/14", "+02", "+02"),
    ("/3/0/13", 1700000000, 1700000000),
    ("/1/0/6", True, True),
    ("/1/0/16", False, False),
    ("/1/0/13", 0, 0),
    ("/1/0/10", "3:1", ObjLink(3, 1)),
    ("/1/0/10", {"objlnk": "65535:65535"}, ObjLink(65535, 65535)),
    ("/3/0/999", {"base64": "AAEC"}, b"\x00\x01\x02"),
    ("/3/0/999", 7, 7),
    ("/3/0/999", 7.25, 7.25),
    ("/3/0/999", "x", "x"),
    ("/3/0/999", True, True),
])
def test_lwm2m_value(path: str, raw: object, expected: object) -> None:
    value = lwm2m_value(raw, P(path))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("path", "raw", "message"), [
    ("/3303/0/5700", "21", "type float"),
    ("/3303/0/5700", True, "type float"),
    ("/3/0/13", 1.5, "type time"),
    ("/3/0/9", "80", "type integer"),
    ("/1/0/6", 1, "type boolean"),
    ("/1/0/13", -1, "type unsigned"),
    ("/3/0/0", 5, "type string"),
    ("/1/0/10", "3-1", "is not 'object:instance'"),
    ("/3/0/4", "now", "is executable"),
    ("/3/0/999", [1, 2], "list is not an LwM2M value"),
    ("/3/0/999", None, "NoneType is not an LwM2M value"),
    ("/3/0/999", {"base64": "%%"}, "not valid base64"),
    ("/3/0/999", {"hex": "00"}, '{"base64": "..."} or {"objlnk": "3:0"}'),
    ("/3/0/999", 1 << 70, "does not fit 64 bits"),
    ("/3/0/999", float("inf"), "must be finite"),
    ("/3303/0/5700", 10**400, "type float"),
])
def test_lwm2m_value_refused(path: str, raw: object, message: str) -> None:
    with pytest.raises(OperationError) as raised:
        lwm2m_value(raw, P(path))
    assert message in str(raised.value)


def test_write_values() -> None:
    at = P("/3/0")
    assert write_values(WriteInput(values={"/3/0/14": "+02", "3/0/15": "Europe/Paris"}), at) == {
        P("/3/0/14"): "+02", P("/3/0/15"): "Europe/Paris",
    }
    assert write_values(WriteInput(value=21), P("/3303/0/5700")) == {P("/3303/0/5700"): 21.0}
    assert write_values(WriteInput(values={"/3/0/7/0": 3800, "/3/0/7/1": 5000}), P("/3/0/7")) == {
        P("/3/0/7/0"): 3800, P("/3/0/7/1"): 5000,
    }
    refusals = [
        (WriteInput(), at, 'give "values"'),
        (WriteInput(values={}), at, 'give "values"'),
        (WriteInput(values={"/3/0/14": "+02"}, value="+02"), at, "not both"),
        (WriteInput(value="+02"), at, "is not one"),
        (WriteInput(values={"/3/1/14": "+02"}), at, "/3/1/14 is not within the target /3/0"),
        (WriteInput(values={"/3/0": "+02"}), at, "/3/0 is not a resource"),
        (WriteInput(values={"/3/0/x": 1}), at, "not an identifier"),
        (WriteInput(values={f"/3/0/{rid}": 1 for rid in range(1001, 2002)}), at, "at most 1000"),
    ]
    for body, where, message in refusals:
        with pytest.raises(OperationError) as raised:
            write_values(body, where)
        assert message in str(raised.value), (body, str(raised.value))


# --- requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [content.TLV, content.SENML_JSON, content.SENML_CBOR])
def test_write_request_round_trips(fmt: int) -> None:
    at = P("/3/0")
    values = write_values(WriteInput(values={"/3/0/14": "+02", "/3/0/13": 1700000000}), at)
    request = write_request(at, values, fmt)
    assert (request.method, request.path, request.content_format, request.uri_path) == ("PUT", at, fmt, ("3", "0"))
    decoded = {entry.path: entry.value for entry in content.decode(fmt, request.payload, at, resource_type)}
    assert decoded == values
    assert write_request(at, values, fmt, partial=True).method == "POST"


def test_write_request_in_a_format_that_cannot_carry_the_values() -> None:
    with pytest.raises(OperationError, match="cannot write these values as text"):
        write_request(P("/3/0"), {P("/3/0/14"): "+02", P("/3/0/15"): "UTC"}, content.TEXT)
    assert write_request(P("/3/0/14"), {P("/3/0/14"): "+02"}, content.TEXT).payload == b"+02"


def test_create_request() -> None:
    values = write_values(WriteInput(values={"/3303/4/5700": 20.5, "/3303/4/5701": "Cel"}), P("/3303"))
    request = create_request(P("/3303"), values, content.TLV)
    assert (request.method, str(request.path)) == ("POST", "/3303")
    assert {entry.path: entry.value for entry in tlv.decode(request.payload, P("/3303"), resource_type)} == values
    with pytest.raises(OperationError, match="one instance"):
        create_request(P("/3303"), {P("/3303/1/5700"): 1.0, P("/3303/2/5700"): 2.0}, content.TLV)


def test_other_requests() -> None:
    read = read_request(P("/3/0"), content.SENML_CBOR)
    assert (read.method, read.accept, read.payload) == ("GET", content.SENML_CBOR, b"")
    assert read_request(P("/3/0"), None).accept is None
    discover = discover_request(P("/3"))
    assert (discover.method, discover.accept) == ("GET", content.LINK_FORMAT)
    execute = execute_request(P("/3/0/4"), "0='now',1")
    assert (execute.method, execute.payload, execute.content_format) == ("POST", b"0='now',1", content.TEXT)
    bare = execute_request(P("/1/0/8"), None)
    assert (bare.payload, bare.content_format) == (b"", None)
    assert delete_request(P("/3303/1")).method == "DELETE"
    attributes = attributes_request(P("/3303/0/5700"), {"pmin": 5, "pmax": 60, "gt": 30.5, "st": None})
    assert (attributes.method, attributes.query, attributes.payload) == ("PUT", ("pmin=5", "pmax=60", "gt=30.5", "st"), b"")
    assert str(attributes) == "PUT /3303/0/5700?pmin=5&pmax=60&gt=30.5&st"


def test_attributes_query() -> None:
    assert attributes_query({"lt": 1e-05, "gt": 2, "st": 0.5}, P("/3303/0/5700")) == ("lt=0.00001", "gt=2", "st=0.5")
    assert attributes_query({"pmin": None, "epmax": 100}, P("/3")) == ("pmin", "epmax=100")
    refusals = [
        ({}, P("/3/0"), "at least one attribute"),
        ({"pmn": 1}, P("/3/0"), "unknown attribute 'pmn'"),
        ({"gt": 1}, P("/3303/0"), "gt applies to a numeric resource"),
        ({"pmin": -1}, P("/3/0"), "whole number of seconds"),
        ({"pmin": 1.5}, P("/3/0"), "whole number of seconds"),
        ({"pmax": "60"}, P("/3/0"), "must be a number"),
        ({"pmax": True}, P("/3/0"), "must be a number"),
        ({"st": -0.1}, P("/3/0/1"), "st (step) must be 0 or more"),
        ({"pmin": 60, "pmax": 5}, P("/3/0"), "pmin must not exceed pmax"),
        ({"epmin": 60, "epmax": 5}, P("/3/0"), "epmin must not exceed epmax"),
        ({"lt": 30, "gt": 30}, P("/3/0/1"), "lt must be below gt"),
        ({"lt": 10, "gt": 30, "st": 10}, P("/3/0/1"), "lt + 2 × st must be below gt"),
        ({"gt": float("nan")}, P("/3/0/1"), "must be a number"),
    ]
    for attributes, at, message in refusals:
        with pytest.raises(OperationError) as raised:
            attributes_query(attributes, at)
        assert message in str(raised.value), (attributes, str(raised.value))


@pytest.mark.parametrize("arguments", ["0", "0='on'", "0='on',1", "1='a b',2='',9", "5='x=y,z'"])
def test_execute_arguments_accepted(arguments: str) -> None:
    assert execute_arguments(arguments) == arguments.encode()


@pytest.mark.parametrize("arguments", ["x", "10", "0=on", "0='on", "0='o'n'", "0,", ",0", "0 ,1", "0='é'", "0='\n'", "0" * 1025])
def test_execute_arguments_refused(arguments: str) -> None:
    with pytest.raises(OperationError) as raised:
        execute_arguments(arguments)
    assert raised.value.field == "arguments"


# --- results ------------------------------------------------------------------------------------------


def test_read_tlv_typed_by_the_object_model() -> None:
    at = P("/3/0")
    payload = tlv.encode({P("/3/0/0"): "Acme", P("/3/0/9"): 80, P("/3/0/7/0"): 3800, P("/3/0/7/1"): 5000,
                          P("/3/0/13"): 1700000000, P("/3/0/999"): b"\x01\x02"}, at)
    result = outcome(Operation.READ, Reply("2.05", content.TLV, payload), at)
    assert result.as_json() == {
        "code": "2.05", "ok": True, "format": "tlv",
        "values": {"/3/0/0": "Acme", "/3/0/9": 80, "/3/0/7/0": 3800, "/3/0/7/1": 5000, "/3/0/13": 1700000000,
                   "/3/0/999": {"base64": "AQI="}},
    }


def test_read_tlv_float_of_an_ipso_object() -> None:
    at = P("/3303/0")
    payload = tlv.encode({P("/3303/0/5700"): 21.5, P("/3303/0/5701"): "Cel"}, at)
    assert decode_values(Reply("2.05", content.TLV_LEGACY, payload), at) == {"/3303/0/5700": 21.5, "/3303/0/5701": "Cel"}


def test_read_senml_json_and_cbor() -> None:
    at = P("/3303/0/5700")
    as_json = json.dumps([{"bn": "/3303/0/", "n": "5700", "v": 22.25}]).encode()
    assert outcome(Operation.READ, Reply("2.05", content.SENML_JSON, as_json), at).as_json() == {
        "code": "2.05", "ok": True, "format": "senml-json", "values": {"/3303/0/5700": 22.25},
    }
    as_cbor = cbor2.dumps([{-2: "/3/0/", 0: "0", 3: "Acme"}, {0: "1", 3: "Model"}, {0: "6", 2: 1}, {"vlo": "3:0", 0: "99"}])
    result = outcome(Operation.OBSERVE, Reply("2.05", content.SENML_CBOR, as_cbor), P("/3/0"))
    assert (result.format, result.values) == (
        "senml-cbor", {"/3/0/0": "Acme", "/3/0/1": "Model", "/3/0/6": 1, "/3/0/99": {"objlnk": "3:0"}},
    )


def test_read_text_and_opaque() -> None:
    assert decode_values(Reply("2.05", content.TEXT, b"21.5"), P("/3303/0/5700")) == {"/3303/0/5700": 21.5}
    assert decode_values(Reply("2.05", content.TEXT, b"80"), P("/3/0/9")) == {"/3/0/9": 80}
    assert decode_values(Reply("2.05", None, b"hello"), P("/3/0/999")) == {"/3/0/999": "hello"}
    assert decode_values(Reply("2.05", content.OPAQUE, b"\xff\x00"), P("/5/0/0")) == {"/5/0/0": {"base64": "/wA="}}
    assert decode_values(Reply("2.05", content.TLV, b""), P("/3/0")) == {}
    result = outcome(Operation.READ, Reply("2.05", None, b"hello"), P("/3/0/999"))
    assert result.format == "text"


def test_answers_that_cannot_be_read() -> None:
    broken = outcome(Operation.READ, Reply("2.05", content.TLV, b"\xc8\x00\x05ab"), P("/3/0"))
    assert broken.ok and broken.values is None and "could not be read" in (broken.error or "")
    assert broken.as_json()["payload"] == base64.b64encode(b"\xc8\x00\x05ab").decode()
    unsupported = outcome(Operation.READ, Reply("2.05", content.LWM2M_CBOR, b"\xa0"), P("/3/0"))
    assert unsupported.format == "lwm2m-cbor" and "not supported" in (unsupported.error or "")


def test_device_errors() -> None:
    refused = outcome(Operation.EXECUTE, Reply("4.05", None, b""), P("/1/0/9"))
    assert refused.as_json() == {"code": "4.05", "ok": False, "format": None, "error": "Method Not Allowed"}
    explained = outcome(Operation.WRITE, Reply("4.00", content.TEXT, b"bad value for /3/0/14"), P("/3/0/14"))
    assert (explained.ok, explained.error) == (False, "bad value for /3/0/14")
    assert diagnostic(Reply("5.00", None, b"\x00\x01")) == "Internal Server Error"
    assert len(diagnostic(Reply("4.00", None, b"x" * 1000))) == 256


def test_write_execute_delete_results_carry_no_values() -> None:
    for operation, code in ((Operation.WRITE, "2.04"), (Operation.EXECUTE, "2.04"), (Operation.DELETE, "2.02"),
                            (Operation.CREATE, "2.01"), (Operation.WRITE_ATTRIBUTES, "2.04")):
        assert outcome(operation, Reply(code), P("/3/0/1")).as_json() == {"code": code, "ok": True, "format": None}


def test_discover_links() -> None:
    payload = linkformat.encode([
        linkformat.Link("/3/0", ()), linkformat.Link("/3/0/1", ()),
        linkformat.Link("/3/0/7", (("dim", "2"), ("pmin", "5"))), linkformat.Link("/3/0/13", (("obs", None),)),
    ])
    result = outcome(Operation.DISCOVER, Reply("2.05", content.LINK_FORMAT, payload), P("/3/0"))
    assert result.as_json() == {
        "code": "2.05", "ok": True, "format": "link-format",
        "links": [{"path": "/3/0", "attributes": {}}, {"path": "/3/0/1", "attributes": {}},
                  {"path": "/3/0/7", "attributes": {"dim": "2", "pmin": "5"}}, {"path": "/3/0/13", "attributes": {"obs": True}}],
    }


def test_json_values() -> None:
    assert json_value(b"\x00") == {"base64": "AA=="}
    assert json_value(ObjLink(3, 0)) == {"objlnk": "3:0"}
    assert json_value(float("inf")) == "inf"
    nan = struct.unpack(">f", b"\x7f\xc0\x00\x00")[0]
    decoded = decode_values(Reply("2.05", content.TLV, tlv.encode({P("/3303/0/5700"): nan}, P("/3303/0"))), P("/3303/0"))
    assert json.dumps(decoded, allow_nan=False) == '{"/3303/0/5700": "nan"}'
