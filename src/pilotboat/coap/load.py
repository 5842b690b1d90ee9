"""Event-loop lag, the overload signal of the CoAP servers.

When a node's loop runs its timers late, it reads the answers of its peers late too: its own
confirmable requests are retransmitted, every peer answers again, and the extra datagrams make the lag
worse (congestion collapse). Shedding new work (5.03 with Max-Age) while the lag is high lets the
sessions already running finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

#: CPython's collection thresholds on a serving node (its defaults: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)
#: Lag above which new bootstrap sessions are refused for a while: a quarter of CoAP's ACK_TIMEOUT (2 s).
SHED_LAG_SECONDS = 0.5


class LoopLag:
    """How late the running loop wakes from a short sleep, in seconds; rises at once, decays slowly."""

    def __init__(self, interval: float = 0.05, decay: float = 0.9) -> None:
        self.interval = interval
        self.decay = decay
        self.seconds = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def overloaded(self) -> bool:
        return self.seconds > SHED_LAG_SECONDS

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample(), name="loop lag")

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - started - self.interval)
            self.seconds = max(late, self.seconds * self.decay)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def settle_garbage_collector() -> None:
    """Fewer garbage-collector pauses on a busy node; call once, when start-up is done.

    aiocoap keeps every response for EXCHANGE_LIFETIME (247 s) to answer retransmissions: at a thousand
    requests per second, hundreds of thousands of live objects. CPython's full collections visit all of
    them and stopped the event loop for 0.5–1 s each, every few seconds, in the registration benchmark
    (docs/benchmarks.md). The objects of start-up are frozen out of collections and the thresholds
    raised, so that full collections come much less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
