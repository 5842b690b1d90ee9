"""Credential issuing throughput: device certificates (server-generated key, and from a CSR) and PSKs
per second through the native API of a real ``pilotboat serve``, plus the in-process signing ceiling.

Starts a server (SQLite in a temporary folder, or a PostgreSQL cluster with ``--backend postgresql``),
creates devices, then for each kind sends ``--count`` issuing requests over ``--concurrency`` keep-alive
connections and prints issued/s and p50/p99 latency. CSRs are made before the clock starts.

    .venv/bin/python benchmarks/credentials.py [--count N] [--concurrency C] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess  # noqa: E402
from http_bootstrap import machine, server_cpu_seconds  # noqa: E402

from pilotboat.security import pki  # noqa: E402


@dataclass
class Result:
    kind: str
    issued: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: CPU time of the server process per issued credential (user + system).
    server_cpu_ms: float = 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000 if ordered else 0.0


def make_csr() -> str:
    key = pki.new_key()
    request = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    ).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


async def load(
    url: str, token: str, kind: str, requests: list[tuple[str, dict[str, str] | None]], concurrency: int, progress: Progress
) -> Result:
    """POST every (path, body) of ``requests`` with ``concurrency`` workers; 201 counts as issued."""
    latencies: list[float] = []
    errors = 0
    queue = list(reversed(requests))
    task = progress.add_task(kind, total=len(requests))
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        async def worker() -> None:
            nonlocal errors
            while queue:
                path, body = queue.pop()
                started = time.perf_counter()
                response = await client.post(path, json=body) if body is not None else await client.post(path)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 201:
                    errors += 1
                progress.advance(task)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    issued = len(requests) - errors
    return Result(kind, issued, round(elapsed, 2), round(issued / elapsed, 1), round(percentile(latencies, 0.5), 1),
                  round(percentile(latencies, 0.99), 1), errors)


def signing_ceiling(count: int) -> Result:
    """Key generation + certificate signing alone, in this process: the upper bound of the server."""
    ca = pki.generate_ca("bench")
    started = time.perf_counter()
    for _ in range(count):
        pki.issue_device_certificate(ca, pki.new_key().public_key(), "bench", uuid.uuid4(), timedelta(days=365))
    elapsed = time.perf_counter() - started
    return Result("sign only (in-process)", count, round(elapsed, 2), round(count / elapsed, 1), 0, 0, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="requests per kind (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="connections in flight (default 8)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    console = Console()

    cluster = PostgresCluster() if args.backend == "postgresql" else None
    if cluster is not None:
        cluster.start()
    server = ServerProcess(cluster.new_database() if cluster else None)
    try:
        server.start()
        with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as admin:
            org = admin.post("/api/v1/orgs", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}).json()["id"]
            devices = []
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("creating devices", total=args.count)
                for index in range(args.count):
                    created = admin.post(f"/api/v1/orgs/{org}/devices", json={"name": f"d{index}", "endpoint": f"bench-{index}"})
                    created.raise_for_status()
                    devices.append(created.json()["id"])
                    progress.advance(task)
                csrs = [make_csr() for _ in range(args.count)]
            token = admin.headers["Authorization"].removeprefix("Bearer ")
        cpu_ceiling = signing_ceiling(min(args.count, 2000))
        base = f"/api/v1/orgs/{org}/devices"
        kinds = {
            "cert, server key": [(f"{base}/{device}/certificates", None) for device in devices],
            "cert, CSR": [(f"{base}/{device}/certificates", {"csr": csr}) for device, csr in zip(devices, csrs)],
            "PSK": [(f"{base}/{device}/psks", None) for device in devices],
        }
        results = []
        with Progress(console=console, transient=True) as progress:
            for kind, requests in kinds.items():
                cpu_before = server_cpu_seconds(server)
                result = asyncio.run(load(server.url, token, kind, requests, args.concurrency, progress))
                result.server_cpu_ms = round((server_cpu_seconds(server) - cpu_before) * 1000 / max(result.issued, 1), 2)
                results.append(result)
        results.append(cpu_ceiling)
    finally:
        server.stop()
        if cluster:
            cluster.stop()

    table = Table("issued", "count", "seconds", "per second", "p50 ms", "p99 ms", "server CPU ms", "errors",
                  title=f"Credential issuing, {args.backend}, {args.concurrency} in flight")
    for result in results:
        table.add_row(result.kind, str(result.issued), str(result.seconds), f"{result.per_second:,.1f}",
                      str(result.p50_ms), str(result.p99_ms), str(result.server_cpu_ms), str(result.errors))
    console.print(table)
    about = machine()
    console.print(f"machine: {about}")
    if args.json:
        print(json.dumps({"machine": about, "results": [asdict(result) for result in results]}, indent=2))
    return 1 if any(result.errors for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
