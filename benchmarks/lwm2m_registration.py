"""LwM2M registration throughput and memory: Registers and Updates per second against a real
``pilotboat serve``, and the server's memory per registered device at each checkpoint (10,000 and
100,000 registrations by default).

Starts a server (SQLite in a temporary folder, or a PostgreSQL cluster with ``--backend postgresql``),
creates the devices straight in its database (one API-created device copied N times: creating 100,000
through the API would take longer than registering them), then registers them from simulated clients
(``pilotboat.sim.exchange.Endpoint``: ``--sockets`` UDP sockets shared by all the endpoints, so that
100,000 devices do not need 100,000 file descriptors) with ``--window`` requests in flight, reading the
server's resident memory from its ``/metrics`` at each checkpoint. Then every registration sends one
Update. ``--profile`` runs the server under cProfile and prints where its time went.

    .venv/bin/python benchmarks/lwm2m_registration.py [--checkpoints 10000,100000] [--window 64] [--backend postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiocoap
import httpx
from aiocoap.numbers.codes import Code
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess  # noqa: E402
from http_bootstrap import machine, server_cpu_seconds  # noqa: E402
from lwm2m_bootstrap import benchmark_server, print_setting, profile_summary  # noqa: E402

from pilotboat.sim.exchange import Endpoint, Timing  # noqa: E402
from pilotboat.sim.fleet import percentile, raise_open_file_limit  # noqa: E402
from pilotboat.store import database  # noqa: E402
from pilotboat.store.tables import Device, new_id  # noqa: E402

OBJECTS = b'</>;rt="oma.lwm2m";ct="110 112 11543",</1/0>,</3/0>,</3303/0>'
INSERT_CHUNK = 5000


def create_devices(server: ServerProcess, endpoints: list[str], console: Console) -> None:
    """One device through the API; its row copied for every endpoint, in chunks."""
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as admin:
        org = admin.post("/api/v1/orgs", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}).json()["id"]
        template_id = admin.post(f"/api/v1/orgs/{org}/devices", json={"endpoint": f"template-{uuid.uuid4().hex}", "state": 1}).json()["id"]

    async def copy() -> None:
        engine = database.create_engine(server.database_url or f"sqlite+aiosqlite:///{server.data_dir / 'pilotboat.db'}")
        try:
            async with engine.begin() as connection:
                sealed = await connection.scalar(select(Device.secret_sealed).where(Device.id == template_id))
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("creating devices", total=len(endpoints))
                for start in range(0, len(endpoints), INSERT_CHUNK):
                    chunk = endpoints[start:start + INSERT_CHUNK]
                    async with engine.begin() as connection:
                        await connection.execute(insert(Device), [
                            {"id": new_id(), "org_id": org, "name": "bench", "secret_sealed": sealed, "endpoint": endpoint,
                             "state": 1, "content": "", "client_cert": "", "ca_cert": ""}
                            for endpoint in chunk
                        ])
                    progress.advance(task, len(chunk))
        finally:
            await engine.dispose()

    asyncio.run(copy())


def server_rss_bytes(server: ServerProcess) -> int:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(r"^process_resident_memory_bytes ([\d.e+-]+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


class Phase:
    """Requests of one kind: rate, latency percentiles, failures by answer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}
        #: 5.03 answers (the node shed load): the request was sent again after Max-Age, as clients do.
        self.shed = 0
        self.elapsed = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def row(self) -> list[str]:
        ms = lambda share: f"{(percentile(self.latencies, share) or 0) * 1000:.1f}"  # noqa: E731
        return [self.name, str(len(self.latencies)), str(sum(self.failures.values())), str(self.shed), f"{self.rate:.0f}",
                ms(50), ms(90), ms(99)]


async def drive(
    count: int, window: int, request: Callable[[int], Awaitable[aiocoap.Message]], expected: Code, phase: Phase,
    advance: Callable[[], None],
) -> None:
    """``request(i)`` for i in range(count), ``window`` at a time; a 5.03 is sent again after its
    Max-Age (latency counts from the accepted attempt)."""
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            while True:
                started = time.perf_counter()
                try:
                    response = await request(index)
                except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                    phase.failures[type(exc).__name__] = phase.failures.get(type(exc).__name__, 0) + 1
                    break
                if response.code == Code.SERVICE_UNAVAILABLE:
                    phase.shed += 1
                    await asyncio.sleep(response.opt.max_age if response.opt.max_age is not None else 2)
                    continue
                if response.code == expected:
                    phase.latencies.append(time.perf_counter() - started)
                else:
                    phase.failures[response.code.dotted] = phase.failures.get(response.code.dotted, 0) + 1
                break
            advance()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    phase.elapsed += time.perf_counter() - started


async def load(server: ServerProcess, endpoints: list[str], checkpoints: list[int], window: int, sockets: int,
               console: Console) -> tuple[Phase, Phase, list[tuple[int, int]], int]:
    async def ignore(_message: aiocoap.Message, _peer: object) -> None:
        return None

    timing = Timing()
    clients = [await Endpoint.open(("127.0.0.1", 0), ignore, timing) for _ in range(sockets)]
    remote = ("127.0.0.1", server.lwm2m_port)
    locations: list[str | None] = [None] * len(endpoints)

    async def register(index: int) -> aiocoap.Message:
        message = aiocoap.Message(code=Code.POST, uri_path=("rd",), uri_query=(f"ep={endpoints[index]}", "lt=86400", "lwm2m=1.1"),
                                  payload=OBJECTS, content_format=40)
        response = await clients[index % sockets].request(message, remote)
        if response.code == Code.CREATED:
            locations[index] = response.opt.location_path[-1]
        return response

    async def update(index: int) -> aiocoap.Message:
        message = aiocoap.Message(code=Code.POST, uri_path=("rd", locations[index] or "missing"))
        return await clients[index % sockets].request(message, remote)

    registers, updates = Phase("Register"), Phase("Update")
    memory = [(0, server_rss_bytes(server))]
    try:
        with Progress(console=console, transient=True) as progress:
            done = 0
            for checkpoint in checkpoints:
                task = progress.add_task(f"registering up to {checkpoint}", total=checkpoint - done)
                part = endpoints[done:checkpoint]
                await drive(len(part), window, lambda i, base=done: register(base + i), Code.CREATED, registers,
                            lambda task=task: progress.advance(task))
                done = checkpoint
                await asyncio.sleep(1)  # let the event writer catch up before reading the memory
                memory.append((checkpoint, server_rss_bytes(server)))
            cpu_before = server_cpu_seconds(server)
            task = progress.add_task("updating", total=len(endpoints))
            await drive(len(endpoints), window, update, Code.CHANGED, updates, lambda: progress.advance(task))
            update_cpu_us = round((server_cpu_seconds(server) - cpu_before) * 1e6 / max(len(updates.latencies), 1))
    finally:
        for client in clients:
            client.close()
    return registers, updates, memory, update_cpu_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default="10000,100000",
                        help="registration counts at which the server's memory is read, comma-separated (default 10000,100000)")
    parser.add_argument("--window", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--sockets", type=int, default=64, help="client UDP sockets the endpoints share (default 64)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", action="store_true", help="run the server under cProfile and print its hottest functions")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    checkpoints = sorted({int(value) for value in args.checkpoints.split(",")})
    console = Console(stderr=True)
    info = machine()
    raise_open_file_limit()

    profile_dir = Path(tempfile.mkdtemp(prefix="pilotboat-profile-"))
    profile = profile_dir / "server.prof"
    endpoints = [f"bench-{uuid.uuid4().hex[:6]}-{index}" for index in range(checkpoints[-1])]
    with benchmark_server(args.backend, profile if args.profile else None) as server:
        create_devices(server, endpoints, console)
        cpu_before = server_cpu_seconds(server)
        registers, updates, memory, update_cpu_us = asyncio.run(
            load(server, endpoints, checkpoints, args.window, args.sockets, console))
        cpu_total = server_cpu_seconds(server) - cpu_before

    out = Console(width=120)
    print_setting(out, info, args.backend, args.profile)
    out.print(f"load:    {len(endpoints)} endpoints over {args.sockets} client sockets, {args.window} requests in flight")
    table = Table("operation", "completed", "failed", "5.03 (retried)", "per second", "p50 ms", "p90 ms", "p99 ms")
    table.add_row(*registers.row())
    table.add_row(*updates.row())
    out.print(table)
    baseline = memory[0][1]
    mem = Table("registered", "server RSS MiB", "bytes per registered device (from the start)")
    for count, rss in memory:
        mem.add_row(str(count), f"{rss / 2**20:.0f}", f"{(rss - baseline) / count:.0f}" if count else "-")
    out.print(mem)
    out.print(f"server CPU: {cpu_total:.1f} s in all; {update_cpu_us} µs per Update")
    for phase in (registers, updates):
        if phase.failures:
            out.print(f"{phase.name} failures: {phase.failures}")
    if args.profile and profile.exists():
        print(profile_summary(profile))
    shutil.rmtree(profile_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({
            "backend": args.backend, "window": args.window, "sockets": args.sockets,
            "register": {"completed": len(registers.latencies), "failed": registers.failures, "shed": registers.shed,
                         "per_second": round(registers.rate, 1)},
            "update": {"completed": len(updates.latencies), "failed": updates.failures, "shed": updates.shed,
                       "per_second": round(updates.rate, 1),
                       "server_cpu_us": update_cpu_us},
            "memory": [{"registered": count, "rss_bytes": rss} for count, rss in memory], "machine": info,
        }))
    return 1 if registers.failures or updates.failures else 0


if __name__ == "__main__":
    sys.exit(main())
