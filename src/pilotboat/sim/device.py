"""One simulated LwM2M device: its own UDP socket, its objects, client-initiated bootstrap (``POST /bs``)
or Bootstrap-Pack (``GET /bspack``, LwM2M 1.2), and the life of a registered client.

After a bootstrap, ``servers()`` name the management servers the device was given; a device can also
come with a management-server account from the factory (``server_uri``). ``register()`` registers with
the first of them and, by default, keeps the registration alive with Updates; the device answers the
management server's requests on objects 1, 3 and 3303 (Temperature), sends Observe notifications,
honours the Registration Update Trigger (``/1/x/8``), the Bootstrap-Request Trigger (``/1/x/9``) and
Reboot (``/3/0/4``), and in queue mode is reachable only for ``Timing.awake`` seconds after each
message it sends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, objects
from pilotboat.lwm2m.model import ROOT, CodecError, Path, Value
from pilotboat.model.management_server import DEFAULT_BINDING, DEFAULT_LIFETIME
from pilotboat.sim import registration
from pilotboat.sim.attributes import AttributeStore
from pilotboat.dtls.client import ClientCredentials
from pilotboat.sim.exchange import (
    Address,
    Endpoint,
    ExchangeError,
    HandshakeError,
    PeerReset,
    Timing,
    is_secure,
    local_host_for,
    resolve,
)
from pilotboat.sim.handlers import ServerRequests
from pilotboat.sim.objects import (
    DEVICE_REBOOT,
    MAX_MEASURED,
    MAX_RANGE,
    MIN_MEASURED,
    MIN_RANGE,
    RESET_MIN_MAX,
    SENSOR_VALUE,
    SERVER_DEFAULT_PMAX,
    SERVER_DEFAULT_PMIN,
    TEMPERATURE,
    AssignedServer,
    Instance,
    NotAllowed,
    NotFound,
    ObjectStore,
    Resource,
    ServerAccount,
    resource_type,
)
from pilotboat.sim.observe import Observation, Observations
from pilotboat.sim.registration import Announced
from pilotboat.sim.results import BootstrapResult, Failure, ReceivedRequest, RegistrationResult
from pilotboat.sim.security import credentials_from_security

__all__ = ["BootstrapResult", "Failure", "OnboardingFailed", "ReceivedRequest", "RegistrationResult",
           "SimulatedDevice", "onboard"]

#: Formats a device may name in ``pct`` (and ask Bootstrap-Pack in).
PREFERRED_FORMATS = frozenset({content.SENML_JSON, content.SENML_CBOR, content.TLV})
PACK_FORMATS = frozenset({content.SENML_JSON, content.SENML_CBOR})
#: Codes whose Max-Age says when to ask again.
RETRY_CODES = frozenset({Code.SERVICE_UNAVAILABLE, Code.TOO_MANY_REQUESTS})
#: The longest wait between registration attempts, in multiples of ``Timing.register_retry``.
MAX_BACKOFF = 32
#: The sensor's random walk: at most this many degrees per reading.
SENSOR_STEP = 0.5


def _method(code: Code) -> str:
    """``"GET"``…, or the dotted code of a method aiocoap has no name for."""
    return code.dotted if code.name.startswith("(") else code.name


def _int_option(value: object) -> int | None:
    return int(value) if value is not None else None  # type: ignore[call-overload]


def _reaches(bound: str, wanted: str) -> bool:
    """Whether a socket bound to ``bound`` can talk to peers that need ``wanted`` (``local_host_for``)."""
    if bound == wanted:
        return True
    bound_ip, wanted_ip = ipaddress.ip_address(bound.split("%")[0]), ipaddress.ip_address(wanted.split("%")[0])
    return bound_ip.is_unspecified and bound_ip.version == wanted_ip.version


class SimulatedDevice:
    """A simulated LwM2M client.

    A device has a bootstrap-server account at ``/0/<bootstrap_instance>`` when given ``bootstrap_uri``,
    and a factory management-server account (``/0/x`` and ``/1/0``: ``server_uri``, ``short_server_id``,
    ``lifetime``, ``binding``) when given ``server_uri``; it needs at least one of them.

    A ``coaps://`` server is reached over DTLS: the bootstrap server with the factory credentials
    ``bootstrap_credentials`` (a PSK, or a certificate with its key and the server's trust anchor), a
    factory management account with ``server_credentials``; both are written into the Security object
    as a real device holds them. A management server a bootstrap assigned is reached with what the
    bootstrap server wrote there (Security Mode, identity, Server Public Key, Secret Key). Every
    Register opens a fresh DTLS session; Updates, the server's requests and notifications use it.

    ``content_format`` is the ``pct`` the device sends (SenML-JSON 110, SenML-CBOR 112 or TLV 11542;
    LwM2M 1.0 devices send none) and the ``ct`` it registers with. ``queue_mode`` registers in queue mode
    (so does a binding with ``Q``). ``temperature_sensors`` Temperature instances (/3303/x) change their
    Sensor Value every ``sensor_interval`` seconds (None: only by ``set_value``). Notifications are
    confirmable unless ``confirmable_notifications`` is False. ``answer_limit`` makes the device go
    silent after answering that many server requests (a device that dies mid-session).

    Hooks: ``on_bootstrap_trigger`` when a server executes ``/1/x/9`` (``bootstrap_triggered`` is set then
    too), ``on_request`` with each request received, ``on_registration`` with each Register, Update and
    De-register outcome.
    """

    def __init__(
        self,
        endpoint: str,
        bootstrap_uri: str | None = None,
        *,
        server_uri: str | None = None,
        short_server_id: int = 1,
        lifetime: int = DEFAULT_LIFETIME,
        binding: str = DEFAULT_BINDING,
        queue_mode: bool = False,
        lwm2m_version: str = "1.1",
        content_format: int | None = None,
        bootstrap_instance: int = 1,
        device_info: Mapping[int, Resource] | None = None,
        temperature_sensors: int = 1,
        sensor_interval: float | None = 30.0,
        confirmable_notifications: bool = True,
        answer_limit: int | None = None,
        timing: Timing | None = None,
        local_host: str | None = None,
        on_bootstrap_trigger: Callable[[], None] | None = None,
        on_request: Callable[[ReceivedRequest], None] | None = None,
        on_registration: Callable[[RegistrationResult], None] | None = None,
        bootstrap_credentials: ClientCredentials | None = None,
        server_credentials: ClientCredentials | None = None,
    ) -> None:
        if not endpoint:
            raise ValueError("the endpoint name must not be empty")
        if bootstrap_uri is None and server_uri is None:
            raise ValueError("a device needs a bootstrap server or a management server (server_uri)")
        for uri, credentials, what in ((bootstrap_uri, bootstrap_credentials, "bootstrap"),
                                       (server_uri, server_credentials, "server")):
            if uri is not None and is_secure(uri) and credentials is None:
                raise ValueError(f"the coaps:// {what} server needs {what}_credentials")
            if credentials is not None and (uri is None or not is_secure(uri)):
                raise ValueError(f"{what}_credentials need a coaps:// {what} URI")
        if content_format is not None:
            if lwm2m_version == "1.0":
                raise ValueError("LwM2M 1.0 devices send no preferred content format")
            if content_format not in PREFERRED_FORMATS:
                raise ValueError(f"content format {content_format} is not one of {sorted(PREFERRED_FORMATS)}")
        if answer_limit is not None and answer_limit < 0:
            raise ValueError("answer_limit must not be negative")
        if temperature_sensors < 0:
            raise ValueError("temperature_sensors must not be negative")
        if sensor_interval is not None and sensor_interval <= 0:
            raise ValueError("sensor_interval must be positive (or None)")
        self.endpoint = endpoint
        self.bootstrap_uri = bootstrap_uri
        #: The factory credentials for the bootstrap server (None: plain CoAP).
        self.bootstrap_credentials = bootstrap_credentials
        self.lwm2m_version = lwm2m_version
        self.content_format = content_format
        self.bootstrap_instance = bootstrap_instance
        self.queue_mode = queue_mode
        self.sensor_interval = sensor_interval
        self.confirmable_notifications = confirmable_notifications
        self.answer_limit = answer_limit
        self.timing = timing or Timing()
        self._local_host = local_host
        self._on_bootstrap_trigger = on_bootstrap_trigger
        self._on_request = on_request
        self._on_registration = on_registration
        self._random = random.Random(endpoint)
        account = ServerAccount(server_uri, short_server_id, lifetime, binding) if server_uri is not None else None
        readings = [round(20.0 + self._random.uniform(-2, 2), 1) for _ in range(temperature_sensors)]
        self._store = ObjectStore.initial(endpoint, bootstrap_uri, bootstrap_instance, device_info, server=account,
                                          temperatures=readings, bootstrap_credentials=bootstrap_credentials,
                                          server_credentials=server_credentials)
        self._attributes = AttributeStore()
        self._requests = ServerRequests(self._store, lwm2m_version=lwm2m_version, on_finish=self._finished,
                                        on_execute=self._executed, attributes=self._attributes,
                                        on_change=self._changed)
        self._observations = Observations(attributes=self._attributes, defaults=self._default_periods,
                                          value_of=self._store.value, send=self._notify)
        self.received: list[ReceivedRequest] = []
        self.executed: list[Path] = []
        self.bootstrap_triggered = asyncio.Event()
        self.answered = 0
        #: How often the server answered 5.03 (busy) and the device asked again after its Max-Age.
        self.deferred = 0
        #: Every Register, Update and De-register outcome, oldest first.
        self.registrations: list[RegistrationResult] = []
        #: Bootstraps the device ran by itself (after ``/1/x/9``).
        self.bootstraps: list[BootstrapResult] = []
        #: Notifications sent (after the first response of each observation).
        self.notifications = 0
        #: The registration's location (``rd/<id>``) while registered.
        self.location: str | None = None
        self._announced: Announced | None = None
        self._last_contact = 0.0
        self._endpoint: Endpoint | None = None
        self._bootstrap_server: Address | None = None
        self._management_server: Address | None = None
        self._finish: asyncio.Future[str | None] | None = None
        self._finished_at: float | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._update_now = asyncio.Event()
        self._exchange_lock = asyncio.Lock()
        self._busy = 0
        self._sleep_timer: asyncio.TimerHandle | None = None
        self._sensor_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the bootstrap server (else the management server) and open the device's socket
        (``bootstrap()`` and ``register()`` do this too); the sensor starts measuring."""
        if self._endpoint is not None:
            return
        if self.bootstrap_uri is not None:
            family, self._bootstrap_server = await resolve(self.bootstrap_uri)
            remote = self._bootstrap_server
        else:
            family, remote = await resolve(self._account_or_fail().uri or "")
        await self._open(self._local_host or local_host_for(family, remote[0]))
        if self.sensor_interval is not None and self._sensor_timer is None:
            self._sensor_timer = asyncio.get_running_loop().call_later(self.sensor_interval, self._measure)

    async def _open(self, host: str) -> None:
        self._endpoint = await Endpoint.open((host, 0), self._handle, self.timing)
        self._endpoint.on_reset = self._observations.cancel

    async def close(self, *, deregister: bool = False, timeout: float = 5.0) -> None:
        """Stop everything and close the socket; with ``deregister``, De-register first (when registered).
        Without it the device simply vanishes and its registration expires on the server."""
        if deregister and self.location is not None and self._endpoint is not None:
            await self.deregister(timeout)
        self.stop_updating()
        for task in list(self._tasks):
            task.cancel()
        self._observations.clear()
        for timer in (self._sleep_timer, self._sensor_timer):
            if timer is not None:
                timer.cancel()
        self._sleep_timer = self._sensor_timer = None
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    async def __aenter__(self) -> SimulatedDevice:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> Address:
        """The device's local ``(host, port)``; servers send their requests there."""
        if self._endpoint is None:
            raise RuntimeError("the device is not started")
        return self._endpoint.address

    @property
    def garbage(self) -> int:
        """Datagrams received that were not CoAP (and were dropped)."""
        return self._endpoint.garbage if self._endpoint is not None else 0

    @property
    def asleep(self) -> bool:
        """A queue-mode device past its awake time: it ignores every datagram."""
        return self._endpoint is not None and self._endpoint.deaf

    @property
    def ignored(self) -> int:
        """Datagrams ignored while asleep."""
        return self._endpoint.ignored if self._endpoint is not None else 0

    # --- state --------------------------------------------------------------------------------------

    def instances(self, object_id: int) -> dict[int, Instance]:
        """``{instance id: {resource id: value}}`` of an object (multiple resources as ``{id: value}``)."""
        return self._store.instances(object_id)

    def value(self, path: Path | str) -> Value | None:
        """The value of one resource (or resource instance), None when there is none."""
        return self._store.value(Path.parse(path) if isinstance(path, str) else path)

    @property
    def bootstrap_account(self) -> Instance | None:
        """The resources of the Security instance at ``bootstrap_instance`` while it still is a
        bootstrap-server account (Bootstrap-Server = true), else None (deleted or overwritten)."""
        instance = self._store.instances(objects.SECURITY).get(self.bootstrap_instance)
        if instance is None or instance.get(objects.SECURITY_BOOTSTRAP) is not True:
            return None
        return instance

    def servers(self) -> list[AssignedServer]:
        """The management-server accounts, ordered by Short Server ID."""
        return self._store.servers()

    def inconsistency(self) -> str | None:
        """Why the current configuration would fail Bootstrap-Finish, or None."""
        return self._store.inconsistency()

    def attributes(self, path: Path | str) -> dict[str, float]:
        """The notification attributes a server attached to exactly ``path``."""
        return self._attributes.at(Path.parse(path) if isinstance(path, str) else path)

    @property
    def observations(self) -> list[Observation]:
        """The observations servers hold on this device."""
        return self._observations.all()

    # --- the device measuring -----------------------------------------------------------------------

    def set_value(self, path: Path | str, value: Value) -> None:
        """Set a resource as the device itself would (a new measurement), notifying its observers. A
        Temperature Sensor Value also moves the Min/Max Measured Values. ``ValueError`` for a value of
        the wrong type, ``LookupError`` for a resource the device does not have."""
        target = Path.parse(path) if isinstance(path, str) else path
        try:
            self._store.set_value(target, value)
        except NotAllowed as exc:
            raise ValueError(str(exc)) from None
        changed = [target]
        if target.object_id == TEMPERATURE and target.resource_id == SENSOR_VALUE:
            number = self._store.value(target)
            assert isinstance(number, float)
            instance = target.parent
            for rid, keep in ((MIN_MEASURED, min), (MAX_MEASURED, max)):
                bound = self._store.value(instance.child(rid))
                measured = keep(number, bound) if isinstance(bound, float) else number
                if measured != bound:
                    self._store.set_value(instance.child(rid), measured)
                    changed.append(instance.child(rid))
        for changed_path in changed:
            self._observations.changed(changed_path)

    def _measure(self) -> None:
        """A new reading of every Temperature sensor: a small random step within its range."""
        for iid in self._store.instance_ids(TEMPERATURE):
            base = Path(TEMPERATURE, iid)
            current, low, high = (self._store.value(base.child(rid)) for rid in (SENSOR_VALUE, MIN_RANGE, MAX_RANGE))
            if not isinstance(current, float):
                continue
            step = self._random.uniform(-SENSOR_STEP, SENSOR_STEP)
            reading = round(current + step, 1)
            if isinstance(low, float) and isinstance(high, float):
                reading = min(max(reading, low), high)
            self.set_value(base.child(SENSOR_VALUE), reading)
        assert self.sensor_interval is not None
        self._sensor_timer = asyncio.get_running_loop().call_later(self.sensor_interval, self._measure)

    # --- bootstrap ----------------------------------------------------------------------------------

    async def bootstrap(self, timeout: float = 30.0) -> BootstrapResult:
        """Client-initiated bootstrap: ``POST /bs?ep=…[&pct=…]``, then serve the server's requests until
        a Bootstrap-Finish is answered. A Finish answered 4.06 ends the attempt as INCONSISTENT."""
        query = [f"ep={self.endpoint}"]
        if self.content_format is not None:
            query.append(f"pct={self.content_format}")
        message = aiocoap.Message(code=Code.POST, uri_path=("bs",), uri_query=tuple(query))
        return await self._run("request", message, Code.CHANGED, timeout, self._await_finish)

    async def bootstrap_pack(self, timeout: float = 30.0) -> BootstrapResult:
        """Bootstrap-Pack (LwM2M 1.2): ``GET /bspack?ep=…`` with Accept SenML-CBOR (or SenML-JSON when
        that is the device's format), then apply the configuration. Any error code is a REJECTED
        failure, after which a real client falls back to ``bootstrap()``."""
        if self.lwm2m_version != "1.2":
            raise ValueError("Bootstrap-Pack needs LwM2M 1.2")
        accept = self.content_format if self.content_format in PACK_FORMATS else content.SENML_CBOR
        message = aiocoap.Message(code=Code.GET, uri_path=("bspack",), uri_query=(f"ep={self.endpoint}",),
                                  accept=accept)
        return await self._run("pack", message, Code.CONTENT, timeout, self._apply_pack)

    async def _run(self, method: str, message: aiocoap.Message, success: Code, timeout: float,
                   then: Callable[[aiocoap.Message], Awaitable[str | None]]) -> BootstrapResult:
        def failed(failure: Failure, detail: str, code: str | None = None) -> BootstrapResult:
            return BootstrapResult(self.endpoint, False, method, failure, code, detail)

        if self.bootstrap_uri is None:
            raise ValueError("the device has no bootstrap server")
        try:
            await self.start()
        except (OSError, ValueError) as exc:
            return failed(Failure.SOCKET, f"cannot reach {self.bootstrap_uri}: {exc}")
        assert self._endpoint is not None and self._bootstrap_server is not None
        loop = asyncio.get_running_loop()
        self._finish = loop.create_future()
        self._finished_at = None
        started = time.monotonic()
        accepted = handshaking = False
        try:
            async with asyncio.timeout(timeout):
                if self.bootstrap_credentials is not None:
                    handshaking = True
                    await self._endpoint.connect(self._bootstrap_server, self.bootstrap_credentials)
                    handshaking = False
                response = await self._endpoint.request(message, self._bootstrap_server)
                while response.code == Code.SERVICE_UNAVAILABLE:
                    # The server is busy: ask again after its Max-Age, as LwM2M clients do.
                    self.deferred += 1
                    await asyncio.sleep(response.opt.max_age if response.opt.max_age is not None else 60)
                    response = await self._endpoint.request(message, self._bootstrap_server)
                if response.code != success:
                    detail = bytes(response.payload).decode("utf-8", "replace").strip() or None
                    code = response.code.dotted
                    return failed(Failure.REJECTED, detail or f"the server answered {code}", code)
                accepted = True
                problem = await then(response)
        except PeerReset:
            return failed(Failure.RESET, "the server answered with a CoAP Reset")
        except HandshakeError as exc:
            return failed(Failure.HANDSHAKE, f"{self.bootstrap_uri}: {exc}")
        except ExchangeError as exc:  # before TimeoutError: ExchangeTimeout is one too
            return failed(Failure.NO_RESPONSE, f"{self.bootstrap_uri}: {exc}")
        except TimeoutError:
            if handshaking:
                return failed(Failure.HANDSHAKE, f"no DTLS session with {self.bootstrap_uri} within {timeout:g} s")
            if accepted:
                return failed(Failure.TIMEOUT, f"no successful Bootstrap-Finish within {timeout:g} s")
            return failed(Failure.NO_RESPONSE, f"{self.bootstrap_uri} did not answer within {timeout:g} s")
        except _BadPack as exc:
            return failed(Failure.BAD_PACK, str(exc))
        finally:
            self._finish = None
        if problem is not None:
            return failed(Failure.INCONSISTENT, problem)
        finished = self._finished_at if self._finished_at is not None else time.monotonic()
        return BootstrapResult(self.endpoint, True, method, latency=finished - started, servers=tuple(self.servers()))

    async def _await_finish(self, response: aiocoap.Message) -> str | None:
        assert self._finish is not None
        return await self._finish

    async def _apply_pack(self, response: aiocoap.Message) -> str | None:
        fmt = response.opt.content_format
        if fmt is None or int(fmt) not in PACK_FORMATS:
            raise _BadPack(f"the pack came as {content.format_name(int(fmt)) if fmt is not None else 'no format'}")
        try:
            entries = content.decode(int(fmt), response.payload, ROOT, resource_type)
            self._store.write(ROOT, entries, replace=True)
        except (CodecError, NotFound, NotAllowed) as exc:
            raise _BadPack(f"cannot apply the pack: {exc}") from exc
        self._finished_at = time.monotonic()
        return self._store.inconsistency()

    # --- registration -------------------------------------------------------------------------------

    @property
    def management_server(self) -> AssignedServer | None:
        """The account the device registers with: the first management server that has a URI."""
        return next((server for server in self._store.servers() if server.uri), None)

    def _account_or_fail(self) -> AssignedServer:
        account = self.management_server
        if account is None:
            raise ValueError("the device has no management-server account")
        return account

    @property
    def registered(self) -> bool:
        return self.location is not None

    @property
    def updating(self) -> bool:
        """Whether the background task that keeps the registration alive runs."""
        return self._maintainer is not None and not self._maintainer.done()

    def _announce(self, account: AssignedServer) -> Announced:
        return registration.announced(self._store, account, lwm2m_version=self.lwm2m_version,
                                      content_format=self.content_format, queue_mode=self.queue_mode)

    async def register(self, timeout: float | None = 30.0, *, keep_updating: bool = True) -> RegistrationResult:
        """Register with the management server (``POST /rd?ep&lt&lwm2m&b[&Q]`` and the object list, in
        Block1 blocks when larger than ``Timing.block_size``). With ``keep_updating``, a background task
        then keeps the device registered as a real client does: it sends Updates before the lifetime
        ends, registers again when an Update fails (4.04 or no answer), and when this Register failed
        tries again after the server's Max-Age or ``Timing.register_retry`` (doubling);
        ``stop_updating()`` or ``deregister()`` end it."""
        result = await self._register(timeout)
        if keep_updating:
            self._start_updating()
        return result

    async def update(self, timeout: float | None = 30.0) -> RegistrationResult:
        """Send an Update now (``lt``, ``b`` and the object list only when they changed). A rejected
        Update (4.04…) ends the registration; an updating device then registers again."""
        if self.location is None:
            raise RuntimeError(f"{self.endpoint} is not registered")
        return await self._update(timeout)

    async def deregister(self, timeout: float | None = 10.0) -> RegistrationResult:
        """``DELETE /rd/<id>`` and stop updating; the device counts as de-registered whatever the answer."""
        if self.location is None:
            raise RuntimeError(f"{self.endpoint} is not registered")
        self.stop_updating()
        message = registration.deregister_message(self.location)
        result, _ = await self._exchange("deregister", message, Code.DELETED, timeout)
        self._forget_registration()
        return result

    def stop_updating(self) -> None:
        """Stop sending Updates (the registration stays until it expires): a device that went quiet."""
        if self._maintainer is not None:
            if self._maintainer is not asyncio.current_task():
                self._maintainer.cancel()
            self._maintainer = None

    def _start_updating(self) -> None:
        if not self.updating:
            self._maintainer = asyncio.get_running_loop().create_task(
                self._maintain(), name=f"registration of {self.endpoint}")

    def _forget_registration(self) -> None:
        self.location = None
        self._announced = None
        self._observations.clear()
        self._wake()

    async def _register(self, timeout: float | None) -> RegistrationResult:
        account = self.management_server
        if account is None:
            return self._record(RegistrationResult(self.endpoint, "register", False, Failure.NO_SERVER,
                                                   detail="the device has no management-server account"))
        assert account.uri is not None
        try:
            await self._connect(account.uri)
        except (OSError, ValueError) as exc:
            return self._record(RegistrationResult(self.endpoint, "register", False, Failure.SOCKET,
                                                   detail=f"cannot reach {account.uri}: {exc}"))
        if is_secure(account.uri):
            started = time.monotonic()
            problem = await self._open_session(account, timeout)
            if problem is not None:
                return self._record(RegistrationResult(self.endpoint, "register", False, Failure.HANDSHAKE,
                                                       detail=f"{account.uri}: {problem}", at=time.monotonic()))
            if timeout is not None:
                timeout = max(timeout - (time.monotonic() - started), 0.001)
        announced = self._announce(account)
        message = registration.register_message(self.endpoint, announced, lwm2m_version=self.lwm2m_version)
        result, response = await self._exchange("register", message, Code.CREATED, timeout, record=False)
        if response is not None:
            location = registration.location_of(response)
            if location is None:
                result = RegistrationResult(self.endpoint, "register", False, Failure.REJECTED, response.code.dotted,
                                            "the answer named no Location-Path", at=result.at)
            else:
                self._observations.clear()  # a new registration: the server's observations are gone
                self.location, self._announced = location, announced
                self._last_contact = time.monotonic()
                result = RegistrationResult(self.endpoint, "register", True, code=result.code, latency=result.latency,
                                            location=location, at=result.at)
                self._stay_awake()
        return self._record(result)

    async def _update(self, timeout: float | None) -> RegistrationResult:
        account = self.management_server
        assert self.location is not None and self._announced is not None
        if account is None:
            self._forget_registration()
            return self._record(RegistrationResult(self.endpoint, "update", False, Failure.NO_SERVER,
                                                   detail="the management-server account is gone"))
        announced = self._announce(account)
        message = registration.update_message(self.location, self._announced, announced,
                                              lwm2m_version=self.lwm2m_version)
        result, _ = await self._exchange("update", message, Code.CHANGED, timeout)
        if result.ok:
            self._announced = announced
            self._last_contact = time.monotonic()
            self._stay_awake()
        elif result.failure is Failure.REJECTED and result.retry_after is None:
            self._forget_registration()
            if self.updating and asyncio.current_task() is not self._maintainer:
                self._update_now.set()  # wake the updating task: it registers again
        return result

    async def _maintain(self) -> None:
        failures = 0
        while True:
            if self.location is None:
                last = self.registrations[-1] if self.registrations else None
                if last is not None and last.operation == "register" and not last.ok:
                    backoff = self.timing.register_retry * min(1 << failures, MAX_BACKOFF)
                    failures += 1
                    await asyncio.sleep(last.retry_after if last.retry_after is not None else backoff)
                if not (await self._register(None)).ok:
                    continue
                failures = 0
            assert self._announced is not None
            due = self._last_contact + registration.update_delay(self._announced.lifetime, self.timing.update_margin)
            try:
                async with asyncio.timeout(max(due - time.monotonic(), 0.0)):
                    await self._update_now.wait()
            except TimeoutError:
                pass
            self._update_now.clear()
            if self.location is None:
                continue
            result = await self._update(None)
            if not result.ok:
                if result.retry_after is not None:
                    await asyncio.sleep(result.retry_after)
                else:
                    self._forget_registration()  # no answer either: register again

    def _trigger_update(self) -> None:
        """An Update as soon as possible (by the updating task, or a one-off exchange)."""
        if self.updating:
            self._update_now.set()
        elif self.location is not None:
            self._spawn(self._update_once())

    async def _update_once(self) -> None:
        if self.location is not None:
            await self._update(None)

    async def _open_session(self, account: AssignedServer, timeout: float | None) -> str | None:
        """A new DTLS session with the management server, with the credentials of its Security
        instance; None when established, else why not."""
        assert self._endpoint is not None and self._management_server is not None
        try:
            credentials = credentials_from_security(account.security_mode, account.identity,
                                                    account.server_public_key, account.secret_key)
            await self._endpoint.connect(self._management_server, credentials, timeout)
        except (ValueError, HandshakeError) as exc:
            return str(exc)
        except TimeoutError:
            return f"no DTLS session within {timeout:g} s"
        return None

    async def _connect(self, uri: str) -> None:
        """Resolve the management server, on a socket that can reach it."""
        family, address = await resolve(uri)
        await self.start()
        assert self._endpoint is not None
        wanted = self._local_host or local_host_for(family, address[0])
        if not _reaches(self._endpoint.address[0], wanted):
            self._endpoint.close()
            await self._open(wanted)
        self._management_server = address

    async def _exchange(self, operation: str, message: aiocoap.Message, success: Code, timeout: float | None,
                        *, record: bool = True) -> tuple[RegistrationResult, aiocoap.Message | None]:
        """One request to the management server; the result, and the response when it was ``success``."""
        def outcome(**fields: object) -> RegistrationResult:
            return RegistrationResult(self.endpoint, operation, at=time.monotonic(), **fields)  # type: ignore[arg-type]

        endpoint, server = self._endpoint, self._management_server
        if endpoint is None or server is None:
            result = outcome(ok=False, failure=Failure.SOCKET, detail="the device is not connected")
            return (self._record(result) if record else result), None
        started = time.monotonic()
        response = None
        async with self._exchange_lock:
            self._busy += 1
            self._wake()
            try:
                async with asyncio.timeout(timeout):
                    response = await endpoint.request(message, server)
            except PeerReset:
                result = outcome(ok=False, failure=Failure.RESET, detail="the server answered with a CoAP Reset")
            except HandshakeError as exc:
                result = outcome(ok=False, failure=Failure.HANDSHAKE, detail=str(exc))
            except ExchangeError as exc:
                result = outcome(ok=False, failure=Failure.NO_RESPONSE, detail=str(exc))
            except TimeoutError:
                result = outcome(ok=False, failure=Failure.NO_RESPONSE, detail=f"no answer within {timeout:g} s")
            finally:
                self._busy -= 1
                self._stay_awake()
        if response is not None:
            code = response.code
            if code == success:
                result = outcome(ok=True, code=code.dotted, latency=time.monotonic() - started, location=self.location)
            else:
                detail = bytes(response.payload).decode("utf-8", "replace").strip() or f"the server answered {code}"
                max_age = response.opt.max_age
                retry = (float(max_age) if max_age is not None else 60.0) if code in RETRY_CODES else None
                result = outcome(ok=False, failure=Failure.REJECTED, code=code.dotted, detail=detail, retry_after=retry)
                response = None
        if record:
            self._record(result)
        return result, response

    def _record(self, result: RegistrationResult) -> RegistrationResult:
        self.registrations.append(result)
        if self._on_registration is not None:
            self._on_registration(result)
        return result

    # --- queue mode ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._sleep_timer is not None:
            self._sleep_timer.cancel()
            self._sleep_timer = None
        if self._endpoint is not None:
            self._endpoint.deaf = False

    def _stay_awake(self) -> None:
        """After sending something: a registered queue-mode device sleeps ``Timing.awake`` seconds later."""
        if self._announced is None or not self._announced.queue_mode or self._endpoint is None:
            return
        if self._sleep_timer is not None:
            self._sleep_timer.cancel()
        self._sleep_timer = asyncio.get_running_loop().call_later(self.timing.awake, self._fall_asleep)

    def _fall_asleep(self) -> None:
        self._sleep_timer = None
        if self._busy == 0 and self._endpoint is not None:
            self._endpoint.deaf = True

    # --- serving the servers' requests --------------------------------------------------------------

    def _handle(self, request: aiocoap.Message, peer: Address) -> aiocoap.Message | None:
        observe = _int_option(request.opt.observe) if request.code == Code.GET else None
        path = "/" + "/".join(request.opt.uri_path)

        def received(code: str | None) -> None:
            entry = ReceivedRequest(_method(request.code), path, _int_option(request.opt.content_format),
                                    _int_option(request.opt.accept), code, observe, tuple(request.opt.uri_query),
                                    secure=self._endpoint is not None and self._endpoint.secure(peer))
            self.received.append(entry)
            if self._on_request is not None:
                self._on_request(entry)

        if self.answer_limit is not None and self.answered >= self.answer_limit:
            received(None)
            return None
        management = peer != self._bootstrap_server and (self.location is not None or peer == self._management_server)
        response = self._requests.handle(request, management=management)
        if observe == 1:
            self._observations.cancel(peer, request.token)
        elif observe == 0 and response.code == Code.CONTENT and request.opt.accept != content.LINK_FORMAT:
            observation = self._observations.add(peer, request.token, Path.parse(path), _int_option(request.opt.accept))
            response.opt.observe = observation.sequence
        self.answered += 1
        received(response.code.dotted)
        self._stay_awake()
        return response

    async def _notify(self, observation: Observation) -> bool:
        """Send one notification; False when the observation ends (the value is gone, or the peer reset
        or never acknowledged it)."""
        if self._endpoint is None:
            return False
        message = self._requests.read(observation.path, observation.accept)
        message.token = observation.token
        keep = message.code == Code.CONTENT
        if keep:
            message.opt.observe = observation.sequence
        self._busy += 1
        self._wake()
        try:
            await self._endpoint.notify(message, observation.peer, confirmable=self.confirmable_notifications)
        except ExchangeError:
            return False
        finally:
            self._busy -= 1
            self._stay_awake()
        self.notifications += 1
        return keep

    def _default_periods(self) -> tuple[float | None, float | None]:
        """The Default Minimum and Maximum Period of the management server's Server instance."""
        account = self.management_server
        if account is None or account.server_instance is None:
            return None, None
        base = Path(objects.SERVER, account.server_instance)
        pmin, pmax = (self._store.value(base.child(rid)) for rid in (SERVER_DEFAULT_PMIN, SERVER_DEFAULT_PMAX))
        return (float(pmin) if isinstance(pmin, int) else None), (float(pmax) if isinstance(pmax, int) else None)

    def _changed(self, path: Path) -> None:
        """A server wrote, created or deleted at ``path``: notify observers, and tell the management server
        when what the registration announced (lifetime, binding, objects) changed."""
        self._observations.changed(path)
        account = self.management_server
        if self.location is not None and account is not None and self._announce(account) != self._announced:
            self._trigger_update()

    def _finished(self, problem: str | None) -> None:
        if problem is None:
            self._finished_at = time.monotonic()
        if self._finish is not None and not self._finish.done():
            self._finish.set_result(problem)

    def _executed(self, path: Path) -> None:
        """After an Execute is answered 2.04: what it asks happens next."""
        self.executed.append(path)
        if path.object_id == objects.SERVER and path.resource_id == objects.SERVER_UPDATE_TRIGGER:
            self._trigger_update()
        elif path.object_id == objects.SERVER and path.resource_id == objects.SERVER_BOOTSTRAP_TRIGGER:
            self.bootstrap_triggered.set()
            if self._on_bootstrap_trigger is not None:
                self._on_bootstrap_trigger()
            if self.bootstrap_uri is not None and (self.location is not None or self.updating):
                self._spawn(self._bootstrap_again())
        elif path.object_id == objects.DEVICE and path.resource_id == DEVICE_REBOOT:
            if self.location is not None or self.updating:
                self._spawn(self._reboot())
        elif path.object_id == TEMPERATURE and path.resource_id == RESET_MIN_MAX:
            current = self._store.value(path.parent.child(SENSOR_VALUE))
            for rid in (MIN_MEASURED, MAX_MEASURED):
                if isinstance(current, float):
                    self._store.set_value(path.parent.child(rid), current)
                    self._observations.changed(path.parent.child(rid))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` after the current answer has gone out."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bootstrap_again(self) -> None:
        """The Bootstrap-Request Trigger: De-register, bootstrap, then register with the new account."""
        keep_updating = self.updating
        self.stop_updating()
        if self.location is not None:
            await self.deregister(self.timing.exchange_lifetime)
        result = await self.bootstrap(self.timing.exchange_lifetime)
        self.bootstraps.append(result)
        if not result.ok:
            return
        if keep_updating:
            self._start_updating()
        else:
            await self._register(None)

    async def _reboot(self) -> None:
        """Reboot: observations and the registration are gone (no De-register); register again and keep
        it alive."""
        self.stop_updating()
        self._forget_registration()
        self._start_updating()


class _BadPack(Exception):
    pass


class OnboardingFailed(Exception):
    """A device's bootstrap or first Register failed; ``result`` says how."""

    def __init__(self, result: BootstrapResult | RegistrationResult) -> None:
        super().__init__(f"{result.endpoint}: {result.reason}" + (f": {result.detail}" if result.detail else ""))
        self.result = result


async def onboard(endpoint: str, bootstrap_uri: str, credentials: ClientCredentials | None = None, *,
                  timeout: float = 30.0, keep_updating: bool = True, **options: Any) -> SimulatedDevice:
    """A device that bootstrapped with ``bootstrap_uri`` (over DTLS with the factory ``credentials`` for
    ``coaps://``) and registered with the management server the bootstrap gave it (over DTLS with the
    credentials written then, for ``coaps://``). Returns once registered; the caller closes the device
    (``await device.close()``). ``OnboardingFailed`` when the bootstrap or the Register failed (the
    device is closed then). ``options`` are ``SimulatedDevice``'s."""
    device = SimulatedDevice(endpoint, bootstrap_uri, bootstrap_credentials=credentials, **options)
    try:
        bootstrapped = await device.bootstrap(timeout)
        if not bootstrapped.ok:
            raise OnboardingFailed(bootstrapped)
        registered = await device.register(timeout, keep_updating=keep_updating)
        if not registered.ok:
            raise OnboardingFailed(registered)
    except BaseException:
        await device.close()
        raise
    return device
