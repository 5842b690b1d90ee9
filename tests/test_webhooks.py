"""Webhooks through real servers on SQLite and PostgreSQL, delivering to a real HTTP receiver on
loopback that checks every signature: CRUD and who may use it, signed batches of the organisation's
events (kind filters, the same JSON as the events list), retries with growing pauses after failures
(error answers, a timeout, a redirect that is not followed), the delivery log and its bound,
disabling after persistent failure and enabling again, one dead receiver not holding up another,
two nodes delivering one webhook, bad input, and the secret never shown again."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code

from compat_helpers import new_channel, new_device, org_events, unique
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess, Tenant, make_tenant
from lwm2m_helpers import coap_request, make_device
from notification_helpers import SLOW, Receiver, open_stream

TIMEOUT = 2.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 0.8
MAX_FAILURES = 6
LOG_SIZE = 5
SETTINGS = {
    "PILOTBOAT_WEBHOOK_ALLOW_PRIVATE": "true",
    "PILOTBOAT_WEBHOOK_TIMEOUT": str(TIMEOUT),
    "PILOTBOAT_WEBHOOK_BACKOFF_INITIAL": str(BACKOFF_INITIAL),
    "PILOTBOAT_WEBHOOK_BACKOFF_MAX": str(BACKOFF_MAX),
    "PILOTBOAT_WEBHOOK_MAX_FAILURES": str(MAX_FAILURES),
    "PILOTBOAT_WEBHOOK_DELIVERY_LOG": str(LOG_SIZE),
}


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    created = Receiver()
    yield created
    created.close()


# --- servers and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hooks_server(request: pytest.FixtureRequest, server_factory: Any) -> Iterator[ServerProcess]:
    process = server_factory(request.param, **SETTINGS)
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def root_client(hooks_server: ServerProcess) -> Iterator[Api]:
    client = Api.login(hooks_server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    yield client
    client.close()


@pytest.fixture()
def org(hooks_server: ServerProcess, root_client: Api) -> Iterator[Tenant]:
    tenant = make_tenant(hooks_server.url, root_client)
    yield tenant
    tenant.close()


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["detail"], body
    if field is not None:
        assert body.get("field") == field, body
    return body["detail"]


def hooks(org: Tenant) -> str:
    return f"/api/v1/orgs/{org.org_id}/webhooks"


def new_hook(org: Tenant, url: str, **fields: Any) -> dict[str, Any]:
    return created(org.admin.post(hooks(org), json={"url": url, **fields}))


def hook(org: Tenant, hook_id: str) -> dict[str, Any]:
    return ok(org.admin.get(f"{hooks(org)}/{hook_id}"))


def deliveries(org: Tenant, hook_id: str) -> list[dict[str, Any]]:
    return ok(org.admin.get(f"{hooks(org)}/{hook_id}/deliveries", params={"limit": 500}))["deliveries"]


def wait_until(check: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.05)


def listed(org: Tenant) -> dict[int, dict[str, Any]]:
    return {event["id"]: event for event in org_events(org.admin, org.org_id)}


# --- tests --------------------------------------------------------------------------------------


def test_crud_who_may_and_the_secret_shown_once(hooks_server: ServerProcess, org: Tenant, receiver: Receiver) -> None:
    made = new_hook(org, receiver.url(), kinds=["device.", "bootstrap.succeeded"])
    secret = made["secret"]
    assert len(secret) >= 43 and secret.replace("-", "").replace("_", "").isalnum()
    assert made["active"] is True and made["kinds"] == ["device.", "bootstrap.succeeded"]
    # It starts at the newest event: its own creation.
    newest = listed(org)[made["cursor"]]
    assert newest["kind"] == "webhook.created" and newest["detail"]["webhook_id"] == made["id"]
    assert made["cursor"] == max(listed(org))
    assert made["consecutive_failures"] == 0 and made["disabled_at"] is None and made["org_id"] == org.org_id
    own = new_hook(org, receiver.url("/own"), secret="my own secret of enough length", kinds=["channel."])
    assert own["secret"] == "my own secret of enough length"
    # Listed and read without the secret; members (write) may, viewers may not.
    for client in (org.admin, org.member):
        shown = ok(client.get(hooks(org)))
        assert [entry["id"] for entry in shown] == [made["id"], own["id"]]
        assert all("secret" not in entry for entry in shown)
        unchanging = {k: v for k, v in made.items() if k not in ("secret", "cursor")}
        assert {k: v for k, v in ok(client.get(f"{hooks(org)}/{made['id']}")).items() if k != "cursor"} == unchanging
    for method, path in [("GET", hooks(org)), ("POST", hooks(org)), ("GET", f"{hooks(org)}/{made['id']}"),
                         ("PATCH", f"{hooks(org)}/{made['id']}"), ("DELETE", f"{hooks(org)}/{made['id']}"),
                         ("POST", f"{hooks(org)}/{made['id']}/enable"), ("GET", f"{hooks(org)}/{made['id']}/deliveries")]:
        body = {"url": receiver.url("/viewer")} if method in ("POST", "PATCH") else None
        refused(org.viewer.request(method, path, json=body), 403)
    # Changes: the URL, the kinds, the secret (not shown back).
    changed = ok(org.member.patch(f"{hooks(org)}/{own['id']}", json={"url": receiver.url("/moved"), "kinds": ["channel.created"]}))
    assert changed["url"] == receiver.url("/moved") and changed["kinds"] == ["channel.created"] and "secret" not in changed
    rotated = ok(org.member.patch(f"{hooks(org)}/{own['id']}", json={"secret": "another secret, long enough"}))
    assert "secret" not in rotated and rotated["url"] == receiver.url("/moved")
    channel = new_channel(org.member, org.org_id)
    (request,) = receiver.wait_for(1)
    assert request.path == "/moved"
    assert [event["detail"]["channel_id"] for event in request.verified("another secret, long enough")["events"]] == [channel["id"]]
    # Deleted: gone, and nothing more is delivered to it.
    assert org.member.delete(f"{hooks(org)}/{own['id']}").status_code == 204
    refused(org.admin.get(f"{hooks(org)}/{own['id']}"), 404)
    refused(org.admin.delete(f"{hooks(org)}/{own['id']}"), 404)
    assert [entry["id"] for entry in ok(org.admin.get(hooks(org)))] == [made["id"]]
    new_channel(org.member, org.org_id)
    time.sleep(1.5)
    assert len(receiver.requests) == 1
    # Every change is an event, none with a secret, a path or a query.
    kinds = [event["kind"] for event in org_events(org.admin, org.org_id, kind="webhook.")]
    assert sorted(kinds) == sorted(["webhook.created"] * 2 + ["webhook.updated"] * 2 + ["webhook.deleted"])
    text = json.dumps(org_events(org.admin, org.org_id))
    for hidden in (secret, "my own secret", "another secret", "/moved", "/own"):
        assert hidden not in text


def test_signed_batches_carry_the_selected_events_as_the_events_list_shows_them(
    hooks_server: ServerProcess, org: Tenant, receiver: Receiver
) -> None:
    made = new_hook(org, receiver.url(), kinds=["device.", "bootstrap.succeeded"])
    version = ok(httpx.get(f"{hooks_server.url}/health"))["version"]
    external_id, key = unique("ext"), unique("key")
    device = new_device(org.member, org.org_id, name=unique("dev"), external_id=external_id, external_key=key, state=1)
    new_channel(org.member, org.org_id)  # skipped by the kinds
    for authorization in (f"Client {key}", "Client wrong"):  # a success (delivered) and a refusal (skipped)
        httpx.get(f"{hooks_server.url}/clients/bootstrap/{external_id}", headers={"Authorization": authorization}, timeout=30)
    assert org.member.patch(f"/api/v1/orgs/{org.org_id}/devices/{device['id']}", json={"alias": "x"}).status_code == 200
    delivered = receiver.events(made["secret"], 3)
    assert [event["kind"] for event in delivered] == ["device.created", "bootstrap.succeeded", "device.updated"]
    events = listed(org)
    assert all(event == events[event["id"]] for event in delivered)
    requests = receiver.requests
    log = {entry["id"]: entry for entry in deliveries(org, made["id"])}
    for request in requests:
        body = request.verified(made["secret"])
        assert set(body) == {"webhook_id", "events"} and body["webhook_id"] == made["id"]
        assert request.path == "/hook" and request.headers["x-pilotboat-webhook"] == made["id"]
        assert request.headers["user-agent"] == f"pilotboat/{version}"
        entry = log[int(request.headers["x-pilotboat-delivery"])]
        assert entry["outcome"] == "delivered" and entry["status_code"] == 200 and entry["attempt"] == 1
        assert (entry["first_event_id"], entry["last_event_id"], entry["events"]) == (
            body["events"][0]["id"], body["events"][-1]["id"], len(body["events"]),
        )
    # The cursor passes the skipped events too.
    wait_until(lambda: hook(org, made["id"])["cursor"] >= max(events), what="the cursor at the newest event")
    assert hook(org, made["id"])["consecutive_failures"] == 0


def test_failed_deliveries_are_retried_with_growing_pauses(hooks_server: ServerProcess, org: Tenant) -> None:
    receiver = Receiver(500, SLOW, 307, 503, slow_seconds=TIMEOUT + 1)
    try:
        made = new_hook(org, receiver.url())
        assert made["kinds"] == []  # every kind
        channel = new_channel(org.member, org.org_id)
        requests = receiver.wait_for(5, timeout=30)
        bodies = [request.verified(made["secret"]) for request in requests]
        # The same event each time, and only to the webhook's URL: the redirect is not followed.
        assert all([event["detail"]["channel_id"] for event in body["events"]] == [channel["id"]] for body in bodies)
        assert [request.path for request in requests] == ["/hook"] * 5
        gaps = [later.at - earlier.at for earlier, later in zip(requests, requests[1:])]
        expected = [BACKOFF_INITIAL, TIMEOUT + 2 * BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_MAX]
        for gap, least in zip(gaps, expected):
            assert least * 0.9 <= gap < least + 2, (gaps, expected)
        log = wait_until(lambda: (found := deliveries(org, made["id"])) and found[0]["outcome"] == "delivered" and found,
                         what="the delivered attempt in the log")
        assert [entry["outcome"] for entry in log] == ["delivered", "failed", "failed", "failed", "failed"]
        assert [entry["attempt"] for entry in log] == [5, 4, 3, 2, 1]
        assert [entry["status_code"] for entry in log] == [200, 503, 307, None, 500]
        assert [entry["error"] for entry in log] == [None, "HTTP 503", "HTTP 307", f"no answer within {TIMEOUT:g} s", "HTTP 500"]
        assert len({request.headers["x-pilotboat-delivery"] for request in requests}) == 5
        assert [int(request.headers["x-pilotboat-delivery"]) for request in requests] == [entry["id"] for entry in reversed(log)]
        state = hook(org, made["id"])
        assert state["consecutive_failures"] == 0 and state["failing_since"] is None and state["active"] is True
        assert state["cursor"] >= bodies[-1]["events"][-1]["id"]
    finally:
        receiver.close()


def test_persistent_failure_disables_the_webhook_until_enabled(hooks_server: ServerProcess, org: Tenant) -> None:
    receiver = Receiver()
    receiver.always = 500
    try:
        made = new_hook(org, receiver.url(), kinds=["channel."])
        channel = new_channel(org.member, org.org_id)
        receiver.wait_for(MAX_FAILURES, timeout=30)
        state = wait_until(lambda: (found := hook(org, made["id"]))["active"] is False and found, what="disabled")
        assert state["consecutive_failures"] == MAX_FAILURES and state["disabled_at"]
        assert state["disabled_reason"].startswith(f"{MAX_FAILURES} deliveries in a row failed; the last: HTTP 500")
        time.sleep(BACKOFF_MAX * 2)
        assert len(receiver.requests) == MAX_FAILURES, "delivered to a disabled webhook"
        (disabled,) = org_events(org.admin, org.org_id, kind="webhook.disabled")
        assert disabled["detail"]["webhook_id"] == made["id"] and disabled["reason"] == state["disabled_reason"]
        assert disabled["actor"] == "system" and disabled["detail"]["host"] == "127.0.0.1"
        # The log keeps the newest attempts only.
        log = deliveries(org, made["id"])
        assert [entry["attempt"] for entry in log] == list(range(MAX_FAILURES, MAX_FAILURES - LOG_SIZE, -1))
        assert all(entry["outcome"] == "failed" and entry["status_code"] == 500 for entry in log)
        # Enabled again: failures forgotten, the waiting events delivered.
        receiver.always = 200
        enabled = ok(org.admin.post(f"{hooks(org)}/{made['id']}/enable"))
        assert enabled["active"] is True and enabled["consecutive_failures"] == 0 and enabled["disabled_reason"] is None
        later = new_channel(org.member, org.org_id)
        delivered = receiver.events(made["secret"], 2)
        assert [event["detail"]["channel_id"] for event in delivered] == [channel["id"], later["id"]]
        assert [event["kind"] for event in org_events(org.admin, org.org_id, kind="webhook.")][0] == "webhook.enabled"
        log = deliveries(org, made["id"])
        assert len(log) == LOG_SIZE and log[0]["outcome"] == "delivered"
        # Enabling an active webhook changes nothing.
        again = ok(org.admin.post(f"{hooks(org)}/{made['id']}/enable"))
        assert again["active"] is True
        assert [event["kind"] for event in org_events(org.admin, org.org_id, kind="webhook.")].count("webhook.enabled") == 1
    finally:
        receiver.close()


def test_registration_events_reach_the_stream_and_the_webhook(
    hooks_server: ServerProcess, org: Tenant, receiver: Receiver
) -> None:
    """Events written in batches by the management server (not in a request's transaction) go out
    both ways like the others."""
    endpoint, device_id = make_device(org)
    made = new_hook(org, receiver.url(), kinds=["lwm2m."])

    async def register_and_leave() -> None:
        context = await aiocoap.Context.create_client_context()
        try:
            uri = f"{hooks_server.lwm2m_uri}/rd?ep={endpoint}&lt=300&lwm2m=1.1&b=U"
            created = await coap_request(context, Code.POST, uri, b"</1/0>,</3/0>")
            assert created.code == Code.CREATED, created
            location = "/".join(created.opt.location_path)
            gone = await coap_request(context, Code.DELETE, f"{hooks_server.lwm2m_uri}/{location}")
            assert gone.code == Code.DELETED, gone
        finally:
            await context.shutdown()

    with open_stream(hooks_server, org.viewer, org.org_id, params={"kind": "lwm2m."}) as stream:
        asyncio.run(register_and_leave())
        streamed = [message.json for message in stream.events(2)]
    assert [event["kind"] for event in streamed] == ["lwm2m.registered", "lwm2m.deregistered"]
    assert all(event["device_id"] == device_id for event in streamed)
    assert streamed[0]["detail"]["endpoint"] == streamed[0]["detail"]["original_endpoint"] == endpoint
    assert receiver.events(made["secret"], 2) == streamed
    events = listed(org)
    assert all(event == events[event["id"]] for event in streamed)


def test_a_dead_receiver_does_not_hold_up_another(hooks_server: ServerProcess, org: Tenant, receiver: Receiver) -> None:
    dead = Receiver(slow_seconds=30)
    dead.always = SLOW
    try:
        stuck = new_hook(org, dead.url())
        fine = new_hook(org, receiver.url())
        for count in range(1, 4):
            started = time.monotonic()
            new_channel(org.member, org.org_id)
            receiver.events(fine["secret"], count, timeout=10)
            assert time.monotonic() - started < TIMEOUT, "the live webhook waited for the dead one"
        assert dead.requests, "the dead receiver was never tried"
        assert hook(org, stuck["id"])["active"] is True
    finally:
        dead.close()


def test_organisations_get_only_their_own_events(
    hooks_server: ServerProcess, org: Tenant, root_client: Api, receiver: Receiver
) -> None:
    other = make_tenant(hooks_server.url, root_client)
    try:
        made = new_hook(org, receiver.url())
        new_channel(other.member, other.org_id)
        mine = new_channel(org.member, org.org_id)
        new_channel(other.member, other.org_id)
        (event,) = receiver.events(made["secret"], 1)
        assert event["detail"]["channel_id"] == mine["id"] and event["org_id"] == org.org_id
        time.sleep(1.5)
        assert {e["org_id"] for r in receiver.requests for e in r.verified(made["secret"])["events"]} == {org.org_id}
        # Another organisation's callers do not see or touch the webhook.
        for method in ("GET", "PATCH", "DELETE"):
            refused(other.admin.request(method, f"{hooks(org)}/{made['id']}", json={"kinds": []} if method == "PATCH" else None), 404)
            refused(other.admin.request(method, f"{hooks(other)}/{made['id']}", json={"kinds": []} if method == "PATCH" else None), 404)
        refused(other.admin.get(f"{hooks(other)}/{made['id']}/deliveries"), 404)
        refused(other.admin.post(f"{hooks(other)}/{made['id']}/enable"), 404)
        assert ok(other.admin.get(hooks(other))) == []
        assert hook(org, made["id"])["kinds"] == []
    finally:
        other.close()


def test_bad_input_is_refused_and_changes_nothing(hooks_server: ServerProcess, org: Tenant, receiver: Receiver) -> None:
    made = new_hook(org, receiver.url())
    before_hooks, before_events = ok(org.admin.get(hooks(org))), listed(org)
    attempts: list[tuple[str, str, Any, int, str | None]] = [
        ("POST", "", {"url": "ftp://example.com/hook"}, 400, "url"),
        ("POST", "", {"url": "not a url"}, 400, "url"),
        ("POST", "", {"url": "example.com/hook"}, 400, "url"),
        ("POST", "", {"url": "http://"}, 400, "url"),
        ("POST", "", {"url": "http://user:password@example.com/hook"}, 400, "url"),
        ("POST", "", {"url": "https://example.com/hook#part"}, 400, "url"),
        ("POST", "", {"url": "https://example.com:99999/hook"}, 400, "url"),
        ("POST", "", {"url": "https://example.com/" + "x" * 2048}, 400, "url"),
        ("POST", "", {"url": 5}, 422, "url"),
        ("POST", "", {}, 422, "url"),
        ("POST", "", {"url": receiver.url(), "kinds": "device."}, 422, "kinds"),
        ("POST", "", {"url": receiver.url(), "kinds": [1]}, 422, "kinds.0"),
        ("POST", "", {"url": receiver.url(), "kinds": ["has space"]}, 400, "kinds"),
        ("POST", "", {"url": receiver.url(), "secret": "short"}, 400, "secret"),
        ("POST", "", {"url": receiver.url(), "secret": 12345678901234567890}, 422, "secret"),
        ("POST", "", {"url": receiver.url(), "secret": None}, 422, "secret"),
        ("POST", "", {"url": receiver.url(), "active": False}, 422, "active"),
        ("PATCH", f"/{made['id']}", {"url": "gopher://example.com"}, 400, "url"),
        ("PATCH", f"/{made['id']}", {"url": None}, 422, "url"),
        ("PATCH", f"/{made['id']}", {"kinds": ["ok.", ""]}, 400, "kinds"),
        ("PATCH", f"/{made['id']}", {"cursor": 0}, 422, "cursor"),
        ("PATCH", f"/{uuid.uuid4()}", {"kinds": []}, 404, None),
        ("GET", f"/{uuid.uuid4()}", None, 404, None),
        ("DELETE", f"/{uuid.uuid4()}", None, 404, None),
        ("POST", f"/{uuid.uuid4()}/enable", None, 404, None),
        ("GET", f"/{uuid.uuid4()}/deliveries", None, 404, None),
        ("GET", f"/{made['id']}/deliveries?limit=0", None, 422, "limit"),
    ]
    for method, path, body, status, field in attempts:
        refused(org.admin.request(method, hooks(org) + path, json=body), status, field)
    refused(org.admin.post(f"/api/v1/orgs/{uuid.uuid4()}/webhooks", json={"url": receiver.url()}), 404)
    assert ok(org.admin.get(hooks(org))) == before_hooks
    assert listed(org) == before_events


def test_private_addresses_are_refused_unless_allowed(server: ServerProcess, tenant: Tenant) -> None:
    """The shared server runs with the default settings."""
    for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/hook", "http://10.1.2.3/hook",
                "http://169.254.169.254/latest", "http://192.168.0.1/"):
        detail = refused(tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/webhooks", json={"url": url}), 400, "url")
        assert "PILOTBOAT_WEBHOOK_ALLOW_PRIVATE" in detail
    assert ok(tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/webhooks")) == []
    # A name is accepted; where it leads is checked at each delivery.
    made = new_hook(tenant, "https://hooks.invalid/pilotboat")
    assert made["active"] is True


def test_the_secret_appears_nowhere_after_creation(hooks_server: ServerProcess, org: Tenant, receiver: Receiver) -> None:
    made = new_hook(org, receiver.url())
    new_channel(org.member, org.org_id)
    receiver.events(made["secret"], 1)
    shown = [
        org.admin.get(hooks(org)).text, org.admin.get(f"{hooks(org)}/{made['id']}").text,
        org.admin.get(f"{hooks(org)}/{made['id']}/deliveries").text,
        org.admin.get(f"/api/v1/orgs/{org.org_id}/events", params={"limit": 500}).text,
        org.admin.post(f"{hooks(org)}/{made['id']}/enable").text,
        org.admin.patch(f"{hooks(org)}/{made['id']}", json={"kinds": ["channel."]}).text,
        hooks_server.log(),
    ]
    for text in shown:
        assert made["secret"] not in text
    # Nor in what is sent.
    for request in receiver.requests:
        assert made["secret"].encode() not in request.body


def test_the_failing_time_limit_disables_too(server_factory: Any) -> None:
    process = server_factory("sqlite", **{**SETTINGS, "PILOTBOAT_WEBHOOK_MAX_FAILURES": "1000",
                                          "PILOTBOAT_WEBHOOK_MAX_FAILING_SECONDS": "1.5"})
    process.start()
    receiver = Receiver()
    receiver.always = 503
    root = Api.login(process.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    tenant = make_tenant(process.url, root)
    try:
        made = new_hook(tenant, receiver.url())
        new_channel(tenant.member, tenant.org_id)
        state = wait_until(lambda: (found := hook(tenant, made["id"]))["active"] is False and found, what="disabled")
        assert "deliveries failed for" in state["disabled_reason"] and "HTTP 503" in state["disabled_reason"]
        assert 3 <= state["consecutive_failures"] < 20
        first, last = receiver.requests[0].at, receiver.requests[-1].at
        assert last - first >= 1.5
    finally:
        tenant.close()
        root.close()
        receiver.close()
        process.stop()


def test_two_nodes_deliver_one_webhook_without_losing_events(postgres: PostgresCluster, receiver: Receiver) -> None:
    """Both nodes of one database deliver the webhook; every event arrives, the cursor ends at the newest."""
    database_url = postgres.new_database()
    master_key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    nodes = [ServerProcess(database_url, extra_env={**SETTINGS, "PILOTBOAT_MASTER_KEY": master_key}) for _ in range(2)]
    clients: list[Api] = []
    try:
        for node in nodes:
            node.start()
        root = Api.login(nodes[0].url, ADMIN_EMAIL, ADMIN_PASSWORD)
        clients.append(root)
        tenant = make_tenant(nodes[0].url, root)
        made = new_hook(tenant, receiver.url())
        second = Api.login(nodes[1].url, ADMIN_EMAIL, ADMIN_PASSWORD)
        clients.append(second)
        channels = [new_channel(second if number % 2 else root, tenant.org_id)["id"] for number in range(30)]
        delivered = receiver.events(made["secret"], 30, timeout=30)
        assert [event["detail"]["channel_id"] for event in delivered] == channels
        newest = max(event["id"] for event in delivered)
        wait_until(lambda: hook(tenant, made["id"])["cursor"] >= newest, what="the cursor at the newest event")
        wait_until(lambda: all(entry["outcome"] == "delivered" for entry in deliveries(tenant, made["id"])),
                   what="every attempt delivered")
        tenant.close()
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()
