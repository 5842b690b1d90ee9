"""The LwM2M registration interface as a service: Register, Update and De-register, lifetimes and
expiry, the registration rate limit, the device directory, and the events of all of them.

The CoAP door (``lwm2m.management_server``) parses and answers; this module decides. Refusals are
``RegistrationError`` with the CoAP code the door sends. Listeners (device operations, observations)
hear about registrations after the answer has gone out, so a device never gets a request before it
knows it is registered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.lwm2m.registration import RegisteredObjects, RegisterQuery, RegistrationError, UpdateQuery
from pilotboat.model.credential import Purpose
from pilotboat.model.peer import PeerIdentity
from pilotboat.registry.hold import Admission, RegistrationHold
from pilotboat.registry.store import Address, Registration, RegistrationStore
from pilotboat.security.throttle import RateBudget
from pilotboat.services import events
from pilotboat.services.event_log import EventLog
from pilotboat.services.device_identity import AuthenticatedDevice, DeviceIdentityService, Door, IdentityRefused
from pilotboat.store.tables import Device, DeviceCertificate, DirectoryEntry, PskIdentity

log = logging.getLogger("pilotboat.lwm2m.registry")

#: Events per second recorded for Register requests naming no known device.
UNKNOWN_ENDPOINT_EVENTS_PER_SECOND = 20
#: Longest sleep of the expiry task: holds end and registrations expire at most this late.
EXPIRY_TICK = 1.0


class RegistrationListener(Protocol):
    """Told about registrations after the device has its answer (in a task of its own)."""

    async def registered(self, registration: Registration, previous: Registration | None) -> None: ...

    async def updated(self, registration: Registration) -> None: ...

    async def ended(self, registration: Registration, why: str) -> None:
        """``why``: "deregistered", "expired" or "replaced"."""
        ...


def address_text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def same_credential(one: PeerIdentity | None, other: PeerIdentity | None) -> bool:
    """Whether two requests came with the same credential: both over plain CoAP, the same PSK identity,
    or the same client certificate."""
    if one is None or other is None:
        return one is other
    if one.psk_identity is not None or other.psk_identity is not None:
        return one.psk_identity == other.psk_identity
    return bool(one.certificate_chain) and one.certificate_chain[:1] == other.certificate_chain[:1]


def _holds_management_credentials(now: datetime) -> ColumnElement[bool]:
    """A column of the device query: whether the device has a management PSK or a valid, unrevoked
    management certificate (then it registers over DTLS only)."""
    psk = exists().where(PskIdentity.device_id == Device.id, PskIdentity.purpose == Purpose.MANAGEMENT)
    certificate = exists().where(
        DeviceCertificate.device_id == Device.id, DeviceCertificate.purpose == Purpose.MANAGEMENT,
        DeviceCertificate.revoked_at.is_(None), DeviceCertificate.not_after > now,
    )
    return or_(psk, certificate).label("secured")


def new_registration_id() -> str:
    """Short, unguessable: without DTLS it is what lets a device update or end its registration."""
    return secrets.token_urlsafe(9)


class RegistryService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: RegistrationStore,
        event_log: EventLog,
        *,
        identity: DeviceIdentityService,
        hold: RegistrationHold,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self.store = store
        self._events = event_log
        self._identity = identity
        self._hold = hold
        self._clock = clock
        self._monotonic = monotonic
        self._listeners: list[RegistrationListener] = []
        self._unknown_events = RateBudget(UNKNOWN_ENDPOINT_EVENTS_PER_SECOND, burst=UNKNOWN_ENDPOINT_EVENTS_PER_SECOND)
        self._tasks: set[asyncio.Task[None]] = set()
        #: (org id, device id) of held endpoints, for their release events.
        self._held_owners: dict[str, tuple[str, str]] = {}
        self._expiry: asyncio.Task[None] | None = None
        #: Registrations this node holds (for metrics).
        self.registered = 0

    def add_listener(self, listener: RegistrationListener) -> None:
        self._listeners.append(listener)

    # --- the registration interface -------------------------------------------------------------

    async def register(
        self, query: RegisterQuery, objects: RegisteredObjects, address: Address, peer: PeerIdentity | None
    ) -> Registration:
        """Register ``query.endpoint`` (replacing its previous registration); ``RegistrationError``
        4.00 for an unknown endpoint, 4.03 for an inactive device, 4.29 while the endpoint is on hold.

        Over DTLS (``peer`` set) the credential must resolve at the management door to the device named
        by the endpoint (4.03 otherwise). Over plain CoAP a device holding management credentials is
        refused (4.03): once it has credentials, nobody may register in its name without them."""
        await self._admit(query.endpoint, None)
        authenticated = await self._authenticate(query.endpoint, peer, address) if peer is not None else None
        now = self._clock()
        refusal: RegistrationError | None = None
        async with self._sessions.begin() as session:
            device = (await session.execute(
                select(Device.id, Device.org_id, Device.state, _holds_management_credentials(datetime.now(UTC)))
                .where(Device.endpoint == query.endpoint)
            )).one_or_none()
            if device is None or device.state != 1:
                refusal = self._refuse(query.endpoint, device, address)
            elif authenticated is not None and authenticated.device_id != device.id:
                # Recorded for the credential's own device: the endpoint may be another organisation's.
                refusal = self._refuse_credential(
                    query.endpoint, (authenticated.org_id, authenticated.device_id), address, "credential of another device",
                )
            elif authenticated is None and device.secured:
                refusal = self._refuse_credential(
                    query.endpoint, (device.org_id, device.id), address, "device holds DTLS credentials: register over DTLS",
                )
            else:
                registration = Registration(
                    registration_id=new_registration_id(), endpoint=query.endpoint, device_id=device.id,
                    org_id=device.org_id, address=address, lifetime=query.lifetime, lwm2m_version=query.lwm2m_version,
                    binding=query.binding, queue_mode=query.queue_mode, sms=query.sms, objects=objects.links,
                    registered_at=now, updated_at=now, peer=peer,
                )
                entry = await self._write_directory(session, registration, objects)
        if refusal is not None:
            raise refusal
        previous = await self.store.add(registration)
        self.registered += previous is None
        self._events.emit(
            events.LWM2M_REGISTERED, org_id=registration.org_id, device_id=registration.device_id,
            actor=self._actor(registration.endpoint), endpoint=registration.endpoint,
            original_endpoint=entry.first_endpoint, registration_id=registration.registration_id,
            first_registration=entry.registrations == 1, lwm2m_version=registration.lwm2m_version,
            binding=registration.binding, queue_mode=registration.queue_mode, lifetime=registration.lifetime,
            address=address_text(address), objects=list(registration.objects), content_formats=list(objects.content_formats),
            replaced=previous.registration_id if previous is not None else None,
            security_mode=authenticated.security_mode.name if authenticated is not None else "NOSEC",
            credential_id=authenticated.credential_id if authenticated is not None else None,
        )
        self._notify(lambda listener: listener.registered(registration, previous))
        return registration

    async def update(
        self, registration_id: str, query: UpdateQuery, objects: RegisteredObjects | None, address: Address, *,
        peer: PeerIdentity | None,
    ) -> Registration:
        """Apply an Update; ``RegistrationError`` 4.04 for an unknown registration (the client then
        registers again), 4.29 while its endpoint is on hold, 4.03/4.04 from another credential
        (``check_sender``)."""
        current = await self.store.get(registration_id)
        if current is None:
            raise RegistrationError("4.04", "no such registration: register again")
        self.check_sender(current, peer, address, "update")
        await self._admit(current.endpoint, (current.org_id, current.device_id))
        changes: dict[str, Any] = {"updated_at": self._clock()}
        if query.lifetime is not None and query.lifetime != current.lifetime:
            changes["lifetime"] = query.lifetime
        if query.binding is not None and (query.binding, query.queue_mode) != (current.binding, current.queue_mode):
            changes["binding"], changes["queue_mode"] = query.binding, query.queue_mode
        if query.sms is not None and query.sms != current.sms:
            changes["sms"] = query.sms
        if objects is not None and objects.links != current.objects:
            changes["objects"] = objects.links
        if address != current.address:
            changes["address"] = address
        updated = await self.store.update(registration_id, **changes)
        if updated is None:  # ended while this update was admitted
            raise RegistrationError("4.04", "no such registration: register again")
        changed = sorted(set(changes) - {"updated_at"})
        if changed:
            await self._update_directory(updated, objects)
        self._events.emit(
            events.LWM2M_UPDATED, org_id=updated.org_id, device_id=updated.device_id, actor=self._actor(updated.endpoint),
            endpoint=updated.endpoint, registration_id=registration_id, changed=changed, lifetime=updated.lifetime,
            address=address_text(updated.address),
        )
        self._notify(lambda listener: listener.updated(updated))
        return updated

    async def deregister(self, registration_id: str, *, peer: PeerIdentity | None, address: Address) -> Registration:
        """End a registration at the device's request; ``RegistrationError`` 4.04 when unknown, 4.03/4.04
        from another credential (``check_sender``)."""
        current = await self.store.get(registration_id)
        if current is None:
            raise RegistrationError("4.04", "no such registration")
        self.check_sender(current, peer, address, "de-register")
        registration = await self.store.remove(registration_id)
        if registration is None:
            raise RegistrationError("4.04", "no such registration")
        await self._end([registration], "deregistered", events.LWM2M_DEREGISTERED)
        return registration

    def check_sender(self, registration: Registration, peer: PeerIdentity | None, address: Address, action: str) -> None:
        """An Update or De-register must come with the credential of the Register. A registration made
        over DTLS does not exist for plain CoAP (4.04, as for an unknown id), nor one made over plain CoAP
        for DTLS (4.04: the device registers again, over DTLS); another DTLS credential gets 4.03. Each
        refusal is recorded."""
        if same_credential(registration.peer, peer):
            return
        if registration.peer is None or peer is None:
            code, reason = "4.04", (f"{action} over plain CoAP of a registration made over DTLS" if peer is None
                                    else f"{action} over DTLS of a registration made over plain CoAP")
            answer = "no such registration: register again"
        else:
            code, reason, answer = "4.03", f"{action} with another credential than the registration's", "forbidden"
        self._events.emit(
            events.LWM2M_REFUSED, org_id=registration.org_id, device_id=registration.device_id,
            actor=self._actor(registration.endpoint), outcome="refused", reason=reason, endpoint=registration.endpoint,
            registration_id=registration.registration_id, address=address_text(address),
        )
        raise RegistrationError(code, answer)

    # --- lookups ------------------------------------------------------------------------------------

    async def for_device(self, device_id: str) -> Registration | None:
        """The device's current registration, if it is registered."""
        async with self._sessions() as session:
            endpoint = await session.scalar(
                select(DirectoryEntry.endpoint).where(DirectoryEntry.device_id == device_id)
            )
        if endpoint is None:
            return None
        registration = await self.store.by_endpoint(endpoint)
        return registration if registration is not None and registration.device_id == device_id else None

    def expires_at(self, registration: Registration) -> float:
        return registration.expires_at(self.store.grace)

    # --- expiry and holds ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start expiring registrations. With a store that does not survive restarts, directory
        entries still "registered" from before are marked expired first: their devices' next Update
        gets 4.04 and they register again."""
        if not self.store.durable:
            async with self._sessions.begin() as session:
                lost = (await session.execute(
                    update(DirectoryEntry).where(DirectoryEntry.status == "registered")
                    .values(status="expired", ended_at=_when(self._clock()))
                )).rowcount
            if lost:
                log.warning("registrations held before the restart are gone; their devices will register again",
                            extra={"count": lost})
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._run_expiry(), name="registration expiry")

    async def close(self) -> None:
        tasks = [task for task in (self._expiry, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._expiry = None

    async def expire_due(self) -> int:
        """End every registration past its expiry and report ended holds; the number expired."""
        expired = await self.store.pop_expired(self._clock())
        if expired:
            await self._end(expired, "expired", events.LWM2M_EXPIRED)
        for endpoint in self._hold.release_due(self._monotonic()):
            self._released(endpoint)
        return len(expired)

    async def _run_expiry(self) -> None:
        while True:
            try:
                await self.expire_due()
            except Exception:
                log.exception("could not expire registrations; trying again")
            next_expiry = await self.store.next_expiry()
            wait = EXPIRY_TICK if next_expiry is None else min(EXPIRY_TICK, max(0.0, next_expiry - self._clock()))
            await asyncio.sleep(wait)

    # --- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _actor(endpoint: str) -> str:
        return f"device:{endpoint[:64]}"

    async def _admit(self, endpoint: str, owner: tuple[str, str] | None) -> None:
        """Count a Register/Update of ``endpoint`` against the rate limit; 4.29 while on hold.
        ``owner`` (org id, device id) is known for an Update; a Register looks it up only to record
        that a hold started."""
        decision = self._hold.admit(endpoint, self._monotonic())
        if decision.released:
            self._released(endpoint)
        if decision.admission is Admission.ADMITTED:
            return
        retry_after = max(1, round(decision.retry_after))
        if decision.admission is Admission.HOLD_STARTED:
            if owner is None:
                owner = await self._owner(endpoint)
            if owner is not None:
                self._held_owners[endpoint] = owner
            log.warning("endpoint put on hold", extra={"endpoint": endpoint[:64], "seconds": retry_after})
            org_id, device_id = owner or (None, None)
            self._events.emit(
                events.LWM2M_HELD, org_id=org_id, device_id=device_id, actor=self._actor(endpoint), outcome="refused",
                reason=f"more than {self._hold.limit} registrations or updates within {self._hold.window:g} s",
                endpoint=endpoint, retry_after=retry_after,
            )
        raise RegistrationError("4.29", f"too many registrations: on hold for {retry_after} s", retry_after=retry_after)

    def _released(self, endpoint: str) -> None:
        org_id, device_id = self._held_owners.pop(endpoint, (None, None))
        self._events.emit(events.LWM2M_RELEASED, org_id=org_id, device_id=device_id, actor=self._actor(endpoint),
                          endpoint=endpoint)

    def _refuse(self, endpoint: str, device: Any, address: Address) -> RegistrationError:
        if device is None:
            if self._unknown_events.allow():
                self._events.emit(
                    events.LWM2M_REFUSED, org_id=None, actor=self._actor(endpoint), outcome="refused",
                    reason="unknown endpoint", endpoint=endpoint[:64], address=address_text(address),
                    not_recorded_before=self._unknown_events.take_refused(),
                )
            return RegistrationError("4.00", "unknown endpoint")
        self._events.emit(
            events.LWM2M_REFUSED, org_id=device.org_id, device_id=device.id, actor=self._actor(endpoint),
            outcome="refused", reason="device inactive", endpoint=endpoint, address=address_text(address),
        )
        return RegistrationError("4.03", "device inactive")

    async def _authenticate(self, endpoint: str, peer: PeerIdentity, address: Address) -> AuthenticatedDevice:
        """The device a DTLS peer's credential belongs to, at the management door; 4.03 (recorded) when
        it resolves to none, 4.00 when that device has no endpoint name."""
        try:
            authenticated = await self._identity.resolve(peer, Door.MANAGEMENT)
        except IdentityRefused as exc:
            raise self._refuse_credential(endpoint, await self._owner(endpoint), address, str(exc)) from None
        if authenticated.endpoint is None:
            self._events.emit(
                events.LWM2M_REFUSED, org_id=authenticated.org_id, device_id=authenticated.device_id,
                actor=self._actor(endpoint), outcome="refused", reason="the credential's device has no endpoint name",
                endpoint=endpoint[:64], address=address_text(address),
            )
            raise RegistrationError("4.00", "the device has no endpoint name")
        return authenticated

    async def _owner(self, endpoint: str) -> tuple[str, str] | None:
        """(org id, device id) of the device with LwM2M ``endpoint``."""
        async with self._sessions() as session:
            found = (await session.execute(
                select(Device.org_id, Device.id).where(Device.endpoint == endpoint)
            )).one_or_none()
        return (found.org_id, found.id) if found is not None else None

    def _refuse_credential(
        self, endpoint: str, owner: tuple[str, str] | None, address: Address, reason: str
    ) -> RegistrationError:
        """4.03 for a credential that may not register ``endpoint``, recorded for ``owner`` (org id,
        device id), or for no organisation when there is none (within the unknown-endpoint budget)."""
        if owner is not None or self._unknown_events.allow():
            org_id, device_id = owner or (None, None)
            self._events.emit(
                events.LWM2M_REFUSED, org_id=org_id, device_id=device_id, actor=self._actor(endpoint), outcome="refused",
                reason=reason, endpoint=endpoint[:64], address=address_text(address),
            )
        return RegistrationError("4.03", "forbidden")

    async def _write_directory(
        self, session: AsyncSession, registration: Registration, objects: RegisteredObjects
    ) -> DirectoryEntry:
        """Create the device's directory entry, or record a new registration in it."""
        now = _when(registration.registered_at)
        entry = await session.get(DirectoryEntry, registration.device_id, with_for_update=True)
        fields = dict(
            endpoint=registration.endpoint, status="registered", registration_id=registration.registration_id,
            last_registered_at=now, last_updated_at=now, ended_at=None, address=address_text(registration.address),
            lwm2m_version=registration.lwm2m_version, binding=registration.binding, queue_mode=registration.queue_mode,
            lifetime=registration.lifetime, objects=list(registration.objects), content_formats=list(objects.content_formats),
        )
        if entry is None:
            entry = DirectoryEntry(
                device_id=registration.device_id, org_id=registration.org_id, first_endpoint=registration.endpoint,
                registrations=1, first_registered_at=now, **fields,
            )
            session.add(entry)
            try:
                await session.flush()
            except IntegrityError:  # a concurrent first registration of the same device created it
                raise RegistrationError("5.03", "the device registered twice at once; register again") from None
        else:
            for name, value in fields.items():
                setattr(entry, name, value)
            entry.registrations += 1
        return entry

    async def _update_directory(self, registration: Registration, objects: RegisteredObjects | None) -> None:
        async with self._sessions.begin() as session:
            entry = await session.get(DirectoryEntry, registration.device_id)
            if entry is None or entry.registration_id != registration.registration_id:
                return  # a newer registration owns the entry
            entry.last_updated_at = _when(registration.updated_at)
            entry.address = address_text(registration.address)
            entry.lifetime, entry.binding, entry.queue_mode = registration.lifetime, registration.binding, registration.queue_mode
            entry.objects = list(registration.objects)
            if objects is not None and objects.content_formats:
                entry.content_formats = list(objects.content_formats)

    async def _end(self, ended: list[Registration], status: str, kind: str) -> None:
        self.registered -= len(ended)
        try:
            async with self._sessions.begin() as session:
                for registration in ended:
                    entry = await session.get(DirectoryEntry, registration.device_id)
                    if entry is not None and entry.registration_id == registration.registration_id:
                        entry.status = status
                        entry.last_updated_at = _when(registration.updated_at)
                        entry.ended_at = _when(self._clock())
        except Exception:  # the registration is gone either way; the event still says so
            log.exception("could not record the end of registrations in the directory", extra={"count": len(ended)})
        for registration in ended:
            self._events.emit(
                kind, org_id=registration.org_id, device_id=registration.device_id,
                actor=self._actor(registration.endpoint), endpoint=registration.endpoint,
                registration_id=registration.registration_id,
            )
            self._notify(lambda listener, registration=registration: listener.ended(registration, status))

    def _notify(self, call: Callable[[RegistrationListener], Coroutine[Any, Any, None]]) -> None:
        """Run ``call`` for every listener in a task: after the door's answer is sent."""
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(self._listen(call, listener))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _listen(call: Callable[[RegistrationListener], Coroutine[Any, Any, None]], listener: RegistrationListener) -> None:
        try:
            await call(listener)
        except Exception:
            log.exception("a registration listener failed", extra={"listener": type(listener).__name__})
