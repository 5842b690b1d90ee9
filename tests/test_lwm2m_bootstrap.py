"""End to end on loopback: simulated LwM2M devices bootstrap against a real ``pilotboat serve``."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant
from lwm2m_helpers import events_of, make_device
from pilotboat.lwm2m import content
from pilotboat.sim import Failure, SimulatedDevice



def bootstrap(server: ServerProcess, endpoint: str, *, pack: bool = False, timeout: float = 20, **options: Any) -> tuple[Any, SimulatedDevice]:
    """Bootstrap one simulated device; returns its result and the (closed) device to inspect."""

    async def run() -> tuple[Any, SimulatedDevice]:
        async with SimulatedDevice(endpoint, server.bootstrap_uri, **options) as device:
            before = dict(device.bootstrap_account or {})
            result = await (device.bootstrap_pack(timeout) if pack else device.bootstrap(timeout))
            assert device.bootstrap_account == before, "the bootstrap-server account was changed"
            return result, device

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("version", "pct", "written_in"),
    [("1.0", None, content.TLV), ("1.1", content.SENML_JSON, content.SENML_JSON),
     ("1.1", content.SENML_CBOR, content.SENML_CBOR), ("1.1", content.TLV, content.TLV)],
    ids=["lwm2m1.0-tlv", "senml-json", "senml-cbor", "tlv"],
)
def test_device_bootstraps_to_the_default_management_server(
    server: ServerProcess, tenant: Tenant, version: str, pct: int | None, written_in: int
) -> None:
    endpoint, device_id = make_device(tenant)
    result, device = bootstrap(server, endpoint, lwm2m_version=version, content_format=pct)
    assert result.ok, result
    [assigned] = device.servers()
    assert (assigned.uri, assigned.security_mode, assigned.short_server_id, assigned.lifetime, assigned.binding) == (
        server.lwm2m_uri, 3, 1, 86400, "U",
    )
    # Exactly the bootstrap account plus one Security and one Server instance.
    assert sorted(device.instances(0)) == sorted({1, assigned.security_instance}) and assigned.security_instance != 1
    assert sorted(device.instances(1)) == [assigned.server_instance]
    first, *rest = device.received
    assert (first.method, first.path, first.accept) == ("GET", "/0", content.LINK_FORMAT)
    writes = [request for request in rest if request.method == "PUT"]
    assert [request.content_format for request in writes] == [written_in, written_in]
    assert [request.path for request in rest][-1] == "/bs" and all(request.code for request in device.received)
    assert "/0/1" not in [request.path for request in rest]  # never a Delete or Write on the bootstrap account

    [event] = events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.succeeded")
    assert event["detail"]["door"] == "lwm2m" and event["detail"]["servers"][0]["uri"] == server.lwm2m_uri
    shown = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}").json()
    assert shown["last_bootstrap"]["outcome"] == "ok" and shown["last_bootstrap"]["door"] == "lwm2m"
    assert shown["last_bootstrap_at"] is not None


def test_bootstrap_account_at_instance_0_and_old_server_accounts_replaced(server: ServerProcess, tenant: Tenant) -> None:
    """A Wakaama-style client (bootstrap account /0/0) bootstrapped twice ends with one server account."""
    endpoint, _ = make_device(tenant)

    async def run() -> SimulatedDevice:
        async with SimulatedDevice(endpoint, server.bootstrap_uri, bootstrap_instance=0, content_format=content.SENML_CBOR) as device:
            account = dict(device.bootstrap_account or {})
            for _ in range(2):
                result = await device.bootstrap(20)
                assert result.ok, result
            assert device.bootstrap_account == account
            return device

    device = asyncio.run(run())
    [assigned] = device.servers()
    assert assigned.security_instance == 1 and sorted(device.instances(0)) == [0, 1]
    deletes = [request.path for request in device.received if request.method == "DELETE"]
    assert deletes.count("/0/1") == 1 and "/0/0" not in deletes  # the second session removed the first's account


def test_bootstrap_pack(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    for fmt in (content.SENML_CBOR, content.SENML_JSON):
        result, device = bootstrap(server, endpoint, pack=True, lwm2m_version="1.2", content_format=fmt)
        assert result.ok and result.method == "pack", result
        assert [server_.uri for server_ in device.servers()] == [server.lwm2m_uri]
        assert device.inconsistency() is None
    events = events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.succeeded")
    assert len(events) == 2 and {event["detail"]["mode"] for event in events} == {"bootstrap-pack"}


def test_unknown_and_inactive_endpoints_get_400_and_an_event(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    unknown = f"urn:dev:unknown-{uuid.uuid4().hex[:8]}"
    result, device = bootstrap(server, unknown)
    assert (result.ok, result.failure, result.code) == (False, Failure.REJECTED, "4.00")
    assert device.received == []  # the server sent nothing to an endpoint it refused
    wide = root.get("/api/v1/events", params={"kind": "bootstrap.failed", "limit": 100}).json()["events"]
    assert any(event["detail"].get("endpoint") == unknown and event["reason"] == "unknown endpoint" for event in wide)

    endpoint, device_id = make_device(tenant, state=0)
    result, _ = bootstrap(server, endpoint)
    assert (result.failure, result.code) == (Failure.REJECTED, "4.00")
    [event] = events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.failed")
    assert (event["outcome"], event["reason"], event["detail"]["door"]) == ("refused", "device inactive", "lwm2m")
    shown = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}").json()
    assert shown["last_bootstrap"]["outcome"] == "refused"


def test_assigned_device_gets_that_management_server(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    created = tenant.admin.post(
        f"/api/v1/orgs/{tenant.org_id}/management-servers",
        json={"name": "other deployment", "address": "mgmt.other.example", "port": 5685, "lifetime": 600, "binding": "UQ",
              "short_server_id": 42},
    )
    assert created.status_code == 201, created.text
    assigned = tenant.admin.put(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/management-server",
                                json={"server_id": created.json()["id"]})
    assert assigned.status_code == 200, assigned.text
    result, device = bootstrap(server, endpoint, content_format=content.SENML_JSON)
    assert result.ok, result
    [given] = device.servers()
    assert (given.uri, given.short_server_id, given.lifetime, given.binding) == ("coap://mgmt.other.example:5685", 42, 600, "UQ")

    # Back to the default: the next bootstrap replaces the account.
    back = tenant.admin.put(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/management-server", json={"server_id": "default"})
    assert back.status_code == 200, back.text
    result, device = bootstrap(server, endpoint)
    assert result.ok and [given.uri for given in device.servers()] == [server.lwm2m_uri]


def test_bootstrap_plan_preview_shows_what_the_device_would_get(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant, state=0)
    plan_url = f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/bootstrap-plan"
    inactive = tenant.viewer.get(plan_url)
    assert inactive.status_code == 200, inactive.text
    assert (inactive.json()["ready"], inactive.json()["refusal"]) == (False, "device inactive")
    assert tenant.admin.put(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/state", json={"state": 1}).status_code == 200
    ready = tenant.viewer.get(plan_url).json()
    assert ready["ready"] and [(given["server_id"], given["uri"], given["security_mode"]) for given in ready["servers"]] == [
        ("default", server.lwm2m_uri, "NOSEC"),
    ]
    result, device = bootstrap(server, endpoint)  # the device gets exactly what the preview showed
    assert result.ok and [given.uri for given in device.servers()] == [ready["servers"][0]["uri"]]
    assert events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.failed") == []  # previews record nothing
    no_endpoint = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "http-only", "state": 1}).json()["id"]
    assert tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{no_endpoint}/bootstrap-plan").json()["refusal"] == (
        "the device has no LwM2M endpoint name"
    )
    assert tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{uuid.uuid4()}/bootstrap-plan").status_code == 404


def test_secure_management_server_is_not_given_over_plain_coap(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    created = tenant.admin.post(
        f"/api/v1/orgs/{tenant.org_id}/management-servers",
        json={"name": "dtls", "address": "mgmt.secure.example", "port": 5684, "uri_scheme": "coaps", "security_mode": "PSK"},
    )
    assert created.status_code == 201, created.text
    assert tenant.admin.put(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/management-server",
                            json={"server_id": created.json()["id"]}).status_code == 200
    preview = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/bootstrap-plan").json()
    assert not preview["ready"] and "DTLS" in preview["refusal"]
    result, _ = bootstrap(server, endpoint)
    assert (result.failure, result.code) == (Failure.REJECTED, "4.00")
    [event] = events_of(tenant.admin, tenant.org_id, device_id, "bootstrap.failed")
    assert event["reason"] == preview["refusal"]


def server_with_device(server_factory, request_timeout: str) -> tuple[ServerProcess, Api, str, str, str]:
    """A server of its own with a short per-request timeout, an organisation and one active device."""
    own = server_factory(PILOTBOAT_BOOTSTRAP_REQUEST_TIMEOUT=request_timeout)
    own.start()
    root = Api.login(own.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    org = root.post("/api/v1/orgs", json={"name": f"org-{uuid.uuid4().hex[:8]}"}).json()["id"]
    endpoint = f"urn:dev:{uuid.uuid4().hex[:12]}"
    device_id = root.post(f"/api/v1/orgs/{org}/devices", json={"endpoint": endpoint, "state": 1}).json()["id"]
    return own, root, org, endpoint, device_id


def test_device_that_stops_answering_ends_as_a_timeout_event(server_factory) -> None:
    quick, root, org, endpoint, device_id = server_with_device(server_factory, "1.5")
    # A new device: Discover, then Delete /1, then the writes. It answers two requests and goes silent.
    result, device = bootstrap(quick, endpoint, timeout=6, answer_limit=2)
    assert result.failure is Failure.TIMEOUT
    unanswered = next(request for request in device.received if request.code is None)
    step = {"DELETE": "delete", "PUT": "write", "POST": "finish"}[unanswered.method]
    [event] = events_of(root, org, device_id, "bootstrap.failed", wait=10)
    assert event["outcome"] == "timeout" and event["detail"]["step"] == step
    assert f"no answer to {unanswered.method} {unanswered.path} within 1.5 s" in event["reason"]
    root.close()
    quick.stop()


def test_a_new_bootstrap_request_replaces_the_running_session(server_factory) -> None:
    slow, root, org, endpoint, device_id = server_with_device(server_factory, "3")

    async def run() -> Any:
        async with SimulatedDevice(endpoint, slow.bootstrap_uri, answer_limit=0) as silent:
            first = asyncio.create_task(silent.bootstrap(2))  # accepted, then never answers
            await asyncio.sleep(0.5)
            async with SimulatedDevice(endpoint, slow.bootstrap_uri) as healthy:
                second = await healthy.bootstrap(20)
            await first
            return second

    second = asyncio.run(run())
    assert second.ok, second
    failed = events_of(root, org, device_id, "bootstrap.failed", wait=10)
    assert [event["outcome"] for event in failed] == ["superseded"]
    assert len(events_of(root, org, device_id, "bootstrap.succeeded")) == 1
    root.close()
    slow.stop()
