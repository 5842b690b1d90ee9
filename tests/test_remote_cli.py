"""The CLI commands that talk to a running server over HTTP (``pilotboat devices``, ``lwm2m``, ``events``):
the real CLI in a subprocess, without any database settings, against a real ``pilotboat serve`` and
simulated LwM2M devices registered with it over CoAP on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess, Tenant, free_port, make_tenant
from lwm2m_helpers import make_device
from pilotboat.sim import SimulatedDevice, Timing

#: Quick retransmissions for the simulated devices.
TIMING = Timing(ack_timeout=0.5, max_retransmit=2)


def run(coroutine: Any, limit: float = 120) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, limit)

    return asyncio.run(bounded())


def api_key(tenant: Tenant) -> str:
    """A new API key of the tenant's admin, restricted to its organisation."""
    created = tenant.admin.post("/api/v1/api-keys", json={"name": f"cli-{uuid.uuid4().hex[:6]}", "org_id": tenant.org_id})
    assert created.status_code == 201, created.text
    return created.json()["key"]


def token_of(client: Api) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def cli_env(url: str, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: the server's address and credentials, no database settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PILOTBOAT_")}
    env.update(PILOTBOAT_URL=url, COLUMNS="250", **extra)
    if token is not None:
        env["PILOTBOAT_TOKEN"] = token
    return env


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


async def cli(env: dict[str, str], *args: str, timeout: float = 60) -> Result:
    """``pilotboat ARGS``, awaited without blocking the simulated devices of the same event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pilotboat.cli.main", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class Follower:
    """A long-running CLI command (``events tail``, ``lwm2m observe``) whose output is read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.errors: list[str] = []

    async def line(self, pattern: str, timeout: float = 20, stream: str = "out") -> str:
        """The next line of stdout (or stderr) matching ``pattern``."""
        reader = self.process.stdout if stream == "out" else self.process.stderr
        seen = self.lines if stream == "out" else self.errors
        assert reader is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line matching {pattern!r}; stdout: {self.lines}, stderr: {self.errors}"
            try:
                raw = await asyncio.wait_for(reader.readline(), remaining)
            except TimeoutError:
                continue
            assert raw, f"the command ended before a line matching {pattern!r}; stdout: {self.lines}, stderr: {self.errors}"
            text = raw.decode().rstrip("\n")
            seen.append(text)
            if re.search(pattern, text):
                return text

    async def interrupt(self) -> Result:
        """Ctrl-C, then the rest of the output and the exit code."""
        self.process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(self.process.communicate(), 20)
        assert self.process.returncode is not None
        return Result(self.process.returncode, "\n".join(self.lines) + "\n" + out.decode(),
                      "\n".join(self.errors) + "\n" + err.decode())


@asynccontextmanager
async def follow(env: dict[str, str], *args: str) -> AsyncIterator[Follower]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pilotboat.cli.main", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Follower(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def registered(server: ServerProcess, endpoint: str, **options: Any) -> AsyncIterator[SimulatedDevice]:
    device = SimulatedDevice(endpoint, server_uri=server.lwm2m_uri, timing=options.pop("timing", TIMING),
                             sensor_interval=options.pop("sensor_interval", None), **options)
    try:
        result = await device.register(timeout=10)
        assert result.ok, result
        yield device
    finally:
        await device.close()


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a Rich table printed by the CLI, by their first cell."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) > 1 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


# --- devices and operations -------------------------------------------------------------------------


def test_devices_list_show_and_operations_on_a_registered_device(server: ServerProcess, tenant: Tenant) -> None:
    endpoint, device_id = make_device(tenant)
    env = cli_env(server.url, api_key(tenant))

    async def scenario() -> None:
        never = await cli(env, "devices", "show", endpoint)
        assert never.code == 1 and "has never registered" in never.err and device_id in never.err, never

        async with registered(server, endpoint, lifetime=300, device_info={14: "+01", 15: "UTC"}) as device:
            listed = await cli(env, "devices", "list")
            assert listed.code == 0, listed
            row = table_rows(listed.out)[device_id]
            assert row[0] == endpoint and row[1] == "registered" and row[3] == "1.1" and row[5] == "300 s", row
            assert row[2].startswith("127.0.0.1:"), row
            expired = await cli(env, "devices", "list", "--status", "expired")
            assert expired.code == 0 and device_id not in expired.out, expired

            entry = tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/directory/{device_id}").json()
            for ref in (endpoint, device_id):
                shown = await cli(env, "devices", "show", ref)
                assert shown.code == 0, shown
                assert device_id in shown.out and entry["registration"]["registration_id"] in shown.out
                assert "/3303/0" in shown.out and "lwm2m.registered" in shown.out, shown.out

            # Read: every resource of the Device object, as the device holds them.
            read = await cli(env, "lwm2m", "read", endpoint, "/3/0")
            assert read.code == 0, read
            assert "2.05 Content" in read.out
            values = table_rows(read.out)
            assert values["/3/0/0"] == [device.value("/3/0/0")] and values["/3/0/1"] == [device.value("/3/0/1")]
            assert values["/3/0/14"] == ["+01"]
            text = await cli(env, "lwm2m", "read", device_id, "/3/0/14", "--format", "text")
            assert text.code == 0 and "(text)" in text.out and table_rows(text.out)["/3/0/14"] == [device.value("/3/0/14")]

            # Write, then read back; a partial update of the instance from JSON.
            written = await cli(env, "lwm2m", "write", endpoint, "/3/0/14", "+05")
            assert written.code == 0 and "2.04 Changed" in written.out, written
            assert device.value("/3/0/14") == "+05"
            back = await cli(env, "lwm2m", "read", endpoint, "/3/0/14")
            assert table_rows(back.out)["/3/0/14"] == ["+05"], back
            partial = await cli(env, "lwm2m", "write", endpoint, "/3/0", "--partial", "--json",
                                json.dumps({"/3/0/15": "Europe/Berlin", "/3/0/14": "+02"}))
            assert partial.code == 0, partial
            assert (device.value("/3/0/15"), device.value("/3/0/14"), device.value("/3/0/0")) == (
                "Europe/Berlin", "+02", "Pilotboat")

            # Execute, and the device's own refusals: exit 1 with its code and text.
            executed = await cli(env, "lwm2m", "exec", endpoint, "/3/0/4")
            assert executed.code == 0 and "2.04 Changed" in executed.out, executed
            assert [str(path) for path in device.executed] == ["/3/0/4"]
            read_only = await cli(env, "lwm2m", "write", endpoint, "/3/0/0", "Other")
            assert read_only.code == 1 and "the device answered 4.05 Method Not Allowed" in read_only.err, read_only
            assert device.value("/3/0/0") != "Other"
            missing = await cli(env, "lwm2m", "read", endpoint, "/3/0/99")
            assert missing.code == 1 and "4.04 Not Found" in missing.err, missing

            discovered = await cli(env, "lwm2m", "discover", endpoint, "/3303/0")
            assert discovered.code == 0, discovered
            assert {"/3303/0", "/3303/0/5700", "/3303/0/5701"} <= set(table_rows(discovered.out)), discovered.out

            # Bad input is refused before anything is sent.
            before = len(device.received)
            for args in (("read", endpoint, "/0/0"), ("read", endpoint, "/3/x"), ("write", endpoint, "/3/0/13", "soon"),
                         ("write", endpoint, "/3/0/14"), ("exec", endpoint, "/3/0")):
                refused = await cli(env, "lwm2m", *args)
                assert refused.code == 2, (args, refused)
            assert len(device.received) == before

    run(scenario())


# --- events and observations ----------------------------------------------------------------------------


def test_events_tail_and_observe(server: ServerProcess, tenant: Tenant) -> None:
    quiet_endpoint, quiet_id = make_device(tenant)
    endpoint, device_id = make_device(tenant)
    # A member's access token this time (the org is the member's only one).
    env = cli_env(server.url, token_of(tenant.member))

    async def scenario() -> None:
        async with follow(env, "events", "tail", "--kind", "lwm2m.") as everything, \
                follow(env, "events", "tail", "--device", endpoint) as one_device:
            for tail in (everything, one_device):
                await tail.line("following the events", stream="err")
            async with registered(server, quiet_endpoint), registered(server, endpoint, sensor_interval=0.2):
                first = await everything.line(r"lwm2m\.registered")
                assert quiet_id in first and quiet_endpoint in first and "first registration" in first, first
                mine = await one_device.line(r"lwm2m\.")
                assert "lwm2m.registered" in mine and device_id in mine and f"({endpoint})" in mine, mine
                await everything.line(rf"lwm2m\.registered .*{device_id}")

                async with follow(env, "lwm2m", "observe", endpoint, "/3303/0/5700", "--pmin", "0", "--pmax", "1") as observing:
                    started = await observing.line("observation", stream="err")
                    assert "active" in started, started
                    readings = [await observing.line(r"/3303/0/5700 = \d+\.\d") for _ in range(3)]
                    stopped = await observing.interrupt()
                assert stopped.code == 0 and "observation cancelled" in stopped.err and "Traceback" not in stopped.err, stopped
                assert len(readings) == 3
                left = tenant.member.get(f"/api/v1/orgs/{tenant.org_id}/devices/{device_id}/observations")
                assert left.status_code == 200 and left.json() == [], left.text
                notified = await everything.line(r"lwm2m\.notification")
                assert device_id in notified and "/3303/0/5700=" in notified, notified

            # The device filter kept the other device's events out.
            ended = await one_device.interrupt()
            assert ended.code == 0 and "Traceback" not in ended.err, ended
            assert quiet_id not in ended.out and device_id in ended.out
            assert (await everything.interrupt()).code == 0

    run(scenario())


# --- errors ------------------------------------------------------------------------------------------------


def test_errors_say_what_to_do_next(server: ServerProcess, tenant: Tenant, root: Api) -> None:
    endpoint, device_id = make_device(tenant)
    key = api_key(tenant)
    wrong = "pbk_" + "x" * 40

    async def scenario() -> None:
        refused = await cli(cli_env(server.url, wrong), "devices", "list")
        assert refused.code == 1 and "refused the credentials" in refused.err and "PILOTBOAT_TOKEN" in refused.err, refused
        assert wrong not in refused.out + refused.err
        anonymous = await cli(cli_env(server.url, None), "devices", "list")
        assert anonymous.code == 2 and "PILOTBOAT_TOKEN" in anonymous.err, anonymous

        down = await cli(cli_env(f"http://127.0.0.1:{free_port()}", key), "devices", "list")
        assert down.code == 1 and "cannot connect" in down.err and "--url" in down.err, down
        assert key not in down.out + down.err
        tail_down = await cli(cli_env(f"http://127.0.0.1:{free_port()}", key), "events", "tail")
        assert tail_down.code == 1 and "cannot connect" in tail_down.err, tail_down
        bad_url = await cli(cli_env("localhost:8080", key), "devices", "list")
        assert bad_url.code == 2 and "http://" in bad_url.err, bad_url

        env = cli_env(server.url, key)
        unknown = await cli(env, "devices", "show", "urn:dev:nobody")
        assert unknown.code == 1 and "no device with the endpoint name or id 'urn:dev:nobody'" in unknown.err, unknown
        unknown_op = await cli(env, "lwm2m", "read", "urn:dev:nobody", "/3/0")
        assert unknown_op.code == 1 and "no device" in unknown_op.err, unknown_op
        not_registered = await cli(env, "lwm2m", "read", endpoint, "/3/0")
        assert not_registered.code == 1 and "not registered" in not_registered.err, not_registered
        assert "pilotboat devices show" in not_registered.err

        viewer = await cli(cli_env(server.url, token_of(tenant.viewer)), "lwm2m", "write", endpoint, "/3/0/14", "+02")
        assert viewer.code == 1 and "not allowed" in viewer.err and "HTTP 403" in viewer.err, viewer

        # The system administrator sees every organisation: it has to choose one.
        admin = cli_env(server.url, token_of(root))
        ambiguous = await cli(admin, "devices", "list")
        assert ambiguous.code == 2 and "--org" in ambiguous.err, ambiguous
        chosen = await cli(admin, "devices", "show", device_id, "--org", tenant.name)
        assert chosen.code == 1 and "has never registered" in chosen.err, chosen
        other = await cli(admin, "devices", "list", "--org", "no-such-org")
        assert other.code == 2 and "no organisation 'no-such-org'" in other.err, other

    run(scenario())


# --- a server of its own: queue mode, and a stream that survives a restart --------------------------------

AWAKE_SECONDS = 1.0


@pytest.fixture(scope="module")
def own_server(server_factory: Any) -> Iterator[ServerProcess]:
    process = server_factory("sqlite", PILOTBOAT_LWM2M_QUEUE_AWAKE_SECONDS=str(AWAKE_SECONDS))
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def own_tenant(own_server: ServerProcess) -> Iterator[Tenant]:
    with Api.login(own_server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as admin:
        created = make_tenant(own_server.url, admin)
    yield created
    created.close()


def test_a_sleeping_queue_mode_device_gets_a_queued_request(own_server: ServerProcess, own_tenant: Tenant) -> None:
    endpoint, _ = make_device(own_tenant)
    env = cli_env(own_server.url, api_key(own_tenant))

    async def scenario() -> None:
        timing = dataclasses.replace(TIMING, awake=AWAKE_SECONDS)
        async with registered(own_server, endpoint, queue_mode=True, timing=timing) as device:
            device.stop_updating()
            await asyncio.sleep(AWAKE_SECONDS + 0.5)
            waited = await cli(env, "lwm2m", "read", endpoint, "/3/0/14", "--timeout", "1")
            assert waited.code == 1 and "queued" in waited.out and "asleep" in waited.err, waited
            queued = await cli(env, "lwm2m", "write", endpoint, "/3/0/14", "+07", "--no-wait")
            assert queued.code == 0 and "queued" in queued.out, queued
            request_id = re.search(r"request (\S+) goes out", queued.out)
            assert request_id is not None, queued.out
            pending = await cli(env, "lwm2m", "request", endpoint, request_id[1])
            assert pending.code == 0 and "queued" in pending.out, pending

            assert (await device.update(timeout=10)).ok
            deadline = time.monotonic() + 10
            while device.value("/3/0/14") != "+07":
                assert time.monotonic() < deadline, "the queued write did not reach the device"
                await asyncio.sleep(0.1)
            done = await cli(env, "lwm2m", "request", endpoint, request_id[1])
            assert done.code == 0 and "done" in done.out and "2.04 Changed" in done.out, done

    run(scenario())


def test_events_tail_resumes_after_the_server_restarts(own_server: ServerProcess, own_tenant: Tenant) -> None:
    before_endpoint, before_id = make_device(own_tenant)
    after_endpoint, after_id = make_device(own_tenant)
    env = cli_env(own_server.url, api_key(own_tenant))

    async def scenario() -> None:
        async with follow(env, "events", "tail", "--kind", "lwm2m.registered") as tail:
            await tail.line("following the events", stream="err")
            async with registered(own_server, before_endpoint):
                await tail.line(before_id)
            await asyncio.get_running_loop().run_in_executor(None, own_server.restart)
            async with registered(own_server, after_endpoint):
                resumed = await tail.line(after_id, timeout=60)
            assert after_endpoint in resumed
            lost = await tail.line("connection lost", stream="err")
            assert "reconnecting" in lost, lost
            stopped = await tail.interrupt()
        assert stopped.code == 0 and "Traceback" not in stopped.err, stopped
        assert "reconnected" in stopped.err
        assert stopped.out.count(before_id) == 1, stopped.out  # resumed after the last event seen: no repeat

        # --since-id replays what happened since: both registrations, oldest first.
        async with follow(env, "events", "tail", "--since-id", "0", "--kind", "lwm2m.registered") as replay:
            assert before_id in await replay.line(rf"{before_id}|{after_id}")
            await replay.line(after_id)
            assert (await replay.interrupt()).code == 0

    run(scenario())
