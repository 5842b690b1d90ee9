"""The Alembic migrations create exactly the schema the SQLAlchemy tables declare, on both backends."""

from __future__ import annotations

import asyncio
import tempfile

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
