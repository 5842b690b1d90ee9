"""Many simulated devices bootstrapping against one server: started at a given rate, with at most
``window`` sessions at a time, each device on its own socket (opened for its session only)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pilotboat.sim.device import BootstrapResult, Failure, SimulatedDevice
from pilotboat.sim.exchange import Timing, coap_address


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


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..100) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(share / 100 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class FleetStats:
    """The outcome of a fleet run; latencies are in seconds."""

    results: tuple[BootstrapResult, ...]
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
        """Completed bootstraps per second."""
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, share: float) -> float | None:
        """A latency percentile of the completed bootstraps."""
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
) -> FleetStats:
    """Bootstrap one simulated device per endpoint name against ``server_uri``: start ``rate`` devices
    per second (None: as fast as the window allows), at most ``window`` at a time, each given ``timeout``
    seconds. ``progress`` is called with each device's result as it ends. Results keep the order of
    ``endpoints``.

    A device keeps its socket ``linger`` seconds after its outcome (outside the window), answering
    retransmissions as a real device that goes on to register would; with 0 it vanishes at once, and
    the server's last retransmissions meet ICMP port-unreachable errors."""
    coap_address(server_uri)
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
                               bootstrap_instance=bootstrap_instance, timing=timing)

    device("option-check")  # bad device options fail here, not in every task

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
