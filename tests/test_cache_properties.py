"""Properties of the slot cache under random sequences of operations (hypothesis state machine):
whatever the order of reads, pins, holds, releases, syncs, resizes and guesses read into scratch
slots, the pools are never overfilled, a pinned expert is never evicted, a held one never yields
to a prediction, a guess in a scratch slot evicts nothing, the bookkeeping (slot -> key, key ->
slot, expert -> slot remap, free list, scratch room) stays one consistent picture, and no pin or
hold outlives its release. Then examples of what a lazy call (a layer
whose experts are all resident) reads: the layer's view of the pool, the device remap, and
whether every expert is resident."""

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
                low=st.integers(0, 3), scratch=st.integers(0, 2))
    def start(self, policy, high, low, scratch):
        self.cache = slot_cache(high, make_policy(policy, num_layers=LAYERS), layers=LAYERS,
                                experts=EXPERTS, low_slots=low)
        self.cache.set_scratch(scratch, min_regular=1)
        self.pins: Counter = Counter()
        self.holds: Counter = Counter()
        self.reserved: dict = {}  # key -> slot reserved, bytes not committed yet
        self.guessing: dict = {}  # key -> scratch slot reserved for a guess being read

    # --- operations ---------------------------------------------------------------------
    def _reserve(self, key, prefetched):
        if key in self.cache or key in self.reserved or key in self.guessing:
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
    def guess(self, key):
        """A prefetch guess into a scratch slot: it evicts nothing."""
        if key in self.cache or key in self.reserved or key in self.guessing:
            return
        before = set(self.cache.keys())
        slot = self.cache.reserve_guest(key)
        assert set(self.cache.keys()) == before, "a guess evicted an expert"
        if slot is not None:
            pool = self.cache._pool_of[key[0], key[2]]
            assert slot not in [s for k, s in self.reserved.items()
                                if self.cache._pool_of[k[0], k[2]] is pool]
            self.guessing[key] = slot

    @precondition(lambda self: self.guessing)
    @rule(data=st.data(), ok=st.booleans())
    def land_guess(self, data, ok):
        key = data.draw(st.sampled_from(sorted(self.guessing)))
        slot = self.guessing.pop(key)
        before = set(self.cache.keys())
        if ok:
            self.cache.commit_guest(key, slot)
            assert set(self.cache.keys()) == before | {key} and self.cache.is_guest(key)
        else:
            self.cache.abandon_guest(key, slot)

    @precondition(lambda self: self.cache._guests)
    @rule(data=st.data())
    def drop_guess(self, data):
        """Its layer ran without it."""
        key = data.draw(st.sampled_from(sorted(self.cache._guests)))
        self.cache.drop_guest(key)
        assert key not in self.cache

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

    @precondition(lambda self: not self.pins and not self.reserved and not self.guessing)
    @rule(data=st.data())
    def resize(self, data):
        """As ``OffloadRuntime.resize_pools`` does between calls: drop the guests, keep the
        policy's best experts, rebuild each pool at its new size, read the kept ones again."""
        cache = self.cache
        new = {id(ps): data.draw(st.integers(1 if i == 0 else 0, 5), label=f"slots{i}")
               for i, ps in enumerate(cache.pools)}
        cache.drop_guests()
        keep = [k for ps in cache.pools
                for k in cache.shrink_to(ps, new[id(ps)] - cache.scratch_fits(ps, new[id(ps)]))]
        cache.clear()
        for ps in cache.pools:
            ps.pool.allocate(new[id(ps)])
            cache.reset_pool(ps)
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
        guessing = Counter(id(cache._pool_of[k[0], k[2]]) for k in self.guessing)
        for ps in cache.pools:
            held = [(s, k) for s, k in enumerate(ps.key_of) if k is not None]
            assert ps.resident == len(held) <= ps.pool.slots
            # every slot is exactly one of: resident, free (or retired: free after the next
            # sync), reserved for a read or a guess in flight
            assert len(set(ps.free + ps.retired)) == len(ps.free) + len(ps.retired)
            assert not set(ps.free + ps.retired) & {s for s, _ in held}
            assert ps.resident + len(ps.free) + len(ps.retired) + reserved[id(ps)] + \
                guessing[id(ps)] == ps.pool.slots
            guests = sum(1 for _, k in held if cache.is_guest(k))
            assert ps.guests == guests + guessing[id(ps)] <= ps.scratch
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


# --- examples: what a lazy call reads ----------------------------------------------------------
def _read(cache, key, value: int) -> int:
    """A read of ``key`` whose bytes are all ``value``; returns its slot."""
    slot = cache.reserve(key)
    cache.pool_for(key[0], key[2]).slot_bytes("w", slot)[:] = value
    cache.commit(key, slot)
    return slot


def _first_bytes(a) -> list[int]:
    return np.array(a)[:, 0].tolist()


def test_a_layer_view_exists_exactly_while_the_layer_lies_in_expert_order():
    """A lazy call indexes the layer's view with the router's expert ids directly, so the view
    must exist only while expert e sits in the view's row e; otherwise the device remap maps
    each resident expert to its slot."""
    cache = slot_cache(8, make_policy("lru", num_layers=3), layers=3, experts=4)
    pool = cache.pool_for(0, "high")
    for e in (0, 1):
        _read(cache, (0, e, "high"), 10 + e)
    assert cache.layer_view(0) is None  # two of four experts resident
    for e in (2, 3):
        _read(cache, (0, e, "high"), 10 + e)
    view = cache.layer_view(0)  # (asked before: the answer follows the layout)
    assert view is not None and _first_bytes(view.arrays["w"]) == [10, 11, 12, 13]
    assert _first_bytes(cache.device_remap(0)[:, None]) == [0, 1, 2, 3]
    for e in (1, 0, 3, 2):  # layer 1 resident, out of expert order
        _read(cache, (1, e, "high"), 20 + e)
    assert cache.layer_view(1) is None
    remap = cache.device_remap(1)
    assert _first_bytes(pool.arrays["w"][remap]) == [20, 21, 22, 23]
    # layer 0 loses expert 1 to a read of layer 2 that then fails: no view, and the remap
    # no longer sends expert 1 to the slot it left
    cache.synced()
    cache.pin_and_lookup([(0, 0, "high")])
    cache.unpin([(0, 0, "high")])
    cache.synced()
    slot = cache.reserve((2, 0, "high"))
    assert slot == 1 and (0, 1, "high") not in cache
    cache.abandon((2, 0, "high"), slot)
    assert cache.layer_view(0) is None
    assert np.array(cache.device_remap(0)).tolist() == [0, 0, 2, 3]
    _read(cache, (0, 1, "high"), 11)  # read again into the same slot: in order again
    assert _first_bytes(cache.layer_view(0).arrays["w"]) == [10, 11, 12, 13]


def test_every_expert_resident_is_known_until_one_is_evicted():
    """With every 4-bit expert resident nothing can miss, so the runtime stops tracking lazy
    calls; one eviction must end that."""
    cache = slot_cache(8, make_policy("lru", num_layers=2), layers=2, experts=4, low_slots=2)
    keys = [(layer, e, "high") for layer in range(2) for e in range(4)]
    for key in keys[:-1]:
        _read(cache, key, 1)
        assert not cache.all_high_resident
    _read(cache, (0, 0, "low"), 1)  # a 2-bit copy is not a 4-bit expert
    assert not cache.all_high_resident
    _read(cache, keys[-1], 1)
    assert cache.all_high_resident
    cache.shrink_to(cache.pools[0], 7)
    assert not cache.all_high_resident


def test_a_slot_a_pending_graph_reads_is_not_rewritten_before_the_sync():
    """``stamp``: the current graphs read these experts' slots (a key not resident is ignored);
    a read evicts another expert until the next sync, even the least recently used."""
    cache = slot_cache(2, make_policy("lru"), layers=1, experts=8)
    for e in (0, 1):
        _read(cache, (0, e, "high"), e)
    cache.synced()
    cache.stamp([(0, 0, "high"), (0, 7, "high")])
    slot = cache.reserve((0, 2, "high"))
    assert slot is not None and (0, 0, "high") in cache and (0, 1, "high") not in cache
    cache.commit((0, 2, "high"), slot)
    cache.synced()  # the graphs ran: the LRU expert may go now
    assert cache.reserve((0, 3, "high")) is not None and (0, 0, "high") not in cache


def test_hits_told_later_rank_the_resident_experts_used():
    """``record_hits``: a lazy call's router choices, read at a later sync, count as uses of
    the experts resident (an expert not resident is ignored)."""
    cache = slot_cache(2, make_policy("lru"), layers=1, experts=8)
    for e in (0, 1):
        _read(cache, (0, e, "high"), e)
    cache.synced()
    cache.record_hits(0, np.array([0, 5]))  # expert 0 used: the LRU one is now expert 1
    assert cache.reserve((0, 2, "high")) is not None
    assert (0, 0, "high") in cache and (0, 1, "high") not in cache
