"""Native API: the live event stream (Server-Sent Events).

Each event is sent as ``id: <event id>``, ``event: <kind>`` and ``data: <the event as JSON>``, the
same JSON as an item of ``GET /api/v1/orgs/{org_id}/events``; a comment line ``: keep-alive`` goes out
after each quiet heartbeat interval. A client that reconnects with ``Last-Event-ID`` (browsers do)
first gets the events it missed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.services.errors import InvalidInput
from pilotboat.services.event_feed import event_json
from pilotboat.services.event_stream import EventStream

router = APIRouter(tags=["events"])

KEEP_ALIVE = b": keep-alive\n\n"
_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The events, as Server-Sent Events"},
    503: {"description": "This node serves as many streams as it may (PILOTBOAT_EVENT_STREAM_MAX)"},
}

KindsQuery = Annotated[
    list[str] | None,
    Query(description="Only these kinds: an exact kind (lwm2m.registered) or a prefix ending in '.' (lwm2m.); repeatable"),
]
AfterQuery = Annotated[
    int | None, Query(ge=0, description="Start after this event id (as the Last-Event-ID header, which wins when both are sent)"),
]
AfterHeader = Annotated[str | None, Header(alias="Last-Event-ID", description="Start after this event id")]


def frame(event: Any) -> bytes:
    """One event as an SSE message (JSON has no raw newlines, so ``data`` is one line)."""
    data = json.dumps(event_json(event), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def _frames(stream: EventStream) -> AsyncIterator[bytes]:
    async for event in stream:
        yield KEEP_ALIVE if event is None else frame(event)


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        super().__init__(_frames(stream), headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()  # also when the client left before the first event


def _after(header: str | None, query: int | None) -> int | None:
    if header is None or not header.strip():
        return query
    text = header.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise InvalidInput("Last-Event-ID: the id of an event (a non-negative integer)", field="Last-Event-ID")
    return int(text)


@router.get("/api/v1/orgs/{org_id}/events/stream", response_class=EventStreamResponse, status_code=200, responses=_STREAM_DOC,
            summary="The organisation's events, live (Server-Sent Events)")
async def org_event_stream(
    org_id: str, services: ServicesDep, principal: PrincipalDep, kind: KindsQuery = None, last_event_id: AfterQuery = None,
    last_event_id_header: AfterHeader = None,
) -> EventStreamResponse:
    stream = await services.event_streams.open(
        principal, org_id, after=_after(last_event_id_header, last_event_id), kinds=kind,
    )
    return EventStreamResponse(stream)


@router.get("/api/v1/events/stream", response_class=EventStreamResponse, status_code=200, responses=_STREAM_DOC,
            summary="Every organisation's events, live (system administrators)")
async def event_stream(
    services: ServicesDep, principal: PrincipalDep, kind: KindsQuery = None, last_event_id: AfterQuery = None,
    last_event_id_header: AfterHeader = None,
) -> EventStreamResponse:
    stream = await services.event_streams.open(
        principal, None, after=_after(last_event_id_header, last_event_id), kinds=kind,
    )
    return EventStreamResponse(stream)


def end_streams_on_exit_signal(end: Callable[[], None]) -> Callable[[], None]:
    """Call ``end`` (in the event loop) as soon as the process gets SIGINT or SIGTERM, before the
    handler already installed (the HTTP server's, which then waits for open responses to finish).
    Returns a function restoring the previous handlers. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(number)
        if not callable(previous):
            continue

        def chained(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            try:
                loop.call_soon_threadsafe(end)
            except RuntimeError:  # the loop is closed already
                pass
            previous(signum, frame)

        installed[number] = (previous, chained)
        signal.signal(number, chained)

    def restore() -> None:
        for number, (previous, chained) in installed.items():
            if signal.getsignal(number) is chained:
                signal.signal(number, previous)

    return restore
