"""The live event stream (Server-Sent Events) through real servers on SQLite and PostgreSQL: events
arrive live, in order, as the events list shows them; resuming with Last-Event-ID replays exactly what
was missed; kind filters; keep-alive comments; tenants see only their own events; the per-node stream
limit; and a server with open streams stops promptly."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from compat_helpers import new_channel, new_device, org_events, unique
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant
from notification_helpers import Message, open_stream

STREAM_MAX = 4
HEARTBEAT = 0.5


def listed(client: Api, org_id: str) -> dict[int, dict[str, Any]]:
    return {event["id"]: event for event in org_events(client, org_id)}


def assert_event_messages(messages: list[Message], client: Api, org_id: str) -> list[dict[str, Any]]:
    """Each message is an event of the organisation exactly as its events list shows it, oldest first."""
    events = listed(client, org_id)
    shown = []
    for message in messages:
        data = message.json
        assert message.id == str(data["id"]) and message.event == data["kind"], message
        assert data == events[data["id"]], (data, events.get(data["id"]))
        shown.append(data)
    ids = [data["id"] for data in shown]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    return shown


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def streams_server(request: pytest.FixtureRequest, server_factory: Any) -> Iterator[ServerProcess]:
    process = server_factory(request.param, PILOTBOAT_EVENT_STREAM_MAX=str(STREAM_MAX),
                             PILOTBOAT_EVENT_STREAM_HEARTBEAT=str(HEARTBEAT))
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def root_client(streams_server: ServerProcess) -> Iterator[Api]:
    client = Api.login(streams_server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    yield client
    client.close()


@pytest.fixture()
def org(streams_server: ServerProcess, root_client: Api) -> Iterator[Tenant]:
    tenant = make_tenant(streams_server.url, root_client)
    yield tenant
    tenant.close()


@pytest.fixture()
def other_org(streams_server: ServerProcess, root_client: Api) -> Iterator[Tenant]:
    tenant = make_tenant(streams_server.url, root_client)
    yield tenant
    tenant.close()


def bootstrap(server: ServerProcess, external_id: str, key: str) -> int:
    return httpx.get(f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": f"Client {key}"},
                     timeout=30).status_code


# --- tests ------------------------------------------------------------------------------------------


def test_new_events_arrive_live_in_order_as_the_events_list_shows_them(streams_server: ServerProcess, org: Tenant) -> None:
    base = f"/api/v1/orgs/{org.org_id}"
    before = new_device(org.member, org.org_id, name=unique("before"))
    with open_stream(streams_server, org.viewer, org.org_id) as stream:
        assert stream.response.status_code == 200
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-store"
        external_id, key = unique("ext"), unique("key")
        device = new_device(org.member, org.org_id, name=unique("dev"), external_id=external_id, external_key=key, state=1)
        assert org.member.patch(f"{base}/devices/{device['id']}", json={"alias": "renamed"}).status_code == 200
        assert bootstrap(streams_server, external_id, key) == 200
        assert bootstrap(streams_server, external_id, "wrong-key") == 403
        assert org.member.delete(f"{base}/devices/{before['id']}").status_code == 204
        shown = assert_event_messages(stream.events(5), org.admin, org.org_id)
    assert [event["kind"] for event in shown] == [
        "device.created", "device.updated", "bootstrap.succeeded", "bootstrap.failed", "device.deleted",
    ]
    assert [event["device_id"] for event in shown] == [device["id"]] * 4 + [before["id"]]
    # Nothing from before the stream opened (the first device's creation), nothing else after.
    assert shown[0]["id"] > max(event["id"] for event in org_events(org.admin, org.org_id, kind="device.created")
                                if event["device_id"] == before["id"])
    assert [event["id"] for event in shown] == sorted(listed(org.admin, org.org_id))[-5:]


def test_last_event_id_replays_exactly_the_missed_events_then_goes_live(streams_server: ServerProcess, org: Tenant) -> None:
    with open_stream(streams_server, org.admin, org.org_id) as stream:
        seen = [new_channel(org.member, org.org_id) for _ in range(2)]
        first = stream.events(2)
    assert [message.json["detail"]["channel_id"] for message in first] == [channel["id"] for channel in seen]
    last_seen = first[-1].id
    missed = [new_channel(org.member, org.org_id) for _ in range(3)]
    with open_stream(streams_server, org.admin, org.org_id, headers={"Last-Event-ID": last_seen}) as resumed:
        replayed = resumed.events(3)
        assert [message.json["detail"]["channel_id"] for message in replayed] == [channel["id"] for channel in missed]
        assert resumed.quiet(HEARTBEAT * 2) == []  # exactly the missed ones
        live = new_channel(org.member, org.org_id)
        (message,) = resumed.events(1)
        assert message.json["detail"]["channel_id"] == live["id"]
        assert_event_messages([*replayed, message], org.admin, org.org_id)
    # The query parameter does the same (for clients that cannot set headers), here with a kind filter.
    new_device(org.member, org.org_id, name=unique("dev"))
    with open_stream(streams_server, org.admin, org.org_id, params={"last_event_id": last_seen, "kind": "channel.created"}) as by_query:
        assert [message.json["detail"]["channel_id"] for message in by_query.events(4)] == [
            channel["id"] for channel in [*missed, live]
        ]
        assert by_query.quiet(HEARTBEAT * 2) == []
    # The header wins over the query parameter.
    with open_stream(streams_server, org.admin, org.org_id, headers={"Last-Event-ID": str(message.json["id"])},
                     params={"last_event_id": last_seen, "kind": "channel."}) as both:
        assert both.quiet(HEARTBEAT * 2) == []


def test_kind_filters_select_exact_kinds_and_prefixes(streams_server: ServerProcess, org: Tenant) -> None:
    base = f"/api/v1/orgs/{org.org_id}"
    with (
        open_stream(streams_server, org.admin, org.org_id, params={"kind": "device."}) as devices,
        open_stream(streams_server, org.admin, org.org_id, params={"kind": ["channel.created", "device.deleted"]}) as mixed,
        open_stream(streams_server, org.admin, org.org_id, params={"kind": "device"}) as no_prefix,
    ):
        device = new_device(org.member, org.org_id, name=unique("dev"))
        channel = new_channel(org.member, org.org_id)
        assert org.member.patch(f"{base}/channels/{channel['id']}", json={"name": unique("chan")}).status_code == 200
        assert org.member.delete(f"{base}/devices/{device['id']}").status_code == 204
        assert [message.event for message in devices.events(2)] == ["device.created", "device.deleted"]
        assert [message.event for message in mixed.events(2)] == ["channel.created", "device.deleted"]
        # "device" without the dot is an exact kind, which no event has.
        assert no_prefix.quiet(HEARTBEAT * 2) == []
        assert devices.quiet(0.2) == [] and mixed.quiet(0.2) == []


def test_quiet_streams_send_keep_alive_comments(streams_server: ServerProcess, org: Tenant) -> None:
    with open_stream(streams_server, org.viewer, org.org_id) as stream:
        started = time.monotonic()
        comments = [stream.next(HEARTBEAT * 4) for _ in range(3)]
        assert all(message is not None and message.comment == "keep-alive" for message in comments), comments
        assert time.monotonic() - started >= HEARTBEAT * 2.5


def test_tenants_see_only_their_own_events(
    streams_server: ServerProcess, org: Tenant, other_org: Tenant, root_client: Api
) -> None:
    with (
        open_stream(streams_server, org.viewer, org.org_id) as own,
        open_stream(streams_server, other_org.admin, other_org.org_id) as other,
        open_stream(streams_server, root_client, None, params={"kind": ["channel.created"]}) as everything,
    ):
        channel = new_channel(org.member, org.org_id)
        other_channel = new_channel(other_org.member, other_org.org_id)
        (message,) = own.events(1)
        assert message.json["detail"]["channel_id"] == channel["id"]
        (message,) = other.events(1)
        assert message.json["detail"]["channel_id"] == other_channel["id"]
        assert own.quiet(HEARTBEAT * 2) == [] and other.quiet(0.1) == []
        seen = {message.json["detail"]["channel_id"]: message.json["org_id"] for message in everything.events(2)}
        assert seen == {channel["id"]: org.org_id, other_channel["id"]: other_org.org_id}
    # Refused before any streaming: no membership 404, no token 401, deployment-wide for a tenant 403.
    refusals = [
        (other_org.admin, org.org_id, 404), (org.admin, other_org.org_id, 404), (None, org.org_id, 401),
        (org.admin, None, 403), (org.admin, "00000000-0000-0000-0000-000000000000", 404),
    ]
    for client, org_id, status in refusals:
        with open_stream(streams_server, client, org_id) as refused:
            assert refused.response.status_code == status, (org_id, status)
            refused.response.read()
            assert refused.response.headers["content-type"] == "application/json"
            assert refused.response.json()["detail"]
    # A system administrator may follow any organisation.
    with open_stream(streams_server, root_client, org.org_id) as rooted:
        assert rooted.response.status_code == 200


def test_bad_stream_parameters_are_refused(streams_server: ServerProcess, org: Tenant) -> None:
    attempts = [
        ({"headers": {"Last-Event-ID": "abc"}}, 400, "Last-Event-ID"),
        ({"headers": {"Last-Event-ID": "-5"}}, 400, "Last-Event-ID"),
        ({"params": {"last_event_id": "-1"}}, 422, "last_event_id"),
        ({"params": {"last_event_id": "x"}}, 422, "last_event_id"),
        ({"params": {"kind": "device. created"}}, 400, "kind"),
        ({"params": {"kind": "x" * 65}}, 400, "kind"),
        ({"params": {"kind": [f"k{number}." for number in range(33)]}}, 400, "kind"),
    ]
    for kwargs, status, field in attempts:
        with open_stream(streams_server, org.admin, org.org_id, **kwargs) as refused:
            assert refused.response.status_code == status, (kwargs, refused.response.status_code)
            refused.response.read()
            body = refused.response.json()
            assert body["field"] == field and body["detail"], body


def test_streams_per_node_are_bounded_and_freed_when_clients_leave(
    streams_server: ServerProcess, org: Tenant, root_client: Api
) -> None:
    opened = [open_stream(streams_server, org.viewer, org.org_id) for _ in range(STREAM_MAX)]
    try:
        assert [stream.response.status_code for stream in opened] == [200] * STREAM_MAX
        with open_stream(streams_server, root_client, None) as refused:
            assert refused.response.status_code == 503
            refused.response.read()
            assert "PILOTBOAT_EVENT_STREAM_MAX" in refused.response.json()["detail"]
        opened.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the client left
            again = open_stream(streams_server, org.viewer, org.org_id)
            if again.response.status_code == 200:
                opened.append(again)
                break
            again.close()
            assert time.monotonic() < deadline, "the stream's slot was not freed"
            time.sleep(0.1)
        channel = new_channel(org.member, org.org_id)
        for stream in opened:  # every stream still works
            (message,) = stream.events(1)
            assert message.json["detail"]["channel_id"] == channel["id"]
    finally:
        for stream in opened:
            stream.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_server_with_open_streams_stops_at_once(backend: str, server_factory: Any) -> None:
    process = server_factory(backend)
    process.start()
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(process.url, root)
    streams = [open_stream(process, tenant.viewer, tenant.org_id), open_stream(process, root, None)]
    try:
        channel = new_channel(tenant.member, tenant.org_id)
        assert streams[0].events(1)[0].json["detail"]["channel_id"] == channel["id"]
        assert process.process is not None
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        # The server re-raises the signal once it has shut down cleanly.
        assert process.process.wait(timeout=10) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 5
        for stream in streams:  # the streams ended (cleanly, or cut off with the process)
            while (message := stream.next(5)) is not None:
                assert message.comment is not None or message.event == "channel.created", message
    finally:
        for stream in streams:
            stream.close()
        tenant.close()
        root.close()
    log = process.log()
    assert "Application shutdown complete" in log and "Waiting for connections to close" not in log
