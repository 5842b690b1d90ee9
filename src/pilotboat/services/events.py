"""Audit events: every change and every bootstrap attempt, written in the caller's transaction.

Event details are built by the services from non-secret fields only; nothing here ever receives a
password, key or secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import Forbidden
from pilotboat.store.tables import Event

log = logging.getLogger("pilotboat.events")

#: A configuration was served to a device; a device's last bootstrap time is read from these.
BOOTSTRAP_SUCCEEDED = "bootstrap.succeeded"
#: A bootstrap was refused or did not complete; ``outcome`` and ``reason`` say how.
BOOTSTRAP_FAILED = "bootstrap.failed"
#: The LwM2M management server (issue 5): registrations and what happens to them.
LWM2M_REGISTERED = "lwm2m.registered"
LWM2M_UPDATED = "lwm2m.updated"
LWM2M_DEREGISTERED = "lwm2m.deregistered"
LWM2M_EXPIRED = "lwm2m.expired"
LWM2M_REFUSED = "lwm2m.refused"
LWM2M_HELD = "lwm2m.held"
LWM2M_RELEASED = "lwm2m.released"
#: A notification of an observation, with the decoded values.
LWM2M_NOTIFICATION = "lwm2m.notification"
#: The result of a device operation (read, write, execute…) requested over the API.
LWM2M_OPERATION = "lwm2m.operation"
#: Size of the events.reason column.
MAX_REASON_CHARS = 256


def clipped(reason: str | None) -> str | None:
    """``reason`` cut to the size of the events.reason column."""
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        return reason[: MAX_REASON_CHARS - 1] + "…"
    return reason


def record(
    session: AsyncSession,
    kind: str,
    *,
    org_id: str | None,
    device_id: str | None = None,
    actor: str | None = None,
    outcome: str = "ok",
    reason: str | None = None,
    **detail: Any,
) -> None:
    """Add an event to ``session`` (committed, or rolled back, with the change it describes)."""
    session.add(
        Event(kind=kind, org_id=org_id, device_id=device_id, actor=actor, outcome=outcome, reason=clipped(reason),
              detail=detail)
    )
    log.info(
        f"event {kind}",
        extra={"event_kind": kind, "org_id": org_id, "device_id": device_id, "outcome": outcome, "reason": reason},
    )


@dataclass(frozen=True)
class EventFilter:
    device_id: str | None = None
    kind: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    offset: int = 0
    limit: int = 50


class EventService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def list(self, principal: Principal, org_id: str | None, flt: EventFilter) -> tuple[int, list[Event]]:
        """Events of one organisation, newest first; ``org_id=None`` (system administrators only) lists
        deployment-wide events, including bootstrap attempts that matched no device."""
        if org_id is None:
            if not principal.acts_as_system_admin:
                raise Forbidden("deployment-wide events are for system administrators")
            conditions = []
        else:
            require(principal, org_id, Permission.READ)
            conditions = [Event.org_id == org_id]
        if flt.device_id:
            conditions.append(Event.device_id == flt.device_id)
        if flt.kind:
            conditions.append(Event.kind == flt.kind if not flt.kind.endswith(".") else Event.kind.startswith(flt.kind, autoescape=True))
        if flt.outcome:
            conditions.append(Event.outcome == flt.outcome)
        if flt.since:
            conditions.append(Event.created_at >= flt.since)
        if flt.until:
            conditions.append(Event.created_at < flt.until)
        async with self._sessions() as session:
            if org_id is not None:
                await require_org(session, org_id)
            total = await session.scalar(select(func.count()).select_from(Event).where(*conditions))
            rows = await session.scalars(
                select(Event).where(*conditions).order_by(Event.id.desc()).offset(flt.offset).limit(flt.limit)
            )
            return int(total or 0), list(rows)
