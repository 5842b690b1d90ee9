"""Device management operations asked over the API (read, write, execute…) on registered LwM2M devices:
per-request timeouts, a queue for sleeping queue-mode devices, the state of every request, the
registration triggers (/1/x/8, /1/x/9), and an ``lwm2m.operation`` event for each result.

A queue-mode device is reachable for ``awake_seconds`` after each Register or Update. Requests for it
while it sleeps wait in a per-device queue (bounded per device and in total) and go out in order when
it next registers or updates; each expires after ``queue_ttl``. Requests and results live in this
node's memory: the newest ``results_kept`` finished ones can be looked up.
"""

from __future__ import annotations

import asyncio
import enum
import json
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.lwm2m import objects, operations
from pilotboat.lwm2m.management_server import CoapDeviceLink
from pilotboat.lwm2m.messages import DeviceRequest, DeviceUnreachable
from pilotboat.lwm2m.model import Path
from pilotboat.lwm2m.operations import (
    Operation,
    OperationError,
    Outcome,
    SecurityObjectRefused,
    WriteInput,
)
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.registry.service import RegistryService
from pilotboat.registry.store import Registration
from pilotboat.services import events
from pilotboat.services.access import require
from pilotboat.services.errors import (
    Conflict,
    DeviceTimeout,
    Forbidden,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unavailable,
)
from pilotboat.services.event_log import EventLog
from pilotboat.services.mac_addresses import writable_device_by_mac
from pilotboat.store.tables import Device, DirectoryEntry

#: The largest object instance id (65535 is reserved).
MAX_INSTANCE_ID = 65534
#: Finished requests whose results can still be looked up.
RESULTS_KEPT = 10_000
#: The longest wait a caller may ask for (seconds).
MAX_TIMEOUT = 300.0
#: Extra time a caller waits beyond the device's answer timeout, so that the delivery reports first.
WAIT_MARGIN = 0.25
#: Size (characters of JSON) above which an event carries the number of values instead of the values.
MAX_EVENT_VALUES_CHARS = 16_000


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"  # the device answered (with success or an error code)
    FAILED = "failed"  # no answer, or the registration ended first
    EXPIRED = "expired"  # still queued when its time was up


class Trigger(enum.Enum):
    """The Server object's executable triggers, by the resource they execute."""

    UPDATE = 8
    BOOTSTRAP = 9


@dataclass(frozen=True)
class DeviceTarget:
    device_id: str
    org_id: str
    #: Content formats the device announced at its latest registration (empty: unknown).
    content_formats: tuple[int, ...]


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


@dataclass(eq=False)
class TrackedRequest:
    """One operation asked over the API, from its creation to its result."""

    request_id: str
    org_id: str
    device_id: str
    operation: Operation
    path: Path
    request: DeviceRequest
    actor: str
    #: Seconds to wait for the device's answer once the request is sent.
    answer_timeout: float
    registration_id: str
    created_at: float
    finished: asyncio.Future[None]
    status: RequestStatus = RequestStatus.QUEUED
    sent_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    outcome: Outcome | None = None
    error: str | None = None
    #: Why a failed request failed: "timeout", "unreachable", "ended" or "expired".
    failure: str | None = None
    expiry: asyncio.TimerHandle | None = None
    #: Fields added to the result (a trigger's name).
    label: Mapping[str, Any] | None = None

    @property
    def pending(self) -> bool:
        return self.status in (RequestStatus.QUEUED, RequestStatus.SENT)

    def summary(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "operation": str(self.operation), "path": str(self.path),
                "status": str(self.status), **(self.label or {})}

    def result(self) -> dict[str, Any]:
        """The answer of a finished request: the device's outcome, or why there is none."""
        body = self.summary()
        if self.outcome is not None:
            body.update(self.outcome.as_json())
        elif self.error is not None:
            body["error"] = self.error
        return body

    def state(self) -> dict[str, Any]:
        """Everything known about the request, for a status lookup."""
        return {
            **self.result(), "device_id": self.device_id, "created_at": _iso(self.created_at),
            "sent_at": _iso(self.sent_at), "finished_at": _iso(self.finished_at), "expires_at": _iso(self.expires_at),
        }


@contextmanager
def operation_input() -> Iterator[None]:
    """Bad operation input as the service errors the doors map: 403 for the Security object, else 400."""
    try:
        yield
    except SecurityObjectRefused as exc:
        raise Forbidden(str(exc), field=exc.field) from None
    except OperationError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None


async def find_device(sessions: async_sessionmaker[AsyncSession], org_id: str, device_id: str) -> DeviceTarget:
    """The device ``device_id`` of ``org_id`` and its announced content formats; NotFound otherwise."""
    async with sessions() as session:
        row = (await session.execute(
            select(Device.org_id, DirectoryEntry.content_formats)
            .outerjoin(DirectoryEntry, DirectoryEntry.device_id == Device.id)
            .where(Device.id == device_id)
        )).one_or_none()
    if row is None or row.org_id != org_id:
        raise NotFound("device not found")
    return DeviceTarget(device_id, org_id, tuple(row.content_formats or ()))


def capped_values(values: dict[str, Any]) -> dict[str, Any]:
    """Event detail for decoded values: the values, or only their number when they are large."""
    if len(json.dumps(values)) > MAX_EVENT_VALUES_CHARS:
        return {"values_omitted": len(values)}
    return {"values": values}


class DeviceOperationService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        registry: RegistryService,
        link: CoapDeviceLink,
        event_log: EventLog,
        *,
        default_timeout: float,
        awake_seconds: float,
        queue_ttl: float,
        queue_per_device: int,
        queue_total: int,
        results_kept: int = RESULTS_KEPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._link = link
        self._events = event_log
        self.default_timeout = default_timeout
        self.awake_seconds = awake_seconds
        self._queue_ttl = queue_ttl
        self._queue_per_device = queue_per_device
        self._queue_total = queue_total
        self._results_kept = results_kept
        self._clock = clock
        #: Requests queued or sent, by id.
        self._active: dict[str, TrackedRequest] = {}
        #: Finished requests, oldest first.
        self._finished: OrderedDict[str, TrackedRequest] = OrderedDict()
        self._queues: dict[str, deque[TrackedRequest]] = {}
        self._queued = 0
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- operations -------------------------------------------------------------------------------

    async def read(
        self, principal: Principal, org_id: str, device_id: str, path: str, *, format: str | None = None,
        timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        """Read ``path`` in ``format`` (default: a SenML format the device announced, else its choice)."""
        def build(at: Path, _: Registration, device: DeviceTarget) -> DeviceRequest:
            accept = operations.format_number(format) if format else operations.read_accept(device.content_formats)
            return operations.read_request(at, accept)

        return await self._run(principal, org_id, device_id, Operation.READ, path, build, timeout, wait)

    async def discover(
        self, principal: Principal, org_id: str, device_id: str, path: str, *, timeout: float | None = None,
        wait: bool = True,
    ) -> TrackedRequest:
        return await self._run(principal, org_id, device_id, Operation.DISCOVER, path,
                               lambda at, *_: operations.discover_request(at), timeout, wait)

    async def write(
        self, principal: Principal, org_id: str, device_id: str, path: str, body: WriteInput, *, partial: bool = False,
        format: str | None = None, timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        """Write (replace, or with ``partial`` update) values in the format the registration suggests."""
        operation = Operation.WRITE_PARTIAL if partial else Operation.WRITE

        def build(at: Path, registration: Registration, device: DeviceTarget) -> DeviceRequest:
            values = operations.write_values(body, at)
            return operations.write_request(at, values, self._write_format(format, registration, device), partial=partial)

        return await self._run(principal, org_id, device_id, operation, path, build, timeout, wait)

    async def create(
        self, principal: Principal, org_id: str, device_id: str, path: str, body: WriteInput, *,
        format: str | None = None, timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        def build(at: Path, registration: Registration, device: DeviceTarget) -> DeviceRequest:
            values = operations.write_values(body, at)
            return operations.create_request(at, values, self._write_format(format, registration, device))

        return await self._run(principal, org_id, device_id, Operation.CREATE, path, build, timeout, wait)

    async def write_attributes(
        self, principal: Principal, org_id: str, device_id: str, path: str, attributes: Mapping[str, Any], *,
        timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        """Set (a number) or clear (None) notification attributes: pmin, pmax, gt, lt, st, epmin, epmax."""
        return await self._run(principal, org_id, device_id, Operation.WRITE_ATTRIBUTES, path,
                               lambda at, *_: operations.attributes_request(at, attributes), timeout, wait)

    async def execute(
        self, principal: Principal, org_id: str, device_id: str, path: str, arguments: str | None = None, *,
        timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        return await self._run(principal, org_id, device_id, Operation.EXECUTE, path,
                               lambda at, *_: operations.execute_request(at, arguments), timeout, wait)

    async def delete(
        self, principal: Principal, org_id: str, device_id: str, path: str, *, timeout: float | None = None,
        wait: bool = True,
    ) -> TrackedRequest:
        return await self._run(principal, org_id, device_id, Operation.DELETE, path,
                               lambda at, *_: operations.delete_request(at), timeout, wait)

    # --- triggers ---------------------------------------------------------------------------------

    async def trigger(
        self, principal: Principal, org_id: str, device_id: str, trigger: Trigger, *, server_instance: int | None = None,
        timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        """Execute the Server object's Registration Update (8) or Bootstrap-Request (9) trigger."""
        require(principal, org_id, Permission.WRITE)
        device = await find_device(self._sessions, org_id, device_id)
        return await self._trigger(principal, device, trigger, server_instance, timeout, wait)

    async def trigger_by_mac(
        self, principal: Principal, mac_address: str, trigger: Trigger, *, server_instance: int | None = None,
        timeout: float | None = None, wait: bool = True,
    ) -> TrackedRequest:
        """:meth:`trigger` for the one device with ``mac_address`` among the organisations where the caller
        may write (case and ``:``/``-``/``.`` separators ignored)."""
        device = await self._device_by_mac(principal, mac_address)
        return await self._trigger(principal, device, trigger, server_instance, timeout, wait)

    async def _trigger(
        self, principal: Principal, device: DeviceTarget, trigger: Trigger, server_instance: int | None,
        timeout: float | None, wait: bool,
    ) -> TrackedRequest:
        if server_instance is not None and not 0 <= server_instance <= MAX_INSTANCE_ID:
            raise InvalidInput(f"server_instance must be 0 to {MAX_INSTANCE_ID}", field="server_instance")
        registration = await self._registration(device.device_id)
        instances = operations.server_instances(registration.objects)
        if server_instance is None:
            if not instances:
                raise Conflict("the registration lists no Server object instance (/1/x): name one with server_instance",
                               field="server_instance")
            server_instance = instances[0]
        elif instances and server_instance not in instances:
            listed = ", ".join(f"/1/{iid}" for iid in instances)
            raise InvalidInput(f"server_instance {server_instance} is not registered; the device has {listed}",
                               field="server_instance")
        at = Path(objects.SERVER, server_instance, trigger.value)
        request = operations.execute_request(at, None)
        label = {"trigger": "bootstrap" if trigger is Trigger.BOOTSTRAP else "update"}
        tracked = self._new(principal, device, Operation.EXECUTE, at, request, timeout, registration, label)
        return await self._submit(tracked, registration, wait)

    async def _device_by_mac(self, principal: Principal, mac_address: str) -> DeviceTarget:
        async with self._sessions() as session:
            device = await writable_device_by_mac(
                session, principal, mac_address,
                by_id="POST /api/v1/orgs/{org_id}/devices/{device_id}/commands/trigger-bootstrap",
            )
        return await find_device(self._sessions, device.org_id, device.id)

    # --- request states -----------------------------------------------------------------------------

    async def request_state(self, principal: Principal, org_id: str, device_id: str, request_id: str) -> TrackedRequest:
        """A request of this node (queued, sent, or among the newest finished ones)."""
        require(principal, org_id, Permission.READ)
        tracked = self._active.get(request_id) or self._finished.get(request_id)
        if tracked is None or tracked.org_id != org_id or tracked.device_id != device_id:
            raise NotFound("request not found (results are kept in memory for a limited number of requests)")
        return tracked

    def reachable(self, registration: Registration) -> bool:
        """Whether the device takes requests now: always, or in queue mode while it is awake."""
        return not registration.queue_mode or self._clock() < registration.updated_at + self.awake_seconds

    # --- as a RegistrationListener ------------------------------------------------------------------

    async def registered(self, registration: Registration, previous: Registration | None) -> None:
        for tracked in self._queues.get(registration.device_id, ()):
            tracked.registration_id = registration.registration_id
        await self._drain(registration.device_id)

    async def updated(self, registration: Registration) -> None:
        await self._drain(registration.device_id)

    async def ended(self, registration: Registration, why: str) -> None:
        for tracked in list(self._queues.get(registration.device_id, ())):
            if tracked.registration_id == registration.registration_id:
                self._dequeue(tracked)
                self._finish(tracked, RequestStatus.FAILED, error=f"the registration ended ({why}) before the request was sent",
                             failure="ended")

    # --- internals ------------------------------------------------------------------------------------

    async def _run(
        self, principal: Principal, org_id: str, device_id: str, operation: Operation, path: str,
        build: Callable[[Path, Registration, DeviceTarget], DeviceRequest], timeout: float | None, wait: bool,
    ) -> TrackedRequest:
        permission = Permission.READ if operation in (Operation.READ, Operation.DISCOVER) else Permission.WRITE
        require(principal, org_id, permission)
        device = await find_device(self._sessions, org_id, device_id)
        with operation_input():
            at = operations.target(path, operation)
        registration = await self._registration(device_id)
        with operation_input():
            request = build(at, registration, device)
        tracked = self._new(principal, device, operation, at, request, timeout, registration)
        return await self._submit(tracked, registration, wait)

    async def _registration(self, device_id: str) -> Registration:
        registration = await self._registry.for_device(device_id)
        if registration is None:
            raise Conflict("the device is not registered with the management server")
        return registration

    @staticmethod
    def _write_format(name: str | None, registration: Registration, device: DeviceTarget) -> int:
        if name:
            return operations.format_number(name)
        return operations.write_format(registration.lwm2m_version, device.content_formats)

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.default_timeout
        if not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidInput(f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds", field="timeout")
        return timeout

    def _new(
        self, principal: Principal, device: DeviceTarget, operation: Operation, at: Path, request: DeviceRequest,
        timeout: float | None, registration: Registration, label: Mapping[str, Any] | None = None,
    ) -> TrackedRequest:
        return TrackedRequest(
            request_id=secrets.token_urlsafe(12), org_id=device.org_id, device_id=device.device_id, operation=operation,
            path=at, request=request, actor=principal.email, answer_timeout=self._timeout(timeout),
            registration_id=registration.registration_id, created_at=self._clock(),
            finished=asyncio.get_running_loop().create_future(), label=label,
        )

    async def _submit(self, tracked: TrackedRequest, registration: Registration, wait: bool) -> TrackedRequest:
        """Send ``tracked`` now or queue it; with ``wait``, return once it finished (or raise after its timeout)."""
        device_id = tracked.device_id
        if registration.queue_mode and (
            not self.reachable(registration) or self._queues.get(device_id) or device_id in self._draining
        ):
            self._enqueue(tracked)
            if self.reachable(registration):
                self._spawn(self._drain(device_id))
        else:
            self._active[tracked.request_id] = tracked
            tracked.status = RequestStatus.SENT
            self._spawn(self._deliver(tracked, registration))
        if not wait:
            return tracked
        try:
            await asyncio.wait_for(asyncio.shield(tracked.finished), tracked.answer_timeout + WAIT_MARGIN)
        except TimeoutError:
            raise DeviceTimeout(
                f"the device did not answer within {tracked.answer_timeout:g} s; the request is still {tracked.status}: "
                f"see lwm2m-requests/{tracked.request_id}",
                request_id=tracked.request_id,
            ) from None
        if tracked.outcome is None:
            if tracked.failure == "ended":
                raise Conflict(tracked.error or "the registration ended")
            raise DeviceTimeout(tracked.error or "the device did not answer", request_id=tracked.request_id)
        return tracked

    def _enqueue(self, tracked: TrackedRequest) -> None:
        queue = self._queues.get(tracked.device_id)
        if queue is not None and len(queue) >= self._queue_per_device:
            raise TooManyRequests(
                f"{len(queue)} requests already wait for this sleeping device; try again after it has been awake",
                retry_after=max(1, round(self.awake_seconds)),
            )
        if self._queued >= self._queue_total:
            raise Unavailable("too many requests wait for sleeping devices on this node; try again later")
        self._queues.setdefault(tracked.device_id, deque()).append(tracked)
        self._queued += 1
        self._active[tracked.request_id] = tracked
        tracked.expires_at = tracked.created_at + self._queue_ttl
        tracked.expiry = asyncio.get_running_loop().call_later(self._queue_ttl, self._expire, tracked)

    def _dequeue(self, tracked: TrackedRequest) -> None:
        queue = self._queues.get(tracked.device_id)
        if queue is None or tracked not in queue:
            return
        queue.remove(tracked)
        self._queued -= 1
        if not queue:
            del self._queues[tracked.device_id]
        if tracked.expiry is not None:
            tracked.expiry.cancel()
            tracked.expiry = None

    def _expire(self, tracked: TrackedRequest) -> None:
        if tracked.status is RequestStatus.QUEUED:
            self._dequeue(tracked)
            self._finish(tracked, RequestStatus.EXPIRED, error="the device did not wake up before the request expired",
                         failure="expired")

    async def _drain(self, device_id: str) -> None:
        """Send the device's queued requests in order while it is registered and awake; stop at the
        first that gets no answer (the device went back to sleep)."""
        if not self._queues.get(device_id) or device_id in self._draining:
            return
        self._draining.add(device_id)
        try:
            while self._queues.get(device_id):
                registration = await self._registry.for_device(device_id)
                queue = self._queues.get(device_id)
                if registration is None or not queue or not self.reachable(registration):
                    return
                tracked = queue[0]
                self._dequeue(tracked)
                if not await self._deliver(tracked, registration):
                    return
        finally:
            self._draining.discard(device_id)

    async def _deliver(self, tracked: TrackedRequest, registration: Registration) -> bool:
        """Send ``tracked`` and record the answer; False when the device did not answer."""
        tracked.status, tracked.sent_at = RequestStatus.SENT, self._clock()
        try:
            reply = await self._link.send(registration, tracked.request, tracked.answer_timeout)
        except DeviceUnreachable as exc:
            self._finish(tracked, RequestStatus.FAILED, error=str(exc), failure="timeout" if exc.timed_out else "unreachable")
            return False
        self._finish(tracked, RequestStatus.DONE, outcome=operations.outcome(tracked.operation, reply, tracked.path))
        return True

    def _finish(
        self, tracked: TrackedRequest, status: RequestStatus, *, outcome: Outcome | None = None, error: str | None = None,
        failure: str | None = None,
    ) -> None:
        tracked.status, tracked.finished_at = status, self._clock()
        tracked.outcome, tracked.error, tracked.failure = outcome, error, failure
        self._active.pop(tracked.request_id, None)
        self._finished[tracked.request_id] = tracked
        while len(self._finished) > self._results_kept:
            self._finished.popitem(last=False)
        if not tracked.finished.done():
            tracked.finished.set_result(None)
        self._record(tracked)

    def _record(self, tracked: TrackedRequest) -> None:
        detail: dict[str, Any] = {**tracked.summary(), "code": tracked.outcome.code if tracked.outcome else None}
        outcome, reason = "ok", None
        if tracked.outcome is not None:
            if tracked.outcome.values is not None:
                detail.update(capped_values(tracked.outcome.values))
            if tracked.outcome.links is not None:
                detail["links"] = tracked.outcome.links[:100]
            if tracked.outcome.error is not None:
                detail["error"] = reason = tracked.outcome.error
            if not tracked.outcome.ok:
                outcome = "failed"
        else:
            detail["error"] = reason = tracked.error
            outcome = {"timeout": "timeout", "expired": "expired"}.get(tracked.failure or "", "failed")
        self._events.emit(
            events.LWM2M_OPERATION, org_id=tracked.org_id, device_id=tracked.device_id, actor=tracked.actor,
            outcome=outcome, reason=reason, **detail,
        )

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop deliveries in progress and the expiry timers (shutdown)."""
        for queue in self._queues.values():
            for tracked in queue:
                if tracked.expiry is not None:
                    tracked.expiry.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
