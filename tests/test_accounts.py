"""Native accounts API: log-in, access tokens, API keys, organisations, users and roles, first start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess, Tenant, json_of

BACKENDS = ["sqlite", "postgresql"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def login(base_url: str, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{base_url}/api/v1/auth/token", data={"username": email, "password": password}, timeout=30)


def add_user(client: Api, org_id: str, role: str = "member", *, password: str = "a-good-password") -> dict[str, Any]:
    email = f"{unique(role)}@pilotboat.test"
    response = client.post(f"/api/v1/orgs/{org_id}/users", json={"email": email, "password": password, "role": role})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["email"] == email
    return body


def members(client: Api, org_id: str) -> dict[str, str]:
    """user id -> role."""
    response = client.get(f"/api/v1/orgs/{org_id}/users")
    assert response.status_code == 200, response.text
    return {member["id"]: member["role"] for member in response.json()}


def error_detail(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = json_of(response)
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


# --- log-in and access tokens ----------------------------------------------------------------------


def test_login_returns_bearer_token(server: ServerProcess) -> None:
    response = login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert isinstance(body["access_token"], str) and len(body["access_token"]) > 20
    with Api(server.url, body["access_token"]) as client:
        me = client.get("/api/v1/me")
        assert me.status_code == 200, me.text
        assert me.json()["email"] == ADMIN_EMAIL
        assert me.json()["is_system_admin"] is True


def test_login_email_is_case_insensitive(server: ServerProcess) -> None:
    assert login(server.url, ADMIN_EMAIL.upper(), ADMIN_PASSWORD).status_code == 200


def test_wrong_password_and_unknown_user_get_the_same_401(server: ServerProcess) -> None:
    wrong_password = login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD + "!")
    unknown_user = login(server.url, f"{unique('nobody')}@pilotboat.test", ADMIN_PASSWORD)
    first = error_detail(wrong_password, 401)
    second = error_detail(unknown_user, 401)
    assert first == second
    assert "access_token" not in wrong_password.text


def test_login_requires_form_fields(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/api/v1/auth/token", data={"username": ADMIN_EMAIL}, timeout=30)
    assert response.status_code in (400, 422), response.text
    assert "access_token" not in response.text


def test_missing_and_garbage_credentials_are_401(server: ServerProcess) -> None:
    with Api(server.url) as anonymous:
        missing = anonymous.get("/api/v1/orgs")
        error_detail(missing, 401)
        assert missing.headers.get("www-authenticate", "").lower().startswith("bearer")
        for garbage in ("not-a-token", "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl", "pbk_0123456789abcdef_nope", "pbk_"):
            response = anonymous.get("/api/v1/orgs", headers={"Authorization": f"Bearer {garbage}"})
            error_detail(response, 401)


def test_token_signed_by_another_server_is_refused(server: ServerProcess, server_factory: Any) -> None:
    other = server_factory("sqlite")
    other.start()
    try:
        token = login(other.url, ADMIN_EMAIL, ADMIN_PASSWORD).json()["access_token"]
        with Api(other.url, token) as client:
            assert client.get("/api/v1/orgs").status_code == 200
        with Api(server.url, token) as client:
            error_detail(client.get("/api/v1/orgs"), 401)
    finally:
        other.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_is_refused_after_it_expires(backend: str, server_factory: Any) -> None:
    short = server_factory(backend, PILOTBOAT_TOKEN_TTL_SECONDS="2")
    short.start()
    try:
        response = login(short.url, ADMIN_EMAIL, ADMIN_PASSWORD)
        assert response.status_code == 200, response.text
        assert response.json()["expires_in"] == 2
        with Api(short.url, response.json()["access_token"]) as client:
            assert client.get("/api/v1/orgs").status_code == 200
            time.sleep(3.5)
            expired = client.get("/api/v1/orgs")
            error_detail(expired, 401)
        # A fresh log-in works again.
        assert login(short.url, ADMIN_EMAIL, ADMIN_PASSWORD).status_code == 200
    finally:
        short.stop()


# --- API keys --------------------------------------------------------------------------------------


def create_key(client: Api, **body: Any) -> httpx.Response:
    return client.post("/api/v1/api-keys", json={"name": unique("key"), **body})


def test_api_key_is_shown_once_and_works_as_bearer(server: ServerProcess, tenant: Tenant) -> None:
    created = create_key(tenant.member)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("pbk_")
    assert body["org_id"] is None and body["revoked_at"] is None and body["expires_at"] is None

    listed = tenant.member.get("/api/v1/api-keys")
    assert listed.status_code == 200
    [entry] = [key for key in listed.json() if key["id"] == body["id"]]
    assert entry["name"] == body["name"]
    assert "key" not in entry
    assert body["key"] not in listed.text
    assert body["key"].split("_", 2)[2] not in listed.text

    with Api(server.url, body["key"]) as keyed:
        me = keyed.get("/api/v1/me")
        assert me.status_code == 200, me.text
        assert me.json()["id"] == tenant.users["member"]
        devices = keyed.get(f"/api/v1/orgs/{tenant.org_id}/devices")
        assert devices.status_code == 200, devices.text


def test_api_key_with_expiry(tenant: Tenant) -> None:
    created = create_key(tenant.admin, expires_in_days=30)
    assert created.status_code == 201, created.text
    expires_at = datetime.fromisoformat(created.json()["expires_at"])
    expected = datetime.now(UTC) + timedelta(days=30)
    assert abs((expires_at - expected).total_seconds()) < 300
    for bad in (0, -1, 3651):
        error_detail(create_key(tenant.admin, expires_in_days=bad), 422)


def test_api_key_body_is_validated(tenant: Tenant) -> None:
    error_detail(tenant.admin.post("/api/v1/api-keys", json={"name": ""}), 422)
    error_detail(tenant.admin.post("/api/v1/api-keys", json={}), 422)
    error_detail(tenant.admin.post("/api/v1/api-keys", json={"name": "x", "scope": "all"}), 422)


def test_org_restricted_key_sees_only_its_org(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    # A user in two organisations (a system administrator may add an existing user to another org).
    user = add_user(root, tenant.org_id, "admin", password="two-orgs-password")
    again = root.post(
        f"/api/v1/orgs/{other_tenant.org_id}/users", json={"email": user["email"], "password": "ignored-password", "role": "member"}
    )
    assert again.status_code == 201, again.text
    assert again.json()["id"] == user["id"]
    with Api.login(server.url, user["email"], "two-orgs-password") as person:
        both = {org["id"] for org in person.get("/api/v1/orgs").json()}
        assert both == {tenant.org_id, other_tenant.org_id}

        created = create_key(person, org_id=tenant.org_id)
        assert created.status_code == 201, created.text
        assert created.json()["org_id"] == tenant.org_id
        with Api(server.url, created.json()["key"]) as keyed:
            orgs = keyed.get("/api/v1/orgs")
            assert orgs.status_code == 200
            assert [org["id"] for org in orgs.json()] == [tenant.org_id]
            assert keyed.get(f"/api/v1/orgs/{tenant.org_id}").status_code == 200
            assert keyed.get(f"/api/v1/orgs/{tenant.org_id}/devices").status_code == 200
            error_detail(keyed.get(f"/api/v1/orgs/{other_tenant.org_id}"), 404)
            error_detail(keyed.get(f"/api/v1/orgs/{other_tenant.org_id}/devices"), 404)
            error_detail(keyed.get(f"/api/v1/orgs/{other_tenant.org_id}/users"), 404)
            error_detail(keyed.post(f"/api/v1/orgs/{other_tenant.org_id}/devices", json={"name": "x"}), 404)

        # A key cannot be restricted to an organisation its owner does not belong to.
        error_detail(create_key(tenant.member, org_id=other_tenant.org_id), 404)


def test_org_restricted_key_of_system_admin_loses_deployment_powers(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    created = create_key(root, org_id=tenant.org_id)
    assert created.status_code == 201, created.text
    with Api(server.url, created.json()["key"]) as keyed:
        assert [org["id"] for org in keyed.get("/api/v1/orgs").json()] == [tenant.org_id]
        error_detail(keyed.post("/api/v1/orgs", json={"name": unique("org")}), 403)
        error_detail(keyed.get("/api/v1/events"), 403)
        default = [org for org in root.get("/api/v1/orgs").json() if org["name"] == "default"][0]
        error_detail(keyed.get(f"/api/v1/orgs/{default['id']}"), 404)
        assert keyed.get(f"/api/v1/orgs/{tenant.org_id}/users").status_code == 200


def test_revoked_key_is_refused(server: ServerProcess, tenant: Tenant) -> None:
    created = create_key(tenant.admin).json()
    with Api(server.url, created["key"]) as keyed:
        assert keyed.get("/api/v1/orgs").status_code == 200
        revoked = tenant.admin.delete(f"/api/v1/api-keys/{created['id']}")
        assert revoked.status_code == 204, revoked.text
        error_detail(keyed.get("/api/v1/orgs"), 401)
    [entry] = [key for key in tenant.admin.get("/api/v1/api-keys").json() if key["id"] == created["id"]]
    assert entry["revoked_at"] is not None
    # Revoking again is harmless; unknown ids are 404.
    assert tenant.admin.delete(f"/api/v1/api-keys/{created['id']}").status_code == 204
    error_detail(tenant.admin.delete("/api/v1/api-keys/0123456789abcdef"), 404)


def test_key_with_wrong_secret_is_refused(server: ServerProcess, tenant: Tenant) -> None:
    created = create_key(tenant.admin).json()
    prefix, key_id, secret = created["key"].split("_", 2)
    tampered = f"{prefix}_{key_id}_{secret[:-2]}{'AA' if not secret.endswith('AA') else 'BB'}"
    with Api(server.url, tampered) as keyed:
        error_detail(keyed.get("/api/v1/orgs"), 401)


def test_users_cannot_see_or_revoke_each_others_keys(tenant: Tenant) -> None:
    created = create_key(tenant.admin).json()
    assert created["id"] not in {key["id"] for key in tenant.member.get("/api/v1/api-keys").json()}
    error_detail(tenant.member.delete(f"/api/v1/api-keys/{created['id']}"), 404)
    [entry] = [key for key in tenant.admin.get("/api/v1/api-keys").json() if key["id"] == created["id"]]
    assert entry["revoked_at"] is None


@pytest.mark.parametrize("restricted", [True, False], ids=["org-key", "unrestricted-key"])
def test_api_keys_cannot_create_api_keys(server: ServerProcess, tenant: Tenant, restricted: bool) -> None:
    created = create_key(tenant.admin, **({"org_id": tenant.org_id} if restricted else {}))
    assert created.status_code == 201, created.text
    with Api(server.url, created.json()["key"]) as keyed:
        error_detail(create_key(keyed), 403)
        error_detail(create_key(keyed, org_id=tenant.org_id), 403)


# --- organisations ---------------------------------------------------------------------------------


def test_list_orgs_shows_only_the_callers_orgs(root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    for client, role in ((tenant.admin, "admin"), (tenant.member, "member"), (tenant.viewer, "viewer")):
        response = client.get("/api/v1/orgs")
        assert response.status_code == 200
        [org] = response.json()
        assert org["id"] == tenant.org_id and org["name"] == tenant.name and org["role"] == role
    every = {org["id"]: org["name"] for org in root.get("/api/v1/orgs").json()}
    assert every[tenant.org_id] == tenant.name
    assert every[other_tenant.org_id] == other_tenant.name
    assert "default" in every.values()


def test_create_org(root: Api, tenant: Tenant) -> None:
    name = unique("org")
    created = root.post("/api/v1/orgs", json={"name": name})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == name and body["id"]
    fetched = root.get(f"/api/v1/orgs/{body['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["name"] == name and fetched.json()["id"] == body["id"]
    assert name in {org["name"] for org in root.get("/api/v1/orgs").json()}

    duplicate = root.post("/api/v1/orgs", json={"name": name})
    error_detail(duplicate, 409)
    assert json_of(duplicate).get("field") == "name"
    error_detail(root.post("/api/v1/orgs", json={"name": f"  {name} "}), 409)


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "   "}, {}, {"name": "x" * 129}, {"name": "ok", "owner": "me"}])
def test_create_org_validation(root: Api, body: dict[str, Any]) -> None:
    error_detail(root.post("/api/v1/orgs", json=body), 422)


def test_only_system_admins_create_orgs(tenant: Tenant) -> None:
    for client in (tenant.admin, tenant.member, tenant.viewer):
        error_detail(client.post("/api/v1/orgs", json={"name": unique("org")}), 403)


def test_get_org_of_another_tenant_is_404(root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    assert tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}").status_code == 200
    error_detail(tenant.admin.get(f"/api/v1/orgs/{other_tenant.org_id}"), 404)
    error_detail(tenant.admin.get(f"/api/v1/orgs/{uuid.uuid4()}"), 404)
    error_detail(root.get(f"/api/v1/orgs/{uuid.uuid4()}"), 404)


# --- users -----------------------------------------------------------------------------------------


def test_org_admin_and_root_add_users(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    by_admin = add_user(tenant.admin, tenant.org_id, "viewer", password="viewer-password")
    assert by_admin["role"] == "viewer" and by_admin["is_system_admin"] is False
    by_root = add_user(root, tenant.org_id, "member")
    listed = members(tenant.viewer, tenant.org_id)
    assert listed[by_admin["id"]] == "viewer"
    assert listed[by_root["id"]] == "member"
    assert listed[tenant.users["admin"]] == "admin"
    with Api.login(server.url, by_admin["email"], "viewer-password") as person:
        assert [org["id"] for org in person.get("/api/v1/orgs").json()] == [tenant.org_id]


def test_email_is_normalised_and_role_defaults_to_member(tenant: Tenant) -> None:
    email = f"{unique('Mixed')}@Pilotboat.TEST"
    response = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/users", json={"email": email, "password": "long-enough"})
    assert response.status_code == 201, response.text
    assert response.json()["email"] == email.lower()
    assert response.json()["role"] == "member"


def test_members_and_viewers_cannot_manage_users(tenant: Tenant) -> None:
    for client in (tenant.member, tenant.viewer):
        body = {"email": f"{unique('x')}@pilotboat.test", "password": "long-enough", "role": "viewer"}
        error_detail(client.post(f"/api/v1/orgs/{tenant.org_id}/users", json=body), 403)
        error_detail(client.patch(f"/api/v1/orgs/{tenant.org_id}/users/{tenant.users['viewer']}", json={"role": "admin"}), 403)
        error_detail(client.delete(f"/api/v1/orgs/{tenant.org_id}/users/{tenant.users['viewer']}"), 403)
    assert members(tenant.admin, tenant.org_id)[tenant.users["viewer"]] == "viewer"


def test_admins_cannot_manage_users_of_another_org(tenant: Tenant, other_tenant: Tenant) -> None:
    body = {"email": f"{unique('x')}@pilotboat.test", "password": "long-enough", "role": "admin"}
    error_detail(tenant.admin.post(f"/api/v1/orgs/{other_tenant.org_id}/users", json=body), 404)
    error_detail(tenant.admin.get(f"/api/v1/orgs/{other_tenant.org_id}/users"), 404)
    target = other_tenant.users["member"]
    error_detail(tenant.admin.patch(f"/api/v1/orgs/{other_tenant.org_id}/users/{target}", json={"role": "admin"}), 404)
    error_detail(tenant.admin.delete(f"/api/v1/orgs/{other_tenant.org_id}/users/{target}"), 404)
    # A user id of another org, addressed through one's own org.
    error_detail(tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{target}", json={"role": "admin"}), 404)
    error_detail(tenant.admin.delete(f"/api/v1/orgs/{tenant.org_id}/users/{target}"), 404)
    assert members(other_tenant.admin, other_tenant.org_id)[target] == "member"


def test_duplicate_email_is_409(root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    existing = add_user(tenant.admin, tenant.org_id, "member")
    for client, org_id in ((tenant.admin, tenant.org_id), (other_tenant.admin, other_tenant.org_id)):
        response = client.post(
            f"/api/v1/orgs/{org_id}/users", json={"email": existing["email"].upper(), "password": "long-enough", "role": "viewer"}
        )
        assert error_detail(response, 409)
        assert json_of(response).get("field") == "email"
    # Even a system administrator cannot add a user twice to the same org.
    again = root.post(f"/api/v1/orgs/{tenant.org_id}/users", json={"email": existing["email"], "password": "long-enough"})
    error_detail(again, 409)
    assert existing["id"] not in members(root, other_tenant.org_id)


@pytest.mark.parametrize(
    "body",
    [
        {"password": "seven77", "role": "member"},
        {"password": "long-enough", "role": "owner"},
        {"password": "long-enough", "role": "ADMIN"},
        {"password": "long-enough", "role": "member", "email": "not-an-email"},
        {"password": "long-enough", "role": "member", "is_system_admin": True},
        {"role": "member"},
    ],
    ids=["short-password", "unknown-role", "role-case", "bad-email", "unknown-field", "no-password"],
)
def test_add_user_validation(tenant: Tenant, body: dict[str, Any]) -> None:
    payload = {"email": f"{unique('v')}@pilotboat.test", **body}
    error_detail(tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/users", json=payload), 422)
    assert payload["email"] not in tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/users").text


def test_change_role_takes_effect(server: ServerProcess, tenant: Tenant) -> None:
    user = add_user(tenant.admin, tenant.org_id, "viewer", password="role-password")
    with Api.login(server.url, user["email"], "role-password") as person:
        error_detail(person.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "d"}), 403)
        changed = tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}", json={"role": "member"})
        assert changed.status_code == 204, changed.text
        assert members(tenant.admin, tenant.org_id)[user["id"]] == "member"
        # Roles are read on every request: the same token now may write.
        assert person.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "d"}).status_code == 201
        error_detail(person.post(f"/api/v1/orgs/{tenant.org_id}/users", json={"email": "a@b.c", "password": "long-enough"}), 403)
        assert tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}", json={"role": "admin"}).status_code == 204
        assert person.get(f"/api/v1/orgs/{tenant.org_id}").json()["role"] == "admin"
        add_user(person, tenant.org_id, "viewer")
    error_detail(tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}", json={"role": "boss"}), 422)
    error_detail(tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{uuid.uuid4()}", json={"role": "member"}), 404)


def test_org_keeps_one_admin(root: Api, tenant: Tenant) -> None:
    admin_id = tenant.users["admin"]
    for role in ("member", "viewer"):
        response = tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{admin_id}", json={"role": role})
        error_detail(response, 409)
    error_detail(tenant.admin.delete(f"/api/v1/orgs/{tenant.org_id}/users/{admin_id}"), 409)
    error_detail(root.delete(f"/api/v1/orgs/{tenant.org_id}/users/{admin_id}"), 409)
    # Keeping the role "admin" is not a demotion.
    assert tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{admin_id}", json={"role": "admin"}).status_code == 204
    assert members(root, tenant.org_id)[admin_id] == "admin"

    # With a second admin the first may step down.
    assert tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{tenant.users['member']}", json={"role": "admin"}).status_code == 204
    assert tenant.admin.patch(f"/api/v1/orgs/{tenant.org_id}/users/{admin_id}", json={"role": "viewer"}).status_code == 204
    error_detail(tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/users", json={"email": "a@b.c", "password": "long-enough"}), 403)
    # ... and now the other one is the last admin.
    error_detail(tenant.member.patch(f"/api/v1/orgs/{tenant.org_id}/users/{tenant.users['member']}", json={"role": "member"}), 409)
    assert members(root, tenant.org_id) == {
        admin_id: "viewer", tenant.users["member"]: "admin", tenant.users["viewer"]: "viewer"
    }


def test_removed_user_can_no_longer_log_in(server: ServerProcess, tenant: Tenant) -> None:
    user = add_user(tenant.admin, tenant.org_id, "member", password="removed-password")
    person = Api.login(server.url, user["email"], "removed-password")
    key = create_key(person).json()["key"]
    try:
        removed = tenant.admin.delete(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}")
        assert removed.status_code == 204, removed.text
        assert user["id"] not in members(tenant.admin, tenant.org_id)
        error_detail(login(server.url, user["email"], "removed-password"), 401)
        # Credentials issued before the removal stop working too.
        error_detail(person.get("/api/v1/orgs"), 401)
        with Api(server.url, key) as keyed:
            error_detail(keyed.get("/api/v1/orgs"), 401)
    finally:
        person.close()
    error_detail(tenant.admin.delete(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}"), 404)
    # The account is gone, so the email is free again.
    assert add_user(tenant.admin, tenant.org_id, "viewer")["id"] != user["id"]
    again = tenant.admin.post(
        f"/api/v1/orgs/{tenant.org_id}/users", json={"email": user["email"], "password": "new-password", "role": "viewer"}
    )
    assert again.status_code == 201, again.text
    assert again.json()["id"] != user["id"]
    assert login(server.url, user["email"], "new-password").status_code == 200
    error_detail(login(server.url, user["email"], "removed-password"), 401)


def test_user_removed_from_one_of_two_orgs_keeps_the_account(
    server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant
) -> None:
    user = add_user(root, tenant.org_id, "member", password="still-here-password")
    assert root.post(
        f"/api/v1/orgs/{other_tenant.org_id}/users", json={"email": user["email"], "password": "whatever-pass", "role": "viewer"}
    ).status_code == 201
    assert tenant.admin.delete(f"/api/v1/orgs/{tenant.org_id}/users/{user['id']}").status_code == 204
    with Api.login(server.url, user["email"], "still-here-password") as person:
        assert [org["id"] for org in person.get("/api/v1/orgs").json()] == [other_tenant.org_id]
        error_detail(person.get(f"/api/v1/orgs/{tenant.org_id}/devices"), 404)


def test_role_effects_on_devices(tenant: Tenant) -> None:
    path = f"/api/v1/orgs/{tenant.org_id}/devices"
    created = tenant.member.post(path, json={"name": unique("dev")})
    assert created.status_code == 201, created.text
    device_id = created.json()["id"]

    listed = tenant.viewer.get(path)
    assert listed.status_code == 200
    assert device_id in {device["id"] for device in listed.json()["devices"]}
    assert tenant.viewer.get(f"{path}/{device_id}").status_code == 200
    error_detail(tenant.viewer.post(path, json={"name": unique("dev")}), 403)
    error_detail(tenant.viewer.patch(f"{path}/{device_id}", json={"name": "renamed"}), 403)
    error_detail(tenant.viewer.delete(f"{path}/{device_id}"), 403)

    body = {"email": f"{unique('m')}@pilotboat.test", "password": "long-enough", "role": "viewer"}
    error_detail(tenant.member.post(f"/api/v1/orgs/{tenant.org_id}/users", json=body), 403)
    assert tenant.member.get(f"/api/v1/orgs/{tenant.org_id}/users").status_code == 200
    assert tenant.member.delete(f"{path}/{device_id}").status_code == 204


# --- first start -----------------------------------------------------------------------------------


class FreshServer(ServerProcess):
    """A server started without PILOTBOAT_ADMIN_EMAIL / PILOTBOAT_ADMIN_PASSWORD."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("PILOTBOAT_ADMIN_EMAIL", None)
        env.pop("PILOTBOAT_ADMIN_PASSWORD", None)
        return env


@pytest.fixture()
def fresh_server(request: pytest.FixtureRequest, postgres: PostgresCluster) -> Iterator[FreshServer]:
    database_url = postgres.new_database() if request.param == "postgresql" else None
    process = FreshServer(database_url)
    yield process
    process.stop()


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_first_start_writes_random_admin_password(fresh_server: FreshServer) -> None:
    fresh_server.start()
    password_file = fresh_server.data_dir / "admin-password.txt"
    assert password_file.is_file()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    email, password = password_file.read_text().splitlines()
    assert email == "admin@pilotboat.local"
    assert len(password) >= 16
    assert str(password_file.resolve()) in fresh_server.log()
    assert password not in fresh_server.log()

    with Api.login(fresh_server.url, email, password) as admin:
        me = admin.get("/api/v1/me").json()
        assert me["is_system_admin"] is True
        orgs = admin.get("/api/v1/orgs").json()
        assert [org["name"] for org in orgs] == ["default"]
        assert [member["email"] for member in admin.get(f"/api/v1/orgs/{orgs[0]['id']}/users").json()] == [email]
        admin_id = me["id"]
    announced = fresh_server.log().count("created system administrator")
    assert announced >= 1

    fresh_server.restart()
    assert password_file.read_text() == f"{email}\n{password}\n"
    assert fresh_server.log().count("created system administrator") == announced
    with Api.login(fresh_server.url, email, password) as admin:
        assert admin.get("/api/v1/me").json()["id"] == admin_id
        orgs = admin.get("/api/v1/orgs").json()
        assert [org["name"] for org in orgs] == ["default"]
        assert len(admin.get(f"/api/v1/orgs/{orgs[0]['id']}/users").json()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_configured_admin_password_is_not_written_to_disk(backend: str, server_factory: Any) -> None:
    email = f"{unique('boss')}@pilotboat.test"
    process = server_factory(backend, PILOTBOAT_ADMIN_EMAIL=email, PILOTBOAT_ADMIN_PASSWORD="configured-password")
    process.start()
    try:
        assert not (process.data_dir / "admin-password.txt").exists()
        assert "configured-password" not in process.log()
        assert email in process.log()
        with Api.login(process.url, email.upper(), "configured-password") as admin:
            assert admin.get("/api/v1/me").json()["is_system_admin"] is True
        error_detail(login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD), 401)
    finally:
        process.stop()


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pilotboat.cli.main", "serve"], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("key", ["short", "x" * 17, "y" * 33])
def test_bad_bootstrap_key_length_stops_serve(key: str) -> None:
    process = ServerProcess(None, extra_env={"PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY": key})
    result = _serve(process.env())
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY" in output
    assert "Traceback" not in output
    assert key not in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{process.url}/health", timeout=1)


def test_secret_env_vars_are_removed_after_reading(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from pilotboat.settings import load_settings

    monkeypatch.setenv("PILOTBOAT_ADMIN_PASSWORD", "env-admin-password")
    monkeypatch.setenv("PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY", "0123456789abcdef")
    monkeypatch.setenv("PILOTBOAT_ADMIN_EMAIL", "env@pilotboat.test")
    monkeypatch.setenv("PILOTBOAT_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.admin_password is not None
    assert settings.admin_password.get_secret_value() == "env-admin-password"
    assert settings.bootstrap_encrypt_key is not None
    assert settings.bootstrap_encrypt_key.get_secret_value() == "0123456789abcdef"
    assert "PILOTBOAT_ADMIN_PASSWORD" not in os.environ
    assert "PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY" not in os.environ
    # Non-secret settings stay.
    assert os.environ["PILOTBOAT_ADMIN_EMAIL"] == "env@pilotboat.test"
    assert settings.admin_email == "env@pilotboat.test"
    assert "env-admin-password" not in repr(settings)


def test_api_key_records_its_last_use(tenant: Tenant) -> None:
    created = tenant.admin.post("/api/v1/api-keys", json={"name": "last-use"})
    assert created.status_code == 201
    key_id = created.json()["id"]
    listed = {key["id"]: key for key in tenant.admin.get("/api/v1/api-keys").json()}
    assert listed[key_id]["last_used_at"] is None
    with Api(str(tenant.admin.base_url).rstrip("/"), created.json()["key"]) as machine:
        assert machine.get(f"/api/v1/orgs/{tenant.org_id}").status_code == 200
    listed = {key["id"]: key for key in tenant.admin.get("/api/v1/api-keys").json()}
    assert listed[key_id]["last_used_at"] is not None


def test_repeated_failed_logins_are_throttled(server: ServerProcess, root: Api) -> None:
    email = f"{unique('throttled')}@example.test"
    default_org = next(org["id"] for org in root.get("/api/v1/orgs").json() if org["name"] == "default")
    assert root.post(f"/api/v1/orgs/{default_org}/users", json={"email": email, "password": "right-password"}).status_code == 201
    for _ in range(10):
        assert login(server.url, email, "wrong-password").status_code == 401
    refused = login(server.url, email, "right-password")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "too many failed log-ins" in refused.json()["detail"]
    # Other accounts are not affected.
    assert login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD).status_code == 200


def test_an_api_key_may_revoke_only_itself(tenant: Tenant) -> None:
    first = tenant.admin.post("/api/v1/api-keys", json={"name": "first"}).json()
    second = tenant.admin.post("/api/v1/api-keys", json={"name": "second"}).json()
    with Api(str(tenant.admin.base_url).rstrip("/"), first["key"]) as machine:
        assert machine.delete(f"/api/v1/api-keys/{second['id']}").status_code == 403
        assert machine.delete(f"/api/v1/api-keys/{first['id']}").status_code == 204
        assert machine.get("/api/v1/orgs").status_code == 401
    with Api(str(tenant.admin.base_url).rstrip("/"), second["key"]) as machine:
        assert machine.get("/api/v1/orgs").status_code == 200
