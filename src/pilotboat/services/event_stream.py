"""Live event streams: an organisation's events as they are written, resumable after a given id.

A stream starts at the organisation's newest event, or after ``after`` (the last id a client saw):
it then first reads the missed events from the table, and goes on with what the feed hands out.
Streams are bounded per node (``max_streams``); the stream ends when the server stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import Forbidden, InvalidInput, Unavailable
from pilotboat.services.event_feed import EventFeed, Subscriber
from pilotboat.store.tables import Event

#: Events read from the table at once while catching up.
CATCH_UP_PAGE = 500
#: Longest kind filter, and most filters per stream.
MAX_KIND_CHARS = 64
MAX_KINDS = 32


def checked_kinds(kinds: Sequence[str] | None, field: str = "kind") -> tuple[str, ...]:
    """A kind filter as given by a caller: exact kinds and prefixes ending in "."; duplicates dropped."""
    if kinds is None:
        return ()
    if len(kinds) > MAX_KINDS:
        raise InvalidInput(f"{field}: at most {MAX_KINDS} kinds", field=field)
    checked: list[str] = []
    for kind in kinds:
        if (not isinstance(kind, str) or not 1 <= len(kind) <= MAX_KIND_CHARS
                or any(char.isspace() or not char.isprintable() for char in kind)):
            raise InvalidInput(
                f"{field}: each kind is an event kind (e.g. lwm2m.registered) or a prefix ending in '.' (e.g. lwm2m.), "
                f"1 to {MAX_KIND_CHARS} characters without spaces",
                field=field,
            )
        if kind not in checked:
            checked.append(kind)
    return tuple(checked)


class EventStream:
    """One client's stream: iterate for events, and ``None`` for each ``heartbeat`` seconds of quiet."""

    def __init__(self, feed: EventFeed, subscriber: Subscriber, cursor: int, *, catch_up: bool, heartbeat: float) -> None:
        self._feed = feed
        self._subscriber = subscriber
        self.cursor = cursor
        subscriber.missed = catch_up
        self._heartbeat = heartbeat
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feed.unsubscribe(self._subscriber)

    async def __aiter__(self) -> AsyncIterator[Event | None]:
        subscriber, feed = self._subscriber, self._feed
        try:
            while not feed.stopping and not self._closed:
                if subscriber.missed:
                    # Read from the table up to the horizon; later events are queued meanwhile.
                    until = feed.horizon
                    subscriber.missed = False
                    subscriber.queue.clear()
                    while self.cursor < until and not subscriber.missed:
                        rows = await feed.read(subscriber.org_id, self.cursor, until=until, kinds=subscriber.kinds,
                                               limit=CATCH_UP_PAGE)
                        for event in rows:
                            self.cursor = event.id
                            yield event
                        if len(rows) < CATCH_UP_PAGE:
                            break
                    continue
                while subscriber.queue and not subscriber.missed:
                    event = subscriber.queue.popleft()
                    if event.id > self.cursor:
                        self.cursor = event.id
                        yield event
                if subscriber.missed or feed.stopping:
                    continue
                subscriber.wake.clear()
                try:
                    await asyncio.wait_for(subscriber.wake.wait(), self._heartbeat)
                except TimeoutError:
                    yield None
        finally:
            self.close()


class EventStreams:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], feed: EventFeed, *, max_streams: int, heartbeat: float
    ) -> None:
        self._sessions = sessions
        self._feed = feed
        self._max = max_streams
        self._heartbeat = heartbeat

    @property
    def open_streams(self) -> int:
        return self._feed.subscribers

    async def open(
        self, principal: Principal, org_id: str | None, *, after: int | None = None, kinds: Sequence[str] | None = None
    ) -> EventStream:
        """A stream of ``org_id``'s events (``None``: every organisation, system administrators only),
        after the event ``after`` or, without it, from now on. Close it when done."""
        wanted = checked_kinds(kinds)
        if org_id is None:
            if not principal.acts_as_system_admin:
                raise Forbidden("the deployment-wide event stream is for system administrators")
        else:
            require(principal, org_id, Permission.READ)
            async with self._sessions() as session:
                await require_org(session, org_id)
        if after is not None and after < 0:
            raise InvalidInput("last event id: a non-negative integer", field="last_event_id")
        cursor = after if after is not None else await self._feed.newest(org_id)
        if self._feed.stopping:
            raise Unavailable("the server is stopping; reconnect to another node or in a moment")
        if self._feed.subscribers >= self._max:
            raise Unavailable(
                f"this node already serves {self._max} live event streams (PILOTBOAT_EVENT_STREAM_MAX); retry later"
            )
        subscriber = self._feed.subscribe(org_id, wanted)
        return EventStream(self._feed, subscriber, cursor, catch_up=after is not None, heartbeat=self._heartbeat)
