"""Observations an application asked for: kept in the ``observations`` table, set up on the device
(Write-Attributes first when the observation has attributes, then GET with Observe: 0) whenever it is
registered and reachable, and set up again after every new registration, also after a restart. Each
notification (the first answer included, as sequence 0) becomes an ``lwm2m.notification`` event.

The state of a running observation (active, pending, failed, its last error and notification) lives in
this node's memory; rows stay until the observation is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.lwm2m import operations
from pilotboat.lwm2m.management_server import CoapDeviceLink, DeviceObservation
from pilotboat.lwm2m.messages import DeviceUnreachable, Reply
from pilotboat.lwm2m.model import Path
from pilotboat.lwm2m.operations import Operation
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.registry.service import RegistryService
from pilotboat.registry.store import Registration
from pilotboat.services import events
from pilotboat.services.access import require
from pilotboat.services.device_operations import (
    DeviceOperationService,
    DeviceTarget,
    capped_values,
    find_device,
    operation_input,
)
from pilotboat.services.errors import Conflict, NotFound
from pilotboat.services.event_log import EventLog
from pilotboat.services.transaction import writing
from pilotboat.store.tables import Observation

log = logging.getLogger("pilotboat.lwm2m.observations")

#: Observations one device may have.
MAX_PER_DEVICE = 64


class ObservationStatus(enum.StrEnum):
    ACTIVE = "active"  # running on the device
    PENDING = "pending"  # waits for the device to register or wake up
    FAILED = "failed"  # the device refused it, did not answer, or ended it: tried again at its next update


@dataclass(eq=False)
class _Live:
    """What this node knows of one observation."""

    observation_id: str
    org_id: str
    device_id: str
    path: Path
    attributes: dict[str, Any]
    created_by: str
    created_at: datetime
    status: ObservationStatus = ObservationStatus.PENDING
    error: str | None = None
    notifications: int = 0
    last_notification_at: float | None = None
    handle: DeviceObservation | None = None
    task: asyncio.Task[None] | None = None
    establishing: bool = False


@dataclass(frozen=True)
class ObservationView:
    id: str
    device_id: str
    path: str
    attributes: dict[str, Any]
    status: str
    error: str | None
    notifications: int
    last_notification_at: datetime | None
    created_at: datetime
    created_by: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "device_id": self.device_id, "path": self.path, "attributes": self.attributes,
            "status": self.status, "error": self.error, "notifications": self.notifications,
            "last_notification_at": self.last_notification_at.isoformat() if self.last_notification_at else None,
            "created_at": self.created_at.isoformat(), "created_by": self.created_by,
        }


def _view(live: _Live) -> ObservationView:
    last = datetime.fromtimestamp(live.last_notification_at, UTC) if live.last_notification_at is not None else None
    return ObservationView(
        live.observation_id, live.device_id, str(live.path), dict(live.attributes), str(live.status), live.error,
        live.notifications, last, live.created_at, live.created_by,
    )


def _live(row: Observation) -> _Live:
    return _Live(row.id, row.org_id, row.device_id, Path.parse(row.path), dict(row.attributes or {}), row.created_by,
                 row.created_at)


class ObservationService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        registry: RegistryService,
        link: CoapDeviceLink,
        event_log: EventLog,
        device_operations: DeviceOperationService,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._link = link
        self._events = event_log
        self._operations = device_operations
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._by_device: dict[str, set[str]] = {}
        #: Devices whose rows this node has read since it started.
        self._loaded: set[str] = set()

    # --- the API ----------------------------------------------------------------------------------

    async def create(
        self, principal: Principal, org_id: str, device_id: str, path: str, attributes: Mapping[str, Any] | None = None,
    ) -> ObservationView:
        """Keep an observation of ``path`` (409 when the device already has one); set it up now when the
        device is registered and reachable."""
        require(principal, org_id, Permission.WRITE)
        device = await find_device(self._sessions, org_id, device_id)
        with operation_input():
            at = operations.target(path, Operation.OBSERVE)
            if attributes:
                operations.attributes_query(attributes, at)
        async with writing(self._sessions, f"the device already has an observation of {at}") as session:
            count = len(list(await session.scalars(
                select(Observation.id).where(Observation.device_id == device_id).limit(MAX_PER_DEVICE)
            )))
            if count >= MAX_PER_DEVICE:
                raise Conflict(f"a device may have at most {MAX_PER_DEVICE} observations")
            row = Observation(org_id=org_id, device_id=device_id, path=str(at), attributes=dict(attributes or {}),
                              created_by=principal.email)
            session.add(row)
            await session.flush()
            live = _live(row)
        await self._load(device_id)
        live = self._live.setdefault(live.observation_id, live)
        self._by_device.setdefault(device_id, set()).add(live.observation_id)
        registration = await self._registry.for_device(device_id)
        if registration is not None and self._operations.reachable(registration):
            await self._establish(live, registration, device)
        return _view(live)

    async def list(self, principal: Principal, org_id: str, device_id: str) -> list[ObservationView]:
        require(principal, org_id, Permission.READ)
        await find_device(self._sessions, org_id, device_id)
        lives = await self._load(device_id)
        return [_view(live) for live in lives]

    async def delete(self, principal: Principal, org_id: str, device_id: str, observation_id: str) -> None:
        """Cancel an observation: stop it on the device and forget it."""
        require(principal, org_id, Permission.WRITE)
        async with writing(self._sessions) as session:
            row = await session.get(Observation, observation_id)
            if row is None or row.org_id != org_id or row.device_id != device_id:
                raise NotFound("observation not found")
            await session.delete(row)
        self._forget(observation_id)

    # --- as a RegistrationListener ------------------------------------------------------------------

    async def registered(self, registration: Registration, previous: Registration | None) -> None:
        """A new registration has no observations: set every one of the device up again."""
        lives = await self._load(registration.device_id, refresh=True)
        if not lives:
            return
        device = await find_device(self._sessions, registration.org_id, registration.device_id)
        for live in lives:
            self._stop(live)
        for live in lives:
            await self._establish(live, registration, device)

    async def updated(self, registration: Registration) -> None:
        """Set up what is not running yet (pending, or failed before)."""
        lives = [live for live in await self._load(registration.device_id) if live.status is not ObservationStatus.ACTIVE]
        if not lives:
            return
        device = await find_device(self._sessions, registration.org_id, registration.device_id)
        for live in lives:
            await self._establish(live, registration, device)

    async def ended(self, registration: Registration, why: str) -> None:
        for observation_id in list(self._by_device.get(registration.device_id, ())):
            live = self._live.get(observation_id)
            if live is None:
                continue
            self._stop(live)
            live.status, live.error = ObservationStatus.PENDING, f"the registration ended ({why})"

    # --- internals ------------------------------------------------------------------------------------

    async def _load(self, device_id: str, *, refresh: bool = False) -> list[_Live]:
        """The device's observations (read from the table once, or again with ``refresh``), oldest first."""
        if refresh or device_id not in self._loaded:
            async with self._sessions() as session:
                rows = list(await session.scalars(
                    select(Observation).where(Observation.device_id == device_id)
                    .order_by(Observation.created_at, Observation.id)
                ))
            stored = {row.id for row in rows}
            for observation_id in self._by_device.get(device_id, set()) - stored:  # cancelled on another node
                self._forget(observation_id)
            for row in rows:
                self._live.setdefault(row.id, _live(row))
            if stored:
                self._by_device[device_id] = stored
            else:
                self._by_device.pop(device_id, None)
            self._loaded.add(device_id)
        lives = [self._live[observation_id] for observation_id in self._by_device.get(device_id, ())]
        return sorted(lives, key=lambda live: (live.created_at, live.observation_id))

    def _forget(self, observation_id: str) -> None:
        live = self._live.pop(observation_id, None)
        if live is None:
            return
        self._stop(live)
        self._by_device.get(live.device_id, set()).discard(observation_id)

    @staticmethod
    def _stop(live: _Live) -> None:
        if live.task is not None:
            live.task.cancel()
            live.task = None
        if live.handle is not None:
            with contextlib.suppress(AssertionError):  # the device had already ended it
                live.handle.cancel()
            live.handle = None
        if live.status is ObservationStatus.ACTIVE:
            live.status = ObservationStatus.PENDING

    async def _establish(self, live: _Live, registration: Registration, device: DeviceTarget) -> None:
        if live.establishing:
            return
        live.establishing = True
        try:
            self._stop(live)
            error = await self._start(live, registration, device)
            if error is not None:
                live.status, live.error = ObservationStatus.FAILED, error
        finally:
            live.establishing = False

    async def _start(self, live: _Live, registration: Registration, device: DeviceTarget) -> str | None:
        """Set the observation up on the device; the reason when it could not be."""
        timeout = self._operations.default_timeout
        try:
            if live.attributes:
                reply = await self._link.send(registration, operations.attributes_request(live.path, live.attributes), timeout)
                if not reply.ok:
                    return f"Write-Attributes answered {reply.code}: {operations.diagnostic(reply)}"
            request = operations.observe_request(live.path, operations.read_accept(device.content_formats))
            handle = await self._link.observe(registration, request, timeout)
        except DeviceUnreachable as exc:
            return str(exc)
        if not handle.first.ok:
            return f"Observe answered {handle.first.code}: {operations.diagnostic(handle.first)}"
        if self._live.get(live.observation_id) is not live:  # cancelled meanwhile
            with contextlib.suppress(AssertionError):
                handle.cancel()
            return None
        live.status, live.error, live.handle = ObservationStatus.ACTIVE, None, handle
        self._notified(live, handle.first)
        live.task = asyncio.get_running_loop().create_task(self._follow(live, handle), name="observation")
        return None

    async def _follow(self, live: _Live, handle: DeviceObservation) -> None:
        async for reply in handle.notifications():
            self._notified(live, reply)
        if live.handle is handle:  # not stopped here: the device ended it
            live.handle, live.task = None, None
            live.status, live.error = ObservationStatus.FAILED, "the device ended the observation"

    def _notified(self, live: _Live, reply: Reply) -> None:
        sequence = live.notifications
        live.notifications += 1
        live.last_notification_at = self._clock()
        result = operations.outcome(Operation.OBSERVE, reply, live.path)
        detail: dict[str, Any] = {
            "observation_id": live.observation_id, "path": str(live.path), "format": result.format, "sequence": sequence,
            "code": result.code,
        }
        if result.values is not None:
            detail.update(capped_values(result.values))
        if result.error is not None:
            detail["error"] = result.error
        self._events.emit(
            events.LWM2M_NOTIFICATION, org_id=live.org_id, device_id=live.device_id,
            outcome="ok" if result.ok and result.error is None else "failed", reason=result.error, **detail,
        )

    async def close(self) -> None:
        """Stop following every observation (shutdown)."""
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for live in self._live.values():
            self._stop(live)
        await asyncio.gather(*tasks, return_exceptions=True)
