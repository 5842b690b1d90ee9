"""The deployment's trust store through a real server, on each database backend, and the answer the
DTLS layer gets from ``TrustService.identify``.

Only system administrators change the trust store; reading it needs the 'device_management_server'
permission in some organisation (org admins hold it, others may be granted it). ``identify`` is no
HTTP route: the tests build a node in the test process on the server's own database and master key,
issue and revoke through the server, and ask that node whose device a certificate chain is.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from compat_helpers import new_device, system_events, unique
from credential_helpers import (
    assert_native_error,
    ca_chain,
    issue,
    load,
    openssl_ca,
    org_path,
    self_signed,
    server_settings,
    set_policy,
)
from harness import ADMIN_EMAIL, Api, ServerProcess, Tenant
from pilotboat.runtime import Runtime, build_runtime
from pilotboat.security import pki
from pilotboat.services import trust
from pilotboat.services.trust import ClientIdentity, Untrusted

TRUST_STORE = "/api/v1/trust-store"
GRANT = "device_management_server"


def entry_ids(client: Api) -> set[str]:
    response = client.get(TRUST_STORE)
    assert response.status_code == 200, response.text
    return {entry["id"] for entry in response.json()}


def add(root: Api, certificate_pem: str, name: str = "") -> dict[str, Any]:
    response = root.post(TRUST_STORE, json={"certificate": certificate_pem, "name": name})
    assert response.status_code == 201, response.text
    return response.json()


def set_grants(client: Api, tenant: Tenant, role: str, grants: list[str]) -> int:
    return client.patch(org_path(tenant.org_id, f"/users/{tenant.users[role]}"), json={"grants": grants}).status_code


@pytest.fixture()
def foreign_root(root: Api) -> Iterator[tuple[pki.CertificateAuthority, dict[str, Any]]]:
    """A CA of another deployment, its root in the trust store for the test."""
    foreign = pki.generate_ca(unique("Foreign"))
    entry = add(root, pki.certificate_pem(foreign.parents[0]), name="moved in")
    yield foreign, entry
    root.delete(f"{TRUST_STORE}/{entry['id']}")


# --- the trust store ---------------------------------------------------------------------------------


def test_system_admin_adds_lists_gets_and_deletes(root: Api, tmp_path: Path) -> None:
    chain, _ = openssl_ca(tmp_path, unique("Partner"))
    certificate = load(chain[1])
    before = entry_ids(root)
    entry = add(root, chain[1], name="partner root")
    assert entry["name"] == "partner root" and entry["added_by"] == ADMIN_EMAIL
    assert entry["fingerprint"] == pki.fingerprint(certificate) and entry["subject"] == certificate.subject.rfc4514_string()
    assert load(entry["certificate_pem"]) == certificate
    assert entry_ids(root) == before | {entry["id"]}
    got = root.get(f"{TRUST_STORE}/{entry['id']}")
    assert got.status_code == 200 and got.json() == entry

    unnamed = add(root, chain[0])  # an intermediate CA may be an anchor too; its name defaults to its subject
    assert unnamed["name"] == load(chain[0]).subject.rfc4514_string()
    assert_native_error(root.post(TRUST_STORE, json={"certificate": chain[1]}), 400, "certificate")
    assert entry_ids(root) == before | {entry["id"], unnamed["id"]}

    for entry_id in (entry["id"], unnamed["id"]):
        assert root.delete(f"{TRUST_STORE}/{entry_id}").status_code == 204
        assert_native_error(root.get(f"{TRUST_STORE}/{entry_id}"), 404)
        assert_native_error(root.delete(f"{TRUST_STORE}/{entry_id}"), 404)
    assert entry_ids(root) == before
    kinds = [event["kind"] for event in system_events(root, kind="trust.") if event["detail"].get("entry_id") == entry["id"]]
    assert sorted(kinds) == ["trust.added", "trust.removed"]


def _not_a_ca() -> str:
    return pki.certificate_pem(self_signed("leaf", ca=False)[0])


def _expired() -> str:
    now = datetime.now(UTC)
    return pki.certificate_pem(self_signed("old", not_before=now - timedelta(days=90), not_after=now - timedelta(days=1))[0])


def _not_yet_valid() -> str:
    now = datetime.now(UTC)
    return pki.certificate_pem(self_signed("future", not_before=now + timedelta(days=2), not_after=now + timedelta(days=90))[0])


def _garbage() -> str:
    return "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"


def _bundle_of_two() -> str:
    return pki.certificate_pem(self_signed("one")[0]) + pki.certificate_pem(self_signed("two")[0])


def _key_instead() -> str:
    return pki.key_pem(self_signed("x")[1])


@pytest.mark.parametrize("make", [_not_a_ca, _expired, _not_yet_valid, _garbage, _bundle_of_two, _key_instead],
                         ids=lambda make: make.__name__.strip("_"))
def test_bad_certificate_is_refused_and_changes_nothing(root: Api, make: Any) -> None:
    before = entry_ids(root)
    assert_native_error(root.post(TRUST_STORE, json={"certificate": make()}), 400, "certificate")
    assert entry_ids(root) == before


def test_malformed_body_is_refused(root: Api) -> None:
    before = entry_ids(root)
    certificate = pki.certificate_pem(self_signed("x")[0])
    for body, field in (({}, "certificate"), ({"certificate": ""}, "certificate"),
                        ({"certificate": certificate, "name": "n" * 257}, "name"),
                        ({"certificate": certificate, "trusted": True}, "trusted")):
        assert_native_error(root.post(TRUST_STORE, json=body), 422, field)
    assert entry_ids(root) == before


def test_organisation_cas_are_trusted_already(root: Api, tenant: Tenant) -> None:
    before = entry_ids(root)
    for pem in ca_chain(tenant.admin, tenant.org_id):
        detail = assert_native_error(root.post(TRUST_STORE, json={"certificate": pem}), 400, "certificate")
        assert "already trusted" in detail
    assert entry_ids(root) == before


def test_reading_needs_the_device_management_server_permission(root: Api, tenant: Tenant, tmp_path: Path) -> None:
    chain, _ = openssl_ca(tmp_path, unique("Partner"))
    entry = add(root, chain[1])
    item = f"{TRUST_STORE}/{entry['id']}"
    try:
        for client in (tenant.member, tenant.viewer):
            assert_native_error(client.get(TRUST_STORE), 403)
            assert_native_error(client.get(item), 403)
        # An org admin holds the permission with the role, but changes nothing: that is for system administrators.
        assert entry["id"] in entry_ids(tenant.admin)
        assert tenant.admin.get(item).status_code == 200
        for client in (tenant.admin, tenant.member):
            assert_native_error(client.post(TRUST_STORE, json={"certificate": chain[0]}), 403)
            assert_native_error(client.delete(item), 403)

        # Only who manages users may grant it.
        assert set_grants(tenant.member, tenant, "viewer", [GRANT]) == 403
        assert_native_error(tenant.viewer.get(TRUST_STORE), 403)
        assert set_grants(tenant.admin, tenant, "member", [GRANT]) == 204
        members = {user["id"]: user for user in tenant.admin.get(org_path(tenant.org_id, "/users")).json()}
        assert members[tenant.users["member"]]["grants"] == [GRANT]
        assert members[tenant.users["viewer"]]["grants"] == []

        assert entry["id"] in entry_ids(tenant.member)
        assert tenant.member.get(item).json() == entry
        assert_native_error(tenant.member.post(TRUST_STORE, json={"certificate": chain[0]}), 403)
        assert_native_error(tenant.member.delete(item), 403)
        assert_native_error(tenant.viewer.get(TRUST_STORE), 403)
        # The grant adds to the role: still no admin rights in the organisation.
        assert_native_error(tenant.member.patch(org_path(tenant.org_id), json={"cert_validity_days": 3}), 403)

        assert set_grants(tenant.admin, tenant, "member", []) == 204
        assert_native_error(tenant.member.get(TRUST_STORE), 403)
        assert set_grants(tenant.admin, tenant, "member", ["write"]) == 400
        assert entry["id"] in entry_ids(root)
    finally:
        assert root.delete(item).status_code == 204


# --- identify(), as the DTLS layer asks it -------------------------------------------------------------


@dataclass
class Node:
    """Another node of the deployment: the server's database and master key, in the test process."""

    runtime: Runtime
    loop: asyncio.AbstractEventLoop

    def identify(self, chain: list[x509.Certificate], now: datetime | None = None) -> ClientIdentity:
        return self.loop.run_until_complete(self.runtime.services.trust.identify(chain, now=now))

    def refuses(self, chain: list[x509.Certificate], now: datetime | None = None) -> str:
        with pytest.raises(Untrusted) as refused:
            self.identify(chain, now)
        return str(refused.value)


@pytest.fixture()
def node(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # The trust store is changed through the server, another node: read it afresh on every call.
    monkeypatch.setattr(trust, "ANCHOR_CACHE_SECONDS", 0.0)
    loop = asyncio.new_event_loop()
    runtime = build_runtime(server_settings(server))
    yield Node(runtime, loop)
    loop.run_until_complete(runtime.engine.dispose())
    loop.close()


def test_identify_certificates_issued_here(node: Node, tenant: Tenant) -> None:
    org_id = tenant.org_id
    endpoint = unique("urn:dev")
    dev = new_device(tenant.admin, org_id, name="meter", endpoint=endpoint)
    issued = issue(tenant.admin, org_id, dev["id"])
    leaf, chain = load(issued["certificate_pem"]), [load(pem) for pem in ca_chain(tenant.admin, org_id)]
    expected = ClientIdentity(endpoint, org_id, dev["id"], issued["id"], chain[0].subject.rfc4514_string())
    assert node.identify([leaf]) == expected
    assert node.identify([leaf, chain[0]]) == expected
    assert node.identify([leaf, *chain]) == expected

    anonymous = new_device(tenant.admin, org_id, name="no endpoint")
    other = issue(tenant.member, org_id, anonymous["id"])
    found = node.identify([load(other["certificate_pem"])])
    assert (found.endpoint, found.org_id, found.device_id, found.certificate_id) == (
        f"urn:uuid:{other['id']}", org_id, anonymous["id"], other["id"]
    )
    assert "no client certificate" in node.refuses([])


def test_revoked_expired_and_orphaned_certificates_are_untrusted(node: Node, tenant: Tenant) -> None:
    org_id = tenant.org_id
    set_policy(tenant.admin, org_id, cert_validity_days=1)
    dev = new_device(tenant.admin, org_id, name="meter")
    revoked, expiring, untouched = (issue(tenant.admin, org_id, dev["id"]) for _ in range(3))
    assert node.identify([load(revoked["certificate_pem"])]).certificate_id == revoked["id"]

    assert tenant.admin.post(org_path(org_id, f"/certificates/{revoked['id']}/revoke")).status_code == 200
    assert "revoked" in node.refuses([load(revoked["certificate_pem"])])

    leaf = load(expiring["certificate_pem"])
    assert node.identify([leaf], now=leaf.not_valid_after_utc - timedelta(minutes=1)).certificate_id == expiring["id"]
    node.refuses([leaf], now=leaf.not_valid_after_utc + timedelta(minutes=1))

    other_dev = new_device(tenant.admin, org_id, name="doomed")
    orphan = issue(tenant.admin, org_id, other_dev["id"])
    assert node.identify([load(orphan["certificate_pem"])]).device_id == other_dev["id"]
    assert tenant.admin.delete(org_path(org_id, f"/devices/{other_dev['id']}")).status_code == 204
    node.refuses([load(orphan["certificate_pem"])])
    assert node.identify([load(untouched["certificate_pem"])]).device_id == dev["id"]  # the first device keeps its own


def test_certificates_of_a_replaced_ca_keep_working(node: Node, tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    before = issue(tenant.admin, org_id, dev["id"])
    own_chain, own_key = openssl_ca(tmp_path, unique("Own"))
    imported = tenant.admin.post(org_path(org_id, "/cas"), json={"certificate": own_chain[0], "private_key": own_key,
                                                                   "chain": own_chain[1]})
    assert imported.status_code == 201, imported.text
    after = issue(tenant.admin, org_id, dev["id"])
    assert node.identify([load(before["certificate_pem"])]).certificate_id == before["id"]
    found = node.identify([load(after["certificate_pem"]), *(load(pem) for pem in own_chain)])
    assert (found.certificate_id, found.device_id, found.issuer) == (after["id"], dev["id"], load(own_chain[0]).subject.rfc4514_string())


def _foreign_leaf(ca: pki.CertificateAuthority, common_name: str, days: int = 30) -> x509.Certificate:
    return pki.issue_device_certificate(ca, pki.new_key().public_key(), common_name, uuid.uuid4(), timedelta(days=days))


def test_foreign_certificate_is_untrusted_without_its_root(node: Node, tenant: Tenant) -> None:
    endpoint = unique("urn:dev")
    new_device(tenant.admin, tenant.org_id, name="impersonated", endpoint=endpoint)
    stranger = pki.generate_ca(unique("Stranger"))
    node.refuses([_foreign_leaf(stranger, endpoint), stranger.certificate])
    node.refuses([_foreign_leaf(stranger, endpoint), *stranger.chain])
    # A copy of a certificate issued here (same subject, serial and SAN), signed by a stranger.
    dev = new_device(tenant.admin, tenant.org_id, name="copied")
    genuine = load(issue(tenant.admin, tenant.org_id, dev["id"])["certificate_pem"])
    forged = pki.issue_device_certificate(
        stranger, genuine.public_key(), pki.common_name(genuine) or "", pki.device_guid(genuine) or uuid.uuid4(), timedelta(days=30)  # type: ignore[arg-type]
    )
    assert forged.serial_number == genuine.serial_number and forged.subject == genuine.subject
    node.refuses([forged, stranger.certificate])


def test_foreign_certificate_is_identified_once_its_root_is_trusted(
    node: Node, root: Api, tenant: Tenant, foreign_root: tuple[pki.CertificateAuthority, dict[str, Any]]
) -> None:
    foreign, entry = foreign_root
    endpoint = unique("urn:dev")
    dev = new_device(tenant.admin, tenant.org_id, name="moved in", endpoint=endpoint)
    leaf = _foreign_leaf(foreign, endpoint, days=10)
    anchor = foreign.parents[0].subject.rfc4514_string()
    assert node.identify([leaf, foreign.certificate]) == ClientIdentity(endpoint, tenant.org_id, dev["id"], None, anchor)
    # The intermediate is not in the store: without it there is no path.
    node.refuses([leaf])
    # An unknown endpoint: trusted, but no device of this deployment.
    stranger = unique("urn:dev")
    assert node.identify([_foreign_leaf(foreign, stranger), foreign.certificate]) == ClientIdentity(stranger, None, None, None, anchor)
    node.refuses([leaf, foreign.certificate], now=leaf.not_valid_after_utc + timedelta(minutes=1))

    assert root.delete(f"{TRUST_STORE}/{entry['id']}").status_code == 204
    node.refuses([leaf, foreign.certificate])
