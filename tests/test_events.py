"""Audit events: what is recorded, how it is filtered and paged, who may read it, and that no secret
ever reaches an event or the server log."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from harness import ENCRYPT_KEY, Api, ServerProcess, Tenant, json_of


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def events_of(client: Api, org_id: str | None = None, **params: Any) -> dict[str, Any]:
    path = f"/api/v1/orgs/{org_id}/events" if org_id else "/api/v1/events"
    response = client.get(path, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return json_of(response)


def kinds(page: dict[str, Any]) -> list[str]:
    return [event["kind"] for event in page["events"]]


def when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["created_at"])


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json() if response.content else None


def refused(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert json_of(response).get("detail")


def email_of(client: Api) -> str:
    return ok(client.get("/api/v1/me"))["email"]


def activity(server: ServerProcess, tenant: Tenant) -> dict[str, Any]:
    """A little of everything in ``tenant``: channels, devices, state and channel changes, users, bootstraps."""
    base = f"/api/v1/orgs/{tenant.org_id}"
    channel = ok(tenant.member.post(f"{base}/channels", json={"name": unique("chan")}), 201)
    second = ok(tenant.member.post(f"{base}/channels", json={"name": unique("chan")}), 201)
    external_id, external_key = unique("ext"), unique("extkey")
    device = ok(
        tenant.member.post(
            f"{base}/devices",
            json={"name": unique("dev"), "external_id": external_id, "external_key": external_key, "channels": [channel["id"]]},
        ),
        201,
    )
    other_device = ok(tenant.member.post(f"{base}/devices", json={"name": unique("dev")}), 201)
    ok(tenant.member.put(f"{base}/devices/{device['id']}/state", json={"state": 1}))
    ok(tenant.member.put(f"{base}/devices/{device['id']}/channels", json={"channels": [channel["id"], second["id"]]}))
    ok(tenant.member.patch(f"{base}/devices/{device['id']}", json={"alias": "renamed"}))
    ok(tenant.member.patch(f"{base}/channels/{second['id']}", json={"name": unique("chan")}))
    booted = httpx.get(
        f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": f"Client {external_key}"}, timeout=30
    )
    assert booted.status_code == 200, booted.text
    wrong = httpx.get(f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": "Client nope"}, timeout=30)
    assert wrong.status_code == 403, wrong.text
    user = ok(
        tenant.admin.post(f"{base}/users", json={"email": f"{unique('u')}@pilotboat.test", "password": "long-enough"}), 201
    )
    assert tenant.admin.patch(f"{base}/users/{user['id']}", json={"role": "viewer"}).status_code == 204
    assert tenant.admin.delete(f"{base}/users/{user['id']}").status_code == 204
    assert tenant.member.delete(f"{base}/devices/{other_device['id']}").status_code == 204
    assert tenant.member.delete(f"{base}/channels/{second['id']}").status_code == 204
    return {"device": device, "other_device": other_device, "channel": channel, "second": second, "user": user,
            "external_id": external_id}


def test_org_events_list_changes_newest_first(server: ServerProcess, tenant: Tenant) -> None:
    story = activity(server, tenant)
    page = events_of(tenant.admin, tenant.org_id)
    events = page["events"]
    assert page["total"] == len(events)
    assert page["offset"] == 0 and page["limit"] == 500
    assert all(event["org_id"] == tenant.org_id for event in events)

    # Newest first: every change in the order it happened, read backwards (the fixture's user.added first).
    expected = [
        "org.created", "user.added", "user.added", "user.added",
        "channel.created", "channel.created", "device.created", "device.created", "device.state_changed",
        "device.channels_changed", "device.updated", "channel.updated", "bootstrap.succeeded", "bootstrap.failed",
        "user.added", "user.role_changed", "user.removed", "device.deleted", "channel.deleted",
    ]
    assert kinds(page) == list(reversed(expected))
    ids = [event["id"] for event in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    times = [when(event) for event in events]
    assert times == sorted(times, reverse=True)
    assert all(moment.tzinfo is not None for moment in times)

    member, admin = email_of(tenant.member), email_of(tenant.admin)
    device_id = story["device"]["id"]
    by_kind = {event["kind"]: event for event in events}
    state = by_kind["device.state_changed"]
    assert state["device_id"] == device_id and state["actor"] == member and state["outcome"] == "ok"
    assert state["detail"]["previous"] == 0 and state["detail"]["state"] == 1
    assert state["detail"]["channels"] == [story["channel"]["id"]]
    channels = by_kind["device.channels_changed"]
    assert channels["detail"]["added"] == [story["second"]["id"]] and channels["detail"]["removed"] == []
    assert channels["detail"]["connected"] is True
    assert by_kind["device.updated"]["detail"]["fields"] == ["alias"]
    assert by_kind["device.deleted"]["device_id"] == story["other_device"]["id"]
    assert by_kind["channel.deleted"]["detail"]["channel_id"] == story["second"]["id"]
    assert by_kind["user.role_changed"]["actor"] == admin
    assert by_kind["user.role_changed"]["detail"] == {"user_id": story["user"]["id"], "role": "viewer"}
    assert by_kind["user.removed"]["detail"]["user_id"] == story["user"]["id"]
    assert by_kind["org.created"]["detail"]["name"] == tenant.name
    succeeded, failed = by_kind["bootstrap.succeeded"], by_kind["bootstrap.failed"]
    assert succeeded["device_id"] == failed["device_id"] == device_id
    assert succeeded["actor"] == failed["actor"] == f"device:{story['external_id']}"
    assert failed["outcome"] == "refused" and failed["reason"] == "wrong external key"
    assert succeeded["detail"]["door"] == "magistrala"


def test_event_filters(server: ServerProcess, tenant: Tenant) -> None:
    story = activity(server, tenant)
    everything = events_of(tenant.viewer, tenant.org_id)["events"]
    device_id = story["device"]["id"]

    by_device = events_of(tenant.viewer, tenant.org_id, device_id=device_id)
    assert by_device["total"] == len(by_device["events"]) > 0
    assert by_device["events"] == [event for event in everything if event["device_id"] == device_id]
    assert kinds(by_device) == [
        "bootstrap.failed", "bootstrap.succeeded", "device.updated", "device.channels_changed", "device.state_changed",
        "device.created",
    ]
    assert events_of(tenant.viewer, tenant.org_id, device_id=str(uuid.uuid4()))["total"] == 0

    exact = events_of(tenant.viewer, tenant.org_id, kind="device.state_changed")
    assert kinds(exact) == ["device.state_changed"]
    prefix = events_of(tenant.viewer, tenant.org_id, kind="device.")
    assert prefix["events"] == [event for event in everything if event["kind"].startswith("device.")]
    assert set(kinds(prefix)) == {"device.created", "device.state_changed", "device.channels_changed", "device.updated",
                                  "device.deleted"}
    assert kinds(events_of(tenant.viewer, tenant.org_id, kind="user.")).count("user.added") == 4
    # Without the trailing dot a kind is matched exactly; LIKE wildcards match nothing.
    for literal in ("device", "device.state", "%", "%.", "_evice.", "device.%", "bootstrap._"):
        assert events_of(tenant.viewer, tenant.org_id, kind=literal)["total"] == 0, literal

    bootstraps = events_of(tenant.viewer, tenant.org_id, kind="bootstrap.", device_id=device_id, outcome="ok")
    assert kinds(bootstraps) == ["bootstrap.succeeded"]
    refusals = events_of(tenant.viewer, tenant.org_id, outcome="refused")
    assert kinds(refusals) == ["bootstrap.failed"]
    assert refusals["events"][0]["reason"] == "wrong external key"
    assert events_of(tenant.viewer, tenant.org_id, outcome="ok")["total"] == len(everything) - 1

    # since is inclusive, until exclusive; both accept any ISO 8601 offset.
    middle = everything[len(everything) // 2]
    moment = when(middle)
    newer = [event for event in everything if when(event) >= moment]
    older = [event for event in everything if when(event) < moment]
    assert newer and older
    plus_two = moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None).isoformat()  # timestamps without an offset are UTC
    for since in (middle["created_at"], moment.isoformat(), plus_two, naive_utc):
        assert events_of(tenant.viewer, tenant.org_id, since=since)["events"] == newer, since
        assert events_of(tenant.viewer, tenant.org_id, until=since)["events"] == older, since
    window = events_of(tenant.viewer, tenant.org_id, since=when(older[0]).isoformat(), until=moment.isoformat())
    assert window["events"] == [event for event in everything if when(older[0]) <= when(event) < moment]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert events_of(tenant.viewer, tenant.org_id, since=future)["total"] == 0
    assert events_of(tenant.viewer, tenant.org_id, until=future)["total"] == len(everything)

    # Paging keeps the total and walks the same newest-first order.
    pages = []
    for offset in range(0, len(everything), 4):
        page = events_of(tenant.viewer, tenant.org_id, offset=offset, limit=4)
        assert page["total"] == len(everything) and page["offset"] == offset and page["limit"] == 4
        assert len(page["events"]) <= 4
        pages.extend(page["events"])
    assert pages == everything
    beyond = events_of(tenant.viewer, tenant.org_id, offset=len(everything))
    assert beyond["events"] == [] and beyond["total"] == len(everything)
    default = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/events")
    assert ok(default)["limit"] == 50


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 501}, {"offset": -1}, {"since": "yesterday"}, {"until": "2024-13-01T00:00:00Z"},
     {"kind": "k" * 65}],
    ids=["limit-0", "limit-501", "negative-offset", "bad-since", "bad-until", "long-kind"],
)
def test_bad_event_queries_are_refused(root: Api, tenant: Tenant, params: dict[str, Any]) -> None:
    for client, path in ((tenant.viewer, f"/api/v1/orgs/{tenant.org_id}/events"), (root, "/api/v1/events")):
        response = client.get(path, params=params)
        assert response.status_code in (400, 422), (response.status_code, response.text)
        body = json_of(response)
        assert body.get("field") == next(iter(params)), body
        assert body.get("detail"), body
        assert "events" not in body


def test_events_of_another_org_are_404(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    for client in (other_tenant.admin, other_tenant.member, other_tenant.viewer):
        refused(client.get(f"/api/v1/orgs/{tenant.org_id}/events"), 404)
    refused(tenant.admin.get(f"/api/v1/orgs/{uuid.uuid4()}/events"), 404)
    for client in (tenant.admin, tenant.member, tenant.viewer, root):
        assert client.get(f"/api/v1/orgs/{tenant.org_id}/events").status_code == 200
    # One org's events never show up in another's.
    theirs = events_of(other_tenant.admin, other_tenant.org_id)["events"]
    assert theirs and all(event["org_id"] == other_tenant.org_id for event in theirs)
    with Api(server.url) as anonymous:
        assert anonymous.get(f"/api/v1/orgs/{tenant.org_id}/events").status_code == 401


def test_deployment_events_are_for_root_only(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    unknown = unique("unknown")
    response = httpx.get(f"{server.url}/clients/bootstrap/{unknown}", headers={"Authorization": "Client whatever"}, timeout=30)
    assert response.status_code == 404, response.text
    ok(tenant.member.post(f"/api/v1/orgs/{tenant.org_id}/channels", json={"name": unique("c")}), 201)
    ok(other_tenant.member.post(f"/api/v1/orgs/{other_tenant.org_id}/channels", json={"name": unique("c")}), 201)

    page = events_of(root, since=started.isoformat())
    orgs = {event["org_id"] for event in page["events"]}
    assert {tenant.org_id, other_tenant.org_id} <= orgs
    [stray] = [event for event in page["events"] if event["actor"] == f"device:{unknown}"]
    assert stray["org_id"] is None and stray["device_id"] is None
    assert stray["kind"] == "bootstrap.failed" and stray["outcome"] == "refused" and stray["reason"] == "unknown external_id"
    # The stray attempt belongs to no organisation, so no org lists it.
    assert f"device:{unknown}" not in json.dumps(events_of(tenant.admin, tenant.org_id))

    channels = events_of(root, since=started.isoformat(), kind="channel.created")
    assert {event["org_id"] for event in channels["events"]} >= {tenant.org_id, other_tenant.org_id}
    assert set(kinds(channels)) == {"channel.created"}
    refusals = events_of(root, since=started.isoformat(), outcome="refused")
    assert stray in refusals["events"] and set(kinds(refusals)) == {"bootstrap.failed"}
    ids = [event["id"] for event in page["events"]]
    assert ids == sorted(ids, reverse=True)
    two = events_of(root, since=started.isoformat(), limit=2)
    assert two["events"] == page["events"][:2] and two["total"] == page["total"]

    for client in (tenant.admin, tenant.member, tenant.viewer):
        refused(client.get("/api/v1/events"), 403)
    with Api(server.url) as anonymous:
        assert anonymous.get("/api/v1/events").status_code == 401


def test_secrets_never_reach_events_or_the_log(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    from pilotboat.security.secure_bootstrap import encrypt, magistrala_key

    started = datetime.now(UTC) - timedelta(seconds=1)
    base = f"/api/v1/orgs/{tenant.org_id}"
    secrets: list[str] = []

    def secret(prefix: str) -> str:
        value = unique(prefix)
        secrets.append(value)
        return value

    external_id, external_key = unique("ext"), secret("extkey")
    client_key = f"-----BEGIN PRIVATE KEY-----\n{secret('clientkey')}\n-----END PRIVATE KEY-----"
    channel = ok(tenant.admin.post(f"{base}/channels", json={"name": unique("c")}), 201)
    device = ok(
        tenant.admin.post(
            f"{base}/devices",
            json={"name": unique("dev"), "external_id": external_id, "external_key": external_key, "client_key": client_key,
                  "state": 1, "channels": [channel["id"]], "content": "non-secret content"},
        ),
        201,
    )
    secrets.append(device["client_secret"])
    assert device["has_client_key"] is True
    assert client_key not in json.dumps(device) and external_key not in json.dumps(device)

    def bootstrap(path: str, authorization: str) -> httpx.Response:
        return httpx.get(f"{server.url}{path}", headers={"Authorization": authorization}, timeout=30)

    plain = bootstrap(f"/clients/bootstrap/{external_id}", f"Client {external_key}")
    assert plain.status_code == 200, plain.text
    assert plain.json()["client_secret"] == device["client_secret"]
    assert plain.json()["client_key"] == client_key
    mainflux = bootstrap(f"/things/bootstrap/{external_id}", f"Thing {external_key}")
    assert mainflux.status_code == 200, mainflux.text
    assert mainflux.json()["mainflux_key"] == device["client_secret"]
    sealed_key = encrypt(magistrala_key(ENCRYPT_KEY), external_key.encode()).hex()
    secure = bootstrap(f"/clients/bootstrap/secure/{external_id}", f"Client {sealed_key}")
    assert secure.status_code == 200, secure.text
    wrong_key = secret("wrongkey")
    assert bootstrap(f"/clients/bootstrap/{external_id}", f"Client {wrong_key}").status_code == 403
    wrong_sealed = encrypt(magistrala_key(ENCRYPT_KEY), secret("wrongsealed").encode()).hex()
    assert bootstrap(f"/clients/bootstrap/secure/{external_id}", f"Client {wrong_sealed}").status_code == 403
    assert bootstrap(f"/clients/bootstrap/{unique('nobody')}", f"Client {secret('strangerkey')}").status_code == 404

    new_key = secret("newkey")
    ok(tenant.admin.patch(f"{base}/devices/{device['id']}", json={"external_key": new_key}))
    assert bootstrap(f"/clients/bootstrap/{external_id}", f"Client {new_key}").status_code == 200

    password = secret("password")
    ok(tenant.admin.post(f"{base}/users", json={"email": f"{unique('u')}@pilotboat.test", "password": password}), 201)
    refused(httpx.post(f"{server.url}/api/v1/auth/token", data={"username": email_of(tenant.admin), "password": password},
                       timeout=30), 401)
    api_key = ok(tenant.admin.post("/api/v1/api-keys", json={"name": unique("k"), "org_id": tenant.org_id}), 201)
    secrets.append(api_key["key"])
    secrets.append(api_key["key"].split("_", 2)[2])
    with Api(server.url, api_key["key"]) as keyed:
        assert keyed.get(f"{base}/devices").status_code == 200

    org_page = events_of(root, tenant.org_id)
    system_page = events_of(root, since=started.isoformat())
    recorded = {event["kind"] for event in org_page["events"]}
    assert {"device.created", "device.updated", "bootstrap.succeeded", "bootstrap.failed", "user.added",
            "apikey.created"} <= recorded
    doors = {event["detail"].get("door") for event in org_page["events"] if event["kind"] == "bootstrap.succeeded"}
    assert doors == {"magistrala", "mainflux", "magistrala-secure"}
    updated = [event for event in org_page["events"] if event["kind"] == "device.updated"]
    assert updated[0]["detail"]["fields"] == ["external_key"]  # the field name, never its value

    everything = json.dumps(org_page) + json.dumps(system_page)
    log = server.log()
    assert external_id in everything and device["id"] in log  # the search really looks at the right places
    for value in secrets:
        assert value not in everything, value
        assert value not in log, value
    assert sealed_key not in log and wrong_sealed not in log
