"""The simulated device as an LwM2M client of a management server, over real UDP on loopback.

The server side is a small aiocoap peer in this file (``ManagementPeer``: ``/rd`` Register with 2.01 and
Location-Path ``rd/<id>``, Update 2.04, De-register 2.02, 4.04 for unknown registrations; aiocoap
reassembles Block1) that also sends requests to the devices registered with it; where a test needs every
datagram under its control, a raw socket plays the server. Re-bootstrap runs against the bootstrap peer
of the simulator's own tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiocoap
import pytest
import typer
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption
from rich.console import Console
from typer.testing import CliRunner

from harness import free_udp_port
from pilotboat.cli import simulate
from pilotboat.lwm2m import content, linkformat
from pilotboat.lwm2m.model import Path, as_dict
from pilotboat.sim import Failure, SimulatedDevice, Timing, endpoint_names, register_fleet
from pilotboat.sim.objects import ServerAccount
from pilotboat.sim.objects import resource_type
from test_simulator import FAST, BootstrapPeer, bind_server_context, PeerThread, RawSocket, coap_message, eventually, run

#: Short retransmissions, and registration timers a test can wait for.
QUICK = dataclasses.replace(FAST, update_margin=0.5, awake=0.4, register_retry=0.2)
TEMPERATURE = "/3303/0/5700"


@dataclass
class Registered:
    id: str
    endpoint: str
    query: tuple[str, ...]
    links: bytes
    remote: Any


@dataclass
class Seen:
    """One registration-interface request the peer received, and what it answered."""

    operation: str  # register, update, deregister
    endpoint: str | None
    query: tuple[str, ...]
    payload: bytes
    content_format: int | None
    block1: BlockOption.BlockwiseTuple | None
    code: str
    at: float


class ManagementPeer:
    """A minimal LwM2M management server on aiocoap."""

    def __init__(self, *, answer: Code = Code.CREATED, max_age: int | None = None,
                 on_register: Callable[[ManagementPeer, Registered], None] | None = None) -> None:
        self.port = free_udp_port()
        self.uri = f"coap://127.0.0.1:{self.port}"
        #: The code Register is answered with (2.01 registers).
        self.answer = answer
        self.max_age = max_age
        self.on_register = on_register
        self.registrations: dict[str, Registered] = {}
        self.seen: list[Seen] = []
        self.context: aiocoap.Context | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ManagementPeer:
        peer = self

        class Root(resource.Resource, resource.PathCapable):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                path = tuple(request.opt.uri_path)
                if path == ("rd",):
                    return peer._register(request)
                if len(path) == 2 and path[0] == "rd":
                    return peer._update(request, path[1])
                return aiocoap.Message(code=Code.NOT_FOUND)

            async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
                path = tuple(request.opt.uri_path)
                registered = peer.registrations.pop(path[1], None) if len(path) == 2 and path[0] == "rd" else None
                code = Code.DELETED if registered else Code.NOT_FOUND
                peer._saw("deregister", registered, request, code)
                return aiocoap.Message(code=code)

        self.context, self.port = await bind_server_context(Root(), self.port)
        self.uri = f"coap://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self.context is not None
        await self.context.shutdown()

    def _saw(self, operation: str, registered: Registered | None, request: aiocoap.Message, code: Code) -> None:
        fmt = request.opt.content_format
        self.seen.append(Seen(operation, registered.endpoint if registered else None, tuple(request.opt.uri_query),
                              bytes(request.payload), int(fmt) if fmt is not None else None, request.opt.block1,
                              code.dotted, time.monotonic()))

    def _register(self, request: aiocoap.Message) -> aiocoap.Message:
        query = tuple(request.opt.uri_query)
        endpoint = dict(option.partition("=")[::2] for option in query).get("ep", "")
        if self.answer != Code.CREATED:
            self._saw("register", Registered("", endpoint, query, b"", None), request, self.answer)
            return aiocoap.Message(code=self.answer, max_age=self.max_age, payload=b"refused")
        for old in [key for key, known in self.registrations.items() if known.endpoint == endpoint]:
            del self.registrations[old]  # a new Register replaces the endpoint's registration
        registered = Registered(f"r{next(self._ids)}", endpoint, query, bytes(request.payload), request.remote)
        self.registrations[registered.id] = registered
        self._saw("register", registered, request, Code.CREATED)
        if self.on_register is not None:
            self.on_register(self, registered)
        return aiocoap.Message(code=Code.CREATED, location_path=("rd", registered.id))

    def _update(self, request: aiocoap.Message, registration_id: str) -> aiocoap.Message:
        registered = self.registrations.get(registration_id)
        code = Code.CHANGED if registered else Code.NOT_FOUND
        if registered is not None:
            registered.remote = request.remote
            if request.payload:
                registered.links = bytes(request.payload)
        self._saw("update", registered, request, code)
        return aiocoap.Message(code=code)

    # --- what tests ask --------------------------------------------------------------------------

    def current(self, endpoint: str) -> Registered:
        [found] = [registered for registered in self.registrations.values() if registered.endpoint == endpoint]
        return found

    def operations(self, endpoint: str) -> list[tuple[str, str]]:
        return [(seen.operation, seen.code) for seen in self.seen if seen.endpoint == endpoint]

    def _message(self, endpoint: str, code: Code, path: str, **options: Any) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri_path=tuple(part for part in path.split("/") if part), **options)
        message.remote = self.current(endpoint).remote
        return message

    async def request(self, endpoint: str, code: Code, path: str, **options: Any) -> aiocoap.Message:
        assert self.context is not None
        return await self.context.request(self._message(endpoint, code, path, **options)).response

    def observe(self, endpoint: str, path: str, **options: Any) -> Any:
        """An aiocoap observation request: ``.response`` is the first answer, ``.observation`` the rest."""
        assert self.context is not None
        return self.context.request(self._message(endpoint, Code.GET, path, observe=0, **options))

    async def read(self, endpoint: str, path: str, fmt: int | None = None) -> dict[Path, Any]:
        response = await self.request(endpoint, Code.GET, path, **({"accept": fmt} if fmt is not None else {}))
        assert response.code == Code.CONTENT, (response.code, response.payload)
        return as_dict(content.decode(int(response.opt.content_format), response.payload, Path.parse(path),
                                      resource_type))

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@asynccontextmanager
async def registered_device(peer: ManagementPeer, endpoint: str = "mgmt-dev", **options: Any
                            ) -> AsyncIterator[SimulatedDevice]:
    """A device with a factory account for ``peer``, registered (and updating) for the test."""
    options.setdefault("timing", QUICK)
    options.setdefault("sensor_interval", None)
    options.setdefault("lifetime", 300)
    device = SimulatedDevice(endpoint, server_uri=peer.uri, **options)
    try:
        result = await device.register(timeout=5)
        assert result.ok, result
        yield device
    finally:
        await device.close()


def links_of(payload: bytes) -> list[str]:
    return [link.target for link in linkformat.decode(payload)]


# --- Register, Update, De-register ---------------------------------------------------------------------


@pytest.mark.parametrize(("version", "options", "query", "root"), [
    ("1.0", {}, ("ep=reg-dev", "lt=300", "lwm2m=1.0", "b=U"), None),
    ("1.0", {"binding": "UQ"}, ("ep=reg-dev", "lt=300", "lwm2m=1.0", "b=UQ"), None),
    ("1.1", {"queue_mode": True}, ("ep=reg-dev", "lt=300", "lwm2m=1.1", "b=U", "Q"), '</>;rt="oma.lwm2m";ct=11542'),
    ("1.2", {"content_format": content.SENML_CBOR}, ("ep=reg-dev", "lt=300", "lwm2m=1.2", "b=U"),
     '</>;rt="oma.lwm2m";ct=112'),
])
def test_register_sends_the_query_and_object_list_of_its_version(version: str, options: dict[str, Any],
                                                                  query: tuple[str, ...], root: str | None) -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "reg-dev", lwm2m_version=version,
                                                                **options) as device:
            [seen] = peer.seen
            assert seen.query == query and seen.content_format == content.LINK_FORMAT and seen.block1 is None
            objects = "</1/0>,</3/0>,</3303/0>"
            assert seen.payload.decode() == (f"{root},{objects}" if root else objects)
            [result] = device.registrations
            assert (result.operation, result.ok, result.code) == ("register", True, "2.01")
            assert device.location == f"rd/{peer.current('reg-dev').id}" == result.location
            assert result.latency is not None and 0 < result.latency < 1
            assert device.registered and device.updating

    run(main())


def test_a_large_object_list_goes_in_block1_blocks() -> None:
    async def main() -> None:
        timing = dataclasses.replace(QUICK, block_size=256)
        async with ManagementPeer() as peer, registered_device(peer, "many-sensors", timing=timing,
                                                                temperature_sensors=300) as device:
            [seen] = peer.seen
            targets = links_of(seen.payload)
            assert targets == ["/", "/1/0", "/3/0", *(f"/3303/{iid}" for iid in range(300))]
            assert len(seen.payload) > 10 * 256
            # aiocoap hands over the reassembled request with the last block's Block1 option
            assert seen.block1 is not None and seen.block1.size == 256 and not seen.block1.more
            assert seen.block1.block_number == (len(seen.payload) - 1) // 256
            assert device.location is not None
            # an Update whose object list changed carries it in blocks too
            response = await peer.request("many-sensors", Code.DELETE, "/3303/299")
            assert response.code == Code.DELETED
            await eventually(lambda: len(peer.seen) == 2)
            update = peer.seen[1]
            assert update.operation == "update" and update.code == "2.04" and update.block1 is not None
            assert links_of(update.payload)[-1] == "/3303/298" and update.query == ()

    run(main())


def test_block1_follows_a_server_that_asks_for_smaller_blocks() -> None:
    async def main() -> None:
        raw = await RawSocket.open()
        device = SimulatedDevice("blocks", server_uri=raw.uri, timing=dataclasses.replace(QUICK, block_size=512),
                                 temperature_sensors=100, sensor_interval=None)
        try:
            task = asyncio.create_task(device.register(timeout=5, keep_updating=False))
            blocks: list[tuple[int, int, bool, bytes]] = []
            while True:
                received = await raw.receive()
                assert received is not None
                request, peer, _ = received
                block1 = request.opt.block1
                assert request.opt.uri_query[0] == "ep=blocks" and block1 is not None
                blocks.append((block1.block_number, block1.size, block1.more, bytes(request.payload)))
                if len(blocks) == 1:
                    assert request.opt.size1 is not None and request.opt.size1 > 1024
                    # refuse the first block: the server takes 128-byte blocks only
                    answer = coap_message(Code.REQUEST_ENTITY_TOO_LARGE, Type.ACK, request.mid, request.token,
                                          block1=BlockOption.BlockwiseTuple(0, True, 3))
                elif block1.more:
                    # accept, asking for 64-byte blocks from now on
                    answer = coap_message(Code.CONTINUE, Type.ACK, request.mid, request.token,
                                          block1=BlockOption.BlockwiseTuple(block1.block_number, True, 2))
                else:
                    answer = coap_message(Code.CREATED, Type.ACK, request.mid, request.token,
                                          location_path=("rd", "blk"), block1=block1)
                raw.send(answer, peer)
                if not block1.more:
                    break
            result = await task
            assert result.ok and device.location == "rd/blk"
            assert blocks[0][:3] == (0, 512, True)
            assert blocks[1][:3] == (0, 128, True)
            assert blocks[2][:3] == (2, 64, True)  # the first 128 bytes were blocks 0 and 1 of 64
            assert all(size == 64 for _, size, _, _ in blocks[2:])
            payload = blocks[1][3] + b"".join(data for _, _, _, data in blocks[2:])
            assert links_of(payload) == ["/", "/1/0", "/3/0", *(f"/3303/{iid}" for iid in range(100))]
        finally:
            await device.close()
            raw.close()

    run(main())


def test_updates_go_out_before_the_lifetime_ends() -> None:
    async def main() -> None:
        margin = dataclasses.replace(QUICK, update_margin=0.5)  # lt 2: at lt - 0.5 s
        half = dataclasses.replace(QUICK, update_margin=1.5)  # lt 2: lt - 1.5 s is before lt/2, so at lt/2
        async with ManagementPeer() as peer, \
                registered_device(peer, "by-margin", lifetime=2, timing=margin), \
                registered_device(peer, "by-half", lifetime=2, timing=half):
            await eventually(lambda: sum(seen.operation == "update" for seen in peer.seen
                                         if seen.endpoint == "by-margin") >= 2, wait=5)
            for endpoint, period in (("by-margin", 1.5), ("by-half", 1.0)):
                mine = [seen for seen in peer.seen if seen.endpoint == endpoint]
                assert [seen.operation for seen in mine][:3] == ["register", "update", "update"]
                gaps = [later.at - earlier.at for earlier, later in zip(mine, mine[1:], strict=False)]
                assert all(period - 0.1 < gap < period + 0.4 for gap in gaps), (endpoint, gaps)
                # nothing changed: the Updates carry neither parameters nor objects
                assert all(seen.query == () and seen.payload == b"" and seen.code == "2.04" for seen in mine[1:])

    run(main(), limit=30)


def test_an_update_carries_only_what_changed() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "changes", lwm2m_version="1.0") as device:
            async def next_update() -> Seen:
                count = len(peer.seen)
                await eventually(lambda: len(peer.seen) > count)
                return peer.seen[-1]

            written = await peer.request("changes", Code.PUT, "/1/0/1", content_format=content.TEXT, payload=b"90")
            assert written.code == Code.CHANGED and device.value("/1/0/1") == 90
            update = await next_update()
            assert (update.operation, update.query, update.payload) == ("update", ("lt=90",), b"")
            await peer.request("changes", Code.PUT, "/1/0/7", content_format=content.TEXT, payload=b"UQ")
            update = await next_update()
            assert (update.query, update.payload) == (("b=UQ",), b"")
            created = await peer.request("changes", Code.POST, "/3303", content_format=content.TLV,
                                         payload=content.encode(content.TLV, {Path(3303, 4, 5700): 18.5},
                                                                Path(3303, 4)))
            assert created.code == Code.CREATED and created.opt.location_path == ("3303", "4")
            update = await next_update()
            assert update.query == () and links_of(update.payload) == ["/1/0", "/3/0", "/3303/0", "/3303/4"]
            assert update.content_format == content.LINK_FORMAT
            result = await device.update()  # nothing changed since
            assert result.ok and peer.seen[-1].query == () and peer.seen[-1].payload == b""

    run(main())


def test_a_4_04_to_an_update_makes_the_device_register_again() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "forgotten", lifetime=2) as device:
            first = device.location
            peer.registrations.clear()  # the server lost the registration
            await eventually(lambda: len(peer.registrations) == 1, wait=5)
            assert peer.operations("forgotten") == [("register", "2.01"), ("register", "2.01")]
            assert [(seen.operation, seen.code) for seen in peer.seen] == [
                ("register", "2.01"), ("update", "4.04"), ("register", "2.01")]
            assert peer.seen[-1].query == peer.seen[0].query and peer.seen[-1].payload == peer.seen[0].payload
            await eventually(lambda: device.location is not None and device.location != first)
            assert [(r.operation, r.ok, r.code) for r in device.registrations] == [
                ("register", True, "2.01"), ("update", False, "4.04"), ("register", True, "2.01")]
            assert device.registrations[1].failure is Failure.REJECTED

    run(main(), limit=30)


def test_deregister_stop_updating_and_closing() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer:
            async with registered_device(peer, "leaving") as device:
                result = await device.deregister()
                assert (result.operation, result.ok, result.code) == ("deregister", True, "2.02")
                assert not device.registered and not device.updating and peer.registrations == {}
                with pytest.raises(RuntimeError):
                    await device.deregister()
                with pytest.raises(RuntimeError):
                    await device.update()
            async with registered_device(peer, "quiet", lifetime=1) as device:
                device.stop_updating()
                assert device.registered and not device.updating
                await asyncio.sleep(1.5)  # past the lifetime: no Update came
                assert peer.operations("quiet") == [("register", "2.01")]
            assert peer.operations("quiet") == [("register", "2.01")]  # closing alone does not De-register
            device = SimulatedDevice("polite", server_uri=peer.uri, timing=QUICK, sensor_interval=None)
            assert (await device.register(5)).ok
            await device.close(deregister=True)
            assert peer.operations("polite") == [("register", "2.01"), ("deregister", "2.02")]

    run(main())


def test_refused_and_unanswered_registers_fail_and_an_updating_device_retries() -> None:
    async def main() -> None:
        nobody = f"coap://127.0.0.1:{free_udp_port()}"
        device = SimulatedDevice("lonely", server_uri=nobody, timing=QUICK, sensor_interval=None)
        try:
            result = await device.register(timeout=5)
            assert (result.ok, result.failure) == (False, Failure.NO_RESPONSE)
            assert device.updating and not device.registered  # it keeps trying, as real clients do
            await eventually(lambda: len(device.registrations) >= 2, wait=3)
            assert {result.failure for result in device.registrations} == {Failure.NO_RESPONSE}
        finally:
            await device.close()
        async with ManagementPeer(answer=Code.PRECONDITION_FAILED) as peer:
            device = SimulatedDevice("old", server_uri=peer.uri, lwm2m_version="1.2", timing=QUICK,
                                     sensor_interval=None)
            try:
                result = await device.register(timeout=5, keep_updating=False)
                assert (result.failure, result.code, result.reason, result.detail) == (
                    Failure.REJECTED, "4.12", "rejected 4.12", "refused")
            finally:
                await device.close()
        async with ManagementPeer(answer=Code.TOO_MANY_REQUESTS, max_age=1) as peer:
            device = SimulatedDevice("hasty", server_uri=peer.uri, timing=QUICK, sensor_interval=None)
            try:
                result = await device.register(timeout=5)
                assert (result.code, result.retry_after) == ("4.29", 1.0)
                # the updating task tries again after the Max-Age (not after the shorter register_retry)
                await asyncio.sleep(0.5)
                assert len(peer.seen) == 1
                peer.answer = Code.CREATED
                await eventually(lambda: device.registered, wait=3)
                assert [seen.code for seen in peer.seen] == ["4.29", "2.01"]
                assert peer.seen[1].at - peer.seen[0].at > 0.9
            finally:
                await device.close()
        bootstrap_only = SimulatedDevice("unconfigured", "coap://127.0.0.1:5783", timing=QUICK)
        assert (await bootstrap_only.register(1, keep_updating=False)).failure is Failure.NO_SERVER

    run(main(), limit=30)


def test_a_rejected_update_wakes_the_updating_task_to_register_again() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "woken", lifetime=600) as device:
            peer.registrations.clear()
            result = await device.update()
            assert (result.ok, result.code, device.registered) == (False, "4.04", False)
            await eventually(lambda: device.registered, wait=1)  # not only when the next Update was due
            assert [(seen.operation, seen.code) for seen in peer.seen] == [
                ("register", "2.01"), ("update", "4.04"), ("register", "2.01")]

    run(main())


def test_invalid_options_are_refused() -> None:
    for options in ({}, {"server_uri": "coap://x", "temperature_sensors": -1},
                    {"server_uri": "coap://x", "sensor_interval": 0},
                    {"server_uri": "coap://x", "lwm2m_version": "1.0", "content_format": content.SENML_CBOR}):
        with pytest.raises(ValueError):
            SimulatedDevice("bad", **options)
    for account in ({"short_server_id": 0}, {"lifetime": 0}, {"binding": "X"}):
        with pytest.raises(ValueError):
            ServerAccount("coap://x", **account)
    for timing in ({"block_size": 100}, {"update_margin": -1}, {"register_retry": 0}):
        with pytest.raises(ValueError):
            Timing(**timing)


# --- the management server's requests ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [content.TLV, content.TLV_LEGACY, content.SENML_JSON, content.SENML_CBOR])
def test_reads_answer_in_the_accepted_format(fmt: int) -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "reader", lifetime=120) as device:
            device.set_value(TEMPERATURE, 21.5)
            assert await peer.read("reader", TEMPERATURE, fmt) == {Path(3303, 0, 5700): 21.5}
            sensor = await peer.read("reader", "/3303/0", fmt)
            assert sensor[Path(3303, 0, 5701)] == "Cel" and sensor[Path(3303, 0, 5700)] == 21.5
            assert sensor[Path(3303, 0, 5601)] <= 21.5 <= sensor[Path(3303, 0, 5602)]
            whole = await peer.read("reader", "/3", fmt)
            assert whole[Path(3, 0, 2)] == "reader" and whole[Path(3, 0, 11, 0)] == 0
            assert (await peer.read("reader", "/1/0", fmt))[Path(1, 0, 1)] == 120

    run(main())


def test_reads_refuse_what_they_cannot_answer() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "picky"):
            text = await peer.request("picky", Code.GET, TEMPERATURE, accept=content.TEXT)
            assert text.code == Code.CONTENT and text.opt.content_format == content.TEXT
            assert float(text.payload.decode()) == (await peer.read("picky", TEMPERATURE))[Path(3303, 0, 5700)]
            default = await peer.request("picky", Code.GET, "/3/0")
            assert default.code == Code.CONTENT and default.opt.content_format == content.TLV  # no Accept: TLV
            cases = [
                ("/3/0", {"accept": content.TEXT}, Code.NOT_ACCEPTABLE),  # text holds one resource only
                ("/3/0", {"accept": content.LWM2M_JSON}, Code.NOT_ACCEPTABLE),
                ("/0/0", {}, Code.UNAUTHORIZED),  # the Security object is the bootstrap server's
                ("/0", {"accept": content.LINK_FORMAT}, Code.UNAUTHORIZED),
                ("/3303/7", {}, Code.NOT_FOUND),
                ("/1/0/8", {}, Code.METHOD_NOT_ALLOWED),  # executable
                ("/bs", {}, Code.NOT_FOUND),
            ]
            for path, options, code in cases:
                response = await peer.request("picky", Code.GET, path, **options)
                assert response.code == code and response.payload, (path, response.code)

    run(main())


def test_a_1_0_device_reads_in_tlv_only() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "old-reader", lwm2m_version="1.0"):
            response = await peer.request("old-reader", Code.GET, "/3/0", accept=content.SENML_JSON)
            assert response.code == Code.NOT_ACCEPTABLE
            assert (await peer.read("old-reader", "/3/0", content.TLV_LEGACY))[Path(3, 0, 2)] == "old-reader"

    run(main())


def test_writes_replace_or_update_and_keep_read_only_resources() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "writer") as device:
            def put(path: str, values: dict[Path, Any], fmt: int = content.TLV, code: Code = Code.PUT) -> Any:
                return peer.request("writer", code, path, content_format=fmt,
                                    payload=content.encode(fmt, values, Path.parse(path)))

            response = await put("/3303/0/5750", {Path(3303, 0, 5750): "kitchen"}, content.SENML_JSON)
            assert response.code == Code.CHANGED and device.value("/3303/0/5750") == "kitchen"
            response = await peer.request("writer", Code.PUT, "/3/0/14", content_format=content.TEXT, payload=b"+02:00")
            assert response.code == Code.CHANGED and device.value("/3/0/14") == "+02:00"
            # partial update of the Server instance: the other resources stay
            response = await put("/1/0", {Path(1, 0, 2): 5, Path(1, 0, 3): 60}, content.SENML_CBOR, Code.POST)
            assert response.code == Code.CHANGED
            server = device.instances(1)[0]
            assert (server[0], server[1], server[2], server[3]) == (1, 300, 5, 60)
            # replace: writable resources not named are gone, the read-only Short Server ID stays
            response = await put("/1/0", {Path(1, 0, 1): 300, Path(1, 0, 6): False, Path(1, 0, 7): "U"})
            assert response.code == Code.CHANGED and device.instances(1)[0] == {0: 1, 1: 300, 6: False, 7: "U"}
            before = device.instances(3)
            refused = [
                (await put("/3/0/0", {Path(3, 0, 0): "Evil"}, content.TLV), Code.METHOD_NOT_ALLOWED),
                (await put("/1/0", {Path(1, 0, 0): 7, Path(1, 0, 1): 60}), Code.METHOD_NOT_ALLOWED),
                (await put("/3303/0/5700", {Path(3303, 0, 5700): 99.0}), Code.METHOD_NOT_ALLOWED),
                (await put("/3303/5", {Path(3303, 5, 5750): "x"}), Code.NOT_FOUND),  # no instance creation by PUT
                (await put("/0/0", {Path(0, 0, 0): "coap://x"}), Code.UNAUTHORIZED),
                (await peer.request("writer", Code.PUT, "/3/0/14", content_format=content.LWM2M_JSON, payload=b"{}"),
                 Code.UNSUPPORTED_CONTENT_FORMAT),
                (await peer.request("writer", Code.PUT, "/3/0/13", content_format=content.TEXT, payload=b"soon"),
                 Code.BAD_REQUEST),
            ]
            for response, code in refused:
                assert response.code == code, (response.code, response.payload)
            assert device.instances(3) == before and device.value("/1/0/1") == 300 and device.value("/1/0/0") == 1

    run(main())


def test_execute_1_x_8_sends_an_update_at_once() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "triggered", lifetime=600) as device:
            started = time.monotonic()
            response = await peer.request("triggered", Code.POST, "/1/0/8")
            assert response.code == Code.CHANGED
            await eventually(lambda: len(peer.seen) == 2, wait=1)
            assert peer.seen[1].operation == "update" and peer.seen[1].at - started < 0.5
            assert device.executed == [Path(1, 0, 8)]
            # also when the device does not keep its registration alive by itself
            device.stop_updating()
            assert (await peer.request("triggered", Code.POST, "/1/0/8")).code == Code.CHANGED
            await eventually(lambda: len(peer.seen) == 3, wait=1)
            assert (await peer.request("triggered", Code.POST, "/1/0/1")).code == Code.METHOD_NOT_ALLOWED
            assert (await peer.request("triggered", Code.POST, "/1/3/8")).code == Code.NOT_FOUND

    run(main())


def test_execute_1_x_9_bootstraps_again_and_registers_again() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer:
            async with BootstrapPeer(server_uri=peer.uri, lifetime=300) as bootstrap:
                device = SimulatedDevice("rebooted-config", bootstrap.uri, content_format=content.SENML_CBOR,
                                         timing=QUICK, sensor_interval=None)
                try:
                    assert (await device.bootstrap(timeout=5)).ok
                    assert device.management_server is not None and device.management_server.uri == peer.uri
                    assert (await device.register(timeout=5)).ok
                    first = peer.current("rebooted-config").id
                    assert peer.seen[0].query[1] == "lt=300"
                    response = await peer.request("rebooted-config", Code.POST, "/1/0/9")
                    assert response.code == Code.CHANGED and device.bootstrap_triggered.is_set()
                    await eventually(lambda: len(bootstrap.queries) == 2, wait=3)
                    assert bootstrap.queries[1] == ("ep=rebooted-config", "pct=112")
                    await eventually(lambda: len(peer.registrations) == 1 and first not in peer.registrations, wait=5)
                    assert peer.operations("rebooted-config") == [
                        ("register", "2.01"), ("deregister", "2.02"), ("register", "2.01")]
                    assert [result.ok for result in device.bootstraps] == [True]
                    await eventually(lambda: bootstrap.finished.get("rebooted-config") == "2.04")
                    assert device.updating and device.location == f"rd/{peer.current('rebooted-config').id}"
                    # the bootstrap server's requests were answered as such (Security object included)
                    assert any(request.path == "/0" and request.code == "2.05" for request in device.received)
                finally:
                    await device.close()

    run(main())


def test_reboot_registers_again_without_de_registering() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "rebooting") as device:
            observation = peer.observe("rebooting", TEMPERATURE)
            assert (await observation.response).code == Code.CONTENT and len(device.observations) == 1
            assert (await peer.request("rebooting", Code.POST, "/3/0/4")).code == Code.CHANGED
            await eventually(lambda: len(peer.seen) == 2)
            assert peer.operations("rebooting") == [("register", "2.01"), ("register", "2.01")]
            assert device.observations == [] and device.updating
            await eventually(lambda: device.location == f"rd/{peer.current('rebooting').id}")

    run(main())


def test_discover_and_write_attributes() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "attributes") as device:
            async def discover(path: str) -> dict[str, tuple[tuple[str, str | None], ...]]:
                response = await peer.request("attributes", Code.GET, path, accept=content.LINK_FORMAT)
                assert response.code == Code.CONTENT and response.opt.content_format == content.LINK_FORMAT
                return {link.target: link.params for link in linkformat.decode(response.payload)}

            async def attributes(path: str, *query: str) -> Code:
                return (await peer.request("attributes", Code.PUT, path, uri_query=query)).code

            assert await attributes(TEMPERATURE, "pmin=10", "pmax=60", "gt=30.5", "st=0.5") == Code.CHANGED
            assert await attributes("/3303/0", "pmax=120") == Code.CHANGED
            assert await attributes("/3303", "pmin=1") == Code.CHANGED
            assert device.attributes(TEMPERATURE) == {"pmin": 10, "pmax": 60, "gt": 30.5, "st": 0.5}
            links = await discover("/3303")
            assert links["/3303"] == (("pmin", "1"),) and links["/3303/0"] == (("pmax", "120"),)
            assert links[TEMPERATURE] == (("pmin", "10"), ("pmax", "60"), ("gt", "30.5"), ("st", "0.5"))
            assert "/3303/0/5605" in links and links["/3303/0/5701"] == ()  # executables are listed too
            assert list(await discover(TEMPERATURE)) == [TEMPERATURE]
            device_links = await discover("/3/0")
            assert list(device_links)[0] == "/3/0" and device_links["/3/0/11"] == (("dim", "1"),)
            assert "/3/0/4" in device_links
            # a name without value removes that attribute
            assert await attributes(TEMPERATURE, "pmin", "st") == Code.CHANGED
            assert device.attributes(TEMPERATURE) == {"pmax": 60, "gt": 30.5}
            refused = [
                (TEMPERATURE, ("lt=40",)),  # lt + 2 st must stay below gt
                ("/3303/0/5701", ("gt=3",)),  # thresholds on a string
                (TEMPERATURE, ("pmin=-1",)),
                (TEMPERATURE, ("pmin=soon",)),
                (TEMPERATURE, ("color=red",)),
                (TEMPERATURE, ("pmin=1", "pmin=2")),
            ]
            for path, query in refused:
                assert await attributes(path, *query) == Code.BAD_REQUEST, query
            assert device.attributes(TEMPERATURE) == {"pmax": 60, "gt": 30.5}
            assert await attributes("/3303/9", "pmin=1") == Code.NOT_FOUND
            assert (await peer.request("attributes", Code.GET, "/3303/9", accept=content.LINK_FORMAT)).code == \
                Code.NOT_FOUND

    run(main())


def test_create_and_delete_temperature_instances() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "creator") as device:
            async def create(fmt: int, values: dict[Path, Any], base: Path) -> aiocoap.Message:
                return await peer.request("creator", Code.POST, "/3303", content_format=fmt,
                                          payload=content.encode(fmt, values, base))

            # TLV without the instance wrapper: the device picks the id
            response = await create(content.TLV, {Path(3303, 1, 5750): "garage"}, Path(3303, 1, 5750))
            assert response.code == Code.CREATED and response.opt.location_path == ("3303", "1")
            response = await create(content.SENML_JSON, {Path(3303, 7, 5700): 4.5}, Path(3303))
            assert response.code == Code.CREATED and response.opt.location_path == ("3303", "7")
            assert sorted(device.instances(3303)) == [0, 1, 7]
            assert device.value("/3303/1/5750") == "garage" and device.value("/3303/7/5700") == 4.5
            assert device.value("/3303/7/5701") == "Cel"
            assert (await create(content.SENML_JSON, {Path(3303, 7, 5700): 1.0}, Path(3303))).code == Code.BAD_REQUEST
            two = {Path(3303, 8, 5700): 1.0, Path(3303, 9, 5700): 2.0}
            assert (await create(content.SENML_JSON, two, Path(3303))).code == Code.BAD_REQUEST
            assert (await peer.request("creator", Code.POST, "/3", content_format=content.TLV,
                                       payload=b"")).code == Code.METHOD_NOT_ALLOWED
            assert (await peer.request("creator", Code.DELETE, "/3303/1")).code == Code.DELETED
            assert (await peer.request("creator", Code.DELETE, "/3303/1")).code == Code.NOT_FOUND
            assert (await peer.request("creator", Code.DELETE, "/3/0")).code == Code.METHOD_NOT_ALLOWED
            assert (await peer.request("creator", Code.DELETE, "/1/0")).code == Code.METHOD_NOT_ALLOWED
            assert (await peer.request("creator", Code.DELETE, "/3303")).code == Code.METHOD_NOT_ALLOWED
            assert sorted(device.instances(3303)) == [0, 7]
            await eventually(lambda: links_of(peer.current("creator").links)[-2:] == ["/3303/0", "/3303/7"])

    run(main())


# --- observations --------------------------------------------------------------------------------------


def test_observe_notifies_each_change_with_an_increasing_sequence() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "observed") as device:
            async def watch() -> list[int]:
                """Observe, see three changes, and have the server forget the observation."""
                request = peer.observe("observed", TEMPERATURE, accept=content.SENML_JSON)
                first = await request.response
                assert first.code == Code.CONTENT and first.opt.observe == 1
                assert first.opt.content_format == content.SENML_JSON
                [observation] = device.observations
                assert observation.path == Path(3303, 0, 5700) and observation.accept == content.SENML_JSON
                notifications = aiter(request.observation)
                sequences = [first.opt.observe]
                for value in (21.5, 19.0, 23.25):
                    device.set_value(TEMPERATURE, value)
                    notification = await asyncio.wait_for(anext(notifications), 2)
                    assert notification.code == Code.CONTENT and notification.opt.content_format == content.SENML_JSON
                    decoded = content.decode(content.SENML_JSON, notification.payload, Path.parse(TEMPERATURE))
                    assert as_dict(decoded) == {Path(3303, 0, 5700): value}
                    sequences.append(notification.opt.observe)
                # a write by the server notifies too; an unrelated one does not
                await peer.request("observed", Code.PUT, "/3303/0/5750", content_format=content.TEXT, payload=b"x")
                await asyncio.sleep(0.3)
                assert device.notifications == 3
                request.observation.cancel()
                return sequences

            device.set_value(TEMPERATURE, 20.0)
            sequences = await watch()
            assert sequences == sorted(sequences) and len(set(sequences)) == 4
            assert (device.value("/3303/0/5601"), device.value("/3303/0/5602")) == (19.0, 23.25)
            # aiocoap still acknowledges the next notification (which ends its request), forgets the token
            # once nothing refers to the request, and then resets the notification after
            device.set_value(TEMPERATURE, 25.0)
            await eventually(lambda: device.notifications == 4)
            gc.collect()
            device.set_value(TEMPERATURE, 26.0)
            await eventually(lambda: device.observations == [])
            device.set_value(TEMPERATURE, 27.0)
            await asyncio.sleep(0.3)
            assert device.notifications == 4  # the reset one does not count as sent

    run(main())


def test_observing_an_instance_and_the_sensor_changing_by_itself() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "sensing", sensor_interval=0.1) as device:
            request = peer.observe("sensing", "/3303/0", accept=content.SENML_CBOR)
            assert (await request.response).code == Code.CONTENT
            values = []
            async for notification in request.observation:
                decoded = as_dict(content.decode(content.SENML_CBOR, notification.payload, Path(3303, 0)))
                values.append(decoded[Path(3303, 0, 5700)])
                assert decoded[Path(3303, 0, 5601)] <= decoded[Path(3303, 0, 5700)] <= decoded[Path(3303, 0, 5602)]
                if len(values) == 5:
                    break
            assert len(set(values)) > 1  # the readings moved
            assert all(abs(later - earlier) <= 0.51 for earlier, later in zip(values, values[1:], strict=False))
            assert device.value(TEMPERATURE) is not None

    run(main())


def test_pmin_pmax_and_thresholds_pace_notifications() -> None:
    async def main() -> None:
        async with ManagementPeer() as peer, registered_device(peer, "paced") as device:
            async def collect(request: Any, seconds: float) -> list[tuple[float, float]]:
                got: list[tuple[float, float]] = []
                iterator = aiter(request.observation)
                deadline = time.monotonic() + seconds
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        notification = await asyncio.wait_for(anext(iterator), left)
                    except TimeoutError:
                        break
                    value = float(notification.payload.decode())
                    got.append((time.monotonic(), value))
                return got

            # pmax: a notification at least every 0.3 s, with no change at all
            assert (await peer.request("paced", Code.PUT, TEMPERATURE, uri_query=("pmax=0.3",))).code == Code.CHANGED
            request = peer.observe("paced", TEMPERATURE, accept=content.TEXT)
            started = time.monotonic()
            await request.response
            quiet = await collect(request, 1.0)
            assert 2 <= len(quiet) <= 4, quiet
            assert quiet[0][0] - started > 0.2

            # pmin: many changes within 0.5 s make one notification, with the latest value (each phase
            # observes anew; the earlier observations go on under the same attributes)
            await peer.request("paced", Code.PUT, TEMPERATURE, uri_query=("pmax", "pmin=0.5"))
            request = peer.observe("paced", TEMPERATURE, accept=content.TEXT)
            started = time.monotonic()
            await request.response
            for step in range(5):
                device.set_value(TEMPERATURE, 30.0 + step)
                await asyncio.sleep(0.05)
            burst = await collect(request, 0.8)
            assert [value for _, value in burst] == [34.0] and burst[0][0] - started >= 0.45
            assert len(device.observations) == 2

            # gt / st: only crossing 30 or a step of at least 2 is worth a notification
            await peer.request("paced", Code.PUT, TEMPERATURE, uri_query=("pmin", "gt=30", "st=2"))
            device.set_value(TEMPERATURE, 25.0)
            request = peer.observe("paced", TEMPERATURE, accept=content.TEXT)
            await request.response
            collecting = asyncio.create_task(collect(request, 1.0))
            for value in (25.5, 26.0, 28.0, 28.5, 31.0, 31.5):
                device.set_value(TEMPERATURE, value)
                await asyncio.sleep(0.1)
            assert [value for _, value in await collecting] == [28.0, 31.0]

    run(main())


def test_observe_cancel_and_reset_on_the_wire() -> None:
    async def main() -> None:
        raw = await RawSocket.open()
        device = SimulatedDevice("wire", server_uri=raw.uri, timing=QUICK, sensor_interval=None)
        try:
            task = asyncio.create_task(device.register(timeout=5, keep_updating=False))
            received = await raw.receive()
            assert received is not None
            register, peer, _ = received
            raw.send(coap_message(Code.CREATED, Type.ACK, register.mid, register.token, location_path=("rd", "w")),
                     peer)
            assert (await task).ok

            async def observe(mid: int, token: bytes, observe: int, mtype: Type = Type.CON) -> aiocoap.Message:
                raw.send(coap_message(Code.GET, mtype, mid, token, uri_path=("3303", "0", "5700"),
                                      accept=content.TEXT, observe=observe), peer)
                answer = await raw.receive()
                assert answer is not None
                return answer[0]

            async def notification() -> aiocoap.Message | None:
                answer = await raw.receive(0.5)
                return answer[0] if answer is not None else None

            first = await observe(1, b"ob1", 0)
            assert first.code == Code.CONTENT and first.opt.observe == 1 and first.token == b"ob1"
            device.set_value(TEMPERATURE, 22.0)
            sent = await notification()
            assert sent is not None and sent.mtype == Type.CON and sent.token == b"ob1" and sent.opt.observe == 2
            assert sent.payload == b"22.0" and sent.code == Code.CONTENT
            raw.send(coap_message(Code.EMPTY, Type.ACK, sent.mid), peer)
            # GET with Observe=1 and the same token cancels; the answer has no Observe option
            cancelled = await observe(2, b"ob1", 1)
            assert cancelled.code == Code.CONTENT and cancelled.opt.observe is None and device.observations == []
            device.set_value(TEMPERATURE, 23.0)
            assert await notification() is None
            # a Reset to a confirmable notification cancels
            await observe(3, b"ob2", 0)
            device.set_value(TEMPERATURE, 24.0)
            sent = await notification()
            assert sent is not None and sent.token == b"ob2"
            raw.send(coap_message(Code.EMPTY, Type.RST, sent.mid), peer)
            await eventually(lambda: device.observations == [])
            # non-confirmable notifications: a Reset to one cancels too
            device.confirmable_notifications = False
            await observe(4, b"ob3", 0)
            device.set_value(TEMPERATURE, 25.0)
            sent = await notification()
            assert sent is not None and sent.mtype == Type.NON and sent.token == b"ob3"
            device.set_value(TEMPERATURE, 26.0)
            again = await notification()
            assert again is not None and again.opt.observe > sent.opt.observe and len(device.observations) == 1
            raw.send(coap_message(Code.EMPTY, Type.RST, again.mid), peer)
            await eventually(lambda: device.observations == [])
            # a confirmable notification never acknowledged ends the observation after its retransmissions
            device.confirmable_notifications = True
            await observe(5, b"ob4", 0)
            device.set_value(TEMPERATURE, 27.0)
            copies = []
            while (sent := await notification()) is not None:
                copies.append(sent)
            assert len(copies) == 1 + QUICK.max_retransmit and len({copy.mid for copy in copies}) == 1
            assert device.observations == []
            # deleting the observed instance sends 4.04 and ends the observation
            await observe(6, b"ob5", 0)
            raw.send(coap_message(Code.DELETE, Type.CON, 7, b"del", uri_path=("3303", "0")), peer)
            deleted = await raw.receive()
            assert deleted is not None and deleted[0].code == Code.DELETED
            # the device sends the 4.04 notification and, its object list changed, an Update
            arrived = {}
            for _ in range(2):
                sent = await notification()
                assert sent is not None
                arrived[sent.code] = sent
                raw.send(coap_message(Code.CHANGED if sent.code == Code.POST else Code.EMPTY, Type.ACK, sent.mid,
                                      sent.token if sent.code == Code.POST else b""), peer)
            gone, update = arrived[Code.NOT_FOUND], arrived[Code.POST]
            assert gone.token == b"ob5" and gone.opt.observe is None
            assert update.opt.uri_path == ("rd", "w") and links_of(update.payload) == ["/", "/1/0", "/3/0", "/3303"]
            await eventually(lambda: device.observations == [])
        finally:
            await device.close()
            raw.close()

    run(main())


# --- queue mode ----------------------------------------------------------------------------------------


def test_a_queue_mode_device_is_reachable_only_after_it_speaks() -> None:
    async def main() -> None:
        raw = await RawSocket.open()  # a second server socket, whose requests may go unanswered
        try:
            async with ManagementPeer() as peer, registered_device(peer, "sleepy", queue_mode=True) as device:
                async def ask(mid: int) -> aiocoap.Message | None:
                    raw.send(coap_message(Code.GET, Type.CON, mid, b"q", uri_path=("3", "0", "2"),
                                          accept=content.TEXT), device.address)
                    answer = await raw.receive(0.5)
                    return answer[0] if answer is not None else None

                assert peer.seen[0].query[-1] == "Q"
                assert (await peer.read("sleepy", "/3/0/2"))[Path(3, 0, 2)] == "sleepy"  # awake after registering
                await asyncio.sleep(QUICK.awake + 0.1)
                assert device.asleep
                answered = device.answered
                assert await ask(1) is None  # no answer, not even a Reset
                assert device.answered == answered and device.ignored == 1
                assert (await device.update()).ok  # it wakes to send an Update
                assert not device.asleep
                answer = await ask(2)
                assert answer is not None and answer.code == Code.CONTENT and answer.payload == b"sleepy"
                # each answer keeps it awake a while longer; then it sleeps again
                await asyncio.sleep(QUICK.awake * 0.6)
                assert (await peer.request("sleepy", Code.GET, "/3/0/2")).code == Code.CONTENT
                await asyncio.sleep(QUICK.awake * 0.6)
                assert not device.asleep
                await eventually(lambda: device.asleep, wait=1)
        finally:
            raw.close()

    run(main())


# --- fleets and the command line -----------------------------------------------------------------------


def test_a_fleet_of_hundreds_registers_updates_and_de_registers() -> None:
    names = endpoint_names("fleet-", 300)
    first: list[str] = []

    async def main() -> None:
        async with ManagementPeer() as peer:
            stats = await register_fleet(peer.uri, names, window=50, lifetime=2, keep_running=2.0, timing=QUICK,
                                         progress=lambda result: first.append(result.endpoint))
            registers = [seen for seen in peer.seen if seen.operation == "register"]
            assert sorted(seen.endpoint or "" for seen in registers) == names  # each once
            assert {seen.code for seen in peer.seen} == {"2.01", "2.04", "2.02"}
            updated = {seen.endpoint for seen in peer.seen if seen.operation == "update"}
            assert updated == set(names)  # every device updated while kept running (at lt - 0.5 s)
            assert peer.registrations == {}  # all de-registered
        registrations = stats.registrations
        assert registrations.completed == 300 and registrations.failed == 0 and sorted(first) == names
        assert [result.endpoint for result in registrations.results] == names
        assert registrations.p50 is not None and registrations.p99 is not None
        assert 0 < registrations.p50 <= registrations.p99 < 5 and registrations.rate > 0
        assert stats.updates.completed >= 300 and stats.updates.failed == 0 and stats.reregistrations == 0
        assert 1.9 < stats.updates.elapsed < 3 and stats.updates.rate > 100
        assert stats.deregistrations.completed == 300 and stats.deregistrations.failed == 0

    run(main(), limit=60)


def test_a_fleet_reports_failures_and_can_vanish_without_de_registering() -> None:
    async def main() -> None:
        async with ManagementPeer(answer=Code.BAD_REQUEST) as peer:
            refused = await register_fleet(peer.uri, endpoint_names("bad-", 5), timing=QUICK)
        assert refused.registrations.failures == {"rejected 4.00": 5} and refused.deregistrations.results == ()
        async with ManagementPeer() as peer:
            stats = await register_fleet(peer.uri, endpoint_names("gone-", 20), lwm2m_version="1.0",
                                         queue_mode=True, temperature_sensors=3, deregister=False, timing=QUICK)
            assert stats.registrations.completed == 20 and stats.updates.results == ()
            assert stats.deregistrations.results == () and len(peer.registrations) == 20
            assert all("b=UQ" in registered.query for registered in peer.registrations.values())
            assert all(links_of(registered.links)[-1] == "/3303/2" for registered in peer.registrations.values())
        with pytest.raises(ValueError):
            await register_fleet("coaps://127.0.0.1:5684", ["x"])
        with pytest.raises(ValueError):
            await register_fleet(peer.uri, ["x"], lwm2m_version="1.0", content_format=content.SENML_CBOR)

    run(main(), limit=30)


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output as wide as its content, so that assertions do not meet wrapped lines."""
    monkeypatch.setattr(simulate, "console", Console(width=200))


def cli(*args: str) -> Any:
    root = typer.Typer()
    root.add_typer(simulate.app, name="simulate")
    return CliRunner().invoke(root, ["simulate", *args])


@pytest.mark.usefixtures("wide_console")
def test_the_cli_registers_a_fleet() -> None:
    with PeerThread(ManagementPeer()) as peer:
        result = cli("register", "--count", "25", "--server", peer.uri, "--prefix", "cli-reg-", "--lifetime", "2",
                     "--keep-running", "1.2", "--queue", "--window", "10")
        assert result.exit_code == 0, result.output
        assert "Fleet registration" in result.output and "registrations/s" in result.output
        rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
                if line.count("│") == 3}
        assert rows["devices"] == "25" and rows["registered ok"] == "25" and rows["registered failed"] == "0"
        assert int(rows["updates ok"]) >= 25 and rows["de-registered ok"] == "25"
        registers = [seen for seen in peer.seen if seen.operation == "register"]
        assert len(registers) == 25 and all(seen.query[-1] == "Q" for seen in registers)
        assert peer.registrations == {}
    refused = cli("register", "--count", "3", "--server", f"coap://127.0.0.1:{free_udp_port()}", "--timeout", "0.5")
    assert refused.exit_code == 1 and "no response" in refused.output
    for bad in (["--count", "0"], ["--count", "2", "--server", "coaps://x"], ["--count", "2", "--block-size", "100"],
                ["--count", "2", "--lwm2m", "1.0", "--format", "tlv"]):
        assert cli("register", *bad).exit_code == 2, bad


@pytest.mark.usefixtures("wide_console")
def test_the_cli_runs_a_device_that_answers_until_stopped() -> None:
    def read_device(peer: ManagementPeer, registered: Registered) -> None:
        peer.spawn(peer.request(registered.endpoint, Code.GET, "/3/0", accept=content.SENML_JSON))

    with PeerThread(ManagementPeer(on_register=read_device)) as peer:
        result = cli("device", "cli-dev", "--server", peer.uri, "--lifetime", "60", "--duration", "1")
        assert result.exit_code == 0, result.output
        assert "register 2.01 rd/r1" in result.output and "GET /3/0" in result.output
        assert "-> 2.05" in result.output and "stopped: 1 requests answered" in result.output
        assert [(seen.operation, seen.code) for seen in peer.seen] == [("register", "2.01"), ("deregister", "2.02")]
        with PeerThread(BootstrapPeer(server_uri=peer.uri, lifetime=60)) as bootstrap:
            result = cli("device", "cli-bs", "--bootstrap", bootstrap.uri, "--duration", "0.5", "--no-deregister",
                         "--format", "senml-cbor")
            assert result.exit_code == 0, result.output
            assert "Bootstrap of cli-bs" in result.output and "register 2.01" in result.output
            assert bootstrap.queries == [("ep=cli-bs", "pct=112")]
            assert peer.current("cli-bs").query[:2] == ("ep=cli-bs", "lt=60")
    failed = cli("device", "nobody", "--server", f"coap://127.0.0.1:{free_udp_port()}", "--timeout", "0.5")
    assert failed.exit_code == 1 and "register failed" in failed.output
    for bad in ([], ["--server", "coap://a", "--bootstrap", "coap://b"], ["--server", "http://a"]):
        assert cli("device", "x", *bad).exit_code == 2, bad
