"""Helpers shared by the LwM2M end-to-end tests: devices with endpoint names, waiting for events, and
raw CoAP requests from a real aiocoap client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiocoap

from harness import Api, Tenant


def make_device(tenant: Tenant, *, state: int = 1, endpoint: str | None = None) -> tuple[str, str]:
    """A device with an LwM2M endpoint name in the tenant's org: (endpoint, device id)."""
    endpoint = endpoint or f"urn:dev:{uuid.uuid4().hex[:12]}"
    created = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "sim", "endpoint": endpoint, "state": state})
    assert created.status_code == 201, created.text
    return endpoint, created.json()["id"]


def events_of(client: Api, org_id: str, device_id: str | None, kind: str, wait: float = 0, count: int = 1) -> list[dict[str, Any]]:
    """The org's events of ``kind`` (of ``device_id`` when given), newest first; waits up to ``wait``
    seconds for at least ``count`` of them."""
    deadline = time.monotonic() + wait
    params: dict[str, Any] = {"kind": kind, "limit": 100}
    if device_id is not None:
        params["device_id"] = device_id
    while True:
        page = client.get(f"/api/v1/orgs/{org_id}/events", params=params)
        assert page.status_code == 200, page.text
        items = page.json()["events"]
        if len(items) >= count or time.monotonic() >= deadline:
            return items
        time.sleep(0.2)


async def coap_request(
    context: aiocoap.Context, method: aiocoap.Code, uri: str, payload: bytes = b"", timeout: float = 10, **options: Any
) -> aiocoap.Message:
    message = aiocoap.Message(code=method, uri=uri, payload=payload, **options)
    return await asyncio.wait_for(context.request(message).response, timeout)


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking API call off the event loop, so that the simulated device keeps answering."""
    return await asyncio.to_thread(method, *args, **kwargs)


async def eventually(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await call(check)
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
