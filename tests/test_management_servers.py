"""Management-server definitions and their assignment to devices, through a real server on each backend:
the native routes (``/api/v1/orgs/{org_id}/management-servers``, ``PUT .../devices/{id}/management-server``),
the WebAccess/DMP routes (``/api/bootstrap``, ``PUT /api/management/devices/{mac}/bootstrap-server/{id}``),
the device output (``management_server_id``, ``last_bootstrap``) and what the LwM2M bootstrap server
hands out (a Bootstrap-Pack fetched with libcoap's client)."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import httpx
import pytest

from compat_helpers import assert_error, device_get, native_device, new_channel, new_device, org_events, unique
from harness import Api, ServerProcess, Tenant, json_of
from pilotboat.lwm2m import content
from pilotboat.lwm2m.model import ROOT, Path, as_dict

OUT_FIELDS = {
    "id", "org_id", "name", "address", "port", "uri_scheme", "uri", "security_mode", "security_mode_value",
    "short_server_id", "lifetime", "binding", "is_default", "created_at", "updated_at",
}
DMP_FIELDS = {
    "id", "name", "address", "port", "company_id", "uri", "uri_scheme", "security_mode", "short_server_id", "lifetime",
    "binding", "is_default",
}


# --- helpers ------------------------------------------------------------------------------------


def servers_path(org_id: str, suffix: str = "") -> str:
    return f"/api/v1/orgs/{org_id}/management-servers{suffix}"


def host() -> str:
    return f"ms-{uuid.uuid4().hex[:12]}.example.test"


def create(client: Api, org_id: str, **fields: Any) -> dict[str, Any]:
    body = {"name": unique("ms"), "address": host(), "port": 5683, **fields}
    response = client.post(servers_path(org_id), json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert set(created) == OUT_FIELDS, created
    return created


def listed(client: Api, org_id: str, **params: Any) -> list[dict[str, Any]]:
    response = client.get(servers_path(org_id), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def native_error(response: httpx.Response, status: int, field: str | None = None) -> str:
    message = assert_error(response, status, "detail")
    if field is not None:
        assert response.json().get("field") == field, response.json()
        assert field in message, message
    return message


def dmp_ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert set(body) == {"data", "success"} and body["success"] is True, body
    return body["data"]


def dmp_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = json_of(response)
    assert set(body) == {"success", "message"} and body["success"] is False and body["message"], body
    return body["message"]


def assign(client: Api, org_id: str, device_id: str, server_id: str) -> httpx.Response:
    return client.put(f"/api/v1/orgs/{org_id}/devices/{device_id}/management-server", json={"server_id": server_id})


def assign_by_mac(client: Api, mac: str, server_id: str) -> httpx.Response:
    return client.put(f"/api/management/devices/{mac}/bootstrap-server/{server_id}")


def by_id(entry: dict[str, Any]) -> str:
    return entry["id"]


def kinds(client: Api, org_id: str) -> list[dict[str, Any]]:
    """The organisation's management-server events, oldest first."""
    return list(reversed(org_events(client, org_id, kind="management_server.")))


def bootstrap_pack(server: ServerProcess, endpoint: str) -> subprocess.CompletedProcess[str]:
    """A Bootstrap-Pack-Request in SenML-JSON, sent by libcoap's command-line client."""
    return subprocess.run(
        ["coap-client-notls", "-m", "get", "-A", str(content.SENML_JSON), "-B", "10",
         f"coap://127.0.0.1:{server.bootstrap_port}/bspack?ep={endpoint}"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def packed_servers(server: ServerProcess, endpoint: str) -> dict[str, Any]:
    """URI, mode and Server-object values of the one management server in the device's Bootstrap-Pack."""
    answer = bootstrap_pack(server, endpoint)
    assert answer.returncode == 0 and answer.stdout.startswith("["), (answer.stdout, answer.stderr)
    values = as_dict(content.decode(content.SENML_JSON, answer.stdout.strip().encode(), ROOT))
    security = {str(path) for path in values if str(path).startswith("/0/") and str(path).endswith("/0")}
    assert len(security) == 1, values
    (uri_path,) = security
    iid = uri_path.split("/")[2]
    return {
        "uri": values[Path.parse(uri_path)], "mode": values[Path.parse(f"/0/{iid}/2")],
        "ssid": values[Path.parse(f"/0/{iid}/10")], "lifetime": values[Path.parse("/1/0/1")],
        "binding": values[Path.parse("/1/0/7")],
    }


# --- the default definition ------------------------------------------------------------------------


def test_default_definition_is_listed_first_and_read_only(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    own = create(tenant.admin, org)
    for client in (tenant.admin, tenant.member, tenant.viewer):
        entries = listed(client, org)
        assert [entry["id"] for entry in entries] == ["default", own["id"]]
    default = entries[0]
    assert default == {
        "id": "default", "org_id": None, "name": default["name"], "address": "127.0.0.1", "port": server.lwm2m_port,
        "uri_scheme": "coap", "uri": server.lwm2m_uri, "security_mode": "NOSEC", "security_mode_value": 3,
        "short_server_id": 1, "lifetime": 86400, "binding": "U", "is_default": True, "created_at": None, "updated_at": None,
    }
    one = tenant.viewer.get(servers_path(org, "/default"))
    assert one.status_code == 200 and one.json() == default
    # Read-only: its values come from the settings.
    for response in (tenant.admin.patch(servers_path(org, "/default"), json={"port": 5690}),
                     tenant.admin.delete(servers_path(org, "/default"))):
        message = native_error(response, 400)
        assert "PILOTBOAT_PUBLIC_HOST" in message and "PILOTBOAT_LWM2M_PORT" in message and "default" in message
    assert listed(tenant.admin, org)[0] == default
    # Filtered by address, it shows where its address matches.
    assert [entry["id"] for entry in listed(tenant.admin, org, address="127.0.0.1")] == ["default"]
    assert listed(tenant.admin, org, address=own["address"]) == [own]
    # Another tenant reaches it through its own organisation only.
    native_error(other_tenant.admin.get(servers_path(org, "/default")), 404)
    assert other_tenant.admin.get(servers_path(other_tenant.org_id, "/default")).json() == default
    # The DMP door shows the same definition.
    assert dmp_ok(tenant.viewer.get("/api/bootstrap/default"))["uri"] == server.lwm2m_uri
    dmp_error(tenant.admin.put("/api/bootstrap/default", json={"name": "mine"}), 400)
    dmp_error(tenant.admin.delete("/api/bootstrap/default"), 400)


# --- native CRUD ---------------------------------------------------------------------------------


def test_create_read_update_delete(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    name = host()
    created = create(tenant.member, org, name="Plant A", address=name.upper(), port=5683)
    assert {key: created[key] for key in OUT_FIELDS - {"id", "created_at", "updated_at"}} == {
        "org_id": org, "name": "Plant A", "address": name, "port": 5683, "uri_scheme": "coap",
        "uri": f"coap://{name}:5683", "security_mode": "NOSEC", "security_mode_value": 3, "short_server_id": 1,
        "lifetime": 86400, "binding": "U", "is_default": False,
    }
    assert created["created_at"] and created["updated_at"]
    path = servers_path(org, f"/{created['id']}")
    assert tenant.viewer.get(path).json() == created
    # The CoAPS port gives coaps with certificates unless told otherwise; one of the two sets the other.
    secure = create(tenant.admin, org, port=5684)
    assert (secure["uri_scheme"], secure["security_mode"], secure["security_mode_value"]) == ("coaps", "CERTIFICATE", 2)
    psk = create(tenant.admin, org, port=6000, security_mode="psk")
    assert (psk["uri_scheme"], psk["security_mode"], psk["uri"]) == ("coaps", "PSK", f"coaps://{psk['address']}:6000")
    plain = create(tenant.admin, org, port=5684, uri_scheme="coap")
    assert plain["security_mode"] == "NOSEC"
    ipv6 = create(tenant.admin, org, address="[2001:DB8:0:0::1]", port=5683, short_server_id=65534, lifetime=60, binding="uq")
    assert (ipv6["address"], ipv6["uri"], ipv6["short_server_id"], ipv6["lifetime"], ipv6["binding"]) == (
        "2001:db8::1", "coap://[2001:db8::1]:5683", 65534, 60, "UQ",
    )
    assert [entry["id"] for entry in listed(tenant.viewer, org)][0] == "default"
    assert {entry["id"] for entry in listed(tenant.viewer, org)} == {"default", created["id"], secure["id"], psk["id"], plain["id"], ipv6["id"]}

    changed = tenant.admin.patch(path, json={"lifetime": 300, "binding": "T", "name": "Plant A (new)"})
    assert changed.status_code == 200, changed.text
    after = changed.json()
    assert (after["lifetime"], after["binding"], after["name"]) == (300, "T", "Plant A (new)")
    assert after["updated_at"] > created["updated_at"] and after["created_at"] == created["created_at"]
    # Scheme and mode change together; the number works as well as the name.
    secured = tenant.admin.patch(path, json={"uri_scheme": "coaps", "port": 5684, "security_mode": 2})
    assert secured.status_code == 200, secured.text
    assert (secured.json()["uri"], secured.json()["security_mode"]) == (f"coaps://{name}:5684", "CERTIFICATE")
    unchanged = tenant.admin.patch(path, json={})
    assert unchanged.status_code == 200 and unchanged.json() == secured.json()

    deleted = tenant.admin.delete(path)
    assert deleted.status_code == 204, deleted.text
    native_error(tenant.admin.get(path), 404)
    native_error(tenant.admin.delete(path), 404)
    assert created["id"] not in {entry["id"] for entry in listed(tenant.admin, org)}

    history = [(event["kind"], event["detail"].get("server_id")) for event in kinds(tenant.admin, org)]
    assert history[0] == ("management_server.created", created["id"])
    assert history[-3:] == [
        ("management_server.updated", created["id"]), ("management_server.updated", created["id"]),
        ("management_server.deleted", created["id"]),
    ]
    events = kinds(tenant.admin, org)
    first_update = events[-3]
    assert first_update["detail"]["fields"] == ["binding", "lifetime", "name"] and first_update["actor"]
    assert events[-1]["detail"]["devices_reassigned"] == 0
    assert events[0]["detail"]["uri"] == f"coap://{name}:5683" and events[0]["detail"]["security_mode"] == "NOSEC"


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "n" * 129}, "name"),
    ({"address": "coap://mgmt.example.com"}, "address"),
    ({"address": "mgmt.example.com:5683"}, "address"),
    ({"address": "mgmt example.com"}, "address"),
    ({"address": ""}, "address"),
    ({"address": "-mgmt.example.com"}, "address"),
    ({"address": "256.1.1.1"}, "address"),
    ({"address": "a" * 254}, "address"),
    ({"address": "fe80::1%eth0"}, "address"),
    ({"address": "[192.0.2.1]"}, "address"),
    ({"address": "mgmt.example.com/path"}, "address"),
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"uri_scheme": "http"}, "uri_scheme"),
    ({"security_mode": 7}, "security_mode"),
    ({"security_mode": "tls"}, "security_mode"),
    ({"short_server_id": 0}, "short_server_id"),
    ({"short_server_id": 65535}, "short_server_id"),
    ({"lifetime": 0}, "lifetime"),
    ({"lifetime": 10 * 365 * 86400 + 1}, "lifetime"),
    ({"binding": "X"}, "binding"),
    ({"binding": "UU"}, "binding"),
    ({"binding": ""}, "binding"),
    ({"uri_scheme": "coaps", "security_mode": "NOSEC"}, "security_mode"),
    ({"uri_scheme": "coap", "security_mode": "PSK"}, "security_mode"),
    ({"port": 5684, "security_mode": 3, "uri_scheme": "coaps"}, "security_mode"),
]


def test_each_bad_field_is_refused_and_nothing_changes(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    existing = create(tenant.admin, org)
    path = servers_path(org, f"/{existing['id']}")
    before = listed(tenant.admin, org)
    events_before = kinds(tenant.admin, org)
    for bad, field in BAD_FIELDS:
        body = {"name": "ok", "address": host(), "port": 5683, **bad}
        native_error(tenant.admin.post(servers_path(org), json=body), 400, field)
        native_error(tenant.admin.patch(path, json=bad), 400, field)
    for missing in ("name", "address", "port"):
        body = {key: value for key, value in {"name": "ok", "address": host(), "port": 5683}.items() if key != missing}
        native_error(tenant.admin.post(servers_path(org), json=body), 400, missing)
    # Wrong types and unknown fields are the native API's usual 422.
    native_error(tenant.admin.post(servers_path(org), json={"name": "ok", "address": host(), "port": "many"}), 422)
    native_error(tenant.admin.patch(path, json={"name": None}), 422)
    native_error(tenant.admin.patch(path, json={"colour": "red"}), 422)
    # A coaps definition cannot drop its security mode alone.
    secure = create(tenant.admin, org, port=5684)
    native_error(tenant.admin.patch(servers_path(org, f"/{secure['id']}"), json={"security_mode": "NOSEC"}), 400, "security_mode")
    after = listed(tenant.admin, org)
    assert after[0] == before[0] and sorted(after[1:], key=by_id) == sorted([*before[1:], secure], key=by_id)
    assert len(kinds(tenant.admin, org)) == len(events_before) + 1


def test_duplicates_are_a_conflict_within_an_organisation_only(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    first = create(tenant.admin, org)
    second = create(tenant.admin, org, address=first["address"], port=5684)
    clash = tenant.admin.post(servers_path(org), json={"name": "again", "address": first["address"].upper(), "port": 5683})
    assert "already" in native_error(clash, 409)
    # The same server may be defined by another organisation.
    create(other_tenant.admin, other_tenant.org_id, address=first["address"], port=5683)
    moved = tenant.admin.patch(servers_path(org, f"/{second['id']}"), json={"port": 5683, "uri_scheme": "coap", "security_mode": "NOSEC"})
    native_error(moved, 409)
    assert tenant.admin.get(servers_path(org, f"/{second['id']}")).json() == second
    entries = listed(tenant.admin, org)
    assert entries[0]["id"] == "default" and sorted(entries[1:], key=by_id) == sorted([first, second], key=by_id)


# --- permissions and tenants ---------------------------------------------------------------------


def test_roles_and_other_tenants(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    org = tenant.org_id
    own = create(tenant.admin, org)
    path = servers_path(org, f"/{own['id']}")
    device = new_device(tenant.admin, org, name="d")
    # A viewer reads, and changes nothing.
    assert tenant.viewer.get(path).status_code == 200
    native_error(tenant.viewer.post(servers_path(org), json={"name": "v", "address": host(), "port": 5683}), 403)
    native_error(tenant.viewer.patch(path, json={"name": "v"}), 403)
    native_error(tenant.viewer.delete(path), 403)
    native_error(assign(tenant.viewer, org, device["id"], own["id"]), 403)
    dmp_error(tenant.viewer.post("/api/bootstrap", json={"name": "v", "address": host(), "port": 5683}), 403)
    dmp_error(tenant.viewer.put(f"/api/bootstrap/{own['id']}", json={"name": "v"}), 403)
    dmp_error(tenant.viewer.delete(f"/api/bootstrap/{own['id']}"), 403)

    other = other_tenant.admin
    theirs = create(other, other_tenant.org_id)
    their_device = new_device(other, other_tenant.org_id, name="theirs")
    for response in (
        other.get(servers_path(org)), other.get(path), other.patch(path, json={"name": "x"}), other.delete(path),
        other.post(servers_path(org), json={"name": "x", "address": host(), "port": 5683}),
        other.get(servers_path(other_tenant.org_id, f"/{own['id']}")),
        other.patch(servers_path(other_tenant.org_id, f"/{own['id']}"), json={"name": "x"}),
        other.delete(servers_path(other_tenant.org_id, f"/{own['id']}")),
        assign(other, other_tenant.org_id, their_device["id"], own["id"]),
        assign(other, org, device["id"], theirs["id"]),
        assign(tenant.admin, org, device["id"], theirs["id"]),
    ):
        message = native_error(response, 404)
        assert own["address"] not in message and theirs["address"] not in response.text
    for response in (other.get(f"/api/bootstrap/{own['id']}"), other.put(f"/api/bootstrap/{own['id']}", json={"name": "x"}),
                     other.delete(f"/api/bootstrap/{own['id']}"),
                     other.post("/api/bootstrap", json={"name": "x", "address": host(), "port": 5683, "company_id": org})):
        dmp_error(response, 404)
    assert own["id"] not in {entry["id"] for entry in dmp_ok(other.get("/api/bootstrap"))}
    assert dmp_ok(other.get("/api/bootstrap", params={"Address": own["address"]})) == []
    assert tenant.admin.get(path).json() == own
    assert native_device(tenant.admin, org, device["id"])["management_server_id"] == "default"
    assert native_device(other, other_tenant.org_id, their_device["id"])["management_server_id"] == "default"


# --- assignment ----------------------------------------------------------------------------------


def test_assignment_and_fallback_when_a_definition_is_deleted(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    first, second = create(tenant.admin, org), create(tenant.admin, org)
    devices = [new_device(tenant.admin, org, name=f"d{index}") for index in range(3)]
    assert all(device["management_server_id"] == "default" for device in devices)
    for device in devices[:2]:
        response = assign(tenant.member, org, device["id"], first["id"])
        assert response.status_code == 200, response.text
        assert response.json()["id"] == device["id"] and response.json()["management_server_id"] == first["id"]
    assert assign(tenant.admin, org, devices[2]["id"], second["id"]).json()["management_server_id"] == second["id"]
    # "default" clears an assignment; unknown ids change nothing.
    assert assign(tenant.admin, org, devices[2]["id"], "default").json()["management_server_id"] == "default"
    assert assign(tenant.admin, org, devices[2]["id"], second["id"]).status_code == 200
    native_error(assign(tenant.admin, org, devices[2]["id"], str(uuid.uuid4())), 404)
    native_error(assign(tenant.admin, org, str(uuid.uuid4()), first["id"]), 404)
    native_error(tenant.admin.put(f"/api/v1/orgs/{org}/devices/{devices[0]['id']}/management-server", json={}), 422)
    page = tenant.admin.get(f"/api/v1/orgs/{org}/devices", params={"limit": 100}).json()["devices"]
    assert {device["id"]: device["management_server_id"] for device in page} == {
        devices[0]["id"]: first["id"], devices[1]["id"]: first["id"], devices[2]["id"]: second["id"],
    }

    assert tenant.admin.delete(servers_path(org, f"/{first['id']}")).status_code == 204
    after = {device["id"]: native_device(tenant.admin, org, device["id"])["management_server_id"] for device in devices}
    assert after == {devices[0]["id"]: "default", devices[1]["id"]: "default", devices[2]["id"]: second["id"]}

    events = kinds(tenant.admin, org)
    assigned = [event for event in events if event["kind"] == "management_server.assigned"]
    assert [(event["device_id"], event["detail"]["server_id"], event["detail"]["previous_server_id"]) for event in assigned] == [
        (devices[0]["id"], first["id"], "default"), (devices[1]["id"], first["id"], "default"),
        (devices[2]["id"], second["id"], "default"), (devices[2]["id"], "default", second["id"]),
        (devices[2]["id"], second["id"], "default"),
    ]
    assert assigned[0]["detail"]["uri"] == first["uri"] and assigned[3]["detail"]["uri"] == server.lwm2m_uri
    (deleted,) = [event for event in events if event["kind"] == "management_server.deleted"]
    assert deleted["detail"] == {"server_id": first["id"], "name": first["name"], "uri": first["uri"], "devices_reassigned": 2}


# --- WebAccess/DMP ---------------------------------------------------------------------------------


def test_dmp_definitions(server: ServerProcess, tenant: Tenant) -> None:
    org, client = tenant.org_id, tenant.admin
    address = host()
    created = dmp_ok(client.post("/api/bootstrap", json={"name": "Server 2", "address": address, "port": 5684, "company_id": org}))
    assert set(created) == DMP_FIELDS
    assert (created["company_id"], created["uri"], created["uri_scheme"], created["security_mode"]) == (
        org, f"coaps://{address}:5684", "coaps", "CERTIFICATE",
    )
    # company_id may be left out by a caller of one organisation; field names ignore case.
    plain = dmp_ok(client.post("/api/bootstrap", json={"Name": "Server 3", "Address": host(), "Port": 5683}))
    assert (plain["company_id"], plain["uri_scheme"], plain["security_mode"]) == (org, "coap", "NOSEC")
    # Found by address, either spelling of the query parameter.
    assert dmp_ok(client.get("/api/bootstrap", params={"Address": address})) == [created]
    assert dmp_ok(client.get("/api/bootstrap", params={"address": address.upper()})) == [created]
    assert dmp_ok(client.get("/api/bootstrap", params={"Address": host()})) == []
    everything = dmp_ok(client.get("/api/bootstrap"))
    assert everything[0]["id"] == "default" and {created["id"], plain["id"]} <= {entry["id"] for entry in everything}
    assert dmp_ok(client.get("/api/bootstrap", params={"Address": "127.0.0.1"}))[0]["uri"] == server.lwm2m_uri
    # The native API shows the same definition.
    native = client.get(servers_path(org, f"/{created['id']}")).json()
    assert (native["uri"], native["security_mode"]) == (created["uri"], "CERTIFICATE")
    assert dmp_ok(tenant.viewer.get(f"/api/bootstrap/{created['id']}")) == created

    # A new port sets the scheme and mode as on creation.
    moved = dmp_ok(client.put(f"/api/bootstrap/{created['id']}", json={"port": 5683, "name": "Server 2b", "company_id": org}))
    assert (moved["uri"], moved["security_mode"], moved["name"]) == (f"coap://{address}:5683", "NOSEC", "Server 2b")
    renamed = dmp_ok(client.put(f"/api/bootstrap/{created['id']}", json={"NAME": "Server 2c"}))
    assert (renamed["name"], renamed["port"]) == ("Server 2c", 5683)

    # Errors: the DMP error shape, and nothing created or changed.
    before = dmp_ok(client.get("/api/bootstrap"))
    for body in ({"name": "x", "address": "coap://h", "port": 5683}, {"name": "x", "address": host(), "port": 70000},
                 {"name": "x", "address": host()}, {"name": "x", "address": host(), "port": 5683, "colour": "red"},
                 {"name": "x", "address": host(), "port": 5683, "company_id": str(uuid.uuid4())},
                 {"name": "x", "Name": "y", "address": host(), "port": 5683}):
        dmp_error(client.post("/api/bootstrap", json=body), 404 if "company_id" in body else 400)
    assert "address" in dmp_error(client.put(f"/api/bootstrap/{created['id']}", json={"address": "h:1"}), 400)
    dmp_error(client.get("/api/bootstrap", params={"Address": "a", "address": "b"}), 400)
    dmp_error(client.get(f"/api/bootstrap/{uuid.uuid4()}"), 404)
    assert dmp_ok(client.get("/api/bootstrap")) == before

    device = new_device(client, org, name="dmp", mac_address="02:00:5E:10:00:01")
    assert dmp_ok(assign_by_mac(client, "02:00:5e:10:00:01", plain["id"]))["server_id"] == plain["id"]
    removed = dmp_ok(client.delete(f"/api/bootstrap/{plain['id']}"))
    assert removed == {"id": plain["id"], "devices_reassigned": 1}
    assert native_device(client, org, device["id"])["management_server_id"] == "default"
    dmp_error(client.get(f"/api/bootstrap/{plain['id']}"), 404)


def test_dmp_caller_of_several_organisations_names_the_company(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    body = {"name": "x", "address": host(), "port": 5683}
    member = member_of_both(server, root, tenant, other_tenant)
    try:
        message = dmp_error(member.post("/api/bootstrap", json=body), 400)
        assert "company_id" in message and "several" in message
        created = dmp_ok(member.post("/api/bootstrap", json={**body, "company_id": other_tenant.org_id}))
        assert created["company_id"] == other_tenant.org_id
    finally:
        member.close()


def member_of_both(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> Api:
    """The tenant's member, made a member of the other tenant too (by the system administrator)."""
    users = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/users").json()
    email = next(user["email"] for user in users if user["role"] == "member")
    added = root.post(f"/api/v1/orgs/{other_tenant.org_id}/users", json={"email": email, "password": "password-member", "role": "member"})
    assert added.status_code == 201, added.text
    return Api.login(server.url, email, "password-member")


def test_dmp_assignment_by_mac(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    org, other_org = tenant.org_id, other_tenant.org_id
    mac = f"02:00:5e:{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:2]}"
    target = create(tenant.admin, org)
    mine = new_device(tenant.admin, org, name="mine", mac_address=mac.upper())
    theirs = new_device(other_tenant.admin, other_org, name="theirs", mac_address=mac.replace(":", "-"))
    # Case and separators do not matter; the other tenant's device with the same address is not seen.
    data = dmp_ok(assign_by_mac(tenant.member, mac.replace(":", ""), target["id"]))
    assert data == {"device_id": mine["id"], "mac_address": mac.upper(), "company_id": org, "server_id": target["id"],
                    "uri": target["uri"]}
    assert native_device(tenant.admin, org, mine["id"])["management_server_id"] == target["id"]
    assert dmp_ok(assign_by_mac(tenant.admin, mac, "default"))["uri"] == server.lwm2m_uri
    assert native_device(tenant.admin, org, mine["id"])["management_server_id"] == "default"
    # Unknown addresses, servers of another organisation, callers who may not write: 404.
    dmp_error(assign_by_mac(tenant.admin, "02:00:5e:ff:ff:ff", target["id"]), 404)
    dmp_error(assign_by_mac(tenant.admin, mac, str(uuid.uuid4())), 404)
    dmp_error(assign_by_mac(other_tenant.admin, mac, target["id"]), 404)
    dmp_error(assign_by_mac(tenant.viewer, mac, target["id"]), 404)
    assert native_device(other_tenant.admin, other_org, theirs["id"])["management_server_id"] == "default"

    # A caller who may write in both organisations sees two devices: the native route must name one.
    member = member_of_both(server, root, tenant, other_tenant)
    try:
        message = dmp_error(assign_by_mac(member, mac, target["id"]), 409)
        assert mine["id"] in message and theirs["id"] in message and "/management-server" in message
        assert native_device(tenant.admin, org, mine["id"])["management_server_id"] == "default"
        assert assign(member, org, mine["id"], target["id"]).json()["management_server_id"] == target["id"]
    finally:
        member.close()
    events = [event for event in kinds(tenant.admin, org) if event["kind"] == "management_server.assigned"]
    assert [(event["device_id"], event["detail"]["server_id"]) for event in events] == [
        (mine["id"], target["id"]), (mine["id"], "default"), (mine["id"], target["id"]),
    ]
    assert not [event for event in kinds(other_tenant.admin, other_org) if event["kind"] == "management_server.assigned"]


# --- device output and the bootstrap server ----------------------------------------------------


def test_last_bootstrap_shows_the_newest_attempt(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    external_id, key = unique(), unique("key")
    created = tenant.admin.post(f"/{org}/clients/configs", json={"external_id": external_id, "external_key": key, "channels": [channel]})
    assert created.status_code == 201, created.text
    device_id = created.headers["location"].removeprefix("/clients/configs/")
    fresh = native_device(tenant.admin, org, device_id)
    assert (fresh["last_bootstrap"], fresh["last_bootstrap_at"], fresh["management_server_id"]) == (None, None, "default")

    # Refused while inactive.
    assert device_get(server.url, f"/clients/bootstrap/{external_id}", f"Client {key}").status_code == 403
    refused = native_device(tenant.admin, org, device_id)["last_bootstrap"]
    assert (refused["outcome"], refused["reason"], refused["door"]) == ("refused", "device inactive", "magistrala")
    assert tenant.admin.put(f"/{org}/clients/state/{device_id}", json={"state": 1}).status_code == 200
    assert device_get(server.url, f"/clients/bootstrap/{external_id}", f"Client {key}").status_code == 200
    served = native_device(tenant.admin, org, device_id)
    assert {key: value for key, value in served["last_bootstrap"].items() if key != "at"} == {
        "outcome": "ok", "reason": None, "door": "magistrala",
    }
    assert served["last_bootstrap"]["at"] == served["last_bootstrap_at"] and served["last_bootstrap"]["at"] > refused["at"]
    # A later refusal shows in last_bootstrap; last_bootstrap_at keeps the last success.
    assert device_get(server.url, f"/clients/bootstrap/{external_id}", "Client wrong-key").status_code == 403
    after = native_device(tenant.admin, org, device_id)
    assert (after["last_bootstrap"]["outcome"], after["last_bootstrap"]["reason"]) == ("refused", "wrong external key")
    assert after["last_bootstrap_at"] == served["last_bootstrap_at"]
    # The list shows the same, for each device of the page.
    other = new_device(tenant.admin, org, name="never")
    page = tenant.admin.get(f"/api/v1/orgs/{org}/devices", params={"limit": 100}).json()["devices"]
    by_id = {device["id"]: device for device in page}
    assert by_id[device_id]["last_bootstrap"] == after["last_bootstrap"] and by_id[other["id"]]["last_bootstrap"] is None


def test_the_bootstrap_server_hands_out_the_assigned_definition(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    endpoint = unique("ep")
    device = new_device(tenant.admin, org, name="lwm2m", endpoint=endpoint, state=1)
    assert packed_servers(server, endpoint) == {"uri": server.lwm2m_uri, "mode": 3, "ssid": 1, "lifetime": 86400, "binding": "U"}
    own = create(tenant.admin, org, short_server_id=7, lifetime=300, binding="UQ")
    assert assign(tenant.admin, org, device["id"], own["id"]).status_code == 200
    assert packed_servers(server, endpoint) == {"uri": own["uri"], "mode": 3, "ssid": 7, "lifetime": 300, "binding": "UQ"}
    done = native_device(tenant.admin, org, device["id"])["last_bootstrap"]
    assert (done["outcome"], done["door"]) == ("ok", "lwm2m")
    # A server that needs credentials is not given out over plain CoAP: refused, and the device shows why.
    secure = create(tenant.admin, org, port=5684)
    assert assign(tenant.admin, org, device["id"], secure["id"]).status_code == 200
    refused = bootstrap_pack(server, endpoint)
    assert refused.stdout == "" and refused.stderr.startswith("4.00"), refused
    failed = native_device(tenant.admin, org, device["id"])["last_bootstrap"]
    assert (failed["outcome"], failed["door"]) == ("refused", "lwm2m") and secure["uri"] in failed["reason"]
    assert failed["at"] > done["at"]
    # Deleting the assigned definition sends the device back to the default.
    assert tenant.admin.delete(servers_path(org, f"/{secure['id']}")).status_code == 204
    assert packed_servers(server, endpoint)["uri"] == server.lwm2m_uri


@pytest.mark.parametrize("path", ["/api/bootstrap", "/api/v1/orgs/x/management-servers"])
def test_routes_need_a_bearer(server: ServerProcess, path: str) -> None:
    response = httpx.get(server.url + path, timeout=30)
    assert response.status_code == 401, response.text
