"""The registration interface of the management server, end to end on loopback: a real aiocoap client
and Debian's libcoap client against a real ``pilotboat serve``; the device directory and the events
over the API; expiry, the rate-limit hold, and hostile datagrams."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant
from lwm2m_helpers import coap_request, events_of, make_device

OBJECTS = b'</>;rt="oma.lwm2m";ct="60 110 112 11543",</1/0>,</3/0>,</3303/0>,</3303/1>'


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def client() -> aiocoap.Context:
    return await aiocoap.Context.create_client_context()


def rd_uri(server: ServerProcess, path: str = "rd", **query: str) -> str:
    params = "&".join(f"{name}={value}" if value is not None else name for name, value in query.items())
    return f"{server.lwm2m_uri}/{path}" + (f"?{params}" if params else "")


async def register(context: aiocoap.Context, server: ServerProcess, endpoint: str, payload: bytes = OBJECTS,
                   timeout: float = 10, **query: Any) -> aiocoap.Message:
    return await coap_request(context, Code.POST, rd_uri(server, ep=endpoint, **query), payload, timeout=timeout)


def directory(tenant: Tenant, device_id: str) -> dict[str, Any]:
    response = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/directory/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_register_update_deregister(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)

    async def scenario() -> tuple[str, str]:
        context = await client()
        try:
            created = await register(context, server, endpoint, lt="300", lwm2m="1.1", b="U")
            assert created.code == Code.CREATED, created
            assert created.opt.location_path[0] == "rd" and len(created.opt.location_path) == 2
            first_id = created.opt.location_path[1]
            entry = directory(tenant, device_id)
            assert (entry["status"], entry["endpoint"], entry["first_endpoint"], entry["registrations"]) == (
                "registered", endpoint, endpoint, 1)
            assert entry["objects"] == ["/1/0", "/3/0", "/3303/0", "/3303/1"]
            assert entry["content_formats"] == [60, 110, 112, 11543]
            assert (entry["lwm2m_version"], entry["binding"], entry["queue_mode"], entry["lifetime"]) == ("1.1", "U", False, 300)
            live = entry["registration"]
            assert live["registration_id"] == first_id and live["lifetime"] == 300

            # Update: a new lifetime and a new object list.
            updated = await coap_request(context, Code.POST, rd_uri(server, f"rd/{first_id}", lt="600"), b"</1/0>,</3/0>")
            assert updated.code == Code.CHANGED, updated
            entry = directory(tenant, device_id)
            assert entry["lifetime"] == 600 and entry["objects"] == ["/1/0", "/3/0"]
            assert entry["registration"]["expires_at"] > live["expires_at"]
            # An empty update (the usual keep-alive) changes nothing but the time.
            assert (await coap_request(context, Code.POST, rd_uri(server, f"rd/{first_id}"))).code == Code.CHANGED

            gone = await coap_request(context, Code.DELETE, rd_uri(server, f"rd/{first_id}"))
            assert gone.code == Code.DELETED, gone
            entry = directory(tenant, device_id)
            assert entry["status"] == "deregistered" and entry["registration"] is None and entry["ended_at"]
            # The registration is gone: its client must register again.
            assert (await coap_request(context, Code.POST, rd_uri(server, f"rd/{first_id}"))).code == Code.NOT_FOUND
            assert (await coap_request(context, Code.DELETE, rd_uri(server, f"rd/{first_id}"))).code == Code.NOT_FOUND

            again = await register(context, server, endpoint, lwm2m="1.1")
            assert again.code == Code.CREATED
            return first_id, again.opt.location_path[1]
        finally:
            await context.shutdown()

    first_id, second_id = run(scenario())
    assert first_id != second_id
    entry = directory(tenant, device_id)
    assert (entry["device_id"], entry["registrations"], entry["status"]) == (device_id, 2, "registered")
    assert entry["registration"]["lifetime"] == 86400  # lt defaults to 86400

    registered = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.registered", wait=5, count=2)
    assert [event["detail"]["first_registration"] for event in registered] == [False, True]
    first = registered[-1]
    # The first registration event carries both the device id and the original endpoint name.
    assert first["device_id"] == device_id and first["detail"]["original_endpoint"] == endpoint
    assert first["detail"]["registration_id"] == first_id
    assert first["detail"]["objects"] == ["/1/0", "/3/0", "/3303/0", "/3303/1"]
    updates = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.updated", wait=5, count=2)
    assert [event["detail"]["changed"] for event in updates] == [[], ["lifetime", "objects"]]
    [ended] = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.deregistered", wait=5)
    assert ended["detail"] == {"endpoint": endpoint, "registration_id": first_id}
    history = [event["kind"] for event in directory(tenant, device_id)["history"]]
    assert history[:5] == ["lwm2m.registered", "lwm2m.deregistered", "lwm2m.updated", "lwm2m.updated", "lwm2m.registered"]


def test_refusals_get_their_codes(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, _ = make_device(tenant)
    inactive, inactive_id = make_device(tenant, state=0)

    async def scenario() -> dict[str, aiocoap.Message]:
        context = await client()
        try:
            return {
                "missing ep": await coap_request(context, Code.POST, rd_uri(server, lt="60"), OBJECTS),
                "unknown endpoint": await register(context, server, f"unknown-{uuid.uuid4().hex}"),
                "lwm2m 2.0": await register(context, server, endpoint, lwm2m="2.0"),
                "lifetime 0": await register(context, server, endpoint, lt="0"),
                "lifetime text": await register(context, server, endpoint, lt="soon"),
                "binding X": await register(context, server, endpoint, b="X"),
                "inactive": await register(context, server, inactive),
                "unknown update": await coap_request(context, Code.POST, rd_uri(server, "rd/nosuch")),
                "unknown delete": await coap_request(context, Code.DELETE, rd_uri(server, "rd/nosuch")),
                "GET /rd": await coap_request(context, Code.GET, rd_uri(server)),
                "deep path": await coap_request(context, Code.POST, rd_uri(server, "rd/a/b")),
            }
        finally:
            await context.shutdown()

    answers = run(scenario())
    codes = {name: answer.code.dotted for name, answer in answers.items()}
    assert codes == {
        "missing ep": "4.00", "unknown endpoint": "4.00", "lwm2m 2.0": "4.12", "lifetime 0": "4.00",
        "lifetime text": "4.00", "binding X": "4.00", "inactive": "4.03", "unknown update": "4.04",
        "unknown delete": "4.04", "GET /rd": "4.05", "deep path": "4.04",
    }
    # Diagnostics say what to do, without telling an unauthenticated peer which endpoints exist.
    assert b"ep" in answers["missing ep"].payload and b"1.0" in answers["lwm2m 2.0"].payload
    assert answers["unknown endpoint"].payload == b"unknown endpoint"
    [refused] = events_of(tenant.viewer, tenant.org_id, inactive_id, "lwm2m.refused", wait=5)
    assert refused["reason"] == "device inactive" and refused["outcome"] == "refused"
    assert "Traceback" not in server.log()


def test_queue_mode_and_block1(server: ServerProcess, tenant: Tenant) -> None:
    old, old_id = make_device(tenant)
    new, new_id = make_device(tenant)
    big, big_id = make_device(tenant)
    many = b",".join(f"</{object_id}/{instance}>".encode() for object_id in range(3300, 3340) for instance in range(12))
    assert len(many) > 4096  # several blocks

    async def scenario() -> None:
        context = await client()
        try:
            assert (await register(context, server, old, lwm2m="1.0", b="UQ")).code == Code.CREATED
            assert (await register(context, server, new, b"</3/0>", lwm2m="1.1", Q=None)).code == Code.CREATED
            # aiocoap sends a large payload in Block1 pieces; the server assembles them.
            assert (await register(context, server, big, many, lwm2m="1.1")).code == Code.CREATED
        finally:
            await context.shutdown()

    run(scenario())
    for device_id in (old_id, new_id):
        entry = directory(tenant, device_id)
        assert (entry["binding"], entry["queue_mode"]) == ("U", True)
    assert len(directory(tenant, big_id)["objects"]) == 40 * 12


def test_a_new_register_replaces_the_previous_registration(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)

    async def scenario() -> tuple[str, str]:
        context = await client()
        try:
            first = (await register(context, server, endpoint)).opt.location_path[1]
            second = (await register(context, server, endpoint)).opt.location_path[1]
            assert (await coap_request(context, Code.POST, rd_uri(server, f"rd/{first}"))).code == Code.NOT_FOUND
            assert (await coap_request(context, Code.POST, rd_uri(server, f"rd/{second}"))).code == Code.CHANGED
            return first, second
        finally:
            await context.shutdown()

    first, second = run(scenario())
    latest = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.registered", wait=5, count=2)[0]
    assert latest["detail"]["registration_id"] == second and latest["detail"]["replaced"] == first
    listed = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/directory", params={"endpoint": endpoint}).json()
    assert listed["total"] == 1 and listed["devices"][0]["registration"]["registration_id"] == second


@pytest.fixture(scope="module")
def quick_server(server_factory: Any) -> Iterator[ServerProcess]:
    """A server whose registrations expire without grace and whose holds last 3 s."""
    process = server_factory(PILOTBOAT_REGISTRATION_GRACE="0", PILOTBOAT_REGISTRATION_HOLD_SECONDS="3")
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def quick_tenant(quick_server: ServerProcess) -> Iterator[Tenant]:
    root = Api.login(quick_server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(quick_server.url, root)
    yield tenant
    tenant.close()
    root.close()


def test_a_device_that_stops_updating_expires(quick_server: ServerProcess, quick_tenant: Tenant) -> None:
    tenant = quick_tenant
    endpoint, device_id = make_device(tenant)

    async def scenario() -> str:
        context = await client()
        try:
            created = await register(context, quick_server, endpoint, lt="2")
            assert created.code == Code.CREATED
            return created.opt.location_path[1]
        finally:
            await context.shutdown()

    started = time.monotonic()
    registration_id = run(scenario())
    [expired] = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.expired", wait=10)
    # Lifetime 2 s, no grace, checked at least every second (plus the event writer's batching).
    assert time.monotonic() - started < 5
    assert expired["detail"] == {"endpoint": endpoint, "registration_id": registration_id}
    entry = directory(tenant, device_id)
    assert entry["status"] == "expired" and entry["registration"] is None


def test_more_than_ten_registrations_in_ten_seconds_put_the_endpoint_on_hold(
    quick_server: ServerProcess, quick_tenant: Tenant
) -> None:
    tenant = quick_tenant
    endpoint, device_id = make_device(tenant)

    async def burst() -> list[aiocoap.Message]:
        context = await client()
        try:
            return [await register(context, quick_server, endpoint) for _ in range(12)]
        finally:
            await context.shutdown()

    answers = run(burst())
    assert [answer.code.dotted for answer in answers] == ["2.01"] * 10 + ["4.29"] * 2
    assert 1 <= answers[10].opt.max_age <= 3 and b"hold" in answers[10].payload
    [held] = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.held", wait=5)
    assert held["detail"]["endpoint"] == endpoint and held["outcome"] == "refused"
    time.sleep(3.2)

    async def after_hold() -> aiocoap.Message:
        context = await client()
        try:
            return await register(context, quick_server, endpoint)
        finally:
            await context.shutdown()

    assert run(after_hold()).code == Code.CREATED
    [released] = events_of(tenant.viewer, tenant.org_id, device_id, "lwm2m.released", wait=5)
    assert released["detail"] == {"endpoint": endpoint}


@pytest.mark.skipif(shutil.which("coap-client-notls") is None, reason="libcoap's coap-client-notls is not installed")
def test_libcoap_register_and_update(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)

    def coap_client(*args: str) -> str:
        result = subprocess.run(["coap-client-notls", "-v", "6", "-B", "5", *args], capture_output=True, text=True,
                                timeout=30, check=False)
        return result.stdout + result.stderr

    registered = coap_client("-m", "post", "-t", "40", "-e", "</1/0>,</3/0>", rd_uri(server, ep=endpoint, lt="120"))
    assert "c:2.01" in registered, registered
    entry = directory(tenant, device_id)
    registration_id = entry["registration"]["registration_id"]
    # Exactly two segments, rd and the id.
    assert f"[ Location-Path:rd, Location-Path:{registration_id} ]" in registered, registered
    assert entry["objects"] == ["/1/0", "/3/0"]
    updated = coap_client("-m", "post", rd_uri(server, f"rd/{registration_id}", lt="240"))
    assert "c:2.04" in updated, updated
    assert directory(tenant, device_id)["lifetime"] == 240


def _datagram(code: Code, path: tuple[str, ...], query: tuple[str, ...] = (), payload: bytes = b"", mid: int = 1) -> bytes:
    message = aiocoap.Message(code=code, uri_path=path, uri_query=query, payload=payload)
    message.mid, message.token, message.mtype = mid, mid.to_bytes(2, "big"), aiocoap.CON
    return message.encode()


def test_garbage_and_mutated_registrations_do_not_hurt_the_server(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    rng = random.Random(20261124)
    seeds = [
        _datagram(Code.POST, ("rd",), (f"ep={endpoint}", "lt=60", "lwm2m=1.1"), OBJECTS),
        _datagram(Code.POST, ("rd", "abcdef"), ("lt=60", "b=UQ")),
        _datagram(Code.DELETE, ("rd", "abcdef")),
        _datagram(Code.POST, ("rd",), ("ep=x",), b'</>;rt="oma.lwm2m";ct=";,<<>>' + bytes(range(256))),
    ]
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    try:
        for index in range(3000):
            if index % 3 == 0:
                datagram = rng.randbytes(rng.randint(0, 200))
            else:
                data = bytearray(rng.choice(seeds))
                for _ in range(rng.randint(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                datagram = bytes(data)
            sockets[index % len(sockets)].sendto(datagram, ("127.0.0.1", server.lwm2m_port))
            if index % 200 == 0:
                time.sleep(0.02)
    finally:
        for sock in sockets:
            sock.close()
    assert server.process is not None and server.process.poll() is None

    async def afterwards() -> aiocoap.Message:
        context = await client()
        try:
            return await register(context, server, endpoint, timeout=30)
        finally:
            await context.shutdown()

    # Mutated copies of the seed may have registered the endpoint or put it on hold; the server still
    # answers a clean Register with a registration or a hold.
    answer = run(afterwards())
    assert answer.code.dotted in {"2.01", "4.29"}, answer
    assert tenant.viewer.get("/health").status_code == 200
    assert "Traceback" not in server.log()


def test_a_restart_marks_lost_registrations_and_devices_register_again(server_factory: Any) -> None:
    process = server_factory()
    process.start()
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(process.url, root)
    try:
        endpoint, device_id = make_device(tenant)

        async def register_once() -> str:
            context = await client()
            try:
                return (await register(context, process, endpoint)).opt.location_path[1]
            finally:
                await context.shutdown()

        registration_id = run(register_once())
        process.restart()
        entry = directory(tenant, device_id)
        assert (entry["status"], entry["registration"]) == ("expired", None)

        async def update_after_restart() -> aiocoap.Message:
            context = await client()
            try:
                return await coap_request(context, Code.POST, rd_uri(process, f"rd/{registration_id}"))
            finally:
                await context.shutdown()

        assert run(update_after_restart()).code == Code.NOT_FOUND  # the client registers again
        run(register_once())
        assert directory(tenant, device_id)["status"] == "registered"
        assert directory(tenant, device_id)["registrations"] == 2
    finally:
        tenant.close()
        root.close()
        process.stop()


def test_metrics_count_registrations(server_factory: Any) -> None:
    process = server_factory()
    process.start()
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(process.url, root)

    def gauge() -> float:
        text = tenant.viewer.get("/metrics").text
        [line] = [line for line in text.splitlines() if line.startswith("pilotboat_lwm2m_registrations ")]
        return float(line.split()[1])

    try:
        endpoints = [make_device(tenant)[0] for _ in range(3)]

        async def scenario() -> None:
            context = await client()
            try:
                ids = [(await register(context, process, endpoint)).opt.location_path[1] for endpoint in endpoints]
                await register(context, process, endpoints[0])  # replaces, does not add
                assert gauge() == 3
                await coap_request(context, Code.DELETE, rd_uri(process, f"rd/{ids[1]}"))
                assert gauge() == 2
            finally:
                await context.shutdown()

        assert gauge() == 0
        run(scenario())
    finally:
        tenant.close()
        root.close()
        process.stop()
