"""WebAccess/DMP compatible routes (``/api/certs``, ``/api/users/...``): the trust store as a base64 PEM
bundle, users' per-company permissions, ``{"data": ..., "success": true}`` answers and
``{"success": false, "message": ...}`` errors; and the trust-store merge between two deployments that
the upstream procedure performs before moving a device."""

from __future__ import annotations

import base64
import re
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, json_of

PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\n.+?\n-----END CERTIFICATE-----\n?", re.S)
DISPLAY = {"read": "Read", "write": "Write", "manage_users": "Manage Users", "manage_pki": "Manage PKI",
           "device_management_server": "Device Management Server"}


# --- helpers ------------------------------------------------------------------------------------


def dmp_error(response: httpx.Response, status: int) -> str:
    """The response is ``status`` with ``{"success": false, "message": "<non-empty>"}``; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = json_of(response)
    assert set(body) == {"success", "message"} and body["success"] is False, body
    assert isinstance(body["message"], str) and body["message"], body
    return body["message"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def certs_of(response: httpx.Response) -> str:
    """The PEM bundle of a ``/api/certs`` answer."""
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert body["success"] is True and set(body) == {"data", "success"} and set(body["data"]) == {"certs"}, body
    return base64.b64decode(body["data"]["certs"], validate=True).decode()


def blocks(bundle: str) -> list[str]:
    found = [block if block.endswith("\n") else block + "\n" for block in PEM_BLOCK.findall(bundle)]
    assert "".join(found).strip() == bundle.strip(), "the bundle holds something besides PEM certificates"
    return found


def subject_of(block: str) -> str:
    return x509.load_pem_x509_certificate(block.encode()).subject.rfc4514_string()


def org_chain(client: Api, org_id: str) -> list[str]:
    response = client.get(f"/api/v1/orgs/{org_id}/ca/chain")
    assert response.status_code == 200, response.text
    return blocks(response.text)


def stored(root: Api) -> dict[str, str]:
    """The trust store as the native API lists it: fingerprint -> subject."""
    response = root.get("/api/v1/trust-store")
    assert response.status_code == 200, response.text
    return {entry["fingerprint"]: entry["subject"] for entry in response.json()}


def put_certs(client: Api, bundle: str) -> httpx.Response:
    return client.put("/api/certs", json={"certs": b64(bundle)})


def make_ca(name: str, *, ca: bool = True, not_after: datetime | None = None) -> str:
    """A self-signed certificate (PEM): a CA unless ``ca`` is False, valid a year unless told otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elsewhere")])
    not_after = not_after or now + timedelta(days=365)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after) - timedelta(days=30)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def user_view(client: Api, user_id: str) -> dict[str, Any]:
    response = client.get(f"/api/users/{user_id}")
    assert response.status_code == 200, response.text
    body = json_of(response)
    assert body["success"] is True and set(body) == {"data", "success"}, body
    return body["data"]


def company(view: dict[str, Any], org_id: str) -> dict[str, Any]:
    (entry,) = [entry for entry in view["companies"] if entry["company_id"] == org_id]
    return entry


def put_companies(client: Api, user_id: str, body: Any) -> httpx.Response:
    return client.put(f"/api/users/{user_id}/companies", json=body)


def members(client: Api, org_id: str) -> dict[str, tuple[str, list[str]]]:
    """user id -> (role, grants), from the native API."""
    response = client.get(f"/api/v1/orgs/{org_id}/users")
    assert response.status_code == 200, response.text
    return {member["id"]: (member["role"], member["grants"]) for member in response.json()}


@pytest.fixture()
def kept_trust_store(root: Api) -> Iterator[None]:
    """Tests that replace the deployment-wide trust store put the previous one back afterwards."""
    response = root.get("/api/v1/trust-store")
    assert response.status_code == 200, response.text
    previous = "".join(entry["certificate_pem"] for entry in response.json())
    yield
    assert put_certs(root, previous).status_code == 200


# --- GET /api/certs -----------------------------------------------------------------------------


def test_reading_the_trust_store_needs_the_device_management_server_permission(
    root: Api, tenant: Tenant, other_tenant: Tenant
) -> None:
    for client in (tenant.member, tenant.viewer):
        assert "device_management_server" in dmp_error(client.get("/api/certs"), 403)
    own, other = org_chain(root, tenant.org_id), org_chain(root, other_tenant.org_id)
    # An org admin holds every permission in its organisation, and sees that organisation's chain only.
    seen = blocks(certs_of(tenant.admin.get("/api/certs")))
    assert set(own) <= set(seen) and not set(other) & set(seen)
    # A system administrator sees the chains of its own organisations, not of every tenant.
    administrator = blocks(certs_of(root.get("/api/certs")))
    assert not (set(own) | set(other)) & set(administrator)
    assert len(administrator) == len(set(administrator))
    both = blocks(certs_of(other_tenant.admin.get("/api/certs")))
    assert set(other) <= set(both) and not set(own) & set(both)


def test_unauthenticated_calls_get_401_in_the_dmp_style(anonymous: Api) -> None:
    for response in (anonymous.get("/api/certs"), anonymous.get(f"/api/users/{uuid.uuid4()}"),
                     anonymous.put("/api/certs", json={"certs": ""})):
        dmp_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_dmp_route_is_404_in_the_dmp_style(root: Api) -> None:
    dmp_error(root.get("/api/nothing-here"), 404)
    # the native API keeps its own style
    body = json_of(root.get("/api/v1/nothing-here"))
    assert "detail" in body and "success" not in body


# --- PUT /api/certs -----------------------------------------------------------------------------


def test_only_system_administrators_replace_the_trust_store(root: Api, tenant: Tenant, kept_trust_store: None) -> None:
    before = certs_of(root.get("/api/certs"))
    for client in (tenant.admin, tenant.member):
        assert "system administrators" in dmp_error(put_certs(client, make_ca("refused CA")), 403)
    assert certs_of(root.get("/api/certs")) == before


def test_replace_then_empty_the_trust_store(root: Api, tenant: Tenant, kept_trust_store: None) -> None:
    first, second = make_ca(f"first {uuid.uuid4().hex[:8]}"), make_ca(f"second {uuid.uuid4().hex[:8]}")
    response = put_certs(root, first + second)
    answered = certs_of(response)
    assert answered == certs_of(root.get("/api/certs"))
    assert {subject_of(first), subject_of(second)} == set(stored(root).values())
    assert set(blocks(answered)[:2]) == {first, second}  # the store first, then the organisation CAs
    seen_by_org_admin = blocks(certs_of(tenant.admin.get("/api/certs")))
    assert {first, second} | set(org_chain(root, tenant.org_id)) <= set(seen_by_org_admin)

    # An organisation CA of this deployment in the bundle is not stored again (it is trusted anyway).
    certs_of(put_certs(root, first + "".join(org_chain(root, tenant.org_id))))
    assert set(stored(root).values()) == {subject_of(first)}

    emptied = certs_of(put_certs(root, ""))
    assert stored(root) == {}
    assert first not in emptied
    assert set(org_chain(root, tenant.org_id)) <= set(blocks(certs_of(tenant.admin.get("/api/certs"))))
    latest = root.get("/api/v1/events", params={"kind": "trust.replaced", "limit": 1}).json()["events"][0]
    assert latest["actor"] == ADMIN_EMAIL and latest["detail"]["certificates"] == 0


def _bad_bundles() -> list[tuple[str, dict[str, Any], str]]:
    good = make_ca("good CA")
    return [
        ("not base64", {"certs": "this is *not* base64!"}, "base64"),
        ("not text", {"certs": base64.b64encode(bytes(range(256))).decode()}, "PEM"),
        ("not PEM", {"certs": b64("hello, world\n")}, "PEM"),
        ("broken PEM", {"certs": b64("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")}, "PEM"),
        ("a key in the bundle", {"certs": b64(good + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")},
         "something other than certificates"),
        ("not a CA", {"certs": b64(make_ca("leaf", ca=False))}, "not a CA certificate"),
        ("expired", {"certs": b64(good + make_ca("old CA", not_after=datetime.now(UTC) - timedelta(days=1)))}, "expired"),
        ("unknown field", {"certs": b64(good), "merge": True}, "merge"),
        ("not a string", {"certs": 42}, "certs"),
        ("missing", {}, "certs"),
    ]


@pytest.mark.parametrize(("case", "body", "named"), _bad_bundles(), ids=[case for case, _, _ in _bad_bundles()])
def test_bad_bundles_are_refused_and_change_nothing(
    root: Api, case: str, body: dict[str, Any], named: str, kept_trust_store: None
) -> None:
    certs_of(put_certs(root, make_ca(f"kept {uuid.uuid4().hex[:8]}")))
    before, entries = certs_of(root.get("/api/certs")), stored(root)
    message = dmp_error(root.put("/api/certs", json=body), 400)
    assert named.lower() in message.lower(), message
    assert certs_of(root.get("/api/certs")) == before
    assert stored(root) == entries


def test_bundle_over_the_body_limit_is_413(root: Api, kept_trust_store: None) -> None:
    before = certs_of(root.get("/api/certs"))
    dmp_error(root.put("/api/certs", json={"certs": "A" * 70_000}), 413)
    assert certs_of(root.get("/api/certs")) == before


def test_get_put_round_trip_is_idempotent(root: Api, tenant: Tenant, kept_trust_store: None) -> None:
    certs_of(put_certs(root, make_ca(f"foreign {uuid.uuid4().hex[:8]}") + make_ca(f"foreign {uuid.uuid4().hex[:8]}")))
    before, entries = certs_of(root.get("/api/certs")), stored(root)
    body = json_of(root.get("/api/certs"))
    again = root.put("/api/certs", json={"certs": body["data"]["certs"]})
    assert sorted(blocks(certs_of(again))) == sorted(blocks(before))
    assert stored(root) == entries  # organisation CAs in the bundle were not copied into the store


# --- GET /api/users/{id} ------------------------------------------------------------------------


def test_user_view(root: Api, tenant: Tenant) -> None:
    member_id = tenant.users["member"]
    view = user_view(tenant.admin, member_id)
    email = json_of(tenant.member.get("/api/v1/me"))["email"]
    assert view == {
        "id": member_id, "email": email, "is_system_admin": False,
        "companies": [{"company_id": tenant.org_id, "company_name": tenant.name, "role": "member",
                       "permissions": ["Read", "Write"]}],
    }
    assert company(user_view(tenant.member, member_id), tenant.org_id) == view["companies"][0]  # oneself
    assert company(user_view(root, tenant.users["admin"]), tenant.org_id)["permissions"] == list(DISPLAY.values())
    assert company(user_view(root, tenant.users["viewer"]), tenant.org_id)["permissions"] == ["Read"]


def test_user_view_is_limited_to_what_the_caller_manages(root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    dmp_error(tenant.admin.get(f"/api/users/{other_tenant.users['member']}"), 404)
    dmp_error(tenant.member.get(f"/api/users/{tenant.users['viewer']}"), 404)  # members do not manage users
    dmp_error(tenant.admin.get(f"/api/users/{uuid.uuid4()}"), 404)
    dmp_error(root.get(f"/api/users/{uuid.uuid4()}"), 404)
    # A user in two organisations: each org admin sees only the membership in its own.
    email = json_of(other_tenant.viewer.get("/api/v1/me"))["email"]
    added = root.post(f"/api/v1/orgs/{tenant.org_id}/users", json={"email": email, "password": "ignored-password", "role": "member"})
    assert added.status_code == 201, added.text
    viewer_id = other_tenant.users["viewer"]
    assert [entry["company_id"] for entry in user_view(tenant.admin, viewer_id)["companies"]] == [tenant.org_id]
    assert [entry["company_id"] for entry in user_view(other_tenant.admin, viewer_id)["companies"]] == [other_tenant.org_id]
    assert {entry["company_id"] for entry in user_view(root, viewer_id)["companies"]} == {tenant.org_id, other_tenant.org_id}


# --- PUT /api/users/{id}/companies --------------------------------------------------------------


def test_granting_device_management_server_lets_a_member_read_the_trust_store(tenant: Tenant, other_tenant: Tenant) -> None:
    member_id = tenant.users["member"]
    dmp_error(tenant.member.get("/api/certs"), 403)
    response = put_companies(tenant.admin, member_id, [
        {"company_id": tenant.org_id, "permissions": ["Read", "Write", "Device Management Server"]}
    ])
    assert response.status_code == 200, response.text
    assert json_of(response)["data"] == user_view(tenant.admin, member_id)
    assert company(json_of(response)["data"], tenant.org_id) == {
        "company_id": tenant.org_id, "company_name": tenant.name, "role": "member",
        "permissions": ["Read", "Write", "Device Management Server"],
    }
    assert members(tenant.admin, tenant.org_id)[member_id] == ("member", ["device_management_server"])
    seen = blocks(certs_of(tenant.member.get("/api/certs")))
    assert set(org_chain(tenant.admin, tenant.org_id)) <= set(seen)
    assert not set(org_chain(other_tenant.admin, other_tenant.org_id)) & set(seen)
    # Still no more than a member otherwise.
    dmp_error(tenant.member.get(f"/api/users/{tenant.users['viewer']}"), 404)
    dmp_error(put_certs(tenant.member, make_ca("not allowed")), 403)
    events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": "user.permissions_changed"}).json()["events"]
    assert events and events[0]["detail"]["grants"] == ["device_management_server"]

    # Permissions are the full set: leaving it out takes the grant away.
    taken = put_companies(tenant.admin, member_id, [{"company_id": tenant.org_id, "permissions": ["read", "write"]}])
    assert company(json_of(taken)["data"], tenant.org_id)["permissions"] == ["Read", "Write"]
    assert members(tenant.admin, tenant.org_id)[member_id] == ("member", [])
    dmp_error(tenant.member.get("/api/certs"), 403)


def test_viewers_and_members_cannot_change_permissions(tenant: Tenant) -> None:
    before = members(tenant.admin, tenant.org_id)
    body = [{"company_id": tenant.org_id, "permissions": ["Device Management Server"]}]
    for client, target in ((tenant.viewer, tenant.users["member"]), (tenant.member, tenant.users["member"]),
                           (tenant.viewer, tenant.users["viewer"])):
        assert "manage_users" in dmp_error(put_companies(client, target, body), 403)
    assert members(tenant.admin, tenant.org_id) == before


def test_system_administrator_sets_role_and_permissions(root: Api, tenant: Tenant) -> None:
    viewer_id = tenant.users["viewer"]
    response = put_companies(root, viewer_id, [
        {"company_id": tenant.org_id, "role": "viewer", "permissions": ["device_management_server", "Read"]}
    ])
    assert response.status_code == 200, response.text
    assert company(json_of(response)["data"], tenant.org_id)["permissions"] == ["Read", "Device Management Server"]
    assert members(root, tenant.org_id)[viewer_id] == ("viewer", ["device_management_server"])
    assert set(org_chain(root, tenant.org_id)) <= set(blocks(certs_of(tenant.viewer.get("/api/certs"))))
    # The viewer still cannot write.
    assert tenant.viewer.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "x"}).status_code == 403


def test_permissions_implied_by_the_role_are_accepted_and_ignored(tenant: Tenant) -> None:
    member_id = tenant.users["member"]
    promoted = put_companies(tenant.admin, member_id, [
        {"company_id": tenant.org_id, "role": "admin", "permissions": list(DISPLAY.values())}
    ])
    assert promoted.status_code == 200, promoted.text
    assert company(json_of(promoted)["data"], tenant.org_id)["permissions"] == list(DISPLAY.values())
    assert members(tenant.admin, tenant.org_id)[member_id] == ("admin", [])
    # What GET answered can be sent back as it is (company_name included) and changes nothing.
    view = user_view(tenant.admin, member_id)
    echoed = put_companies(tenant.admin, member_id, view["companies"])
    assert echoed.status_code == 200, echoed.text
    assert json_of(echoed)["data"] == view
    demoted = put_companies(tenant.admin, member_id, [{"company_id": tenant.org_id, "role": "member", "permissions": ["Read"]}])
    assert company(json_of(demoted)["data"], tenant.org_id)["permissions"] == ["Read", "Write"]
    assert members(tenant.admin, tenant.org_id)[member_id] == ("member", [])


def _invalid_bodies(org_id: str) -> list[tuple[Any, int, str]]:
    return [
        ({"company_id": org_id, "permissions": ["Read"]}, 400, "list"),
        ([], 400, "at least 1"),
        ([{"company_id": org_id, "permissions": ["Read", "Superpowers"]}], 400, "unknown permission 'Superpowers'"),
        ([{"company_id": org_id, "permissions": ["Manage Users"]}], 400, "manage_users"),
        ([{"company_id": org_id, "role": "boss"}], 400, "role"),
        ([{"company_id": org_id, "role": "member", "colour": "blue"}], 400, "colour"),
        ([{"company_id": org_id, "role": "member"}, {"company_id": org_id, "role": "viewer"}], 400, "only once"),
        ([{"company_id": org_id}], 400, "give a role"),
        ([{"company_id": str(uuid.uuid4()), "role": "viewer"}], 404, "not found"),
        # all or nothing: the valid first entry is not applied either
        ([{"company_id": org_id, "permissions": ["Device Management Server"]},
          {"company_id": str(uuid.uuid4()), "permissions": ["Read"]}], 404, "not found"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_invalid_company_bodies_change_nothing(root: Api, tenant: Tenant, case: int) -> None:
    body, status, named = _invalid_bodies(tenant.org_id)[case]
    member_id = tenant.users["member"]
    before = members(root, tenant.org_id)
    for client in (tenant.admin, root):
        message = dmp_error(put_companies(client, member_id, body), status)
        assert named.lower() in message.lower(), message
    assert members(root, tenant.org_id) == before
    dmp_error(tenant.member.get("/api/certs"), 403)


def test_companies_of_another_organisation_are_not_found(root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    before = members(root, other_tenant.org_id)
    body = [{"company_id": other_tenant.org_id, "role": "admin"}]
    dmp_error(put_companies(tenant.admin, other_tenant.users["member"], body), 404)
    dmp_error(put_companies(tenant.admin, tenant.users["member"], body), 404)
    assert members(root, other_tenant.org_id) == before
    # An API key restricted to one organisation cannot reach into another either.
    key = tenant.admin.post("/api/v1/api-keys", json={"name": "dmp", "org_id": tenant.org_id}).json()["key"]
    with Api(tenant.admin.base_url, key) as keyed:
        dmp_error(put_companies(keyed, other_tenant.users["member"], body), 404)
        granted = put_companies(keyed, tenant.users["member"], [{"company_id": tenant.org_id, "permissions": ["Device Management Server"]}])
        assert granted.status_code == 200, granted.text
    assert members(root, other_tenant.org_id) == before


# --- the upstream procedure: merge one deployment's trust store into another's -------------------


def _merge_by_subject(target: str, source: str) -> str:
    """What the upstream notebook does: keep the target's certificates, add the source's whose
    subject the target lacks."""
    have = {subject_of(block) for block in blocks(target)}
    return "".join(blocks(target)) + "".join(block for block in blocks(source) if subject_of(block) not in have)


def test_merge_trust_stores_between_two_deployments(server_factory: Any, tmp_path: Path) -> None:
    first: ServerProcess = server_factory("sqlite")
    second: ServerProcess = server_factory("postgresql", PILOTBOAT_MAX_BODY_BYTES="3000000")
    first.start()
    second.start()
    try:
        _merge_between(first, second, tmp_path)
    finally:
        first.stop()
        second.stop()


def _merge_between(first: ServerProcess, second: ServerProcess, tmp_path: Path) -> None:
    with Api.login(first.url, ADMIN_EMAIL, ADMIN_PASSWORD) as one, Api.login(second.url, ADMIN_EMAIL, ADMIN_PASSWORD) as two:
        site = one.post("/api/v1/orgs", json={"name": f"site-{uuid.uuid4().hex[:8]}"}).json()["id"]
        device = one.post(f"/api/v1/orgs/{site}/devices", json={"name": "mover"}).json()["id"]
        issued = one.post(f"/api/v1/orgs/{site}/devices/{device}/certificates")
        assert issued.status_code == 201, issued.text
        leaf = tmp_path / "leaf.pem"
        leaf.write_text(issued.json()["certificate_pem"])
        # As upstream, the trust store of the first deployment is read by a user of the device's company.
        email, password = f"ops-{uuid.uuid4().hex[:8]}@site.test", "site-admin-password"
        added = one.post(f"/api/v1/orgs/{site}/users", json={"email": email, "password": password, "role": "admin"})
        assert added.status_code == 201, added.text
        site_admin = Api.login(first.url, email, password)

        foreign = make_ca(f"already trusted {uuid.uuid4().hex[:8]}")
        certs_of(put_certs(two, foreign))
        trusted = tmp_path / "trusted.pem"
        trusted.write_text(certs_of(two.get("/api/certs")))
        assert _openssl_verify(trusted, leaf).returncode != 0  # the second deployment does not trust it yet

        merged = _merge_by_subject(certs_of(two.get("/api/certs")), certs_of(site_admin.get("/api/certs")))
        answered = certs_of(put_certs(two, merged))
        assert set(org_chain(one, site)) <= set(blocks(answered))
        assert set(org_chain(one, site)) <= set(blocks(certs_of(two.get("/api/certs"))))
        subjects = set(stored(two).values())
        assert subject_of(foreign) in subjects and {subject_of(block) for block in org_chain(one, site)} <= subjects
        trusted.write_text(answered)
        result = _openssl_verify(trusted, leaf)
        assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr

        # Doing it again changes nothing.
        entries = stored(two)
        again = _merge_by_subject(certs_of(two.get("/api/certs")), certs_of(site_admin.get("/api/certs")))
        certs_of(put_certs(two, again))
        assert stored(two) == entries

        # A bundle over the size the trust store takes is refused by name, and changes nothing.
        message = dmp_error(two.put("/api/certs", json={"certs": "QUFB" * 340_000}), 400)
        assert "certs" in message and "at most" in message
        assert stored(two) == entries


def _openssl_verify(trusted: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(trusted), str(leaf)],
                          capture_output=True, text=True, check=False, timeout=60)
