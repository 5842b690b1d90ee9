"""Test harness: a real PostgreSQL cluster and real ``pilotboat serve`` processes on loopback."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import URL, make_url

ADMIN_EMAIL = "root@pilotboat.test"
ADMIN_PASSWORD = "correct horse battery staple"
ENCRYPT_KEY = "12345678910111213141516171819202"  # the key of shared/vectors/secure-bootstrap-kat.json


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found. Install the server (apt-get install -y postgresql) "
            "or point PILOTBOAT_TEST_POSTGRES_URL at a server the tests may create databases on."
        )
    return found


class PostgresCluster:
    """A throw-away PostgreSQL cluster in a temporary folder, listening on loopback only."""

    def __init__(self) -> None:
        self.external = os.environ.get("PILOTBOAT_TEST_POSTGRES_URL")
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: str | None = None
        self.port = 0

    def start(self) -> None:
        if self.external:
            return
        self.directory = tempfile.mkdtemp(prefix="pilotboat-pg-")
        self.port = free_port()
        # PostgreSQL refuses to run as root: then run it as 'postgres' (set on the process itself, so
        # that the stop signal reaches the server and not a wrapper such as runuser).
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": self.directory}
        data = os.path.join(self.directory, "data")
        subprocess.run(
            [_postgres_bin("initdb"), "-D", data, "-U", "pilotboat", "--auth=trust", "-E", "UTF8"],
            check=True, stdout=subprocess.DEVNULL, **run_as,
        )
        self.process = subprocess.Popen(
            [_postgres_bin("postgres"), "-D", data, "-h", "127.0.0.1", "-p", str(self.port),
             "-k", self.directory, "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **run_as,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                asyncio.run(self._execute("postgres", "SELECT 1"))
                return
            except Exception:  # noqa: BLE001 - any failure means "not up yet"
                time.sleep(0.2)
        raise RuntimeError("PostgreSQL did not start within 30 s")

    def url(self, database: str) -> URL:
        base = make_url(self.external) if self.external else make_url(f"postgresql+asyncpg://pilotboat@127.0.0.1:{self.port}/postgres")
        return base.set(database=database)

    async def _execute(self, database: str, statement: str) -> None:
        import asyncpg

        dsn = self.url(database).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(dsn, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        name = f"pilotboat_{uuid.uuid4().hex[:12]}"
        asyncio.run(self._execute("postgres", f'CREATE DATABASE "{name}"'))
        return self.url(name).render_as_string(hide_password=False)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class ServerProcess:
    """``pilotboat serve`` in a subprocess; ``restart()`` keeps its data dir and database."""

    database_url: str | None
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pilotboat-data-")))
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    bootstrap_port: int = field(default_factory=free_udp_port)
    lwm2m_port: int = field(default_factory=free_udp_port)
    bootstrap_dtls_port: int = field(default_factory=free_udp_port)
    lwm2m_dtls_port: int = field(default_factory=free_udp_port)
    #: Interpreter arguments before ``-m pilotboat.cli.main serve`` (the benchmarks profile with cProfile).
    python_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bootstrap_uri(self) -> str:
        return f"coap://127.0.0.1:{self.bootstrap_port}"

    @property
    def lwm2m_uri(self) -> str:
        return f"coap://127.0.0.1:{self.lwm2m_port}"

    @property
    def bootstrap_dtls_uri(self) -> str:
        return f"coaps://127.0.0.1:{self.bootstrap_dtls_port}"

    @property
    def lwm2m_dtls_uri(self) -> str:
        return f"coaps://127.0.0.1:{self.lwm2m_dtls_port}"

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PILOTBOAT_")}
        env.update(
            PILOTBOAT_DATA_DIR=str(self.data_dir),
            PILOTBOAT_HTTP_PORT=str(self.port),
            PILOTBOAT_BOOTSTRAP_PORT=str(self.bootstrap_port),
            PILOTBOAT_LWM2M_PORT=str(self.lwm2m_port),
            PILOTBOAT_BOOTSTRAP_DTLS_PORT=str(self.bootstrap_dtls_port),
            PILOTBOAT_LWM2M_DTLS_PORT=str(self.lwm2m_dtls_port),
            PILOTBOAT_ADMIN_EMAIL=ADMIN_EMAIL,
            PILOTBOAT_ADMIN_PASSWORD=ADMIN_PASSWORD,
            PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY=ENCRYPT_KEY,
            PILOTBOAT_MAX_BODY_BYTES="65536",
        )
        if self.database_url:
            env["PILOTBOAT_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30) -> None:
        self.log_path = self.data_dir / "server.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, *self.python_args, "-m", "pilotboat.cli.main", "serve"], env=self.env(), stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pilotboat serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"pilotboat serve did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """``pilotboat ARGS`` on this server's machine: with its settings (data dir, database, master key)."""
        return subprocess.run(
            [sys.executable, "-m", "pilotboat.cli.main", *args], env={**self.env(), "COLUMNS": "250", **env},
            capture_output=True, text=True, timeout=timeout, check=False,
        )


class Api(httpx.Client):
    """An HTTP client for one server, optionally logged in."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        super().__init__(base_url=base_url, headers=headers, timeout=30)

    @classmethod
    def login(cls, base_url: str, email: str, password: str) -> Api:
        response = httpx.post(f"{base_url}/api/v1/auth/token", data={"username": email, "password": password}, timeout=30)
        assert response.status_code == 200, response.text
        return cls(base_url, response.json()["access_token"])


@dataclass
class Tenant:
    """A fresh organisation with an admin, a member and a viewer, each with a logged-in client."""

    org_id: str
    name: str
    admin: Api
    member: Api
    viewer: Api
    users: dict[str, str]  # role -> user id

    def close(self) -> None:
        for client in (self.admin, self.member, self.viewer):
            client.close()


def make_tenant(server_url: str, root: Api) -> Tenant:
    name = f"org-{uuid.uuid4().hex[:10]}"
    created = root.post("/api/v1/orgs", json={"name": name})
    assert created.status_code == 201, created.text
    org_id = created.json()["id"]
    clients: dict[str, Api] = {}
    users: dict[str, str] = {}
    for role in ("admin", "member", "viewer"):
        email = f"{role}-{uuid.uuid4().hex[:8]}@{name}.test"
        added = root.post(f"/api/v1/orgs/{org_id}/users", json={"email": email, "password": "password-" + role, "role": role})
        assert added.status_code == 201, added.text
        users[role] = added.json()["id"]
        clients[role] = Api.login(server_url, email, "password-" + role)
    return Tenant(org_id, name, clients["admin"], clients["member"], clients["viewer"], users)


def json_of(response: httpx.Response) -> Any:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text
    return response.json()
