"""PSK identities through a real server, on each database backend.

A generated identity is 16 random bytes in URL-safe base64 (22 characters), its key 32 random bytes
unless asked for 16; a factory PSK can be imported. Identities are unique in the whole deployment
(a DTLS server looks one up before it knows the organisation). The key is shown in the create
response only: never in reads, events or the log, and sealed in the database.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import pytest

from compat_helpers import new_device, unique
from credential_helpers import assert_native_error, org_path, raw_dump, raw_rows
from harness import Api, ServerProcess, Tenant
from pilotboat.security.sealing import Sealer, load_master_keys
from pilotboat.services.psks import PSK_KEY_PURPOSE

URL_SAFE = re.compile(r"^[A-Za-z0-9_-]{22}$")


def create(client: Api, org_id: str, device_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post(org_path(org_id, f"/devices/{device_id}/psks"), json=body)
    assert response.status_code == 201, response.text
    return response.json()


def listing(client: Api, org_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(org_path(org_id, "/psks"), params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return response.json()


def identities(client: Api, org_id: str, **params: Any) -> set[str]:
    return {row["identity"] for row in listing(client, org_id, **params)["psks"]}


def key_spellings(key_hex: str) -> list[str]:
    return [key_hex.upper(), key_hex.lower()]


def test_generated_psk(server: ServerProcess, tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="sensor")
    created = create(tenant.member, org_id, dev["id"])
    identity, key = created["identity"], created["key"]
    assert URL_SAFE.match(identity), identity
    assert len(base64.urlsafe_b64decode(identity + "==")) == 16
    assert re.fullmatch(r"[0-9A-F]{64}", key), key
    assert (created["key_length"], created["source"], created["device_id"]) == (32, "generated", dev["id"])

    short = create(tenant.admin, org_id, dev["id"], {"key_length": 16})
    assert re.fullmatch(r"[0-9A-F]{32}", short["key"]) and short["key_length"] == 16

    # The keys are shown once: not in reads, events or the log, and sealed in the database.
    got = tenant.viewer.get(org_path(org_id, f"/psks/{created['id']}"))
    assert got.status_code == 200, got.text
    assert got.json() == {k: v for k, v in created.items() if k != "key"}
    reads = [
        got.text,
        tenant.viewer.get(org_path(org_id, "/psks")).text,
        tenant.viewer.get(org_path(org_id, "/psks"), params={"device_id": dev["id"]}).text,
        tenant.admin.get(org_path(org_id, "/events"), params={"limit": 500}).text,
        tenant.admin.get(org_path(org_id, f"/devices/{dev['id']}")).text,
        server.log(),
    ]
    assert identity in reads[1] and identity in reads[3]  # the reads are the real ones
    dump = raw_dump(server)
    assert identity in dump
    for secret in (*key_spellings(key), *key_spellings(short["key"])):
        for text in (*reads, dump):
            assert secret not in text
    sealer = Sealer(load_master_keys(None, server.data_dir))
    for row in (created, short):
        ((sealed,),) = raw_rows(server, "SELECT key_sealed FROM psk_identities WHERE id = ?", row["id"])
        assert sealed.startswith("pbs1.")
        assert sealer.open_bytes(sealed, PSK_KEY_PURPOSE) == bytes.fromhex(row["key"])


def test_generated_identities_are_all_different(tenant: Tenant) -> None:
    dev = new_device(tenant.admin, tenant.org_id, name="many")
    created = [create(tenant.admin, tenant.org_id, dev["id"]) for _ in range(200)]
    assert len({row["identity"] for row in created}) == 200
    assert len({row["key"] for row in created}) == 200
    assert listing(tenant.admin, tenant.org_id)["total"] == 200


def test_import_and_deployment_wide_uniqueness(tenant: Tenant, other_tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="factory")
    identity, key = unique("factory-id"), uuid.uuid4().hex + uuid.uuid4().hex[:8]
    imported = create(tenant.admin, org_id, dev["id"], {"identity": identity, "key": key})
    assert (imported["identity"], imported["key"], imported["key_length"], imported["source"]) == (identity, key.upper(), 20, "imported")

    theirs = new_device(other_tenant.admin, other_tenant.org_id, name="theirs")
    other_key = uuid.uuid4().hex
    for client, target_org, device_id in ((other_tenant.admin, other_tenant.org_id, theirs["id"]), (tenant.admin, org_id, dev["id"])):
        response = client.post(org_path(target_org, f"/devices/{device_id}/psks"), json={"identity": identity, "key": other_key})
        detail = assert_native_error(response, 409, "identity")
        for value in (tenant.org_id, tenant.name, dev["id"], imported["id"], key.upper(), key.lower()):
            assert value not in response.text, detail
    assert identities(other_tenant.admin, other_tenant.org_id) == set()
    assert listing(tenant.admin, org_id)["total"] == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"identity": "with space", "key": "00" * 16}, 400, "identity"),
        ({"identity": "x" * 129, "key": "00" * 16}, 422, "identity"),
        ({"identity": "", "key": "00" * 16}, 422, "identity"),
        ({"identity": "tab\there", "key": "00" * 16}, 400, "identity"),
        ({"identity": "ok-identity", "key": "0" * 33}, 400, "key"),
        ({"identity": "ok-identity", "key": "zz" * 16}, 422, "key"),
        ({"identity": "ok-identity", "key": "00" * 15}, 422, "key"),
        ({"identity": "ok-identity", "key": "00" * 65}, 422, "key"),
        ({"identity": "ok-identity"}, 400, "key"),
        ({"key": "00" * 16}, 400, "identity"),
        ({"key_length": 8}, 422, "key_length"),
        ({"key_length": 65}, 422, "key_length"),
        ({"secret": "00" * 16}, 422, "secret"),
    ],
    ids=["space", "too-long", "empty", "tab", "odd-length", "not-hex", "too-short", "too-long-key", "identity-only",
         "key-only", "short-generated", "long-generated", "unknown-field"],
)
def test_bad_psk_input_is_refused_and_creates_nothing(tenant: Tenant, body: dict[str, Any], status: int, field: str) -> None:
    dev = new_device(tenant.admin, tenant.org_id, name="bad")
    response = tenant.admin.post(org_path(tenant.org_id, f"/devices/{dev['id']}/psks"), json=body)
    assert_native_error(response, status, field)
    assert listing(tenant.admin, tenant.org_id)["total"] == 0


def test_delete_and_reimport(server: ServerProcess, tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="sensor")
    generated = create(tenant.admin, org_id, dev["id"])
    assert tenant.admin.delete(org_path(org_id, f"/psks/{generated['id']}")).status_code == 204
    assert_native_error(tenant.admin.get(org_path(org_id, f"/psks/{generated['id']}")), 404)
    assert_native_error(tenant.admin.delete(org_path(org_id, f"/psks/{generated['id']}")), 404)
    assert raw_rows(server, "SELECT id FROM psk_identities WHERE id = ?", generated["id"]) == []

    new_key = uuid.uuid4().hex
    again = create(tenant.admin, org_id, dev["id"], {"identity": generated["identity"], "key": new_key})
    assert again["id"] != generated["id"] and again["key"] == new_key.upper()
    assert identities(tenant.admin, org_id) == {generated["identity"]}


def test_deleting_a_device_deletes_its_psks(tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev, stays = new_device(tenant.admin, org_id, name="doomed"), new_device(tenant.admin, org_id, name="stays")
    doomed, kept = create(tenant.admin, org_id, dev["id"]), create(tenant.admin, org_id, stays["id"])
    assert tenant.admin.delete(org_path(org_id, f"/devices/{dev['id']}")).status_code == 204
    assert identities(tenant.admin, org_id) == {kept["identity"]}
    # The identity is free again.
    create(tenant.admin, org_id, stays["id"], {"identity": doomed["identity"], "key": "11" * 16})


def test_viewer_reads_but_cannot_create_or_delete(tenant: Tenant, other_tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="sensor")
    created = create(tenant.admin, org_id, dev["id"])
    assert identities(tenant.viewer, org_id) == {created["identity"]}
    assert identities(tenant.viewer, org_id, device_id=dev["id"]) == {created["identity"]}
    assert identities(tenant.viewer, org_id, device_id=str(uuid.uuid4())) == set()
    assert_native_error(tenant.viewer.post(org_path(org_id, f"/devices/{dev['id']}/psks")), 403)
    assert_native_error(tenant.viewer.delete(org_path(org_id, f"/psks/{created['id']}")), 403)
    # Another organisation's caller sees neither the PSK nor the device.
    assert_native_error(other_tenant.admin.get(org_path(other_tenant.org_id, f"/psks/{created['id']}")), 404)
    assert_native_error(other_tenant.admin.delete(org_path(other_tenant.org_id, f"/psks/{created['id']}")), 404)
    assert_native_error(other_tenant.admin.post(org_path(other_tenant.org_id, f"/devices/{dev['id']}/psks")), 404)
    assert_native_error(tenant.admin.post(org_path(org_id, f"/devices/{uuid.uuid4()}/psks")), 404)
    assert identities(tenant.admin, org_id) == {created["identity"]}
    assert listing(other_tenant.admin, other_tenant.org_id)["total"] == 0
