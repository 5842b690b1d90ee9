"""End to end on loopback: device operations (REST → CoAP), queue mode, observations and triggers of a
real ``pilotboat serve``, against a real CoAP device peer (aiocoap) that registers with its management
server and answers from an in-memory object store."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import pytest
from aiocoap import resource
from aiocoap.numbers.codes import Code
from conftest import BACKENDS
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant

from pilotboat.lwm2m import content, linkformat
from pilotboat.lwm2m.model import CodecError, Entry, ObjLink, Path, ResourceType, Value

P = Path.parse
TYPES = {bool: ResourceType.BOOLEAN, int: ResourceType.INTEGER, float: ResourceType.FLOAT, str: ResourceType.STRING,
         bytes: ResourceType.OPAQUE, ObjLink: ResourceType.OBJLNK}


def initial_values() -> dict[Path, Value]:
    return {
        P("/1/0/0"): 1, P("/1/0/1"): 300, P("/1/0/6"): False, P("/1/0/7"): "U",
        P("/3/0/0"): "Acme", P("/3/0/1"): "Pilot 1", P("/3/0/2"): "SN-1", P("/3/0/9"): 80, P("/3/0/13"): 1700000000,
        P("/3/0/14"): "+01", P("/3/0/7/0"): 3800, P("/3/0/7/1"): 5000,
        P("/3303/0/5700"): 21.5, P("/3303/0/5701"): "Cel",
    }


EXECUTABLE = frozenset({P("/1/0/8"), P("/1/0/9"), P("/3/0/4"), P("/3303/0/5605")})


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: tuple[str, ...]
    content_format: int | None
    accept: int | None
    observe: int | None
    payload: bytes


class _DeviceResources(resource.ObservableResource, resource.PathCapable):
    """Every path of the device: LwM2M reads, writes, executes, create, delete, discover, attributes and observe."""

    def __init__(self, peer: DevicePeer) -> None:
        super().__init__()
        self.peer = peer
        self.observers: dict[Path, set[Any]] = {}

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return True

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        path = Path.of(*(int(part) for part in request.opt.uri_path))
        self.observers.setdefault(path, set()).add(serverobservation)
        serverobservation.accept(lambda: self.observers.get(path, set()).discard(serverobservation))

    def changed(self, path: Path) -> None:
        for observed, observations in self.observers.items():
            if path.is_within(observed):
                for observation in list(observations):
                    observation.trigger()

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        peer = self.peer
        try:
            path = Path.of(*(int(part) for part in request.opt.uri_path))
        except (ValueError, CodecError):
            return aiocoap.Message(code=Code.NOT_FOUND)
        fmt = request.opt.content_format
        if getattr(request, "recorded", False):  # rendered again for a notification
            return self._get(path, request)
        request.recorded = True
        peer.received.append(Received(
            request.code.name, str(path), tuple(request.opt.uri_query), int(fmt) if fmt is not None else None,
            int(request.opt.accept) if request.opt.accept is not None else None, request.opt.observe,
            bytes(request.payload),
        ))
        if peer.silent:
            await asyncio.Event().wait()  # never answers
        handler = {Code.GET: self._get, Code.PUT: self._put, Code.POST: self._post, Code.DELETE: self._delete}[request.code]
        return handler(path, request)

    def _within(self, path: Path) -> dict[Path, Value]:
        return {where: value for where, value in self.peer.values.items() if where.is_within(path)}

    def _type(self, path: Path) -> ResourceType | None:
        for where, value in self.peer.values.items():
            if where.object_id == path.object_id and where.resource_id == path.resource_id:
                return TYPES[type(value)]
        return None

    def _get(self, path: Path, request: aiocoap.Message) -> aiocoap.Message:
        accept = int(request.opt.accept) if request.opt.accept is not None else None
        if path in EXECUTABLE:
            return aiocoap.Message(code=Code.METHOD_NOT_ALLOWED)
        found = self._within(path)
        if not found:
            return aiocoap.Message(code=Code.NOT_FOUND, payload=f"nothing at {path}".encode())
        if accept == content.LINK_FORMAT:
            return self._discover(path, found)
        fmt = accept if accept is not None else self.peer.answer_format
        if fmt not in (content.TLV, content.SENML_JSON, content.SENML_CBOR, content.TEXT):
            return aiocoap.Message(code=Code.NOT_ACCEPTABLE)
        try:
            payload = content.encode(fmt, found, path)
        except CodecError:
            return aiocoap.Message(code=Code.NOT_ACCEPTABLE)
        return aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=fmt)

    def _discover(self, path: Path, found: dict[Path, Value]) -> aiocoap.Message:
        targets = sorted({Path.of(*where.ids[: depth]) for where in found for depth in range(path.depth, 4)}, key=lambda p: p.ids)
        links = [
            linkformat.Link(str(where), tuple((name, value) for name, value in self.peer.attributes.get(where, {}).items()))
            for where in targets
        ]
        return aiocoap.Message(code=Code.CONTENT, payload=linkformat.encode(links), content_format=content.LINK_FORMAT)

    def _decode(self, path: Path, request: aiocoap.Message) -> dict[Path, Value] | aiocoap.Message:
        fmt = request.opt.content_format
        if fmt is None:
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=b"no content format")
        try:
            entries: tuple[Entry, ...] = content.decode(int(fmt), bytes(request.payload), path, self._type)
        except CodecError as exc:
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=str(exc).encode()[:100])
        return {entry.path: entry.value for entry in entries}

    def _put(self, path: Path, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_query:  # Write-Attributes
            attributes = self.peer.attributes.setdefault(path, {})
            for option in request.opt.uri_query:
                name, _, value = option.partition("=")
                if value:
                    attributes[name] = value
                else:
                    attributes.pop(name, None)
            return aiocoap.Message(code=Code.CHANGED)
        return self._write(path, request)

    def _write(self, path: Path, request: aiocoap.Message) -> aiocoap.Message:
        values = self._decode(path, request)
        if isinstance(values, aiocoap.Message):
            return values
        self.peer.values.update(values)
        for where in values:
            self.changed(where)
        return aiocoap.Message(code=Code.CHANGED)

    def _post(self, path: Path, request: aiocoap.Message) -> aiocoap.Message:
        if path.depth == 1:  # Create
            values = self._decode(path, request)
            if isinstance(values, aiocoap.Message):
                return values
            instances = {where.instance_id for where in values}
            if len(instances) != 1 or self._within(Path(path.object_id, *instances)):
                return aiocoap.Message(code=Code.BAD_REQUEST)
            self.peer.values.update(values)
            return aiocoap.Message(code=Code.CREATED, location_path=(str(path.object_id), str(next(iter(instances)))))
        if path.depth == 2:  # partial update
            return self._write(path, request)
        if path not in EXECUTABLE or (path == P("/1/0/9") and self.peer.refuse_bootstrap_trigger):
            return aiocoap.Message(code=Code.METHOD_NOT_ALLOWED)
        self.peer.executed.append((str(path), bytes(request.payload)))
        return aiocoap.Message(code=Code.CHANGED)

    def _delete(self, path: Path, request: aiocoap.Message) -> aiocoap.Message:
        found = self._within(path)
        if path.depth != 2 or not found:
            return aiocoap.Message(code=Code.NOT_FOUND)
        for where in found:
            del self.peer.values[where]
        return aiocoap.Message(code=Code.DELETED)


class DevicePeer:
    """An LwM2M client on a thread of its own: its own UDP socket, Register/Update/De-register, and the
    requests of the server answered from ``values``. ``silent`` makes it take requests without answering."""

    def __init__(
        self, endpoint: str, server_uri: str, *, lwm2m_version: str = "1.0", content_formats: tuple[int, ...] = (),
        answer_format: int = content.TLV, queue_mode: bool = False, lifetime: int = 300,
        refuse_bootstrap_trigger: bool = False,
    ) -> None:
        self.endpoint, self.server_uri = endpoint, server_uri
        self.lwm2m_version, self.content_formats, self.answer_format = lwm2m_version, content_formats, answer_format
        self.queue_mode, self.lifetime, self.refuse_bootstrap_trigger = queue_mode, lifetime, refuse_bootstrap_trigger
        self.values = initial_values()
        self.attributes: dict[Path, dict[str, str]] = {}
        self.received: list[Received] = []
        self.executed: list[tuple[str, bytes]] = []
        self.silent = False
        self.location: tuple[str, ...] | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.resources = _DeviceResources(self)
        self.context: aiocoap.Context = self.call(
            aiocoap.Context.create_server_context(self.resources, bind=("127.0.0.1", 0), transports=["udp6"])
        )

    def call(self, work: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def _links(self) -> bytes:
        root = '</>;rt="oma.lwm2m"' + (f';ct="{" ".join(map(str, self.content_formats))}"' if self.content_formats else "")
        instances = sorted({Path.of(*where.ids[:2]) for where in self.values}, key=lambda p: p.ids)
        return (",".join([root, *(f"<{where}>" for where in instances)])).encode()

    async def _request(self, code: Code, path: tuple[str, ...], query: list[str], payload: bytes = b"") -> aiocoap.Message:
        message = aiocoap.Message(code=code, payload=payload, uri=self.server_uri)
        message.opt.uri_path = path
        message.opt.uri_query = query
        if payload:
            message.opt.content_format = content.LINK_FORMAT
        return await asyncio.wait_for(self.context.request(message).response, 20)

    def register(self) -> str:
        """Register; the registration id."""
        query = [f"ep={self.endpoint}", f"lt={self.lifetime}", f"lwm2m={self.lwm2m_version}", "b=U"]
        if self.queue_mode:
            query.append("Q")
        response = self.call(self._request(Code.POST, ("rd",), query, self._links()))
        assert response.code == Code.CREATED, response
        self.location = tuple(response.opt.location_path)
        return self.location[1]

    def update(self) -> str:
        """Update; the dotted code of the answer."""
        assert self.location is not None
        return self.call(self._request(Code.POST, self.location, [])).code.dotted

    def deregister(self) -> str:
        assert self.location is not None
        code = self.call(self._request(Code.DELETE, self.location, [])).code.dotted
        self.location = None
        return code

    def set(self, path: str, value: Value) -> None:
        """Change a value as the device would, notifying its observers."""

        async def change() -> None:
            self.values[P(path)] = value
            self.resources.changed(P(path))

        self.call(change())

    def observers(self, path: str) -> int:
        async def count() -> int:
            return len(self.resources.observers.get(P(path), ()))

        return self.call(count())

    def received_since(self, index: int) -> list[Received]:
        return list(self.received[index:])

    def close(self) -> None:
        try:
            self.call(self.context.shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# --- helpers ------------------------------------------------------------------------------------


def new_device(tenant: Tenant, **fields: Any) -> tuple[str, str]:
    endpoint = f"urn:dev:{uuid.uuid4().hex[:12]}"
    created = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices",
                                json={"name": "peer", "endpoint": endpoint, "state": 1, **fields})
    assert created.status_code == 201, created.text
    return endpoint, created.json()["id"]


@pytest.fixture()
def peers() -> Iterator[Callable[..., DevicePeer]]:
    started: list[DevicePeer] = []

    def start(endpoint: str, server_uri: str, **options: Any) -> DevicePeer:
        peer = DevicePeer(endpoint, server_uri, **options)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


def registered_peer(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer], **options: Any) -> tuple[DevicePeer, str]:
    """A new device of ``tenant`` and its peer, registered (the server knows it once it answered 2.01)."""
    endpoint, device_id = new_device(tenant, **options.pop("device_fields", {}))
    peer = peers(endpoint, server.lwm2m_uri, **options)
    peer.register()
    return peer, device_id


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ops_url(tenant: Tenant, device_id: str, path: str = "") -> str:
    return f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/lwm2m/{path.lstrip('/')}"


def events_of(tenant: Tenant, device_id: str, kind: str) -> list[dict[str, Any]]:
    page = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": kind, "device_id": device_id, "limit": 200})
    assert page.status_code == 200, page.text
    return page.json()["events"]


def operation_event(tenant: Tenant, device_id: str, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((event for event in events_of(tenant, device_id, "lwm2m.operation")
                     if event["detail"]["request_id"] == request_id), None)

    return wait_for(find, f"the lwm2m.operation event of {request_id}")


def ok_result(response: Any, code: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["code"], body["ok"], body["status"]) == (code, True, "done"), body
    return body


# --- reads, writes, execute, create, delete, discover, attributes ------------------------------------


def test_read_decoded_values(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    read = ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3/0")), "2.05")
    assert (read["operation"], read["path"], read["format"]) == ("read", "/3/0", "tlv")
    assert read["values"] == {
        "/3/0/0": "Acme", "/3/0/1": "Pilot 1", "/3/0/2": "SN-1", "/3/0/9": 80, "/3/0/13": 1700000000, "/3/0/14": "+01",
        "/3/0/7/0": 3800, "/3/0/7/1": 5000,
    }
    [request] = [received for received in peer.received if received.path == "/3/0"]
    assert (request.method, request.accept) == ("GET", None)  # a 1.0 device that announced nothing chooses

    text = ok_result(tenant.viewer.get(ops_url(tenant, device_id, "3303/0/5700"), params={"format": "text"}), "2.05")
    assert (text["format"], text["values"]) == ("text", {"/3303/0/5700": 21.5})
    senml = ok_result(tenant.viewer.get(ops_url(tenant, device_id, "3303/0"), params={"format": "senml-json"}), "2.05")
    assert (senml["format"], senml["values"]) == ("senml-json", {"/3303/0/5700": 21.5, "/3303/0/5701": "Cel"})
    assert peer.received[-1].accept == content.SENML_JSON

    missing = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/999"))
    assert missing.status_code == 200, missing.text
    assert {key: missing.json()[key] for key in ("code", "ok", "error")} == {"code": "4.04", "ok": False, "error": "nothing at /3/0/999"}

    event = operation_event(tenant, device_id, read["request_id"])
    assert (event["outcome"], event["actor"], event["detail"]["code"], event["detail"]["values"]) == (
        "ok", tenant.viewer.get("/api/v1/me").json()["email"], "2.05", read["values"],
    )
    failed = operation_event(tenant, device_id, missing.json()["request_id"])
    assert (failed["outcome"], failed["reason"]) == ("failed", "nothing at /3/0/999")

    state = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/lwm2m-requests/{read['request_id']}")
    assert state.status_code == 200, state.text
    assert {key: state.json()[key] for key in ("status", "code", "values", "device_id")} == {
        "status": "done", "code": "2.05", "values": read["values"], "device_id": device_id,
    }
    # Without waiting: 202 at once, and the result under lwm2m-requests.
    accepted = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/1"), params={"wait": "false"})
    assert accepted.status_code == 202 and accepted.json()["status"] == "sent", accepted.text
    url = f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/lwm2m-requests/{accepted.json()['request_id']}"
    done = wait_for(lambda: (body := tenant.viewer.get(url).json())["status"] == "done" and body, "the request to finish")
    assert done["values"] == {"/3/0/1": "Pilot 1"}
    bad_format = tenant.viewer.get(ops_url(tenant, device_id, "/3/0"), params={"format": "xml"})
    assert bad_format.status_code == 400 and "format must be one of" in bad_format.json()["detail"]


def test_a_device_announcing_senml_cbor_is_read_and_written_in_it(
    server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer],
) -> None:
    peer, device_id = registered_peer(server, tenant, peers, lwm2m_version="1.1",
                                      content_formats=(content.SENML_JSON, content.SENML_CBOR))
    read = ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3303/0/5700")), "2.05")
    assert (read["format"], read["values"]) == ("senml-cbor", {"/3303/0/5700": 21.5})
    assert peer.received[-1].accept == content.SENML_CBOR
    written = tenant.member.put(ops_url(tenant, device_id, "/3/0/14"), json={"value": "+05"})
    ok_result(written, "2.04")
    assert peer.received[-1].content_format == content.SENML_CBOR and peer.values[P("/3/0/14")] == "+05"


def test_write_then_read_back(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    write = ok_result(tenant.member.put(ops_url(tenant, device_id, "/3/0/14"), json={"value": "+02"}), "2.04")
    assert (write["operation"], write["path"]) == ("write", "/3/0/14")
    assert (peer.received[-1].method, peer.received[-1].content_format) == ("PUT", content.TLV)
    assert ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3/0/14")), "2.05")["values"] == {"/3/0/14": "+02"}

    ok_result(tenant.member.put(ops_url(tenant, device_id, "/3303/0"), json={"values": {"/3303/0/5700": 30, "/3303/0/5701": "K"}}), "2.04")
    assert peer.values[P("/3303/0/5700")] == 30.0 and isinstance(peer.values[P("/3303/0/5700")], float)
    patched = ok_result(tenant.member.patch(ops_url(tenant, device_id, "/3/0"), json={"values": {"/3/0/14": "-03"}}), "2.04")
    assert patched["operation"] == "write-partial" and peer.received[-1].method == "POST"
    assert ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3/0")), "2.05")["values"]["/3/0/14"] == "-03"
    # The event of a write does not repeat the written values.
    assert "values" not in operation_event(tenant, device_id, patched["request_id"])["detail"]

    before = len(peer.received)
    refusals = [
        (tenant.member.put(ops_url(tenant, device_id, "/3/0"), json={"values": {"/3/1/14": "+02"}}), "/3/1/14 is not within the target /3/0"),
        (tenant.member.put(ops_url(tenant, device_id, "/3303/0/5700"), json={"value": "hot"}), "type float"),
        (tenant.member.put(ops_url(tenant, device_id, "/3/0"), json={"value": "x"}), "is not one"),
        (tenant.member.put(ops_url(tenant, device_id, "/3/0/14"), json={"value": "x", "extra": 1}), "unknown field 'extra'"),
        (tenant.member.put(ops_url(tenant, device_id, "/3/0/14")), 'give "values"'),
        (tenant.member.put(ops_url(tenant, device_id, "/3"), json={"values": {"/3/0/14": "x"}}), "write addresses an object instance"),
        (tenant.member.patch(ops_url(tenant, device_id, "/3/0/14"), json={"value": "x"}), "write-partial addresses an object instance"),
        (tenant.member.put(ops_url(tenant, device_id, "/3/0/4"), json={"value": "x"}), "is executable"),
        (tenant.member.put(ops_url(tenant, device_id, "/3/0/14"), params={"format": "opaque"}, json={"value": "x"}), "cannot write"),
    ]
    for response, message in refusals:
        assert response.status_code == 400, response.text
        assert message in response.json()["detail"], response.json()
    assert len(peer.received) == before, "a refused request reached the device"
    viewer = tenant.viewer.put(ops_url(tenant, device_id, "/3/0/14"), json={"value": "+09"})
    assert viewer.status_code == 403 and peer.values[P("/3/0/14")] == "-03"


def test_execute_with_arguments(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    executed = ok_result(tenant.member.post(ops_url(tenant, device_id, "/3/0/4"), json={"arguments": "0='now',1"}), "2.04")
    assert executed["operation"] == "execute"
    assert peer.executed == [("/3/0/4", b"0='now',1")] and peer.received[-1].content_format == content.TEXT
    ok_result(tenant.member.post(ops_url(tenant, device_id, "/3303/0/5605")), "2.04")
    assert peer.executed[-1] == ("/3303/0/5605", b"")
    refused = tenant.member.post(ops_url(tenant, device_id, "/3/0/0"))
    assert refused.status_code == 200 and (refused.json()["code"], refused.json()["ok"]) == ("4.05", False)
    bad = tenant.member.post(ops_url(tenant, device_id, "/3/0/4"), json={"arguments": "0=now"})
    assert bad.status_code == 400 and bad.json()["field"] == "arguments"
    instance = tenant.member.post(ops_url(tenant, device_id, "/3/0"))
    assert instance.status_code == 400 and "execute addresses a resource" in instance.json()["detail"]
    assert len(peer.executed) == 2


def test_create_and_delete(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    created = ok_result(tenant.member.post(ops_url(tenant, device_id, "/3303"),
                                           json={"values": {"/3303/1/5700": 19.5, "/3303/1/5701": "Cel"}}), "2.01")
    assert created["operation"] == "create" and peer.received[-1].method == "POST"
    assert ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3303/1")), "2.05")["values"] == {
        "/3303/1/5700": 19.5, "/3303/1/5701": "Cel",
    }
    deleted = ok_result(tenant.member.delete(ops_url(tenant, device_id, "/3303/1")), "2.02")
    assert deleted["operation"] == "delete"
    gone = tenant.viewer.get(ops_url(tenant, device_id, "/3303/1"))
    assert (gone.json()["code"], gone.json()["ok"]) == ("4.04", False)
    assert tenant.member.delete(ops_url(tenant, device_id, "/3303")).status_code == 400
    two = tenant.member.post(ops_url(tenant, device_id, "/3303"), json={"values": {"/3303/2/5700": 1, "/3303/3/5700": 2}})
    assert two.status_code == 400 and "one instance" in two.json()["detail"]


def test_discover_and_write_attributes(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    url = ops_url(tenant, device_id, "/3303/0/5700")
    written = ok_result(tenant.member.put(url, params={"op": "attributes"}, json={"pmin": 5, "pmax": 60, "gt": 30.5}), "2.04")
    assert written["operation"] == "write-attributes"
    assert (peer.received[-1].query, peer.received[-1].payload) == (("pmin=5", "pmax=60", "gt=30.5"), b"")
    discovered = ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3303/0"), params={"op": "discover"}), "2.05")
    assert (discovered["operation"], discovered["format"]) == ("discover", "link-format")
    assert discovered["links"] == [
        {"path": "/3303/0", "attributes": {}},
        {"path": "/3303/0/5700", "attributes": {"pmin": "5", "pmax": "60", "gt": "30.5"}},
        {"path": "/3303/0/5701", "attributes": {}},
    ]
    assert peer.received[-1].accept == content.LINK_FORMAT
    ok_result(tenant.member.put(url, params={"op": "attributes"}, json={"pmin": None}), "2.04")
    assert peer.received[-1].query == ("pmin",) and peer.attributes[P("/3303/0/5700")] == {"pmax": "60", "gt": "30.5"}

    before = len(peer.received)
    for body, message in (({"pmin": 60, "pmax": 5}, "pmin must not exceed pmax"), ({"speed": 1}, "unknown attribute"),
                          ({}, "at least one attribute"), ({"lt": 40, "gt": 30}, "lt must be below gt")):
        refused = tenant.member.put(url, params={"op": "attributes"}, json=body)
        assert refused.status_code == 400 and message in refused.json()["detail"], refused.text
    instance_threshold = tenant.member.put(ops_url(tenant, device_id, "/3303/0"), params={"op": "attributes"}, json={"gt": 1})
    assert instance_threshold.status_code == 400
    assert len(peer.received) == before
    assert tenant.viewer.put(url, params={"op": "attributes"}, json={"pmin": 1}).status_code == 403


def test_security_object_is_refused(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    before = len(peer.received)
    attempts = [
        tenant.admin.get(ops_url(tenant, device_id, "/0/0")),
        tenant.admin.get(ops_url(tenant, device_id, "/0"), params={"op": "discover"}),
        tenant.admin.put(ops_url(tenant, device_id, "/0/1/0"), json={"value": "coap://evil.example"}),
        tenant.admin.delete(ops_url(tenant, device_id, "/0/1")),
        tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/observations", json={"path": "/0/1/5"}),
    ]
    for response in attempts:
        assert response.status_code == 403 and "Security object" in response.json()["detail"], response.text
    assert len(peer.received) == before


def test_no_answer_is_504_and_the_request_state_says_why(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    peer.silent = True
    started = time.monotonic()
    response = tenant.viewer.get(ops_url(tenant, device_id, "/3/0"), params={"timeout": 1.5})
    assert response.status_code == 504, response.text
    assert 1.4 < time.monotonic() - started < 10
    request_id = response.json()["request_id"]
    assert "1.5 s" in response.json()["detail"]
    assert peer.received[-1].path == "/3/0"  # it reached the device, which kept quiet
    state = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/lwm2m-requests/{request_id}").json()
    assert state["status"] == "failed" and "no answer" in state["error"]
    event = operation_event(tenant, device_id, request_id)
    assert (event["outcome"], event["detail"]["code"]) == ("timeout", None)
    assert tenant.viewer.get(ops_url(tenant, device_id, "/3/0"), params={"timeout": 301}).status_code == 422


def test_unregistered_unknown_and_foreign_devices(
    server: ServerProcess, tenant: Tenant, other_tenant: Tenant, peers: Callable[..., DevicePeer],
) -> None:
    _, never_registered = new_device(tenant)
    response = tenant.viewer.get(ops_url(tenant, never_registered, "/3/0"))
    assert response.status_code == 409 and "not registered" in response.json()["detail"]
    unknown = tenant.viewer.get(ops_url(tenant, str(uuid.uuid4()), "/3/0"))
    assert unknown.status_code == 404 and unknown.json()["detail"] == "device not found"
    peer, foreign = registered_peer(server, other_tenant, peers)
    before = len(peer.received)
    for client, write_status in ((tenant.admin, 404), (tenant.viewer, 403)):  # a viewer may not write anywhere
        assert client.get(ops_url(tenant, foreign, "/3/0")).status_code == 404
        assert client.get(ops_url(other_tenant, foreign, "/3/0")).status_code == 404
        assert client.post(f"/api/v1/orgs/{tenant.org_id}/devices/{foreign}/commands/trigger-update").status_code == write_status
        assert client.post(f"/api/v1/orgs/{other_tenant.org_id}/devices/{foreign}/commands/trigger-update").status_code == 404
    assert len(peer.received) == before
    assert ok_result(other_tenant.viewer.get(ops_url(other_tenant, foreign, "/3/0/0")), "2.05")["values"] == {"/3/0/0": "Acme"}
    # A request id of another organisation's device is not found either.
    request_id = other_tenant.viewer.get(ops_url(other_tenant, foreign, "/3/0/0")).json()["request_id"]
    assert tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{foreign}/lwm2m-requests/{request_id}").status_code == 404
    assert tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{never_registered}/lwm2m-requests/{request_id}").status_code == 404
    # After de-registration: 409 again.
    assert peer.deregister() == "2.02"
    wait_for(lambda: other_tenant.viewer.get(ops_url(other_tenant, foreign, "/3/0")).status_code == 409, "409 after de-registration")


# --- queue mode ---------------------------------------------------------------------------------------

AWAKE_SECONDS = 2.0


@pytest.fixture(scope="module", params=BACKENDS)
def queue_server(request: pytest.FixtureRequest, server_factory: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server whose queue-mode devices stay awake 2 s, with room for 3 requests per device."""
    process = server_factory(request.param, PILOTBOAT_LWM2M_QUEUE_AWAKE_SECONDS=str(AWAKE_SECONDS),
                             PILOTBOAT_LWM2M_QUEUE_PER_DEVICE="3", PILOTBOAT_LWM2M_QUEUE_REQUEST_TTL="8")
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def queue_tenant(queue_server: ServerProcess) -> Iterator[Tenant]:
    with Api.login(queue_server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        created = make_tenant(queue_server.url, root)
    yield created
    created.close()


def request_state(tenant: Tenant, device_id: str, request_id: str) -> dict[str, Any]:
    response = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/lwm2m-requests/{request_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_queue_mode_device_gets_its_requests_when_it_updates(
    queue_server: ServerProcess, queue_tenant: Tenant, peers: Callable[..., DevicePeer],
) -> None:
    tenant = queue_tenant
    peer, device_id = registered_peer(queue_server, tenant, peers, queue_mode=True)
    # Awake right after registering: answered at once.
    ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3/0/0")), "2.05")
    time.sleep(AWAKE_SECONDS + 0.5)
    peer.silent = True  # asleep: it would not answer anyway
    before = len(peer.received)

    queued = tenant.member.put(ops_url(tenant, device_id, "/3/0/14"), params={"wait": "false"}, json={"value": "+04"})
    assert queued.status_code == 202, queued.text
    assert queued.json()["status"] == "queued" and set(queued.json()) == {"request_id", "operation", "path", "status"}
    waited = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/14"), params={"timeout": 1})
    assert waited.status_code == 504, waited.text
    assert "still queued" in waited.json()["detail"]
    assert request_state(tenant, device_id, queued.json()["request_id"])["status"] == "queued"
    assert request_state(tenant, device_id, waited.json()["request_id"])["status"] == "queued"
    time.sleep(0.5)
    assert len(peer.received) == before, "a request was sent to a sleeping device"

    # An observation asked for while the device sleeps waits for it too.
    observation = tenant.member.post(observations_url(tenant, device_id), json={"path": "/3303/0/5700"})
    assert observation.status_code == 201 and observation.json()["status"] == "pending", observation.text

    peer.silent = False
    assert peer.update() == "2.04"
    write_state = wait_for(lambda: (state := request_state(tenant, device_id, queued.json()["request_id"]))["status"] == "done" and state,
                           "the queued write to be delivered")
    assert (write_state["code"], write_state["ok"]) == ("2.04", True) and write_state["sent_at"] and write_state["finished_at"]
    read_state = wait_for(lambda: (state := request_state(tenant, device_id, waited.json()["request_id"]))["status"] == "done" and state,
                          "the queued read to be delivered")
    assert read_state["values"] == {"/3/0/14": "+04"}  # delivered in order: the write first
    queued_requests = [(received.method, received.path) for received in peer.received_since(before) if received.observe is None]
    assert queued_requests == [("PUT", "/3/0/14"), ("GET", "/3/0/14")]
    event = operation_event(tenant, device_id, queued.json()["request_id"])
    assert (event["outcome"], event["detail"]["operation"], event["detail"]["status"]) == ("ok", "write", "done")

    notified(tenant, device_id, observation.json()["id"], 21.5)
    # Awake again after the update: answered directly.
    ok_result(tenant.viewer.get(ops_url(tenant, device_id, "/3/0/1")), "2.05")


def test_queue_limits_expiry_and_the_end_of_a_registration(
    queue_server: ServerProcess, queue_tenant: Tenant, peers: Callable[..., DevicePeer],
) -> None:
    tenant = queue_tenant
    peer, device_id = registered_peer(queue_server, tenant, peers, queue_mode=True)
    time.sleep(AWAKE_SECONDS + 0.3)
    ids = []
    for _ in range(3):
        response = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/0"), params={"wait": "false"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["request_id"])
    full = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/0"), params={"wait": "false"})
    assert full.status_code == 429 and full.headers["retry-after"] == "2", full.text
    # The registration ends: its queued requests fail.
    assert peer.deregister() == "2.02"
    for request_id in ids:
        state = wait_for(lambda request_id=request_id: (s := request_state(tenant, device_id, request_id))["status"] == "failed" and s,
                         "queued requests to fail")
        assert "registration ended (deregistered)" in state["error"]
    assert operation_event(tenant, device_id, ids[0])["outcome"] == "failed"

    # A queued request that the device never wakes up for expires (the TTL of this server is 8 s).
    peer.register()
    time.sleep(AWAKE_SECONDS + 0.3)
    lonely = tenant.viewer.get(ops_url(tenant, device_id, "/3/0/0"), params={"wait": "false"}).json()["request_id"]
    expired = wait_for(lambda: (s := request_state(tenant, device_id, lonely))["status"] == "expired" and s, "the request to expire", 15)
    assert expired["expires_at"] and "expired" in expired["error"]
    assert operation_event(tenant, device_id, lonely)["outcome"] == "expired"


# --- observations ------------------------------------------------------------------------------------


def observations_url(tenant: Tenant, device_id: str) -> str:
    return f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/observations"


def notifications(tenant: Tenant, device_id: str, observation_id: str) -> list[dict[str, Any]]:
    page = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/events",
                             params={"kind": "lwm2m.notification", "device_id": device_id, "limit": 200})
    assert page.status_code == 200, page.text
    found = [event for event in page.json()["events"] if event["detail"]["observation_id"] == observation_id]
    return sorted(found, key=lambda event: event["id"])


def notified(tenant: Tenant, device_id: str, observation_id: str, value: float) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((event for event in notifications(tenant, device_id, observation_id)
                     if event["detail"].get("values") == {"/3303/0/5700": value}), None)

    return wait_for(find, f"a notification of {value}")


def test_observation_notifications_become_events(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    url = observations_url(tenant, device_id)
    created = tenant.member.post(url, json={"path": "/3303/0/5700", "attributes": {"pmin": 0, "pmax": 30}})
    assert created.status_code == 201, created.text
    observation = created.json()
    assert (observation["status"], observation["path"], observation["attributes"]) == ("active", "/3303/0/5700", {"pmin": 0, "pmax": 30})
    attributes, observe = peer.received[-2:]
    assert (attributes.method, attributes.query) == ("PUT", ("pmin=0", "pmax=30"))
    assert (observe.method, observe.path, observe.observe) == ("GET", "/3303/0/5700", 0)
    first = notified(tenant, device_id, observation["id"], 21.5)
    assert (first["detail"]["sequence"], first["detail"]["format"], first["outcome"]) == (0, "tlv", "ok")

    for value in (22.0, 23.5):
        peer.set("/3303/0/5700", value)
        event = notified(tenant, device_id, observation["id"], value)
        assert event["detail"]["path"] == "/3303/0/5700" and event["detail"]["sequence"] >= 1
    [listed] = tenant.viewer.get(url).json()
    assert (listed["id"], listed["status"], listed["error"]) == (observation["id"], "active", None)
    assert listed["notifications"] >= 3 and listed["last_notification_at"]

    duplicate = tenant.member.post(url, json={"path": "/3303/0/5700"})
    assert duplicate.status_code == 409, duplicate.text
    bad = tenant.member.post(url, json={"path": "/3303/0/5700/1/2"})
    assert bad.status_code == 400
    bad_attributes = tenant.member.post(url, json={"path": "/3303/0/5701", "attributes": {"pmin": 9, "pmax": 1}})
    assert bad_attributes.status_code == 400 and "pmin must not exceed pmax" in bad_attributes.json()["detail"]
    text_attribute = tenant.member.post(url, json={"path": "/3303/0/5701", "attributes": {"pmin": "5"}})
    assert text_attribute.status_code == 400 and "pmin must be a number" in text_attribute.json()["detail"]
    assert tenant.viewer.post(url, json={"path": "/3/0/9"}).status_code == 403
    assert len(tenant.viewer.get(url).json()) == 1

    # A refused observation is kept, failed, with the device's reason.
    refused = tenant.member.post(url, json={"path": "/3/0/4"})
    assert refused.status_code == 201 and refused.json()["status"] == "failed", refused.text
    assert "4.05" in refused.json()["error"]

    # Cancelled: no more notifications, and the device drops its observer at the next one.
    assert tenant.member.delete(f"{url}/{observation['id']}").status_code == 204
    assert tenant.member.delete(f"{url}/{observation['id']}").status_code == 404
    assert [item["path"] for item in tenant.viewer.get(url).json()] == ["/3/0/4"]
    count = len(notifications(tenant, device_id, observation["id"]))
    values = iter(range(40, 100))

    def dropped() -> bool:  # the server rejects a notification of a cancelled observation (RFC 7641 §3.6)
        peer.set("/3303/0/5700", float(next(values)))
        time.sleep(0.2)
        return peer.observers("/3303/0/5700") == 0

    wait_for(dropped, "the device to drop the cancelled observation")
    time.sleep(0.3)
    assert len(notifications(tenant, device_id, observation["id"])) == count


def test_observations_are_set_up_again_after_a_new_registration(
    server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer],
) -> None:
    endpoint, device_id = new_device(tenant)
    url = observations_url(tenant, device_id)
    pending = tenant.member.post(url, json={"path": "/3303/0/5700"})
    assert pending.status_code == 201 and pending.json()["status"] == "pending", pending.text
    observation_id = pending.json()["id"]

    peer = peers(endpoint, server.lwm2m_uri, lwm2m_version="1.1", content_formats=(content.SENML_CBOR,))
    peer.register()
    first = notified(tenant, device_id, observation_id, 21.5)
    assert first["detail"]["format"] == "senml-cbor"
    wait_for(lambda: tenant.viewer.get(url).json()[0]["status"] == "active", "the observation to be active")

    peer.deregister()
    wait_for(lambda: tenant.viewer.get(url).json()[0]["status"] == "pending", "the observation to wait for the device")
    assert "deregistered" in tenant.viewer.get(url).json()[0]["error"]

    observes_before = sum(1 for received in peer.received if received.observe == 0)
    peer.register()
    wait_for(lambda: sum(1 for received in peer.received if received.observe == 0) == observes_before + 1, "a new Observe")
    peer.set("/3303/0/5700", 18.25)
    notified(tenant, device_id, observation_id, 18.25)
    # A Register that replaces a live registration sets them up again as well.
    peer.register()
    wait_for(lambda: sum(1 for received in peer.received if received.observe == 0) == observes_before + 2, "another Observe")
    peer.set("/3303/0/5700", 17.0)
    notified(tenant, device_id, observation_id, 17.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_observations_survive_a_server_restart(
    backend: str, server_factory: Callable[..., ServerProcess], peers: Callable[..., DevicePeer],
) -> None:
    process = server_factory(backend)
    process.start()
    with Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        tenant = make_tenant(process.url, root)
    try:
        peer, device_id = registered_peer(process, tenant, peers)
        created = tenant.member.post(observations_url(tenant, device_id), json={"path": "/3303/0/5700"})
        assert created.status_code == 201 and created.json()["status"] == "active", created.text
        process.restart()
        assert peer.update() == "4.04"  # the new process does not know the registration: the device registers again
        peer.register()
        peer.set("/3303/0/5700", 12.5)
        notified(tenant, device_id, created.json()["id"], 12.5)
    finally:
        tenant.close()


# --- triggers ---------------------------------------------------------------------------------------------


def test_native_triggers(server: ServerProcess, tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    peer, device_id = registered_peer(server, tenant, peers)
    base = f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/commands"
    bootstrap = tenant.member.post(f"{base}/trigger-bootstrap")
    assert bootstrap.status_code == 200, bootstrap.text
    assert {key: bootstrap.json()[key] for key in ("accepted", "code", "path", "operation", "trigger")} == {
        "accepted": True, "code": "2.04", "path": "/1/0/9", "operation": "execute", "trigger": "bootstrap",
    }
    update = tenant.member.post(f"{base}/trigger-update", params={"server_instance": 0})
    assert (update.json()["accepted"], update.json()["path"]) == (True, "/1/0/8")
    assert peer.executed == [("/1/0/9", b""), ("/1/0/8", b"")]
    unknown_instance = tenant.member.post(f"{base}/trigger-update", params={"server_instance": 5})
    assert unknown_instance.status_code == 400 and "/1/0" in unknown_instance.json()["detail"]
    assert tenant.viewer.post(f"{base}/trigger-update").status_code == 403

    refusing, refusing_id = registered_peer(server, tenant, peers, refuse_bootstrap_trigger=True)
    refused = tenant.member.post(f"/api/v1/orgs/{tenant.org_id}/devices/{refusing_id}/commands/trigger-bootstrap")
    assert refused.status_code == 200 and (refused.json()["accepted"], refused.json()["code"]) == (False, "4.05"), refused.text
    assert refusing.executed == []
    _, unregistered = new_device(tenant)
    assert tenant.member.post(f"/api/v1/orgs/{tenant.org_id}/devices/{unregistered}/commands/trigger-bootstrap").status_code == 409


def test_dmp_trigger_bootstrap(server: ServerProcess, tenant: Tenant, other_tenant: Tenant, peers: Callable[..., DevicePeer]) -> None:
    mac = ":".join(f"{byte:02x}" for byte in uuid.uuid4().bytes[:6])
    peer, device_id = registered_peer(server, tenant, peers, device_fields={"mac_address": mac.upper()})
    response = tenant.member.post(f"/api/management/devices/{mac.replace(':', '-')}/commands/trigger-bootstrap")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and set(body) == {"data", "success"}
    assert {key: body["data"][key] for key in ("accepted", "code", "path", "device_id", "company_id")} == {
        "accepted": True, "code": "2.04", "path": "/1/0/9", "device_id": device_id, "company_id": tenant.org_id,
    }
    assert peer.executed == [("/1/0/9", b"")]

    refusing_mac = ":".join(f"{byte:02x}" for byte in uuid.uuid4().bytes[:6])
    registered_peer(server, tenant, peers, refuse_bootstrap_trigger=True, device_fields={"mac_address": refusing_mac})
    refused = tenant.member.post(f"/api/management/devices/{refusing_mac}/commands/trigger-bootstrap").json()
    assert (refused["success"], refused["data"]["accepted"], refused["data"]["code"]) == (True, False, "4.05")

    for client, status in ((other_tenant.admin, 404), (tenant.viewer, 404)):
        denied = client.post(f"/api/management/devices/{mac}/commands/trigger-bootstrap")
        assert denied.status_code == status and denied.json()["success"] is False, denied.text
    new_device(tenant, mac_address="02:00:5e:00:00:99")
    not_registered = tenant.member.post("/api/management/devices/02005E000099/commands/trigger-bootstrap")
    assert not_registered.status_code == 409 and not_registered.json()["success"] is False
    assert len(peer.executed) == 1
