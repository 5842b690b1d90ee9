"""Many simulated devices against one server, each on its own socket, started at a given rate with at
most ``window`` exchanges at a time: bootstrapping (``run_fleet``, a socket for the session only), or
registering with a management server and optionally staying registered (``register_fleet``)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import resource
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pilotboat.dtls.client import ClientCredentials
from pilotboat.model.management_server import DEFAULT_BINDING, DEFAULT_LIFETIME
from pilotboat.sim.device import SimulatedDevice
from pilotboat.sim.exchange import Timing, coap_address, is_secure
from pilotboat.sim.results import BootstrapResult, Failure, RegistrationResult

#: What one device's exchange came to: a bootstrap, or a Register/Update/De-register.
Outcome = BootstrapResult | RegistrationResult


#: Seconds a fleet device keeps its socket after its outcome.
DEFAULT_LINGER = 5.0


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (each simulated device holds a
    socket while it runs and lingers); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit; devices that cannot get a socket fail with SOCKET
    return soft


def endpoint_names(prefix: str, count: int, start: int = 0) -> list[str]:
    """``prefix`` + index for ``count`` devices from ``start``, zero-padded to the widest index
    (``sim-00`` … ``sim-99`` for 100 devices)."""
    if count < 0 or start < 0:
        raise ValueError("count and start must not be negative")
    width = len(str(max(start + count - 1, 0)))
    return [f"{prefix}{index:0{width}d}" for index in range(start, start + count)]


def check_credentials(server_uri: str, endpoints: Sequence[str],
                      credentials: Mapping[str, ClientCredentials] | None) -> None:
    """A ``coaps://`` fleet needs credentials for every endpoint (``ValueError`` naming the first
    without); a ``coap://`` fleet takes none."""
    if not is_secure(server_uri):
        if credentials:
            raise ValueError("credentials need a coaps:// server")
        return
    missing = [endpoint for endpoint in endpoints if endpoint not in (credentials or {})]
    if missing:
        raise ValueError(f"{len(missing)} device(s) have no DTLS credentials, {missing[0]} the first")


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..100) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(share / 100 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class FleetStats:
    """The outcome of a fleet run (or of one phase of it); latencies are in seconds."""

    results: tuple[Outcome, ...]
    #: Seconds from the first device's start to the last device's outcome.
    elapsed: float

    @property
    def completed(self) -> int:
        return sum(1 for result in self.results if result.ok)

    @property
    def failed(self) -> int:
        return len(self.results) - self.completed

    @property
    def failures(self) -> dict[str, int]:
        """Failure reason (``BootstrapResult.reason``) -> count, the most frequent first."""
        return dict(Counter(result.reason for result in self.results if result.reason is not None).most_common())

    @property
    def rate(self) -> float:
        """Completed exchanges (bootstraps, registrations…) per second."""
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, share: float) -> float | None:
        """A latency percentile of the completed exchanges."""
        return percentile([result.latency for result in self.results if result.latency is not None], share)

    @property
    def p50(self) -> float | None:
        return self.latency(50)

    @property
    def p90(self) -> float | None:
        return self.latency(90)

    @property
    def p99(self) -> float | None:
        return self.latency(99)


async def bootstrap_device(device: SimulatedDevice, *, timeout: float, pack: bool) -> BootstrapResult:
    """One device's bootstrap; with ``pack``, Bootstrap-Pack first and client-initiated bootstrap when
    the server rejects the pack (as LwM2M 1.2 clients do). The latency covers both attempts."""
    started = time.monotonic()
    if not pack:
        return await device.bootstrap(timeout)
    result = await device.bootstrap_pack(timeout)
    if result.failure is not Failure.REJECTED:
        return result
    fallback_started = time.monotonic()
    remaining = max(timeout - (fallback_started - started), 0.001)
    result = await device.bootstrap(remaining)
    if result.latency is not None:
        result = dataclasses.replace(result, latency=result.latency + fallback_started - started)
    return result


async def run_fleet(
    server_uri: str,
    endpoints: Sequence[str],
    *,
    rate: float | None = None,
    window: int = 100,
    timeout: float = 30.0,
    pack: bool = False,
    lwm2m_version: str = "1.1",
    content_format: int | None = None,
    bootstrap_instance: int = 1,
    timing: Timing | None = None,
    linger: float = DEFAULT_LINGER,
    progress: Callable[[BootstrapResult], None] | None = None,
    credentials: Mapping[str, ClientCredentials] | None = None,
) -> FleetStats:
    """Bootstrap one simulated device per endpoint name against ``server_uri``: start ``rate`` devices
    per second (None: as fast as the window allows), at most ``window`` at a time, each given ``timeout``
    seconds. ``progress`` is called with each device's result as it ends. Results keep the order of
    ``endpoints``.

    A device keeps its socket ``linger`` seconds after its outcome (outside the window), answering
    retransmissions as a real device that goes on to register would; with 0 it vanishes at once, and
    the server's last retransmissions meet ICMP port-unreachable errors. A ``coaps://`` server needs
    ``credentials``: each device's factory credential by endpoint name."""
    coap_address(server_uri)
    check_credentials(server_uri, endpoints, credentials)
    if pack and lwm2m_version != "1.2":
        raise ValueError("Bootstrap-Pack needs LwM2M 1.2")
    if window < 1:
        raise ValueError("window must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    interval = 1 / rate if rate else 0.0
    slots = asyncio.Semaphore(window)
    results: list[BootstrapResult | None] = [None] * len(endpoints)

    def device(endpoint: str) -> SimulatedDevice:
        return SimulatedDevice(endpoint, server_uri, lwm2m_version=lwm2m_version, content_format=content_format,
                               bootstrap_instance=bootstrap_instance, timing=timing,
                               bootstrap_credentials=(credentials or {}).get(endpoint))

    if endpoints:
        device(endpoints[0])  # bad device options fail here, not in every task

    last_outcome = time.monotonic()

    async def one(index: int, endpoint: str) -> None:
        nonlocal last_outcome
        simulated = device(endpoint)
        try:
            try:
                result = await bootstrap_device(simulated, timeout=timeout, pack=pack)
            finally:
                slots.release()
            last_outcome = time.monotonic()
            results[index] = result
            if progress is not None:
                progress(result)
            await asyncio.sleep(linger)
        finally:
            await simulated.close()

    started = time.monotonic()
    next_start = started
    async with asyncio.TaskGroup() as group:
        for index, endpoint in enumerate(endpoints):
            await slots.acquire()
            now = time.monotonic()
            if next_start > now:
                await asyncio.sleep(next_start - now)
            next_start = max(next_start, now) + interval
            group.create_task(one(index, endpoint), name=f"simulated device {endpoint}")
    done = [result for result in results if result is not None]
    return FleetStats(tuple(done), max(last_outcome - started, 0.0))


@dataclass(frozen=True)
class RegistrationFleetStats:
    """A registration fleet run, phase by phase."""

    #: Each device's first Register (the order of the endpoints); ``elapsed`` is this phase's.
    registrations: FleetStats
    #: Updates (and Registers sent again after a failed Update) while the fleet kept running; ``elapsed``
    #: is the time it kept running.
    updates: FleetStats
    #: The De-registers at the end (none when the fleet was left to expire).
    deregistrations: FleetStats

    @property
    def reregistrations(self) -> int:
        """Registers sent again while running."""
        return sum(1 for result in self.updates.results if isinstance(result, RegistrationResult)
                   and result.operation == "register")


async def register_fleet(
    server_uri: str,
    endpoints: Sequence[str],
    *,
    rate: float | None = None,
    window: int = 100,
    timeout: float = 30.0,
    lifetime: int = DEFAULT_LIFETIME,
    binding: str = DEFAULT_BINDING,
    queue_mode: bool = False,
    lwm2m_version: str = "1.1",
    content_format: int | None = None,
    temperature_sensors: int = 1,
    sensor_interval: float | None = None,
    keep_running: float = 0.0,
    deregister: bool = True,
    timing: Timing | None = None,
    progress: Callable[[RegistrationResult], None] | None = None,
    credentials: Mapping[str, ClientCredentials] | None = None,
) -> RegistrationFleetStats:
    """Register one simulated device per endpoint name directly with the management server at
    ``server_uri`` (a factory account: no bootstrap): ``rate`` Registers started per second (None: as
    fast as the window allows), at most ``window`` in flight, each given ``timeout`` seconds.
    ``progress`` is called with each first Register's result.

    With ``keep_running`` the registered devices then stay up that many seconds, sending Updates before
    their ``lifetime`` ends and answering the server; with ``deregister`` they De-register at the end
    (``window`` at a time), else they just vanish. Every device holds its own socket throughout, so the
    open-file limit is raised first. A ``coaps://`` server needs ``credentials``: each device's
    management-server credential by endpoint name."""
    coap_address(server_uri)
    check_credentials(server_uri, endpoints, credentials)
    if window < 1:
        raise ValueError("window must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    if keep_running < 0:
        raise ValueError("keep_running must not be negative")

    def device(endpoint: str) -> SimulatedDevice:
        return SimulatedDevice(endpoint, server_uri=server_uri, lifetime=lifetime, binding=binding,
                               queue_mode=queue_mode, lwm2m_version=lwm2m_version, content_format=content_format,
                               temperature_sensors=temperature_sensors, sensor_interval=sensor_interval, timing=timing,
                               server_credentials=(credentials or {}).get(endpoint))

  # bad device options fail here, not in every task
    raise_open_file_limit()
    interval = 1 / rate if rate else 0.0
    slots = asyncio.Semaphore(window)
    devices: list[SimulatedDevice] = [device(endpoint) for endpoint in endpoints]
    last_outcome = time.monotonic()

    async def first(simulated: SimulatedDevice) -> None:
        nonlocal last_outcome
        try:
            result = await simulated.register(timeout, keep_updating=keep_running > 0)
        finally:
            slots.release()
        last_outcome = time.monotonic()
        if progress is not None:
            progress(result)

    async def leave(simulated: SimulatedDevice) -> None:
        async with slots:
            await simulated.deregister(timeout)

    try:
        started = time.monotonic()
        next_start = started
        async with asyncio.TaskGroup() as group:
            for simulated in devices:
                await slots.acquire()
                now = time.monotonic()
                if next_start > now:
                    await asyncio.sleep(next_start - now)
                next_start = max(next_start, now) + interval
                group.create_task(first(simulated), name=f"simulated device {simulated.endpoint}")
        registered = FleetStats(tuple(simulated.registrations[0] for simulated in devices if simulated.registrations),
                                max(last_outcome - started, 0.0))
        running_since = time.monotonic()
        if keep_running:
            await asyncio.sleep(keep_running)
        for simulated in devices:
            simulated.stop_updating()
        kept = time.monotonic() - running_since if keep_running else 0.0
        updates = FleetStats(tuple(result for simulated in devices for result in simulated.registrations[1:]), kept)
        leaving = [simulated for simulated in devices if simulated.registered] if deregister else []
        left_at = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for simulated in leaving:
                group.create_task(leave(simulated))
        deregistrations = FleetStats(tuple(simulated.registrations[-1] for simulated in leaving),
                                     time.monotonic() - left_at if leaving else 0.0)
    finally:
        await asyncio.gather(*(simulated.close() for simulated in devices))
    return RegistrationFleetStats(registered, updates, deregistrations)
