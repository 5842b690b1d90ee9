"""Magistrala "classic" bootstrap API (``/{domainID}/clients/...``, ``/clients/bootstrap/...``) through a
real server, on each database backend.

Documented Pilotboat choices checked here: ``client_secret`` and ``external_key`` are never returned by
view/list (only the device route returns the secret); a duplicate ``external_id`` is 409; an inactive
device is refused at bootstrap (403) where upstream serves it anyway.
"""

from __future__ import annotations

import json
from typing import Any

from compat_helpers import (
    assert_error,
    by_device_actor,
    connections,
    device_get,
    native_device,
    new_channel,
    new_device,
    org_events,
    system_events,
    unique,
)
from harness import Api, ServerProcess, Tenant

VIEW_FIELDS = {"client_id", "channels", "external_id", "content", "name", "state", "client_cert", "ca_cert"}
BOOTSTRAP_FIELDS = {"client_id", "client_secret", "channels", "content", "client_cert", "client_key", "ca_cert"}


def configs(org_id: str, suffix: str = "") -> str:
    return f"/{org_id}/clients/configs{suffix}"


def create(client: Api, org_id: str, channels: list[str], **fields: Any) -> tuple[str, dict[str, Any]]:
    """Create a config; returns its id (from Location) and the body sent."""
    body = {"external_id": unique(), "external_key": unique("key"), "channels": channels, **fields}
    response = client.post(configs(org_id), json=body)
    assert response.status_code == 201, response.text
    assert response.content == b""
    location = response.headers["location"]
    assert location.startswith("/clients/configs/"), location
    return location.removeprefix("/clients/configs/"), body


def view(client: Api, org_id: str, config_id: str) -> dict[str, Any]:
    response = client.get(configs(org_id, f"/{config_id}"))
    assert response.status_code == 200, response.text
    return response.json()


def set_state(client: Api, org_id: str, config_id: str, state: int) -> None:
    response = client.put(f"/{org_id}/clients/state/{config_id}", json={"state": state})
    assert response.status_code == 200, response.text
    assert response.content == b""


def bootstrap(server: ServerProcess, external_id: str, key: str | None) -> Any:
    return device_get(server.url, f"/clients/bootstrap/{external_id}", None if key is None else f"Client {key}")


# --- create -------------------------------------------------------------------------------------


def test_create_without_client_id_creates_a_device(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org, metadata={"type": "data"})
    config_id, body = create(
        tenant.admin, org, [channel["id"]], name="Boiler", content='{"mqtt":"tcp://h:1883"}',
        client_cert="CERT", client_key="KEY", ca_cert="CA",
    )
    seen = view(tenant.admin, org, config_id)
    assert seen == {
        "client_id": config_id,
        "channels": [{"id": channel["id"], "name": channel["name"], "metadata": {"type": "data"}}],
        "external_id": body["external_id"],
        "content": '{"mqtt":"tcp://h:1883"}',
        "name": "Boiler",
        "state": 0,
        "client_cert": "CERT",
        "ca_cert": "CA",
    }
    # The config is a device of the native API, not connected (state starts at 0).
    device = native_device(tenant.admin, org, config_id)
    assert device["external_id"] == body["external_id"]
    assert device["has_client_key"] is True
    assert connections(tenant.admin, org, config_id) == {channel["id"]: False}


def test_create_with_client_id_attaches_to_an_existing_device(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)
    device = new_device(tenant.admin, org, name="pump-7", ca_cert="DEVICE-CA")
    config_id, body = create(tenant.admin, org, [channel["id"]], client_id=device["id"], content="c")
    assert config_id == device["id"]
    seen = view(tenant.admin, org, device["id"])
    assert seen["external_id"] == body["external_id"]
    # Fields the request leaves out keep the device's values.
    assert (seen["name"], seen["content"], seen["ca_cert"]) == ("pump-7", "c", "DEVICE-CA")
    assert [c["id"] for c in seen["channels"]] == [channel["id"]]
    # The device keeps its client secret: bootstrap hands out the one the native API issued.
    set_state(tenant.admin, org, config_id, 1)
    served = bootstrap(server, body["external_id"], body["external_key"])
    assert served.status_code == 200, served.text
    assert served.json()["client_id"] == device["id"]
    assert served.json()["client_secret"] == device["client_secret"]
    # No second device was created.
    listed = tenant.admin.get(f"/api/v1/orgs/{org}/devices").json()
    assert listed["total"] == 1


def test_create_with_client_id_errors(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)
    body = {"external_id": unique(), "external_key": "k", "channels": [channel["id"]]}
    unknown = tenant.admin.post(configs(org), json={**body, "client_id": "00000000-0000-0000-0000-000000000000"})
    assert_error(unknown, 404, "message")
    foreign = new_device(other_tenant.admin, other_tenant.org_id)
    assert_error(tenant.admin.post(configs(org), json={**body, "client_id": foreign["id"]}), 404, "message")
    assert native_device(other_tenant.admin, other_tenant.org_id, foreign["id"])["external_id"] is None
    # A device has at most one config.
    config_id, _ = create(tenant.admin, org, [channel["id"]])
    assert_error(tenant.admin.post(configs(org), json={**body, "client_id": config_id}), 409, "message")


def test_create_validation(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    good = {"external_id": unique(), "external_key": "secret", "channels": [channel]}
    for missing in ("external_id", "external_key", "channels"):
        body = {key: value for key, value in good.items() if key != missing}
        assert_error(tenant.admin.post(configs(org), json=body), 400, "message")
    assert_error(tenant.admin.post(configs(org), json={**good, "channels": []}), 400, "message")
    assert_error(tenant.admin.post(configs(org), json={**good, "channels": [""]}), 400, "message")
    assert_error(tenant.admin.post(configs(org), json={**good, "external_id": ""}), 400, "message")
    assert_error(tenant.admin.post(configs(org), json={**good, "external_key": ""}), 400, "message")
    assert_error(tenant.admin.post(configs(org), json={}), 400, "message")
    message = assert_error(tenant.admin.post(configs(org), json={**good, "colour": "red"}), 400, "message")
    assert "colour" in message
    # Unknown channel (or one of another tenant) is 404, and nothing was created.
    missing = tenant.admin.post(configs(org), json={**good, "channels": [channel, "no-such-channel"]})
    assert_error(missing, 404, "message")
    listed = tenant.admin.get(configs(org), params={"external_id": good["external_id"]}).json()
    assert listed["total"] == 0
    # The same body is fine once it is valid.
    assert tenant.admin.post(configs(org), json=good).status_code == 201


def test_create_malformed_json_and_content_type(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    malformed = tenant.admin.post(configs(org), content=b'{"external_id": ', headers={"Content-Type": "application/json"})
    assert_error(malformed, 400, "message")
    body = json.dumps({"external_id": unique(), "external_key": "k", "channels": ["x"]}).encode()
    wrong_type = tenant.admin.post(configs(org), content=body, headers={"Content-Type": "text/plain"})
    assert_error(wrong_type, 415, "message")
    no_type = tenant.admin.post(configs(org), content=body, headers={"Content-Type": ""})
    assert_error(no_type, 415, "message")


def test_duplicate_external_id_is_409(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    _, body = create(tenant.admin, org, [channel])
    again = tenant.admin.post(configs(org), json={**body, "external_key": "another"})
    assert_error(again, 409, "message")
    # External ids are global: the bootstrap route has no tenant in it.
    other_channel = new_channel(other_tenant.admin, other_tenant.org_id)["id"]
    elsewhere = other_tenant.admin.post(configs(other_tenant.org_id), json={**body, "channels": [other_channel]})
    assert_error(elsewhere, 409, "message")
    listed = tenant.admin.get(configs(org), params={"external_id": body["external_id"]}).json()
    assert listed["total"] == 1


# --- list ---------------------------------------------------------------------------------------


def test_list_pagination_defaults_and_limits(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    created = [create(tenant.admin, org, [channel], name=f"n{i}")[0] for i in range(12)]
    # A device without a config is not a config.
    new_device(tenant.admin, org, name="plain device")
    first = tenant.admin.get(configs(org))
    assert first.status_code == 200
    page = first.json()
    assert (page["total"], page["offset"], page["limit"]) == (12, 0, 10)
    assert len(page["configs"]) == 10
    rest = tenant.admin.get(configs(org), params={"offset": 10, "limit": 10}).json()
    assert (rest["total"], rest["offset"], rest["limit"]) == (12, 10, 10)
    assert len(rest["configs"]) == 2
    ids = [c["client_id"] for c in page["configs"] + rest["configs"]]
    assert sorted(ids) == sorted(created)
    everything = tenant.admin.get(configs(org), params={"limit": 100}).json()
    assert len(everything["configs"]) == 12
    beyond = tenant.admin.get(configs(org), params={"offset": 50}).json()
    assert beyond["total"] == 12 and beyond["configs"] == []
    for params in ({"limit": 101}, {"limit": -1}, {"offset": -1}, {"limit": "ten"}, {"state": 2}):
        assert_error(tenant.admin.get(configs(org), params=params), 400, "message")


def test_list_filters(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    token = unique("tok").split("-")[1][:10]
    alpha, alpha_body = create(tenant.admin, org, [channel], name=f"Sensor-{token}-Alpha")
    beta, _ = create(tenant.admin, org, [channel], name=f"sensor-{token}-beta")
    gamma, _ = create(tenant.admin, org, [channel], name="gateway")
    set_state(tenant.admin, org, beta, 1)

    def ids(**params: Any) -> tuple[int, set[str]]:
        response = tenant.admin.get(configs(org), params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["total"], {c["client_id"] for c in body["configs"]}

    assert ids(name=token.upper()) == (2, {alpha, beta})
    assert ids(name="ALPHA") == (1, {alpha})
    assert ids(name="nothing-like-this") == (0, set())
    assert ids(state=1) == (1, {beta})
    assert ids(state=0) == (2, {alpha, gamma})
    assert ids(external_id=alpha_body["external_id"]) == (1, {alpha})
    assert ids(external_id=alpha_body["external_id"][:-1]) == (0, set())  # exact match, not partial
    assert ids(name="sensor", state=0) == (1, {alpha})
    # Filtered total counts every match, not just the page.
    assert tenant.admin.get(configs(org), params={"name": "SENSOR", "limit": 1}).json()["total"] == 2


def test_view_and_list_hide_secrets(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel], client_key="PRIVATE-KEY-PEM")
    seen = view(tenant.admin, org, config_id)
    assert set(seen) == VIEW_FIELDS
    listed = tenant.admin.get(configs(org)).json()["configs"]
    assert [set(item) for item in listed] == [VIEW_FIELDS]
    for text in (json.dumps(seen), json.dumps(listed)):
        assert body["external_key"] not in text
        assert "PRIVATE-KEY-PEM" not in text
        assert "client_secret" not in text and "external_key" not in text


def test_view_unknown_and_plain_device(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    assert_error(tenant.admin.get(configs(org, "/00000000-0000-0000-0000-000000000000")), 404, "message")
    plain = new_device(tenant.admin, org)
    assert_error(tenant.admin.get(configs(org, f"/{plain['id']}")), 404, "message")


# --- update -------------------------------------------------------------------------------------


def test_update_name_and_content(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel], name="old", content="old content")
    response = tenant.admin.put(configs(org, f"/{config_id}"), json={"name": "new", "content": "new content"})
    assert response.status_code == 200 and response.content == b""
    seen = view(tenant.admin, org, config_id)
    assert (seen["name"], seen["content"]) == ("new", "new content")
    assert tenant.admin.put(configs(org, f"/{config_id}"), json={"content": "only content"}).status_code == 200
    seen = view(tenant.admin, org, config_id)
    assert (seen["name"], seen["content"]) == ("new", "only content")
    # Bootstrap serves the new content.
    set_state(tenant.admin, org, config_id, 1)
    assert bootstrap(server, body["external_id"], body["external_key"]).json()["content"] == "only content"


def test_update_errors(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, _ = create(tenant.admin, org, [channel], name="kept")
    path = configs(org, f"/{config_id}")
    assert_error(tenant.admin.put(path, json={}), 400, "message")
    assert "external_id" in assert_error(tenant.admin.put(path, json={"external_id": "x"}), 400, "message")
    assert_error(tenant.admin.put(path, content=b"{nope", headers={"Content-Type": "application/json"}), 400, "message")
    assert_error(tenant.admin.put(path, content=b'{"name":"x"}', headers={"Content-Type": "text/plain"}), 415, "message")
    assert_error(tenant.admin.put(configs(org, "/no-such-config"), json={"name": "x"}), 404, "message")
    assert view(tenant.admin, org, config_id)["name"] == "kept"


def test_update_certs(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel], client_cert="c0", client_key="k0", ca_cert="a0")
    path = configs(org, f"/certs/{config_id}")
    response = tenant.admin.patch(path, json={"client_cert": "c1", "client_key": "k1", "ca_cert": "a1"})
    assert response.status_code == 200, response.text
    assert response.json() == {"client_id": config_id, "client_cert": "c1", "client_key": "k1", "ca_cert": "a1"}
    partial = tenant.admin.patch(path, json={"ca_cert": "a2"})
    assert partial.status_code == 200
    assert partial.json() == {"client_id": config_id, "client_cert": "c1", "client_key": "k1", "ca_cert": "a2"}
    seen = view(tenant.admin, org, config_id)
    assert (seen["client_cert"], seen["ca_cert"]) == ("c1", "a2")
    set_state(tenant.admin, org, config_id, 1)
    served = bootstrap(server, body["external_id"], body["external_key"]).json()
    assert (served["client_cert"], served["client_key"], served["ca_cert"]) == ("c1", "k1", "a2")
    assert_error(tenant.admin.patch(path, json={}), 400, "message")
    assert "cert" in assert_error(tenant.admin.patch(path, json={"cert": "x"}), 400, "message")
    assert_error(tenant.admin.patch(configs(org, "/certs/no-such-config"), json={"ca_cert": "x"}), 404, "message")


# --- connections and state ----------------------------------------------------------------------


def test_connections_follow_state(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    a, b, c = (new_channel(tenant.admin, org)["id"] for _ in range(3))
    config_id, _ = create(tenant.admin, org, [a])
    path = configs(org, f"/connections/{config_id}")
    # Inactive: the channel list changes, nothing gets connected.
    response = tenant.admin.put(path, json={"channels": [a, b]})
    assert response.status_code == 200 and response.content == b""
    assert connections(tenant.admin, org, config_id) == {a: False, b: False}
    assert {ch["id"] for ch in view(tenant.admin, org, config_id)["channels"]} == {a, b}
    # Active: state 1 connects every channel of the config.
    set_state(tenant.admin, org, config_id, 1)
    assert connections(tenant.admin, org, config_id) == {a: True, b: True}
    assert view(tenant.admin, org, config_id)["state"] == 1
    # While active, new channels are connected and removed ones go.
    assert tenant.admin.put(path, json={"channels": [b, c]}).status_code == 200
    assert connections(tenant.admin, org, config_id) == {b: True, c: True}
    # State 0 disconnects everything but keeps the list.
    set_state(tenant.admin, org, config_id, 0)
    assert connections(tenant.admin, org, config_id) == {b: False, c: False}
    assert view(tenant.admin, org, config_id)["state"] == 0
    set_state(tenant.admin, org, config_id, 1)
    assert connections(tenant.admin, org, config_id) == {b: True, c: True}


def test_connections_errors(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    a = new_channel(tenant.admin, org)["id"]
    foreign = new_channel(other_tenant.admin, other_tenant.org_id)["id"]
    config_id, _ = create(tenant.admin, org, [a])
    path = configs(org, f"/connections/{config_id}")
    assert_error(tenant.admin.put(path, json={"channels": [a, "no-such-channel"]}), 404, "message")
    assert_error(tenant.admin.put(path, json={"channels": [foreign]}), 404, "message")
    assert_error(tenant.admin.put(path, json={"channels": [""]}), 400, "message")
    assert_error(tenant.admin.put(path, json={}), 400, "message")
    assert_error(tenant.admin.put(path, json={"channels": "abc"}), 400, "message")
    assert_error(tenant.admin.put(configs(org, "/connections/no-such-config"), json={"channels": [a]}), 404, "message")
    assert connections(tenant.admin, org, config_id) == {a: False}


def test_state_values(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, _ = create(tenant.admin, org, [channel])
    path = f"/{org}/clients/state/{config_id}"
    set_state(tenant.admin, org, config_id, 1)
    set_state(tenant.admin, org, config_id, 1)  # idempotent
    for bad in ({"state": 2}, {"state": -1}, {"state": "x"}, {"state": "1"}, {"state": True}, {"state": 1.0},
                {"state": None}, {}):
        assert_error(tenant.admin.put(path, json=bad), 400, "message")
    assert view(tenant.admin, org, config_id)["state"] == 1
    assert connections(tenant.admin, org, config_id) == {channel: True}
    assert "extra" in assert_error(tenant.admin.put(path, json={"state": 0, "extra": 1}), 400, "message")
    assert_error(tenant.admin.put(f"/{org}/clients/state/no-such-config", json={"state": 1}), 404, "message")
    set_state(tenant.admin, org, config_id, 0)
    assert view(tenant.admin, org, config_id)["state"] == 0


# --- delete -------------------------------------------------------------------------------------


def test_delete(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel])
    set_state(tenant.admin, org, config_id, 1)
    response = tenant.admin.delete(configs(org, f"/{config_id}"))
    assert response.status_code == 204 and response.content == b""
    assert_error(tenant.admin.get(configs(org, f"/{config_id}")), 404, "message")
    assert tenant.admin.get(configs(org)).json()["total"] == 0
    assert bootstrap(server, body["external_id"], body["external_key"]).status_code == 404
    # The device stays, without its config and disconnected.
    device = native_device(tenant.admin, org, config_id)
    assert device["external_id"] is None and device["state"] == 0 and device["channels"] == []
    # Deleting again, or an id that never existed, is still 204.
    assert tenant.admin.delete(configs(org, f"/{config_id}")).status_code == 204
    assert tenant.admin.delete(configs(org, "/no-such-config")).status_code == 204
    # The external id is free again.
    recreated = tenant.admin.post(configs(org), json=body)
    assert recreated.status_code == 201, recreated.text


# --- authentication and tenants -----------------------------------------------------------------


MANAGEMENT_ROUTES = [
    ("POST", "/configs", {"external_id": "e", "external_key": "k", "channels": ["c"]}),
    ("GET", "/configs", None),
    ("GET", "/configs/{id}", None),
    ("PUT", "/configs/{id}", {"name": "n"}),
    ("PATCH", "/configs/certs/{id}", {"ca_cert": "c"}),
    ("PUT", "/configs/connections/{id}", {"channels": ["c"]}),
    ("DELETE", "/configs/{id}", None),
    ("PUT", "/state/{id}", {"state": 1}),
]


def test_management_routes_need_a_valid_bearer(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, _ = create(tenant.admin, org, [channel], name="untouched")
    with Api(server.url) as anonymous:
        for authorization in (None, "Bearer not-a-token", "Bearer", "Client some-key"):
            headers = {"Authorization": authorization} if authorization is not None else {}
            for method, suffix, body in MANAGEMENT_ROUTES:
                path = f"/{org}/clients" + suffix.replace("{id}", config_id)
                response = anonymous.request(method, path, json=body, headers=headers)
                message = assert_error(response, 401, "message")
                assert config_id not in message
    seen = view(tenant.admin, org, config_id)
    assert seen["name"] == "untouched" and seen["state"] == 0


def test_other_tenant_gets_nothing(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel], name="mine", content="secret content")
    intruder = other_tenant.admin
    # Naming the victim's domain: not a member, so 404 everywhere.
    for method, suffix, payload in MANAGEMENT_ROUTES:
        if suffix == "/configs" and method == "POST":
            payload = {"external_id": unique(), "external_key": "k", "channels": [channel]}
        path = f"/{org}/clients" + suffix.replace("{id}", config_id)
        response = intruder.request(method, path, json=payload)
        assert response.status_code in (403, 404), (method, path, response.status_code)
        assert "secret content" not in response.text and body["external_id"] not in response.text
    # Naming their own domain with the victim's config id: 404 (DELETE: 204, nothing removed).
    own = other_tenant.org_id
    assert_error(intruder.get(configs(own, f"/{config_id}")), 404, "message")
    assert_error(intruder.put(configs(own, f"/{config_id}"), json={"name": "stolen"}), 404, "message")
    assert_error(intruder.patch(configs(own, f"/certs/{config_id}"), json={"ca_cert": "x"}), 404, "message")
    assert_error(intruder.put(configs(own, f"/connections/{config_id}"), json={"channels": []}), 404, "message")
    assert_error(intruder.put(f"/{own}/clients/state/{config_id}", json={"state": 1}), 404, "message")
    assert intruder.delete(configs(own, f"/{config_id}")).status_code == 204
    assert intruder.get(configs(own)).json()["total"] == 0
    seen = view(tenant.admin, org, config_id)
    assert (seen["name"], seen["state"], seen["ca_cert"]) == ("mine", 0, "")
    assert [ch["id"] for ch in seen["channels"]] == [channel]


def test_roles(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, _ = create(tenant.member, org, [channel])
    assert view(tenant.viewer, org, config_id)["client_id"] == config_id
    assert tenant.viewer.get(configs(org)).json()["total"] == 1
    denied = tenant.viewer.post(configs(org), json={"external_id": unique(), "external_key": "k", "channels": [channel]})
    assert_error(denied, 403, "message")
    assert_error(tenant.viewer.put(f"/{org}/clients/state/{config_id}", json={"state": 1}), 403, "message")
    assert_error(tenant.viewer.delete(configs(org, f"/{config_id}")), 403, "message")
    assert view(tenant.admin, org, config_id)["state"] == 0


# --- device route -------------------------------------------------------------------------------


def test_bootstrap_returns_the_configuration(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    first = new_channel(tenant.admin, org, name="a-telemetry", metadata={"type": "data", "qos": 1})
    second = new_channel(tenant.admin, org, name="b-control", metadata={})
    config_id, body = create(
        tenant.admin, org, [first["id"], second["id"]], content='{"server":"coap://h"}',
        client_cert="CLIENT-CERT", client_key="CLIENT-KEY", ca_cert="CA-CERT",
    )
    set_state(tenant.admin, org, config_id, 1)
    response = bootstrap(server, body["external_id"], body["external_key"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    served = response.json()
    assert set(served) == BOOTSTRAP_FIELDS
    assert served["client_id"] == config_id
    assert isinstance(served["client_secret"], str) and len(served["client_secret"]) >= 16
    assert sorted(served["channels"], key=lambda ch: ch["name"]) == [
        {"id": first["id"], "name": "a-telemetry", "metadata": {"type": "data", "qos": 1}},
        {"id": second["id"], "name": "b-control", "metadata": {}},
    ]
    assert (served["content"], served["client_cert"], served["client_key"], served["ca_cert"]) == (
        '{"server":"coap://h"}', "CLIENT-CERT", "CLIENT-KEY", "CA-CERT",
    )
    # Same answer the next time, same secret; the scheme name is case-insensitive.
    again = device_get(server.url, f"/clients/bootstrap/{body['external_id']}", f"client {body['external_key']}")
    assert again.status_code == 200 and again.json() == served
    assert native_device(tenant.admin, org, config_id)["last_bootstrap_at"] is not None


def test_bootstrap_refusals(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel])
    ext, key = body["external_id"], body["external_key"]
    # Inactive devices are refused (Pilotboat deviation: upstream serves them).
    inactive = bootstrap(server, ext, key)
    message = assert_error(inactive, 403, "message")
    assert "inactive" in message
    set_state(tenant.admin, org, config_id, 1)
    assert bootstrap(server, ext, key).status_code == 200
    assert_error(bootstrap(server, unique(), key), 404, "message")
    assert_error(bootstrap(server, ext, None), 401, "message")
    assert_error(device_get(server.url, f"/clients/bootstrap/{ext}", "Client"), 401, "message")
    assert_error(device_get(server.url, f"/clients/bootstrap/{ext}", f"Bearer {key}"), 401, "message")
    assert_error(bootstrap(server, ext, key + "x"), 403, "message")
    assert_error(bootstrap(server, ext, key.upper()), 403, "message")
    assert_error(device_get(server.url, "/clients/bootstrap/", f"Client {key}"), 400, "message")
    assert_error(bootstrap(server, "x" * 257, key), 400, "message")
    # A refused response never leaks the configuration.
    for response in (bootstrap(server, ext, "wrong"), bootstrap(server, ext, None)):
        assert "client_secret" not in response.text and config_id not in response.text
    # Deactivating refuses again.
    set_state(tenant.admin, org, config_id, 0)
    assert_error(bootstrap(server, ext, key), 403, "message")


def test_bootstrap_events(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    config_id, body = create(tenant.admin, org, [channel], client_key="PEM-PRIVATE-KEY-7")
    ext, key = body["external_id"], body["external_key"]
    assert bootstrap(server, ext, key).status_code == 403  # inactive
    assert bootstrap(server, ext, "wrong-key-value").status_code == 403
    set_state(tenant.admin, org, config_id, 1)
    served = bootstrap(server, ext, key)
    assert served.status_code == 200
    secret = served.json()["client_secret"]
    unknown = unique()
    assert bootstrap(server, unknown, key).status_code == 404

    attempts = org_events(tenant.admin, org, kind="bootstrap.", device_id=config_id)
    assert [(e["kind"], e["outcome"], e["reason"]) for e in reversed(attempts)] == [
        ("bootstrap.failed", "refused", "device inactive"),
        ("bootstrap.failed", "refused", "wrong external key"),
        ("bootstrap.succeeded", "ok", None),
    ]
    assert all(e["actor"] == f"device:{ext}" and e["org_id"] == org for e in attempts)
    assert all(e["detail"].get("door") == "magistrala" for e in attempts)
    # An unknown external id belongs to no organisation: only the system-wide list shows it.
    stray = by_device_actor(system_events(root, kind="bootstrap.failed"), unknown)
    assert [(e["org_id"], e["device_id"], e["outcome"], e["reason"]) for e in stray] == [
        (None, None, "refused", "unknown external_id")
    ]
    assert by_device_actor(org_events(tenant.admin, org), unknown) == []
    assert_error(tenant.admin.get("/api/v1/events"), 403, "detail")
    # No secret in any event, nor in the server log.
    everything = json.dumps(org_events(tenant.admin, org)) + json.dumps(system_events(root))
    for value in (key, secret, "PEM-PRIVATE-KEY-7", "wrong-key-value"):
        assert value not in everything
        assert value not in server.log()
