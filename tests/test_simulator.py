"""The LwM2M device simulator over real UDP on loopback.

Its server side (what it answers a bootstrap server) is driven by an aiocoap client and by raw
datagrams; its client side (Bootstrap-Request, retransmission, separate responses, Bootstrap-Pack, the
fleet runner and the CLI) by small peers inside the tests: an aiocoap server that plays a minimal
bootstrap server, or a raw socket when the test needs to control every datagram.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiocoap
import pytest
import typer
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from harness import free_udp_port
from pilotboat.cli import simulate
from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.lwm2m.model import ROOT, Path, as_dict
from pilotboat.sim import Failure, SimulatedDevice, Timing, endpoint_names, run_fleet
from pilotboat.sim.fleet import bootstrap_device, percentile
from pilotboat.sim.handlers import ServerRequests
from pilotboat.sim.objects import ObjectStore

FAST = Timing(ack_timeout=0.1, ack_random_factor=1.0, max_retransmit=2, max_latency=1.0)
BS_URI = "coap://127.0.0.1:5783"  # the device's own bootstrap account, where no test needs a server
MGMT_URI = "coap://mgmt.example.com:5683"
TLV = content.TLV


def run(coroutine: Coroutine[Any, Any, Any], limit: float = 20) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, limit)

    return asyncio.run(bounded())


async def eventually(condition: Callable[[], bool], wait: float = 3.0) -> None:
    """Wait until ``condition()`` holds (a peer may read its last answer after the device is done)."""
    deadline = time.monotonic() + wait
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


def security(iid: int, ssid: int, uri: str = MGMT_URI, **extra: Any) -> dict[Path, Any]:
    values = {0: uri, 1: False, 2: 3, 3: b"", 4: b"", 5: b"", 10: ssid, **extra}
    return {Path(objects.SECURITY, iid, rid): value for rid, value in values.items()}


def server(iid: int, ssid: int, lifetime: int = 300, binding: str = "U") -> dict[Path, Any]:
    values = {0: ssid, 1: lifetime, 6: False, 7: binding}
    return {Path(objects.SERVER, iid, rid): value for rid, value in values.items()}


class Client:
    """An aiocoap client talking to one simulated device."""

    def __init__(self, context: aiocoap.Context, device: SimulatedDevice) -> None:
        self.context = context
        self.port = device.address[1]

    async def __call__(self, code: Code, path: str, **options: Any) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=f"coap://127.0.0.1:{self.port}{path}", **options)
        return await self.context.request(message).response

    async def write(self, path: str, values: dict[Path, Any], fmt: int = TLV, code: Code = Code.PUT) -> aiocoap.Message:
        return await self(code, path, content_format=fmt, payload=content.encode(fmt, values, Path.parse(path)))

    async def read(self, path: str, fmt: int | None = None) -> dict[Path, Any]:
        response = await self(Code.GET, path, **({"accept": fmt} if fmt is not None else {}))
        assert response.code == Code.CONTENT, (response.code, response.payload)
        got = int(response.opt.content_format)
        assert got == (TLV if fmt is None else fmt)
        return as_dict(content.decode(got, response.payload, Path.parse(path), objects.resource_type))

    async def discover(self, path: str) -> tuple[linkformat.Link, ...]:
        response = await self(Code.GET, path, accept=content.LINK_FORMAT)
        assert response.code == Code.CONTENT and response.opt.content_format == content.LINK_FORMAT
        return linkformat.decode(response.payload)


def with_device(test: Callable[[SimulatedDevice, Client], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        context = await aiocoap.Context.create_client_context()
        device = SimulatedDevice(options.pop("endpoint", "sim-test"), BS_URI, **options)
        try:
            await device.start()
            await test(device, Client(context, device))
        finally:
            await device.close()
            await context.shutdown()

    run(main())


# --- answering a bootstrap server ----------------------------------------------------------------------


def test_discover_shows_the_bootstrap_account_without_ssid_and_server_accounts_with_it() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        assert [(link.target, link.params) for link in await coap.discover("/0")] == [
            ("/", (("lwm2m", "1.1"),)), ("/0/1", ()),
        ]
        assert [link.target for link in await coap.discover("/")] == ["/", "/0/1", "/1", "/3/0", "/3303/0"]
        assert (await coap.write("/0/5", security(5, 101))).code == Code.CHANGED
        assert (await coap.write("/1/0", server(0, 101))).code == Code.CHANGED
        links = {link.target: link for link in await coap.discover("/")}
        assert list(links) == ["/", "/0/1", "/0/5", "/1/0", "/3/0", "/3303/0"]
        assert not links["/0/1"].has("ssid") and not links["/0/1"].has("uri")
        assert links["/0/5"].get("ssid") == "101" and links["/0/5"].get("uri") == MGMT_URI
        assert links["/1/0"].get("ssid") == "101"
        assert [link.target for link in await coap.discover("/1")] == ["/", "/1/0"]
        assert (await coap(Code.GET, "/7", accept=content.LINK_FORMAT)).code == Code.NOT_FOUND
        assert (await coap(Code.GET, "/0/1", accept=content.LINK_FORMAT)).code == Code.BAD_REQUEST

    with_device(test)


def test_a_1_0_device_with_its_bootstrap_account_at_0_discovers_as_1_0() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        await coap.write("/0/3", security(3, 7))
        links = await coap.discover("/0")
        assert [(link.target, link.params) for link in links] == [
            ("/", (("lwm2m", "1.0"),)), ("/0/0", ()), ("/0/3", (("ssid", "7"),)),
        ]
        assert device.bootstrap_account is not None and device.bootstrap_account[objects.SECURITY_URI] == BS_URI

    with_device(test, lwm2m_version="1.0", bootstrap_instance=0)


@pytest.mark.parametrize("fmt", [content.TLV, content.TLV_LEGACY, content.SENML_JSON, content.SENML_CBOR])
def test_writes_in_each_format_are_stored_typed_and_read_back(fmt: int) -> None:
    written = security(4, 202) | {Path(0, 4, 3): b"\x00id\xff", Path(0, 4, 16, 0): 49320, Path(0, 4, 16, 1): 49195}

    async def test(device: SimulatedDevice, coap: Client) -> None:
        assert (await coap.write("/0/4", written, fmt)).code == Code.CHANGED
        stored = device.instances(objects.SECURITY)[4]
        assert stored[objects.SECURITY_URI] == MGMT_URI and stored[objects.SECURITY_BOOTSTRAP] is False
        assert stored[objects.SECURITY_IDENTITY] == b"\x00id\xff" and stored[objects.SECURITY_SHORT_SERVER_ID] == 202
        assert stored[16] == {0: 49320, 1: 49195}
        assert await coap.read("/0/4", fmt) == written
        assert await coap.read("/0/4") == written  # TLV when no Accept
        assert await coap.read("/0/4/10", content.TEXT) == {Path(0, 4, 10): 202}
        assert (await coap(Code.GET, "/0/4/10", accept=content.TEXT)).payload == b"202"
        # a single resource in plain text
        response = await coap(Code.PUT, "/0/4/10", content_format=content.TEXT, payload=b"303")
        assert response.code == Code.CHANGED and device.instances(0)[4][10] == 303

    with_device(test)


def test_object_writes_create_instances_and_partial_updates_keep_other_resources() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        both = server(0, 1) | server(3, 2, lifetime=60, binding="UQ")
        assert (await coap.write("/1", both)).code == Code.CHANGED
        assert sorted(device.instances(objects.SERVER)) == [0, 3]
        update = {Path(1, 3, 1): 120}
        assert (await coap.write("/1/3", update, code=Code.POST)).code == Code.CHANGED
        assert device.instances(1)[3] == {0: 2, 1: 120, 6: False, 7: "UQ"}
        assert (await coap.write("/1/3", update)).code == Code.CHANGED  # PUT replaces the instance
        assert device.instances(1)[3] == {1: 120}
        assert (await coap.write("/1/9", {Path(1, 9, 1): 5}, code=Code.POST)).code == Code.NOT_FOUND
        assert 9 not in device.instances(1)

    with_device(test)


def test_bad_writes_and_reads_get_their_codes_and_change_nothing() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        await coap.write("/0/5", security(5, 101))
        before = device.instances(objects.SECURITY)
        cases = [
            (Code.PUT, "/0/5", {"content_format": 11543, "payload": b"{}"}, Code.UNSUPPORTED_CONTENT_FORMAT),
            (Code.PUT, "/0/5", {"content_format": content.LINK_FORMAT, "payload": b"</0>"},
             Code.UNSUPPORTED_CONTENT_FORMAT),
            (Code.PUT, "/0/5", {"payload": b"\xc1\x00\x01"}, Code.BAD_REQUEST),  # no Content-Format
            (Code.PUT, "/0/5", {"content_format": TLV, "payload": b"\xc8\x00\x20abc"}, Code.BAD_REQUEST),
            (Code.PUT, "/0/5", {"content_format": content.SENML_JSON, "payload": b'[{"n":'}, Code.BAD_REQUEST),
            (Code.PUT, "/0/5", {"content_format": content.SENML_CBOR, "payload": b"\xff\x00"}, Code.BAD_REQUEST),
            # a Short Server ID given as a string, a boolean as an integer: wrong types
            (Code.PUT, "/0/5", {"content_format": content.SENML_JSON,
                                "payload": b'[{"bn":"/0/5/","n":"0","vs":"coap://x"},{"n":"10","vs":"101"}]'},
             Code.BAD_REQUEST),
            (Code.PUT, "/0/5/1", {"content_format": TLV, "payload": b"\xc1\x01\x02"}, Code.BAD_REQUEST),
            (Code.PUT, "/0/5", {"content_format": TLV, "payload": b""}, Code.BAD_REQUEST),
            (Code.PUT, "/9/0", {"content_format": TLV, "payload": b"\xc1\x00\x01"}, Code.NOT_FOUND),
            (Code.PUT, "/1/0/8", {"content_format": content.TEXT, "payload": b"1"}, Code.METHOD_NOT_ALLOWED),
            (Code.GET, "/0/5", {"accept": 11543}, Code.NOT_ACCEPTABLE),
            (Code.GET, "/0/5", {"accept": content.TEXT}, Code.NOT_ACCEPTABLE),
            (Code.GET, "/0/9", {}, Code.NOT_FOUND),
            (Code.GET, "/0/5/13", {}, Code.NOT_FOUND),
            (Code.GET, "/5", {}, Code.NOT_FOUND),
            (Code.GET, "/x/y", {}, Code.NOT_FOUND),
            (Code.GET, "/bs", {}, Code.METHOD_NOT_ALLOWED),
            (Code.FETCH, "/0/5", {}, Code.METHOD_NOT_ALLOWED),
        ]
        for code, path, options, expected in cases:
            response = await coap(code, path, **options)
            assert response.code == expected, (code, path, options, response.code, response.payload)
            assert response.payload, (path, "error answers carry a diagnostic")
        assert device.instances(objects.SECURITY) == before
        assert [request.code for request in device.received[-len(cases):]] == [case[3].dotted for case in cases]

    with_device(test)


def test_a_1_0_device_refuses_senml_writes_and_reads() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        response = await coap.write("/0/5", security(5, 101), content.SENML_CBOR)
        assert response.code == Code.UNSUPPORTED_CONTENT_FORMAT
        assert (await coap(Code.GET, "/3/0", accept=content.SENML_JSON)).code == Code.NOT_ACCEPTABLE
        assert (await coap.write("/0/5", security(5, 101), content.TLV_LEGACY)).code == Code.CHANGED

    with_device(test, lwm2m_version="1.0")


def test_deletes_spare_the_bootstrap_account_and_the_device_object() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        for iid, ssid in ((0, 10), (5, 11)):
            await coap.write(f"/0/{iid}", security(iid, ssid))
            await coap.write(f"/1/{iid}", server(iid, ssid))
        assert (await coap(Code.DELETE, "/0/1")).code == Code.BAD_REQUEST
        assert (await coap(Code.DELETE, "/3/0")).code == Code.BAD_REQUEST
        assert (await coap(Code.DELETE, "/3")).code == Code.BAD_REQUEST
        assert (await coap(Code.DELETE, "/0/8")).code == Code.NOT_FOUND
        assert (await coap(Code.DELETE, "/0/1/0")).code == Code.METHOD_NOT_ALLOWED
        # deleting a Security instance takes its Server instance along
        assert (await coap(Code.DELETE, "/0/5")).code == Code.DELETED
        assert sorted(device.instances(0)) == [0, 1] and sorted(device.instances(1)) == [0]
        await coap.write("/0/5", security(5, 11))
        assert (await coap(Code.DELETE, "/0")).code == Code.DELETED
        assert sorted(device.instances(0)) == [1] and device.instances(1) == {}
        await coap.write("/0/5", security(5, 11))
        await coap.write("/1/2", server(2, 11))
        assert (await coap(Code.DELETE, "/")).code == Code.DELETED
        assert sorted(device.instances(0)) == [1] and device.instances(1) == {} and sorted(device.instances(3)) == [0]
        assert device.instances(3303) == {}  # Delete / spares only the bootstrap account and the Device object
        assert device.bootstrap_account is not None
        assert (await coap(Code.DELETE, "/1")).code == Code.DELETED

    with_device(test)


def test_a_write_onto_the_bootstrap_account_overwrites_it_as_real_clients_do() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        assert device.bootstrap_account is not None
        assert (await coap.write("/0/1", security(1, 101))).code == Code.CHANGED
        assert device.bootstrap_account is None
        assert device.instances(0)[1][objects.SECURITY_URI] == MGMT_URI
        assert [link.params for link in await coap.discover("/0")][1] == (("ssid", "101"), ("uri", MGMT_URI))
        assert (await coap(Code.DELETE, "/0")).code == Code.DELETED
        assert device.instances(0) == {}

    with_device(test)


def test_bootstrap_finish_checks_the_configuration() -> None:
    async def test(device: SimulatedDevice, coap: Client) -> None:
        refused = await coap(Code.POST, "/bs")
        assert refused.code == Code.NOT_ACCEPTABLE and b"inconsistent" in refused.payload
        await coap.write("/0/5", security(5, 101))
        await coap.write("/1/0", server(0, 102))  # a Server instance of another Short Server ID
        assert (await coap(Code.POST, "/bs")).code == Code.NOT_ACCEPTABLE
        await coap.write("/0/6", {Path(0, 6, 0): MGMT_URI, Path(0, 6, 1): False, Path(0, 6, 2): 3})  # no SSID
        refused = await coap(Code.POST, "/bs")
        assert refused.code == Code.NOT_ACCEPTABLE and b"/0/6" in refused.payload
        await coap(Code.DELETE, "/0/6")
        await coap.write("/1/0", server(0, 101))
        assert (await coap(Code.POST, "/bs")).code == Code.CHANGED
        assert [(s.uri, s.security_mode, s.short_server_id, s.lifetime, s.binding) for s in device.servers()] == [
            (MGMT_URI, 3, 101, 300, "U")]

    with_device(test)


def test_execute_records_the_resource_and_the_bootstrap_trigger_fires() -> None:
    triggered: list[bool] = []

    async def test(device: SimulatedDevice, coap: Client) -> None:
        await coap.write("/1/0", server(0, 101))
        assert (await coap(Code.POST, "/1/0/8")).code == Code.CHANGED
        assert not device.bootstrap_triggered.is_set()
        assert (await coap(Code.POST, "/1/0/9")).code == Code.CHANGED
        assert device.bootstrap_triggered.is_set() and triggered == [True]
        assert device.executed == [Path(1, 0, 8), Path(1, 0, 9)]
        assert (await coap(Code.POST, "/1/0/1")).code == Code.METHOD_NOT_ALLOWED  # not executable
        assert (await coap(Code.POST, "/1/4/8")).code == Code.NOT_FOUND
        assert (await coap(Code.GET, "/1/0/8")).code == Code.METHOD_NOT_ALLOWED
        assert (await coap(Code.POST, "/1")).code == Code.METHOD_NOT_ALLOWED
        assert len(device.executed) == 2

    with_device(test, on_bootstrap_trigger=lambda: triggered.append(True))


@settings(max_examples=500, deadline=None)
@given(
    code=st.sampled_from([Code.GET, Code.PUT, Code.POST, Code.DELETE, Code.FETCH, Code.iPATCH]),
    path=st.lists(st.sampled_from(["0", "1", "2", "3", "9", "3303", "5700", "bs", "65535", "70000", "x", ""]),
                  max_size=5),
    fmt=st.one_of(st.none(), st.sampled_from([0, 40, 42, 110, 112, 1542, 11542, 11543, 65000])),
    accept=st.one_of(st.none(), st.sampled_from([0, 40, 42, 110, 112, 1542, 11542, 11543, 65000])),
    payload=st.binary(max_size=40),
    query=st.lists(st.sampled_from(["pmin=1", "pmax", "gt=2.5", "lt=x", "st=-1", "ep=a", "pmin=1e400"]),
                   max_size=3),
    management=st.booleans(),
)
def test_any_request_gets_a_response_code(code: Code, path: list[str], fmt: int | None, accept: int | None,
                                          payload: bytes, query: list[str], management: bool) -> None:
    store = ObjectStore.initial("fuzz", BS_URI, 1)
    requests = ServerRequests(store, lwm2m_version="1.1", on_finish=lambda problem: None, on_execute=lambda p: None)
    message = aiocoap.Message(code=code, uri_path=tuple(path), uri_query=tuple(query), payload=payload)
    if fmt is not None:
        message.opt.content_format = fmt
    if accept is not None:
        message.opt.accept = accept
    answer = requests.handle(message, management=management)
    assert answer.code.is_response(), answer
    if not answer.code.is_successful():
        assert answer.payload, "error answers carry a diagnostic"


# --- the message layer, with raw datagrams -------------------------------------------------------------


class RawSocket(asyncio.DatagramProtocol):
    """A plain UDP socket for tests that write and read every datagram themselves."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait((data, addr))

    @classmethod
    async def open(cls) -> RawSocket:
        _, raw = await asyncio.get_running_loop().create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return raw

    @property
    def uri(self) -> str:
        assert self.transport is not None
        return f"coap://127.0.0.1:{self.transport.get_extra_info('sockname')[1]}"

    def send(self, message: aiocoap.Message | bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(message if isinstance(message, bytes) else message.encode(), to)

    async def receive(self, wait: float = 1.0) -> tuple[aiocoap.Message, tuple[str, int], bytes] | None:
        """The next datagram (decoded, its sender, its bytes), or None after ``wait`` seconds."""
        try:
            data, addr = await asyncio.wait_for(self.inbox.get(), wait)
        except TimeoutError:
            return None
        return aiocoap.Message.decode(data), addr, data

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


def coap_message(code: Code, mtype: Type, mid: int, token: bytes = b"", **options: Any) -> aiocoap.Message:
    message = aiocoap.Message(code=code, **options)
    message.mtype, message.mid, message.token = mtype, mid, token
    return message


FINISH = coap_message(Code.POST, Type.CON, 0x777A, b"f", uri_path=("bs",))


async def configure_raw(raw: RawSocket, peer: tuple[str, int]) -> bytes:
    """Write a server account to the device behind ``peer`` and finish; the bytes of the Finish answer."""
    write = coap_message(Code.PUT, Type.CON, 0x7778, b"w1", uri_path=("0", "3"), content_format=TLV,
                         payload=content.encode(TLV, security(3, 9), Path(0, 3)))
    write2 = coap_message(Code.PUT, Type.CON, 0x7779, b"w2", uri_path=("1", "0"), content_format=TLV,
                          payload=content.encode(TLV, server(0, 9), Path(1, 0)))
    answer = None
    for message in (write, write2, FINISH):
        raw.send(message, peer)
        answer = await raw.receive()
        assert answer is not None and answer[0].code.is_successful(), answer
    assert answer is not None
    return answer[2]


def with_raw(test: Callable[[SimulatedDevice, RawSocket], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        raw = await RawSocket.open()
        device = SimulatedDevice(options.pop("endpoint", "raw-test"), raw.uri, timing=FAST, **options)
        try:
            await device.start()
            await test(device, raw)
        finally:
            await device.close()
            raw.close()

    run(main())


def test_a_retransmitted_request_gets_the_same_answer_and_runs_once() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        write = coap_message(Code.PUT, Type.CON, 0x1234, b"tk", uri_path=("1", "0"), content_format=TLV,
                                   payload=content.encode(TLV, server(0, 101), Path(1, 0)))
        raw.send(write, device.address)
        assert (await raw.receive()) is not None
        execute = coap_message(Code.POST, Type.CON, 0x2000, b"ex", uri_path=("1", "0", "8"))
        answers = []
        for _ in range(3):
            raw.send(execute, device.address)
            received = await raw.receive()
            assert received is not None
            answers.append(received)
        assert all(answer[2] == answers[0][2] for answer in answers)
        answers = [answer[0] for answer in answers]
        assert answers[0].mtype == Type.ACK and answers[0].mid == 0x2000 and answers[0].token == b"ex"
        assert answers[0].code == Code.CHANGED
        assert device.executed == [Path(1, 0, 8)]
        assert [r.path for r in device.received] == ["/1/0", "/1/0/8"]
        # the same message id with a new request from another port is a different exchange
        other = await RawSocket.open()
        try:
            other.send(execute, device.address)
            assert (await other.receive()) is not None
            assert len(device.executed) == 2
        finally:
            other.close()

    with_raw(test)


def test_non_confirmable_requests_get_non_confirmable_answers() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        raw.send(coap_message(Code.GET, Type.NON, 77, b"nn", uri_path=("3", "0", "0"), accept=content.TEXT),
                 device.address)
        received = await raw.receive()
        assert received is not None
        answer = received[0]
        assert answer.mtype == Type.NON and answer.token == b"nn" and answer.code == Code.CONTENT
        assert answer.payload == b"Pilotboat"

    with_raw(test)


def test_garbage_datagrams_are_dropped_and_the_device_keeps_answering() -> None:
    rng = random.Random(4)
    encoded = coap_message(Code.GET, Type.CON, 9, b"ab", uri_path=("0", "1"), accept=TLV).encode()
    garbage = [b"", b"\x00", b"\x40\x01", b"\x80\x01\x00\x01", b"\x4f\x01\x00\x01abc",  # bad version, short token
               b"\x40\x01\x00\x02\xd1", b"\x40\x01\x00\x03\xbd\x10" + b"\xff" * 4,  # cut options
               b"\x40\x01\x00\x04\xb3\xff\xfe\xfd"]  # a Uri-Path that is not UTF-8
    garbage += [rng.randbytes(rng.randrange(1, 60)) for _ in range(300)]
    garbage += [bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.2 else b for b in encoded) for _ in range(300)]

    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        for data in garbage:
            raw.send(data, device.address)
        while await raw.receive(0.3) is not None:
            pass  # mutations that still parse may be answered
        assert device.garbage > 100
        raw.send(coap_message(Code.GET, Type.CON, 4242, b"ok", uri_path=("3", "0", "2"), accept=content.TEXT),
                 device.address)
        received = await raw.receive()
        assert received is not None and received[0].payload == b"raw-test" and received[0].mid == 4242

    with_raw(test)


def test_unexpected_messages_get_a_reset_and_stray_acks_nothing() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        raw.send(coap_message(Code.EMPTY, Type.CON, 500), device.address)  # CoAP ping
        received = await raw.receive()
        assert received is not None and received[0].mtype == Type.RST and received[0].mid == 500
        raw.send(coap_message(Code.CONTENT, Type.CON, 501, b"zz", payload=b"x"), device.address)  # unknown token
        received = await raw.receive()
        assert received is not None and received[0].mtype == Type.RST and received[0].mid == 501
        raw.send(coap_message(Code.CHANGED, Type.ACK, 502, b"zz"), device.address)
        raw.send(coap_message(Code.EMPTY, Type.RST, 503), device.address)
        raw.send(coap_message(Code.CONTENT, Type.NON, 504, b"zz"), device.address)
        assert await raw.receive(0.3) is None

    with_raw(test)


def test_a_device_that_dies_mid_session_stops_answering() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        for mid in (1, 2, 3):
            raw.send(coap_message(Code.GET, Type.CON, mid, b"t", uri_path=("0",), accept=content.LINK_FORMAT),
                     device.address)
        assert (await raw.receive()) is not None and (await raw.receive()) is not None
        assert await raw.receive(0.3) is None
        assert [request.code for request in device.received] == ["2.05", "2.05", None]

    with_raw(test, answer_limit=2)


def test_an_unanswered_bootstrap_request_is_retransmitted_with_doubling_timeouts() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        task = asyncio.create_task(device.bootstrap(timeout=5))
        arrivals = []
        while (received := await raw.receive(1.0)) is not None:
            arrivals.append((time.monotonic(), received[0]))
        result = await task
        assert not result.ok and result.failure is Failure.NO_RESPONSE and result.code is None
        assert len(arrivals) == 1 + FAST.max_retransmit
        first = arrivals[0][1]
        assert first.code == Code.POST and first.mtype == Type.CON and first.opt.uri_path == ("bs",)
        assert all(message.mid == first.mid and message.token == first.token for _, message in arrivals)
        gaps = [later[0] - earlier[0] for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
        assert 0.08 < gaps[0] < 0.18 and 0.18 < gaps[1] < 0.3, gaps

    with_raw(test)


def test_a_separate_response_is_acknowledged_and_ends_retransmission() -> None:
    async def test(device: SimulatedDevice, raw: RawSocket) -> None:
        task = asyncio.create_task(device.bootstrap(timeout=5))
        received = await raw.receive()
        assert received is not None
        request, peer, _ = received
        raw.send(coap_message(Code.EMPTY, Type.ACK, request.mid), peer)
        assert await raw.receive(0.5) is None  # acknowledged: no retransmission
        separate = coap_message(Code.CHANGED, Type.CON, 0x7777, request.token)
        for _ in range(2):  # the second copy stands for a retransmission after a lost ACK
            raw.send(separate, peer)
            ack = await raw.receive()
            assert ack is not None and ack[0].mtype == Type.ACK and ack[0].mid == 0x7777 and ack[0].code == Code.EMPTY
        await configure_raw(raw, peer)  # still from the same socket
        result = await task
        assert result.ok and result.method == "request" and result.latency is not None and result.latency > 0.5
        assert [(s.uri, s.short_server_id, s.lifetime) for s in result.servers] == [(MGMT_URI, 9, 300)]

    with_raw(test)


def test_a_reset_or_an_error_answer_to_the_bootstrap_request_fails_it() -> None:
    async def reset(device: SimulatedDevice, raw: RawSocket) -> None:
        task = asyncio.create_task(device.bootstrap(timeout=5))
        received = await raw.receive()
        assert received is not None
        raw.send(coap_message(Code.EMPTY, Type.RST, received[0].mid), received[1])
        result = await task
        assert not result.ok and result.failure is Failure.RESET and result.reason == "reset"

    async def piggybacked_error(device: SimulatedDevice, raw: RawSocket) -> None:
        task = asyncio.create_task(device.bootstrap(timeout=5))
        received = await raw.receive()
        assert received is not None
        request = received[0]
        raw.send(coap_message(Code.BAD_REQUEST, Type.ACK, request.mid, b"other"), received[1])  # wrong token: ignored
        raw.send(coap_message(Code.BAD_REQUEST, Type.ACK, request.mid, request.token, payload=b"unknown"), received[1])
        result = await task
        assert (result.failure, result.code, result.detail, result.reason) == (
            Failure.REJECTED, "4.00", "unknown", "rejected 4.00")

    with_raw(reset)
    with_raw(piggybacked_error)


# --- the client side against an in-test bootstrap peer -------------------------------------------------


async def bind_server_context(site: Any, port: int) -> tuple[aiocoap.Context, int]:
    """A CoAP server context for ``site`` on loopback at ``port``, or at another free port when another
    socket took that one before the bind; the context and its port."""
    for attempt in range(5):
        try:
            return await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port)), port
        except OSError:
            if attempt == 4:
                raise
            port = free_udp_port()
    raise AssertionError("unreachable")


class BootstrapPeer:
    """A minimal bootstrap server on aiocoap: records each ``POST /bs`` query, answers ``answer`` and,
    on 2.04, discovers ``/0``, writes one server account (``server_uri``, Short Server ID 101,
    ``lifetime``) at a free instance in the ``pct`` format (TLV without) and finishes. ``/bspack``
    answers ``pack`` (a response factory)."""

    def __init__(self, *, answer: Code = Code.CHANGED, write_server: bool = True,
                 pack: Callable[[aiocoap.Message], aiocoap.Message] | None = None, server_uri: str = MGMT_URI,
                 lifetime: int = 600) -> None:
        self.port = free_udp_port()
        self.uri = f"coap://127.0.0.1:{self.port}"
        self.answer = answer
        self.write_server = write_server
        self.pack = pack
        self.server_uri = server_uri
        self.lifetime = lifetime
        self.queries: list[tuple[str, ...]] = []
        self.pack_requests: list[aiocoap.Message] = []
        self.finished: dict[str, str] = {}
        self.errors: list[BaseException] = []
        self.context: aiocoap.Context | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> BootstrapPeer:
        peer = self

        class Bs(resource.Resource):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                query = tuple(request.opt.uri_query)
                peer.queries.append(query)
                if peer.answer == Code.CHANGED:
                    params = dict(option.partition("=")[::2] for option in query)
                    task = asyncio.get_running_loop().create_task(
                        peer.drive(request.remote, params["ep"], int(params.get("pct", TLV))))
                    peer._tasks.add(task)
                return aiocoap.Message(code=peer.answer, payload=b"" if peer.answer == Code.CHANGED else b"refused")

        class BsPack(resource.Resource):
            async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
                peer.pack_requests.append(request)
                assert peer.pack is not None
                return peer.pack(request)

        site = resource.Site()
        site.add_resource(["bs"], Bs())
        site.add_resource(["bspack"], BsPack())
        self.context, self.port = await bind_server_context(site, self.port)
        self.uri = f"coap://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self.context is not None
        await self.context.shutdown()

    async def send(self, remote: Any, code: Code, path: tuple[str, ...], **options: Any) -> aiocoap.Message:
        assert self.context is not None
        message = aiocoap.Message(code=code, uri_path=path, **options)
        message.remote = remote
        return await self.context.request(message).response

    async def drive(self, remote: Any, endpoint: str, fmt: int) -> None:
        try:
            links = linkformat.decode((await self.send(remote, Code.GET, ("0",), accept=content.LINK_FORMAT)).payload)
            taken = {link.path.instance_id for link in links if link.path is not None and link.path.depth == 2}
            iid = next(candidate for candidate in range(100) if candidate not in taken)
            writes = [(Path(0, iid), security(iid, 101, self.server_uri))]
            if self.write_server:
                writes.append((Path(1, 0), server(0, 101, lifetime=self.lifetime)))
            for path, values in writes:
                response = await self.send(remote, Code.PUT, tuple(map(str, path.ids)), content_format=fmt,
                                           payload=content.encode(fmt, values, path))
                assert response.code == Code.CHANGED, (path, response.code, response.payload)
            self.finished[endpoint] = (await self.send(remote, Code.POST, ("bs",))).code.dotted
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


def pack_answer(values: dict[Path, Any]) -> Callable[[aiocoap.Message], aiocoap.Message]:
    def answer(request: aiocoap.Message) -> aiocoap.Message:
        fmt = int(request.opt.accept)
        return aiocoap.Message(code=Code.CONTENT, content_format=fmt, payload=content.encode(fmt, values, ROOT))

    return answer


@pytest.mark.parametrize(("version", "fmt", "query"), [
    ("1.0", None, ("ep=dev-a",)),
    ("1.1", None, ("ep=dev-a",)),
    ("1.1", content.SENML_CBOR, ("ep=dev-a", "pct=112")),
    ("1.2", content.SENML_JSON, ("ep=dev-a", "pct=110")),
    ("1.1", content.TLV, ("ep=dev-a", "pct=11542")),
])
def test_bootstrap_request_names_the_endpoint_and_format_and_completes(version: str, fmt: int | None,
                                                                        query: tuple[str, ...]) -> None:
    async def main() -> None:
        async with BootstrapPeer() as peer:
            device = SimulatedDevice("dev-a", peer.uri, lwm2m_version=version, content_format=fmt, timing=FAST)
            try:
                result = await device.bootstrap(timeout=5)
            finally:
                await device.close()
            assert not peer.errors, peer.errors
            assert peer.queries == [query]
            assert result.ok and result.failure is None and result.method == "request", result
            assert result.latency is not None and 0 < result.latency < 5
            assert [(s.uri, s.short_server_id, s.lifetime, s.binding, s.security_instance) for s in result.servers] == [
                (MGMT_URI, 101, 600, "U", 0)]  # instance 0 is free: the bootstrap account is at 1
            writes = [(r.method, r.path, r.content_format) for r in device.received if r.method == "PUT"]
            assert writes == [("PUT", "/0/0", fmt or TLV), ("PUT", "/1/0", fmt or TLV)]
            assert device.bootstrap_account is not None

    run(main())


def test_an_unfinished_or_inconsistent_session_fails() -> None:
    async def main() -> None:
        async with BootstrapPeer(write_server=False) as peer:
            async with SimulatedDevice("dev-b", peer.uri, timing=FAST) as device:
                result = await device.bootstrap(timeout=5)
            assert result.failure is Failure.INCONSISTENT and "match none" in (result.detail or "")
            await eventually(lambda: peer.finished == {"dev-b": "4.06"})
        async with BootstrapPeer() as peer:
            async with SimulatedDevice("dev-c", peer.uri, timing=FAST, answer_limit=1) as device:
                started = time.monotonic()
                result = await device.bootstrap(timeout=1.0)
            assert result.failure is Failure.TIMEOUT and 0.9 < time.monotonic() - started < 2
            assert [(r.path, r.code) for r in device.received][:2] == [("/0", "2.05"), ("/0/0", None)]
        async with BootstrapPeer(answer=Code.BAD_REQUEST) as peer:
            async with SimulatedDevice("dev-d", peer.uri, timing=FAST) as device:
                result = await device.bootstrap(timeout=5)
            assert (result.failure, result.code, result.detail) == (Failure.REJECTED, "4.00", "refused")

    run(main())


def test_bootstrap_pack_applies_the_configuration_or_falls_back() -> None:
    config = security(10, 5) | server(0, 5, lifetime=90)

    async def main() -> None:
        async with BootstrapPeer(pack=pack_answer(config)) as peer:
            async with SimulatedDevice("dev-p", peer.uri, lwm2m_version="1.2", timing=FAST) as device:
                result = await device.bootstrap_pack(timeout=5)
            assert result.ok and result.method == "pack" and result.latency is not None
            assert [(s.short_server_id, s.lifetime, s.security_instance) for s in result.servers] == [(5, 90, 10)]
            assert device.bootstrap_account is not None
            request = peer.pack_requests[-1]
            assert request.opt.uri_query == ("ep=dev-p",) and request.opt.accept == content.SENML_CBOR
            async with SimulatedDevice("dev-q", peer.uri, lwm2m_version="1.2", content_format=content.SENML_JSON,
                                       timing=FAST) as device:
                assert (await device.bootstrap_pack(timeout=5)).ok
            assert peer.pack_requests[-1].opt.accept == content.SENML_JSON
            with pytest.raises(ValueError):
                await SimulatedDevice("dev-r", peer.uri, timing=FAST).bootstrap_pack()

        inconsistent = pack_answer(security(10, 5))
        garbled = lambda request: aiocoap.Message(code=Code.CONTENT, content_format=content.SENML_CBOR,  # noqa: E731
                                                  payload=b"\x9f\x00")
        for answer, failure in ((inconsistent, Failure.INCONSISTENT), (garbled, Failure.BAD_PACK)):
            async with BootstrapPeer(pack=answer) as peer:
                async with SimulatedDevice("dev-s", peer.uri, lwm2m_version="1.2", timing=FAST) as device:
                    assert (await device.bootstrap_pack(timeout=5)).failure is failure

        refuse = lambda request: aiocoap.Message(code=Code.NOT_FOUND)  # noqa: E731
        async with BootstrapPeer(pack=refuse) as peer:
            async with SimulatedDevice("dev-t", peer.uri, lwm2m_version="1.2", timing=FAST) as device:
                rejected = await device.bootstrap_pack(timeout=5)
                assert (rejected.failure, rejected.code) == (Failure.REJECTED, "4.04")
            async with SimulatedDevice("dev-u", peer.uri, lwm2m_version="1.2", timing=FAST) as device:
                result = await bootstrap_device(device, timeout=5, pack=True)
            assert result.ok and result.method == "request" and peer.queries == [("ep=dev-u",)]

    run(main())


def test_a_fleet_bootstraps_every_device_within_the_window() -> None:
    names = endpoint_names("fleet-", 50)
    assert names[0] == "fleet-00" and names[-1] == "fleet-49" and len(set(names)) == 50
    assert endpoint_names("x", 3, start=9) == ["x09", "x10", "x11"]
    seen: list[str] = []

    async def main() -> None:
        async with BootstrapPeer() as peer:
            stats = await run_fleet(peer.uri, names, window=10, timeout=10, content_format=content.SENML_CBOR,
                                    timing=FAST, linger=0.1, progress=lambda result: seen.append(result.endpoint))
            assert not peer.errors, peer.errors
            assert sorted(query[0] for query in peer.queries) == [f"ep={name}" for name in names]
            await eventually(lambda: peer.finished == {name: "2.04" for name in names})
        assert stats.completed == 50 and stats.failed == 0 and stats.failures == {}
        assert [result.endpoint for result in stats.results] == names and sorted(seen) == names
        assert stats.p50 is not None and stats.p90 is not None and stats.p99 is not None
        assert 0 < stats.p50 <= stats.p90 <= stats.p99 < 10 and stats.rate > 0

        async with BootstrapPeer() as peer:
            started = time.monotonic()
            paced = await run_fleet(peer.uri, endpoint_names("paced-", 6), rate=10, window=50, timing=FAST, linger=0)
            assert paced.completed == 6 and time.monotonic() - started >= 0.5

        async with BootstrapPeer(answer=Code.FORBIDDEN) as peer:
            refused = await run_fleet(peer.uri, endpoint_names("no-", 4), timing=FAST, linger=0)
        assert refused.failures == {"rejected 4.03": 4} and refused.completed == 0 and refused.p50 is None

        nobody = f"coap://127.0.0.1:{free_udp_port()}"
        silent = await run_fleet(nobody, ["lost"], timeout=5, timing=FAST, linger=0)
        assert silent.failures == {"no response": 1}

    run(main(), limit=40)


def test_fleet_devices_keep_answering_retransmissions_while_they_linger() -> None:
    async def main() -> None:
        raw = await RawSocket.open()
        try:
            fleet = asyncio.create_task(run_fleet(raw.uri, ["linger-0"], timeout=5, timing=FAST, linger=0.6))
            received = await raw.receive()
            assert received is not None
            request, peer, _ = received
            raw.send(coap_message(Code.CHANGED, Type.ACK, request.mid, request.token), peer)
            finished = await configure_raw(raw, peer)
            await asyncio.sleep(0.2)  # the outcome is in; the device lingers
            raw.send(FINISH, peer)  # a retransmission whose first answer was "lost"
            again = await raw.receive()
            assert again is not None and again[2] == finished
            stats = await fleet
            assert stats.completed == 1 and stats.elapsed < 0.5
            raw.send(FINISH, peer)
            assert await raw.receive(0.3) is None  # closed after the linger
        finally:
            raw.close()

    run(main())


def test_percentiles_use_the_nearest_rank() -> None:
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert [percentile(values, share) for share in (0, 20, 50, 90, 100)] == [0.1, 0.1, 0.3, 0.5, 0.5]
    assert percentile([], 50) is None


def test_invalid_device_options_are_refused() -> None:
    with pytest.raises(ValueError):
        SimulatedDevice("x", BS_URI, lwm2m_version="1.0", content_format=content.SENML_CBOR)
    with pytest.raises(ValueError):
        SimulatedDevice("x", BS_URI, content_format=content.LINK_FORMAT)
    with pytest.raises(ValueError):
        SimulatedDevice("x", BS_URI, lwm2m_version="2.0")
    with pytest.raises(ValueError):
        SimulatedDevice("", BS_URI)
    with pytest.raises(ValueError):
        run(run_fleet("coaps://127.0.0.1:5684", ["a"]))
    with pytest.raises(ValueError):
        run(run_fleet(BS_URI, ["a"], pack=True))


# --- the command line ----------------------------------------------------------------------------------


class PeerThread:
    """A peer (an async context manager, such as ``BootstrapPeer``) on its own event loop, for a command
    that runs its own loop."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.peer:
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Any:
        self._thread.start()
        assert self._ready.wait(10)
        return self.peer

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        """Run ``coroutine`` on the peer's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def __exit__(self, *exc_info: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as their content, so that assertions do not meet wrapped cells."""
    monkeypatch.setattr(simulate, "console", Console(width=200))


def cli(*args: str) -> Any:
    root = typer.Typer()
    root.add_typer(simulate.app, name="simulate")
    return CliRunner().invoke(root, ["simulate", "bootstrap", *args])


@pytest.mark.usefixtures("wide_console")
def test_the_cli_bootstraps_one_device_or_a_fleet_and_fails_when_any_device_fails() -> None:
    with PeerThread(BootstrapPeer()) as peer:
        single = cli("--server", peer.uri, "--endpoint", "cli-dev", "--format", "senml-json", "--timeout", "5")
        assert single.exit_code == 0, single.output
        assert "cli-dev" in single.output and MGMT_URI in single.output and "/0/1 kept" in single.output
        fleet = cli("--server", peer.uri, "--prefix", "cli-", "--devices", "12", "--window", "4", "--rate", "200",
                    "--linger", "0.1")
        assert fleet.exit_code == 0, fleet.output
        deadline = time.monotonic() + 3
        while not peer.finished.keys() >= {f"cli-{i:02d}" for i in range(12)}:
            assert time.monotonic() < deadline, peer.finished
            time.sleep(0.01)
        assert "completed" in fleet.output and "12" in fleet.output
    failed = cli("--server", f"coap://127.0.0.1:{free_udp_port()}", "--endpoint", "nobody", "--timeout", "0.5")
    assert failed.exit_code == 1 and "no response" in failed.output
    for bad in (["--endpoint", "a", "--devices", "2"], [], ["--endpoint", "a", "--pack"],
                ["--endpoint", "a", "--lwm2m", "1.0", "--format", "tlv"], ["--endpoint", "a", "--server", "coaps://x"]):
        result = cli(*bad)
        assert result.exit_code == 2, (bad, result.output)
