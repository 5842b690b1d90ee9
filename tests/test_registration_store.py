"""The in-process registration store: indexes, replacement by endpoint, expiry heap, and a
randomized comparison against a naive model (a dict and a full scan)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pilotboat.registry import MemoryRegistrationStore, Registration, RegistrationStore

GRACE = 15.0
T = TypeVar("T")


def make(
    registration_id: str = "r1",
    endpoint: str = "ep1",
    address: tuple[str, int] = ("192.0.2.1", 5683),
    lifetime: int = 100,
    at: float = 1000.0,
) -> Registration:
    return Registration(
        registration_id=registration_id,
        endpoint=endpoint,
        device_id=f"dev-{endpoint}",
        org_id="org",
        address=address,
        lifetime=lifetime,
        lwm2m_version="1.1",
        binding="U",
        queue_mode=False,
        sms=None,
        objects=("/1/0", "/3/0"),
        registered_at=at,
        updated_at=at,
    )


def test_add_and_lookups() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        assert isinstance(store, RegistrationStore)
        a = make("r1", "ep1", ("192.0.2.1", 5683))
        b = make("r2", "ep2", ("192.0.2.2", 5683))
        assert await store.add(a) is None
        assert await store.add(b) is None
        assert await store.get("r1") == a
        assert await store.by_endpoint("ep2") == b
        assert await store.by_address(("192.0.2.1", 5683)) == a
        assert await store.by_address(("192.0.2.1", 5684)) is None
        assert await store.get("nope") is None
        assert await store.by_endpoint("nope") is None
        assert await store.count() == 2 == len(store)
        assert a.expires_at(GRACE) == 1000.0 + 100 + GRACE

    asyncio.run(main())


def test_new_register_replaces_previous_registration_of_endpoint() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        old = make("r1", "ep1", ("192.0.2.1", 5683), at=1000.0)
        new = make("r2", "ep1", ("192.0.2.9", 40000), at=1050.0)
        await store.add(old)
        assert await store.add(new) == old
        assert await store.get("r1") is None
        assert await store.by_address(("192.0.2.1", 5683)) is None
        assert await store.by_endpoint("ep1") == new
        assert await store.by_address(("192.0.2.9", 40000)) == new
        assert await store.count() == 1
        # The old registration's expiry entry is dead: nothing expires at its time.
        assert await store.pop_expired(old.expires_at(GRACE)) == []
        assert await store.next_expiry() == new.expires_at(GRACE)
        # Re-registering with the same id is also a replacement.
        again = dataclasses.replace(new, lifetime=500)
        assert await store.add(again) == new
        assert await store.get("r2") == again

    asyncio.run(main())


def test_registration_id_of_another_endpoint_is_refused_and_changes_nothing() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        a = make("r1", "ep1")
        await store.add(a)
        with pytest.raises(ValueError, match="another endpoint"):
            await store.add(make("r1", "ep2", ("192.0.2.7", 1)))
        assert await store.get("r1") == a
        assert await store.by_endpoint("ep2") is None
        assert await store.count() == 1

    asyncio.run(main())


def test_address_goes_to_the_newest_holder() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        shared = ("198.51.100.1", 50000)
        a = make("r1", "ep1", shared)
        b = make("r2", "ep2", shared)
        await store.add(a)
        await store.add(b)
        assert await store.by_address(shared) == b
        # Removing the older holder does not take the address away from the newer one.
        await store.remove("r1")
        assert await store.by_address(shared) == b
        await store.add(a)
        assert await store.by_address(shared) == a
        # An update from the address reclaims it.
        b2 = await store.update("r2", address=shared, updated_at=1010.0)
        assert await store.by_address(shared) == b2

    asyncio.run(main())


def test_update_reindexes_address_and_expiry() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        a = make("r1", "ep1", ("192.0.2.1", 5683), lifetime=100, at=1000.0)
        await store.add(a)
        updated = await store.update(
            "r1", address=("192.0.2.1", 6000), updated_at=1080.0, lifetime=200, binding="UQ", queue_mode=True
        )
        assert updated is not None
        assert updated == dataclasses.replace(
            a, address=("192.0.2.1", 6000), updated_at=1080.0, lifetime=200, binding="UQ", queue_mode=True
        )
        assert updated.registered_at == a.registered_at
        assert await store.get("r1") == updated
        assert await store.by_address(("192.0.2.1", 5683)) is None
        assert await store.by_address(("192.0.2.1", 6000)) == updated
        # Not expired at the old time; expired at the new one.
        assert await store.pop_expired(a.expires_at(GRACE)) == []
        assert await store.next_expiry() == 1080.0 + 200 + GRACE
        assert await store.pop_expired(1080.0 + 200 + GRACE - 0.001) == []
        assert await store.pop_expired(1080.0 + 200 + GRACE) == [updated]
        assert await store.count() == 0
        assert await store.update("r1", updated_at=2000.0) is None

    asyncio.run(main())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint": "other"}, "cannot change endpoint"),
        ({"registration_id": "r9"}, "cannot change registration_id"),
        ({"lifetime": 0}, "lifetime"),
        ({"address": ("", 1)}, "address"),
        ({"address": ["192.0.2.1", 1]}, "address"),
        ({"objects": ["/3/0"]}, "objects"),
    ],
)
def test_bad_update_is_refused_and_changes_nothing(changes: dict[str, object], message: str) -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        a = make()
        await store.add(a)
        with pytest.raises(ValueError, match=message):
            await store.update("r1", **changes)
        assert await store.get("r1") == a
        assert await store.by_address(a.address) == a
        assert await store.next_expiry() == a.expires_at(GRACE)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [("registration_id", ""), ("endpoint", ""), ("lifetime", 0), ("lifetime", -5), ("lifetime", True)],
)
def test_registration_validates(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.replace("_", " ")):
        dataclasses.replace(make(), **{field: value})


def test_store_rejects_negative_grace() -> None:
    with pytest.raises(ValueError, match="grace"):
        MemoryRegistrationStore(grace=-1)


def test_remove() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        a = make()
        await store.add(a)
        assert await store.remove("r1") == a
        assert await store.remove("r1") is None
        assert await store.get("r1") is None
        assert await store.by_endpoint("ep1") is None
        assert await store.by_address(a.address) is None
        assert await store.next_expiry() is None
        assert await store.pop_expired(10**9) == []

    asyncio.run(main())


def test_pop_expired_in_expiry_order_skipping_stale_entries() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        # Expiry times: r1 1115, r2 1065, r3 1315, r4 1035, r5 1215.
        regs = [
            make("r1", "ep1", ("192.0.2.1", 1), lifetime=100),
            make("r2", "ep2", ("192.0.2.2", 1), lifetime=50),
            make("r3", "ep3", ("192.0.2.3", 1), lifetime=300),
            make("r4", "ep4", ("192.0.2.4", 1), lifetime=20),
            make("r5", "ep5", ("192.0.2.5", 1), lifetime=200),
        ]
        for reg in regs:
            await store.add(reg)
        assert await store.next_expiry() == 1035.0
        # r4 is removed and r2 pushed past the cut-off: both leave stale entries behind.
        await store.remove("r4")
        r2 = await store.update("r2", updated_at=1200.0)
        assert await store.next_expiry() == 1115.0
        assert await store.pop_expired(1220.0) == [regs[0], regs[4]]
        assert {r.registration_id for r in [await store.get(i) for i in ("r2", "r3")] if r} == {"r2", "r3"}
        assert await store.count() == 2
        assert await store.next_expiry() == 1265.0
        assert await store.pop_expired(10_000.0) == [r2, regs[2]]
        assert await store.next_expiry() is None

    asyncio.run(main())


def test_many_updates_keep_the_heap_bounded() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        for i in range(10):
            await store.add(make(f"r{i}", f"ep{i}", ("192.0.2.1", i + 1), at=0.0))
        largest = 0
        for t in range(1, 20_001):
            await store.update("r0", updated_at=float(t))
            largest = max(largest, store.index_stats().heap_entries)
        assert largest <= 10 + max(2 * 10, 64) + 1
        stats = store.index_stats()
        assert stats.live == 10
        # Behaviour after rebuilds: r0 expires last, the others at their original time.
        expired = await store.pop_expired(100 + GRACE)
        assert sorted(r.registration_id for r in expired) == [f"r{i}" for i in range(1, 10)]
        assert await store.next_expiry() == 20_000.0 + 100 + GRACE
        assert [r.registration_id for r in await store.pop_expired(20_000.0 + 100 + GRACE)] == ["r0"]

    asyncio.run(main())


def test_many_removals_keep_the_heap_bounded() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        for i in range(5_000):
            await store.add(make(f"r{i}", f"ep{i}", ("192.0.2.1", i), at=float(i)))
        for i in range(0, 5_000, 2):
            await store.remove(f"r{i}")
            stats = store.index_stats()
            assert stats.heap_entries <= stats.live + max(2 * stats.live, 64) + 1
        expired = await store.pop_expired(10**9)
        assert [r.registration_id for r in expired] == [f"r{i}" for i in range(1, 5_000, 2)]

    asyncio.run(main())


def test_pop_expired_touches_only_the_expired() -> None:
    async def main() -> None:
        store = MemoryRegistrationStore(grace=GRACE)
        n = 100_000
        for i in range(n):
            # The first 100 have a short lifetime; the rest live a day.
            lifetime = 60 if i < 100 else 86_400
            await store.add(make(f"r{i}", f"ep{i}", (f"10.0.{i // 65536}.1", i % 65536), lifetime, at=float(i % 7)))
        before = store.index_stats().heap_pops
        expired = await store.pop_expired(1_000.0)
        pops = store.index_stats().heap_pops - before
        assert sorted(r.registration_id for r in expired) == sorted(f"r{i}" for i in range(100))
        assert [r.expires_at(GRACE) for r in expired] == sorted(r.expires_at(GRACE) for r in expired)
        assert pops == 100
        assert await store.count() == n - 100

    asyncio.run(main())


# --- Randomized comparison with a naive model ---------------------------------------------------

ENDPOINTS = [f"ep{i}" for i in range(6)]
ADDRESSES = [("192.0.2.1", p) for p in (1000, 1001, 1002, 1003)]


class StoreMachine(RuleBasedStateMachine):
    """Model: a dict id -> Registration, an address -> id dict following the documented rule
    (the newest registrant or updater holds the address), and a full scan for expiry."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.store = MemoryRegistrationStore(grace=GRACE)
        self.now = 0.0
        self.regs: dict[str, Registration] = {}
        self.addresses: dict[tuple[str, int], str] = {}
        self.ids = 0

    def teardown(self) -> None:
        self.runner.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def forget(self, registration_id: str) -> None:
        reg = self.regs.pop(registration_id)
        if self.addresses.get(reg.address) == registration_id:
            del self.addresses[reg.address]

    @rule(
        endpoint=st.sampled_from(ENDPOINTS),
        address=st.sampled_from(ADDRESSES),
        lifetime=st.integers(1, 50),
        reuse=st.booleans(),
    )
    def add(self, endpoint: str, address: tuple[str, int], lifetime: int, reuse: bool) -> None:
        previous = next((r for r in self.regs.values() if r.endpoint == endpoint), None)
        if reuse and previous is not None:
            registration_id = previous.registration_id
        else:
            self.ids += 1
            registration_id = f"id{self.ids}"
        reg = dataclasses.replace(
            make(registration_id, endpoint, address, lifetime, at=self.now), updated_at=self.now
        )
        assert self.run(self.store.add(reg)) == previous
        if previous is not None:
            self.forget(previous.registration_id)
        self.regs[registration_id] = reg
        self.addresses[address] = registration_id

    @rule(data=st.data(), lifetime=st.none() | st.integers(1, 50), address=st.none() | st.sampled_from(ADDRESSES))
    def update(self, data: st.DataObject, lifetime: int | None, address: tuple[str, int] | None) -> None:
        known = sorted(self.regs)
        registration_id = data.draw(st.sampled_from(known + ["unknown"]))
        changes: dict[str, object] = {"updated_at": self.now}
        if lifetime is not None:
            changes["lifetime"] = lifetime
        if address is not None:
            changes["address"] = address
        result = self.run(self.store.update(registration_id, **changes))
        if registration_id not in self.regs:
            assert result is None
            return
        old = self.regs[registration_id]
        expected = dataclasses.replace(old, **changes)
        assert result == expected
        self.regs[registration_id] = expected
        if address is not None:
            if self.addresses.get(old.address) == registration_id:
                del self.addresses[old.address]
            self.addresses[address] = registration_id

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        registration_id = data.draw(st.sampled_from(sorted(self.regs) + ["unknown"]))
        expected = self.regs.get(registration_id)
        assert self.run(self.store.remove(registration_id)) == expected
        if expected is not None:
            self.forget(registration_id)

    @rule(step=st.floats(0, 40, allow_nan=False))
    def advance(self, step: float) -> None:
        self.now += step

    @rule()
    def pop_expired(self) -> None:
        got = self.run(self.store.pop_expired(self.now))
        due = {i for i, r in self.regs.items() if r.expires_at(GRACE) <= self.now}
        assert {r.registration_id for r in got} == due
        assert len(got) == len(due)
        times = [r.expires_at(GRACE) for r in got]
        assert times == sorted(times)
        for reg in got:
            assert reg == self.regs[reg.registration_id]
            self.forget(reg.registration_id)

    @precondition(lambda self: bool(self.regs))
    @rule()
    def next_expiry(self) -> None:
        assert self.run(self.store.next_expiry()) == min(r.expires_at(GRACE) for r in self.regs.values())

    @invariant()
    def lookups_agree(self) -> None:
        assert self.run(self.store.count()) == len(self.regs)
        for registration_id, reg in self.regs.items():
            assert self.run(self.store.get(registration_id)) == reg
            assert self.run(self.store.by_endpoint(reg.endpoint)) == reg
        for endpoint in ENDPOINTS:
            if not any(r.endpoint == endpoint for r in self.regs.values()):
                assert self.run(self.store.by_endpoint(endpoint)) is None
        for address in ADDRESSES:
            holder = self.addresses.get(address)
            assert self.run(self.store.by_address(address)) == (self.regs[holder] if holder else None)
        if not self.regs:
            assert self.run(self.store.next_expiry()) is None
        stats = self.store.index_stats()
        assert stats.heap_entries <= stats.live + max(2 * stats.live, 64) + 1


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_store_matches_naive_model = StoreMachine.TestCase
