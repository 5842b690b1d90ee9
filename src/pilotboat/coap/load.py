"""Event-loop lag, the overload signal of the CoAP servers.

When a node's loop runs its timers late, it reads the answers of its peers late too: its own
confirmable requests are retransmitted, every peer answers again, and the extra datagrams make the lag
worse (congestion collapse). Shedding new work (5.03 with Max-Age) while the lag is high lets the
sessions already running finish.
"""

from __future__ import annotations

import asyncio
import contextlib

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
