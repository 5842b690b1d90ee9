"""The LwM2M bootstrap and management servers over DTLS in a real ``pilotboat serve``: credentials created
through the API, libcoap's OpenSSL and GnuTLS clients and a python-mbedtls client over loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from credential_helpers import issue, org_path
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant
from lwm2m_helpers import events_of, make_device
from pilotboat.security import pki
from dtls_helpers import MbedtlsClient, Pki, der_to_pem, dtls_server, libcoap, server_chain
from pilotboat.dtls.engine import ServerCredentials

LIBCOAP = [name for name in ("coap-client-openssl", "coap-client-gnutls") if shutil.which(name)]
needs_libcoap = pytest.mark.skipif(os.environ.get("CI") != "true" and not LIBCOAP, reason="libcoap clients missing")
OBJECTS = b"</1/0>,</3/0>"


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def psk(tenant: Tenant, device_id: str, purpose: str | None = None) -> tuple[str, str]:
    """Import a PSK with a printable key (libcoap's ``-k`` takes the key as text): (identity, key)."""
    identity, key = f"psk-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex[:16]
    body: dict[str, Any] = {"identity": identity, "key": key.encode().hex()}
    if purpose is not None:
        body["purpose"] = purpose
    created = tenant.admin.post(org_path(tenant.org_id, f"/devices/{device_id}/psks"), json=body)
    assert created.status_code == 201, created.text
    return identity, key


def psk_client(identity: str, key: str) -> MbedtlsClient:
    return MbedtlsClient.psk(identity.encode(), key.encode())


def register_message(endpoint: str, lifetime: int = 300) -> aiocoap.Message:
    return aiocoap.Message(
        code=Code.POST, uri_path=["rd"], uri_query=[f"ep={endpoint}", f"lt={lifetime}", "lwm2m=1.1"], payload=OBJECTS,
        content_format=40,
    )


def update_message(location: tuple[str, ...]) -> aiocoap.Message:
    return aiocoap.Message(code=Code.POST, uri_path=list(location))


async def connected(client: MbedtlsClient, port: int) -> MbedtlsClient:
    await client.connect(port)
    return client


async def handshake_fails(client: MbedtlsClient, port: int) -> bool:
    try:
        await client.connect(port, timeout=2)
    except TimeoutError:
        return True
    finally:
        client.close()
    return False


def write_pem(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def device_files(directory: Path, issued: dict[str, Any]) -> dict[str, Path]:
    """A certificate issued through the API as files for libcoap: chain (leaf first) and key."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "cert": write_pem(directory / "device.pem", issued["certificate_pem"] + issued["chain_pem"]),
        "key": write_pem(directory / "device.key", issued["private_key_pem"]),
    }


def server_anchor(directory: Path, port: int) -> Path:
    """The server's trust anchor (the last certificate it presents) as a PEM file for ``-R``."""
    return write_pem(directory / "server-anchor.pem", der_to_pem(run(server_chain(port))[-1]))


# --- bootstrap over DTLS ----------------------------------------------------------------------------


@needs_libcoap
@pytest.mark.parametrize("client", LIBCOAP)
def test_psk_bootstrap_request(client: str, server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    identity, key = psk(tenant, device_id)
    uri = f"{server.bootstrap_dtls_uri}/bs?ep={endpoint}"
    code, out = run(libcoap(client, uri, "-u", identity, "-k", key, method="post"))
    assert code == "2.04", out

    code, out = run(libcoap(client, uri, "-u", identity, "-k", "not-the-right-key", method="post", timeout=2))
    assert code is None, out
    code, out = run(libcoap(client, uri, "-u", f"nobody-{uuid.uuid4().hex[:6]}", "-k", key, method="post", timeout=2))
    assert code is None, out
    # A bootstrap PSK does not open the management server.
    code, out = run(libcoap(client, f"{server.lwm2m_dtls_uri}/rd?ep={endpoint}", "-u", identity, "-k", key, method="post", timeout=2))
    assert code is None, out


@needs_libcoap
@pytest.mark.parametrize("client", LIBCOAP)
def test_x509_bootstrap_request(client: str, server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    endpoint, device_id = make_device(tenant)
    issued = issue(tenant.admin, tenant.org_id, device_id)
    files = device_files(tmp_path / "device", issued)
    anchor = server_anchor(tmp_path, server.bootstrap_dtls_port)
    uri = f"{server.bootstrap_dtls_uri}/bs?ep={endpoint}"
    args = ("-c", str(files["cert"]), "-j", str(files["key"]), "-R", str(anchor))
    # The organisation (and its CA) was created after the server started: the server picks its CA up
    # within a few seconds, without a restart.
    deadline, code, out = time.monotonic() + 15, None, ""
    while time.monotonic() < deadline and code is None:
        code, out = run(libcoap(client, uri, *args, method="post", timeout=2))
    assert code == "2.04", out

    # Revoked through the API: refused at the handshake.
    revoked = tenant.admin.post(org_path(tenant.org_id, f"/certificates/{issued['id']}/revoke"), json={"reason": "key_compromise"})
    assert revoked.status_code == 200, revoked.text
    code, out = run(libcoap(client, uri, *args, method="post", timeout=2))
    assert code is None, out

    # A certificate of a CA nobody trusts.
    stranger = Pki("Stranger").write_client_files(tmp_path)
    code, out = run(libcoap(client, uri, "-c", str(stranger["cert"]), "-j", str(stranger["key"]), "-R", str(anchor),
                            method="post", timeout=2))
    assert code is None, out


def test_bootstrap_ep_of_another_device(server: ServerProcess, tenant: Tenant) -> None:
    own_endpoint, own_id = make_device(tenant)
    other_endpoint, other_id = make_device(tenant)
    identity, key = psk(tenant, own_id)

    async def scenario() -> tuple[aiocoap.Message, ...]:
        client = await connected(psk_client(identity, key), server.bootstrap_dtls_port)
        try:
            other = await client.request(aiocoap.Message(code=Code.POST, uri_path=["bs"], uri_query=[f"ep={other_endpoint}"]))
            unknown = await client.request(aiocoap.Message(code=Code.POST, uri_path=["bs"], uri_query=["ep=urn:dev:nobody-here"]))
            own = await client.request(aiocoap.Message(code=Code.POST, uri_path=["bs"], uri_query=[f"ep={own_endpoint}"]))
            # The session's first request reaches the device over the same DTLS session.
            first = await client.next_request()
            return other, unknown, own, first
        finally:
            client.close()

    other, unknown, own, first = run(scenario())
    assert (other.code, unknown.code, own.code) == (Code.FORBIDDEN, Code.BAD_REQUEST, Code.CHANGED)
    assert first.code in (Code.GET, Code.DELETE), first
    # Recorded for the credential's device (the endpoint named may be another organisation's).
    refused = events_of(tenant.admin, tenant.org_id, own_id, "bootstrap.failed", wait=5)
    assert any(event["reason"] == "credential of another device" for event in refused), refused
    assert not [event for event in events_of(tenant.admin, tenant.org_id, other_id, "bootstrap.failed")
                if event["reason"] == "credential of another device"]


# --- the management server over DTLS ---------------------------------------------------------------


def test_management_psk_register_update_deregister(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    other_endpoint, other_id = make_device(tenant)
    identity, key = psk(tenant, device_id, purpose="management")
    other_identity, other_key = psk(tenant, other_id, purpose="management")
    bootstrap_identity, bootstrap_key = psk(tenant, device_id)

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        # The bootstrap PSK does not open the management port.
        seen["bootstrap_psk_refused"] = await handshake_fails(psk_client(bootstrap_identity, bootstrap_key), server.lwm2m_dtls_port)
        device = await connected(psk_client(identity, key), server.lwm2m_dtls_port)
        intruder = await connected(psk_client(other_identity, other_key), server.lwm2m_dtls_port)
        plain = await aiocoap.Context.create_client_context()
        try:
            seen["mismatch"] = (await intruder.request(register_message(endpoint))).code
            created = await device.request(register_message(endpoint))
            seen["register"], location = created.code, created.opt.location_path
            seen["location"] = location
            seen["intruder_update"] = (await intruder.request(update_message(location))).code
            seen["intruder_delete"] = (await intruder.request(aiocoap.Message(code=Code.DELETE, uri_path=list(location)))).code
            in_clear = aiocoap.Message(code=Code.POST, uri=f"{server.lwm2m_uri}/{'/'.join(location)}")
            seen["plain_update"] = (await asyncio.wait_for(plain.request(in_clear).response, 10)).code
            plain_register = aiocoap.Message(
                code=Code.POST, uri=f"{server.lwm2m_uri}/rd?ep={endpoint}&lt=300&lwm2m=1.1", payload=OBJECTS, content_format=40,
            )
            seen["plain_register"] = (await asyncio.wait_for(plain.request(plain_register).response, 10)).code
            seen["update"] = (await device.request(update_message(location))).code

            # A device operation reaches the device over its DTLS session.
            read = asyncio.create_task(asyncio.to_thread(
                tenant.admin.get, org_path(tenant.org_id, f"/devices/{device_id}/lwm2m/3/0/0"), params={"timeout": 10},
            ))
            request = await device.next_request()
            seen["server_request"] = (request.code, request.opt.uri_path)
            device.answer(request, aiocoap.Message(code=Code.CONTENT, payload=b"Pilotboat", content_format=0))
            seen["read"] = (await read).json()

            # Once the session is gone, the server's requests fail at once: never sent in clear.
            device.close_notify()
            await asyncio.sleep(0.3)
            started = time.monotonic()
            gone = await asyncio.to_thread(
                tenant.admin.get, org_path(tenant.org_id, f"/devices/{device_id}/lwm2m/3/0/0"), params={"timeout": 10},
            )
            seen["gone"], seen["gone_after"] = gone.json(), time.monotonic() - started

            again = await connected(psk_client(identity, key), server.lwm2m_dtls_port)
            seen["deregister"] = (await again.request(aiocoap.Message(code=Code.DELETE, uri_path=list(location)))).code
            again.close()
        finally:
            device.close()
            intruder.close()
            await plain.shutdown()
        return seen

    seen = run(scenario())
    assert seen["bootstrap_psk_refused"]
    assert seen["mismatch"] == Code.FORBIDDEN
    assert seen["register"] == Code.CREATED and seen["location"][0] == "rd"
    assert (seen["intruder_update"], seen["intruder_delete"]) == (Code.FORBIDDEN, Code.FORBIDDEN)
    assert seen["plain_update"] == Code.NOT_FOUND
    assert seen["plain_register"] == Code.FORBIDDEN
    assert seen["update"] == Code.CHANGED
    assert seen["server_request"] == (Code.GET, ("3", "0", "0"))
    assert seen["read"]["ok"] is True and seen["read"]["values"], seen["read"]
    assert seen["gone"].get("ok") is not True and seen["gone_after"] < 3, seen
    assert seen["deregister"] == Code.DELETED

    registered = events_of(tenant.admin, tenant.org_id, device_id, "lwm2m.registered", wait=5)
    assert registered[0]["detail"]["security_mode"] == "PSK", registered[0]
    intruder_refused = events_of(tenant.admin, tenant.org_id, other_id, "lwm2m.refused", wait=5)
    assert [event["reason"] for event in intruder_refused] == ["credential of another device"], intruder_refused
    reasons = {event["reason"] for event in events_of(tenant.admin, tenant.org_id, device_id, "lwm2m.refused", wait=5, count=4)}
    assert {
        "update with another credential than the registration's",
        "de-register with another credential than the registration's",
        "update over plain CoAP of a registration made over DTLS", "device holds DTLS credentials: register over DTLS",
    } <= reasons, reasons


def test_trust_store_ca_on_the_management_port(server: ServerProcess, root: Api, tenant: Tenant, tmp_path: Path) -> None:
    """A CA added to the trust store at run time is used without a restart; its expired certificates are refused."""
    endpoint, device_id = make_device(tenant)
    foreign = Pki(f"Foreign {uuid.uuid4().hex[:6]}")
    added = root.post("/api/v1/trust-store", json={"certificate": pki.chain_pem([foreign.ca.certificate]), "name": "moved in"})
    assert added.status_code == 201, added.text
    now = datetime.now(UTC)
    valid = _leaf(foreign, endpoint, now - timedelta(days=1), now + timedelta(days=30))
    expired = _leaf(foreign, endpoint, now - timedelta(days=30), now - timedelta(days=1))

    async def scenario() -> tuple[Code | None, bool]:
        code = None
        deadline = time.monotonic() + 15
        while code is None and time.monotonic() < deadline:
            client = _certificate_client(foreign, valid)
            try:
                await client.connect(server.lwm2m_dtls_port, timeout=2)
                code = (await client.request(register_message(endpoint))).code
            except TimeoutError:
                pass
            finally:
                client.close()
        return code, await handshake_fails(_certificate_client(foreign, expired), server.lwm2m_dtls_port)

    code, expired_refused = run(scenario())
    assert code == Code.CREATED
    assert expired_refused
    try:
        registered = events_of(tenant.admin, tenant.org_id, device_id, "lwm2m.registered", wait=5)
        assert registered[0]["detail"]["security_mode"] == "CERTIFICATE"
    finally:
        root.delete(f"/api/v1/trust-store/{added.json()['id']}")


@needs_libcoap
@pytest.mark.parametrize("client", LIBCOAP)
def test_x509_libcoap_register_and_an_expired_certificate(
    client: str, server: ServerProcess, root: Api, tenant: Tenant, tmp_path: Path
) -> None:
    """libcoap registers with a certificate of a trust-store CA; the same key in an expired certificate of
    that CA fails the handshake."""
    endpoint, _ = make_device(tenant)
    foreign = Pki(f"Foreign {uuid.uuid4().hex[:6]}")
    added = root.post("/api/v1/trust-store", json={"certificate": pki.chain_pem([foreign.ca.certificate]), "name": "moved in"})
    assert added.status_code == 201, added.text
    try:
        now = datetime.now(UTC)
        key = write_pem(tmp_path / "device.key", pki.key_pem(foreign.client_key))
        anchor = server_anchor(tmp_path, server.lwm2m_dtls_port)
        uri = f"{server.lwm2m_dtls_uri}/rd?ep={endpoint}&lt=60&lwm2m=1.1"
        for name, not_before, not_after, expected in (
            ("valid", now - timedelta(days=1), now + timedelta(days=30), "2.01"),
            ("expired", now - timedelta(days=30), now - timedelta(days=1), None),
        ):
            leaf = _leaf(foreign, endpoint, not_before, not_after)
            certificate = write_pem(tmp_path / f"{name}.pem", pki.chain_pem([leaf, foreign.ca.certificate]))
            code, out = run(libcoap(client, uri, "-c", str(certificate), "-j", str(key), "-R", str(anchor),
                                    "-t", "40", "-e", "</1/0>,</3/0>", method="post", timeout=3))
            assert code == expected, f"{name}: {out}"
    finally:
        root.delete(f"/api/v1/trust-store/{added.json()['id']}")


def _leaf(material: Pki, endpoint: str, not_before: datetime, not_after: datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, endpoint)]))
        .issuer_name(material.ca.certificate.subject)
        .public_key(material.client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .sign(material.ca.key, hashes.SHA256())
    )


def _certificate_client(material: Pki, leaf: x509.Certificate) -> MbedtlsClient:
    material.client_certificate = leaf
    return MbedtlsClient.certificate(material)


def test_every_trust_anchor_is_trusted() -> None:
    """Not only the first anchor: a client of any organisation CA, or of any trusted intermediate, connects."""
    server, authorities = Pki("Server"), [Pki(f"Org {index}") for index in range(3)]
    anchors = tuple(der for material in authorities for der in reversed(material.anchors))  # root first

    async def accept_chain(chain: tuple[bytes, ...]) -> bool:
        return True

    credentials = ServerCredentials(
        certificate_chain=server.server_chain, private_key=server.server_key_der(), trust_anchors=anchors,
        accept_chain=accept_chain,
    )

    async def scenario() -> list[bool]:
        outcomes = []
        async with dtls_server(credentials) as (_, _transport, _who, port):
            for material in (*authorities, Pki("Stranger")):
                outcomes.append(not await handshake_fails(MbedtlsClient.certificate(material), port))
        return outcomes

    assert run(scenario()) == [True, True, True, False]


# --- deployment settings ----------------------------------------------------------------------------


def test_nosec_off_closes_the_plain_ports(server_factory: Any) -> None:
    process: ServerProcess = server_factory(PILOTBOAT_ALLOW_NOSEC="false")
    process.start()
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant_org = root.post("/api/v1/orgs", json={"name": f"org-{uuid.uuid4().hex[:8]}"}).json()["id"]
    created = root.post(f"/api/v1/orgs/{tenant_org}/devices", json={"name": "d", "endpoint": f"urn:dev:{uuid.uuid4().hex[:8]}", "state": 1})
    endpoint, device_id = created.json()["endpoint"], created.json()["id"]
    imported = root.post(f"/api/v1/orgs/{tenant_org}/devices/{device_id}/psks",
                         json={"identity": f"psk-{uuid.uuid4().hex[:8]}", "key": b"0123456789abcdef".hex(), "purpose": "management"})
    assert imported.status_code == 201, imported.text

    async def scenario() -> tuple[list[str], Code]:
        plain = await aiocoap.Context.create_client_context()
        outcomes = []
        try:
            for uri in (f"{process.bootstrap_uri}/bs?ep={endpoint}", f"{process.lwm2m_uri}/rd?ep={endpoint}"):
                try:
                    await asyncio.wait_for(plain.request(aiocoap.Message(code=Code.POST, uri=uri)).response, 3)
                    outcomes.append("answered")
                except (TimeoutError, aiocoap.error.NetworkError):
                    outcomes.append("no answer")
        finally:
            await plain.shutdown()
        client = await connected(MbedtlsClient.psk(imported.json()["identity"].encode(), b"0123456789abcdef"), process.lwm2m_dtls_port)
        try:
            return outcomes, (await client.request(register_message(endpoint))).code
        finally:
            client.close()

    try:
        outcomes, code = run(scenario())
        assert outcomes == ["no answer", "no answer"]
        assert code == Code.CREATED
        assert "coaps://" in process.log() and "PILOTBOAT_ALLOW_NOSEC" in process.log()
    finally:
        root.close()
        process.stop()


def test_http_over_tls(server_factory: Any, tmp_path: Path) -> None:
    material = Pki("HTTP")
    certificate = write_pem(tmp_path / "http.pem", pki.chain_pem([material.server_certificate, material.ca.certificate]))
    key = write_pem(tmp_path / "http.key", pki.key_pem(material.server_key))
    ca = write_pem(tmp_path / "ca.pem", pki.chain_pem(list(material.ca.parents)))
    process: ServerProcess = server_factory(
        PILOTBOAT_HTTP_TLS_CERTIFICATE=str(certificate), PILOTBOAT_HTTP_TLS_PRIVATE_KEY=str(key),
    )
    missing = process.cli("serve", PILOTBOAT_HTTP_TLS_PRIVATE_KEY=str(tmp_path / "missing.key"), timeout=60)
    assert missing.returncode == 2 and "missing.key" in missing.stderr, missing.stderr
    unreadable = process.cli("serve", PILOTBOAT_HTTP_TLS_PRIVATE_KEY=str(certificate), timeout=60)
    assert unreadable.returncode == 2 and "PILOTBOAT_HTTP_TLS_PRIVATE_KEY" in unreadable.stderr, unreadable.stderr

    env = process.env()
    log = (tmp_path / "serve.log").open("wb")
    child = subprocess.Popen([sys.executable, "-m", "pilotboat.cli.main", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        context = ssl.create_default_context(cafile=str(ca))
        deadline, answer = time.monotonic() + 30, None
        while answer is None and time.monotonic() < deadline:
            try:
                answer = httpx.get(f"https://127.0.0.1:{process.port}/health", verify=context, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.2)
        assert answer is not None and answer.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{process.port}/health", timeout=2)
        assert f"https://127.0.0.1:{process.port}" in (tmp_path / "serve.log").read_text()
    finally:
        child.terminate()
        child.wait(15)


def test_dtls_port_in_use(server_factory: Any) -> None:
    process: ServerProcess = server_factory()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", process.lwm2m_dtls_port))
        with pytest.raises(RuntimeError, match="exited"):
            process.start(timeout=30)
    assert f"UDP port 127.0.0.1:{process.lwm2m_dtls_port} is already in use" in process.log()


def test_hello_flood_while_a_device_is_served(server_factory: Any) -> None:
    process: ServerProcess = server_factory()
    process.start()
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    org = root.post("/api/v1/orgs", json={"name": f"org-{uuid.uuid4().hex[:8]}"}).json()["id"]
    endpoint = f"urn:dev:{uuid.uuid4().hex[:8]}"
    device_id = root.post(f"/api/v1/orgs/{org}/devices", json={"name": "d", "endpoint": endpoint, "state": 1}).json()["id"]
    identity = f"psk-{uuid.uuid4().hex[:8]}"
    root.post(f"/api/v1/orgs/{org}/devices/{device_id}/psks",
              json={"identity": identity, "key": b"0123456789abcdef".hex(), "purpose": "management"}).raise_for_status()

    def sessions() -> dict[str, float]:
        metrics = httpx.get(f"{process.url}/metrics").text
        return {server: float(value) for server, value in re.findall(r'^pilotboat_dtls_sessions\{server="(\w+)"\} (\S+)$', metrics, re.M)}

    async def scenario() -> tuple[list[Code], dict[str, float]]:
        device = await connected(MbedtlsClient.psk(identity.encode(), b"0123456789abcdef"), process.lwm2m_dtls_port)
        hello = MbedtlsClient.psk().first_flight()
        registered = await device.request(register_message(endpoint))
        codes, location = [registered.code], registered.opt.location_path
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(300)]
        try:
            for index, sender in enumerate(senders):
                for port in (process.lwm2m_dtls_port, process.bootstrap_dtls_port):
                    sender.sendto(hello, ("127.0.0.1", port))
                    sender.sendto(os.urandom(index % 90 + 1), ("127.0.0.1", port))
                if index % 50 == 0:
                    codes.append((await device.request(update_message(location))).code)
            codes.append((await device.request(update_message(location))).code)
            held = await asyncio.to_thread(sessions)
        finally:
            for sender in senders:
                sender.close()
            device.close()
        return codes, held

    try:
        codes, held = run(scenario())
        assert codes[0] == Code.CREATED and set(codes[1:]) == {Code.CHANGED}, codes
        # 600 ClientHellos without a cookie and 600 garbage datagrams left no state: the ports hold the
        # device's session and nothing else.
        assert held == {"bootstrap": 0.0, "lwm2m": 1.0}, held
    finally:
        root.close()
        process.stop()
