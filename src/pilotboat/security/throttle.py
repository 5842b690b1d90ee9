"""Failed-login throttling: after too many failures for one key within a window, further attempts are
refused until the oldest failure leaves the window. In-process: each node counts its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque


class FailureThrottle:
    def __init__(self, max_failures: int = 10, window_seconds: float = 300, capacity: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._capacity = capacity

    def retry_after(self, key: str, now: float | None = None) -> int:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(key)
        if failures is None:
            return 0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.max_failures:
            return 0
        return max(1, int(failures[0] + self.window - now) + 1)

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._failures.setdefault(key, deque(maxlen=self.max_failures))
        failures.append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self._capacity:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


class RateBudget:
    """At most ``per_second`` allowances per second on average (a token bucket of ``burst``), with a
    count of the refusals since the last allowance, for work an unauthenticated flood could multiply."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.rate = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.refused = 0

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.refused += 1
        return False

    def take_refused(self) -> int:
        """The refusals since the last call (and reset the count)."""
        count, self.refused = self.refused, 0
        return count
