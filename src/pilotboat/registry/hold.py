"""Registration rate limit: more than ``limit`` Register/Update operations by one endpoint within
``window`` seconds put it on hold for ``hold`` seconds (Pelion: 10 in 10 s, 60 s). Pure and per node;
the clock is passed in."""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass


class Admission(enum.Enum):
    ADMITTED = "admitted"
    #: This operation started a hold (record a hold event).
    HOLD_STARTED = "hold started"
    #: The endpoint is on hold; the operation is refused.
    HELD = "held"


@dataclass(frozen=True)
class Decision:
    admission: Admission
    #: Seconds until the hold ends (0 when admitted).
    retry_after: float = 0.0
    #: This operation found the endpoint's hold over before ``release_due`` reported it (record its release).
    released: bool = False


class RegistrationHold:
    def __init__(self, limit: int = 10, window: float = 10.0, hold: float = 60.0, capacity: int = 100_000) -> None:
        if limit < 1 or window <= 0 or hold <= 0:
            raise ValueError("limit, window and hold must be positive")
        self.limit, self.window, self.hold = limit, window, hold
        self._capacity = capacity
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._held: dict[str, float] = {}
        self._ends: list[tuple[float, str]] = []

    def admit(self, endpoint: str, now: float) -> Decision:
        """Count one operation of ``endpoint`` at ``now`` and say whether it may proceed."""
        until = self._held.get(endpoint)
        if until is not None and now < until:
            return Decision(Admission.HELD, until - now)
        released = self._held.pop(endpoint, None) is not None  # a hold that ended, not yet reported
        times = self._recent.setdefault(endpoint, deque())
        self._recent.move_to_end(endpoint)
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        while len(self._recent) > self._capacity:
            self._recent.popitem(last=False)
        if len(times) > self.limit:
            times.clear()
            self._held[endpoint] = now + self.hold
            heapq.heappush(self._ends, (now + self.hold, endpoint))
            return Decision(Admission.HOLD_STARTED, self.hold, released)
        return Decision(Admission.ADMITTED, released=released)

    def release_due(self, now: float) -> list[str]:
        """Endpoints whose hold has ended by ``now``, for their release events. Every hold is reported
        once: here, or by the ``admit`` that found it over first (``Decision.released``)."""
        released = []
        while self._ends and self._ends[0][0] <= now:
            ends, endpoint = heapq.heappop(self._ends)
            if self._held.get(endpoint) == ends:
                del self._held[endpoint]
                released.append(endpoint)
        return released

    def next_release(self) -> float | None:
        return self._ends[0][0] if self._ends else None

    def is_held(self, endpoint: str, now: float) -> bool:
        until = self._held.get(endpoint)
        return until is not None and now < until
