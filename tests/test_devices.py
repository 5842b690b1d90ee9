"""Native devices API (``/api/v1/orgs/{org}/devices``) through a real server, on each database backend.

Secrets: the client secret is shown once (create response); ``external_key`` is stored as a digest and
``client_key`` sealed, so neither is ever returned by the native API (``has_client_key`` says whether a
client key is set). ``external_id`` and ``endpoint`` are unique in the whole deployment.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from contextlib import closing
from datetime import datetime
from typing import Any

import httpx
import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant

DEVICE_FIELDS = {
    "id", "name", "external_id", "endpoint", "mac_address", "serial_number", "imei", "alias", "content",
    "client_cert", "ca_cert", "has_client_key", "state", "channels", "management_server_id", "last_bootstrap_at",
    "last_bootstrap", "created_at", "updated_at",
}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def devices(org_id: str, suffix: str = "") -> str:
    return f"/api/v1/orgs/{org_id}/devices{suffix}"


def create(client: Api, org_id: str, **fields: Any) -> dict[str, Any]:
    response = client.post(devices(org_id), json=fields)
    assert response.status_code == 201, response.text
    return response.json()


def get(client: Api, org_id: str, device_id: str) -> dict[str, Any]:
    response = client.get(devices(org_id, f"/{device_id}"))
    assert response.status_code == 200, response.text
    return response.json()


def listing(client: Api, org_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(devices(org_id), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def listed_ids(client: Api, org_id: str, **params: Any) -> list[str]:
    return [device["id"] for device in listing(client, org_id, limit=100, **params)["devices"]]


def new_channel(client: Api, org_id: str, name: str | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post(f"/api/v1/orgs/{org_id}/channels", json={"name": name or uid("chan"), "metadata": metadata or {}})
    assert response.status_code == 201, response.text
    return response.json()


def event_total(client: Api, org_id: str, **params: Any) -> int:
    response = client.get(f"/api/v1/orgs/{org_id}/events", params={"limit": 1, **params})
    assert response.status_code == 200, response.text
    return response.json()["total"]


def bootstrap(server: ServerProcess, external_id: str, key: str) -> httpx.Response:
    return httpx.get(f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": f"Client {key}"}, timeout=30)


def assert_native_error(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    if field is not None:
        assert body.get("field") == field, body
    return body["detail"]


def full_fields(channels: list[str]) -> dict[str, Any]:
    return {
        "name": uid("Meter"),
        "external_id": uid("ext"),
        "external_key": uid("extkey"),
        "endpoint": uid("urn:dev"),
        "mac_address": "02:00:5e:10:00:01",
        "serial_number": uid("SN"),
        "imei": "356938035643809",
        "alias": "boiler room",
        "content": '{"server": "coaps://lwm2m.example:5684"}',
        "client_cert": "-----BEGIN CERTIFICATE-----\nMIIBclient\n-----END CERTIFICATE-----\n",
        "client_key": "-----BEGIN PRIVATE KEY-----\n" + uuid.uuid4().hex + "\n-----END PRIVATE KEY-----\n",
        "ca_cert": "-----BEGIN CERTIFICATE-----\nMIIBca\n-----END CERTIFICATE-----\n",
        "state": 1,
        "channels": channels,
    }


# --- create and read -----------------------------------------------------------------------------


def test_create_minimal_device(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id)
    assert set(created) == DEVICE_FIELDS | {"client_secret"}
    assert str(uuid.UUID(created["id"])) == created["id"]
    assert isinstance(created["client_secret"], str) and len(created["client_secret"]) >= 32
    assert created["name"] == "" and created["content"] == "" and created["client_cert"] == "" and created["ca_cert"] == ""
    for field in ("external_id", "endpoint", "mac_address", "serial_number", "imei", "alias", "last_bootstrap_at"):
        assert created[field] is None, field
    assert created["has_client_key"] is False
    assert created["state"] == 0
    assert created["channels"] == []

    fetched = get(tenant.admin, tenant.org_id, created["id"])
    assert set(fetched) == DEVICE_FIELDS
    assert fetched == {key: value for key, value in created.items() if key != "client_secret"}


def test_create_with_every_field(server: ServerProcess, tenant: Tenant) -> None:
    first = new_channel(tenant.admin, tenant.org_id, name="b-" + uid("chan"), metadata={"topic": "telemetry", "qos": 1})
    second = new_channel(tenant.admin, tenant.org_id, name="a-" + uid("chan"))
    fields = full_fields([first["id"], second["id"]])
    created = create(tenant.member, tenant.org_id, **fields)

    for name in ("name", "external_id", "endpoint", "mac_address", "serial_number", "imei", "alias", "content",
                 "client_cert", "ca_cert", "state"):
        assert created[name] == fields[name], name
    assert created["has_client_key"] is True
    assert "external_key" not in created and "client_key" not in created
    assert fields["external_key"] not in created.values() and fields["client_key"] not in created.values()
    # channels come back sorted by name, with their metadata, connected because the device is active
    assert created["channels"] == [
        {"id": second["id"], "name": second["name"], "metadata": {}, "connected": True},
        {"id": first["id"], "name": first["name"], "metadata": {"topic": "telemetry", "qos": 1}, "connected": True},
    ]

    fetched = tenant.viewer.get(devices(tenant.org_id, f"/{created['id']}"))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == {key: value for key, value in created.items() if key != "client_secret"}
    for secret in (fields["external_key"], fields["client_key"], created["client_secret"]):
        assert secret not in fetched.text
        assert secret not in tenant.admin.get(devices(tenant.org_id), params={"limit": 100}).text

    # the device bootstraps with what was stored
    answer = bootstrap(server, fields["external_id"], fields["external_key"])
    assert answer.status_code == 200, answer.text
    config = answer.json()
    assert config["client_id"] == created["id"]
    assert config["client_secret"] == created["client_secret"]
    assert config["client_key"] == fields["client_key"]
    assert (config["content"], config["client_cert"], config["ca_cert"]) == (fields["content"], fields["client_cert"], fields["ca_cert"])
    assert {channel["id"] for channel in config["channels"]} == {first["id"], second["id"]}
    assert get(tenant.admin, tenant.org_id, created["id"])["last_bootstrap_at"] is not None


def test_every_create_gets_its_own_id_and_secret(tenant: Tenant) -> None:
    made = [create(tenant.admin, tenant.org_id, name="same") for _ in range(3)]
    assert len({device["id"] for device in made}) == 3
    assert len({device["client_secret"] for device in made}) == 3


def test_create_records_one_event(tenant: Tenant) -> None:
    before = event_total(tenant.admin, tenant.org_id, kind="device.created")
    created = create(tenant.admin, tenant.org_id, name=uid("dev"))
    assert event_total(tenant.admin, tenant.org_id, kind="device.created") == before + 1
    assert event_total(tenant.admin, tenant.org_id, device_id=created["id"]) == 1


def test_viewer_cannot_write_and_nothing_is_created(tenant: Tenant) -> None:
    device = create(tenant.admin, tenant.org_id, name="kept")
    assert_native_error(tenant.viewer.post(devices(tenant.org_id), json={"name": "nope"}), 403)
    assert_native_error(tenant.viewer.patch(devices(tenant.org_id, f"/{device['id']}"), json={"name": "changed"}), 403)
    assert_native_error(tenant.viewer.delete(devices(tenant.org_id, f"/{device['id']}")), 403)
    assert_native_error(tenant.viewer.put(devices(tenant.org_id, f"/{device['id']}/state"), json={"state": 1}), 403)
    assert listed_ids(tenant.admin, tenant.org_id) == [device["id"]]
    assert get(tenant.admin, tenant.org_id, device["id"])["name"] == "kept"


def test_unknown_device_is_404(tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)
    for device_id in (str(uuid.uuid4()), "not-a-uuid"):
        assert assert_native_error(tenant.admin.get(devices(tenant.org_id, f"/{device_id}")), 404) == "device not found"
        assert_native_error(tenant.admin.patch(devices(tenant.org_id, f"/{device_id}"), json={"name": "x"}), 404)
        assert_native_error(tenant.admin.delete(devices(tenant.org_id, f"/{device_id}")), 404)
        assert_native_error(tenant.admin.put(devices(tenant.org_id, f"/{device_id}/state"), json={"state": 1}), 404)
        assert_native_error(tenant.admin.put(devices(tenant.org_id, f"/{device_id}/channels"), json={"channels": [channel["id"]]}), 404)
    assert listing(tenant.admin, tenant.org_id)["total"] == 0


def test_devices_of_another_organisation_are_invisible(tenant: Tenant, other_tenant: Tenant) -> None:
    device = create(tenant.admin, tenant.org_id, name=uid("mine"))
    # through the other organisation's own path: not found
    assert_native_error(other_tenant.admin.get(devices(other_tenant.org_id, f"/{device['id']}")), 404)
    assert_native_error(other_tenant.admin.delete(devices(other_tenant.org_id, f"/{device['id']}")), 404)
    assert_native_error(other_tenant.admin.patch(devices(other_tenant.org_id, f"/{device['id']}"), json={"name": "x"}), 404)
    assert listing(other_tenant.admin, other_tenant.org_id)["total"] == 0
    # through this organisation's path, as a non-member: the organisation itself is not found
    assert_native_error(other_tenant.admin.get(devices(tenant.org_id, f"/{device['id']}")), 404)
    assert_native_error(other_tenant.admin.get(devices(tenant.org_id)), 404)
    assert get(tenant.admin, tenant.org_id, device["id"])["name"] == device["name"]


# --- list ----------------------------------------------------------------------------------------


def test_list_pagination(tenant: Tenant) -> None:
    made = [create(tenant.admin, tenant.org_id, name=f"dev-{index}")["id"] for index in range(7)]

    default = listing(tenant.admin, tenant.org_id)
    assert (default["total"], default["offset"], default["limit"]) == (7, 0, 10)
    assert [device["id"] for device in default["devices"]] == made  # creation order
    assert all("client_secret" not in device for device in default["devices"])

    pages = []
    for offset in range(0, 7, 3):
        page = listing(tenant.admin, tenant.org_id, offset=offset, limit=3)
        assert (page["total"], page["offset"], page["limit"]) == (7, offset, 3)
        pages.extend(device["id"] for device in page["devices"])
    assert pages == made
    assert len(listing(tenant.admin, tenant.org_id, offset=6, limit=3)["devices"]) == 1
    beyond = listing(tenant.admin, tenant.org_id, offset=50, limit=3)
    assert beyond["total"] == 7 and beyond["devices"] == []
    assert len(listing(tenant.admin, tenant.org_id, limit=100)["devices"]) == 7


BAD_QUERIES: list[tuple[dict[str, Any], str]] = [
    ({"limit": 101}, "limit"),
    ({"limit": 0}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"offset": -1}, "offset"),
    ({"state": 2}, "state"),
    ({"state": "on"}, "state"),
    ({"name": "x" * 257}, "name"),
]


def test_list_rejects_bad_query(tenant: Tenant) -> None:
    for params, field in BAD_QUERIES:
        assert_native_error(tenant.admin.get(devices(tenant.org_id), params=params), 422, field)
    assert listing(tenant.admin, tenant.org_id, limit=100)["limit"] == 100


def test_list_filters(tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)
    other_channel = new_channel(tenant.admin, tenant.org_id)
    tag = uuid.uuid4().hex[:8]
    alpha = create(
        tenant.admin, tenant.org_id, name=f"Alpha Meter {tag}", state=1, external_id=uid("ext"), external_key="k",
        endpoint=uid("ep"), mac_address="02:00:00:00:00:0a", serial_number=uid("SN"), imei="490154203237518",
        channels=[channel["id"]],
    )
    beta = create(
        tenant.admin, tenant.org_id, name=f"beta meter {tag}", state=0, external_id=uid("ext"), external_key="k",
        endpoint=uid("ep"), mac_address="02:00:00:00:00:0b", serial_number=uid("SN"), imei="356938035643809",
        channels=[other_channel["id"]],
    )
    plain = create(tenant.admin, tenant.org_id, name="100%_plain")

    def ids(**params: Any) -> set[str]:
        return set(listed_ids(tenant.admin, tenant.org_id, **params))

    assert ids() == {alpha["id"], beta["id"], plain["id"]}
    # name: partial and case-insensitive; % and _ are literal characters, not wildcards
    assert ids(name="alpha") == {alpha["id"]}
    assert ids(name="METER") == {alpha["id"], beta["id"]}
    assert ids(name=f"TA METER {tag}") == {beta["id"]}
    assert ids(name="%") == {plain["id"]}
    assert ids(name="0%_p") == {plain["id"]}
    assert ids(name="_") == {plain["id"]}
    assert ids(name="gamma") == set()
    # state
    assert ids(state=1) == {alpha["id"]}
    assert ids(state=0) == {beta["id"], plain["id"]}
    # exact-match filters
    for field in ("external_id", "endpoint", "mac_address", "serial_number", "imei"):
        assert ids(**{field: alpha[field]}) == {alpha["id"]}, field
        assert ids(**{field: beta[field]}) == {beta["id"]}, field
        assert ids(**{field: alpha[field][:-1]}) == set(), field
    # channel
    assert ids(channel_id=channel["id"]) == {alpha["id"]}
    assert ids(channel_id=other_channel["id"]) == {beta["id"]}
    assert ids(channel_id=str(uuid.uuid4())) == set()
    # combined, and total follows the filter
    assert ids(name="meter", state=0) == {beta["id"]}
    assert ids(name="alpha", state=0) == set()
    assert listing(tenant.admin, tenant.org_id, name="meter", limit=1)["total"] == 2


def test_list_is_per_organisation(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = create(tenant.admin, tenant.org_id, name="shared-name")
    theirs = create(other_tenant.admin, other_tenant.org_id, name="shared-name")
    assert listed_ids(tenant.admin, tenant.org_id, name="shared-name") == [mine["id"]]
    assert listed_ids(other_tenant.admin, other_tenant.org_id, name="shared-name") == [theirs["id"]]


# --- update --------------------------------------------------------------------------------------


def test_patch_changes_only_the_given_fields(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id, name="before", alias="old alias", imei="356938035643809", content="c1")
    changes = {
        "name": "after", "endpoint": uid("ep"), "mac_address": "02:00:00:00:00:ff", "serial_number": uid("SN"),
        "alias": None, "content": "c2", "client_cert": "CERT", "ca_cert": "CA",
    }
    response = tenant.member.patch(devices(tenant.org_id, f"/{created['id']}"), json=changes)
    assert response.status_code == 200, response.text
    patched = response.json()
    for field, value in changes.items():
        assert patched[field] == value, field
    assert patched["imei"] == "356938035643809"  # untouched
    assert patched["id"] == created["id"] and patched["created_at"] == created["created_at"]
    assert datetime.fromisoformat(patched["updated_at"]) >= datetime.fromisoformat(created["updated_at"])
    assert "client_secret" not in patched
    assert get(tenant.admin, tenant.org_id, created["id"]) == patched

    # an empty patch changes nothing
    response = tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={})
    assert response.status_code == 200, response.text
    assert {key: value for key, value in response.json().items() if key != "updated_at"} == {
        key: value for key, value in patched.items() if key != "updated_at"
    }


def test_patch_and_create_refuse_null_for_required_text(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id, name="kept", content="kept", client_cert="kept", ca_cert="kept")
    for field in ("name", "content", "client_cert", "ca_cert"):
        assert_native_error(tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={field: None}), 422, field)
        assert_native_error(tenant.admin.post(devices(tenant.org_id), json={field: None}), 422, field)
        assert get(tenant.admin, tenant.org_id, created["id"])[field] == "kept"
    assert listing(tenant.admin, tenant.org_id)["total"] == 1


def test_patch_refuses_fields_it_does_not_own(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id)
    unchanged = {key: value for key, value in created.items() if key != "client_secret"}
    for field, value in (("state", 1), ("channels", []), ("client_key", "k"), ("id", "x"), ("has_client_key", True),
                         ("client_secret", "x")):
        response = tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={field: value})
        assert field in assert_native_error(response, 422, field)
    assert get(tenant.admin, tenant.org_id, created["id"]) == unchanged


def test_external_key_rotation(server: ServerProcess, tenant: Tenant) -> None:
    external_id, old_key, new_key = uid("ext"), uid("old"), uid("new")
    created = create(tenant.admin, tenant.org_id, external_id=external_id, external_key=old_key)
    assert bootstrap(server, external_id, old_key).status_code == 403  # inactive

    response = tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={"external_key": new_key})
    assert response.status_code == 200, response.text
    assert old_key not in response.text and new_key not in response.text
    assert bootstrap(server, external_id, new_key).status_code == 403  # still inactive

    assert tenant.admin.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 1}).status_code == 200
    assert bootstrap(server, external_id, old_key).status_code == 403
    answer = bootstrap(server, external_id, new_key)
    assert answer.status_code == 200, answer.text
    assert answer.json()["client_id"] == created["id"]
    assert answer.json()["client_secret"] == created["client_secret"]

    # rotating again: the previous key stops working at once
    newest = uid("newest")
    assert tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={"external_key": newest}).status_code == 200
    assert bootstrap(server, external_id, new_key).status_code == 403
    assert bootstrap(server, external_id, newest).status_code == 200


def test_patch_external_id_needs_an_external_key(server: ServerProcess, tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id, name="keyless")
    external_id = uid("ext")
    response = tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={"external_id": external_id, "name": "renamed"})
    assert_native_error(response, 400, "external_key")
    unchanged = get(tenant.admin, tenant.org_id, created["id"])
    assert unchanged["external_id"] is None and unchanged["name"] == "keyless"

    key = uid("key")
    response = tenant.admin.patch(devices(tenant.org_id, f"/{created['id']}"), json={"external_id": external_id, "external_key": key})
    assert response.status_code == 200, response.text
    assert response.json()["external_id"] == external_id
    tenant.admin.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 1})
    assert bootstrap(server, external_id, key).status_code == 200


# --- delete --------------------------------------------------------------------------------------


def test_delete(server: ServerProcess, tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)
    external_id, endpoint = uid("ext"), uid("ep")
    created = create(tenant.admin, tenant.org_id, external_id=external_id, external_key="k", endpoint=endpoint,
                     state=1, channels=[channel["id"]])
    kept = create(tenant.admin, tenant.org_id, name="kept")

    response = tenant.member.delete(devices(tenant.org_id, f"/{created['id']}"))
    assert response.status_code == 204
    assert response.content == b""
    assert_native_error(tenant.admin.get(devices(tenant.org_id, f"/{created['id']}")), 404)
    assert_native_error(tenant.admin.delete(devices(tenant.org_id, f"/{created['id']}")), 404)
    assert listed_ids(tenant.admin, tenant.org_id) == [kept["id"]]
    assert listed_ids(tenant.admin, tenant.org_id, channel_id=channel["id"]) == []
    assert bootstrap(server, external_id, "k").status_code == 404
    assert event_total(tenant.admin, tenant.org_id, kind="device.deleted", device_id=created["id"]) == 1
    # the channel stays, and the unique values are free again
    assert tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/channels/{channel['id']}").status_code == 200
    again = create(tenant.admin, tenant.org_id, external_id=external_id, external_key="k2", endpoint=endpoint)
    assert again["id"] != created["id"]


# --- state and channels --------------------------------------------------------------------------


def test_state_connects_and_disconnects_channels(server: ServerProcess, tenant: Tenant) -> None:
    first, second = new_channel(tenant.admin, tenant.org_id), new_channel(tenant.admin, tenant.org_id)
    external_id = uid("ext")
    created = create(tenant.admin, tenant.org_id, external_id=external_id, external_key="k", channels=[first["id"], second["id"]])
    assert created["state"] == 0
    assert [link["connected"] for link in created["channels"]] == [False, False]

    response = tenant.member.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 1})
    assert response.status_code == 200, response.text
    active = response.json()
    assert active["state"] == 1
    assert {link["id"]: link["connected"] for link in active["channels"]} == {first["id"]: True, second["id"]: True}
    assert bootstrap(server, external_id, "k").status_code == 200
    assert listed_ids(tenant.admin, tenant.org_id, state=1) == [created["id"]]

    response = tenant.member.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 0})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == 0
    assert [link["connected"] for link in response.json()["channels"]] == [False, False]
    assert bootstrap(server, external_id, "k").status_code == 403
    assert get(tenant.admin, tenant.org_id, created["id"])["state"] == 0

    # setting the same state again is fine
    assert tenant.member.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 0}).status_code == 200
    assert event_total(tenant.admin, tenant.org_id, kind="device.state_changed", device_id=created["id"]) == 3


def test_state_refuses_other_values(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id)
    before = event_total(tenant.admin, tenant.org_id)
    cases: list[tuple[dict[str, Any], set[int], str]] = [
        ({"state": 2}, {400, 422}, "state"),
        ({"state": -1}, {400, 422}, "state"),
        ({"state": "x"}, {422}, "state"),
        ({"state": None}, {422}, "state"),
        ({}, {422}, "state"),
        ({"state": 1, "extra": True}, {422}, "extra"),
    ]
    for body, statuses, field in cases:
        response = tenant.admin.put(devices(tenant.org_id, f"/{created['id']}/state"), json=body)
        assert response.status_code in statuses, (body, response.text)
        assert response.json()["field"] == field, body
    assert get(tenant.admin, tenant.org_id, created["id"])["state"] == 0
    assert event_total(tenant.admin, tenant.org_id) == before


def test_put_channels_follows_state(tenant: Tenant) -> None:
    one, two, three = (new_channel(tenant.admin, tenant.org_id) for _ in range(3))
    created = create(tenant.admin, tenant.org_id)
    path = devices(tenant.org_id, f"/{created['id']}/channels")

    def links(response: httpx.Response) -> dict[str, bool]:
        assert response.status_code == 200, response.text
        return {link["id"]: link["connected"] for link in response.json()["channels"]}

    # inactive: linked but not connected; duplicates collapse
    assert links(tenant.member.put(path, json={"channels": [one["id"], two["id"], one["id"]]})) == {one["id"]: False, two["id"]: False}
    tenant.admin.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 1})
    assert {link["id"]: link["connected"] for link in get(tenant.admin, tenant.org_id, created["id"])["channels"]} == {
        one["id"]: True, two["id"]: True,
    }
    # active: a new channel is connected at once, a dropped one goes
    assert links(tenant.member.put(path, json={"channels": [two["id"], three["id"]]})) == {two["id"]: True, three["id"]: True}
    assert listed_ids(tenant.admin, tenant.org_id, channel_id=one["id"]) == []
    assert listed_ids(tenant.admin, tenant.org_id, channel_id=three["id"]) == [created["id"]]
    tenant.admin.put(devices(tenant.org_id, f"/{created['id']}/state"), json={"state": 0})
    assert links(tenant.member.put(path, json={"channels": [one["id"], three["id"]]})) == {one["id"]: False, three["id"]: False}
    # emptied
    assert links(tenant.member.put(path, json={"channels": []})) == {}
    assert get(tenant.admin, tenant.org_id, created["id"])["channels"] == []


def test_put_channels_refuses_unknown_and_foreign_channels(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = new_channel(tenant.admin, tenant.org_id)
    foreign = new_channel(other_tenant.admin, other_tenant.org_id)
    created = create(tenant.admin, tenant.org_id, channels=[mine["id"]])
    path = devices(tenant.org_id, f"/{created['id']}/channels")
    before = event_total(tenant.admin, tenant.org_id)

    missing = str(uuid.uuid4())
    detail = assert_native_error(tenant.admin.put(path, json={"channels": [missing]}), 404)
    assert missing in detail
    assert_native_error(tenant.admin.put(path, json={"channels": [foreign["id"]]}), 404)
    assert_native_error(tenant.admin.put(path, json={"channels": [mine["id"], missing]}), 404)
    assert_native_error(tenant.admin.put(path, json={"channels": [""]}), 400, "channels")
    assert_native_error(tenant.admin.put(path, json={"channels": "notalist"}), 422, "channels")
    assert_native_error(tenant.admin.put(path, json={}), 422, "channels")
    assert [link["id"] for link in get(tenant.admin, tenant.org_id, created["id"])["channels"]] == [mine["id"]]
    assert event_total(tenant.admin, tenant.org_id) == before


def test_create_with_unknown_channel_creates_nothing(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = new_channel(tenant.admin, tenant.org_id)
    foreign = new_channel(other_tenant.admin, other_tenant.org_id)
    external_id, endpoint = uid("ext"), uid("ep")
    before = event_total(tenant.admin, tenant.org_id)
    for channels in ([str(uuid.uuid4())], [mine["id"], foreign["id"]]):
        response = tenant.admin.post(devices(tenant.org_id), json={
            "external_id": external_id, "external_key": "k", "endpoint": endpoint, "channels": channels,
        })
        assert_native_error(response, 404)
    assert listing(tenant.admin, tenant.org_id)["total"] == 0
    assert event_total(tenant.admin, tenant.org_id) == before
    # nothing half-written holds the unique values
    created = create(tenant.admin, tenant.org_id, external_id=external_id, external_key="k", endpoint=endpoint, channels=[mine["id"]])
    assert [link["id"] for link in created["channels"]] == [mine["id"]]


# --- uniqueness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["external_id", "endpoint"])
def test_unique_in_the_whole_deployment(tenant: Tenant, other_tenant: Tenant, field: str) -> None:
    value = uid(field)
    extra = {"external_key": "k"} if field == "external_id" else {}
    first = create(tenant.admin, tenant.org_id, **{field: value}, **extra)

    same_org = tenant.admin.post(devices(tenant.org_id), json={field: value, **extra})
    assert field in assert_native_error(same_org, 409, field)
    other_org = other_tenant.admin.post(devices(other_tenant.org_id), json={field: value, **extra})
    assert value in assert_native_error(other_org, 409, field)
    assert listing(tenant.admin, tenant.org_id)["total"] == 1
    assert listing(other_tenant.admin, other_tenant.org_id)["total"] == 0

    # PATCH onto a value in use elsewhere is refused too; keeping one's own value is not a conflict
    theirs = create(other_tenant.admin, other_tenant.org_id, name="theirs")
    assert_native_error(other_tenant.admin.patch(devices(other_tenant.org_id, f"/{theirs['id']}"), json={field: value, **extra}), 409, field)
    assert get(other_tenant.admin, other_tenant.org_id, theirs["id"])[field] is None
    response = tenant.admin.patch(devices(tenant.org_id, f"/{first['id']}"), json={field: value, "name": "still mine"})
    assert response.status_code == 200, response.text
    assert response.json()[field] == value


def test_failed_second_unique_check_leaves_no_device(tenant: Tenant, other_tenant: Tenant) -> None:
    endpoint = uid("ep")
    create(other_tenant.admin, other_tenant.org_id, endpoint=endpoint)
    external_id = uid("ext")
    before = event_total(tenant.admin, tenant.org_id)
    response = tenant.admin.post(devices(tenant.org_id), json={"external_id": external_id, "external_key": "k", "endpoint": endpoint})
    assert_native_error(response, 409, "endpoint")
    assert listing(tenant.admin, tenant.org_id)["total"] == 0
    assert event_total(tenant.admin, tenant.org_id) == before
    # the external_id that passed its own check was not kept
    create(tenant.admin, tenant.org_id, external_id=external_id, external_key="k")


def test_case_and_whitespace_make_distinct_external_ids(tenant: Tenant) -> None:
    base = uid("Ext")
    for value in (base, base.lower(), base.upper(), f" {base}"):
        create(tenant.admin, tenant.org_id, external_id=value, external_key="k")
    assert listing(tenant.admin, tenant.org_id)["total"] == 4


@pytest.mark.parametrize("field", ["external_id", "endpoint"])
def test_parallel_creates_with_the_same_unique_value(server: ServerProcess, tenant: Tenant, other_tenant: Tenant, field: str) -> None:
    value = uid(field)
    workers = 10
    barrier = threading.Barrier(workers)
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    tokens = [(tenant, tenant.admin.headers["authorization"]), (other_tenant, other_tenant.admin.headers["authorization"])]

    def attempt(index: int) -> None:
        owner, authorization = tokens[index % 2]  # the race spans two organisations
        body = {field: value, "name": f"racer-{index}"}
        if field == "external_id":
            body["external_key"] = f"key-{index}"
        with httpx.Client(base_url=server.url, headers={"Authorization": authorization}, timeout=60) as client:
            barrier.wait(timeout=30)
            response = client.post(devices(owner.org_id), json=body)
        with lock:
            results.append((response.status_code, response.text))

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == workers, results
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * (workers - 1), results
    for status, text in results:
        if status == 409:
            assert field in text, text

    found = listing(tenant.admin, tenant.org_id, **{field: value})["total"] + listing(other_tenant.admin, other_tenant.org_id, **{field: value})["total"]
    assert found == 1
    created = (
        event_total(tenant.admin, tenant.org_id, kind="device.created")
        + event_total(other_tenant.admin, other_tenant.org_id, kind="device.created")
    )
    assert created == 1


# --- secrets at rest -----------------------------------------------------------------------------


def test_secrets_are_not_stored_in_plaintext(server_factory: Any) -> None:
    process: ServerProcess = server_factory("sqlite")
    process.start()
    marker = uuid.uuid4().hex
    client_key = f"-----BEGIN EC PRIVATE KEY-----\nclientkey{marker}\n-----END EC PRIVATE KEY-----\n"
    external_key = f"extkey{uuid.uuid4().hex}"
    external_id = uid("ext")
    with Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        tenant = make_tenant(process.url, root)
        try:
            created = create(tenant.admin, tenant.org_id, external_id=external_id, external_key=external_key,
                             client_key=client_key, state=1, name=f"name{marker[:8]}")
            assert created["has_client_key"] is True
            answer = bootstrap(process, external_id, external_key)
            assert answer.status_code == 200, answer.text
            assert answer.json()["client_key"] == client_key

            database = process.data_dir / "pilotboat.db"
            assert database.exists()
            with closing(sqlite3.connect(database)) as connection:
                dump = "\n".join(connection.iterdump())
        finally:
            tenant.close()
    # the dump is the real one: it holds the device's plain fields
    assert created["id"] in dump and external_id in dump and f"name{marker[:8]}" in dump
    for secret in (client_key, f"clientkey{marker}", external_key, created["client_secret"]):
        assert secret not in dump

    process.stop()  # checkpoints the write-ahead log into the file
    for path in process.data_dir.iterdir():
        if path.name.startswith("pilotboat.db") or path.name == "server.log":
            raw = path.read_bytes()
            for secret in (f"clientkey{marker}", external_key, created["client_secret"]):
                assert secret.encode() not in raw, (path.name, secret)
