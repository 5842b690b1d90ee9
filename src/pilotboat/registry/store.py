"""LwM2M registration store: immutable ``Registration`` records behind the async ``RegistrationStore``
interface, and ``MemoryRegistrationStore``, the in-process implementation.

A registration expires at last update + lifetime + grace. Expiry is tracked in a heap ordered by
expiry time, so ``pop_expired`` costs O((expired + stale) log n) rather than a scan of every
registration, and ``next_expiry`` lets a caller sleep exactly until the next one.

Only the store touches its indexes; callers see ``Registration`` values, which never change
(updates produce a new record with ``dataclasses.replace``)."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from pilotboat.model.peer import PeerIdentity

Address = tuple[str, int]

#: Fields an Update may change; the others identify the registration and are fixed at Register.
UPDATABLE_FIELDS = frozenset({"lifetime", "binding", "queue_mode", "sms", "objects", "address", "updated_at"})


@dataclass(frozen=True)
class Registration:
    registration_id: str
    endpoint: str
    device_id: str
    org_id: str
    #: The peer's (host, port).
    address: Address
    #: Seconds.
    lifetime: int
    lwm2m_version: str
    binding: str
    queue_mode: bool
    sms: str | None
    #: Link targets such as "/3/0".
    objects: tuple[str, ...]
    #: Epoch seconds.
    registered_at: float
    updated_at: float
    #: The credential a DTLS Register authenticated (its Updates and De-register must come with the same
    #: one); None for a registration over plain CoAP.
    peer: PeerIdentity | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.registration_id, str) or not self.registration_id:
            raise ValueError("registration id must be a non-empty string")
        if not isinstance(self.endpoint, str) or not self.endpoint:
            raise ValueError("endpoint must be a non-empty string")
        if isinstance(self.lifetime, bool) or not isinstance(self.lifetime, int) or self.lifetime < 1:
            raise ValueError(f"lifetime must be an integer of at least 1 second, got {self.lifetime!r}")
        if not (
            isinstance(self.address, tuple)
            and len(self.address) == 2
            and isinstance(self.address[0], str)
            and self.address[0]
            and isinstance(self.address[1], int)
            and 0 <= self.address[1] <= 65535
        ):
            raise ValueError(f"address must be a (host, port) tuple, got {self.address!r}")
        if not isinstance(self.objects, tuple) or not all(isinstance(o, str) for o in self.objects):
            raise ValueError("objects must be a tuple of link targets")

    def expires_at(self, grace: float) -> float:
        """When this registration expires: last update + lifetime + ``grace``."""
        return self.updated_at + self.lifetime + grace


@runtime_checkable
class RegistrationStore(Protocol):
    """Where registrations live. Implementations keep lookups by registration id, endpoint and
    address, and an expiry index; an address belongs to the registration that most recently
    registered or updated from it."""

    async def add(self, reg: Registration) -> Registration | None:
        """Store ``reg``, replacing and returning the endpoint's previous registration, if any.
        Raises ``ValueError`` when the registration id belongs to another endpoint."""
        ...

    async def get(self, registration_id: str) -> Registration | None: ...

    async def by_endpoint(self, endpoint: str) -> Registration | None: ...

    async def by_address(self, address: Address) -> Registration | None: ...

    async def update(self, registration_id: str, /, **changes: object) -> Registration | None:
        """Apply ``changes`` (only ``UPDATABLE_FIELDS``); returns the new record, or None when the id is
        unknown. Raises ``ValueError`` for a field that cannot change or an invalid value."""
        ...

    async def remove(self, registration_id: str) -> Registration | None: ...

    async def pop_expired(self, now: float) -> list[Registration]:
        """Remove and return, in expiry order, every registration whose expiry time is <= ``now``."""
        ...

    async def next_expiry(self) -> float | None:
        """The earliest expiry time of a stored registration, or None when the store is empty."""
        ...

    async def count(self) -> int: ...


@dataclass(frozen=True)
class IndexStats:
    """Internal index sizes, for metrics and tests."""

    #: Heap entries, live and stale.
    heap_entries: int
    #: Registrations stored.
    live: int
    #: Entries popped off the heap since the store was created.
    heap_pops: int


class MemoryRegistrationStore:
    """In-process ``RegistrationStore``. Not shared between processes; every method runs without
    awaiting, so each is atomic within one event loop.

    The expiry heap holds ``(expires_at, sequence, registration_id)``; the sequence number is
    unique per entry, and an entry is live only while it is the registration's current one. Entries
    left behind by updates, removals and replacements are skipped when they surface, and the heap is
    rebuilt once they outnumber twice the live registrations, so memory stays proportional to the
    number of registrations.

    Address index: an address maps to the registration that most recently registered or updated
    with it (after a NAT rebinding the same host and port may belong to another endpoint). A
    registration that lost its address that way is still found by id and endpoint, but not by
    address, until it updates with an address again."""

    #: Stale entries tolerated regardless of size, so tiny stores do not rebuild on every update.
    _MIN_STALE = 64
    durable = False

    def __init__(self, grace: float) -> None:
        if grace < 0:
            raise ValueError(f"grace must be at least 0 seconds, got {grace!r}")
        self.grace = float(grace)
        self._by_id: dict[str, Registration] = {}
        self._by_endpoint: dict[str, str] = {}
        self._by_address: dict[Address, str] = {}
        self._heap: list[tuple[float, int, str]] = []
        #: registration id -> sequence number of its live heap entry.
        self._entry: dict[str, int] = {}
        self._sequence = itertools.count()
        self._pops = 0

    def __len__(self) -> int:
        return len(self._by_id)

    async def count(self) -> int:
        return len(self._by_id)

    def index_stats(self) -> IndexStats:
        return IndexStats(heap_entries=len(self._heap), live=len(self._by_id), heap_pops=self._pops)

    async def add(self, reg: Registration) -> Registration | None:
        if not isinstance(reg, Registration):
            raise TypeError("add expects a Registration")
        previous_id = self._by_endpoint.get(reg.endpoint)
        holder = self._by_id.get(reg.registration_id)
        if holder is not None and holder.registration_id != previous_id:
            raise ValueError(f"registration id {reg.registration_id!r} already belongs to another endpoint")
        previous = self._drop(previous_id) if previous_id is not None else None
        self._by_id[reg.registration_id] = reg
        self._by_endpoint[reg.endpoint] = reg.registration_id
        self._by_address[reg.address] = reg.registration_id
        self._schedule(reg)
        return previous

    async def get(self, registration_id: str) -> Registration | None:
        return self._by_id.get(registration_id)

    async def by_endpoint(self, endpoint: str) -> Registration | None:
        registration_id = self._by_endpoint.get(endpoint)
        return None if registration_id is None else self._by_id[registration_id]

    async def by_address(self, address: Address) -> Registration | None:
        registration_id = self._by_address.get(address)
        return None if registration_id is None else self._by_id[registration_id]

    async def update(self, registration_id: str, /, **changes: object) -> Registration | None:
        fixed = sorted(set(changes) - UPDATABLE_FIELDS)
        if fixed:
            raise ValueError(f"an update cannot change {', '.join(fixed)}")
        current = self._by_id.get(registration_id)
        if current is None:
            return None
        updated = replace(current, **changes)  # validates before anything changes
        self._by_id[registration_id] = updated
        if "address" in changes:
            if self._by_address.get(current.address) == registration_id:
                del self._by_address[current.address]
            self._by_address[updated.address] = registration_id
        if updated.expires_at(self.grace) != current.expires_at(self.grace):
            self._schedule(updated)
        return updated

    async def remove(self, registration_id: str) -> Registration | None:
        return self._drop(registration_id) if registration_id in self._by_id else None

    async def pop_expired(self, now: float) -> list[Registration]:
        expired = []
        while self._heap and self._heap[0][0] <= now:
            _, sequence, registration_id = heapq.heappop(self._heap)
            self._pops += 1
            if self._entry.get(registration_id) == sequence:
                expired.append(self._drop(registration_id))
        return expired

    async def next_expiry(self) -> float | None:
        while self._heap:
            expires_at, sequence, registration_id = self._heap[0]
            if self._entry.get(registration_id) == sequence:
                return expires_at
            heapq.heappop(self._heap)
            self._pops += 1
        return None

    def _schedule(self, reg: Registration) -> None:
        sequence = next(self._sequence)
        self._entry[reg.registration_id] = sequence
        heapq.heappush(self._heap, (reg.expires_at(self.grace), sequence, reg.registration_id))
        self._compact_if_stale()

    def _drop(self, registration_id: str) -> Registration:
        reg = self._by_id.pop(registration_id)
        del self._by_endpoint[reg.endpoint]
        del self._entry[registration_id]
        if self._by_address.get(reg.address) == registration_id:
            del self._by_address[reg.address]
        self._compact_if_stale()
        return reg

    def _compact_if_stale(self) -> None:
        stale = len(self._heap) - len(self._entry)
        if stale > max(2 * len(self._entry), self._MIN_STALE):
            self._heap = [entry for entry in self._heap if self._entry.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

