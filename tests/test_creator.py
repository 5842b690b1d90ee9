"""Creator device server compatible routes (``/identities/...``): a certificate or a PSK per call, each on
a device of its own (or on a named device), in the caller's organisation; ``{"ErrorCode", "ErrorMessage"}``
errors. Certificates are checked with the ``openssl`` binary against the organisation's chain."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import update

from harness import Api, ServerProcess, Tenant, json_of
from pilotboat.settings import Settings
from pilotboat.store import database
from pilotboat.store.tables import CertificateAuthority

PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----\n.+?\n-----END \1-----\n", re.S)
IDENTITY = re.compile(r"^[A-Za-z0-9_-]{22}$")
SECRET = re.compile(r"^[0-9A-F]{64}$")


# --- helpers ------------------------------------------------------------------------------------


def creator_error(response: httpx.Response, status: int, code: str) -> str:
    """The response is ``status`` with ``{"ErrorCode": code, "ErrorMessage": "<non-empty>"}``; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = json_of(response)
    assert set(body) == {"ErrorCode", "ErrorMessage"} and body["ErrorCode"] == code, body
    assert isinstance(body["ErrorMessage"], str) and body["ErrorMessage"], body
    return body["ErrorMessage"]


def new_certificate(client: Api, **params: str) -> dict[str, str]:
    response = client.post("/identities/certificates", params=params)
    assert response.status_code == 201, response.text
    body = json_of(response)
    assert set(body) == {"CertificateFormat", "RawCertificate"} and body["CertificateFormat"] == "PEM", body
    return body


def new_psk(client: Api, headers: dict[str, str] | None = None, **params: str) -> dict[str, Any]:
    response = client.post("/identities/psk", params=params, headers=headers)
    assert response.status_code == 201, response.text
    return json_of(response)


def split_raw(raw: str) -> tuple[Any, x509.Certificate, str]:
    """The private key, the certificate and its PEM of a RawCertificate (key first, then certificate)."""
    blocks = PEM.findall(raw)
    assert blocks == ["PRIVATE KEY", "CERTIFICATE"], blocks
    key_pem, certificate_pem = (match.group(0) for match in PEM.finditer(raw))
    assert raw == key_pem + certificate_pem
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    return key, x509.load_pem_x509_certificate(certificate_pem.encode()), certificate_pem


def san_urns(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def common_name(certificate: x509.Certificate) -> str:
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]


def device_count(client: Api, org_id: str) -> int:
    response = client.get(f"/api/v1/orgs/{org_id}/devices", params={"limit": 1})
    assert response.status_code == 200, response.text
    return response.json()["total"]


def devices_with_endpoint(client: Api, org_id: str, endpoint: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/orgs/{org_id}/devices", params={"endpoint": endpoint})
    assert response.status_code == 200, response.text
    return response.json()["devices"]


def psks(client: Api, org_id: str) -> dict[str, dict[str, Any]]:
    """identity -> the native view of the PSK."""
    response = client.get(f"/api/v1/orgs/{org_id}/psks", params={"limit": 100})
    assert response.status_code == 200, response.text
    return {row["identity"]: row for row in response.json()["psks"]}


def relative(href: str, server: ServerProcess) -> str:
    assert href.startswith(server.url + "/"), href
    return href.removeprefix(server.url)


def email_of(client: Api) -> str:
    return json_of(client.get("/api/v1/me"))["email"]


def key_for(client: Api, org_id: str | None) -> str:
    response = client.post("/api/v1/api-keys", json={"name": "creator", "org_id": org_id})
    assert response.status_code == 201, response.text
    return response.json()["key"]


async def _set_cas_active(url: str, org_id: str, active: bool) -> None:
    engine = database.create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(update(CertificateAuthority).where(CertificateAuthority.org_id == org_id).values(active=active))
    finally:
        await engine.dispose()


def set_cas_active(server: ServerProcess, org_id: str, active: bool) -> None:
    """Switch an organisation's CAs on or off directly in the server's database (to make issuing fail)."""
    url = Settings(data_dir=server.data_dir, database_url=server.database_url).resolved_database_url
    asyncio.run(_set_cas_active(url, org_id, active))


# --- certificates -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "member"])
def test_certificate_identity(server: ServerProcess, tenant: Tenant, tmp_path: Path, role: str) -> None:
    client = getattr(tenant, role)
    before = device_count(client, tenant.org_id)
    key, certificate, certificate_pem = split_raw(new_certificate(client)["RawCertificate"])
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*public) == certificate.public_key().public_bytes(*public)

    guid = uuid.UUID(int=certificate.serial_number)
    assert san_urns(certificate) == [guid.urn]
    assert common_name(certificate) == guid.urn

    chain = client.get(f"/api/v1/orgs/{tenant.org_id}/ca/chain")
    assert chain.status_code == 200, chain.text
    *intermediates, root = [match.group(0) for match in PEM.finditer(chain.text)]
    (tmp_path / "root.pem").write_text(root)
    (tmp_path / "intermediates.pem").write_text("".join(intermediates))
    (tmp_path / "leaf.pem").write_text(certificate_pem)
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(tmp_path / "root.pem"),
         "-untrusted", str(tmp_path / "intermediates.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr

    # A device made for it, named creator-…, with the GUID as its endpoint name, and the certificate on record.
    assert device_count(client, tenant.org_id) == before + 1
    (device,) = devices_with_endpoint(client, tenant.org_id, guid.urn)
    assert device["name"].startswith("creator-") and device["state"] == 1
    record = client.get(f"/api/v1/orgs/{tenant.org_id}/certificates/{guid}")
    assert record.status_code == 200, record.text
    assert record.json()["device_id"] == device["id"] and record.json()["certificate_pem"] == certificate_pem


def test_each_certificate_call_makes_a_new_device_with_a_new_guid(tenant: Tenant) -> None:
    before = device_count(tenant.admin, tenant.org_id)
    guids = [uuid.UUID(int=split_raw(new_certificate(tenant.admin)["RawCertificate"])[1].serial_number) for _ in range(5)]
    assert len(set(guids)) == 5
    assert device_count(tenant.admin, tenant.org_id) == before + 5
    device_ids = {devices_with_endpoint(tenant.admin, tenant.org_id, guid.urn)[0]["id"] for guid in guids}
    assert len(device_ids) == 5


def test_certificate_for_a_named_device(tenant: Tenant, other_tenant: Tenant) -> None:
    named = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "sensor", "endpoint": f"ep-{uuid.uuid4().hex}"})
    assert named.status_code == 201, named.text
    device = named.json()
    before = device_count(tenant.admin, tenant.org_id)
    _, certificate, _ = split_raw(new_certificate(tenant.admin, device_id=device["id"])["RawCertificate"])
    assert common_name(certificate) == device["endpoint"]
    assert san_urns(certificate) == [uuid.UUID(int=certificate.serial_number).urn]
    listed = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/certificates", params={"device_id": device["id"]}).json()
    assert listed["total"] == 1
    assert device_count(tenant.admin, tenant.org_id) == before
    # Unknown devices, and devices of another organisation, are not found; nothing is made.
    foreign = other_tenant.admin.post(f"/api/v1/orgs/{other_tenant.org_id}/devices", json={"name": "theirs"}).json()["id"]
    for device_id in (str(uuid.uuid4()), foreign):
        creator_error(tenant.admin.post("/identities/certificates", params={"device_id": device_id}), 404, "NotFound")
        creator_error(tenant.admin.post("/identities/psk", params={"device_id": device_id}), 404, "NotFound")
    assert device_count(tenant.admin, tenant.org_id) == before
    assert other_tenant.admin.get(f"/api/v1/orgs/{other_tenant.org_id}/certificates").json()["total"] == 0


def test_viewer_gets_403_and_nothing_is_made(tenant: Tenant) -> None:
    before = device_count(tenant.admin, tenant.org_id)
    for path in ("/identities/certificates", "/identities/psk"):
        assert "write" in creator_error(tenant.viewer.post(path), 403, "Forbidden")
    assert device_count(tenant.admin, tenant.org_id) == before
    assert psks(tenant.admin, tenant.org_id) == {}
    events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": "device.created"}).json()["events"]
    assert events == []


def test_failed_issue_removes_the_device_made_for_it(server: ServerProcess, tenant: Tenant) -> None:
    before = device_count(tenant.admin, tenant.org_id)
    set_cas_active(server, tenant.org_id, False)
    try:
        creator_error(tenant.admin.post("/identities/certificates"), 503, "ServiceUnavailable")
    finally:
        set_cas_active(server, tenant.org_id, True)
    assert device_count(tenant.admin, tenant.org_id) == before
    events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": "device."}).json()["events"]
    assert [event["kind"] for event in events] == ["device.deleted", "device.created"]
    assert events[0]["device_id"] == events[1]["device_id"]
    assert tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/certificates").json()["total"] == 0
    new_certificate(tenant.admin)  # with the CA back, issuing works again
    assert device_count(tenant.admin, tenant.org_id) == before + 1


def test_unauthenticated_calls_get_401_in_the_creator_style(anonymous: Api) -> None:
    for response in (anonymous.post("/identities/certificates"), anonymous.post("/identities/psk"),
                     anonymous.get("/identities/psk/AAAAAAAAAAAAAAAAAAAAAA")):
        creator_error(response, 401, "Unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    bad = anonymous.post("/identities/psk", headers={"Authorization": "Bearer not-a-token"})
    creator_error(bad, 401, "Unauthorized")


# --- PSKs ---------------------------------------------------------------------------------------


def test_psk_identity_and_its_links(server: ServerProcess, tenant: Tenant) -> None:
    before = device_count(tenant.admin, tenant.org_id)
    created = new_psk(tenant.member)
    assert set(created) == {"Identity", "Secret", "Links"}
    identity, secret = created["Identity"], created["Secret"]
    assert IDENTITY.match(identity) and len(base64.urlsafe_b64decode(identity + "==")) == 16
    assert SECRET.match(secret)
    href = f"{server.url}/identities/psk/{identity}"
    assert created["Links"] == [{"rel": "self", "href": href}, {"rel": "remove", "href": href}]
    assert device_count(tenant.admin, tenant.org_id) == before + 1
    native = psks(tenant.admin, tenant.org_id)[identity]
    assert native["key_length"] == 32 and "key" not in native
    device = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{native['device_id']}").json()
    assert device["name"].startswith("creator-")

    links = {link["rel"]: relative(link["href"], server) for link in created["Links"]}
    fetched = tenant.member.get(links["self"])
    assert fetched.status_code == 200, fetched.text
    assert json_of(fetched) == created
    # Reading the key takes write permission; other organisations do not see it.
    creator_error(tenant.viewer.get(links["self"]), 403, "Forbidden")

    removed = tenant.member.delete(links["remove"])
    assert removed.status_code == 204 and removed.content == b""
    assert identity not in psks(tenant.admin, tenant.org_id)
    creator_error(tenant.member.get(links["self"]), 404, "NotFound")
    creator_error(tenant.member.delete(links["remove"]), 404, "NotFound")
    # The device stays.
    assert tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{native['device_id']}").status_code == 200


def test_psk_of_another_organisation_is_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    identity = new_psk(other_tenant.admin)["Identity"]
    creator_error(tenant.admin.get(f"/identities/psk/{identity}"), 404, "NotFound")
    creator_error(tenant.admin.delete(f"/identities/psk/{identity}"), 404, "NotFound")
    assert identity in psks(other_tenant.admin, other_tenant.org_id)


def test_psk_for_a_named_device_and_imported_identities(tenant: Tenant) -> None:
    device_id = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "lamp"}).json()["id"]
    before = device_count(tenant.admin, tenant.org_id)
    created = new_psk(tenant.admin, device_id=device_id)
    assert psks(tenant.admin, tenant.org_id)[created["Identity"]]["device_id"] == device_id
    assert device_count(tenant.admin, tenant.org_id) == before
    # An identity imported through the native API with characters that need escaping in a URL.
    identity = f"factory/{uuid.uuid4().hex[:8]}?#%"
    imported = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/psks",
                                 json={"identity": identity, "key": "ab" * 16})
    assert imported.status_code == 201, imported.text
    quoted = identity.replace("%", "%25").replace("/", "%2F").replace("?", "%3F").replace("#", "%23")
    fetched = tenant.admin.get(f"/identities/psk/{quoted}")
    assert fetched.status_code == 200, fetched.text
    body = json_of(fetched)
    assert body["Identity"] == identity and body["Secret"] == "AB" * 16
    assert body["Links"][0]["href"].endswith(f"/identities/psk/{quoted}")
    assert tenant.admin.delete(f"/identities/psk/{quoted}").status_code == 204
    assert identity not in psks(tenant.admin, tenant.org_id)


def test_psk_identities_and_secrets_are_unique(tenant: Tenant) -> None:
    created = [new_psk(tenant.admin) for _ in range(40)]
    identities = {item["Identity"] for item in created}
    secrets = {item["Secret"] for item in created}
    assert len(identities) == 40 and len(secrets) == 40
    assert all(IDENTITY.match(identity) for identity in identities)
    assert identities <= set(psks(tenant.admin, tenant.org_id))


def test_post_without_body_or_content_type(server: ServerProcess, tenant: Tenant) -> None:
    """A bare POST, as upstream clients send it: no Content-Type, no Content-Length, no body."""
    token = tenant.admin.headers["Authorization"]
    for path in ("/identities/psk", "/identities/certificates"):
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: {token}\r\n"
                   "Connection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    # A JSON content type with an empty body is fine too; another content type with a body is not.
    assert tenant.admin.post("/identities/psk", headers={"Content-Type": "application/json"}).status_code == 201
    creator_error(tenant.admin.post("/identities/psk", content=b"x", headers={"Content-Type": "text/plain"}),
                  415, "UnsupportedMediaType")


# --- which organisation -------------------------------------------------------------------------


def test_the_organisation_is_the_callers(server: ServerProcess, root: Api, tenant: Tenant, other_tenant: Tenant) -> None:
    added = root.post(f"/api/v1/orgs/{other_tenant.org_id}/users",
                      json={"email": email_of(tenant.member), "password": "ignored-password", "role": "member"})
    assert added.status_code == 201, added.text
    def counts() -> tuple[int, int]:
        return device_count(root, tenant.org_id), device_count(root, other_tenant.org_id)

    before = counts()
    for path in ("/identities/psk", "/identities/certificates"):
        assert "X-Pilotboat-Org" in creator_error(tenant.member.post(path), 400, "BadRequest")
    assert counts() == before

    named = new_psk(tenant.member, headers={"X-Pilotboat-Org": other_tenant.org_id})
    assert named["Identity"] in psks(root, other_tenant.org_id)
    assert named["Identity"] not in psks(root, tenant.org_id)
    fetched = tenant.member.get(f"/identities/psk/{named['Identity']}", headers={"X-Pilotboat-Org": other_tenant.org_id})
    assert fetched.status_code == 200 and json_of(fetched)["Secret"] == named["Secret"]
    creator_error(tenant.member.get(f"/identities/psk/{named['Identity']}", headers={"X-Pilotboat-Org": tenant.org_id}),
                  404, "NotFound")
    # An organisation the caller is not in: not found, nothing made.
    outsider = tenant.admin.post("/identities/psk", headers={"X-Pilotboat-Org": other_tenant.org_id})
    creator_error(outsider, 404, "NotFound")

    # An API key restricted to one organisation acts there without the header, and only there.
    with Api(server.url, key_for(tenant.member, tenant.org_id)) as keyed:
        restricted = new_psk(keyed)
        assert restricted["Identity"] in psks(root, tenant.org_id)
        _, certificate, _ = split_raw(new_certificate(keyed)["RawCertificate"])
        guid = uuid.UUID(int=certificate.serial_number)
        assert devices_with_endpoint(root, tenant.org_id, guid.urn)
        creator_error(keyed.post("/identities/psk", headers={"X-Pilotboat-Org": other_tenant.org_id}), 404, "NotFound")
    assert counts() == (before[0] + 2, before[1] + 1)


# --- secrets stay secret ------------------------------------------------------------------------


def test_psk_secret_is_not_in_the_log_or_the_events(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    created = new_psk(tenant.admin)
    assert tenant.admin.get(f"/identities/psk/{created['Identity']}").status_code == 200
    raw = new_certificate(tenant.admin)["RawCertificate"]
    key_body = "".join(raw.split("-----")[2].split())  # the base64 of the private key
    events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"limit": 500}).text
    everything = root.get("/api/v1/events", params={"limit": 500}).text
    listed = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/psks").text
    assert created["Identity"] in events  # the events do describe the PSK...
    log = server.log()
    assert log
    for secret in (created["Secret"], created["Secret"].lower(), key_body[:40]):
        for text in (log, events, everything, listed):  # ...but never its key
            assert secret not in text
