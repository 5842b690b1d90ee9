"""The native API (``/api/v1``)."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native import (
    accounts,
    credentials,
    devices,
    directory,
    event_stream,
    lwm2m,
    management_servers,
    webhooks,
)
from pilotboat.api.native.schemas import EventOut, EventPage
from pilotboat.services.events import EventFilter

router = APIRouter()
router.include_router(accounts.router)
router.include_router(devices.router)
router.include_router(credentials.router)
router.include_router(credentials.org_router)
router.include_router(management_servers.router)
router.include_router(webhooks.router)
router.include_router(event_stream.router)
router.include_router(directory.router)
router.include_router(lwm2m.router)


@router.get("/api/v1/events", response_model=EventPage, tags=["events"], summary="Deployment-wide events (system administrators)")
async def list_all_events(
    services: ServicesDep, principal: PrincipalDep,
    offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50,
    kind: Annotated[str | None, Query(max_length=64)] = None, outcome: Annotated[str | None, Query(max_length=16)] = None,
    since: datetime | None = None, until: datetime | None = None,
) -> EventPage:
    flt = EventFilter(kind=kind, outcome=outcome, since=since, until=until, offset=offset, limit=limit)
    total, rows = await services.events.list(principal, None, flt)
    return EventPage(total=total, offset=offset, limit=limit, events=[EventOut.of(event) for event in rows])
