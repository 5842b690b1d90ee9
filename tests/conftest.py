"""Fixtures: every API test runs against a real server on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, Api, PostgresCluster, ServerProcess, Tenant, make_tenant

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """One running server per database backend, shared by the tests of a session."""
    database_url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    process = ServerProcess(database_url)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def server_factory(postgres: PostgresCluster) -> Iterator[object]:
    """Start extra servers (own data dir and database) for tests that restart or reconfigure one."""
    started: list[ServerProcess] = []

    def make(backend: str = "sqlite", **env: str) -> ServerProcess:
        process = ServerProcess(postgres.new_database() if backend == "postgresql" else None, extra_env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture()
def root(server: ServerProcess) -> Iterator[Api]:
    """The system administrator created on first start."""
    client = Api.login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    yield client
    client.close()


@pytest.fixture()
def anonymous(server: ServerProcess) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()


@pytest.fixture()
def tenant(server: ServerProcess, root: Api) -> Iterator[Tenant]:
    """A fresh organisation with an admin, a member and a viewer."""
    created = make_tenant(server.url, root)
    yield created
    created.close()


@pytest.fixture()
def other_tenant(server: ServerProcess, root: Api) -> Iterator[Tenant]:
    created = make_tenant(server.url, root)
    yield created
    created.close()
