"""Observations a management server holds on a device (RFC 7641 with the LwM2M attributes): when a
notification is due and what it must carry.

A change of an observed value makes a notification due, unless the observed resource is numeric and has
``gt``/``lt``/``st`` attributes that the change does not meet (crossing ``gt`` or ``lt``, or moving by at
least ``st``). A due notification waits until ``pmin`` seconds have passed since the last one; with
``pmax`` one goes out at least that often, changed or not. Periods come from the attributes in force at
the observed path, else from the Server object's Default Minimum / Maximum Period.

Timers are event-loop callbacks, one per observation, so thousands of devices stay cheap; only a
notification on its way (a confirmable one waits for its ACK) is a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pilotboat.lwm2m.model import Path, Value
from pilotboat.sim.attributes import AttributeStore
from pilotboat.sim.exchange import Address

SEQUENCE_MASK = 0xFFFFFF  # the Observe option holds 24 bits
#: Sends a notification for the observation (its ``sequence`` already advanced); False ends it.
Sender = Callable[["Observation"], Awaitable[bool]]
#: (default pmin, default pmax) from the Server object, None where unset.
Defaults = Callable[[], tuple[float | None, float | None]]


class Observation:
    """One observation: who asked (peer and token), what (path, format), and its notification state."""

    __slots__ = ("peer", "token", "path", "accept", "sequence", "last_sent", "last_value", "pending", "timer",
                 "in_flight", "sent")

    def __init__(self, peer: Address, token: bytes, path: Path, accept: int | None, now: float,
                 value: Value | None) -> None:
        self.peer = peer
        self.token = token
        self.path = path
        #: The Accept of the request (notifications use the same format).
        self.accept = accept
        #: The Observe value of the last message sent (the first response carries 1).
        self.sequence = 1
        self.last_sent = now
        #: The value last reported, for ``gt``/``lt``/``st`` (single numeric resources only).
        self.last_value = value
        self.pending = False
        self.timer: asyncio.TimerHandle | None = None
        self.in_flight = False
        #: Notifications sent after the first response.
        self.sent = 0

    def __repr__(self) -> str:
        return f"Observation({self.path}, token={self.token.hex()}, sequence={self.sequence})"


def _number(value: Value | None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Observations:
    """The observations of one device."""

    def __init__(self, *, attributes: AttributeStore, defaults: Defaults, value_of: Callable[[Path], Value | None],
                 send: Sender) -> None:
        self._attributes = attributes
        self._defaults = defaults
        self._value_of = value_of
        self._send = send
        self._by_key: dict[tuple[Address, bytes], Observation] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._by_key)

    def all(self) -> list[Observation]:
        return list(self._by_key.values())

    def add(self, peer: Address, token: bytes, path: Path, accept: int | None) -> Observation:
        """Start (or restart, for the same peer and token) an observation; its ``sequence`` goes in the
        first response."""
        self.cancel(peer, token)
        loop = asyncio.get_running_loop()
        observation = Observation(peer, token, path, accept, loop.time(), self._value_of(path))
        self._by_key[(peer, token)] = observation
        self._schedule(observation)
        return observation

    def cancel(self, peer: Address, token: bytes) -> bool:
        """End the observation of ``peer`` with ``token``; False when there was none."""
        observation = self._by_key.pop((peer, token), None)
        if observation is None:
            return False
        if observation.timer is not None:
            observation.timer.cancel()
        return True

    def clear(self) -> None:
        """End every observation (a new registration or a reboot)."""
        for key in list(self._by_key):
            self.cancel(*key)
        for task in self._tasks:
            task.cancel()

    def changed(self, path: Path) -> None:
        """Values at or below ``path`` changed (or ``path`` was created or deleted)."""
        for observation in list(self._by_key.values()):
            if not (observation.path.is_within(path) or path.is_within(observation.path)):
                continue
            if self._worth_notifying(observation):
                observation.pending = True
                self._schedule(observation)

    # --- scheduling -----------------------------------------------------------------------------

    def _periods(self, observation: Observation) -> tuple[float, float | None]:
        attributes = self._attributes.effective(observation.path)
        default_pmin, default_pmax = self._defaults()
        pmin = attributes.get("pmin", default_pmin) or 0.0
        pmax = attributes.get("pmax", default_pmax)
        return pmin, (max(pmax, pmin) if pmax else None)

    def _worth_notifying(self, observation: Observation) -> bool:
        attributes = self._attributes.effective(observation.path)
        if observation.path.depth < 3 or not attributes.keys() & {"gt", "lt", "st"}:
            return True
        before, now = _number(observation.last_value), _number(self._value_of(observation.path))
        if before is None or now is None:
            return True
        if "gt" in attributes and (before > attributes["gt"]) != (now > attributes["gt"]):
            return True
        if "lt" in attributes and (before < attributes["lt"]) != (now < attributes["lt"]):
            return True
        return "st" in attributes and abs(now - before) >= attributes["st"]

    def _schedule(self, observation: Observation) -> None:
        if observation.timer is not None:
            observation.timer.cancel()
            observation.timer = None
        if observation.in_flight or self._by_key.get((observation.peer, observation.token)) is not observation:
            return
        pmin, pmax = self._periods(observation)
        loop = asyncio.get_running_loop()
        due = []
        if observation.pending:
            due.append(observation.last_sent + pmin)
        if pmax is not None:
            due.append(observation.last_sent + pmax)
        if due:
            observation.timer = loop.call_later(max(min(due) - loop.time(), 0.0), self._fire, observation)

    def _fire(self, observation: Observation) -> None:
        observation.timer = None
        task = asyncio.get_running_loop().create_task(self._deliver(observation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, observation: Observation) -> None:
        observation.in_flight = True
        observation.pending = False
        observation.last_sent = asyncio.get_running_loop().time()
        observation.last_value = self._value_of(observation.path)
        observation.sequence = (observation.sequence + 1) & SEQUENCE_MASK
        keep = False
        try:
            keep = await self._send(observation)
            observation.sent += 1
        finally:
            observation.in_flight = False
            if not keep:
                self.cancel(observation.peer, observation.token)
            else:
                self._schedule(observation)
