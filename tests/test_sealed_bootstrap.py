"""Sealed bootstrap: the authenticated, replay-protected route beside the legacy secure one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from cryptography.exceptions import InvalidTag

from harness import ENCRYPT_KEY, Api, ServerProcess, Tenant
from pilotboat.security import sealed_bootstrap
from pilotboat.security.sealed_bootstrap import ReplayGuard, SealedRequestError, open_request, seal_request

KEY = ENCRYPT_KEY.encode()


# --- the scheme, without a server ---------------------------------------------------------------


def test_request_round_trip_and_single_use() -> None:
    guard = ReplayGuard()
    token, nonce = seal_request(KEY, "dev-1", "s3cret")
    opened = open_request(KEY, "dev-1", token, guard)
    assert (opened.external_key, opened.nonce) == ("s3cret", nonce)
    with pytest.raises(SealedRequestError, match="already used"):
        open_request(KEY, "dev-1", token, guard)


def test_request_is_bound_to_external_id_and_key() -> None:
    token, _ = seal_request(KEY, "dev-1", "s3cret")
    with pytest.raises(SealedRequestError, match="authentication"):
        open_request(KEY, "dev-2", token, ReplayGuard())
    with pytest.raises(SealedRequestError, match="authentication"):
        open_request(b"x" * 32, "dev-1", token, ReplayGuard())


def test_tampered_and_garbage_tokens_are_refused() -> None:
    token, _ = seal_request(KEY, "dev-1", "s3cret")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (flipped, "", "!!!", "AAAA"):
        with pytest.raises(SealedRequestError):
            open_request(KEY, "dev-1", bad, ReplayGuard())


def test_stale_and_future_timestamps_are_refused() -> None:
    now = time.time()
    for skew in (-sealed_bootstrap.MAX_CLOCK_SKEW_SECONDS - 5, sealed_bootstrap.MAX_CLOCK_SKEW_SECONDS + 5):
        token, _ = seal_request(KEY, "dev-1", "s3cret", now=now + skew)
        with pytest.raises(SealedRequestError, match="window"):
            open_request(KEY, "dev-1", token, ReplayGuard(), now=now)


def test_response_is_bound_to_its_request() -> None:
    body = sealed_bootstrap.seal_response(KEY, "dev-1", b"n" * 12, b'{"a":1}')
    assert sealed_bootstrap.open_response(KEY, "dev-1", b"n" * 12, body) == b'{"a":1}'
    with pytest.raises(InvalidTag):
        sealed_bootstrap.open_response(KEY, "dev-1", b"m" * 12, body)
    with pytest.raises(InvalidTag):
        sealed_bootstrap.open_response(KEY, "dev-2", b"n" * 12, body)


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(capacity=3)
    for index in range(10):
        assert guard.first_use(bytes([index]) * 12, now=1000.0)
    assert len(guard._seen) <= 3


# --- through the server --------------------------------------------------------------------------


def _active_config(tenant: Tenant) -> tuple[str, str, str]:
    channel = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/channels", json={"name": "c", "metadata": {"k": 1}})
    external_id, external_key = f"sealed-{uuid.uuid4().hex}", uuid.uuid4().hex
    created = tenant.admin.post(
        f"/{tenant.org_id}/clients/configs",
        json={"external_id": external_id, "external_key": external_key, "channels": [channel.json()["id"]], "content": "c1"},
    )
    assert created.status_code == 201, created.text
    device_id = created.headers["location"].rsplit("/", 1)[1]
    assert tenant.admin.put(f"/{tenant.org_id}/clients/state/{device_id}", json={"state": 1}).status_code == 200
    return device_id, external_id, external_key


def test_sealed_route_matches_plain_bootstrap(tenant: Tenant, anonymous: Api) -> None:
    device_id, external_id, external_key = _active_config(tenant)
    token, nonce = seal_request(KEY, external_id, external_key)
    response = anonymous.get(f"/clients/bootstrap/sealed/{external_id}", headers={"Authorization": f"Sealed {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    sealed = json.loads(sealed_bootstrap.open_response(KEY, external_id, nonce, response.content))
    plain = anonymous.get(f"/clients/bootstrap/{external_id}", headers={"Authorization": f"Client {external_key}"}).json()
    assert sealed == plain
    assert sealed["client_id"] == device_id

    replay = anonymous.get(f"/clients/bootstrap/sealed/{external_id}", headers={"Authorization": f"Sealed {token}"})
    assert replay.status_code == 403
    assert "already used" in replay.json()["message"]


def test_sealed_route_refusals(tenant: Tenant, anonymous: Api) -> None:
    _, external_id, external_key = _active_config(tenant)
    path = f"/clients/bootstrap/sealed/{external_id}"
    assert anonymous.get(path).status_code == 401
    assert anonymous.get(path, headers={"Authorization": f"Client {external_key}"}).status_code == 401
    wrong_key, _ = seal_request(KEY, external_id, "not-the-key")
    assert anonymous.get(path, headers={"Authorization": f"Sealed {wrong_key}"}).status_code == 403
    stale, _ = seal_request(KEY, external_id, external_key, now=time.time() - 3600)
    assert anonymous.get(path, headers={"Authorization": f"Sealed {stale}"}).status_code == 403
    other_device, _ = seal_request(KEY, "someone-else", external_key)
    assert anonymous.get(path, headers={"Authorization": f"Sealed {other_device}"}).status_code == 403
    events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": "bootstrap.failed"}).json()["events"]
    reasons = [event["reason"] for event in events]
    assert "wrong external key" in reasons
    assert any(reason.startswith("sealed token refused") for reason in reasons)


def test_cli_sealed(server: ServerProcess, tenant: Tenant) -> None:
    device_id, external_id, external_key = _active_config(tenant)
    command = [sys.executable, "-m", "pilotboat.cli.main", "bootstrap", "sealed", external_id, external_key, ENCRYPT_KEY,
               "--url", server.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["client_id"] == device_id
    command[6] = "wrong-key"
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "403" in refused.stderr
