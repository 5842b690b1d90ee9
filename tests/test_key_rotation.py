"""Master-key rotation with ``pilotboat keys`` while a server keeps serving, on each database backend.

A server with the key file in its data dir holds one value in every sealed column (a device secret and
client key, generated and imported CA keys, a kept device key, a PSK). ``keys rotate`` runs while a
background client keeps bootstrapping the device and issuing certificates (both open sealed values, the
second also seals one): no request may fail, every stored value must end up under the new key, and
``keys prune`` then leaves the new key alone in the file and a restarted server reads everything. Also:
prune refuses while a value still needs an old key, the environment keyring, a wrong master key, and
the sealing primitive itself.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select

from compat_helpers import new_channel, new_device, unique
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, make_tenant
from pilotboat.security import pki
from pilotboat.security.sealing import (
    KEY_FILE_NAME,
    RELOAD_INTERVAL,
    Sealer,
    SealError,
    key_id,
    load_master_keys,
    read_key_file,
    sealed_key_id,
    write_key_file,
)
from pilotboat.services.devices import SECRET_PURPOSE
from pilotboat.services.psks import PSK_KEY_PURPOSE
from pilotboat.services.keyring import SEALED_COLUMNS
from pilotboat.store import database

# --- helpers -------------------------------------------------------------------------------------


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr)
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, (result.args, result.returncode, result.stdout, result.stderr)
    said = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in said, (needle, result.stderr)
    return said


def json_ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (response.request.method, str(response.request.url), response.text)
    return response.json()


def random_key() -> bytes:
    return os.urandom(32)


def encoded(*keys: bytes) -> str:
    return ",".join(base64.b64encode(key).decode() for key in keys)


def file_keys(server: ServerProcess) -> tuple[bytes, ...]:
    return read_key_file(server.data_dir / KEY_FILE_NAME)


def sealed_values(server: ServerProcess) -> dict[str, list[tuple[str, str]]]:
    """Every sealed value in the server's database: column -> [(purpose, value)]."""
    url = server.database_url or f"sqlite+aiosqlite:///{(server.data_dir / 'pilotboat.db').resolve()}"

    async def read() -> dict[str, list[tuple[str, str]]]:
        engine = database.create_engine(url)
        try:
            async with engine.connect() as connection:
                found = {}
                for sealed in SEALED_COLUMNS:
                    result = await connection.execute(select(sealed.column).where(sealed.column.is_not(None)))
                    found[sealed.name] = [(sealed.purpose, value) for (value,) in result]
                return found
        finally:
            await engine.dispose()

    return asyncio.run(read())


def assert_all_sealed_under(server: ServerProcess, key: bytes, *, other: bytes) -> int:
    """Every stored value is sealed under ``key``, opens with it alone and not with ``other``; returns how many."""
    only, wrong = Sealer((key,)), Sealer((other,))
    found = sealed_values(server)
    assert all(found.values()), {column: len(values) for column, values in found.items()}  # every column is exercised
    for column, values in found.items():
        for purpose, value in values:
            assert sealed_key_id(value) == key_id(key), (column, value[:16])
            only.open_bytes(value, purpose)
            with pytest.raises(SealError):
                wrong.open_bytes(value, purpose)
    return sum(len(values) for values in found.values())


def census_rows(status_output: str) -> dict[tuple[str, str], int]:
    """(column, key id) -> count from the second table of ``keys status``."""
    found = {}
    for line in status_output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if line.startswith("│") and len(cells) == 3 and "." in cells[0]:
            found[(cells[0], cells[1])] = int(cells[2])
    return found


class Deployment:
    """A tenant with one value in every sealed column, and a device that bootstraps."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.root = Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
        self.tenant = make_tenant(server.url, self.root)
        self.org = self.tenant.org_id
        admin = self.tenant.admin
        json_ok(admin.patch(f"/api/v1/orgs/{self.org}", json={"keep_device_keys": True}))
        channel = new_channel(admin, self.org)
        self.external_id, self.external_key = unique(), unique("key")
        self.device = new_device(
            admin, self.org, name="rotating", external_id=self.external_id, external_key=self.external_key,
            client_key="client-key-sealed-at-rest", content="{}", channels=[channel["id"]], state=1,
        )
        self.first_answer = self.bootstrap()
        assert self.first_answer["client_key"] == "client-key-sealed-at-rest"
        self.issue()
        json_ok(admin.post(f"/api/v1/orgs/{self.org}/devices/{self.device['id']}/psks"), 201)
        own = pki.generate_ca("imported")  # an organisation's own CA, with a parent
        json_ok(admin.post(f"/api/v1/orgs/{self.org}/cas", json={
            "certificate": pki.certificate_pem(own.certificate), "private_key": pki.key_pem(own.key),
            "chain": pki.chain_pem(own.parents),
        }), 201)
        json_ok(admin.post(f"/api/v1/orgs/{self.org}/webhooks", json={"url": "https://hooks.invalid/rotation"}), 201)

    def bootstrap(self, client: httpx.Client | None = None) -> dict[str, Any]:
        get = client.get if client else httpx.get
        url = f"{self.server.url}/clients/bootstrap/{self.external_id}"
        return json_ok(get(url, headers={"Authorization": f"Client {self.external_key}"}, timeout=30))

    def assert_bootstraps(self, client: httpx.Client | None = None) -> None:
        """The bootstrap answer still carries the device's secrets (both sealed at rest)."""
        fields = ("client_id", "client_secret", "client_key")
        answer = self.bootstrap(client)
        assert [answer[name] for name in fields] == [self.first_answer[name] for name in fields], answer

    def issue(self, client: Api | None = None) -> dict[str, Any]:
        client = client or self.tenant.admin
        issued = json_ok(client.post(f"/api/v1/orgs/{self.org}/devices/{self.device['id']}/certificates"), 201)
        assert issued["key_kept"] is True and issued["private_key_pem"]
        return issued

    def close(self) -> None:
        self.tenant.close()
        self.root.close()


class Traffic(threading.Thread):
    """Keeps bootstrapping the device and issuing certificates, recording every failure."""

    def __init__(self, deployment: Deployment, token: str) -> None:
        super().__init__(daemon=True)
        self.deployment, self.token = deployment, token
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.rounds = 0

    def run(self) -> None:
        with httpx.Client(timeout=30) as device, Api(self.deployment.server.url, self.token) as api:
            while not self.stopping.is_set():
                try:
                    self.deployment.assert_bootstraps(device)
                    self.deployment.issue(api)
                except (AssertionError, httpx.HTTPError) as exc:
                    self.failures.append(repr(exc))
                self.rounds += 1

    def wait_for(self, rounds: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.rounds < rounds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.rounds >= rounds, f"only {self.rounds} rounds of traffic: {self.failures}"

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


# --- rotation while serving --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rotate_and_prune_while_serving(server_factory: Any, backend: str) -> None:
    server: ServerProcess = server_factory(backend)
    server.start()
    deployment = Deployment(server)
    try:
        (old,) = file_keys(server)
        token_before = deployment.tenant.admin.headers["Authorization"].removeprefix("Bearer ")
        stored = assert_all_sealed_under(server, old, other=random_key())

        traffic = Traffic(deployment, token_before)
        traffic.start()
        try:
            traffic.wait_for(3)
            rounds_before = traffic.rounds
            rotated = server.cli("keys", "rotate")
            rounds_during = traffic.rounds - rounds_before
            traffic.wait_for(traffic.rounds + 3)
        finally:
            traffic.stop()
        said = ok(rotated)
        assert traffic.failures == [], traffic.failures
        assert rounds_during >= 3, "the traffic did not run during the rotation"

        new, kept = file_keys(server)
        assert kept == old and new != old
        assert key_id(new) in said and "keys prune" in " ".join(said.split())
        # Everything, including what the traffic sealed meanwhile, is under the new key.
        assert assert_all_sealed_under(server, new, other=old) > stored
        status = ok(server.cli("keys", "status"))
        assert {kid for _, kid in census_rows(status)} == {key_id(new)}
        assert f"{key_id(old)} │ opens only" in status

        # The server keeps working, and a token issued before the rotation still does.
        deployment.assert_bootstraps()
        deployment.issue()
        with Api(server.url, token_before) as before:
            json_ok(before.get("/api/v1/me"))
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as fresh:
            json_ok(fresh.get("/api/v1/orgs"))

        pruned = ok(server.cli("keys", "prune"))
        assert file_keys(server) == (new,)
        assert key_id(old) in pruned
        assert "nothing to prune" in ok(server.cli("keys", "prune"))

        server.restart()
        deployment.assert_bootstraps()
        with Api(server.url, token_before) as before:  # signed under the pruned key: log in again
            assert before.get("/api/v1/me").status_code == 401
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as fresh:
            deployment.issue(fresh)
            assert len(json_ok(fresh.get(f"/api/v1/orgs/{deployment.org}/psks"))["psks"]) == 1
        assert_all_sealed_under(server, new, other=old)
    finally:
        deployment.close()
        server.stop()


def test_prune_refuses_while_a_value_needs_an_old_key(server_factory: Any) -> None:
    server: ServerProcess = server_factory("sqlite")
    server.start()
    deployment = Deployment(server)
    try:
        (old,) = file_keys(server)
        new = random_key()
        write_key_file(server.data_dir / KEY_FILE_NAME, (new, old))  # a new key, nothing re-sealed yet
        written_at = time.monotonic()
        content = (server.data_dir / KEY_FILE_NAME).read_bytes()

        refused(server.cli("keys", "prune"), key_id(old), "nothing was removed", "keys rotate --reseal-only")
        assert (server.data_dir / KEY_FILE_NAME).read_bytes() == content
        status = ok(server.cli("keys", "status"))
        assert {kid for _, kid in census_rows(status)} == {key_id(old)}
        assert f"{key_id(new)} │ seals and opens" in status

        # The running server signs new access tokens under the new key once it has re-read the file.
        time.sleep(max(0.0, written_at + RELOAD_INTERVAL + 0.2 - time.monotonic()))
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as fresh:
            assert jwt.get_unverified_header(fresh.headers["Authorization"].removeprefix("Bearer "))["kid"] == key_id(new)

        ok(server.cli("keys", "rotate", "--reseal-only"))
        assert (server.data_dir / KEY_FILE_NAME).read_bytes() == content  # no key generated
        assert_all_sealed_under(server, new, other=old)
        ok(server.cli("keys", "prune"))
        assert file_keys(server) == (new,)
        # The running server follows the file: secrets open, and once it has re-read the file, tokens signed
        # under the dropped key are refused.
        deployment.assert_bootstraps()
        time.sleep(RELOAD_INTERVAL + 0.2)
        assert deployment.tenant.admin.get("/api/v1/me").status_code == 401
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as fresh:
            deployment.issue(fresh)
    finally:
        deployment.close()
        server.stop()


def test_rotation_with_the_environment_keyring(server_factory: Any) -> None:
    old, new = random_key(), random_key()
    server: ServerProcess = server_factory("sqlite", PILOTBOAT_MASTER_KEY=encoded(old))
    server.start()
    deployment = Deployment(server)
    try:
        assert not (server.data_dir / KEY_FILE_NAME).exists()
        said = ok(server.cli("keys", "rotate"))  # one key in the variable: nothing to rotate to
        assert "put a new key first" in " ".join(said.split())
        assert_all_sealed_under(server, old, other=new)

        server.extra_env["PILOTBOAT_MASTER_KEY"] = encoded(new, old)  # the operator's step on every node
        server.restart()
        token_before = deployment.tenant.admin.headers["Authorization"].removeprefix("Bearer ")
        refused(server.cli("keys", "prune"), "nothing was removed", "'pilotboat keys rotate'")
        said = ok(server.cli("keys", "rotate"))
        assert key_id(new) in said and not (server.data_dir / KEY_FILE_NAME).exists()
        assert_all_sealed_under(server, new, other=old)
        advice = " ".join(ok(server.cli("keys", "prune")).split())
        assert key_id(old) in advice and "PILOTBOAT_MASTER_KEY" in advice
        with Api(server.url, token_before) as before:
            json_ok(before.get("/api/v1/me"))

        server.extra_env["PILOTBOAT_MASTER_KEY"] = encoded(new)
        server.restart()
        deployment.assert_bootstraps()
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as fresh:
            deployment.issue(fresh)
    finally:
        deployment.close()
        server.stop()


def test_a_wrong_master_key_is_refused(server_factory: Any) -> None:
    server: ServerProcess = server_factory("sqlite")
    server.start()
    server.stop()
    (right,) = file_keys(server)
    wrong = random_key()
    server.extra_env["PILOTBOAT_MASTER_KEY"] = encoded(wrong)
    with pytest.raises(RuntimeError) as refusal:
        server.start(timeout=20)
    message = str(refusal.value)
    assert "exited with" in message and key_id(right) in message and key_id(wrong) in message
    # The CLI refuses too, and the status names the missing key.
    refused(server.cli("credentials", "ca", "show", "default"), key_id(right), "PILOTBOAT_MASTER_KEY")
    status = server.cli("keys", "status")
    assert status.returncode == 1 and f"{key_id(right)} │ MISSING" in status.stdout, status
    server.extra_env.pop("PILOTBOAT_MASTER_KEY")
    server.start()
    server.stop()


# --- the sealing primitive ---------------------------------------------------------------------------


def test_sealed_values_are_bound_to_their_key_and_purpose(tmp_path: Path) -> None:
    first, second = random_key(), random_key()
    sealed = Sealer((first,)).seal("a device secret", SECRET_PURPOSE)
    assert sealed_key_id(sealed) == key_id(first)
    with pytest.raises(SealError, match=key_id(first)):
        Sealer((second,)).open(sealed, SECRET_PURPOSE)
    assert Sealer((second, first)).open(sealed, SECRET_PURPOSE) == "a device secret"
    with pytest.raises(SealError, match="authentication"):
        Sealer((first,)).open(sealed, PSK_KEY_PURPOSE)  # a secret of one kind cannot pass for another
    prefix, kid, body = sealed.split(".", 2)
    blob = bytearray(base64.b64decode(body))
    blob[-1] ^= 1
    with pytest.raises(SealError, match="authentication"):
        Sealer((first,)).open(f"{prefix}.{kid}.{base64.b64encode(bytes(blob)).decode()}", SECRET_PURPOSE)
    with pytest.raises(SealError):
        Sealer((first,)).open("not sealed", SECRET_PURPOSE)
    resealed = Sealer((second, first)).reseal(sealed, SECRET_PURPOSE)
    assert sealed_key_id(resealed) == key_id(second)
    assert Sealer((second,)).open(resealed, SECRET_PURPOSE) == "a device secret"

    # A keyring read from a file follows the file when it changes.
    path = tmp_path / KEY_FILE_NAME
    write_key_file(path, (first,))
    assert path.stat().st_mode & 0o777 == 0o600
    follower = Sealer(load_master_keys(None, tmp_path))
    write_key_file(path, (second, first))
    follower.refresh(force=True)
    assert (follower.key_id, follower.key_ids) == (key_id(second), (key_id(second), key_id(first)))
    assert sealed_key_id(follower.seal("x", "p")) == key_id(second)
