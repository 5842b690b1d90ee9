"""Tenant isolation through a real server, on each database backend.

Two organisations A and B each get a channel, a device with a bootstrap config, a certificate of the
organisation's CA and a PSK, and an API key. The callers of A (its admin, member and viewer, an API key
of A's admin restricted to A, and an API key of the system administrator restricted to A) then try
every route of the server on B's resources: B's organisation id in the path or in ``X-Pilotboat-Org``,
B's user, device, config, channel, API key, CA, certificate and PSK ids, and A's own organisation with
B's ids. Each attempt must be refused (403/404; the few exceptions
are named in the table), no response may carry B's ids, names or secrets, and B's state, fetched by
B's admin before and after, must not change. B's device must still bootstrap to the same answer.

The route list comes from ``/openapi.json``: a route added later without a row in ``ROUTES`` (or in
``UNSCOPED``, for the few routes that name no tenant) makes ``test_every_route_has_an_isolation_case``
fail. Each attempt is also checked to have reached the intended route, through the per-route request
counter of ``/metrics``, so that a mistyped path cannot pass as a 404.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client.parser import text_string_to_metric_families

from compat_helpers import device_get, new_channel, unique
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, make_tenant
from lwm2m_helpers import coap_request
from pilotboat.security import pki

DENIED = frozenset({403, 404})
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


# --- the two organisations ----------------------------------------------------------------------


@dataclass
class Org:
    """One organisation of the test and everything created in it."""

    tenant: Tenant
    emails: dict[str, str]  # role -> email
    channel_id: str
    channel_name: str
    device_id: str
    device_name: str
    external_id: str
    external_key: str
    config: dict[str, Any]  # the config body sent at creation
    key_id: str
    key_name: str
    key: str
    bootstrap: dict[str, Any]  # the device's first bootstrap answer
    ca_id: str  # the organisation's generated CA
    ca_pem: str  # its issuing certificate
    certificate_id: str  # a certificate of the device, issued from a server-generated key
    certificate_serial: str
    certificate_pem: str
    private_key: str  # that certificate's key (PEM), shown once
    psk_id: str  # a generated PSK of the device
    psk_identity: str
    psk_key: str  # hex, shown once
    mac_address: str  # the device's
    server_id: str  # a management-server definition, assigned to the device
    server_name: str
    server_address: str
    webhook_id: str  # a webhook of the organisation (its URL never resolves)
    webhook_url: str
    webhook_secret: str  # shown once
    endpoint: str  # the device's LwM2M endpoint name; the device is registered (from a closed socket)
    registration_id: str
    observation_id: str  # an observation of the device (failed: the device never answers)

    @property
    def org_id(self) -> str:
        return self.tenant.org_id

    def secrets(self) -> set[str]:
        """Every identifier, name and secret of this organisation that another tenant must never see."""
        values = {
            self.org_id, self.tenant.name, self.channel_id, self.channel_name, self.device_id, self.device_name,
            self.external_id, self.external_key, self.key_id, self.key_name, self.key,
            self.config["content"], self.config["client_cert"], self.config["client_key"], self.config["ca_cert"],
            self.bootstrap["client_secret"],
            *self.tenant.users.values(), *self.emails.values(),
            self.ca_id, self.certificate_id, self.certificate_serial, self.psk_id, self.psk_identity,
            self.psk_key.upper(), self.psk_key.lower(), self.mac_address, self.server_id, self.server_name,
            self.server_address, self.webhook_id, self.webhook_url, self.webhook_secret, self.endpoint, self.registration_id,
            self.observation_id,
            *pem_marks(self.ca_pem), *pem_marks(self.certificate_pem), *pem_marks(self.private_key),
        }
        return {value for value in values if value}


def pem_marks(pem: str) -> set[str]:
    """Lines of a PEM document that show it, escaped in JSON or not: its full-length base64 lines that
    carry key or signature bytes (the last one, and for a private key every one)."""
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----") and len(line) == 64]
    return set(lines) if "PRIVATE KEY" in pem else set(lines[-1:])


def register(server: ServerProcess, endpoint: str) -> str:
    """Register ``endpoint`` with the management server from a client that then goes away; the
    registration id."""
    async def post() -> aiocoap.Message:
        context = await aiocoap.Context.create_client_context()
        try:
            return await coap_request(context, aiocoap.POST, f"{server.lwm2m_uri}/rd?ep={endpoint}&lt=86400&lwm2m=1.1",
                                      b"</1/0>,</3/0>,</3303/0>", content_format=40)
        finally:
            await context.shutdown()

    response = asyncio.run(post())
    assert response.code == aiocoap.CREATED, response
    return response.opt.location_path[-1]


def populate(server: ServerProcess, tenant: Tenant) -> Org:
    server_url = server.url
    admin, org_id = tenant.admin, tenant.org_id
    users = admin.get(f"/api/v1/orgs/{org_id}/users")
    assert users.status_code == 200, users.text
    emails = {member["role"]: member["email"] for member in users.json()}
    channel = new_channel(admin, org_id, name=unique("chan"), metadata={"owner": tenant.name})
    config = {
        "external_id": unique("ext"), "external_key": unique("extkey"), "channels": [channel["id"]],
        "name": unique("dev"), "content": unique("content"), "client_cert": unique("cert"),
        "client_key": unique("clientkey"), "ca_cert": unique("ca"),
    }
    created = admin.post(f"/{org_id}/clients/configs", json=config)
    assert created.status_code == 201, created.text
    device_id = created.headers["location"].removeprefix("/clients/configs/")
    activated = admin.put(f"/{org_id}/clients/state/{device_id}", json={"state": 1})
    assert activated.status_code == 200, activated.text
    key_name = unique("apikey")
    key = admin.post("/api/v1/api-keys", json={"name": key_name, "org_id": org_id})
    assert key.status_code == 201, key.text
    certificate = admin.post(f"/api/v1/orgs/{org_id}/devices/{device_id}/certificates")
    assert certificate.status_code == 201, certificate.text
    psk = admin.post(f"/api/v1/orgs/{org_id}/devices/{device_id}/psks")
    assert psk.status_code == 201, psk.text
    (ca,) = admin.get(f"/api/v1/orgs/{org_id}/cas").json()
    mac_address = ":".join(f"{byte:02x}" for byte in uuid.uuid4().bytes[:6])
    endpoint = unique("urn:dev:")
    identified = admin.patch(f"/api/v1/orgs/{org_id}/devices/{device_id}", json={"mac_address": mac_address, "endpoint": endpoint})
    assert identified.status_code == 200, identified.text
    server_name, server_address = unique("ms"), f"{unique('ms')}.example.test"
    definition = admin.post(f"/api/v1/orgs/{org_id}/management-servers", json={"name": server_name, "address": server_address, "port": 5683})
    assert definition.status_code == 201, definition.text
    assigned = admin.put(f"/api/v1/orgs/{org_id}/devices/{device_id}/management-server", json={"server_id": definition.json()["id"]})
    assert assigned.status_code == 200, assigned.text
    assert certificate.json()["ca_id"] == ca["id"]
    bootstrap = device_get(server_url, f"/clients/bootstrap/{config['external_id']}", f"Client {config['external_key']}")
    assert bootstrap.status_code == 200, bootstrap.text
    assert bootstrap.json()["client_key"] == config["client_key"]
    webhook = admin.post(f"/api/v1/orgs/{org_id}/webhooks", json={"url": f"https://{unique('hook')}.invalid/{unique('path')}"})
    assert webhook.status_code == 201, webhook.text
    registration_id = register(server, endpoint)
    observation = admin.post(f"/api/v1/orgs/{org_id}/devices/{device_id}/observations", json={"path": "/3303/0/5700"})
    assert observation.status_code == 201, observation.text
    return Org(
        tenant=tenant, emails=emails, channel_id=channel["id"], channel_name=channel["name"], device_id=device_id,
        device_name=config["name"], external_id=config["external_id"], external_key=config["external_key"],
        config=config, key_id=key.json()["id"], key_name=key_name, key=key.json()["key"], bootstrap=bootstrap.json(),
        ca_id=ca["id"], ca_pem=ca["chain_pem"], certificate_id=certificate.json()["id"],
        certificate_serial=certificate.json()["serial"], certificate_pem=certificate.json()["certificate_pem"],
        private_key=certificate.json()["private_key_pem"], psk_id=psk.json()["id"], psk_identity=psk.json()["identity"],
        psk_key=psk.json()["key"], mac_address=mac_address, server_id=definition.json()["id"], server_name=server_name,
        server_address=server_address, webhook_id=webhook.json()["id"], webhook_url=webhook.json()["url"],
        webhook_secret=webhook.json()["secret"], endpoint=endpoint, registration_id=registration_id,
        observation_id=observation.json()["id"],
    )


@dataclass
class World:
    server: ServerProcess
    root: Api
    a: Org
    b: Org
    attackers: dict[str, Api]
    #: A trust store entry (deployment-wide, nobody's tenant data), for the trust store routes.
    trust_entry_id: str
    clients: list[Api] = field(default_factory=list)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture(scope="module")
def world(server: ServerProcess) -> Iterator[World]:
    root = Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    a = populate(server, make_tenant(server.url, root))
    b = populate(server, make_tenant(server.url, root))
    root_key = root.post("/api/v1/api-keys", json={"name": unique("root-key"), "org_id": a.org_id})
    assert root_key.status_code == 201, root_key.text
    org_key = Api(server.url, a.key)
    system_admin_key = Api(server.url, root_key.json()["key"])
    attackers = {
        "admin": a.tenant.admin, "member": a.tenant.member, "viewer": a.tenant.viewer,
        "org-restricted API key": org_key, "system administrator's API key restricted to A": system_admin_key,
    }
    anchor = root.post("/api/v1/trust-store", json={"certificate": pki.certificate_pem(pki.generate_ca(unique("anchor")).parents[0])})
    assert anchor.status_code == 201, anchor.text
    created = World(server, root, a, b, attackers, anchor.json()["id"],
                    [root, org_key, system_admin_key, a.tenant.admin, a.tenant.member, a.tenant.viewer,
                     b.tenant.admin, b.tenant.member, b.tenant.viewer])
    yield created
    root.delete(f"/api/v1/trust-store/{created.trust_entry_id}")
    created.close()


# --- what an attempt is, and the table of attempts per route --------------------------------------


@dataclass(frozen=True)
class Case:
    """One request on a route: path parameters, query, body and headers, and the statuses allowed."""

    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    allowed: frozenset[int] = DENIED
    #: The request lists A's own resources filtered by one of B's ids: 200 with nothing in it.
    empty_list: bool = False


def _in(org: Org, **path: str) -> dict[str, str]:
    return {"org_id": org.org_id, **path}


def _domain(org: Org, **path: str) -> dict[str, str]:
    return {"domain_id": org.org_id, **path}


def _as_b(w: World) -> dict[str, str]:
    return {"X-Pilotboat-Org": w.b.org_id}


def _new_config(channels: list[str], **extra: str) -> dict[str, Any]:
    return {"external_id": unique("intruder"), "external_key": unique("key"), "channels": channels,
            "name": "intruder", "content": "intruder", **extra}


def _intruder_ca() -> dict[str, str]:
    """A valid CA to import: refused for who may not, not for bad material."""
    ca = pki.generate_ca(unique("intruder"))
    return {"certificate": pki.certificate_pem(ca.certificate), "private_key": pki.key_pem(ca.key),
            "chain": pki.chain_pem(ca.parents)}


def _intruder_csr() -> dict[str, str]:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "intruder")]))
        .sign(pki.new_key(), hashes.SHA256())
    )
    return {"csr": request.public_bytes(serialization.Encoding.PEM).decode()}


def _intruder_psk() -> dict[str, str]:
    return {"identity": unique("intruder"), "key": "00" * 16}


def _intruder_server(**extra: str) -> dict[str, Any]:
    return {"name": "intruder", "address": f"{unique('intruder')}.example.test", "port": 5683, **extra}


Cases = Callable[[World], list[Case]]

# (method, path template) -> the attempts of A's callers on B's resources.
ROUTES: dict[tuple[str, str], Cases] = {
    # --- organisations and users ---
    ("GET", "/api/v1/orgs/{org_id}"): lambda w: [Case(_in(w.b))],
    ("GET", "/api/v1/orgs/{org_id}/users"): lambda w: [Case(_in(w.b))],
    ("POST", "/api/v1/orgs/{org_id}/users"): lambda w: [
        Case(_in(w.b), json={"email": f"{unique('intruder')}@intruder.test", "password": "intruder-password", "role": "admin"}),
        # Emails are unique across the deployment, so adding B's admin to A is a conflict (409) at best;
        # it must neither succeed nor attach B's user to A.
        Case(_in(w.a), json={"email": w.b.emails["admin"], "password": "intruder-password", "role": "admin"},
             allowed=DENIED | {409}),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}/users/{user_id}"): lambda w: [
        Case(_in(w.b, user_id=w.b.tenant.users["viewer"]), json={"role": "admin"}),
        Case(_in(w.b, user_id=w.b.tenant.users["admin"]), json={"role": "viewer"}),
        Case(_in(w.a, user_id=w.b.tenant.users["admin"]), json={"role": "viewer"}),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/users/{user_id}"): lambda w: [
        Case(_in(w.b, user_id=w.b.tenant.users["viewer"])),
        Case(_in(w.a, user_id=w.b.tenant.users["viewer"])),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}"): lambda w: [
        Case(_in(w.b), json={"cert_validity_days": 1, "keep_device_keys": True}),
    ],
    # --- API keys and deployment-wide events ---
    ("POST", "/api/v1/api-keys"): lambda w: [Case(json={"name": unique("intruder-key"), "org_id": w.b.org_id})],
    ("DELETE", "/api/v1/api-keys/{key_id}"): lambda w: [Case({"key_id": w.b.key_id})],
    ("GET", "/api/v1/events"): lambda w: [
        Case(allowed=frozenset({403})),
        Case(query={"kind": "bootstrap."}, allowed=frozenset({403})),
    ],
    # --- native devices ---
    ("GET", "/api/v1/orgs/{org_id}/devices"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.a), query={"channel_id": w.b.channel_id}, allowed=frozenset({200}), empty_list=True),
        Case(_in(w.a), query={"external_id": w.b.external_id}, allowed=frozenset({200}), empty_list=True),
        Case(_in(w.a), query={"name": w.b.device_name}, allowed=frozenset({200}), empty_list=True),
    ],
    ("POST", "/api/v1/orgs/{org_id}/devices"): lambda w: [
        Case(_in(w.b), json={"name": "intruder"}),
        Case(_in(w.b), json={"name": "intruder", "channels": [w.b.channel_id], "state": 1}),
        Case(_in(w.a), json={"name": "intruder", "channels": [w.b.channel_id], "state": 1}),
    ],
    ("GET", "/api/v1/orgs/{org_id}/devices/{device_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)), Case(_in(w.a, device_id=w.b.device_id)),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}/devices/{device_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id), json={"name": "hijacked", "external_key": "hijacked-key"}),
        Case(_in(w.a, device_id=w.b.device_id), json={"name": "hijacked", "external_key": "hijacked-key"}),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/devices/{device_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)), Case(_in(w.a, device_id=w.b.device_id)),
    ],
    ("PUT", "/api/v1/orgs/{org_id}/devices/{device_id}/state"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id), json={"state": 0}),
        Case(_in(w.a, device_id=w.b.device_id), json={"state": 0}),
    ],
    ("PUT", "/api/v1/orgs/{org_id}/devices/{device_id}/channels"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id), json={"channels": []}),
        Case(_in(w.a, device_id=w.b.device_id), json={"channels": []}),
        Case(_in(w.a, device_id=w.b.device_id), json={"channels": [w.a.channel_id]}),
        Case(_in(w.a, device_id=w.a.device_id), json={"channels": [w.b.channel_id]}),
    ],
    # --- native channels ---
    ("POST", "/api/v1/orgs/{org_id}/channels"): lambda w: [Case(_in(w.b), json={"name": "intruder"})],
    ("GET", "/api/v1/orgs/{org_id}/channels"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.a), query={"name": w.b.channel_name}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/api/v1/orgs/{org_id}/channels/{channel_id}"): lambda w: [
        Case(_in(w.b, channel_id=w.b.channel_id)), Case(_in(w.a, channel_id=w.b.channel_id)),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}/channels/{channel_id}"): lambda w: [
        Case(_in(w.b, channel_id=w.b.channel_id), json={"name": "hijacked", "metadata": {"hijacked": True}}),
        Case(_in(w.a, channel_id=w.b.channel_id), json={"name": "hijacked", "metadata": {"hijacked": True}}),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/channels/{channel_id}"): lambda w: [
        Case(_in(w.b, channel_id=w.b.channel_id)), Case(_in(w.a, channel_id=w.b.channel_id)),
    ],
    # --- organisation CAs and device certificates ---
    ("GET", "/api/v1/orgs/{org_id}/cas"): lambda w: [Case(_in(w.b))],
    ("POST", "/api/v1/orgs/{org_id}/cas"): lambda w: [Case(_in(w.b), json=_intruder_ca())],
    ("GET", "/api/v1/orgs/{org_id}/ca/chain"): lambda w: [Case(_in(w.b))],
    ("GET", "/api/v1/orgs/{org_id}/cas/{ca_id}/crl"): lambda w: [
        Case(_in(w.b, ca_id=w.b.ca_id)), Case(_in(w.a, ca_id=w.b.ca_id)),
    ],
    ("POST", "/api/v1/orgs/{org_id}/devices/{device_id}/certificates"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)),
        Case(_in(w.b, device_id=w.b.device_id), json=_intruder_csr()),
        Case(_in(w.a, device_id=w.b.device_id)),
        Case(_in(w.a, device_id=w.b.device_id), json=_intruder_csr()),
    ],
    ("GET", "/api/v1/orgs/{org_id}/certificates"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.b), query={"status": "active"}),
        Case(_in(w.a), query={"device_id": w.b.device_id}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/api/v1/orgs/{org_id}/certificates/{certificate_id}"): lambda w: [
        Case(_in(w.b, certificate_id=w.b.certificate_id)), Case(_in(w.a, certificate_id=w.b.certificate_id)),
    ],
    ("POST", "/api/v1/orgs/{org_id}/certificates/{certificate_id}/revoke"): lambda w: [
        Case(_in(w.b, certificate_id=w.b.certificate_id), json={"reason": "key_compromise"}),
        Case(_in(w.a, certificate_id=w.b.certificate_id), json={"reason": "key_compromise"}),
    ],
    # --- PSK identities ---
    ("POST", "/api/v1/orgs/{org_id}/devices/{device_id}/psks"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)),
        Case(_in(w.b, device_id=w.b.device_id), json=_intruder_psk()),
        Case(_in(w.a, device_id=w.b.device_id)),
        Case(_in(w.a, device_id=w.b.device_id), json=_intruder_psk()),
        # Identities are unique in the whole deployment (a DTLS server looks one up before it knows the
        # organisation), so importing B's identity into A's own device is a conflict at best.
        Case(_in(w.a, device_id=w.a.device_id), json={"identity": w.b.psk_identity, "key": "11" * 16},
             allowed=DENIED | {409}),
    ],
    ("GET", "/api/v1/orgs/{org_id}/psks"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.a), query={"device_id": w.b.device_id}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/api/v1/orgs/{org_id}/psks/{psk_id}"): lambda w: [
        Case(_in(w.b, psk_id=w.b.psk_id)), Case(_in(w.a, psk_id=w.b.psk_id)),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/psks/{psk_id}"): lambda w: [
        Case(_in(w.b, psk_id=w.b.psk_id)), Case(_in(w.a, psk_id=w.b.psk_id)),
    ],
    # --- management servers ---
    ("GET", "/api/v1/orgs/{org_id}/management-servers"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.b), query={"address": w.b.server_address}),
        # A's own list filtered by B's address: the default and A's own only (none at that address).
        Case(_in(w.a), query={"address": w.b.server_address}, allowed=frozenset({200})),
    ],
    ("POST", "/api/v1/orgs/{org_id}/management-servers"): lambda w: [Case(_in(w.b), json=_intruder_server())],
    ("GET", "/api/v1/orgs/{org_id}/management-servers/{server_id}"): lambda w: [
        Case(_in(w.b, server_id=w.b.server_id)), Case(_in(w.a, server_id=w.b.server_id)), Case(_in(w.b, server_id="default")),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}/management-servers/{server_id}"): lambda w: [
        Case(_in(w.b, server_id=w.b.server_id), json={"name": "hijacked", "address": "intruder.example.test"}),
        Case(_in(w.a, server_id=w.b.server_id), json={"name": "hijacked", "address": "intruder.example.test"}),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/management-servers/{server_id}"): lambda w: [
        Case(_in(w.b, server_id=w.b.server_id)), Case(_in(w.a, server_id=w.b.server_id)),
    ],
    ("GET", "/api/v1/orgs/{org_id}/devices/{device_id}/bootstrap-plan"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)),
        Case(_in(w.a, device_id=w.b.device_id)),
    ],
    ("PUT", "/api/v1/orgs/{org_id}/devices/{device_id}/management-server"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id), json={"server_id": "default"}),
        Case(_in(w.b, device_id=w.b.device_id), json={"server_id": w.a.server_id}),
        Case(_in(w.a, device_id=w.b.device_id), json={"server_id": "default"}),
        Case(_in(w.a, device_id=w.a.device_id), json={"server_id": w.b.server_id}),
    ],
    # --- webhooks and the live event stream ---
    ("GET", "/api/v1/orgs/{org_id}/webhooks"): lambda w: [Case(_in(w.b))],
    ("POST", "/api/v1/orgs/{org_id}/webhooks"): lambda w: [
        Case(_in(w.b), json={"url": "https://intruder.invalid/hook"}),
        Case(_in(w.b), json={"url": "https://intruder.invalid/hook", "kinds": ["device."], "secret": "intruder-secret-0123456789"}),
    ],
    ("GET", "/api/v1/orgs/{org_id}/webhooks/{webhook_id}"): lambda w: [
        Case(_in(w.b, webhook_id=w.b.webhook_id)), Case(_in(w.a, webhook_id=w.b.webhook_id)),
    ],
    ("PATCH", "/api/v1/orgs/{org_id}/webhooks/{webhook_id}"): lambda w: [
        Case(_in(w.b, webhook_id=w.b.webhook_id), json={"url": "https://intruder.invalid/hook", "kinds": []}),
        Case(_in(w.a, webhook_id=w.b.webhook_id), json={"url": "https://intruder.invalid/hook", "secret": "intruder-secret-0123456789"}),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/webhooks/{webhook_id}"): lambda w: [
        Case(_in(w.b, webhook_id=w.b.webhook_id)), Case(_in(w.a, webhook_id=w.b.webhook_id)),
    ],
    ("POST", "/api/v1/orgs/{org_id}/webhooks/{webhook_id}/enable"): lambda w: [
        Case(_in(w.b, webhook_id=w.b.webhook_id)), Case(_in(w.a, webhook_id=w.b.webhook_id)),
    ],
    ("GET", "/api/v1/orgs/{org_id}/webhooks/{webhook_id}/deliveries"): lambda w: [
        Case(_in(w.b, webhook_id=w.b.webhook_id)), Case(_in(w.a, webhook_id=w.b.webhook_id)),
    ],
    ("GET", "/api/v1/orgs/{org_id}/events/stream"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.b), query={"last_event_id": "0"}),
        Case(_in(w.b), headers={"Last-Event-ID": "0"}, query={"kind": "bootstrap."}),
    ],
    # --- LwM2M device operations, observations and triggers (B's device is registered from a closed socket: a request that reached it would fail late, not 403/404) ---
    **{(method, "/api/v1/orgs/{org_id}/devices/{device_id}/lwm2m/{path}"): (lambda w, body=body: [
        Case(_in(w.b, device_id=w.b.device_id, path=path), json=body)
        for path in ("3/0", "3/0/4", "3303", "3303/0/5700")
    ] + [Case(_in(w.a, device_id=w.b.device_id, path="3/0"), json=body), Case(_in(w.b, device_id=w.b.device_id, path="0/0"))])
      for method, body in (("GET", None), ("PUT", {"values": {"/3/0/14": "+02"}}), ("PATCH", {"values": {"/3/0/14": "+02"}}),
                           ("POST", None), ("DELETE", None))},
    ("GET", "/api/v1/orgs/{org_id}/directory"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.b), query={"endpoint": w.b.endpoint, "status": "registered"}),
        Case(_in(w.a), query={"endpoint": w.b.endpoint}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/api/v1/orgs/{org_id}/directory/{device_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)), Case(_in(w.a, device_id=w.b.device_id)),
    ],
    ("GET", "/api/v1/orgs/{org_id}/devices/{device_id}/lwm2m-requests/{request_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id, request_id="unknown")),
        Case(_in(w.a, device_id=w.b.device_id, request_id="unknown")),
    ],
    ("POST", "/api/v1/orgs/{org_id}/devices/{device_id}/observations"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id), json={"path": "/3/0/13"}),
        Case(_in(w.a, device_id=w.b.device_id), json={"path": "/3/0/13"}),
    ],
    ("GET", "/api/v1/orgs/{org_id}/devices/{device_id}/observations"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)), Case(_in(w.a, device_id=w.b.device_id)),
    ],
    ("DELETE", "/api/v1/orgs/{org_id}/devices/{device_id}/observations/{observation_id}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id, observation_id=w.b.observation_id)),
        Case(_in(w.a, device_id=w.b.device_id, observation_id=w.b.observation_id)),
        Case(_in(w.a, device_id=w.a.device_id, observation_id=w.b.observation_id)),
    ],
    **{("POST", f"/api/v1/orgs/{{org_id}}/devices/{{device_id}}/commands/{command}"): lambda w: [
        Case(_in(w.b, device_id=w.b.device_id)), Case(_in(w.a, device_id=w.b.device_id)),
        Case(_in(w.b, device_id=w.b.device_id), query={"server_instance": "0"}),
    ] for command in ("trigger-bootstrap", "trigger-update")},
    ("POST", "/api/management/devices/{mac_address}/commands/trigger-bootstrap"): lambda w: [
        Case({"mac_address": w.b.mac_address}), Case({"mac_address": w.b.mac_address.upper().replace(":", "-")}),
    ],
    # --- native events ---
    ("GET", "/api/v1/orgs/{org_id}/events"): lambda w: [
        Case(_in(w.b)),
        Case(_in(w.b), query={"device_id": w.b.device_id}),
        Case(_in(w.a), query={"device_id": w.b.device_id}, allowed=frozenset({200}), empty_list=True),
    ],
    # --- Mainflux 0.13: the caller's own organisation, or the one named in X-Pilotboat-Org ---
    ("POST", "/things/configs"): lambda w: [
        Case(headers=_as_b(w), json=_new_config([w.b.channel_id])),
        Case(json=_new_config([w.b.channel_id])),
        Case(json=_new_config([w.a.channel_id], thing_id=w.b.device_id)),
    ],
    ("GET", "/things/configs"): lambda w: [
        Case(headers=_as_b(w)),
        Case(query={"external_id": w.b.external_id}, allowed=frozenset({200}), empty_list=True),
        Case(query={"name": w.b.device_name}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/things/configs/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w)), Case({"config_id": w.b.device_id}),
    ],
    ("PUT", "/things/configs/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w), json={"name": "hijacked", "content": "hijacked"}),
        Case({"config_id": w.b.device_id}, json={"name": "hijacked", "content": "hijacked"}),
    ],
    ("DELETE", "/things/configs/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w)),
        # Upstream answers 204 for a config it does not know; that is all A may learn here.
        Case({"config_id": w.b.device_id}, allowed=DENIED | {204}),
    ],
    ("PATCH", "/things/configs/certs/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w), json={"client_key": "hijacked", "ca_cert": "hijacked"}),
        Case({"config_id": w.b.device_id}, json={"client_key": "hijacked", "ca_cert": "hijacked"}),
    ],
    ("PUT", "/things/configs/connections/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w), json={"channels": [w.b.channel_id]}),
        Case({"config_id": w.b.device_id}, json={"channels": [w.a.channel_id]}),
        Case({"config_id": w.a.device_id}, json={"channels": [w.b.channel_id]}),
    ],
    ("PUT", "/things/state/{config_id}"): lambda w: [
        Case({"config_id": w.b.device_id}, headers=_as_b(w), json={"state": 0}),
        Case({"config_id": w.b.device_id}, json={"state": 0}),
    ],
    # --- Magistrala: the domain in the path is the organisation ---
    ("POST", "/{domain_id}/clients/configs"): lambda w: [
        Case(_domain(w.b), json=_new_config([w.b.channel_id])),
        Case(_domain(w.b), json=_new_config([w.b.channel_id], client_id=w.b.device_id)),
        Case(_domain(w.a), json=_new_config([w.b.channel_id])),
        Case(_domain(w.a), json=_new_config([w.a.channel_id], client_id=w.b.device_id)),
    ],
    ("GET", "/{domain_id}/clients/configs"): lambda w: [
        Case(_domain(w.b)),
        Case(_domain(w.a), query={"external_id": w.b.external_id}, allowed=frozenset({200}), empty_list=True),
        Case(_domain(w.a), query={"name": w.b.device_name}, allowed=frozenset({200}), empty_list=True),
    ],
    ("GET", "/{domain_id}/clients/configs/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id)), Case(_domain(w.a, config_id=w.b.device_id)),
    ],
    ("PUT", "/{domain_id}/clients/configs/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id), json={"name": "hijacked", "content": "hijacked"}),
        Case(_domain(w.a, config_id=w.b.device_id), json={"name": "hijacked", "content": "hijacked"}),
    ],
    ("DELETE", "/{domain_id}/clients/configs/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id)),
        # Upstream answers 204 for a config it does not know; that is all A may learn here.
        Case(_domain(w.a, config_id=w.b.device_id), allowed=DENIED | {204}),
    ],
    ("PATCH", "/{domain_id}/clients/configs/certs/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id), json={"client_key": "hijacked", "client_cert": "hijacked"}),
        Case(_domain(w.a, config_id=w.b.device_id), json={"client_key": "hijacked", "client_cert": "hijacked"}),
    ],
    ("PUT", "/{domain_id}/clients/configs/connections/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id), json={"channels": [w.b.channel_id]}),
        Case(_domain(w.a, config_id=w.b.device_id), json={"channels": [w.a.channel_id]}),
        Case(_domain(w.a, config_id=w.a.device_id), json={"channels": [w.b.channel_id]}),
    ],
    ("PUT", "/{domain_id}/clients/state/{config_id}"): lambda w: [
        Case(_domain(w.b, config_id=w.b.device_id), json={"state": 0}),
        Case(_domain(w.a, config_id=w.b.device_id), json={"state": 0}),
    ],
    # --- WebAccess/DMP: users and their per-company permissions ---
    ("GET", "/api/users/{user_id}"): lambda w: [
        Case({"user_id": w.b.tenant.users[role]}) for role in ("admin", "member", "viewer")
    ],
    ("PUT", "/api/users/{user_id}/companies"): lambda w: [
        Case({"user_id": w.b.tenant.users["viewer"]},
             json=[{"company_id": w.b.org_id, "role": "admin", "permissions": ["Device Management Server"]}]),
        Case({"user_id": w.b.tenant.users["admin"]}, json=[{"company_id": w.b.org_id, "role": "viewer"}]),
        Case({"user_id": w.b.tenant.users["viewer"]}, json=[{"company_id": w.a.org_id, "role": "admin"}]),
        Case({"user_id": w.a.tenant.users["viewer"]}, json=[{"company_id": w.b.org_id, "role": "admin"}]),
    ],
    # --- WebAccess/DMP: management servers ("bootstrap servers") and their assignment by MAC address ---
    ("POST", "/api/bootstrap"): lambda w: [Case(json=_intruder_server(company_id=w.b.org_id))],
    ("GET", "/api/bootstrap/{server_id}"): lambda w: [Case({"server_id": w.b.server_id})],
    ("PUT", "/api/bootstrap/{server_id}"): lambda w: [
        Case({"server_id": w.b.server_id}, json={"name": "hijacked", "port": 5684}),
    ],
    ("DELETE", "/api/bootstrap/{server_id}"): lambda w: [Case({"server_id": w.b.server_id})],
    ("PUT", "/api/management/devices/{mac_address}/bootstrap-server/{server_id}"): lambda w: [
        Case({"mac_address": w.b.mac_address, "server_id": "default"}),
        Case({"mac_address": w.b.mac_address, "server_id": w.b.server_id}),
        Case({"mac_address": w.a.mac_address, "server_id": w.b.server_id}),
    ],
    # --- Creator: identities in the caller's organisation, or the one named in X-Pilotboat-Org ---
    ("POST", "/identities/certificates"): lambda w: [
        Case(headers=_as_b(w)),
        Case(query={"device_id": w.b.device_id}),
        Case(query={"device_id": w.b.device_id}, headers=_as_b(w)),
    ],
    ("POST", "/identities/psk"): lambda w: [
        Case(headers=_as_b(w)),
        Case(query={"device_id": w.b.device_id}),
        Case(query={"device_id": w.b.device_id}, headers=_as_b(w)),
    ],
    ("GET", "/identities/psk/{identity}"): lambda w: [
        Case({"identity": w.b.psk_identity}), Case({"identity": w.b.psk_identity}, headers=_as_b(w)),
    ],
    ("DELETE", "/identities/psk/{identity}"): lambda w: [
        Case({"identity": w.b.psk_identity}), Case({"identity": w.b.psk_identity}, headers=_as_b(w)),
    ],
}

#: Routes that name no tenant; ``test_unscoped_route`` checks each shows A nothing of B.
UNSCOPED: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/auth/token"),
    ("GET", "/api/v1/me"),
    ("GET", "/api/v1/orgs"),
    ("POST", "/api/v1/orgs"),
    ("GET", "/api/v1/api-keys"),
    ("GET", "/api/v1/trust-store"),
    ("POST", "/api/v1/trust-store"),
    ("GET", "/api/v1/trust-store/{entry_id}"),
    ("DELETE", "/api/v1/trust-store/{entry_id}"),
    ("GET", "/api/v1/dtls/server-certificate"),
    ("GET", "/api/certs"),
    ("PUT", "/api/certs"),
    ("GET", "/api/bootstrap"),
    ("GET", "/api/v1/events/stream"),
    ("GET", "/clients/bootstrap/{external_id}"),
    ("GET", "/clients/bootstrap/secure/{external_id}"),
    ("GET", "/clients/bootstrap/sealed/{external_id}"),
    ("GET", "/things/bootstrap/{external_id}"),
    ("GET", "/things/bootstrap/secure/{external_id}"),
})


# --- checks ----------------------------------------------------------------------------------------


def openapi_routes(server: ServerProcess) -> set[tuple[str, str]]:
    response = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    return {
        (method.upper(), path)
        for path, operations in response.json()["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }


def route_hits(server: ServerProcess, method: str, template: str) -> int:
    """How many requests the server has answered on ``method template`` (any status)."""
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if (sample.name == "pilotboat_http_requests_total" and sample.labels.get("method") == method
                    and sample.labels.get("route") == template):
                total += sample.value
    return int(total)


def assert_no_leak(response: httpx.Response, secrets: set[str], sent: str, what: str) -> None:
    """No value of ``secrets`` appears in the response, except what the caller itself sent."""
    shown = response.text + "\n" + "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    leaked = sorted(secret for secret in secrets if secret not in sent and secret in shown)
    assert not leaked, f"{what}: the response shows B's {leaked}: {response.status_code} {response.text[:500]}"


def snapshot(w: World) -> dict[str, Any]:
    """B's state, as B's own callers see it."""
    b, org_id = w.b, w.b.org_id
    reads: dict[str, tuple[Api, str, dict[str, Any]]] = {
        "org": (b.tenant.admin, f"/api/v1/orgs/{org_id}", {}),
        "orgs": (b.tenant.admin, "/api/v1/orgs", {}),
        "users": (b.tenant.admin, f"/api/v1/orgs/{org_id}/users", {}),
        "devices": (b.tenant.admin, f"/api/v1/orgs/{org_id}/devices", {"limit": 100}),
        "device": (b.tenant.admin, f"/api/v1/orgs/{org_id}/devices/{b.device_id}", {}),
        "channels": (b.tenant.admin, f"/api/v1/orgs/{org_id}/channels", {"limit": 100}),
        "channel": (b.tenant.admin, f"/api/v1/orgs/{org_id}/channels/{b.channel_id}", {}),
        "events": (b.tenant.admin, f"/api/v1/orgs/{org_id}/events", {"limit": 500}),
        "configs": (b.tenant.admin, f"/{org_id}/clients/configs", {"limit": 100}),
        "config": (b.tenant.admin, f"/{org_id}/clients/configs/{b.device_id}", {}),
        "things": (b.tenant.admin, "/things/configs", {"limit": 100}),
        "thing": (b.tenant.admin, f"/things/configs/{b.device_id}", {}),
        "api-keys": (b.tenant.admin, "/api/v1/api-keys", {}),
        "me admin": (b.tenant.admin, "/api/v1/me", {}),
        "me member": (b.tenant.member, "/api/v1/me", {}),
        "me viewer": (b.tenant.viewer, "/api/v1/me", {}),
        "cas": (b.tenant.admin, f"/api/v1/orgs/{org_id}/cas", {}),
        "certificates": (b.tenant.admin, f"/api/v1/orgs/{org_id}/certificates", {"limit": 100}),
        "certificate": (b.tenant.admin, f"/api/v1/orgs/{org_id}/certificates/{b.certificate_id}", {}),
        "psks": (b.tenant.admin, f"/api/v1/orgs/{org_id}/psks", {"limit": 100}),
        "psk": (b.tenant.admin, f"/api/v1/orgs/{org_id}/psks/{b.psk_id}", {}),
        "trust-store": (b.tenant.admin, "/api/v1/trust-store", {}),
        "management-servers": (b.tenant.admin, f"/api/v1/orgs/{org_id}/management-servers", {}),
        "management-server": (b.tenant.admin, f"/api/v1/orgs/{org_id}/management-servers/{b.server_id}", {}),
        "webhooks": (b.tenant.admin, f"/api/v1/orgs/{org_id}/webhooks", {}),
        "webhook": (b.tenant.admin, f"/api/v1/orgs/{org_id}/webhooks/{b.webhook_id}", {}),
        "observations": (b.tenant.admin, f"/api/v1/orgs/{org_id}/devices/{b.device_id}/observations", {}),
        "directory": (b.tenant.admin, f"/api/v1/orgs/{org_id}/directory", {}),
        "directory entry": (b.tenant.admin, f"/api/v1/orgs/{org_id}/directory/{b.device_id}", {}),
    }
    state: dict[str, Any] = {}
    for name, (client, path, params) in reads.items():
        response = client.get(path, params=params)
        assert response.status_code == 200, (name, response.status_code, response.text)
        state[name] = response.json()
    chain = b.tenant.admin.get(f"/api/v1/orgs/{org_id}/ca/chain")
    assert chain.status_code == 200, chain.text
    state["ca chain"] = chain.text
    # The CRL is signed afresh on each read: compare what it says.
    crl = b.tenant.admin.get(f"/api/v1/orgs/{org_id}/cas/{b.ca_id}/crl")
    assert crl.status_code == 200, crl.text
    parsed = x509.load_pem_x509_crl(crl.text.encode())
    state["crl"] = (parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
                    sorted(revoked.serial_number for revoked in parsed))
    # Its webhook's deliveries fail (the URL never resolves), and go on: what B set stays.
    configured = ("id", "url", "kinds", "active", "created_at")
    state["webhooks"] = [{k: hook[k] for k in configured} for hook in state["webhooks"]]
    state["webhook"] = {k: state["webhook"][k] for k in configured}
    # When B last used its own key is B's business, and changes as B uses it (here too).
    state["api-keys"] = [{k: v for k, v in key.items() if k != "last_used_at"} for key in state["api-keys"]]
    with Api(w.server.url, b.key) as key_client:
        response = key_client.get(f"/api/v1/orgs/{org_id}")
        assert response.status_code == 200, ("B's API key no longer works", response.text)
    return state


def assert_b_bootstraps_as_before(w: World) -> None:
    """B's device still bootstraps with its own key to the same configuration (secrets included)."""
    response = device_get(w.server.url, f"/clients/bootstrap/{w.b.external_id}", f"Client {w.b.external_key}")
    assert response.status_code == 200, response.text
    assert response.json() == w.b.bootstrap


def send(client: Api, method: str, path: str, case: Case) -> httpx.Response:
    return client.request(method, path, params=case.query, json=case.json, headers=case.headers)


# --- tests -----------------------------------------------------------------------------------------


def test_every_route_has_an_isolation_case(server: ServerProcess) -> None:
    routes = openapi_routes(server)
    assert not set(ROUTES) & UNSCOPED, "a route is both tenant-scoped and not"
    missing = sorted(routes - set(ROUTES) - UNSCOPED)
    assert not missing, f"routes without a tenant-isolation case in ROUTES (or in UNSCOPED): {missing}"
    stale = sorted((set(ROUTES) | UNSCOPED) - routes)
    assert not stale, f"isolation cases for routes the server no longer has: {stale}"


@pytest.mark.parametrize(("method", "template"), sorted(ROUTES), ids=[f"{m} {p}" for m, p in sorted(ROUTES)])
def test_tenant_cannot_reach_another_tenant(world: World, method: str, template: str) -> None:
    cases = ROUTES[(method, template)](world)
    assert cases, "every route needs at least one attempt"
    secrets = world.b.secrets()
    before = snapshot(world)
    hits_before = route_hits(world.server, method, template)
    for case in cases:
        path = template.format(**case.path)
        sent = json.dumps([path, case.query, case.json, case.headers])
        for who, client in world.attackers.items():
            response = send(client, method, path, case)
            what = f"A's {who}: {method} {path} query={case.query} body={case.json} headers={case.headers}"
            assert response.status_code in case.allowed, (
                f"{what}: expected one of {sorted(case.allowed)}, got {response.status_code} {response.text[:500]}"
            )
            assert_no_leak(response, secrets, sent, what)
            if case.empty_list:
                body = response.json()
                assert body["total"] == 0, f"{what}: {body}"
                assert not [value for key, value in body.items() if isinstance(value, list) and value], f"{what}: {body}"
    sent_count = len(cases) * len(world.attackers)
    assert route_hits(world.server, method, template) - hits_before == sent_count, (
        f"not every attempt reached {method} {template}: check the path parameters of its cases"
    )
    assert snapshot(world) == before, "B's state changed"
    assert_b_bootstraps_as_before(world)
    # Nothing of B was written into A's own audit trail either.
    events = world.a.tenant.admin.get(f"/api/v1/orgs/{world.a.org_id}/events", params={"limit": 500})
    assert events.status_code == 200, events.text
    assert_no_leak(events, secrets, "", "A's events")


def _health(w: World, client: Api) -> httpx.Response:
    response = client.get("/health")
    assert response.status_code == 200
    return response


def _metrics(w: World, client: Api) -> httpx.Response:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response


def _login(w: World, client: Api) -> httpx.Response:
    # A caller of A knows B's admin's email at most: without B's password it gets no token.
    response = client.post("/api/v1/auth/token", data={"username": w.b.emails["admin"], "password": "password-viewer"})
    assert response.status_code == 401, response.text
    assert "access_token" not in response.json()
    return response


def _me(w: World, client: Api) -> httpx.Response:
    response = client.get("/api/v1/me")
    assert response.status_code == 200, response.text
    assert w.b.org_id not in response.json()["orgs"]
    return response


def _list_orgs(w: World, client: Api) -> httpx.Response:
    response = client.get("/api/v1/orgs")
    assert response.status_code == 200, response.text
    assert [org["id"] for org in response.json()] == [w.a.org_id]
    return response


def _create_org(w: World, client: Api) -> httpx.Response:
    response = client.post("/api/v1/orgs", json={"name": unique("intruder-org")})
    assert response.status_code == 403, response.text
    return response


def _list_keys(w: World, client: Api) -> httpx.Response:
    response = client.get("/api/v1/api-keys")
    assert response.status_code == 200, response.text
    ids = {key["id"] for key in response.json()}
    assert w.b.key_id not in ids
    if client is w.a.tenant.admin:
        assert w.a.key_id in ids
    return response


#: A's callers holding 'device_management_server' (with the admin role) read the trust store; no caller
#: of A is a system administrator acting as one, so none changes it.
TRUST_STORE_READERS = frozenset({"admin", "org-restricted API key", "system administrator's API key restricted to A"})


def _attacker(w: World, client: Api) -> str:
    return next(name for name, attacker in w.attackers.items() if attacker is client)


def _dtls_server_certificate(w: World, client: Api) -> httpx.Response:
    """The deployment's DTLS server certificate: the same public chain for everyone signed in."""
    response = client.get("/api/v1/dtls/server-certificate")
    assert response.status_code == 200, response.text
    assert response.text.startswith("-----BEGIN CERTIFICATE-----")
    return response


def _read_trust_store(w: World, client: Api) -> httpx.Response:
    response = client.get("/api/v1/trust-store")
    if _attacker(w, client) in TRUST_STORE_READERS:
        assert response.status_code == 200, response.text
        assert w.trust_entry_id in {entry["id"] for entry in response.json()}
    else:
        assert response.status_code == 403, response.text
    return response


def _add_to_trust_store(w: World, client: Api) -> httpx.Response:
    response = client.post("/api/v1/trust-store", json={"certificate": _intruder_ca()["chain"]})
    assert response.status_code == 403, response.text
    return response


def _read_trust_entry(w: World, client: Api) -> httpx.Response:
    response = client.get(f"/api/v1/trust-store/{w.trust_entry_id}")
    if _attacker(w, client) in TRUST_STORE_READERS:
        assert response.status_code == 200 and response.json()["id"] == w.trust_entry_id, response.text
    else:
        assert response.status_code == 403, response.text
    return response


def _delete_trust_entry(w: World, client: Api) -> httpx.Response:
    response = client.delete(f"/api/v1/trust-store/{w.trust_entry_id}")
    assert response.status_code == 403, response.text
    return response


def _read_dmp_certs(w: World, client: Api) -> httpx.Response:
    """The DMP trust store shows the trust store and the CA chains of the caller's own organisations."""
    response = client.get("/api/certs")
    if _attacker(w, client) in TRUST_STORE_READERS:
        assert response.status_code == 200, response.text
        bundle = base64.b64decode(response.json()["data"]["certs"]).decode()
        assert pem_marks(w.a.ca_pem) <= {line for line in bundle.splitlines()}, "A's own CA is missing"
        assert not pem_marks(w.b.ca_pem) & set(bundle.splitlines()), "B's CA is in A's view of the trust store"
    else:
        assert response.status_code == 403, response.text
    return response


def _replace_dmp_certs(w: World, client: Api) -> httpx.Response:
    bundle = base64.b64encode(_intruder_ca()["chain"].encode()).decode()
    response = client.put("/api/certs", json={"certs": bundle})
    assert response.status_code == 403, response.text
    return response


def _find_dmp_servers(w: World, client: Api) -> httpx.Response:
    """The DMP list spans the caller's organisations: the default and A's definition, none of B's."""
    response = client.get("/api/bootstrap")
    assert response.status_code == 200, response.text
    ids = [entry["id"] for entry in response.json()["data"]]
    assert ids[0] == "default" and w.a.server_id in ids and w.b.server_id not in ids, ids
    return response


def _deployment_event_stream(w: World, client: Api) -> httpx.Response:
    """Every organisation's events, live: for system administrators acting as such only."""
    response = client.get("/api/v1/events/stream", params={"last_event_id": "0"})
    assert response.status_code == 403, response.text
    return response


def _bootstrap(path: str) -> Callable[[World, Api], httpx.Response]:
    def attempt(w: World, client: Api) -> httpx.Response:
        # The caller's bearer credential is no device key: the device routes refuse it.
        response = client.get(path.format(external_id=w.b.external_id))
        assert response.status_code in {401, 403, 404}, response.text
        return response

    return attempt


UNSCOPED_CHECKS: dict[tuple[str, str], Callable[[World, Api], httpx.Response]] = {
    ("GET", "/health"): _health,
    ("GET", "/metrics"): _metrics,
    ("POST", "/api/v1/auth/token"): _login,
    ("GET", "/api/v1/me"): _me,
    ("GET", "/api/v1/orgs"): _list_orgs,
    ("POST", "/api/v1/orgs"): _create_org,
    ("GET", "/api/v1/api-keys"): _list_keys,
    ("GET", "/api/v1/trust-store"): _read_trust_store,
    ("POST", "/api/v1/trust-store"): _add_to_trust_store,
    ("GET", "/api/v1/trust-store/{entry_id}"): _read_trust_entry,
    ("DELETE", "/api/v1/trust-store/{entry_id}"): _delete_trust_entry,
    ("GET", "/api/v1/dtls/server-certificate"): _dtls_server_certificate,
    ("GET", "/api/certs"): _read_dmp_certs,
    ("PUT", "/api/certs"): _replace_dmp_certs,
    ("GET", "/api/bootstrap"): _find_dmp_servers,
    ("GET", "/api/v1/events/stream"): _deployment_event_stream,
    **{("GET", path): _bootstrap(path) for method, path in UNSCOPED if "/bootstrap/" in path},
}


def test_unscoped_checks_cover_the_unscoped_routes() -> None:
    assert set(UNSCOPED_CHECKS) == UNSCOPED


@pytest.mark.parametrize(("method", "template"), sorted(UNSCOPED), ids=[f"{m} {p}" for m, p in sorted(UNSCOPED)])
def test_unscoped_route_shows_nothing_of_another_tenant(world: World, method: str, template: str) -> None:
    secrets = world.b.secrets()
    before = snapshot(world)
    hits_before = route_hits(world.server, method, template)
    for who, client in world.attackers.items():
        response = UNSCOPED_CHECKS[(method, template)](world, client)
        sent = world.b.external_id if "/bootstrap/" in template else ""
        if template == "/api/v1/auth/token":
            sent = world.b.emails["admin"]
        assert_no_leak(response, secrets, sent, f"A's {who}: {method} {template}")
    hits = route_hits(world.server, method, template) - hits_before
    expected = len(world.attackers) + (1 if template == "/metrics" else 0)  # route_hits itself reads /metrics
    assert hits == expected, f"not every attempt reached {method} {template}"
    assert snapshot(world) == before, "B's state changed"
    assert_b_bootstraps_as_before(world)


@pytest.mark.parametrize(
    "path",
    ["/clients/bootstrap/{external_id}", "/things/bootstrap/{external_id}"],
)
def test_device_key_of_one_tenant_does_not_open_another_tenants_config(world: World, path: str) -> None:
    """A's device key presented for B's external id is refused and shows nothing of B."""
    scheme = "Client" if path.startswith("/clients") else "Thing"
    response = device_get(world.server.url, path.format(external_id=world.b.external_id), f"{scheme} {world.a.external_key}")
    assert response.status_code == 403, response.text
    assert_no_leak(response, world.b.secrets(), world.b.external_id, f"A's device key on {path}")
    assert_b_bootstraps_as_before(world)


def test_api_key_restricted_to_a_sees_only_a(world: World) -> None:
    """The system administrator's key restricted to A: everywhere else it is as good as no membership."""
    client = world.attackers["system administrator's API key restricted to A"]
    assert client.get(f"/api/v1/orgs/{world.a.org_id}").status_code == 200
    assert client.get("/api/v1/events").status_code == 403
    mainflux = client.get("/things/configs")  # the key's organisation is its only one
    assert mainflux.status_code == 200, mainflux.text
    assert {config["mainflux_id"] for config in mainflux.json()["configs"]} == {world.a.device_id}
    for path in (f"/api/v1/orgs/{world.b.org_id}", f"/{world.b.org_id}/clients/configs"):
        assert client.get(path).status_code == 404
    # The same user without the restriction does see B (so the refusals above come from the key).
    assert world.root.get(f"/api/v1/orgs/{world.b.org_id}").status_code == 200


def test_global_uniqueness_reveals_existence_only(world: World) -> None:
    """External ids and endpoints are unique across the deployment (a device bootstraps by external id
    alone), so A reusing B's external id is a conflict. The answer names what A sent and nothing else."""
    a, b = world.a, world.b
    attempts = [
        ("POST", f"/api/v1/orgs/{a.org_id}/devices", {"name": "intruder", "external_id": b.external_id, "external_key": "k"}),
        ("POST", f"/{a.org_id}/clients/configs", _new_config([a.channel_id]) | {"external_id": b.external_id}),
        ("PATCH", f"/api/v1/orgs/{a.org_id}/devices/{a.device_id}", {"external_id": b.external_id}),
    ]
    before = snapshot(world)
    for method, path, body in attempts:
        response = a.tenant.admin.request(method, path, json=body)
        assert response.status_code == 409, response.text
        assert_no_leak(response, b.secrets(), json.dumps([path, body]), f"{method} {path}")
    assert snapshot(world) == before
    own = a.tenant.admin.get(f"/api/v1/orgs/{a.org_id}/devices/{a.device_id}")
    assert own.status_code == 200 and own.json()["external_id"] == a.external_id
