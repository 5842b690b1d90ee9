"""Mainflux 0.13 bootstrap paths (``/things/...``): ``thing_id`` in requests, ``mainflux_*`` in responses,
``{"error": ...}`` bodies, ``Thing <key>`` or a bare key on device routes, the hex-decoded (AES-128)
secure-bootstrap key, and the organisation chosen from the caller (or ``X-Pilotboat-Org``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from compat_helpers import (
    cli,
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
from harness import ENCRYPT_KEY, Api, ServerProcess, Tenant
from pilotboat.security import secure_bootstrap

MAINFLUX_KEY = secure_bootstrap.mainflux_key(ENCRYPT_KEY)  # hex-decoded: AES-128
VIEW_FIELDS = {"mainflux_id", "mainflux_channels", "external_id", "content", "name", "state", "client_cert", "ca_cert"}
BOOTSTRAP_FIELDS = {"mainflux_id", "mainflux_key", "mainflux_channels", "content", "client_cert", "client_key", "ca_cert"}


def create(client: Api, channels: list[str], headers: dict[str, str] | None = None, **fields: Any) -> tuple[str, dict[str, Any]]:
    body = {"external_id": unique(), "external_key": unique("key"), "channels": channels, **fields}
    response = client.post("/things/configs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.content == b""
    location = response.headers["location"]
    assert location.startswith("/things/configs/"), location
    return location.removeprefix("/things/configs/"), body


def view(client: Api, config_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = client.get(f"/things/configs/{config_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def set_state(client: Api, config_id: str, state: int) -> None:
    response = client.put(f"/things/state/{config_id}", json={"state": state})
    assert response.status_code == 200, response.text
    assert response.content == b""


def bootstrap(server: ServerProcess, external_id: str, authorization: str | None) -> Any:
    return device_get(server.url, f"/things/bootstrap/{external_id}", authorization)


def secure_get(server: ServerProcess, external_id: str, authorization: str | None) -> Any:
    return device_get(server.url, f"/things/bootstrap/secure/{external_id}", authorization)


def encrypted(external_key: str, key: bytes = MAINFLUX_KEY) -> str:
    return secure_bootstrap.encrypt(key, external_key.encode()).hex()


def token_of(client: Api) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


# --- management ---------------------------------------------------------------------------------


def test_create_view_list(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org, metadata={"type": "data"})
    config_id, body = create(tenant.admin, [channel["id"]], name="thing-one", content="c1", client_cert="CC", ca_cert="CA",
                             client_key="CK")
    seen = view(tenant.admin, config_id)
    assert seen == {
        "mainflux_id": config_id,
        "mainflux_channels": [{"id": channel["id"], "name": channel["name"], "metadata": {"type": "data"}}],
        "external_id": body["external_id"],
        "content": "c1",
        "name": "thing-one",
        "state": 0,
        "client_cert": "CC",
        "ca_cert": "CA",
    }
    assert "CK" not in json.dumps(seen) and body["external_key"] not in json.dumps(seen)
    # The config lives in the caller's only organisation.
    assert native_device(tenant.admin, org, config_id)["external_id"] == body["external_id"]
    page = tenant.admin.get("/things/configs").json()
    assert (page["total"], page["offset"], page["limit"]) == (1, 0, 10)
    assert [set(item) for item in page["configs"]] == [VIEW_FIELDS]
    assert page["configs"][0]["mainflux_id"] == config_id
    for params in ({"limit": 101}, {"limit": -1}, {"offset": -1}):
        assert_error(tenant.admin.get("/things/configs", params=params), 400, "error")


def test_list_filters_and_paging(server: ServerProcess, tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)["id"]
    ids = [create(tenant.admin, [channel], name=f"Meter-{i}")[0] for i in range(11)]
    other, other_body = create(tenant.admin, [channel], name="gateway")
    set_state(tenant.admin, other, 1)
    first = tenant.admin.get("/things/configs").json()
    second = tenant.admin.get("/things/configs", params={"offset": 10}).json()
    assert first["total"] == second["total"] == 12
    assert len(first["configs"]) == 10 and len(second["configs"]) == 2
    assert {c["mainflux_id"] for c in first["configs"] + second["configs"]} == set(ids) | {other}
    named = tenant.admin.get("/things/configs", params={"name": "meter", "limit": 100}).json()
    assert named["total"] == 11 and {c["mainflux_id"] for c in named["configs"]} == set(ids)
    active = tenant.admin.get("/things/configs", params={"state": 1}).json()
    assert [c["mainflux_id"] for c in active["configs"]] == [other]
    exact = tenant.admin.get("/things/configs", params={"external_id": other_body["external_id"]}).json()
    assert [c["mainflux_id"] for c in exact["configs"]] == [other]


def test_create_with_thing_id(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    device = new_device(tenant.admin, org, name="legacy-thing")
    config_id, body = create(tenant.admin, [channel], thing_id=device["id"])
    assert config_id == device["id"]
    assert view(tenant.admin, config_id)["name"] == "legacy-thing"
    set_state(tenant.admin, config_id, 1)
    served = bootstrap(server, body["external_id"], f"Thing {body['external_key']}").json()
    assert (served["mainflux_id"], served["mainflux_key"]) == (device["id"], device["client_secret"])
    # client_id is the Magistrala name, unknown here.
    again = {"external_id": unique(), "external_key": "k", "channels": [channel], "client_id": device["id"]}
    assert "client_id" in assert_error(tenant.admin.post("/things/configs", json=again), 400, "error")
    unknown = {**again, "thing_id": "00000000-0000-0000-0000-000000000000"}
    del unknown["client_id"]
    assert_error(tenant.admin.post("/things/configs", json=unknown), 404, "error")


def test_create_errors(server: ServerProcess, tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)["id"]
    _, body = create(tenant.admin, [channel])
    assert_error(tenant.admin.post("/things/configs", json=body), 409, "error")
    fresh = {**body, "external_id": unique()}
    assert_error(tenant.admin.post("/things/configs", json={**fresh, "channels": []}), 400, "error")
    assert_error(tenant.admin.post("/things/configs", json={**fresh, "channels": ["no-such-channel"]}), 404, "error")
    assert_error(tenant.admin.post("/things/configs", json={}), 400, "error")
    assert "mainflux_key" in assert_error(tenant.admin.post("/things/configs", json={**fresh, "mainflux_key": "x"}), 400, "error")
    malformed = tenant.admin.post("/things/configs", content=b"[1,", headers={"Content-Type": "application/json"})
    assert_error(malformed, 400, "error")
    wrong_type = tenant.admin.post("/things/configs", content=json.dumps(fresh).encode(), headers={"Content-Type": "text/plain"})
    assert_error(wrong_type, 415, "error")
    assert tenant.admin.get("/things/configs").json()["total"] == 1


def test_update_certs_connections_state_delete(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    a, b = (new_channel(tenant.admin, org)["id"] for _ in range(2))
    config_id, body = create(tenant.admin, [a], name="n0")
    update = tenant.admin.put(f"/things/configs/{config_id}", json={"name": "n1", "content": "c1"})
    assert update.status_code == 200 and update.content == b""
    assert_error(tenant.admin.put(f"/things/configs/{config_id}", json={}), 400, "error")
    assert_error(tenant.admin.put("/things/configs/no-such-config", json={"name": "x"}), 404, "error")
    certs = tenant.admin.patch(f"/things/configs/certs/{config_id}", json={"client_cert": "c", "client_key": "k", "ca_cert": "a"})
    assert certs.status_code == 200, certs.text
    assert certs.json() == {"mainflux_id": config_id, "client_cert": "c", "client_key": "k", "ca_cert": "a"}
    seen = view(tenant.admin, config_id)
    assert (seen["name"], seen["content"], seen["client_cert"], seen["ca_cert"]) == ("n1", "c1", "c", "a")

    conns = tenant.admin.put(f"/things/configs/connections/{config_id}", json={"channels": [a, b]})
    assert conns.status_code == 200 and conns.content == b""
    assert connections(tenant.admin, org, config_id) == {a: False, b: False}
    set_state(tenant.admin, config_id, 1)
    assert connections(tenant.admin, org, config_id) == {a: True, b: True}
    assert tenant.admin.put(f"/things/configs/connections/{config_id}", json={"channels": [b]}).status_code == 200
    assert connections(tenant.admin, org, config_id) == {b: True}
    set_state(tenant.admin, config_id, 0)
    assert connections(tenant.admin, org, config_id) == {b: False}
    for bad in ({"state": 2}, {"state": "x"}, {"state": "0"}, {"state": False}, {}):
        assert_error(tenant.admin.put(f"/things/state/{config_id}", json=bad), 400, "error")
    assert_error(tenant.admin.put("/things/state/no-such-config", json={"state": 1}), 404, "error")

    deleted = tenant.admin.delete(f"/things/configs/{config_id}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(tenant.admin.get(f"/things/configs/{config_id}"), 404, "error")
    assert tenant.admin.delete(f"/things/configs/{config_id}").status_code == 204
    assert tenant.admin.delete("/things/configs/no-such-config").status_code == 204
    assert bootstrap(server, body["external_id"], f"Thing {body['external_key']}").status_code == 404


def test_same_configs_through_both_doors(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org)["id"]
    created = tenant.admin.post(f"/{org}/clients/configs", json={"external_id": unique(), "external_key": "k", "channels": [channel]})
    assert created.status_code == 201
    config_id = created.headers["location"].rsplit("/", 1)[1]
    seen = view(tenant.admin, config_id)
    assert seen["mainflux_id"] == config_id and [c["id"] for c in seen["mainflux_channels"]] == [channel]
    mainflux_id, _ = create(tenant.admin, [channel])
    magistrala = tenant.admin.get(f"/{org}/clients/configs/{mainflux_id}")
    assert magistrala.status_code == 200 and magistrala.json()["client_id"] == mainflux_id


# --- authentication and organisations -----------------------------------------------------------


def test_bearer_token_with_or_without_scheme(server: ServerProcess, tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)["id"]
    config_id, _ = create(tenant.admin, [channel])
    with Api(server.url) as bare:
        listed = bare.get("/things/configs", headers={"Authorization": token_of(tenant.admin)})
        assert listed.status_code == 200, listed.text
        assert [c["mainflux_id"] for c in listed.json()["configs"]] == [config_id]
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "nope"}, {"Authorization": f"Thing {token_of(tenant.admin)}"}):
            assert_error(bare.get("/things/configs", headers=headers), 401, "error")
            assert_error(bare.get(f"/things/configs/{config_id}", headers=headers), 401, "error")
            assert_error(bare.put(f"/things/state/{config_id}", json={"state": 1}, headers=headers), 401, "error")
            assert_error(bare.post("/things/configs", json={"external_id": unique()}, headers=headers), 401, "error")
    assert view(tenant.admin, config_id)["state"] == 0


def test_other_tenant_sees_nothing(server: ServerProcess, tenant: Tenant, other_tenant: Tenant) -> None:
    channel = new_channel(tenant.admin, tenant.org_id)["id"]
    config_id, _ = create(tenant.admin, [channel], name="mine")
    intruder = other_tenant.admin
    assert intruder.get("/things/configs").json()["total"] == 0
    assert_error(intruder.get(f"/things/configs/{config_id}"), 404, "error")
    assert_error(intruder.put(f"/things/configs/{config_id}", json={"name": "stolen"}), 404, "error")
    assert_error(intruder.put(f"/things/state/{config_id}", json={"state": 1}), 404, "error")
    assert intruder.delete(f"/things/configs/{config_id}").status_code == 204
    # Naming the victim's organisation in the header does not help.
    victim = {"X-Pilotboat-Org": tenant.org_id}
    response = intruder.get("/things/configs", headers=victim)
    assert response.status_code in (403, 404) and "configs" not in response.text
    assert intruder.get(f"/things/configs/{config_id}", headers=victim).status_code in (403, 404)
    seen = view(tenant.admin, config_id)
    assert (seen["name"], seen["state"]) == ("mine", 0)


def test_user_in_two_organisations_names_one(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    email = tenant.admin.get("/api/v1/me").json()["email"]
    joined = root.post(f"/api/v1/orgs/{other_tenant.org_id}/users", json={"email": email, "password": "password-admin", "role": "member"})
    assert joined.status_code == 201, joined.text
    user = tenant.admin
    channel = new_channel(user, tenant.org_id)["id"]
    other_channel = new_channel(other_tenant.admin, other_tenant.org_id)["id"]

    message = assert_error(user.get("/things/configs"), 400, "error")
    assert "X-Pilotboat-Org" in message
    assert_error(user.post("/things/configs", json={"external_id": unique(), "external_key": "k", "channels": [channel]}), 400, "error")

    home = {"X-Pilotboat-Org": tenant.org_id}
    away = {"X-Pilotboat-Org": other_tenant.org_id}
    home_id, _ = create(user, [channel], headers=home)
    away_id, _ = create(user, [other_channel], headers=away)
    assert [c["mainflux_id"] for c in user.get("/things/configs", headers=home).json()["configs"]] == [home_id]
    assert [c["mainflux_id"] for c in user.get("/things/configs", headers=away).json()["configs"]] == [away_id]
    assert view(user, away_id, headers=away)["mainflux_id"] == away_id
    assert_error(user.get(f"/things/configs/{away_id}", headers=home), 404, "error")
    assert native_device(other_tenant.admin, other_tenant.org_id, away_id)["id"] == away_id
    # A channel of the other organisation cannot go into this one's config.
    bad = {"external_id": unique(), "external_key": "k", "channels": [other_channel]}
    assert_error(user.post("/things/configs", json=bad, headers=home), 404, "error")
    # An organisation the caller is not in.
    stranger = {"X-Pilotboat-Org": "00000000-0000-0000-0000-000000000000"}
    assert_error(user.get("/things/configs", headers=stranger), 404, "error")


# --- device routes ------------------------------------------------------------------------------


def test_bootstrap(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    channel = new_channel(tenant.admin, org, name="telemetry", metadata={"q": 1})
    config_id, body = create(tenant.admin, [channel["id"]], content="cfg", client_cert="CC", client_key="CK", ca_cert="CA")
    ext, key = body["external_id"], body["external_key"]
    assert "inactive" in assert_error(bootstrap(server, ext, f"Thing {key}"), 403, "error")
    set_state(tenant.admin, config_id, 1)
    response = bootstrap(server, ext, f"Thing {key}")
    assert response.status_code == 200, response.text
    served = response.json()
    assert set(served) == BOOTSTRAP_FIELDS
    assert served["mainflux_id"] == config_id and len(served["mainflux_key"]) >= 16
    assert served["mainflux_channels"] == [{"id": channel["id"], "name": "telemetry", "metadata": {"q": 1}}]
    assert (served["content"], served["client_cert"], served["client_key"], served["ca_cert"]) == ("cfg", "CC", "CK", "CA")
    # Mainflux 0.12 devices send the bare key.
    assert bootstrap(server, ext, key).json() == served
    # Same data as the Magistrala door, under the other names.
    magistrala = device_get(server.url, f"/clients/bootstrap/{ext}", f"Client {key}").json()
    assert (magistrala["client_id"], magistrala["client_secret"], magistrala["channels"]) == (
        served["mainflux_id"], served["mainflux_key"], served["mainflux_channels"],
    )

    assert_error(bootstrap(server, unique(), f"Thing {key}"), 404, "error")
    assert_error(bootstrap(server, ext, None), 401, "error")
    assert_error(bootstrap(server, ext, f"Thing {key}x"), 403, "error")
    assert_error(bootstrap(server, ext, "wrong"), 403, "error")
    assert_error(device_get(server.url, "/things/bootstrap/", f"Thing {key}"), 400, "error")


def test_secure_bootstrap(server: ServerProcess, tenant: Tenant) -> None:
    config_id, body = create(tenant.admin, [new_channel(tenant.admin, tenant.org_id)["id"]], content="secure-cfg")
    ext, key = body["external_id"], body["external_key"]
    set_state(tenant.admin, config_id, 1)
    plain = bootstrap(server, ext, f"Thing {key}").json()
    for header in (f"Thing {encrypted(key)}", encrypted(key)):
        response = secure_get(server, ext, header)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/octet-stream"
        assert json.loads(secure_bootstrap.decrypt(MAINFLUX_KEY, response.content)) == plain
    first, second = (secure_get(server, ext, f"Thing {encrypted(key)}").content for _ in range(2))
    assert first[:16] != second[:16]
    # The Magistrala (raw 32-byte) key is not the Mainflux key.
    magistrala_key = secure_bootstrap.magistrala_key(ENCRYPT_KEY)
    assert_error(secure_get(server, ext, f"Thing {encrypted(key, magistrala_key)}"), 403, "error")
    for bad in (f"Thing {'zz' * 20}", f"Thing {'00' * 8}", f"Thing {'00' * 16}", f"Thing {encrypted(key + 'x')}"):
        assert_error(secure_get(server, ext, bad), 403, "error")
    assert_error(secure_get(server, ext, None), 401, "error")
    assert_error(secure_get(server, unique(), f"Thing {encrypted(key)}"), 404, "error")
    assert_error(device_get(server.url, "/things/bootstrap/secure/", f"Thing {encrypted(key)}"), 400, "error")


def test_bootstrap_events(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    org = tenant.org_id
    config_id, body = create(tenant.admin, [new_channel(tenant.admin, org)["id"]])
    ext, key = body["external_id"], body["external_key"]
    assert bootstrap(server, ext, f"Thing {key}").status_code == 403
    assert bootstrap(server, ext, "Thing bad-thing-key").status_code == 403
    assert secure_get(server, ext, "Thing xyz").status_code == 403
    set_state(tenant.admin, config_id, 1)
    secret = bootstrap(server, ext, key).json()["mainflux_key"]
    assert secure_get(server, ext, encrypted(key)).status_code == 200
    unknown = unique()
    assert bootstrap(server, unknown, key).status_code == 404

    attempts = org_events(tenant.admin, org, kind="bootstrap.", device_id=config_id)
    assert [(e["outcome"], e["reason"], e["detail"].get("door")) for e in reversed(attempts)] == [
        ("refused", "device inactive", "mainflux"),
        ("refused", "wrong external key", "mainflux"),
        ("refused", "external key did not decrypt", "mainflux-secure"),
        ("ok", None, "mainflux"),
        ("ok", None, "mainflux-secure"),
    ]
    stray = by_device_actor(system_events(root, kind="bootstrap.failed"), unknown)
    assert [(e["org_id"], e["reason"]) for e in stray] == [(None, "unknown external_id")]
    everything = json.dumps(org_events(tenant.admin, org)) + json.dumps(system_events(root))
    for value in (key, secret, "bad-thing-key"):
        assert value not in everything
        assert value not in server.log()


# --- the CLI with --things ----------------------------------------------------------------------



@pytest.mark.parametrize("secure", [False, True], ids=["get", "secure"])
def test_cli_things(server: ServerProcess, tenant: Tenant, secure: bool) -> None:
    config_id, body = create(tenant.admin, [new_channel(tenant.admin, tenant.org_id)["id"]], content="from-cli")
    ext, key = body["external_id"], body["external_key"]
    set_state(tenant.admin, config_id, 1)
    expected = bootstrap(server, ext, f"Thing {key}").json()
    crypto = (ENCRYPT_KEY,) if secure else ()
    command = "secure" if secure else "get"
    done = cli(command, ext, key, *crypto, "--url", server.url, "--things")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == expected and printed["mainflux_id"] == config_id
    failed = cli(command, ext, "wrong-key", *crypto, "--url", server.url, "--things")
    assert failed.returncode != 0 and failed.stdout.strip() == ""
    assert "403" in failed.stderr and "Traceback" not in failed.stderr
