"""Which device a DTLS peer is (``DeviceIdentityService``), on each database backend.

Credentials are made through the running server's API; the questions the DTLS servers ask (a PSK's
key, whether a certificate chain may connect, whose device a request comes from) are asked of a node
built in the test process on the server's database and master key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from compat_helpers import unique
from credential_helpers import assert_native_error, ca_chain, issue, load, org_path, pem_body_lines, self_signed
from harness import Api, ServerProcess, Tenant
from identity_helpers import Node, der, long_ago
from lwm2m_helpers import events_of, make_device
from pilotboat.model.credential import CredentialState, Purpose
from pilotboat.model.management_server import SecurityMode
from pilotboat.model.peer import PeerIdentity
from pilotboat.security import pki
from pilotboat.services import trust
from pilotboat.services.device_identity import AuthenticatedDevice, DeviceIdentityService, Door, IdentityRefused, ServerKeySource
from pilotboat.services.server_key import ServerCredentialsError, key_pair_from_pem, self_signed as server_self_signed

TRUST_STORE = "/api/v1/trust-store"


@pytest.fixture()
def node(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    monkeypatch.setattr(trust, "ANCHOR_CACHE_SECONDS", 0.0)  # the trust store changes through the server
    started = Node.start(server)
    yield started
    started.close()


def create_psk(client: Api, org_id: str, device_id: str, **body: Any) -> dict[str, Any]:
    response = client.post(org_path(org_id, f"/devices/{device_id}/psks"), json=body)
    assert response.status_code == 201, response.text
    return response.json()


def refused(node: Node, peer: PeerIdentity, door: Door) -> str:
    with pytest.raises(IdentityRefused) as refusal:
        node.run(node.services.device_identity.resolve(peer, door))
    return str(refusal.value)


def resolve(node: Node, peer: PeerIdentity, door: Door) -> AuthenticatedDevice:
    return node.run(node.services.device_identity.resolve(peer, door))


def accepts(node: Node, chain: list[x509.Certificate], door: Door) -> bool:
    return node.run(node.services.device_identity.accept_chain(tuple(der(c) for c in chain), door))


# --- PSKs ------------------------------------------------------------------------------------------


def test_psk_opens_the_door_of_its_purpose_only(node: Node, tenant: Tenant) -> None:
    org = tenant.org_id
    endpoint, device_id = make_device(tenant)
    factory = create_psk(tenant.admin, org, device_id)
    managed = create_psk(tenant.admin, org, device_id, purpose="management")
    assert (factory["purpose"], factory["state"], managed["purpose"], managed["state"]) == (
        "bootstrap", "active", "management", "active")
    listed = {psk["id"]: psk for psk in tenant.viewer.get(org_path(org, "/psks"), params={"device_id": device_id}).json()["psks"]}
    assert {key: (psk["purpose"], psk["state"]) for key, psk in listed.items()} == {
        factory["id"]: ("bootstrap", "active"), managed["id"]: ("management", "active")}
    assert "key" not in listed[factory["id"]]
    assert tenant.viewer.get(org_path(org, f"/psks/{managed['id']}")).json()["purpose"] == "management"

    identity = node.services.device_identity
    for psk, door, other in ((factory, Door.BOOTSTRAP, Door.MANAGEMENT), (managed, Door.MANAGEMENT, Door.BOOTSTRAP)):
        name = psk["identity"].encode()
        assert node.run(identity.psk_key(name, door)) == bytes.fromhex(psk["key"])
        assert node.run(identity.psk_key(name, other)) is None
        assert resolve(node, PeerIdentity(psk_identity=name), door) == AuthenticatedDevice(
            device_id, org, endpoint, "psk", psk["id"])
        assert resolve(node, PeerIdentity(psk_identity=name), door).security_mode is SecurityMode.PSK
        assert f"unknown {other.value} PSK identity" in refused(node, PeerIdentity(psk_identity=name), other)
    for unknown in (b"no-such-identity", b"\xff\xfe", b"", b"x" * 200):
        assert node.run(identity.psk_key(unknown, Door.BOOTSTRAP)) is None
    assert "no authenticated identity" in refused(node, PeerIdentity(), Door.MANAGEMENT)


def test_bad_purpose_is_refused_and_creates_nothing(tenant: Tenant) -> None:
    org = tenant.org_id
    _, device_id = make_device(tenant)
    for body in ({"purpose": "firmware"}, {"purpose": None}, {"purpose": 1}):
        for route in ("psks", "certificates"):
            assert_native_error(tenant.admin.post(org_path(org, f"/devices/{device_id}/{route}"), json=body), 422, "purpose")
    assert tenant.admin.get(org_path(org, "/psks"), params={"device_id": device_id}).json()["total"] == 0
    assert tenant.admin.get(org_path(org, "/certificates"), params={"device_id": device_id}).json()["total"] == 0


def test_inactive_device_handshakes_but_is_refused_and_a_deleted_one_does_not_handshake(node: Node, tenant: Tenant) -> None:
    org = tenant.org_id
    _, device_id = make_device(tenant, state=0)
    psk = create_psk(tenant.admin, org, device_id)
    certificate = load(issue(tenant.admin, org, device_id)["certificate_pem"])
    name = psk["identity"].encode()
    assert node.run(node.services.device_identity.psk_key(name, Door.BOOTSTRAP)) == bytes.fromhex(psk["key"])
    assert accepts(node, [certificate], Door.BOOTSTRAP)
    assert refused(node, PeerIdentity(psk_identity=name), Door.BOOTSTRAP) == "device inactive"
    assert refused(node, PeerIdentity(certificate_chain=(der(certificate),)), Door.BOOTSTRAP) == "device inactive"

    assert tenant.admin.delete(org_path(org, f"/devices/{device_id}")).status_code == 204
    assert node.run(node.services.device_identity.psk_key(name, Door.BOOTSTRAP)) is None
    assert not accepts(node, [certificate], Door.BOOTSTRAP)


# --- certificates ----------------------------------------------------------------------------------


def test_certificates_of_the_organisation_ca(node: Node, tenant: Tenant) -> None:
    org = tenant.org_id
    endpoint, device_id = make_device(tenant)
    chain = [load(pem) for pem in ca_chain(tenant.admin, org)]
    factory = issue(tenant.admin, org, device_id)
    response = tenant.admin.post(org_path(org, f"/devices/{device_id}/certificates"), json={"purpose": "management"})
    assert response.status_code == 201, response.text
    managed = response.json()
    assert (factory["purpose"], factory["state"], managed["purpose"], managed["state"]) == (
        "bootstrap", "active", "management", "active")
    listed = tenant.viewer.get(org_path(org, "/certificates"), params={"device_id": device_id}).json()["certificates"]
    assert {item["id"]: item["purpose"] for item in listed} == {factory["id"]: "bootstrap", managed["id"]: "management"}

    for record, door, other in ((factory, Door.BOOTSTRAP, Door.MANAGEMENT), (managed, Door.MANAGEMENT, Door.BOOTSTRAP)):
        leaf = load(record["certificate_pem"])
        assert accepts(node, [leaf], door) and accepts(node, [leaf, *chain], door)
        assert not accepts(node, [leaf], other)
        found = resolve(node, PeerIdentity(certificate_chain=(der(leaf), *(der(c) for c in chain))), door)
        assert found == AuthenticatedDevice(device_id, org, endpoint, "certificate", record["id"])
        assert found.security_mode is SecurityMode.CERTIFICATE
        assert f"does not open the {other.value} server" in refused(node, PeerIdentity(certificate_chain=(der(leaf),)), other)

    revoked = tenant.admin.post(org_path(org, f"/certificates/{factory['id']}/revoke"))
    assert revoked.status_code == 200
    assert not accepts(node, [load(factory["certificate_pem"])], Door.BOOTSTRAP)
    assert "revoked" in refused(node, PeerIdentity(certificate_chain=(der(load(factory["certificate_pem"])),)), Door.BOOTSTRAP)

    expired = node.signed_certificate(device_id, purpose=Purpose.BOOTSTRAP, state=CredentialState.ACTIVE,
                                      signed_at=long_ago(10), days=2)
    current = node.signed_certificate(device_id, purpose=Purpose.BOOTSTRAP, state=CredentialState.ACTIVE,
                                      signed_at=long_ago(1), days=30)
    assert not accepts(node, [load(expired.certificate_pem)], Door.BOOTSTRAP)
    assert accepts(node, [load(current.certificate_pem)], Door.BOOTSTRAP)

    stranger = pki.generate_ca(unique("Stranger"))
    untrusted = pki.issue_device_certificate(stranger, pki.new_key().public_key(), endpoint, uuid.uuid4(), timedelta(days=30))
    for door in Door:
        assert not accepts(node, [untrusted, *stranger.chain], door)
    assert not node.run(node.services.device_identity.accept_chain((b"not a certificate",), Door.MANAGEMENT))
    assert not node.run(node.services.device_identity.accept_chain((), Door.MANAGEMENT))


def test_trust_store_certificates_open_the_management_door_only(node: Node, root: Api, tenant: Tenant) -> None:
    foreign = pki.generate_ca(unique("Foreign"))
    added = root.post(TRUST_STORE, json={"certificate": pki.certificate_pem(foreign.parents[0]), "name": "moved in"})
    assert added.status_code == 201, added.text
    try:
        endpoint, device_id = make_device(tenant)
        leaf = pki.issue_device_certificate(foreign, pki.new_key().public_key(), endpoint, uuid.uuid4(), timedelta(days=30))
        chain = [leaf, foreign.certificate]
        assert accepts(node, chain, Door.MANAGEMENT)
        assert not accepts(node, chain, Door.BOOTSTRAP)
        peer = PeerIdentity(certificate_chain=tuple(der(c) for c in chain))
        assert resolve(node, peer, Door.MANAGEMENT) == AuthenticatedDevice(
            device_id, tenant.org_id, endpoint, "certificate", f"trusted:{pki.fingerprint(leaf)}")
        assert "management server only" in refused(node, peer, Door.BOOTSTRAP)
        nobody = pki.issue_device_certificate(foreign, pki.new_key().public_key(), unique("urn:dev"), uuid.uuid4(), timedelta(days=30))
        assert not accepts(node, [nobody, foreign.certificate], Door.MANAGEMENT)
    finally:
        assert root.delete(f"{TRUST_STORE}/{added.json()['id']}").status_code == 204
    assert not accepts(node, chain, Door.MANAGEMENT)


# --- activation of issued management credentials ---------------------------------------------------


def test_first_use_of_an_issued_psk_activates_it_and_retires_the_older_ones(node: Node, tenant: Tenant) -> None:
    org = tenant.org_id
    endpoint, device_id = make_device(tenant)
    factory = create_psk(tenant.admin, org, device_id)
    old = create_psk(tenant.admin, org, device_id, purpose="management")
    identity, key = node.issued_psk(device_id)
    states = {psk.identity: (psk.purpose, psk.state) for psk in node.psks_of(device_id)}
    assert states == {factory["identity"]: ("bootstrap", "active"), old["identity"]: ("management", "active"),
                      identity: ("management", "issued")}
    # Both management PSKs open the management door until the new one is used; the bootstrap door changes nothing.
    assert node.run(node.services.device_identity.psk_key(old["identity"].encode(), Door.MANAGEMENT)) is not None
    assert node.run(node.services.device_identity.psk_key(identity.encode(), Door.MANAGEMENT)) == key
    resolve(node, PeerIdentity(psk_identity=old["identity"].encode()), Door.MANAGEMENT)
    assert {psk.identity: psk.state for psk in node.psks_of(device_id)}[identity] == "issued"

    found = resolve(node, PeerIdentity(psk_identity=identity.encode()), Door.MANAGEMENT)
    assert (found.device_id, found.kind) == (device_id, "psk")
    assert {psk.identity: (psk.purpose, psk.state) for psk in node.psks_of(device_id)} == {
        factory["identity"]: ("bootstrap", "active"), identity: ("management", "active")}
    assert node.run(node.services.device_identity.psk_key(old["identity"].encode(), Door.MANAGEMENT)) is None
    resolve(node, PeerIdentity(psk_identity=identity.encode()), Door.MANAGEMENT)  # a second use changes nothing
    activated = events_of(tenant.admin, org, device_id, "credential.activated")
    retired = events_of(tenant.admin, org, device_id, "credential.retired")
    assert len(activated) == 1 and activated[0]["detail"]["credential_id"] == found.credential_id
    assert len(retired) == 1 and retired[0]["detail"]["credential_ids"] == [old["id"]]
    assert activated[0]["actor"] == f"device:{endpoint}"
    for event in activated + retired:
        assert key.hex() not in str(event).lower() and old["key"].lower() not in str(event).lower()


def test_first_use_of_an_issued_certificate_revokes_the_older_ones(node: Node, tenant: Tenant) -> None:
    org = tenant.org_id
    _, device_id = make_device(tenant)
    factory = issue(tenant.admin, org, device_id)
    old = tenant.admin.post(org_path(org, f"/devices/{device_id}/certificates"), json={"purpose": "management"}).json()
    new = node.signed_certificate(device_id)
    assert (new.purpose, new.state) == ("management", "issued")
    peer = PeerIdentity(certificate_chain=(der(load(new.certificate_pem)),))
    assert resolve(node, peer, Door.MANAGEMENT).credential_id == new.id
    assert node.certificate(new.id).state == "active"
    superseded = node.certificate(old["id"])
    assert (superseded.revocation_reason, superseded.revoked_at is not None) == ("superseded", True)
    assert node.certificate(factory["id"]).revoked_at is None  # the bootstrap credential stays
    assert not accepts(node, [load(old["certificate_pem"])], Door.MANAGEMENT)
    assert tenant.viewer.get(org_path(org, f"/certificates/{old['id']}")).json()["revocation_reason"] == "superseded"
    retired = events_of(tenant.admin, org, device_id, "credential.retired")
    assert retired and retired[0]["detail"]["credential_ids"] == [old["id"]]
    # The organisation CA's CRL lists it.
    ca_id = old["ca_id"]
    crl = x509.load_pem_x509_crl(tenant.viewer.get(org_path(org, f"/cas/{ca_id}/crl")).text.encode())
    assert crl.get_revoked_certificate_by_serial_number(int(old["serial"], 16)) is not None


def test_concurrent_first_uses_activate_once(node: Node, tenant: Tenant) -> None:
    _, device_id = make_device(tenant)
    create_psk(tenant.admin, tenant.org_id, device_id, purpose="management")
    identity, _ = node.issued_psk(device_id)
    peer = PeerIdentity(psk_identity=identity.encode())

    async def together() -> list[AuthenticatedDevice]:
        return await asyncio.gather(*(node.services.device_identity.resolve(peer, Door.MANAGEMENT) for _ in range(5)))

    assert {found.credential_id for found in node.run(together())} == {node.psks_of(device_id)[-1].id}
    assert [psk.identity for psk in node.psks_of(device_id)] == [identity]
    assert len(events_of(tenant.admin, tenant.org_id, device_id, "credential.activated")) == 1


# --- the DTLS server's own key pair ----------------------------------------------------------------


def test_deployment_certificate_is_created_once_for_every_node(server: ServerProcess) -> None:
    nodes = [Node.start(server, public_host="lwm2m.example.net") for _ in range(2)]
    try:
        async def both() -> list[Any]:
            return await asyncio.gather(*(node.services.device_identity.server_credentials() for node in nodes))

        first, second = nodes[0].run(both())
        assert first.certificate_chain == second.certificate_chain and first.private_key == second.private_key
        certificate = x509.load_der_x509_certificate(first.trust_anchor)
        key = serialization.load_der_private_key(first.private_key, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        assert key.public_key().public_numbers() == certificate.public_key().public_numbers()  # type: ignore[union-attr]
        certificate.verify_directly_issued_by(certificate)  # self-signed
        assert "private" not in repr(first).lower() and str(len(first.private_key)) not in repr(first)
        again = Node.start(server, public_host="other.example.net")
        try:
            assert again.run(again.services.device_identity.server_credentials()) == first  # kept, not re-created
        finally:
            again.close()
    finally:
        for node in nodes:
            node.close()


def _pem(certificate: x509.Certificate) -> str:
    return pki.certificate_pem(certificate)


def _key_pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def test_configured_server_certificate_is_checked() -> None:
    leaf, key = server_self_signed("dtls.example.net")
    pair = key_pair_from_pem(_pem(leaf), _key_pem(key))
    assert pair.certificate_chain == (der(leaf),) and pair.trust_anchor == der(leaf)

    ca = pki.generate_ca(unique("Server CA"))
    issued_key = pki.new_key()
    issued = pki.issue_device_certificate(ca, issued_key.public_key(), "dtls.example.net", uuid.uuid4(), timedelta(days=30))
    chained = key_pair_from_pem(_pem(issued) + pki.chain_pem(ca.chain), _key_pem(issued_key))
    assert chained.certificate_chain == (der(issued), *(der(c) for c in ca.chain)) and chained.trust_anchor == der(ca.chain[-1])

    other_key = pki.new_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())
    expired, expired_key = self_signed("old", ca=False, not_before=long_ago(30), not_after=long_ago(1))
    cases = [
        (_pem(leaf), _key_pem(other_key), "PILOTBOAT_DTLS_PRIVATE_KEY", "does not belong"),
        (_pem(leaf), _key_pem(rsa_key), "PILOTBOAT_DTLS_PRIVATE_KEY", "P-256"),
        (_pem(leaf), _key_pem(p384), "PILOTBOAT_DTLS_PRIVATE_KEY", "P-256"),
        (_pem(expired), _key_pem(expired_key), "PILOTBOAT_DTLS_CERTIFICATE", "expired"),
        (pki.chain_pem(ca.chain) + _pem(issued), _key_pem(issued_key), "PILOTBOAT_DTLS_PRIVATE_KEY", "does not belong"),
        (_pem(issued) + pki.certificate_pem(ca.parents[0]), _key_pem(issued_key), "PILOTBOAT_DTLS_CERTIFICATE", "leaf first"),
        ("not a certificate", _key_pem(key), "PILOTBOAT_DTLS_CERTIFICATE", "PEM"),
        (_pem(leaf), "not a key", "PILOTBOAT_DTLS_PRIVATE_KEY", "private key"),
    ]
    for certificate_pem, key_pem, setting, words in cases:
        with pytest.raises(ServerCredentialsError) as error:
            key_pair_from_pem(certificate_pem, key_pem)
        assert str(error.value).startswith(setting) and words in str(error.value), str(error.value)
        for line in pem_body_lines(key_pem) if "BEGIN" in key_pem else []:
            assert line not in str(error.value)


def test_identity_service_reads_the_configured_files(tmp_path: Path) -> None:
    leaf, key = server_self_signed("dtls.example.net")
    certificate_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    certificate_file.write_text(_pem(leaf))
    key_file.write_text(_key_pem(key))

    def credentials(certificate: Path, private_key: Path) -> Any:
        service = DeviceIdentityService(None, None, None, None, ServerKeySource("h", certificate, private_key))  # type: ignore[arg-type]
        return asyncio.run(service.server_credentials())

    assert credentials(certificate_file, key_file).certificate_chain == (der(leaf),)
    with pytest.raises(ServerCredentialsError, match="PILOTBOAT_DTLS_PRIVATE_KEY: cannot read"):
        credentials(certificate_file, tmp_path / "missing.key")
    key_file.write_text(_key_pem(pki.new_key()))
    with pytest.raises(ServerCredentialsError, match="PILOTBOAT_DTLS_PRIVATE_KEY: the key does not belong"):
        credentials(certificate_file, key_file)
