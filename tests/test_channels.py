"""Native channels API (``/api/v1/orgs/{org}/channels``) through a real server, on each database backend."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from harness import ServerProcess, Tenant

CHANNEL_FIELDS = {"id", "name", "metadata", "created_at"}
METADATA = {
    "topic": "devices/telemetry",
    "qos": 1,
    "ratio": 0.25,
    "retain": False,
    "nothing": None,
    "tags": ["a", "b", 3],
    "nested": {"deeper": {"list": [{"k": "v"}], "empty": {}}},
    "unicode": "Zürich – 東京 🚢",
}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def channels(org_id: str, suffix: str = "") -> str:
    return f"/api/v1/orgs/{org_id}/channels{suffix}"


def create(client: httpx.Client, org_id: str, **body: Any) -> dict[str, Any]:
    response = client.post(channels(org_id), json=body)
    assert response.status_code == 201, response.text
    return response.json()


def get(client: httpx.Client, org_id: str, channel_id: str) -> dict[str, Any]:
    response = client.get(channels(org_id, f"/{channel_id}"))
    assert response.status_code == 200, response.text
    return response.json()


def listing(client: httpx.Client, org_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(channels(org_id), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def event_total(client: httpx.Client, org_id: str, **params: Any) -> int:
    response = client.get(f"/api/v1/orgs/{org_id}/events", params={"limit": 1, **params})
    assert response.status_code == 200, response.text
    return response.json()["total"]


def assert_native_error(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    if field is not None:
        assert body.get("field") == field, body


def test_create_and_get(tenant: Tenant) -> None:
    name = uid("Telemetry")
    created = create(tenant.member, tenant.org_id, name=name, metadata=METADATA)
    assert set(created) == CHANNEL_FIELDS
    assert str(uuid.UUID(created["id"])) == created["id"]
    assert created["name"] == name
    assert created["metadata"] == METADATA
    assert get(tenant.viewer, tenant.org_id, created["id"]) == created


def test_create_with_defaults(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id)
    assert (created["name"], created["metadata"]) == ("", {})
    assert get(tenant.admin, tenant.org_id, created["id"]) == created


def test_names_need_not_be_unique(tenant: Tenant) -> None:
    first = create(tenant.admin, tenant.org_id, name="same")
    second = create(tenant.admin, tenant.org_id, name="same")
    assert first["id"] != second["id"]
    assert listing(tenant.admin, tenant.org_id, name="same")["total"] == 2


def test_create_records_an_event(tenant: Tenant) -> None:
    before = event_total(tenant.admin, tenant.org_id, kind="channel.created")
    create(tenant.admin, tenant.org_id, name="evented")
    assert event_total(tenant.admin, tenant.org_id, kind="channel.created") == before + 1


def test_unknown_channel_is_404(tenant: Tenant) -> None:
    for channel_id in (str(uuid.uuid4()), "not-a-uuid"):
        assert_native_error(tenant.admin.get(channels(tenant.org_id, f"/{channel_id}")), 404)
        assert_native_error(tenant.admin.patch(channels(tenant.org_id, f"/{channel_id}"), json={"name": "x"}), 404)
        assert_native_error(tenant.admin.delete(channels(tenant.org_id, f"/{channel_id}")), 404)
    assert listing(tenant.admin, tenant.org_id)["total"] == 0


def test_channels_of_another_organisation_are_invisible(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = create(tenant.admin, tenant.org_id, name="mine", metadata={"a": 1})
    path = channels(other_tenant.org_id, f"/{mine['id']}")
    assert_native_error(other_tenant.admin.get(path), 404)
    assert_native_error(other_tenant.admin.patch(path, json={"name": "stolen"}), 404)
    assert_native_error(other_tenant.admin.delete(path), 404)
    assert_native_error(other_tenant.admin.get(channels(tenant.org_id, f"/{mine['id']}")), 404)  # not a member
    assert listing(other_tenant.admin, other_tenant.org_id)["total"] == 0
    assert get(tenant.admin, tenant.org_id, mine["id"]) == mine


def test_viewer_cannot_write(tenant: Tenant) -> None:
    existing = create(tenant.admin, tenant.org_id, name="kept")
    assert_native_error(tenant.viewer.post(channels(tenant.org_id), json={"name": "new"}), 403)
    assert_native_error(tenant.viewer.patch(channels(tenant.org_id, f"/{existing['id']}"), json={"name": "changed"}), 403)
    assert_native_error(tenant.viewer.delete(channels(tenant.org_id, f"/{existing['id']}")), 403)
    assert listing(tenant.admin, tenant.org_id)["total"] == 1
    assert get(tenant.admin, tenant.org_id, existing["id"]) == existing


def test_list_pagination(tenant: Tenant) -> None:
    made = [create(tenant.admin, tenant.org_id, name=f"chan-{index}")["id"] for index in range(5)]
    default = listing(tenant.admin, tenant.org_id)
    assert (default["total"], default["offset"], default["limit"]) == (5, 0, 10)
    assert [channel["id"] for channel in default["channels"]] == made  # creation order

    seen = []
    for offset in (0, 2, 4):
        page = listing(tenant.admin, tenant.org_id, offset=offset, limit=2)
        assert (page["total"], page["offset"], page["limit"]) == (5, offset, 2)
        seen.extend(channel["id"] for channel in page["channels"])
    assert seen == made
    assert listing(tenant.admin, tenant.org_id, offset=9)["channels"] == []

    for params, field in (({"limit": 101}, "limit"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                          ({"name": "n" * 257}, "name")):
        assert_native_error(tenant.admin.get(channels(tenant.org_id), params=params), 422, field)


def test_list_name_filter(tenant: Tenant) -> None:
    tag = uuid.uuid4().hex[:8]
    upper = create(tenant.admin, tenant.org_id, name=f"Telemetry {tag}")
    lower = create(tenant.admin, tenant.org_id, name=f"commands {tag}")
    percent = create(tenant.admin, tenant.org_id, name="50%_off")

    def names(name: str) -> set[str]:
        return {channel["id"] for channel in listing(tenant.admin, tenant.org_id, name=name, limit=100)["channels"]}

    assert names("telemetry") == {upper["id"]}
    assert names("COMMANDS") == {lower["id"]}
    assert names(tag) == {upper["id"], lower["id"]}
    assert names("%") == {percent["id"]}
    assert names("_") == {percent["id"]}
    assert names("nothing-like-this") == set()
    assert listing(tenant.admin, tenant.org_id, name=tag, limit=1)["total"] == 2
    assert listing(tenant.admin, tenant.org_id, name="")["total"] == 3  # empty filter: everything


def test_patch(tenant: Tenant) -> None:
    created = create(tenant.admin, tenant.org_id, name="before", metadata={"keep": 1, "drop": 2})

    response = tenant.member.patch(channels(tenant.org_id, f"/{created['id']}"), json={"name": "after"})
    assert response.status_code == 200, response.text
    assert response.json() == {**created, "name": "after"}

    # metadata is replaced as a whole, not merged
    response = tenant.member.patch(channels(tenant.org_id, f"/{created['id']}"), json={"metadata": {"new": [1, 2]}})
    assert response.status_code == 200, response.text
    assert response.json() == {**created, "name": "after", "metadata": {"new": [1, 2]}}

    response = tenant.member.patch(channels(tenant.org_id, f"/{created['id']}"), json={"name": "", "metadata": {}})
    assert response.status_code == 200, response.text
    assert (response.json()["name"], response.json()["metadata"]) == ("", {})

    # omitted (or null) fields are left alone
    tenant.member.patch(channels(tenant.org_id, f"/{created['id']}"), json={"name": "final", "metadata": {"x": True}})
    for body in ({}, {"name": None}, {"metadata": None}):
        response = tenant.member.patch(channels(tenant.org_id, f"/{created['id']}"), json=body)
        assert response.status_code == 200, response.text
        assert (response.json()["name"], response.json()["metadata"]) == ("final", {"x": True})
    assert get(tenant.admin, tenant.org_id, created["id"])["created_at"] == created["created_at"]
    assert event_total(tenant.admin, tenant.org_id, kind="channel.updated") == 7


def test_patch_shows_on_linked_devices(server: ServerProcess, tenant: Tenant) -> None:
    channel = create(tenant.admin, tenant.org_id, name="old", metadata={"v": 1})
    external_id = uid("ext")
    device = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={
        "external_id": external_id, "external_key": "k", "state": 1, "channels": [channel["id"]],
    }).json()
    tenant.admin.patch(channels(tenant.org_id, f"/{channel['id']}"), json={"name": "new", "metadata": {"v": 2}})

    linked = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device['id']}").json()["channels"]
    assert linked == [{"id": channel["id"], "name": "new", "metadata": {"v": 2}, "connected": True}]
    config = httpx.get(f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": "Client k"}, timeout=30)
    assert config.status_code == 200, config.text
    assert config.json()["channels"] == [{"id": channel["id"], "name": "new", "metadata": {"v": 2}}]


def test_delete_unlinks_devices(server: ServerProcess, tenant: Tenant) -> None:
    doomed = create(tenant.admin, tenant.org_id, name="a-doomed")
    kept = create(tenant.admin, tenant.org_id, name="b-kept")
    external_id = uid("ext")
    device = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={
        "external_id": external_id, "external_key": "k", "state": 1, "channels": [doomed["id"], kept["id"]],
    })
    assert device.status_code == 201, device.text
    device_id = device.json()["id"]

    response = tenant.member.delete(channels(tenant.org_id, f"/{doomed['id']}"))
    assert response.status_code == 204
    assert response.content == b""
    assert_native_error(tenant.admin.get(channels(tenant.org_id, f"/{doomed['id']}")), 404)
    assert_native_error(tenant.admin.delete(channels(tenant.org_id, f"/{doomed['id']}")), 404)
    assert [channel["id"] for channel in listing(tenant.admin, tenant.org_id)["channels"]] == [kept["id"]]
    assert event_total(tenant.admin, tenant.org_id, kind="channel.deleted") == 1

    # the device stays, without the link
    after = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}")
    assert after.status_code == 200, after.text
    assert [link["id"] for link in after.json()["channels"]] == [kept["id"]]
    by_channel = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices", params={"channel_id": doomed["id"]}).json()
    assert by_channel["total"] == 0
    config = httpx.get(f"{server.url}/clients/bootstrap/{external_id}", headers={"Authorization": "Client k"}, timeout=30)
    assert config.status_code == 200, config.text
    assert [channel["id"] for channel in config.json()["channels"]] == [kept["id"]]

    # a deleted channel cannot be linked again
    relink = tenant.admin.put(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/channels", json={"channels": [doomed["id"]]})
    assert_native_error(relink, 404)
