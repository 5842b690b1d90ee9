"""The node's view of the ``events`` table as it grows, shared by the live event streams and the
webhook deliveries.

One task per node reads the events written since it last looked (woken by this node's
:class:`~pilotboat.services.event_log.EventLog`, and at least every ``poll`` seconds for what other
nodes and transactions write) and hands them to the subscribed streams and to the webhook workers
waiting for an organisation.

Ids are given out when a row is inserted but become visible when its transaction commits, so on
PostgreSQL id 11 can be seen before id 10. The feed therefore only passes a missing id once it shows
up, or once it has been missing for ``gap_wait`` seconds (a rolled-back insert leaves a hole for good).
``horizon`` is the id up to which everything is settled; readers never go past it, so a late commit
is not skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.services.event_log import EventLog
from pilotboat.store.tables import Event

log = logging.getLogger("pilotboat.events")

#: Longest pause between two reads of the table.
POLL_SECONDS = 1.0
#: How long a missing id holds back the events after it.
GAP_WAIT_SECONDS = 2.0
#: Pause between reads while an id is missing.
GAP_RECHECK_SECONDS = 0.1
#: Rows read at once.
PAGE = 1000
#: Events a subscriber may have waiting; beyond, it reads what it missed from the table.
SUBSCRIBER_BUFFER = 10_000

_TIMESTAMP = TypeAdapter(datetime)


def event_json(event: Event) -> dict[str, Any]:
    """An event as the API shows it (the item of ``GET /api/v1/orgs/{org_id}/events``), JSON-ready."""
    return {
        "id": event.id, "kind": event.kind, "org_id": event.org_id, "device_id": event.device_id,
        "outcome": event.outcome, "reason": event.reason, "actor": event.actor, "detail": event.detail,
        "created_at": _TIMESTAMP.dump_python(event.created_at, mode="json"),
    }


def kind_matches(kind: str, kinds: Sequence[str]) -> bool:
    """Whether ``kind`` passes a filter of exact kinds and prefixes ending in "." (empty: all pass)."""
    return not kinds or any(kind == wanted or (wanted.endswith(".") and kind.startswith(wanted)) for wanted in kinds)


def kind_condition(kinds: Sequence[str]) -> ColumnElement[bool] | None:
    """``kind_matches`` in SQL (None for an empty filter)."""
    if not kinds:
        return None
    return or_(*(Event.kind.startswith(wanted, autoescape=True) if wanted.endswith(".") else Event.kind == wanted
                 for wanted in kinds))


@dataclass(eq=False)
class Subscriber:
    """A live stream's inbox: the events of ``org_id`` (None: every organisation) passing ``kinds``."""

    org_id: str | None
    kinds: tuple[str, ...]
    queue: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when events were not queued (buffer full): the subscriber reads the table up to the horizon.
    missed: bool = False


class EventFeed:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        event_log: EventLog,
        *,
        poll: float = POLL_SECONDS,
        gap_wait: float = GAP_WAIT_SECONDS,
        buffer: int = SUBSCRIBER_BUFFER,
    ) -> None:
        self._sessions = sessions
        self._log = event_log
        self._poll, self._gap_wait, self._buffer = poll, gap_wait, buffer
        #: Every event with an id up to this one is visible (or given up for).
        self.horizon = 0
        self._gap_since: dict[int, float] = {}
        self._by_org: dict[str | None, set[Subscriber]] = {}
        self._newest_of_org: dict[str, int] = {}
        self._org_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.stopping = False

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start at the newest event (nothing before it is handed out)."""
        if self._task is not None:
            return
        async with self._sessions() as session:
            self.horizon = int(await session.scalar(select(func.max(Event.id))) or 0)
        self.stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event feed")

    def stop_streams(self) -> None:
        """End every live stream (the server is stopping; safe to call from a signal handler's callback)."""
        self.stopping = True
        for subscribers in self._by_org.values():
            for subscriber in subscribers:
                subscriber.wake.set()

    async def close(self) -> None:
        self.stop_streams()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for waiters in self._org_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # --- subscribers ------------------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return sum(len(subscribers) for subscribers in self._by_org.values())

    def subscribe(self, org_id: str | None, kinds: Iterable[str] = ()) -> Subscriber:
        subscriber = Subscriber(org_id, tuple(kinds))
        self._by_org.setdefault(org_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscribers = self._by_org.get(subscriber.org_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._by_org[subscriber.org_id]

    async def wait_for_org(self, org_id: str, seen: int, timeout: float) -> None:
        """Return once the feed has passed an event of ``org_id`` newer than ``seen`` (or after ``timeout``)."""
        if self._newest_of_org.get(org_id, 0) > seen or self.stopping:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._org_waiters.setdefault(org_id, set())
        waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._org_waiters.pop(org_id, None)

    async def read(
        self, org_id: str | None, after: int, *, until: int | None = None, kinds: Sequence[str] = (), limit: int = PAGE
    ) -> list[Event]:
        """Events of ``org_id`` (None: all) with ``after < id <= until`` (default: the horizon), oldest first."""
        conditions: list[ColumnElement[bool]] = [Event.id > after, Event.id <= (self.horizon if until is None else until)]
        if org_id is not None:
            conditions.append(Event.org_id == org_id)
        kind = kind_condition(kinds)
        if kind is not None:
            conditions.append(kind)
        async with self._sessions() as session:
            return list(await session.scalars(select(Event).where(*conditions).order_by(Event.id).limit(limit)))

    async def newest(self, org_id: str | None) -> int:
        """The id of the organisation's newest event (of all events for None); 0 when there is none."""
        query = select(func.max(Event.id))
        if org_id is not None:
            query = query.where(Event.org_id == org_id)
        async with self._sessions() as session:
            return int(await session.scalar(query) or 0)

    # --- the reader -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            written = self._log.written
            try:
                more, gap = await self._advance()
            except Exception:
                log.exception("could not read new events; retrying")
                more, gap = False, False
            if more or self._log.written != written:
                continue
            await self._log.wait(GAP_RECHECK_SECONDS if gap else self._poll)

    async def _advance(self) -> tuple[bool, bool]:
        """Read past the horizon once; (a full page was read, an id is missing)."""
        full_rows = bool(self._by_org)
        query = select(Event) if full_rows else select(Event.id, Event.org_id)
        async with self._sessions() as session:
            result = await session.execute(query.where(Event.id > self.horizon).order_by(Event.id).limit(PAGE))
            rows: list[Any] = list(result.scalars()) if full_rows else list(result)
        settled: list[Any] = []
        expected, now, gap = self.horizon + 1, time.monotonic(), False
        for row in rows:
            if row.id != expected:
                since = self._gap_since.setdefault(expected, now)
                if now - since < self._gap_wait:
                    gap = True
                    break
                log.debug("gave up waiting for missing event ids", extra={"first": expected, "last": row.id - 1})
            settled.append(row)
            expected = row.id + 1
        if settled:
            self.horizon = settled[-1].id
            self._gap_since = {key: since for key, since in self._gap_since.items() if key > self.horizon}
            self._publish(settled, full_rows)
        return len(rows) == PAGE and not gap, gap

    def _publish(self, rows: list[Any], full_rows: bool) -> None:
        orgs = set()
        for row in rows:
            if row.org_id is not None:
                orgs.add(row.org_id)
                self._newest_of_org[row.org_id] = row.id
        for org_id in orgs:
            for waiter in self._org_waiters.get(org_id, ()):
                if not waiter.done():
                    waiter.set_result(None)
        if not self._by_org:
            return
        if not full_rows:
            # Subscribed while the rows were read without their content: they read them from the table.
            for subscribers in self._by_org.values():
                for subscriber in subscribers:
                    subscriber.missed = True
                    subscriber.wake.set()
            return
        everything = self._by_org.get(None, set())
        for row in rows:
            targets = everything if row.org_id is None else (*self._by_org.get(row.org_id, ()), *everything)
            for subscriber in targets:
                if subscriber.missed or not kind_matches(row.kind, subscriber.kinds):
                    continue
                if len(subscriber.queue) >= self._buffer:
                    subscriber.queue.clear()
                    subscriber.missed = True
                else:
                    subscriber.queue.append(row)
                subscriber.wake.set()
