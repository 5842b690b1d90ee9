"""DTLS handshakes per second and memory per session, for PSK and mutual X.509.

Two measurements, one command:

1. **Engine** (no sockets): the server side of ``--engine-count`` handshakes per mode driven in memory
   against ``pilotboat.dtls.client`` connections; the server's CPU time alone gives handshakes/s per core,
   the ceiling of one process.
2. **Server**: a real ``pilotboat serve`` (SQLite in a temporary folder) with its bootstrap DTLS port; one
   device with a bootstrap PSK and one with a device certificate from its organisation CA (both through
   the HTTP API). ``--count`` clients per mode, ``--window`` at a time, each from its own UDP socket, run a
   full handshake (cookie exchange, credential look-up in the database, the device bound) and close it.
   Then ``--sessions`` PSK sessions are opened and held: the server's resident memory before and after,
   divided by the sessions, is the memory per session.

    .venv/bin/python benchmarks/dtls_handshakes.py [--count 2000] [--window 32] [--sessions 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dtls_helpers import Pki  # noqa: E402
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, ServerProcess  # noqa: E402
from http_bootstrap import machine, server_cpu_seconds  # noqa: E402
from lwm2m_bootstrap import benchmark_server, profile_summary  # noqa: E402
from lwm2m_registration import server_rss_bytes  # noqa: E402

from pilotboat.dtls.client import ClientConnection, ClientCredentials  # noqa: E402
from pilotboat.dtls.engine import ServerCredentials  # noqa: E402
from pilotboat.dtls.mbedtls_engine import MbedtlsEngine  # noqa: E402
from pilotboat.security import pki  # noqa: E402
from pilotboat.sim.exchange import Endpoint, HandshakeError  # noqa: E402

PSK_IDENTITY, PSK_KEY = b"bench-identity", bytes(range(16))


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def key_der(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# --- 1. the engine alone -------------------------------------------------------------------------

def engine_handshake(engine: MbedtlsEngine, client: ClientConnection, psk: dict[bytes, bytes]) -> float:
    """One handshake in memory; returns the server side's CPU seconds."""
    server_time = 0.0
    client_id = uuid.uuid4().bytes
    to_server = client.start()
    connection = None
    for _ in range(32):
        to_client: list[bytes] = []
        for datagram in to_server:
            started = time.thread_time()
            if connection is None:
                connection, reply = engine.accept(datagram, client_id)
                to_client += reply
            else:
                progress = connection.feed(datagram, psk)
                to_client += progress.datagrams
            server_time += time.thread_time() - started
        if connection is not None and connection.established and client.established:
            return server_time
        to_server = []
        for datagram in to_client:
            to_server += client.feed(datagram).datagrams
    raise RuntimeError("the in-memory handshake did not finish")


def engine_rates(count: int, console: Console) -> dict[str, float]:
    material = Pki("Bench")
    modes: dict[str, tuple[MbedtlsEngine, Callable[[], ClientConnection], dict[bytes, bytes]]] = {}

    async def psk_for(identity: bytes) -> bytes | None:  # the transport's job; unused in memory
        return None

    async def accept_any(chain: tuple[bytes, ...]) -> bool:  # likewise
        return True

    modes["PSK (TLS_PSK_WITH_AES_128_CCM_8)"] = (
        MbedtlsEngine(ServerCredentials(psk_for=psk_for)),
        lambda: ClientConnection(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY)),
        {PSK_IDENTITY: PSK_KEY},
    )
    modes["X.509 (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, P-256)"] = (
        # As the LwM2M servers run it: the engine checks the client's CertificateVerify, the identity
        # service the chain (outside this measurement; inside the server figures below).
        MbedtlsEngine(ServerCredentials(
            certificate_chain=material.server_chain, private_key=material.server_key_der(), accept_chain=accept_any,
        )),
        lambda: ClientConnection(ClientCredentials.certificate(
            material.client_chain, key_der(material.client_key), material.anchors,
        )),
        {},
    )
    rates = {}
    with Progress(console=console, transient=True) as progress:
        for name, (engine, client, psk) in modes.items():
            # X.509 costs ~100 times more than PSK: a tenth as many give as steady a figure.
            runs = count if psk else max(1, count // 10)
            task = progress.add_task(f"engine: {name}", total=runs)
            spent = 0.0
            for _ in range(runs):
                spent += engine_handshake(engine, client(), psk)
                progress.advance(task)
            rates[name] = runs / spent
    return rates


# --- 2. a real server ----------------------------------------------------------------------------

async def open_session(port: int, credentials: ClientCredentials, timeout: float = 30.0) -> Endpoint:
    """A client socket with an established DTLS session to ``127.0.0.1:port`` (``HandshakeError`` or
    ``TimeoutError`` otherwise); close it with ``close()``."""
    client = await Endpoint.open(("127.0.0.1", 0), lambda request, peer: None)
    try:
        await client.connect(("127.0.0.1", port), credentials, timeout)
    except BaseException:
        client.close()
        raise
    return client


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0

    def row(self) -> list[str]:
        done = len(self.latencies)
        ordered = sorted(self.latencies) or [0.0]
        pick = lambda share: f"{ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000:.1f}"  # noqa: E731
        return [self.name, str(done), str(self.failures), f"{done / self.elapsed:.0f}" if self.elapsed else "-",
                f"{statistics.median(ordered) * 1000:.1f}", pick(0.99), f"{self.cpu / done * 1000:.2f}" if done else "-"]


async def handshakes(server: ServerProcess, run: Run, credentials: ClientCredentials, count: int, window: int,
                     progress: Progress) -> None:
    task = progress.add_task(f"server: {run.name}", total=count)
    queue = iter(range(count))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            try:
                client = await open_session(server.bootstrap_dtls_port, credentials)
            except (HandshakeError, TimeoutError, OSError):
                run.failures += 1
            else:
                run.latencies.append(time.perf_counter() - started)
                client.close()
            progress.advance(task)

    cpu = server_cpu_seconds(server)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    run.elapsed = time.perf_counter() - started
    run.cpu = server_cpu_seconds(server) - cpu


def provision(server: ServerProcess) -> tuple[ClientCredentials, ClientCredentials]:
    """A device with a bootstrap PSK and a device with a certificate from its organisation CA."""
    with Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD) as admin:
        org = admin.post("/api/v1/orgs", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}).json()["id"]
        psk_device = admin.post(f"/api/v1/orgs/{org}/devices", json={"endpoint": f"bench-psk-{uuid.uuid4().hex}", "state": 1}).json()["id"]
        created = admin.post(f"/api/v1/orgs/{org}/devices/{psk_device}/psks", json={}).json()
        psk = ClientCredentials.psk(created["identity"].encode(), bytes.fromhex(created["key"]))
        cert_endpoint = f"bench-cert-{uuid.uuid4().hex}"
        cert_device = admin.post(f"/api/v1/orgs/{org}/devices", json={"endpoint": cert_endpoint, "state": 1}).json()["id"]
        issued = admin.post(f"/api/v1/orgs/{org}/devices/{cert_device}/certificates", json={}).json()
        published = pki.load_certificates(admin.get("/api/v1/dtls/server-certificate").text)
    chain = pki.load_certificates(issued["certificate_pem"] + issued["chain_pem"])
    key = pki.load_private_key(issued["private_key_pem"])
    anchors = (der(published[-1]),)
    certificate = ClientCredentials.certificate(tuple(der(c) for c in chain[:-1]), key_der(key), anchors)
    return psk, certificate


async def hold_sessions(server: ServerProcess, credentials: ClientCredentials, sessions: int, window: int,
                        progress: Progress) -> tuple[int, int, int]:
    """(sessions opened, RSS before, RSS after), the sessions held while the second is read."""
    task = progress.add_task("server: holding PSK sessions", total=sessions)
    before = server_rss_bytes(server)
    held: list[Endpoint] = []
    queue = iter(range(sessions))

    async def worker() -> None:
        for _ in queue:
            try:
                held.append(await open_session(server.bootstrap_dtls_port, credentials))
            except (HandshakeError, TimeoutError, OSError):
                pass
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(window)))
    await asyncio.sleep(1)
    after = server_rss_bytes(server)
    for client in held:
        client.close()
    return len(held), before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-count", type=int, default=2000, help="in-memory handshakes per mode (X.509: a tenth)")
    parser.add_argument("--count", type=int, default=1000, help="handshakes per mode against the server (X.509: a fifth)")
    parser.add_argument("--window", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--sessions", type=int, default=2000, help="PSK sessions held for the memory figure")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", action="store_true", help="run the server under cProfile and print its hottest functions")
    args = parser.parse_args()
    console = Console()
    facts = machine()
    console.print(f"[bold]DTLS handshakes[/] — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for key, value in facts.items():
        console.print(f"  {key}: {value}")

    rates = engine_rates(args.engine_count, console) if args.engine_count else {}
    table = Table(title="Engine, server side only (handshakes per second of one core's CPU time)")
    table.add_column("mode")
    table.add_column("handshakes/s", justify="right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}")
    console.print(table)

    profile = Path(tempfile.mkdtemp(prefix="pilotboat-profile-")) / "server.prof" if args.profile else None
    with benchmark_server(args.backend, profile) as server:
        psk, certificate = provision(server)
        runs = [Run("PSK"), Run("X.509")]

        async def load() -> tuple[int, int, int]:
            with Progress(console=console, transient=True) as progress:
                await handshakes(server, runs[0], psk, args.count, args.window, progress)
                await handshakes(server, runs[1], certificate, args.count // 5, args.window, progress)
                return await hold_sessions(server, psk, args.sessions, args.window, progress) if args.sessions else (0, 0, 0)

        held, before, after = asyncio.run(load())
    table = Table(title="pilotboat serve, bootstrap DTLS port (full handshakes over loopback, then close)")
    for column in ("mode", "handshakes", "failed", "handshakes/s", "p50 ms", "p99 ms", "server CPU ms each"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for run in runs:
        table.add_row(*run.row())
    console.print(table)
    per_session = (after - before) / held if held else float("nan")
    console.print(f"memory: {held} PSK sessions held, server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
                  f"[bold]{per_session / 1024:.1f} kB per session[/]")
    if profile is not None:
        console.print(profile_summary(profile))
    return 1 if any(run.failures for run in runs) or held < args.sessions else 0


if __name__ == "__main__":
    raise SystemExit(main())
