"""The batched event writer against a real SQLite database: batches, the wake-up of readers, the last
write on close, events kept while the database is away, and the capacity bound."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pilotboat.services import event_log as event_log_module
from pilotboat.services.event_log import EventLog
from pilotboat.services.events import MAX_REASON_CHARS
from pilotboat.store import database
from pilotboat.store.tables import Event


@dataclass
class Db:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    #: Rows of each INSERT into events, in order.
    inserts: list[int] = field(default_factory=list)

    async def events(self) -> list[Event]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Event).order_by(Event.id)))

    async def execute(self, statement: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(text(statement))


@asynccontextmanager
async def sqlite() -> AsyncIterator[Db]:
    engine = database.create_engine(f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='pilotboat-eventlog-')}/events.db")
    await database.upgrade(engine)
    db = Db(engine, database.session_factory(engine))

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO EVENTS"):
            db.inserts.append(len(parameters) if executemany else 1)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        yield db
    finally:
        await engine.dispose()


def run(test: Callable[[Db], Awaitable[None]]) -> None:
    async def main() -> None:
        async with sqlite() as db:
            await asyncio.wait_for(test(db), 60)

    asyncio.run(main())


def emit(log: EventLog, count: int, *, start: int = 0, org_id: str = "org-1") -> None:
    for number in range(start, start + count):
        log.emit("lwm2m.updated", org_id=org_id, device_id=f"dev-{number}", endpoint=f"ep-{number}", number=number)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_events_queued_before_the_writer_starts_go_out_in_full_batches_in_order() -> None:
    async def test(db: Db) -> None:
        log = EventLog(db.sessions, batch=5, interval=5.0, capacity=100)
        emit(log, 12)
        assert len(log) == 12 and await db.events() == []
        log.start()
        # A full batch does not wait for the interval: everything is written at once, five at a time.
        await until(lambda: log.written == 12, timeout=3)
        rows = await db.events()
        assert [row.detail["number"] for row in rows] == list(range(12))
        assert [row.id for row in rows] == sorted(row.id for row in rows)
        assert {row.kind for row in rows} == {"lwm2m.updated"} and rows[3].device_id == "dev-3"
        assert rows[3].detail == {"endpoint": "ep-3", "number": 3} and rows[3].outcome == "ok"
        assert rows[0].created_at.tzinfo is not None
        assert db.inserts == [5, 5, 2]
        assert len(log) == 0 and log.dropped == 0
        await log.close()

    run(test)


def test_a_partial_batch_waits_for_the_interval_and_wakes_readers() -> None:
    async def test(db: Db) -> None:
        log = EventLog(db.sessions, batch=100, interval=0.3)
        log.start()
        assert await log.wait(0.05) is False  # nothing written: the wait times out
        waiting = asyncio.create_task(log.wait(5.0))
        started = time.monotonic()
        emit(log, 3)
        await asyncio.sleep(0.1)
        assert await db.events() == [], "written before the interval"
        assert await waiting is True
        assert 0.25 <= time.monotonic() - started < 3
        assert [row.detail["number"] for row in await db.events()] == [0, 1, 2]
        assert db.inserts == [3]
        await log.close()

    run(test)


def test_close_writes_what_is_queued() -> None:
    async def test(db: Db) -> None:
        log = EventLog(db.sessions, batch=50, interval=30.0)
        log.start()
        emit(log, 7)
        await asyncio.sleep(0.05)
        assert await db.events() == []  # the writer is gathering a batch
        started = time.monotonic()
        await log.close()
        assert time.monotonic() - started < 5, "close waited for the interval"
        assert [row.detail["number"] for row in await db.events()] == list(range(7))
        assert log.written == 7 and len(log) == 0
        # A log never started writes on close too.
        idle = EventLog(db.sessions)
        idle.emit("bootstrap.failed", org_id=None, outcome="refused", reason="x" * (MAX_REASON_CHARS + 50))
        await idle.close()
        last = (await db.events())[-1]
        assert last.kind == "bootstrap.failed" and last.org_id is None and last.outcome == "refused"
        assert len(last.reason) == MAX_REASON_CHARS and last.reason.endswith("…")

    run(test)


def test_events_are_kept_while_the_database_fails_and_written_when_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_log_module, "RETRY_SECONDS", 0.1)

    async def test(db: Db) -> None:
        await db.execute("ALTER TABLE events RENAME TO events_away")
        log = EventLog(db.sessions, batch=4, interval=0.01)
        log.start()
        emit(log, 10)
        # Tried (and failed) at least twice, and the failed batch is back in the queue: the statement
        # is counted before it runs, so its rows are briefly in flight.
        await until(lambda: len(db.inserts) >= 2 and len(log) == 10)
        assert log.written == 0 and log.dropped == 0
        emit(log, 2, start=10)
        await db.execute("ALTER TABLE events_away RENAME TO events")
        await until(lambda: log.written == 12)
        assert [row.detail["number"] for row in await db.events()] == list(range(12))
        assert log.dropped == 0
        await log.close()

    run(test)


def test_the_queue_keeps_the_newest_events_within_its_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_log_module, "RETRY_SECONDS", 0.1)

    async def test(db: Db) -> None:
        with pytest.raises(ValueError):
            EventLog(db.sessions, batch=10, capacity=5)
        log = EventLog(db.sessions, batch=5, interval=0.01, capacity=10)
        emit(log, 15)
        assert len(log) == 10 and log.dropped == 5
        # While the database is away, failed batches go back to the queue without exceeding it.
        await db.execute("ALTER TABLE events RENAME TO events_away")
        log.start()
        await until(lambda: len(db.inserts) >= 1)
        emit(log, 3, start=15)
        assert len(log) <= 10
        await db.execute("ALTER TABLE events_away RENAME TO events")
        await until(lambda: len(log) == 0)
        numbers = [row.detail["number"] for row in await db.events()]
        assert numbers == list(range(8, 18)), numbers  # the newest ten of 18
        assert log.dropped == 8 and log.written == 10
        await log.close()

    run(test)


def test_close_with_the_database_away_gives_up_and_counts_the_lost_events() -> None:
    async def test(db: Db) -> None:
        await db.execute("ALTER TABLE events RENAME TO events_away")
        log = EventLog(db.sessions, batch=10, interval=30.0)
        log.start()
        emit(log, 4)
        await log.close()
        assert log.written == 0 and log.dropped == 4 and len(log) == 0

    run(test)
