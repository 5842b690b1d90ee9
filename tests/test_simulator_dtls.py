"""The simulated device over DTLS on loopback: a bootstrap with factory credentials (PSK or certificate),
then registration with what the bootstrap wrote into its Security object, and the management server's
requests over the DTLS session.

The servers are small LwM2M peers in this file on the DTLS server transport (``serve_dtls``): a bootstrap
server that issues a management credential per bootstrap (a new PSK, or a certificate from the device
CA with its key and the management server's trust anchor) and a management server that accepts only
the credentials issued last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import pathlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocoap
import pytest
import typer
from aiocoap import resource
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from dtls_helpers import Pki, free_port
from test_simulator import FAST, PeerThread, eventually, run, wide_console  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from pilotboat.cli import simulate as cli_simulate
from pilotboat.dtls.engine import ServerCredentials
from pilotboat.dtls.server import serve_dtls
from pilotboat.dtls.transport import peer_identity
from pilotboat.lwm2m import content, objects
from pilotboat.lwm2m.model import Path, as_dict
from pilotboat.model.management_server import SecurityMode
from pilotboat.security import pki
from pilotboat.sim import ClientCredentials, Failure, OnboardingFailed, SimulatedDevice, onboard
from pilotboat.sim.objects import resource_type
from pilotboat.sim.security import split_der

#: Short CoAP and DTLS timers: a lost handshake flight is sent again after 0.1 s.
QUICK = dataclasses.replace(FAST, dtls_timeout_min=0.1, dtls_timeout_max=0.8, update_margin=0.5,
                            register_retry=0.2)
FACTORY_IDENTITY = b"factory-dtls-dev"
FACTORY_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
TLV = content.TLV


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def key_der(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def self_signed_leaf(host: str = "127.0.0.1") -> tuple[x509.Certificate, Any]:
    """A CA-less self-signed P-256 server certificate, as a deployment without a configured one presents."""
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return certificate, key


@dataclasses.dataclass
class Issued:
    mode: SecurityMode
    identity: bytes  # the PSK identity, or the certificate (DER)
    secret: bytes  # the PSK, or the private key (DER)


class ManagementSite:
    """An LwM2M management server on DTLS: Register (2.01, ``rd/<n>``), Update, De-register; keeps the
    DTLS remote of each registration to send requests to the device."""

    def __init__(self, device_ca: Pki) -> None:
        self.port = free_port()
        self.uri = f"coaps://127.0.0.1:{self.port}"
        self.certificate, self.key = self_signed_leaf()
        self.trust_anchor = der(self.certificate)
        self.device_ca = device_ca
        #: The management credentials the server accepts (what the bootstrap issued last, per endpoint).
        self.psk: dict[bytes, bytes] = {}
        self.certificates: set[bytes] = set()
        self.registrations: dict[str, tuple[str, Any, Any]] = {}  # id -> (endpoint, remote, peer identity)
        self.operations: list[tuple[str, str]] = []
        self.context: aiocoap.Context | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> ManagementSite:
        site = self

        async def psk_for(identity: bytes) -> bytes | None:
            return site.psk.get(identity)

        async def accept_chain(chain: tuple[bytes, ...]) -> bool:
            return chain[0] in site.certificates

        class Root(resource.Resource, resource.PathCapable):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                path = tuple(request.opt.uri_path)
                if path == ("rd",):
                    endpoint = dict(q.partition("=")[::2] for q in request.opt.uri_query)["ep"]
                    registration = f"{next(site._ids)}"
                    site.registrations[registration] = (endpoint, request.remote, peer_identity(request))
                    site.operations.append(("register", endpoint))
                    return aiocoap.Message(code=Code.CREATED, location_path=("rd", registration))
                if len(path) == 2 and path[1] in site.registrations:
                    site.operations.append(("update", site.registrations[path[1]][0]))
                    return aiocoap.Message(code=Code.CHANGED)
                return aiocoap.Message(code=Code.NOT_FOUND)

            async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
                path = tuple(request.opt.uri_path)
                gone = site.registrations.pop(path[1], None) if len(path) == 2 else None
                if gone is not None:
                    site.operations.append(("deregister", gone[0]))
                return aiocoap.Message(code=Code.DELETED if gone else Code.NOT_FOUND)

        credentials = ServerCredentials(
            psk_for=psk_for, certificate_chain=(self.trust_anchor,), private_key=key_der(self.key),
            trust_anchors=self.device_ca.anchors, accept_chain=accept_chain,
        )
        self.context = await serve_dtls(Root(), "127.0.0.1", self.port, name="test-management", credentials=credentials)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.context is not None
        await self.context.shutdown()

    def current(self, endpoint: str) -> tuple[str, Any, Any]:
        [found] = [(rid, remote, identity) for rid, (ep, remote, identity) in self.registrations.items() if ep == endpoint]
        return found

    async def request(self, endpoint: str, code: Code, path: str, **options: Any) -> aiocoap.Message:
        assert self.context is not None
        message = aiocoap.Message(code=code, uri_path=tuple(p for p in path.split("/") if p), **options)
        message.remote = self.current(endpoint)[1]
        return await asyncio.wait_for(self.context.request(message).response, 5)

    def observe(self, endpoint: str, path: str) -> Any:
        """An aiocoap observation: ``.response`` is the first answer, ``.observation`` the notifications."""
        assert self.context is not None
        message = aiocoap.Message(code=Code.GET, uri_path=tuple(p for p in path.split("/") if p), observe=0)
        message.remote = self.current(endpoint)[1]
        return self.context.request(message)

    async def read(self, endpoint: str, path: str) -> dict[Path, Any]:
        response = await self.request(endpoint, Code.GET, path, accept=TLV)
        assert response.code == Code.CONTENT, (response.code, response.payload)
        return as_dict(content.decode(TLV, response.payload, Path.parse(path), resource_type))


class BootstrapSite:
    """An LwM2M bootstrap server on DTLS that knows the factory PSK and trusts the device CA. Each
    ``POST /bs`` gets a new management credential in the mode the device bootstrapped in, written into
    ``/0/0`` (and ``/1/0``), then Bootstrap-Finish."""

    def __init__(self, device_ca: Pki, management: ManagementSite, *, trust_anchor: bytes | None = None) -> None:
        self.port = free_port()
        self.uri = f"coaps://127.0.0.1:{self.port}"
        self.device_ca = device_ca
        self.management = management
        #: What /0/0/4 gets in certificate mode (default: the management server's certificate).
        self.trust_anchor = trust_anchor if trust_anchor is not None else management.trust_anchor
        self.requests: list[tuple[str, Any]] = []  # (endpoint, peer identity)
        self.issued: list[Issued] = []
        self.finished: list[str] = []
        self.errors: list[BaseException] = []
        self.context: aiocoap.Context | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> BootstrapSite:
        site = self

        async def psk_for(identity: bytes) -> bytes | None:
            return FACTORY_KEY if identity == FACTORY_IDENTITY else None

        async def accept_chain(chain: tuple[bytes, ...]) -> bool:
            return True

        class Bs(resource.Resource):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                endpoint = dict(q.partition("=")[::2] for q in request.opt.uri_query)["ep"]
                identity = peer_identity(request)
                site.requests.append((endpoint, identity))
                task = asyncio.get_running_loop().create_task(site.drive(request.remote, endpoint, identity))
                site._tasks.add(task)
                return aiocoap.Message(code=Code.CHANGED)

        root = resource.Site()
        root.add_resource(["bs"], Bs())
        credentials = ServerCredentials(
            psk_for=psk_for, certificate_chain=self.device_ca.server_chain, private_key=self.device_ca.server_key_der(),
            trust_anchors=self.device_ca.anchors, accept_chain=accept_chain,
        )
        self.context = await serve_dtls(root, "127.0.0.1", self.port, name="test-bootstrap", credentials=credentials)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self.context is not None
        await self.context.shutdown()

    def issue(self, endpoint: str, psk_mode: bool) -> Issued:
        """A new management credential; the management server forgets the endpoint's older ones."""
        management = self.management
        if psk_mode:
            issued = Issued(SecurityMode.PSK, f"mgmt-{uuid.uuid4().hex[:12]}".encode(), os.urandom(16))
            management.psk = {issued.identity: issued.secret}
        else:
            key = pki.new_key()
            certificate = pki.issue_device_certificate(self.device_ca.ca, key.public_key(), endpoint, uuid.uuid4(),
                                                       timedelta(days=1))
            issued = Issued(SecurityMode.CERTIFICATE, der(certificate), key_der(key))
            management.certificates = {issued.identity}
        self.issued.append(issued)
        return issued

    async def send(self, remote: Any, code: Code, path: tuple[str, ...], **options: Any) -> aiocoap.Message:
        assert self.context is not None
        message = aiocoap.Message(code=code, uri_path=path, **options)
        message.remote = remote
        return await asyncio.wait_for(self.context.request(message).response, 5)

    async def drive(self, remote: Any, endpoint: str, identity: Any) -> None:
        try:
            issued = self.issue(endpoint, psk_mode=identity.psk_identity is not None)
            security = {0: self.management.uri, 1: False, 2: int(issued.mode), 3: issued.identity,
                        4: self.trust_anchor if issued.mode == SecurityMode.CERTIFICATE else b"",
                        5: issued.secret, 10: 101}
            server = {0: 101, 1: 300, 6: False, 7: "U"}
            for path, values in ((Path(0, 0), security), (Path(1, 0), server)):
                entries = {path.child(rid): value for rid, value in values.items()}
                response = await self.send(remote, Code.PUT, tuple(map(str, path.ids)), content_format=TLV,
                                           payload=content.encode(TLV, entries, path))
                assert response.code == Code.CHANGED, (path, response.code, response.payload)
            finish = await self.send(remote, Code.POST, ("bs",))
            self.finished.append(finish.code.dotted)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


def factory_credentials(mode: str, device_ca: Pki) -> ClientCredentials:
    """The factory credential for the bootstrap server: the PSK, or the device CA's client certificate
    with the bootstrap server's trust anchor (the device CA itself)."""
    if mode == "psk":
        return ClientCredentials.psk(FACTORY_IDENTITY, FACTORY_KEY)
    return ClientCredentials.certificate((device_ca.der(device_ca.client_certificate),), key_der(device_ca.client_key),
                                         (device_ca.der(device_ca.ca.certificate),))


@pytest.mark.parametrize("mode", ["psk", "certificate"])
def test_bootstrap_and_registration_over_dtls_then_a_read_of_3_0(mode: str) -> None:
    async def main() -> None:
        device_ca = Pki("Devices")
        async with ManagementSite(device_ca) as management, BootstrapSite(device_ca, management) as bootstrap:
            device = await onboard("dtls-dev", bootstrap.uri, factory_credentials(mode, device_ca), timeout=10,
                                   timing=QUICK, sensor_interval=None)
            try:
                # the bootstrap ran over DTLS with the factory credential
                [(endpoint, identity)] = bootstrap.requests
                assert endpoint == "dtls-dev" and bootstrap.finished == ["2.04"] and not bootstrap.errors
                if mode == "psk":
                    assert identity.psk_identity == FACTORY_IDENTITY
                else:
                    assert identity.certificate_chain == (device_ca.der(device_ca.client_certificate),)
                # the device holds what the bootstrap wrote and registered over DTLS with it
                [issued] = bootstrap.issued
                account = device.management_server
                assert account is not None and account.uri == management.uri
                assert account.security_mode == int(issued.mode) and account.identity == issued.identity
                assert account.secret_key == issued.secret
                _, _, registered_as = management.current("dtls-dev")
                if mode == "psk":
                    assert registered_as.psk_identity == issued.identity
                else:
                    assert registered_as.certificate_chain == (issued.identity,)
                    assert split_der(account.server_public_key) == (management.trust_anchor,)
                # the management server reads /3/0 over the DTLS session
                values = await management.read("dtls-dev", "/3/0")
                assert values[Path(3, 0, 0)] == "Pilotboat" and values[Path(3, 0, 2)] == "dtls-dev"
                assert device.received[-1].path == "/3/0" and device.received[-1].code == "2.05"
                assert device.garbage == 0
            finally:
                await device.close(deregister=True)
            assert management.operations == [("register", "dtls-dev"), ("deregister", "dtls-dev")]

    run(main(), limit=30)


def test_writes_observe_and_a_re_bootstrap_over_dtls() -> None:
    async def main() -> None:
        device_ca = Pki("Devices")
        async with ManagementSite(device_ca) as management, BootstrapSite(device_ca, management) as bootstrap:
            device = await onboard("dtls-ops", bootstrap.uri, factory_credentials("psk", device_ca), timeout=10,
                                   timing=QUICK, sensor_interval=None)
            try:
                response = await management.request("dtls-ops", Code.PUT, "/3/0/14", content_format=content.TEXT,
                                                    payload=b"+02:00")
                assert response.code == Code.CHANGED and device.value("/3/0/14") == "+02:00"

                observation = management.observe("dtls-ops", "/3303/0/5700")
                first = await asyncio.wait_for(observation.response, 5)
                assert first.code == Code.CONTENT and first.opt.observe is not None
                notifications = observation.observation.__aiter__()
                device.set_value("/3303/0/5700", 31.5)
                changed = await asyncio.wait_for(notifications.__anext__(), 5)
                reading = content.decode(int(changed.opt.content_format), changed.payload, Path(3303, 0, 5700),
                                         resource_type)
                assert as_dict(reading) == {Path(3303, 0, 5700): 31.5} and device.notifications == 1

                # Bootstrap-Request Trigger: a new DTLS bootstrap with the factory PSK, then a new
                # management PSK; the old one no longer gets in.
                old = bootstrap.issued[0]
                assert (await management.request("dtls-ops", Code.POST, "/1/0/9")).code == Code.CHANGED
                await eventually(lambda: len(bootstrap.finished) == 2 and len(management.registrations) == 1
                                 and management.operations[-1] == ("register", "dtls-ops"), wait=10)
                assert [identity.psk_identity for _, identity in bootstrap.requests] == [FACTORY_IDENTITY] * 2
                new = bootstrap.issued[1]
                assert new.identity != old.identity and old.identity not in management.psk
                assert management.current("dtls-ops")[2].psk_identity == new.identity
                assert management.operations == [("register", "dtls-ops"), ("deregister", "dtls-ops"),
                                                 ("register", "dtls-ops")]
                assert [result.ok for result in device.bootstraps] == [True]
                values = await management.read("dtls-ops", "/3/0")
                assert values[Path(3, 0, 2)] == "dtls-ops"
            finally:
                await device.close()

    run(main(), limit=40)


def test_a_wrong_factory_key_or_a_foreign_server_certificate_fails_the_handshake() -> None:
    async def main() -> None:
        device_ca, stranger = Pki("Devices"), Pki("Stranger")
        async with ManagementSite(device_ca) as management, BootstrapSite(device_ca, management) as bootstrap:
            with pytest.raises(OnboardingFailed) as failed:
                await onboard("wrong-key", bootstrap.uri, ClientCredentials.psk(FACTORY_IDENTITY, b"not-the-key"),
                              timeout=10, timing=QUICK)
            assert failed.value.result.failure is Failure.HANDSHAKE and bootstrap.requests == []

            # certificate mode: the bootstrap server's certificate does not chain to the device's anchor
            wrong_anchor = ClientCredentials.certificate(
                (device_ca.der(device_ca.client_certificate),), key_der(device_ca.client_key),
                (stranger.der(stranger.ca.certificate),))
            device = SimulatedDevice("foreign-bs", bootstrap.uri, bootstrap_credentials=wrong_anchor, timing=QUICK)
            try:
                result = await device.bootstrap(timeout=10)
            finally:
                await device.close()
            assert result.failure is Failure.HANDSHAKE and "DTLS" in (result.detail or "")

        # the bootstrap writes a trust anchor that is not the management server's certificate
        async with ManagementSite(device_ca) as management:
            async with BootstrapSite(device_ca, management, trust_anchor=stranger.der(stranger.ca.certificate)) as bs:
                device = SimulatedDevice("foreign-mgmt", bs.uri, bootstrap_credentials=factory_credentials(
                    "certificate", device_ca), timing=QUICK, sensor_interval=None)
                try:
                    assert (await device.bootstrap(timeout=10)).ok, (bs.errors, device.received)
                    result = await device.register(timeout=10, keep_updating=False)
                finally:
                    await device.close()
                assert result.failure is Failure.HANDSHAKE and management.registrations == {}
                assert management.uri in (result.detail or "")

    run(main(), limit=40)


def test_coaps_needs_credentials_and_credentials_need_coaps() -> None:
    credentials = ClientCredentials.psk(FACTORY_IDENTITY, FACTORY_KEY)
    with pytest.raises(ValueError, match="bootstrap_credentials"):
        SimulatedDevice("a", "coaps://127.0.0.1:5784")
    with pytest.raises(ValueError, match="coaps://"):
        SimulatedDevice("a", "coap://127.0.0.1:5783", bootstrap_credentials=credentials)
    with pytest.raises(ValueError, match="server_credentials"):
        SimulatedDevice("a", server_uri="coaps://127.0.0.1:5684")
    device = SimulatedDevice("a", server_uri="coaps://127.0.0.1:5684", server_credentials=credentials)
    [account] = device.servers()
    assert account.security_mode == SecurityMode.PSK and account.identity == FACTORY_IDENTITY
    assert account.secret_key == FACTORY_KEY
    security = device.instances(objects.SECURITY)
    assert security[account.security_instance][objects.SECURITY_MODE] == int(SecurityMode.PSK)


def simulate(*args: str) -> Any:
    root = typer.Typer()
    root.add_typer(cli_simulate.app, name="simulate")
    return CliRunner().invoke(root, ["simulate", *args])


@pytest.mark.usefixtures("wide_console")
def test_the_cli_runs_a_device_and_a_fleet_over_dtls(tmp_path: pathlib.Path) -> None:
    device_ca = Pki("Devices")
    with PeerThread(ManagementSite(device_ca)) as management, PeerThread(BootstrapSite(device_ca, management)) as bs:
        result = simulate("device", "cli-dtls", "--bootstrap", bs.uri, "--psk-identity", FACTORY_IDENTITY.decode(),
                          "--psk-key", FACTORY_KEY.hex(), "--duration", "0.3", "--timeout", "10")
        assert result.exit_code == 0, result.output
        assert "register 2.01" in result.output and f"registered with {management.uri}" in result.output
        assert [endpoint for endpoint, _ in bs.requests] == ["cli-dtls"]
        assert management.operations == [("register", "cli-dtls"), ("deregister", "cli-dtls")]

        # a fleet with one management PSK per device, from a CSV file
        keys = {f"fleet-{index}": os.urandom(16) for index in range(3)}
        management.psk = {f"id-{endpoint}".encode(): key for endpoint, key in keys.items()}
        table = tmp_path / "credentials.csv"
        table.write_text("endpoint,psk_identity,psk_key\n"
                         + "".join(f"{endpoint},id-{endpoint},{key.hex()}\n" for endpoint, key in keys.items()))
        result = simulate("register", "--count", "3", "--prefix", "fleet-", "--server", management.uri,
                          "--credentials", str(table), "--timeout", "10")
        assert result.exit_code == 0, result.output
        assert sorted(management.operations[2:]) == sorted(
            [("register", endpoint) for endpoint in keys] + [("deregister", endpoint) for endpoint in keys])

        # a device the file does not name, a key that is not hex, credentials without coaps://
        for bad in (["register", "--count", "4", "--prefix", "fleet-", "--server", management.uri,
                     "--credentials", str(table)],
                    ["device", "x", "--server", management.uri, "--psk-identity", "a", "--psk-key", "zz"],
                    ["device", "x", "--server", management.uri],
                    ["device", "x", "--server", "coap://127.0.0.1:5683", "--psk-identity", "a", "--psk-key", "00"],
                    ["device", "x", "--server", management.uri, "--certificate", str(table)]):
            result = simulate(*bad)
            assert result.exit_code == 2, (bad, result.output)
