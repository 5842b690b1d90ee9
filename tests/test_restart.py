"""A restarted server has everything it had: on each database backend, with the same data dir.

Before the restart a deployment gets an organisation, users, API keys (one revoked), channels and
devices with bootstrap configs (with a client key, sealed at rest), states, and bootstraps through the
Magistrala and Mainflux doors. Everything is read back through the API; after the restart the same
reads must give the same answers, with the old access tokens and API keys (signed and checked with the
master key kept in the data dir), the bootstrap answers must be identical (sealed secrets still open),
and no second administrator or default organisation may appear.
"""

from __future__ import annotations

from typing import Any

import pytest

from compat_helpers import device_get, new_channel, new_device, unique
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, make_tenant

FIRST_ADMIN_MESSAGE = "created system administrator"


def created(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def ok(response: Any) -> Any:
    assert response.status_code == 200, (response.request.method, str(response.request.url), response.status_code, response.text)
    return response.json()


def bootstraps(server: ServerProcess, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """Each device's bootstrap answer, through the door it was made for."""
    answers = {}
    for device in devices:
        path = f"{device['door']}/{device['external_id']}"
        response = device_get(server.url, path, f"{device['scheme']} {device['external_key']}")
        answers[device["external_id"]] = ok(response)
    return answers


def state(server: ServerProcess, clients: dict[str, Api], org_id: str, default_org_id: str,
          device_ids: list[str], key_clients: dict[str, Api]) -> dict[str, Any]:
    """Everything the API shows about the deployment."""
    root, admin = clients["root"], clients["admin"]
    seen: dict[str, Any] = {
        "orgs": ok(root.get("/api/v1/orgs")),
        "org": ok(admin.get(f"/api/v1/orgs/{org_id}")),
        "users": ok(admin.get(f"/api/v1/orgs/{org_id}/users")),
        "default users": ok(root.get(f"/api/v1/orgs/{default_org_id}/users")),
        "devices": ok(admin.get(f"/api/v1/orgs/{org_id}/devices", params={"limit": 100})),
        "channels": ok(admin.get(f"/api/v1/orgs/{org_id}/channels", params={"limit": 100})),
        "events": ok(admin.get(f"/api/v1/orgs/{org_id}/events", params={"limit": 500})),
        "all events": ok(root.get("/api/v1/events", params={"limit": 500})),
        "magistrala configs": ok(admin.get(f"/{org_id}/clients/configs", params={"limit": 100})),
        "mainflux configs": ok(admin.get("/things/configs", params={"limit": 100})),
        "admin's api keys": ok(admin.get("/api/v1/api-keys")),
        "root's api keys": ok(root.get("/api/v1/api-keys")),
    }
    for device_id in device_ids:
        seen[f"device {device_id}"] = ok(admin.get(f"/api/v1/orgs/{org_id}/devices/{device_id}"))
    for role, client in clients.items():
        seen[f"me {role}"] = ok(client.get("/api/v1/me"))
    for name, client in key_clients.items():
        seen[f"key {name}"] = ok(client.get(f"/api/v1/orgs/{org_id}/devices", params={"limit": 100}))
    return seen


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_everything_survives_a_restart(server_factory: Any, backend: str) -> None:
    server: ServerProcess = server_factory(backend)
    server.start()
    opened: list[Api] = []
    try:
        root = Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
        tenant = make_tenant(server.url, root)
        opened += [root, tenant.admin, tenant.member, tenant.viewer]
        org_id, admin = tenant.org_id, tenant.admin
        default_org_id = next(org["id"] for org in ok(root.get("/api/v1/orgs")) if org["name"] == "default")
        clients = {"root": root, "admin": admin, "member": tenant.member, "viewer": tenant.viewer}

        # API keys: one restricted to the org, one unrestricted (root's), one revoked.
        org_key = created(admin.post("/api/v1/api-keys", json={"name": "org key", "org_id": org_id}))
        root_key = created(root.post("/api/v1/api-keys", json={"name": "root key", "expires_in_days": 30}))
        revoked_key = created(admin.post("/api/v1/api-keys", json={"name": "revoked key", "org_id": org_id}))
        assert admin.delete(f"/api/v1/api-keys/{revoked_key['id']}").status_code == 204
        key_clients = {"org": Api(server.url, org_key["key"]), "root": Api(server.url, root_key["key"])}
        opened += key_clients.values()
        for client in key_clients.values():  # used once now, so that their last_used_at is set before the reads
            ok(client.get("/api/v1/me"))

        telemetry = new_channel(admin, org_id, name="telemetry", metadata={"qos": 1, "tags": ["a", "b"]})
        commands = new_channel(admin, org_id, name="commands", metadata={})
        # A native device with a config, a client key and both channels, active from the start.
        native = new_device(
            admin, org_id, name="native", external_id=unique(), external_key="native-key", client_key="native-client-key",
            content='{"server": "mqtts://broker"}', client_cert="native-cert", ca_cert="native-ca", endpoint=unique("ep"),
            mac_address="00:11:22:33:44:55", serial_number="SN-1", imei="356938035643809", alias="native alias",
            channels=[telemetry["id"], commands["id"]], state=1,
        )
        # A Magistrala config (creates its device), activated through the Magistrala door.
        magistrala_ext = unique()
        response = admin.post(f"/{org_id}/clients/configs", json={
            "external_id": magistrala_ext, "external_key": "magistrala-key", "channels": [telemetry["id"]],
            "name": "magistrala", "content": "magistrala content", "client_cert": "m-cert", "client_key": "m-client-key",
            "ca_cert": "m-ca",
        })
        assert response.status_code == 201, response.text
        magistrala_id = response.headers["location"].removeprefix("/clients/configs/")
        assert admin.put(f"/{org_id}/clients/state/{magistrala_id}", json={"state": 1}).status_code == 200
        # A Mainflux config attached to an existing device, activated through the native API.
        plain = new_device(admin, org_id, name="mainflux")
        mainflux_ext = unique()
        response = admin.post("/things/configs", json={
            "thing_id": plain["id"], "external_id": mainflux_ext, "external_key": "mainflux-key",
            "channels": [commands["id"]], "content": "mainflux content", "client_key": "mf-client-key",
        })
        assert response.status_code == 201, response.text
        ok(admin.put(f"/api/v1/orgs/{org_id}/devices/{plain['id']}/state", json={"state": 1}))
        # An inactive device without a config, and a channel change on the native device.
        idle = new_device(admin, org_id, name="idle", serial_number="SN-idle")
        ok(admin.put(f"/api/v1/orgs/{org_id}/devices/{native['id']}/channels", json={"channels": [telemetry["id"]]}))
        ok(admin.patch(f"/api/v1/orgs/{org_id}/channels/{commands['id']}", json={"metadata": {"renamed": True}}))

        devices = [
            {"door": "/clients/bootstrap", "scheme": "Client", "external_id": native["external_id"], "external_key": "native-key"},
            {"door": "/clients/bootstrap", "scheme": "Client", "external_id": magistrala_ext, "external_key": "magistrala-key"},
            {"door": "/things/bootstrap", "scheme": "Thing", "external_id": mainflux_ext, "external_key": "mainflux-key"},
        ]
        first = bootstraps(server, devices)
        assert first[native["external_id"]]["client_secret"] == native["client_secret"]
        assert first[native["external_id"]]["client_key"] == "native-client-key"
        assert first[magistrala_ext]["client_key"] == "m-client-key"
        assert first[mainflux_ext]["mainflux_key"] == plain["client_secret"]
        assert first[mainflux_ext]["client_key"] == "mf-client-key"

        device_ids = [native["id"], magistrala_id, plain["id"], idle["id"]]
        before = state(server, clients, org_id, default_org_id, device_ids, key_clients)
        assert before["events"]["total"] > 0 and before["all events"]["total"] >= before["events"]["total"]
        assert all(device["last_bootstrap_at"] for device in before["devices"]["devices"] if device["name"] != "idle")
        master_key = sorted(path.name for path in server.data_dir.iterdir() if path.suffix == ".key")
        assert master_key, "the master key file is expected in the data dir"
        key_bytes = {name: (server.data_dir / name).read_bytes() for name in master_key}
        first_admin_lines = server.log().count(FIRST_ADMIN_MESSAGE)
        assert first_admin_lines > 0, server.log()

        server.restart()

        # The same clients: the access tokens and API keys issued before the restart still work.
        after = state(server, clients, org_id, default_org_id, device_ids, key_clients)
        for name in before:
            assert after[name] == before[name], f"{name} changed across the restart"
        assert {name: (server.data_dir / name).read_bytes() for name in master_key} == key_bytes
        with Api(server.url, revoked_key["key"]) as revoked:
            assert revoked.get("/api/v1/me").status_code == 401
        # Sealed secrets still open: every bootstrap answer is the same, client secret and key included.
        assert bootstraps(server, devices) == first
        events = ok(admin.get(f"/api/v1/orgs/{org_id}/events", params={"limit": 500}))
        assert events["total"] == before["events"]["total"] + len(devices)
        assert [event["kind"] for event in events["events"][: len(devices)]] == ["bootstrap.succeeded"] * len(devices)
        # A fresh login works too, and the start-up created no second administrator or default org.
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as again:
            orgs = ok(again.get("/api/v1/orgs"))
        assert [org["name"] for org in orgs].count("default") == 1
        admins = [user for user in ok(root.get(f"/api/v1/orgs/{default_org_id}/users")) if user["is_system_admin"]]
        assert [user["email"] for user in admins] == [ADMIN_EMAIL]
        all_events = ok(root.get("/api/v1/events", params={"limit": 500, "kind": "user.created"}))
        assert [event["detail"].get("email") for event in all_events["events"]] == [ADMIN_EMAIL]
        assert server.log().count(FIRST_ADMIN_MESSAGE) == first_admin_lines, "the restart created an administrator"
    finally:
        for client in opened:
            client.close()
        server.stop()
