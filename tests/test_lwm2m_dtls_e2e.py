"""Devices onboarded over DTLS end to end, with the simulator and a real ``pilotboat serve`` (SQLite and
PostgreSQL): PSK bootstrap with a factory PSK → PSK registration with the management PSK written at
bootstrap; certificate bootstrap → registration with the certificate issued at bootstrap; the REST read
of /3/0 and trigger-bootstrap travel over the DTLS session, and after the re-bootstrap the previous
management credential no longer opens a session; a credential of another device's endpoint is refused
at bootstrap and at registration."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dtls_helpers import server_chain
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant
from lwm2m_helpers import call, events_of, eventually, make_device
from pilotboat.dtls.client import ClientCredentials
from pilotboat.model.management_server import SecurityMode
from pilotboat.security import pki
from pilotboat.sim import OnboardingFailed, SimulatedDevice, onboard
from pilotboat.sim.exchange import Endpoint, HandshakeError, Timing


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dtls_server(request: pytest.FixtureRequest, server_factory: Any) -> Iterator[ServerProcess]:
    process = server_factory(request.param)
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def org(dtls_server: ServerProcess) -> Iterator[Tenant]:
    root = Api.login(dtls_server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(dtls_server.url, root)
    yield tenant
    tenant.close()
    root.close()


def factory_psk(org: Tenant, device_id: str) -> ClientCredentials:
    created = org.admin.post(f"/api/v1/orgs/{org.org_id}/devices/{device_id}/psks", json={})
    assert created.status_code == 201, created.text
    assert created.json()["purpose"] == "bootstrap"
    return ClientCredentials.psk(created.json()["identity"].encode(), bytes.fromhex(created.json()["key"]))


def psks_of(org: Tenant, device_id: str) -> list[dict[str, Any]]:
    listed = org.admin.get(f"/api/v1/orgs/{org.org_id}/psks", params={"device_id": device_id})
    assert listed.status_code == 200, listed.text
    return listed.json()["psks"]


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


async def handshake(port: int, credentials: ClientCredentials, timeout: float = 6.0) -> None:
    """One DTLS handshake with the server on ``port``; raises HandshakeError or TimeoutError."""
    client = await Endpoint.open(("127.0.0.1", 0), lambda request, peer: None,
                                 Timing(dtls_timeout_min=0.5, dtls_timeout_max=2.0))
    try:
        await client.connect(("127.0.0.1", port), credentials, timeout)
    finally:
        client.close()


def test_psk_bootstrap_then_psk_registration_read_and_trigger_bootstrap_over_dtls(dtls_server: ServerProcess, org: Tenant) -> None:
    server = dtls_server
    endpoint, device_id = make_device(org)
    factory = factory_psk(org, device_id)
    base = f"/api/v1/orgs/{org.org_id}"

    async def scenario() -> None:
        device = await onboard(endpoint, server.bootstrap_dtls_uri, factory, timeout=20, sensor_interval=None)
        try:
            account = device.management_server
            assert account is not None
            assert (account.uri, account.security_mode) == (server.lwm2m_dtls_uri, SecurityMode.PSK)
            first_identity = account.identity
            assert first_identity and first_identity != factory.psk_identity and len(account.secret_key) >= 16
            # The factory PSK stays the bootstrap credential; the one written is a management credential,
            # active once the device registered with it.
            listed = {row["identity"].encode(): row for row in await call(psks_of, org, device_id)}
            assert (listed[factory.psk_identity]["purpose"], listed[first_identity]["purpose"]) == ("bootstrap", "management")
            assert listed[first_identity]["state"] == "active"

            # A read through the API reaches the device over its DTLS session.
            read = await call(org.member.get, f"{base}/devices/{device_id}/lwm2m/3/0")
            assert read.status_code == 200, read.text
            assert (read.json()["code"], read.json()["values"]["/3/0/2"]) == ("2.05", endpoint)
            assert device.received and device.received[-1].secure

            # Trigger bootstrap over DTLS: the device bootstraps again with its factory PSK, gets a new
            # management PSK, and registers with it; the previous one stops working.
            triggered = await call(org.member.post, f"{base}/devices/{device_id}/commands/trigger-bootstrap")
            assert triggered.status_code == 200, triggered.text
            assert (triggered.json()["accepted"], triggered.json()["code"]) == (True, "2.04")
            await eventually(lambda: len(device.bootstraps) == 1 and device.bootstraps[-1].ok and device.registered,
                             what="the re-bootstrap and the new registration")
            second = device.management_server
            assert second is not None and second.identity != first_identity
            await eventually(lambda: [row["identity"] for row in psks_of(org, device_id) if row["purpose"] == "management"]
                             == [second.identity.decode()], what="the old management PSK to be retired")
            with pytest.raises((HandshakeError, TimeoutError)):
                await handshake(server.lwm2m_dtls_port, ClientCredentials.psk(first_identity, account.secret_key))
            await handshake(server.lwm2m_dtls_port, ClientCredentials.psk(second.identity, second.secret_key))
            read = await call(org.member.get, f"{base}/devices/{device_id}/lwm2m/3/0/0")
            assert read.status_code == 200 and read.json()["code"] == "2.05", read.text
        finally:
            await device.close(deregister=True)

    asyncio.run(scenario())
    registered = events_of(org.viewer, org.org_id, device_id, "lwm2m.registered", wait=5, count=2)
    assert len(registered) == 2


def test_certificate_bootstrap_then_registration_with_the_certificate_issued_at_bootstrap(
    dtls_server: ServerProcess, org: Tenant
) -> None:
    server = dtls_server
    endpoint, device_id = make_device(org)
    base = f"/api/v1/orgs/{org.org_id}"
    issued = org.admin.post(f"{base}/devices/{device_id}/certificates", json={})
    assert issued.status_code == 201, issued.text
    assert issued.json()["purpose"] == "bootstrap"
    factory_chain = pki.load_certificates(issued.json()["certificate_pem"] + issued.json()["chain_pem"])
    factory_key = pki.load_private_key(issued.json()["private_key_pem"])
    # The device maker takes the bootstrap server's trust anchor from the API: the last certificate of
    # the chain the DTLS servers present.
    assert httpx.get(f"{server.url}/api/v1/dtls/server-certificate").status_code == 401
    published = org.viewer.get("/api/v1/dtls/server-certificate")
    assert published.status_code == 200 and published.headers["content-type"].startswith("application/pem-certificate-chain")
    presented = asyncio.run(server_chain(server.bootstrap_dtls_port))
    assert tuple(der(c) for c in pki.load_certificates(published.text)) == presented
    anchor = presented[-1]
    factory = ClientCredentials.certificate(
        tuple(der(c) for c in factory_chain[:-1]),
        factory_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        (anchor,),
    )

    async def scenario() -> None:
        # The organisation (and its CA) was created after the server started: trusted at once.
        device = await onboard(endpoint, server.bootstrap_dtls_uri, factory, timeout=20, sensor_interval=None)
        try:
            account = device.management_server
            assert account is not None
            assert (account.uri, account.security_mode) == (server.lwm2m_dtls_uri, SecurityMode.CERTIFICATE)
            # /0/x/3: a new certificate for the endpoint from the organisation CA; /0/x/4: the server's anchor.
            certificate = x509.load_der_x509_certificate(account.identity)
            assert pki.common_name(certificate) == endpoint
            assert der(certificate) != der(factory_chain[0])
            ca_chain = pki.load_certificates((await call(org.viewer.get, f"{base}/ca/chain")).text)
            certificate.verify_directly_issued_by(ca_chain[0])
            assert account.server_public_key == (await server_chain(server.lwm2m_dtls_port))[-1]
            listed = (await call(org.admin.get, f"{base}/certificates", params={"device_id": device_id})).json()["certificates"]
            purposes = {row["fingerprint"]: (row["purpose"], row["state"]) for row in listed}
            assert purposes[pki.fingerprint(certificate)] == ("management", "active")
            assert purposes[pki.fingerprint(factory_chain[0])] == ("bootstrap", "active")

            read = await call(org.member.get, f"{base}/devices/{device_id}/lwm2m/3/0")
            assert read.status_code == 200, read.text
            assert (read.json()["code"], read.json()["values"]["/3/0/2"]) == ("2.05", endpoint)
            assert device.received and device.received[-1].secure
        finally:
            await device.close(deregister=True)

    asyncio.run(scenario())


def test_a_credential_of_another_devices_endpoint_is_refused(dtls_server: ServerProcess, org: Tenant) -> None:
    server = dtls_server
    own_endpoint, own_id = make_device(org)
    other_endpoint, other_id = make_device(org)
    own = factory_psk(org, own_id)

    async def scenario() -> None:
        # Bootstrap: the factory PSK of one device naming another's endpoint.
        with pytest.raises(OnboardingFailed) as refused:
            await onboard(other_endpoint, server.bootstrap_dtls_uri, own, timeout=10, sensor_interval=None)
        assert refused.value.result.code == "4.03"
        # Registration: the management PSK of one device naming another's endpoint.
        device = await onboard(own_endpoint, server.bootstrap_dtls_uri, own, timeout=20, sensor_interval=None)
        account = device.management_server
        assert account is not None
        await device.close(deregister=True)
        impostor = SimulatedDevice(
            other_endpoint, server_uri=server.lwm2m_dtls_uri,
            server_credentials=ClientCredentials.psk(account.identity, account.secret_key), sensor_interval=None,
        )
        async with impostor:
            registered = await impostor.register(10, keep_updating=False)
        assert (registered.ok, registered.code) == (False, "4.03")

    asyncio.run(scenario())
    # Both refusals are recorded on the device whose credential was presented (the endpoint named could
    # be another organisation's).
    failed = events_of(org.viewer, org.org_id, own_id, "bootstrap.failed", wait=5)
    assert [event["reason"] for event in failed] == ["credential of another device"]
    refused = events_of(org.viewer, org.org_id, own_id, "lwm2m.refused", wait=5)
    assert [event["reason"] for event in refused] == ["credential of another device"]
    assert events_of(org.viewer, org.org_id, other_id, "lwm2m.registered") == []
