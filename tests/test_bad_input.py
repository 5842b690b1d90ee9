"""Bad input on the native routes and on the Magistrala config routes, through a real server on each
database backend.

Native errors are ``{"detail", "field"}``: malformed JSON 400, a well-formed body or query that fails
validation 422. Magistrala errors are ``{"message"}`` and every validation failure is 400. Both doors:
wrong or missing Content-Type 415, body over the limit 413. NaN/Infinity and out-of-range numbers are not
JSON and NUL characters cannot be stored by every backend: 400. After every refusal nothing was written.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant

MAX_BODY = 65536  # the harness starts every server with this limit


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class World:
    """One organisation with a device (with a bootstrap config) and a channel, shared by a module."""

    server: ServerProcess
    org: Tenant
    device_id: str
    channel_id: str

    @property
    def client(self) -> Api:
        return self.org.admin

    def path(self, template: str) -> str:
        return template.format(org=self.org.org_id, device=self.device_id, channel=self.channel_id)

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave as it was."""
        native = f"/api/v1/orgs/{self.org.org_id}"
        result: dict[str, Any] = {}
        for name, path, params in (
            ("devices", f"{native}/devices", {"limit": 100}),
            ("channels", f"{native}/channels", {"limit": 100}),
            ("events", f"{native}/events", {"limit": 500}),
            ("configs", f"/{self.org.org_id}/clients/configs", {"limit": 100}),
        ):
            response = self.client.get(path, params=params)
            assert response.status_code == 200, response.text
            result[name] = response.json()
        return result


@pytest.fixture(scope="module")
def world(server: ServerProcess) -> Iterator[World]:
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        org = make_tenant(server.url, root)
    channel = org.admin.post(f"/api/v1/orgs/{org.org_id}/channels", json={"name": "existing", "metadata": {"a": 1}})
    assert channel.status_code == 201, channel.text
    device = org.admin.post(f"/api/v1/orgs/{org.org_id}/devices", json={
        "name": "existing", "external_id": uid("ext"), "external_key": "key", "endpoint": uid("ep"),
        "channels": [channel.json()["id"]],
    })
    assert device.status_code == 201, device.text
    yield World(server, org, device.json()["id"], channel.json()["id"])
    org.close()


@dataclass(frozen=True)
class Target:
    door: str  # "native" | "magistrala"
    method: str
    path: str
    valid: dict[str, Any]  # a body the route would accept ("{channel}" is replaced by the channel id)

    @property
    def key(self) -> str:
        return "detail" if self.door == "native" else "message"

    @property
    def validation_status(self) -> int:
        return 422 if self.door == "native" else 400

    def body(self, world: World, **changes: Any) -> dict[str, Any]:
        body = {name: ([world.channel_id] if value == ["{channel}"] else value) for name, value in self.valid.items()}
        if "external_id" in body:
            body["external_id"] = uid("ext")
        body.update(changes)
        return body


N = "/api/v1/orgs/{org}"
TARGETS = {
    "native-create-device": Target("native", "POST", N + "/devices", {"name": "x"}),
    "native-patch-device": Target("native", "PATCH", N + "/devices/{device}", {"name": "x"}),
    "native-device-state": Target("native", "PUT", N + "/devices/{device}/state", {"state": 1}),
    "native-device-channels": Target("native", "PUT", N + "/devices/{device}/channels", {"channels": ["{channel}"]}),
    "native-create-channel": Target("native", "POST", N + "/channels", {"name": "x"}),
    "native-patch-channel": Target("native", "PATCH", N + "/channels/{channel}", {"name": "x"}),
    "magistrala-create-config": Target(
        "magistrala", "POST", "/{org}/clients/configs", {"external_id": "", "external_key": "k", "channels": ["{channel}"]}
    ),
    "magistrala-update-config": Target("magistrala", "PUT", "/{org}/clients/configs/{device}", {"name": "x"}),
    "magistrala-update-certs": Target("magistrala", "PATCH", "/{org}/clients/configs/certs/{device}", {"client_cert": "x"}),
    "magistrala-connections": Target("magistrala", "PUT", "/{org}/clients/configs/connections/{device}", {"channels": ["{channel}"]}),
    "magistrala-state": Target("magistrala", "PUT", "/{org}/clients/state/{device}", {"state": 1}),
}
target_names = pytest.mark.parametrize("name", list(TARGETS))


def send(world: World, target: Target, **kwargs: Any) -> httpx.Response:
    return world.client.request(target.method, world.path(target.path), **kwargs)


def refused(world: World, target: Target, status: int, **kwargs: Any) -> str:
    """Send a request that must be refused with ``status``, leaving everything as it was; returns the message."""
    before = world.snapshot()
    response = send(world, target, **kwargs)
    assert response.status_code == status, (target, kwargs.get("content", kwargs.get("json")), response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) <= {target.key, "field"}, body
    assert isinstance(body[target.key], str) and body[target.key], body
    assert world.snapshot() == before
    return body[target.key]


# --- syntax --------------------------------------------------------------------------------------


MALFORMED = [b'{"name": ', b"{bad}", b"{'name': 'x'}", b'{"name": "x",}', b'{"name": "x"} trailing', b"\xff\xfe{", b"{" * 5]


@target_names
def test_malformed_json_is_400(world: World, name: str) -> None:
    target = TARGETS[name]
    for content in MALFORMED:
        message = refused(world, target, 400, content=content, headers={"Content-Type": "application/json"})
        assert "JSON" in message or "pars" in message


@target_names
def test_deeply_nested_json_is_400(world: World, name: str) -> None:
    target = TARGETS[name]
    refused(world, target, 400, content=b"[" * 30000 + b"]" * 30000, headers={"Content-Type": "application/json"})


@target_names
def test_wrong_content_type_is_415(world: World, name: str) -> None:
    target = TARGETS[name]
    content = json.dumps(target.body(world)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml", "multipart/form-data; boundary=x",
                         "application/jsonp", "json"):
        message = refused(world, target, 415, content=content, headers={"Content-Type": content_type})
        assert "Content-Type" in message
    refused(world, target, 415, data={"name": "x"})  # a real form post
    refused(world, target, 415, content=content)  # no Content-Type at all


@target_names
def test_body_over_the_limit_is_413(world: World, name: str) -> None:
    target = TARGETS[name]
    oversized = json.dumps(target.body(world, name="x" * MAX_BODY)).encode()
    assert len(oversized) > MAX_BODY
    refused(world, target, 413, content=oversized, headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(oversized), 4096):
            yield oversized[start:start + 4096]

    refused(world, target, 413, content=chunks(), headers={"Content-Type": "application/json"})


def test_body_at_the_limit_is_accepted(world: World) -> None:
    prefix, suffix = b'{"content": "', b'"}'
    content = prefix + b"c" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(content) == MAX_BODY
    response = world.client.post(world.path(N + "/devices"), content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert response.json()["content"] == json.loads(content)["content"]
    assert world.client.delete(world.path(N + "/devices/" + response.json()["id"])).status_code == 204

    over = prefix + b"c" * (MAX_BODY + 1 - len(prefix) - len(suffix)) + suffix
    refused(world, TARGETS["native-create-device"], 413, content=over, headers={"Content-Type": "application/json"})


def test_chunked_body_under_the_limit_is_accepted(world: World) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "chun'
        yield b'ked", "metadata": {"parts": 3}'
        yield b"}"

    response = world.client.post(world.path(N + "/channels"), content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert (response.json()["name"], response.json()["metadata"]) == ("chunked", {"parts": 3})
    assert world.client.delete(world.path(N + "/channels/" + response.json()["id"])).status_code == 204


def test_json_content_type_variants_are_accepted(world: World) -> None:
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"):
        response = world.client.post(world.path(N + "/channels"), content=b'{"name": "ct"}', headers={"Content-Type": content_type})
        assert response.status_code == 201, (content_type, response.text)
        assert world.client.delete(world.path(N + "/channels/" + response.json()["id"])).status_code == 204


def raw_request(server: ServerProcess, head: bytes, body: bytes = b"{}") -> bytes:
    """Send bytes as they are (httpx refuses to send a broken request); returns the status line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        received = b""
        while b"\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("name", ["native-create-device", "magistrala-create-config"])
def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(world: World, name: str) -> None:
    target = TARGETS[name]
    before = world.snapshot()
    head = b"\r\n".join([
        f"{target.method} {world.path(target.path)} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Authorization: " + world.client.headers["authorization"].encode(),
        b"Content-Type: application/json",
        f"Content-Length: {MAX_BODY + 1}".encode(),
        b"Connection: close",
    ])
    assert raw_request(world.server, head, body=b"").startswith(b"HTTP/1.1 413")
    assert world.snapshot() == before


@pytest.mark.parametrize(
    "length_headers",
    [
        [b"Content-Length: abc"],
        [b"Content-Length: -1"],
        [b"Content-Length: 1, 2"],
        [b"Content-Length: 0x2"],
        [b"Content-Length: 99999999999999999999999999"],
        [b"Content-Length: 2", b"Content-Length: 3"],
        [b"Content-Length: 2", b"Transfer-Encoding: chunked"],
    ],
    ids=["letters", "negative", "list", "hex", "huge", "twice", "with-chunked"],
)
@pytest.mark.parametrize("name", ["native-create-device", "native-create-channel", "magistrala-create-config"])
def test_invalid_content_length_is_400(world: World, name: str, length_headers: list[bytes]) -> None:
    target = TARGETS[name]
    before = world.snapshot()
    head = b"\r\n".join([
        f"{target.method} {world.path(target.path)} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Authorization: " + world.client.headers["authorization"].encode(),
        b"Content-Type: application/json",
        *length_headers,
        b"Connection: close",
    ])
    status_line = raw_request(world.server, head)
    assert status_line.startswith(b"HTTP/1.1 400"), status_line
    assert world.snapshot() == before


# --- validation ----------------------------------------------------------------------------------


@target_names
def test_unknown_field(world: World, name: str) -> None:
    target = TARGETS[name]
    for field in ("bogus_field", "client_secret", "ID"):
        body = target.body(world, **{field: "x"})
        message = refused(world, target, target.validation_status, json=body)
        assert f"'{field}'" in message and "unknown" in message
        if target.door == "native":
            assert send(world, target, json=body).json()["field"] == field


WRONG_TYPES: dict[str, list[tuple[str, Any]]] = {
    "native-create-device": [("name", 123), ("state", "x"), ("channels", "notalist"), ("channels", [1]), ("external_id", 5),
                             ("imei", ["1"]), ("content", {}), ("client_key", 1), ("state", 1.5), ("alias", False)],
    "native-patch-device": [("name", 123), ("external_key", 7), ("endpoint", []), ("mac_address", {"a": 1})],
    "native-device-state": [("state", "x"), ("state", [1]), ("state", {}), ("state", 0.5)],
    "native-device-channels": [("channels", "notalist"), ("channels", {"a": "b"}), ("channels", [None]), ("channels", None)],
    "native-create-channel": [("name", 123), ("metadata", []), ("metadata", "x"), ("metadata", 1), ("metadata", None)],
    "native-patch-channel": [("name", 123), ("metadata", []), ("metadata", "{}")],
    "magistrala-create-config": [("name", 123), ("channels", "notalist"), ("channels", []), ("external_key", 5),
                                 ("content", []), ("external_id", None), ("client_id", 7)],
    "magistrala-update-config": [("name", 123), ("content", 5)],
    "magistrala-update-certs": [("client_cert", 5), ("ca_cert", [])],
    "magistrala-connections": [("channels", "notalist"), ("channels", [5])],
    "magistrala-state": [("state", "x"), ("state", None)],
}


@target_names
def test_wrong_types_name_the_field(world: World, name: str) -> None:
    target = TARGETS[name]
    for field, value in WRONG_TYPES[name]:
        body = target.body(world, **{field: value})
        message = refused(world, target, target.validation_status, json=body)
        assert message.startswith(field), (field, value, message)
        if target.door == "native":
            assert send(world, target, json=body).json()["field"].split(".")[0] == field


OVER_LONG: dict[str, list[tuple[str, int]]] = {
    "native-create-device": [("name", 257), ("external_id", 257), ("external_key", 1025), ("endpoint", 257),
                             ("mac_address", 65), ("serial_number", 129), ("imei", 33), ("alias", 257)],
    "native-patch-device": [("name", 257), ("endpoint", 257), ("imei", 33), ("external_key", 1025)],
    "native-create-channel": [("name", 257)],
    "native-patch-channel": [("name", 257)],
    "magistrala-create-config": [("external_id", 257), ("external_key", 1025), ("name", 257), ("client_id", 65)],
    "magistrala-update-config": [("name", 257)],
}


@pytest.mark.parametrize("name", list(OVER_LONG))
def test_over_long_strings(world: World, name: str) -> None:
    target = TARGETS[name]
    for field, length in OVER_LONG[name]:
        message = refused(world, target, target.validation_status, json=target.body(world, **{field: "é" * length}))
        assert message.startswith(field) and "at most" in message, message
    if name == "magistrala-create-config":
        message = refused(world, target, 400, json=target.body(world, channels=["c" * 65]))
        assert message.startswith("channels")


def test_empty_strings_where_a_value_is_needed(world: World) -> None:
    for field in ("external_id", "external_key", "endpoint"):
        message = refused(world, TARGETS["native-create-device"], 422, json={field: "", "name": "x"})
        assert message.startswith(field) and "at least 1" in message, message
        message = refused(world, TARGETS["native-patch-device"], 422, json={field: ""})
        assert message.startswith(field), message


def test_longest_accepted_values_are_stored_whole(world: World) -> None:
    """Every length limit of the API fits the database columns, on each backend (multi-byte characters too)."""
    fields = {
        "name": "é" * 256, "external_id": uid("ext").ljust(256, "x"), "external_key": "k" * 1024,
        "endpoint": uid("ep").ljust(256, "é"), "mac_address": "m" * 64, "serial_number": "s" * 128, "imei": "9" * 32,
        "alias": "a" * 256,
    }
    response = world.client.post(world.path(N + "/devices"), json=fields)
    assert response.status_code == 201, response.text
    device = response.json()
    for field, value in fields.items():
        if field != "external_key":
            assert device[field] == value, field
    channel = world.client.post(world.path(N + "/channels"), json={"name": "ü" * 256})
    assert channel.status_code == 201, channel.text
    assert channel.json()["name"] == "ü" * 256
    assert world.client.delete(world.path(N + "/devices/" + device["id"])).status_code == 204
    assert world.client.delete(world.path(N + "/channels/" + channel.json()["id"])).status_code == 204


@target_names
def test_body_must_be_an_object(world: World, name: str) -> None:
    target = TARGETS[name]
    for content in (b"null", b"[]", b'"text"', b"1", b"true", b"[{}]"):
        refused(world, target, target.validation_status, content=content, headers={"Content-Type": "application/json"})
    refused(world, target, target.validation_status)  # no body at all
    refused(world, target, target.validation_status, content=b"", headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("name", ["magistrala-create-config", "magistrala-update-config", "magistrala-update-certs",
                                  "magistrala-connections", "magistrala-state", "native-device-state", "native-device-channels"])
def test_empty_object_where_fields_are_required(world: World, name: str) -> None:
    target = TARGETS[name]
    refused(world, target, target.validation_status, json={})


# --- values that are not JSON, or that not every backend can store --------------------------------


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]


@target_names
def test_nan_and_infinity_are_refused(world: World, name: str) -> None:
    target = TARGETS[name]
    field = next(iter(target.valid))
    for literal in NON_FINITE:
        body = json.dumps(target.body(world)).encode()
        # the literal as a top-level field value, and nested (channel metadata) when the route has one
        contents = [body[:-1] + b', "' + field.encode() + b'": ' + literal + b"}"]
        if name.endswith("channel"):
            contents.append(b'{"name": "n", "metadata": {"deep": [1, {"x": ' + literal + b"}]}}")
        for content in contents:
            message = refused(world, target, 400, content=content, headers={"Content-Type": "application/json"})
            assert "JSON" in message or "range" in message


def test_nan_spelled_as_a_string_and_large_finite_numbers_are_fine(world: World) -> None:
    metadata = {"label": "NaN", "other": "Infinity", "big": 1.5e300, "small": -2.5e-300, "int": 10**30}
    response = world.client.post(world.path(N + "/channels"), json={"name": "NaN", "metadata": metadata})
    assert response.status_code == 201, response.text
    stored = world.client.get(world.path(N + "/channels/" + response.json()["id"])).json()
    assert stored["name"] == "NaN"
    assert stored["metadata"] == metadata
    assert world.client.delete(world.path(N + "/channels/" + stored["id"])).status_code == 204


@target_names
def test_nul_characters_in_the_body_are_refused(world: World, name: str) -> None:
    target = TARGETS[name]
    string_fields = [field for field, value in target.valid.items() if isinstance(value, str) and field != "external_id"]
    bodies = [target.body(world, **{field: "a\x00b"}) for field in string_fields]
    if "channels" in target.valid:
        bodies.append(target.body(world, channels=["\x00"]))
    if name.endswith("create-config"):
        bodies.append(target.body(world, external_id="ext\x00"))
    if name.endswith("channel"):
        bodies.append({"metadata": {"key\x00": "v"}})
        bodies.append({"metadata": {"k": ["ok", {"v": "\x00"}]}})
    bodies.append(target.body(world, note="\x00"))  # refused before the fields are even checked
    for body in bodies:
        message = refused(world, target, 400, json=body)
        assert "NUL" in message


def test_escaped_backslash_u0000_text_is_not_a_nul(world: World) -> None:
    """The six characters \\u0000 (an escaped backslash) are ordinary text."""
    response = world.client.post(world.path(N + "/channels"), content=b'{"name": "\\\\u0000"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "\\u0000"
    assert world.client.delete(world.path(N + "/channels/" + response.json()["id"])).status_code == 204


def test_nul_characters_in_query_and_path_are_refused(world: World) -> None:
    native = world.path(N)
    before = world.snapshot()
    for path, params, key in (
        (native + "/devices", {"name": "a\x00"}, "detail"),
        (native + "/devices", {"external_id": "\x00"}, "detail"),
        (native + "/devices", {"channel_id": "\x00"}, "detail"),
        (native + "/channels", {"name": "\x00"}, "detail"),
        (native + "/devices/%00", {}, "detail"),
        (native + "/channels/x%00y", {}, "detail"),
        (f"/{world.org.org_id}/clients/configs", {"name": "\x00"}, "message"),
        (f"/{world.org.org_id}/clients/configs/%00", {}, "message"),
    ):
        response = world.client.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        assert "NUL" in response.json()[key]
    response = world.client.delete(native + "/devices/%00")
    assert response.status_code == 400, response.text
    response = httpx.get(f"{world.server.url}/clients/bootstrap/ext%00", headers={"Authorization": "Client key"}, timeout=30)
    assert response.status_code == 400, response.text
    assert world.snapshot() == before


# --- failures part-way through a write leave nothing behind -----------------------------------------


def test_create_failing_on_second_unique_check_writes_nothing(world: World) -> None:
    existing = world.client.get(world.path(N + "/devices/{device}")).json()
    target = TARGETS["native-create-device"]
    fresh = uid("ext")
    message = refused(world, target, 409, json={"external_id": fresh, "external_key": "k", "endpoint": existing["endpoint"]})
    assert "endpoint" in message
    assert send(world, target, json={"external_id": fresh, "external_key": "k", "endpoint": existing["endpoint"]}).json()["field"] == "endpoint"
    message = refused(world, target, 409, json={"external_id": existing["external_id"], "external_key": "k", "endpoint": uid("ep")})
    assert "external_id" in message


def test_create_with_an_unknown_channel_writes_nothing(world: World) -> None:
    missing = str(uuid.uuid4())
    for name in ("native-create-device", "magistrala-create-config"):
        target = TARGETS[name]
        message = refused(world, target, 404, json=target.body(world, channels=[world.channel_id, missing], endpoint=uid("ep"))
                          if target.door == "native" else target.body(world, channels=[world.channel_id, missing]))
        assert missing in message


def test_patch_failing_validation_in_the_service_writes_nothing(world: World) -> None:
    keyless = world.client.post(world.path(N + "/devices"), json={"name": "keyless"})
    assert keyless.status_code == 201, keyless.text
    device_id = keyless.json()["id"]
    before = world.snapshot()
    response = world.client.patch(world.path(N + f"/devices/{device_id}"), json={"external_id": uid("ext"), "name": "renamed"})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "external_key"
    assert world.snapshot() == before
    assert world.client.delete(world.path(N + f"/devices/{device_id}")).status_code == 204


def test_duplicate_external_id_on_the_magistrala_door_writes_nothing(world: World) -> None:
    existing = world.client.get(world.path(N + "/devices/{device}")).json()
    target = TARGETS["magistrala-create-config"]
    message = refused(world, target, 409, json=target.body(world, external_id=existing["external_id"]))
    assert "external_id" in message
