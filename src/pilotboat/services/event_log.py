"""Events of the device-facing hot paths (registrations, notifications, operation results), written in
batches outside any request transaction.

``emit`` never waits: it queues the event and a background task inserts what is queued in one Core
``INSERT`` (executemany) every ``interval`` seconds or as soon as ``batch`` events wait. Readers of the
``events`` table (the live stream, webhooks) call ``wait`` to wake up when a batch is written here;
they still poll, because other nodes and transactional events (``events.record``) write too.

When the database is away the queue keeps at most ``capacity`` events; older ones are dropped and
counted (``dropped``), so a long outage costs events rather than the node's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.services.events import clipped
from pilotboat.store.tables import Event, utcnow

log = logging.getLogger("pilotboat.events")

#: Pause after a failed write before the next attempt.
RETRY_SECONDS = 1.0
#: Longest wait in ``close`` for the last writes.
CLOSE_SECONDS = 10.0


class EventLog:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        batch: int = 500,
        interval: float = 0.05,
        capacity: int = 100_000,
    ) -> None:
        if batch < 1 or interval <= 0 or capacity < batch:
            raise ValueError("batch and interval must be positive and capacity at least one batch")
        self._sessions = sessions
        self._batch, self._interval = batch, interval
        self._queue: deque[dict[str, Any]] = deque()
        self._capacity = capacity
        self._pending = asyncio.Event()
        self._written = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.dropped = 0
        self.written = 0

    def emit(
        self,
        kind: str,
        *,
        org_id: str | None,
        device_id: str | None = None,
        actor: str | None = None,
        outcome: str = "ok",
        reason: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue one event (same fields as ``events.record``); it is written within ``interval``."""
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append({
            "kind": kind, "org_id": org_id, "device_id": device_id, "actor": actor, "outcome": outcome,
            "reason": clipped(reason), "detail": detail, "created_at": utcnow(),
        })
        if len(self._queue) >= self._batch or not self._pending.is_set():
            self._pending.set()

    def __len__(self) -> int:
        """Events queued, not yet written."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event log writer")

    async def close(self) -> None:
        """Write what is still queued and stop the writer (one attempt: what fails then is logged and lost).

        The writer finishes its batch rather than being cancelled in the middle of a commit, which could
        write that batch twice."""
        self._closing.set()
        if self._task is None:
            await self._write_all_once()
            return
        self._pending.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_SECONDS)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            log.error("gave up writing the last queued events", extra={"lost": len(self._queue)})
        self._task = None

    async def wait(self, timeout: float = 1.0) -> bool:
        """Wait until this node writes a batch, at most ``timeout`` seconds; True when one was written."""
        async with self._written:
            try:
                await asyncio.wait_for(self._written.wait(), timeout)
            except TimeoutError:
                return False
        return True

    async def flush(self) -> None:
        """Write everything queued now (tests, shutdown)."""
        while self._queue:
            await self._write()

    async def _run(self) -> None:
        while not self._closing.is_set():
            await self._pending.wait()
            if len(self._queue) < self._batch:
                try:  # gather a batch (close cuts this short)
                    await asyncio.wait_for(self._closing.wait(), self._interval)
                except TimeoutError:
                    pass
            self._pending.clear()
            if self._closing.is_set():
                break
            try:
                while self._queue:
                    await self._write()
            except Exception:
                log.exception("could not write events; retrying", extra={"queued": len(self._queue)})
                await asyncio.sleep(RETRY_SECONDS)
                self._pending.set()
        await self._write_all_once()

    async def _write_all_once(self) -> None:
        try:
            while self._queue:
                await self._write()
        except Exception:
            log.exception("could not write the last queued events", extra={"lost": len(self._queue)})
            self.dropped += len(self._queue)
            self._queue.clear()

    async def _write(self) -> None:
        rows = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
        try:
            async with self._sessions.begin() as session:
                await session.execute(insert(Event), rows)
        except BaseException:
            # Back to the front, in order, within the capacity (the newest events win).
            room = self._capacity - len(self._queue)
            self.dropped += max(0, len(rows) - room)
            self._queue.extendleft(reversed(rows[len(rows) - max(0, room):]))
            raise
        self.written += len(rows)
        async with self._written:
            self._written.notify_all()
