"""LwM2M bootstrap throughput: completed client-initiated bootstraps per second and p50/p90/p99 latency
of simulated devices against a real ``pilotboat serve``, with a window of concurrent sessions.

Starts a server (SQLite in a temporary folder, or a PostgreSQL cluster with ``--backend postgresql``),
creates ``--devices`` active devices with endpoint names, then bootstraps them all with the simulator
(``pilotboat.sim.run_fleet``, one UDP socket per device) and prints the figures. ``--profile`` runs the
server under cProfile and prints where its time went.

    .venv/bin/python benchmarks/lwm2m_bootstrap.py [--devices N] [--window W] [--format tlv|senml-json|senml-cbor]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pstats
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess  # noqa: E402
from http_bootstrap import machine, server_cpu_seconds  # noqa: E402

from pilotboat.lwm2m import content  # noqa: E402
from pilotboat.sim import FleetStats, endpoint_names, run_fleet  # noqa: E402

FORMATS = {"tlv": content.TLV, "senml-json": content.SENML_JSON, "senml-cbor": content.SENML_CBOR}


def create_devices(server: ServerProcess, endpoints: list[str], console: Console) -> None:
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as admin:
        org = admin.post("/api/v1/orgs", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}).json()["id"]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("creating devices", total=len(endpoints))
            for endpoint in endpoints:
                admin.post(f"/api/v1/orgs/{org}/devices", json={"endpoint": endpoint, "state": 1}).raise_for_status()
                progress.advance(task)


def run(server: ServerProcess, endpoints: list[str], window: int, fmt: int | None, console: Console) -> FleetStats:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bootstrapping", total=len(endpoints))
        return asyncio.run(run_fleet(
            server.bootstrap_uri, endpoints, window=window, timeout=60, content_format=fmt,
            progress=lambda _result: progress.advance(task),
        ))


def profile_summary(path: Path, lines: int = 20) -> str:
    """Where the server's event-loop thread spent its time: the functions with the most own time, then
    Pilotboat's own functions by cumulative time (database work in aiosqlite's thread is not profiled)."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(r"pilotboat/(lwm2m|bootstrap|coap|dtls|registry|services)", lines)
    return out.getvalue()


@contextmanager
def benchmark_server(backend: str, profile: Path | None) -> Iterator[ServerProcess]:
    """A started ``pilotboat serve`` on SQLite or a throw-away PostgreSQL cluster, optionally under
    cProfile writing to ``profile``; stopped and removed afterwards."""
    cluster = PostgresCluster() if backend == "postgresql" else None
    if cluster is not None:
        cluster.start()
    server = ServerProcess(
        cluster.new_database() if cluster else None,
        python_args=("-m", "cProfile", "-o", str(profile)) if profile else (),
        extra_env={"PILOTBOAT_LOG_LEVEL": "WARNING"},
    )
    try:
        server.start(timeout=60)
        yield server
    finally:
        if profile and server.process is not None:
            # uvicorn re-raises the stop signal after shutting down; on SIGINT (KeyboardInterrupt) cProfile
            # still writes its file, on SIGTERM the process dies first.
            server.process.send_signal(signal.SIGINT)
            server.process.wait(timeout=300)
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        if cluster is not None:
            cluster.stop()


def print_setting(out: Console, info: dict[str, str], backend: str, profiled: bool) -> None:
    """The machine, the date and the server's set-up, above a benchmark's figures."""
    out.print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['os']}, Python {info['python']}")
    out.print(f"date:    {info['date']}; load average before the run: {info['load_before']}")
    database = "SQLite" if backend == "sqlite" else "PostgreSQL (local, fsync off)"
    out.print(f"server:  pilotboat serve, one process, {database}, log level WARNING{', under cProfile' if profiled else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000, help="simulated devices, each bootstrapped once (default 2000)")
    parser.add_argument("--window", type=int, default=64, help="bootstrap sessions in flight (default 64)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="senml-cbor", help="the devices' pct (default senml-cbor)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", action="store_true", help="run the server under cProfile and print its hottest functions")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    console = Console(stderr=True)
    info = machine()

    profile_dir = Path(tempfile.mkdtemp(prefix="pilotboat-profile-"))
    profile = profile_dir / "server.prof"
    endpoints = endpoint_names(f"bench-{uuid.uuid4().hex[:6]}-", args.devices)
    with benchmark_server(args.backend, profile if args.profile else None) as server:
        create_devices(server, endpoints, console)
        warm = endpoints[: min(50, len(endpoints))]
        run(server, warm, args.window, FORMATS[args.format], console)  # warm-up: the same devices bootstrap again below
        cpu_before = server_cpu_seconds(server)
        stats = run(server, endpoints, args.window, FORMATS[args.format], console)
        cpu_ms = (server_cpu_seconds(server) - cpu_before) * 1000 / max(stats.completed, 1)

    out = Console(width=120)
    print_setting(out, info, args.backend, args.profile)
    out.print(f"load:    {args.devices} simulated devices in this process, {args.window} sessions in flight, pct {args.format}")
    table = Table("completed", "failed", "bootstraps/s", "p50 ms", "p90 ms", "p99 ms", "server CPU ms/bootstrap")
    ms = lambda value: f"{value * 1000:.1f}" if value is not None else "-"  # noqa: E731
    table.add_row(str(stats.completed), str(stats.failed), f"{stats.rate:.0f}", ms(stats.p50), ms(stats.p90), ms(stats.p99),
                  f"{cpu_ms:.2f}")
    out.print(table)
    if stats.failures:
        out.print(f"failures: {stats.failures}")
    if args.profile and profile.exists():
        print(profile_summary(profile))
    shutil.rmtree(profile_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"devices": args.devices, "window": args.window, "format": args.format, "backend": args.backend,
                          "completed": stats.completed, "failed": stats.failed, "per_second": round(stats.rate, 1),
                          "p50_ms": ms(stats.p50), "p90_ms": ms(stats.p90), "p99_ms": ms(stats.p99),
                          "server_cpu_ms": round(cpu_ms, 2), "machine": info}))
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
