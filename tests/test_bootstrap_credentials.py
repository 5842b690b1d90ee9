"""Management-server credentials provisioned at bootstrap, in the device's security mode, on each
database backend: the plan ``BootstrapService.plan_for_endpoint`` builds for a peer that authenticated
over DTLS (the bootstrap DTLS door passes the peer identity it gets from the handshake).

Devices and their factory credentials are made through the running server's API; the plans are
asked of a node built in the test process on the server's database and master key.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credential_helpers import ca_chain, issue, load, org_path
from harness import ServerProcess, Tenant
from identity_helpers import Node, der
from lwm2m_helpers import events_of, make_device
from pilotboat.bootstrap.plan import BootstrapPlan, PlanRefused
from pilotboat.model.management_server import SecurityMode
from pilotboat.model.peer import PeerIdentity
from pilotboat.security import pki
from pilotboat.services.device_identity import Door

DOOR = "coaps"


@pytest.fixture()
def node(server: ServerProcess) -> Iterator[Node]:
    started = Node.start(server, public_host="lwm2m.example.net", lwm2m_dtls_port=5684)
    yield started
    started.close()


def factory_psk(tenant: Tenant, device_id: str) -> PeerIdentity:
    response = tenant.admin.post(org_path(tenant.org_id, f"/devices/{device_id}/psks"), json={})
    assert response.status_code == 201, response.text
    return PeerIdentity(psk_identity=response.json()["identity"].encode())


def factory_certificate(tenant: Tenant, device_id: str) -> PeerIdentity:
    return PeerIdentity(certificate_chain=(der(load(issue(tenant.admin, tenant.org_id, device_id)["certificate_pem"])),))


def plan(node: Node, endpoint: str, peer: PeerIdentity | None) -> BootstrapPlan:
    return node.run(node.services.bootstrap.plan_for_endpoint(endpoint, peer=peer, door=DOOR))


def refusal(node: Node, endpoint: str, peer: PeerIdentity | None) -> PlanRefused:
    with pytest.raises(PlanRefused) as refused:
        plan(node, endpoint, peer)
    return refused.value


def management_psks(node: Node, device_id: str) -> list[tuple[str, str]]:
    return [(psk.identity, psk.state) for psk in node.psks_of(device_id) if psk.purpose == "management"]


def management_certificates(node: Node, device_id: str) -> list[Any]:
    return [record for record in node.certificates_of(device_id) if record.purpose == "management"]


# --- PSK mode --------------------------------------------------------------------------------------


def test_psk_bootstrap_provisions_a_new_management_psk(node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    peer = factory_psk(tenant, device_id)
    first = plan(node, endpoint, peer)
    (account,) = first.servers
    assert account.definition.uri == "coaps://lwm2m.example.net:5684"
    assert account.definition.security_mode is SecurityMode.PSK and account.definition.is_default
    assert len(account.identity) == 22 and len(account.secret_key) == 32 and account.server_public_key == b""
    assert management_psks(node, device_id) == [(account.identity.decode(), "issued")]
    identity = node.services.device_identity
    assert node.run(identity.psk_key(account.identity, Door.MANAGEMENT)) == account.secret_key
    assert node.run(identity.psk_key(account.identity, Door.BOOTSTRAP)) is None
    assert account.secret_key.hex() not in repr(first) and account.secret_key.hex() not in str(first.summary)
    issued = events_of(tenant.admin, tenant.org_id, device_id, "credential.issued")
    assert issued and issued[0]["detail"]["identity"] == account.identity.decode()
    assert account.secret_key.hex() not in str(issued).lower()

    # A bootstrap that did not finish leaves its PSK behind; the next one replaces it.
    second = plan(node, endpoint, peer).servers[0]
    assert second.identity != account.identity and second.secret_key != account.secret_key
    assert management_psks(node, device_id) == [(second.identity.decode(), "issued")]
    # Used once, it is active; a later bootstrap issues another, and the active one keeps working until that is used.
    node.run(identity.resolve(PeerIdentity(psk_identity=second.identity), Door.MANAGEMENT))
    third = plan(node, endpoint, peer).servers[0]
    assert management_psks(node, device_id) == [(second.identity.decode(), "active"), (third.identity.decode(), "issued")]
    node.run(identity.resolve(PeerIdentity(psk_identity=third.identity), Door.MANAGEMENT))
    assert management_psks(node, device_id) == [(third.identity.decode(), "active")]


# --- certificate mode ------------------------------------------------------------------------------


def test_certificate_bootstrap_provisions_a_management_certificate(node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    peer = factory_certificate(tenant, device_id)
    (account,) = plan(node, endpoint, peer).servers
    assert account.definition.uri == "coaps://lwm2m.example.net:5684"
    assert account.definition.security_mode is SecurityMode.CERTIFICATE

    certificate = x509.load_der_x509_certificate(account.identity)
    chain = [load(pem) for pem in ca_chain(tenant.admin, tenant.org_id)]
    path = pki.verify_client_chain(pki.trust_store([chain[-1]]), certificate, chain[:-1])
    assert path[-1] == chain[-1] and pki.common_name(certificate) == endpoint
    key = serialization.load_der_private_key(account.secret_key, password=None)
    assert der(certificate) == account.identity
    assert key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == (
        certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    server = node.run(node.services.device_identity.server_credentials())
    assert account.server_public_key == server.trust_anchor

    (record,) = management_certificates(node, device_id)
    assert (record.fingerprint, record.state, record.key_sealed is not None) == (pki.fingerprint(certificate), "issued", True)
    listed = tenant.viewer.get(org_path(tenant.org_id, f"/certificates/{record.id}")).json()
    assert (listed["purpose"], listed["state"], listed["key_kept"]) == ("management", "issued", True)
    assert node.run(node.services.device_identity.accept_chain((account.identity,), Door.MANAGEMENT))
    assert not node.run(node.services.device_identity.accept_chain((account.identity,), Door.BOOTSTRAP))


def test_renewal_window(server: ServerProcess, node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    peer = factory_certificate(tenant, device_id)
    first = plan(node, endpoint, peer).servers[0]
    # Valid for a year, far beyond 30 days: the same certificate and key again.
    again = plan(node, endpoint, peer).servers[0]
    assert (again.identity, again.secret_key) == (first.identity, first.secret_key)
    node.run(node.services.device_identity.resolve(PeerIdentity(certificate_chain=(first.identity,)), Door.MANAGEMENT))
    (active,) = management_certificates(node, device_id)
    assert active.state == "active"

    # A renewal window longer than the validity: it is within the window, so it is replaced.
    renewing = Node.start(server, public_host="lwm2m.example.net", certificate_renewal_days=400)
    try:
        renewed = plan(renewing, endpoint, peer).servers[0]
        assert renewed.identity != first.identity
        assert x509.load_der_x509_certificate(renewed.identity).not_valid_after_utc > datetime.now(UTC) + timedelta(days=300)
        replaced = plan(renewing, endpoint, peer).servers[0]  # the unfinished renewal is superseded
        states = {pki.fingerprint(x509.load_der_x509_certificate(item.identity)): item for item in (first, renewed, replaced)}
        by_fingerprint = {record.fingerprint: record for record in management_certificates(node, device_id)}
        old, unused, new = (by_fingerprint[fingerprint] for fingerprint in states)
        assert (old.state, old.revoked_at) == ("active", None)
        assert (unused.state, unused.revocation_reason) == ("issued", "superseded")
        assert (new.state, new.revoked_at) == ("issued", None)
        renewing.run(renewing.services.device_identity.resolve(PeerIdentity(certificate_chain=(replaced.identity,)), Door.MANAGEMENT))
        assert node.certificate(old.id).revocation_reason == "superseded"
        assert node.certificate(new.id).state == "active"
    finally:
        renewing.close()


# --- refusals --------------------------------------------------------------------------------------


def test_credential_of_another_device_is_refused_with_4_03(node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    victim, victim_id = make_device(tenant)
    for peer in (factory_psk(tenant, device_id), factory_certificate(tenant, device_id)):
        refused = refusal(node, victim, peer)
        assert (str(refused), refused.code) == ("credential of another device", "4.03")
    failed = events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.failed")
    assert len(failed) == 2 and all(event["reason"] == "credential of another device" for event in failed)
    assert failed[0]["detail"]["endpoint"] == victim
    assert management_psks(node, device_id) == [] and management_psks(node, victim_id) == []
    assert management_certificates(node, device_id) == [] and management_certificates(node, victim_id) == []
    # Unknown endpoint: 4.00, as on plain CoAP.
    assert refusal(node, "urn:dev:nobody", factory_psk(tenant, device_id)).code == "4.00"
    assert plan(node, endpoint, factory_psk(tenant, device_id)).device_id == device_id


def test_management_credentials_and_inactive_devices_do_not_bootstrap(node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    managed = tenant.admin.post(org_path(tenant.org_id, f"/devices/{device_id}/psks"), json={"purpose": "management"}).json()
    refused = refusal(node, endpoint, PeerIdentity(psk_identity=managed["identity"].encode()))
    assert "unknown bootstrap PSK identity" in str(refused) and refused.code == "4.00"
    sleeping, sleeping_id = make_device(tenant, state=0)
    refused = refusal(node, sleeping, factory_psk(tenant, sleeping_id))
    assert str(refused) == "device inactive"
    assert events_of(tenant.admin, tenant.org_id, sleeping_id, "bootstrap.failed")[0]["reason"] == "device inactive"
    assert management_psks(node, sleeping_id) == []


def test_plain_coap_gets_nosec_and_without_nosec_nothing(server: ServerProcess, node: Node, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    (account,) = plan(node, endpoint, None).servers
    assert (account.definition.uri, account.definition.security_mode) == ("coap://lwm2m.example.net:5683", SecurityMode.NOSEC)
    assert (account.identity, account.secret_key) == (b"", b"")
    # The preview (of the running server, whose public host is its own) stays the plain-CoAP plan.
    preview = tenant.viewer.get(org_path(tenant.org_id, f"/devices/{device_id}/bootstrap-plan"))
    assert preview.status_code == 200, preview.text
    assert preview.json()["servers"][0]["security_mode"] == "NOSEC" and preview.json()["servers"][0]["uri"] == server.lwm2m_uri

    strict = Node.start(server, public_host="lwm2m.example.net", allow_nosec=False)
    try:
        assert strict.services.management_servers.default.security_mode is SecurityMode.PSK
        assert "DTLS only" in str(refusal(strict, endpoint, None))
        (secured,) = plan(strict, endpoint, factory_psk(tenant, device_id)).servers
        assert secured.definition.uri == "coaps://lwm2m.example.net:5684"
    finally:
        strict.close()
    assert management_psks(node, device_id) == [(secured.identity.decode(), "issued")]

