"""The Alembic migrations create exactly the schema the SQLAlchemy tables declare, on both backends."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from harness import PostgresCluster
from pilotboat.store import database
from pilotboat.store.tables import Base


async def _differences(url: str) -> tuple[list[object], str | None, str | None]:
    engine = database.create_engine(url)
    try:
        await database.upgrade(engine)
        await database.upgrade(engine)  # a second run is a no-op
        async with engine.connect() as connection:
            diff = await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
        current, head = await database.revisions(engine)
        return diff, current, head
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_match_the_tables(backend: str, postgres: PostgresCluster) -> None:
    url = postgres.new_database() if backend == "postgresql" else f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/m.db"
    diff, current, head = asyncio.run(_differences(url))
    assert diff == []
    assert current == head is not None


async def _upgrade_with_credentials(url: str) -> list[tuple[str, str, str]]:
    """Credentials stored before purposes existed (revision 0004) are bootstrap credentials in use after."""
    from alembic import command
    from sqlalchemy import text

    engine = database.create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: command.upgrade(database._alembic_config(sync), "0004"))
        now = "2026-01-01 00:00:00+00:00"
        rows = [
            ("INSERT INTO organisations (id, name, cert_validity_days, keep_device_keys, created_at) "
             "VALUES ('o1', 'org', 365, false, :now)"),
            ("INSERT INTO devices (id, org_id, name, secret_sealed, endpoint, content, client_cert, ca_cert, state, "
             "created_at, updated_at) VALUES ('d1', 'o1', 'dev', 's', 'ep-1', '', '', '', 1, :now, :now)"),
            ("INSERT INTO certificate_authorities (id, org_id, source, active, subject, fingerprint, certificate_pem, "
             "parents_pem, key_sealed, not_after, crl_number, created_at) "
             "VALUES ('ca1', 'o1', 'generated', true, 'CN=x', 'f0', 'pem', '', 'k', :now, 1, :now)"),
            ("INSERT INTO device_certificates (id, org_id, device_id, ca_id, serial, common_name, fingerprint, "
             "certificate_pem, key_source, not_before, not_after, created_at) "
             "VALUES ('c1', 'o1', 'd1', 'ca1', '1', 'ep-1', 'f1', 'pem', 'server', :now, :now, :now)"),
            ("INSERT INTO psk_identities (id, identity, org_id, device_id, key_sealed, key_length, source, created_at) "
             "VALUES ('p1', 'id-1', 'o1', 'd1', 'k', 32, 'generated', :now)"),
        ]
        async with engine.begin() as connection:
            for statement in rows:
                await connection.execute(text(statement), {"now": datetime.fromisoformat(now)})
        await database.upgrade(engine)
        async with engine.connect() as connection:
            found = list(await connection.execute(text(
                "SELECT id, purpose, state FROM psk_identities UNION ALL SELECT id, purpose, state FROM device_certificates "
                "ORDER BY id"
            )))
            keys = (await connection.execute(text("SELECT count(*) FROM dtls_server_keys"))).scalar()
        assert keys == 0
        return [tuple(row) for row in found]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_keeps_existing_credentials_as_bootstrap_credentials(backend: str, postgres: PostgresCluster) -> None:
    url = postgres.new_database() if backend == "postgresql" else f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/m.db"
    assert asyncio.run(_upgrade_with_credentials(url)) == [("c1", "bootstrap", "active"), ("p1", "bootstrap", "active")]
