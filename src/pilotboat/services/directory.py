"""The device directory (Pelion style): what the management server knows of each device that ever
registered, its current registration when it is registered, and its registration history (events)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.registry.service import RegistryService
from pilotboat.registry.store import Registration
from pilotboat.services.access import require
from pilotboat.services.errors import InvalidInput, NotFound
from pilotboat.store.tables import DirectoryEntry, Event

STATUSES = ("registered", "deregistered", "expired")
#: Registration events shown with an entry, newest first.
HISTORY_EVENTS = 20


@dataclass(frozen=True)
class LiveRegistration:
    registration: Registration
    expires_at: datetime


@dataclass(frozen=True)
class DirectoryView:
    entry: DirectoryEntry
    #: The registration this node holds, when the device is registered.
    live: LiveRegistration | None
    #: ``lwm2m.*`` events of the device, newest first (only in ``get``).
    history: list[Event]


class DirectoryService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], registry: RegistryService) -> None:
        self._sessions = sessions
        self._registry = registry

    async def list(
        self, principal: Principal, org_id: str, *, status: str | None = None, endpoint: str | None = None,
        offset: int = 0, limit: int = 50,
    ) -> tuple[int, list[DirectoryView]]:
        """Entries of the organisation, most recently registered first."""
        require(principal, org_id, Permission.READ)
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
        conditions = [DirectoryEntry.org_id == org_id]
        if status is not None:
            conditions.append(DirectoryEntry.status == status)
        if endpoint is not None:
            conditions.append(DirectoryEntry.endpoint == endpoint)
        async with self._sessions() as session:
            total = await session.scalar(select(func.count()).select_from(DirectoryEntry).where(*conditions)) or 0
            rows = (await session.scalars(
                select(DirectoryEntry).where(*conditions)
                .order_by(DirectoryEntry.last_registered_at.desc(), DirectoryEntry.device_id).offset(offset).limit(limit)
            )).all()
        return total, [DirectoryView(row, await self._live(row), []) for row in rows]

    async def get(self, principal: Principal, org_id: str, device_id: str) -> DirectoryView:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            entry = await session.get(DirectoryEntry, device_id)
            if entry is None or entry.org_id != org_id:
                raise NotFound("the device has never registered (or does not exist)")
            history = (await session.scalars(
                select(Event).where(Event.org_id == org_id, Event.device_id == device_id, Event.kind.like("lwm2m.%"),
                                    Event.kind.not_in(("lwm2m.notification", "lwm2m.operation")))
                .order_by(Event.id.desc()).limit(HISTORY_EVENTS)
            )).all()
        return DirectoryView(entry, await self._live(entry), list(history))

    async def _live(self, entry: DirectoryEntry) -> LiveRegistration | None:
        if entry.status != "registered":
            return None
        registration = await self._registry.store.get(entry.registration_id)
        if registration is None or registration.device_id != entry.device_id:
            return None
        return LiveRegistration(registration, datetime.fromtimestamp(self._registry.expires_at(registration), UTC))
