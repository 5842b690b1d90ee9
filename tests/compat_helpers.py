"""Helpers shared by the Magistrala, Mainflux 0.13 and secure-bootstrap tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from harness import Api

KAT_PATH = Path(__file__).parent / "vectors" / "secure-bootstrap-kat.json"


def unique(prefix: str = "ext") -> str:
    """A value no other test uses (external ids are unique across the whole deployment)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def load_vectors() -> list[dict[str, Any]]:
    return json.loads(KAT_PATH.read_text(encoding="utf-8"))["vectors"]


# --- native API ---------------------------------------------------------------------------------


def new_channel(client: Api, org_id: str, name: str | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post(f"/api/v1/orgs/{org_id}/channels", json={"name": name or unique("chan"), "metadata": metadata or {}})
    assert response.status_code == 201, response.text
    return response.json()


def new_device(client: Api, org_id: str, **fields: Any) -> dict[str, Any]:
    response = client.post(f"/api/v1/orgs/{org_id}/devices", json=fields)
    assert response.status_code == 201, response.text
    return response.json()


def native_device(client: Api, org_id: str, device_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/orgs/{org_id}/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def connections(client: Api, org_id: str, device_id: str) -> dict[str, bool]:
    """channel id -> connected, as the native API reports it."""
    return {link["id"]: link["connected"] for link in native_device(client, org_id, device_id)["channels"]}


def org_events(client: Api, org_id: str, **params: Any) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/orgs/{org_id}/events", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return response.json()["events"]


def system_events(root: Api, **params: Any) -> list[dict[str, Any]]:
    response = root.get("/api/v1/events", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return response.json()["events"]


def by_device_actor(events: list[dict[str, Any]], external_id: str) -> list[dict[str, Any]]:
    return [event for event in events if event["actor"] == f"device:{external_id}"]


# --- device side --------------------------------------------------------------------------------


def device_get(base_url: str, path: str, authorization: str | None) -> httpx.Response:
    """A request as a device sends it: no bearer token, at most one Authorization header."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(base_url + path, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int, key: str) -> str:
    """The response is ``status`` with a JSON body ``{key: "<non-empty message>"}``; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get(key), str) and body[key], body
    return body[key]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pilotboat bootstrap ARGS`` in a subprocess, with no server settings inherited."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PILOTBOAT_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "pilotboat.cli.main", "bootstrap", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
