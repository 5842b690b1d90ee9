"""HTTP bootstrap throughput: GET /clients/bootstrap/{external_id} against GET /health, same server, same run.

Starts a real ``pilotboat serve`` (SQLite in a temporary folder, default settings otherwise), creates a
channel and an active bootstrap config, then loads both routes in turn and prints requests/s, the
ratio bootstrap/health and p50/p99 latency. Uses wrk when it is installed (as root on Debian/Ubuntu it
is installed with apt-get), otherwise a small httpx-based async load generator.

    .venv/bin/python benchmarks/http_bootstrap.py [--seconds N] [--connections C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess  # noqa: E402

EXTERNAL_ID = "bench-00:1b:63:84:45:e6"
EXTERNAL_KEY = "bench-factory-secret-0123456789"


@dataclass
class Result:
    route: str
    requests_per_second: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-200 answers and socket errors
    server_cpu_ms: float = 0.0  # CPU time of the server process per request (user + system)


# --- the machine ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    os_name = platform.platform()
    try:
        release = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
        )
        os_name = release.get("PRETTY_NAME", os_name).strip('"')
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "os": f"{os_name}, kernel {platform.release()}",
        "python": platform.python_version(),
        "load_before": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --- wrk --------------------------------------------------------------------------------------------


def find_wrk(install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        quiet = {"stdout": subprocess.DEVNULL, "env": env}
        if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet)
    return shutil.which("wrk")


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def run_wrk(wrk: str, url: str, headers: dict[str, str], seconds: int, connections: int, threads: int) -> Result:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+(\S+)", output, re.M))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Result(url, rps, total, _ms(percentiles["50"]), _ms(percentiles["99"]), errors)


# --- fallback: httpx ---------------------------------------------------------------------------------


async def _httpx_load(url: str, headers: dict[str, str], seconds: int, connections: int) -> Result:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.get(url)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return Result(url, len(latencies) / elapsed, len(latencies), pct(0.50), pct(0.99), errors)


def run_httpx(url: str, headers: dict[str, str], seconds: int, connections: int) -> Result:
    return asyncio.run(_httpx_load(url, headers, seconds, connections))


# --- the run -----------------------------------------------------------------------------------------


def prepare(server: ServerProcess) -> None:
    """An organisation's channel and an active config for the benchmark device."""
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        org = root.post("/api/v1/orgs", json={"name": "benchmark"}).json()["id"]
        channel = root.post(f"/api/v1/orgs/{org}/channels", json={"name": "telemetry"}).json()["id"]
        created = root.post(
            f"/{org}/clients/configs",
            json={"external_id": EXTERNAL_ID, "external_key": EXTERNAL_KEY, "channels": [channel],
                  "name": "bench-device", "content": json.dumps({"interval": 30})},
        )
        assert created.status_code == 201, created.text
        device_id = created.headers["location"].rsplit("/", 1)[1]
        activated = root.put(f"/{org}/clients/state/{device_id}", json={"state": 1})
        assert activated.status_code == 200, activated.text
    check = httpx.get(f"{server.url}/clients/bootstrap/{EXTERNAL_ID}", headers={"Authorization": f"Client {EXTERNAL_KEY}"})
    assert check.status_code == 200 and check.json()["client_id"] == device_id, check.text


def server_cpu_seconds(server: ServerProcess) -> float:
    """CPU time used so far by the server process, from its own /metrics (Linux process collector)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(r"^process_cpu_seconds_total ([\d.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def bootstrap_events(server: ServerProcess) -> int:
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as root:
        return root.get("/api/v1/events", params={"kind": "bootstrap.", "limit": 1}).json()["total"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each measurement (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="wrk threads (default min(2, nproc))")
    parser.add_argument("--tool", choices=("auto", "wrk", "httpx"), default="auto", help="load generator (default: wrk if available)")
    parser.add_argument("--no-install", action="store_true", help="do not install wrk with apt-get when it is missing")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="database of the server (default sqlite; postgresql starts a throw-away cluster as the tests do)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    info = machine()
    wrk = find_wrk(install=not args.no_install) if args.tool != "httpx" else None
    if args.tool == "wrk" and wrk is None:
        parser.error("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    tool = f"wrk -t{args.threads} -c{args.connections}" if wrk else f"httpx async load generator, {args.connections} connections"

    cluster = PostgresCluster() if args.backend == "postgresql" else None
    if cluster is not None:
        cluster.start()
    server = ServerProcess(cluster.new_database() if cluster else None, extra_env={"PILOTBOAT_MAX_BODY_BYTES": "1048576"})
    try:
        server.start()
        prepare(server)
        targets = {
            "health": (f"{server.url}/health", {}),
            "bootstrap": (f"{server.url}/clients/bootstrap/{EXTERNAL_ID}", {"Authorization": f"Client {EXTERNAL_KEY}"}),
        }

        def measure(url: str, headers: dict[str, str], seconds: int) -> Result:
            if wrk:
                return run_wrk(wrk, url, headers, seconds, args.connections, args.threads)
            return run_httpx(url, headers, seconds, args.connections)

        results: dict[str, Result] = {}
        for name, (url, headers) in targets.items():
            print(f"warming up {name} ...", file=sys.stderr)
            measure(url, headers, 2)
            events_before = bootstrap_events(server)
            print(f"measuring {name} for {args.seconds} s ...", file=sys.stderr)
            cpu_before = server_cpu_seconds(server)
            results[name] = measure(url, headers, args.seconds)
            cpu_used = server_cpu_seconds(server) - cpu_before
            results[name].server_cpu_ms = cpu_used * 1000 / max(results[name].requests, 1)
        events_recorded = bootstrap_events(server) - events_before  # after the bootstrap measurement
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        if cluster is not None:
            cluster.stop()

    health, bootstrap = results["health"], results["bootstrap"]
    ratio = bootstrap.requests_per_second / health.requests_per_second if health.requests_per_second else 0.0
    print()
    print(f"machine:   {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['os']}, Python {info['python']}")
    print(f"date:      {info['date']}; load average before the run: {info['load_before']}")
    database = "SQLite" if args.backend == "sqlite" else "PostgreSQL (local, fsync off)"
    print(f"server:    pilotboat serve, one process, {database}, default settings (JSON request logs at INFO)")
    print(f"load:      {tool}, {args.seconds} s per route after a 2 s warm-up")
    print()
    print(f"{'route':<36} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>6} {'server CPU ms/req':>18}")
    for label, result in (("GET /health", health), ("GET /clients/bootstrap/{external_id}", bootstrap)):
        print(f"{label:<36} {result.requests_per_second:>8.0f} {result.p50_ms:>8.2f} {result.p99_ms:>8.2f} "
              f"{result.requests:>9} {result.errors:>6} {result.server_cpu_ms:>18.3f}")
    print()
    print(f"bootstrap / health: {ratio:.2f} (requests/s)")
    print(f"bootstrap events written while measuring bootstrap: {events_recorded} (one event row per attempt)")
    if args.json:
        print(json.dumps({"machine": info, "tool": tool, "backend": args.backend, "seconds": args.seconds,
                          "connections": args.connections,
                          "health": asdict(health), "bootstrap": asdict(bootstrap), "ratio": ratio,
                          "bootstrap_events": events_recorded}, indent=2))
    failed = health.errors or bootstrap.errors
    if failed:
        print(f"error: {health.errors + bootstrap.errors} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
