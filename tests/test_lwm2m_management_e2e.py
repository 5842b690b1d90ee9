"""The management server end to end on loopback, with the simulator as the device and a real
``pilotboat serve`` (SQLite and PostgreSQL): bootstrap → register → update → read /3/0 over the API →
observe /3303/0/5700 with notifications on the event stream and on a webhook (signature checked) →
trigger bootstrap → the device bootstraps and registers again with the same device id, its observation
set up again → de-register. A queue-mode device that gets a held request when it next updates. And
the registration rules as a device lives them: expiry of a device that stops updating and its 4.04
afterwards, the rate-limit hold and release (4.12 needs a version the simulator does not speak: see
test_lwm2m_registration)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant
from lwm2m_helpers import call, events_of, eventually, make_device
from notification_helpers import Receiver, open_stream
from pilotboat.sim import SimulatedDevice
from pilotboat.sim.exchange import Timing

SENSOR = "/3303/0/5700"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def e2e_server(request: pytest.FixtureRequest, server_factory: Any) -> Iterator[ServerProcess]:
    """A server that may deliver webhooks to a receiver on loopback, takes queue-mode devices to sleep
    1 s after their last message, expires registrations without grace and holds endpoints for 3 s."""
    process = server_factory(
        request.param, PILOTBOAT_WEBHOOK_ALLOW_PRIVATE="true", PILOTBOAT_LWM2M_QUEUE_AWAKE_SECONDS="1",
        PILOTBOAT_REGISTRATION_GRACE="0", PILOTBOAT_REGISTRATION_HOLD_SECONDS="3",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def org(e2e_server: ServerProcess) -> Iterator[Tenant]:
    root = Api.login(e2e_server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(e2e_server.url, root)
    yield tenant
    tenant.close()
    root.close()


def test_bootstrap_register_operate_observe_rebootstrap_deregister(e2e_server: ServerProcess, org: Tenant) -> None:
    server = e2e_server
    endpoint, device_id = make_device(org)
    base = f"/api/v1/orgs/{org.org_id}"
    receiver = Receiver()
    hook = org.admin.post(f"{base}/webhooks", json={"url": receiver.url(), "kinds": ["lwm2m."]})
    assert hook.status_code == 201, hook.text
    secret = hook.json()["secret"]
    stream = open_stream(server, org.viewer, org.org_id, params={"kind": "lwm2m."})
    assert stream.response.status_code == 200

    async def scenario() -> None:
        device = SimulatedDevice(endpoint, server.bootstrap_uri, sensor_interval=None)
        async with device:
            # Bootstrap: the device is sent to this deployment's management server, and registers there.
            assert (await device.bootstrap()).ok
            assert device.management_server is not None and device.management_server.uri == server.lwm2m_uri
            registered = await device.register()
            assert registered.ok, registered
            assert (await device.update()).ok

            # Read the Device object through the API: decoded values.
            read = await call(org.member.get, f"{base}/devices/{device_id}/lwm2m/3/0")
            assert read.status_code == 200, read.text
            answer = read.json()
            assert (answer["code"], answer["ok"]) == ("2.05", True)
            assert answer["values"]["/3/0/0"] == device.value("/3/0/0")  # manufacturer

            # Observe the temperature: each change is a notification event.
            observed = await call(org.member.post, f"{base}/devices/{device_id}/observations", json={"path": SENSOR})
            assert observed.status_code == 201, observed.text
            await eventually(lambda: device.observations, what="the observation to reach the device")
            device.set_value(SENSOR, 21.5)
            await eventually(lambda: notified(org, device_id, 21.5), what="the 21.5 notification")

            # Trigger a bootstrap: the device accepts, bootstraps again and registers again.
            triggered = await call(org.member.post, f"{base}/devices/{device_id}/commands/trigger-bootstrap")
            assert triggered.status_code == 200, triggered.text
            assert (triggered.json()["accepted"], triggered.json()["code"]) == (True, "2.04")
            await eventually(lambda: len(registrations_of(org, device_id)) == 2, what="the second registration")
            assert device.bootstraps and device.bootstraps[-1].ok
            # The observation is set up again on the new registration.
            await eventually(lambda: device.observations, what="the observation to be re-established")
            device.set_value(SENSOR, 23.0)
            await eventually(lambda: notified(org, device_id, 23.0), what="the 23.0 notification")

            assert (await device.deregister()).ok

    asyncio.run(scenario())

    entry = org.viewer.get(f"{base}/directory/{device_id}").json()
    assert (entry["device_id"], entry["status"], entry["registrations"], entry["first_endpoint"]) == (
        device_id, "deregistered", 2, endpoint)
    first, second = sorted(registrations_of(org, device_id), key=lambda event: event["id"])
    assert (first["detail"]["first_registration"], second["detail"]["first_registration"]) == (True, False)
    assert first["device_id"] == second["device_id"] == device_id and first["detail"]["original_endpoint"] == endpoint

    # The stream and the webhook carried the same story, in order: the registrations, and the
    # notifications of each (the first answer to each Observe is one too) within them.
    story = ["lwm2m.registered", "lwm2m.updated", "lwm2m.deregistered", "lwm2m.registered", "lwm2m.deregistered"]
    streamed = collect(lambda: stream.quiet(0.5), story, lambda message: message.json)
    delivered = collect(lambda: receiver.events(secret, 1), story, lambda event: event, replace=True)
    stream.close()
    receiver.close()
    for events in (streamed, delivered):
        lifecycle = [event for event in events if event["kind"] in story]
        assert [event["kind"] for event in lifecycle] == story
        values = [(event["id"], event["detail"]["values"][SENSOR]) for event in events if event["kind"] == "lwm2m.notification"]
        first_period = [value for id_, value in values if lifecycle[1]["id"] < id_ < lifecycle[2]["id"]]
        second_period = [value for id_, value in values if lifecycle[3]["id"] < id_ < lifecycle[4]["id"]]
        assert first_period[-1] == 21.5 and second_period[-1] == 23.0, values
    assert [event["id"] for event in streamed if event["kind"] in story] == [
        event["id"] for event in delivered if event["kind"] in story]


def registrations_of(org: Tenant, device_id: str) -> list[dict[str, Any]]:
    page = org.viewer.get(f"/api/v1/orgs/{org.org_id}/events", params={"kind": "lwm2m.registered", "device_id": device_id})
    return page.json()["events"]


def notified(org: Tenant, device_id: str, value: float) -> bool:
    page = org.viewer.get(f"/api/v1/orgs/{org.org_id}/events", params={"kind": "lwm2m.notification", "device_id": device_id})
    return any(event["detail"]["values"].get(SENSOR) == value for event in page.json()["events"])


def collect(read: Callable[[], list[Any]], story: list[str], event_of: Callable[[Any], dict[str, Any]],
            replace: bool = False, timeout: float = 30) -> list[dict[str, Any]]:
    """Events from ``read`` (oldest first; ``replace``: each read returns everything so far) until the
    story's kinds have all arrived, or time runs out."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while [event["kind"] for event in found if event["kind"] in story] != story and time.monotonic() < deadline:
        batch = [event_of(item) for item in read()]
        found = batch if replace else found + batch
        if replace:
            time.sleep(0.3)
    return found


def test_a_queue_mode_device_gets_a_held_request_when_it_next_updates(e2e_server: ServerProcess, org: Tenant) -> None:
    server = e2e_server
    endpoint, device_id = make_device(org)
    base = f"/api/v1/orgs/{org.org_id}/devices/{device_id}"

    async def scenario() -> None:
        device = SimulatedDevice(endpoint, server_uri=server.lwm2m_uri, queue_mode=True, lwm2m_version="1.1",
                                 sensor_interval=None, timing=Timing(awake=1.0))
        async with device:
            assert (await device.register(keep_updating=False)).ok
            await asyncio.sleep(1.5)  # past the device's and the server's awake windows
            assert device.asleep
            queued = await call(org.member.get, f"{base}/lwm2m/3/0/0", params={"wait": "false"})
            assert queued.status_code == 202, queued.text
            request_id = queued.json()["request_id"]
            state = (await call(org.viewer.get, f"{base}/lwm2m-requests/{request_id}")).json()
            assert state["status"] in ("queued", "sent"), state
            # The device wakes up and updates: the server sends the held request while it is awake.
            assert (await device.update()).ok
            done = await eventually(
                lambda: (lambda s: s if s["status"] == "done" else None)(org.viewer.get(f"{base}/lwm2m-requests/{request_id}").json()),
                what="the held request to be answered",
            )
            assert (done["code"], done["values"]) == ("2.05", {"/3/0/0": device.value("/3/0/0")})
            assert any(request.path == "/3/0/0" for request in device.received)

    asyncio.run(scenario())


def test_expiry_and_hold_as_devices_live_them(e2e_server: ServerProcess, org: Tenant) -> None:
    server = e2e_server
    quiet_endpoint, quiet_id = make_device(org)
    hasty_endpoint, hasty_id = make_device(org)

    async def expiry() -> None:
        device = SimulatedDevice(quiet_endpoint, server_uri=server.lwm2m_uri, lifetime=2, sensor_interval=None)
        async with device:
            first = await device.register(keep_updating=False)  # then it goes quiet
            assert first.ok and first.location is not None
            [expired] = await call(events_of, org.viewer, org.org_id, quiet_id, "lwm2m.expired", 10)
            assert expired["detail"] == {"endpoint": quiet_endpoint, "registration_id": first.location.split("/")[1]}
            entry = (await call(org.viewer.get, f"/api/v1/orgs/{org.org_id}/directory/{quiet_id}")).json()
            assert (entry["status"], entry["registration"]) == ("expired", None)
            # When it speaks again its Update is refused 4.04, and it registers again under the same id.
            late = await device.update()
            assert (late.ok, late.code, device.registered) == (False, "4.04", False)
            again = await device.register(keep_updating=False)
            assert again.ok and again.location != first.location
            registered = await call(events_of, org.viewer, org.org_id, quiet_id, "lwm2m.registered", 5, 2)
            assert [event["detail"]["first_registration"] for event in registered[:2]] == [False, True]
            assert {event["device_id"] for event in registered} == {quiet_id}

    async def hold() -> None:
        device = SimulatedDevice(hasty_endpoint, server_uri=server.lwm2m_uri, lifetime=60, sensor_interval=None)
        async with device:
            results = [await device.register(keep_updating=False) for _ in range(11)]
            assert [result.code for result in results] == ["2.01"] * 10 + ["4.29"]
            retry_after = results[-1].retry_after
            assert retry_after is not None and 0 < retry_after <= 3
            [held] = await call(events_of, org.viewer, org.org_id, hasty_id, "lwm2m.held", 5)
            assert (held["outcome"], held["detail"]["endpoint"]) == ("refused", hasty_endpoint)
            await asyncio.sleep(retry_after + 0.3)
            assert (await device.register(keep_updating=False)).code == "2.01"
            [released] = await call(events_of, org.viewer, org.org_id, hasty_id, "lwm2m.released", 5)
            assert released["detail"] == {"endpoint": hasty_endpoint}

    async def scenario() -> None:
        await asyncio.gather(expiry(), hold())

    asyncio.run(scenario())
