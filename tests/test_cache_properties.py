"""Properties of the slot cache under random sequences of operations (hypothesis state machine):
whatever the order of reads, pins, holds, releases, syncs and resizes, the pools are never
overfilled, a pinned expert is never evicted, a held one never yields to a prediction, the
bookkeeping (slot -> key, key -> slot, expert -> slot remap, free list) stays one consistent
picture, and no pin or hold outlives its release."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hobbit_mlx.policies import POLICIES, make_policy
from hobbit_mlx.testing.slot_cache import slot_cache

LAYERS, EXPERTS = 3, 6
keys = st.tuples(st.integers(0, LAYERS - 1), st.integers(0, EXPERTS - 1),
                 st.sampled_from(["high", "low"]))


class SlotCacheMachine(RuleBasedStateMachine):
    """The cache against a model of what the callers asked for (pins and holds they own)."""

    @initialize(policy=st.sampled_from(sorted(POLICIES)), high=st.integers(1, 5),
                low=st.integers(0, 3))
    def start(self, policy, high, low):
        self.cache = slot_cache(high, make_policy(policy, num_layers=LAYERS), layers=LAYERS,
                                experts=EXPERTS, low_slots=low)
        self.pins: Counter = Counter()
        self.holds: Counter = Counter()
        self.reserved: dict = {}  # key -> slot reserved, bytes not committed yet

    # --- operations ---------------------------------------------------------------------
    def _reserve(self, key, prefetched):
        if key in self.cache or key in self.reserved:
            return None
        pinned_before = {k for k in self.pins if k in self.cache}
        held_before = {k for k in self.holds if k in self.cache}
        slot = self.cache.reserve(key, prefetched=prefetched)
        assert pinned_before <= set(self.cache.keys()), "a pinned expert was evicted"
        if prefetched:
            assert held_before <= set(self.cache.keys()), "a prediction evicted a held expert"
        if slot is not None:
            pool = self.cache._pool_of[key[0], key[2]]
            assert slot not in [s for k, s in self.reserved.items()
                                if self.cache._pool_of[k[0], k[2]] is pool]
            self.reserved[key] = slot
        return slot

    @rule(key=keys, prefetched=st.booleans())
    def read(self, key, prefetched):
        """reserve + commit: a read that succeeds."""
        slot = self._reserve(key, prefetched)
        if slot is not None:
            del self.reserved[key]
            self.cache.commit(key, slot, prefetched=prefetched)

    @rule(key=keys, prefetched=st.booleans())
    def start_read(self, key, prefetched):
        """reserve only: the bytes are still being written (a read in flight)."""
        self._reserve(key, prefetched)

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), ok=st.booleans())
    def end_read(self, data, ok):
        key = data.draw(st.sampled_from(sorted(self.reserved)))
        slot = self.reserved.pop(key)
        if ok:
            self.cache.commit(key, slot)
        else:  # the read failed: its slot goes back
            self.cache.abandon(key, slot)

    @rule(key=keys)
    def use(self, key):
        """A layer call: pin and look up (stamps a hit with this epoch)."""
        self.cache.pin_and_lookup([key])
        self.pins[key] += 1

    @rule(key=keys)
    def pin(self, key):
        self.cache.pin([key])
        self.pins[key] += 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        key = data.draw(st.sampled_from(sorted(self.pins)))
        self.cache.unpin([key])
        self.pins[key] -= 1
        self.pins += Counter()  # drop zeros

    @rule(key=keys)
    def hold(self, key):
        self.cache.hold([key])
        self.holds[key] += 1

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(self.holds)))
        self.cache.release([key])
        self.holds[key] -= 1
        self.holds += Counter()

    @rule()
    def sync(self):
        self.cache.synced()

    @precondition(lambda self: not self.pins and not self.reserved)
    @rule(data=st.data())
    def resize(self, data):
        """As ``OffloadRuntime.resize_pools`` does between calls: keep the policy's best experts,
        rebuild each pool at its new size, read the kept ones again."""
        cache = self.cache
        new = {id(ps): data.draw(st.integers(1 if i == 0 else 0, 5), label=f"slots{i}")
               for i, ps in enumerate(cache.pools)}
        keep = [k for ps in cache.pools for k in cache.shrink_to(ps, new[id(ps)])]
        cache.clear()
        for ps in cache.pools:
            ps.pool.allocate(new[id(ps)])
            ps.reset_slots()
        for key in keep:
            slot = cache.reserve(key)
            assert slot is not None, "a kept expert found no slot in its own rebuilt pool"
            cache.commit(key, slot)
        assert sorted(cache.keys()) == sorted(keep)

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def within_capacity_and_consistent(self):
        cache = self.cache
        assert cache.resident_bytes <= cache.capacity_bytes
        assert len(cache) <= sum(ps.pool.slots for ps in cache.pools)
        reserved = Counter(id(cache._pool_of[k[0], k[2]]) for k in self.reserved)
        for ps in cache.pools:
            held = [(s, k) for s, k in enumerate(ps.key_of) if k is not None]
            assert ps.resident == len(held) <= ps.pool.slots
            # every slot is exactly one of: resident, free, reserved for a read in flight
            assert len(set(ps.free)) == len(ps.free)
            assert not set(ps.free) & {s for s, _ in held}
            assert ps.resident + len(ps.free) + reserved[id(ps)] == ps.pool.slots
            for s, k in held:
                assert cache.slot(k) == s and cache._pool_of[k[0], k[2]] is ps
        for key in cache.keys():
            assert cache._remap[key[0], key[2]][key[1]] == cache.slot(key)
        for (layer, precision), remap in cache._remap.items():
            resident = np.flatnonzero(remap >= 0)
            assert cache.resident_in_layer(layer, precision) == len(resident)
            assert all((layer, int(e), precision) in cache for e in resident)
        assert cache.all_high_resident == (
            sum(1 for k in cache.keys() if k[2] == "high") == LAYERS * EXPERTS)

    @invariant()
    def protections_are_what_the_callers_own(self):
        assert +self.cache._pins == self.pins
        assert +self.cache._holds == self.holds

    def teardown(self):
        """Once every caller let go, nothing stays pinned or held."""
        if not hasattr(self, "cache"):
            return
        for key, n in list(self.pins.items()):
            self.cache.unpin([key] * n)
        for key, n in list(self.holds.items()):
            self.cache.release([key] * n)
        assert not self.cache._pins and not self.cache._holds


SlotCacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSlotCache = SlotCacheMachine.TestCase
