"""The expert cache: which experts, at which precision, hold a slot in a pool, and when a slot may
be written.

Keys are ``(layer, expert, precision)``. Each key maps to a slot of the pool that serves its layer
and precision (``pools.SlotPool``); the pools' sizes are the byte budget, so the cache can never
exceed it. A policy per pool (``hobbit_mlx.policies``) only decides the eviction order.

Protections:

* *pinned*: the current layer call needs the expert; never evicted.
* *held*: predicted for a later layer (prefetch); another prediction never evicts it, the current
  layer's own miss may when nothing else is left.
* *in use by a pending graph*: a slot whose last use was stamped at the current *epoch* may still
  be read by a graph MLX has not run yet, so its bytes must not be overwritten. The epoch moves on
  at every point where everything built before is known to be evaluated (a layer's router sync, or
  an explicit evaluation), so a slot last used in an earlier epoch is safe to write.

*Guests* (scratch slots): a pool may set ``scratch`` of its slots aside for prefetch guesses. A
guess read there never evicts a resident expert and is not known to the policy: when its layer
uses it, it is *adopted* as a demand miss would have been inserted (the policy's victim goes,
into the scratch room); when its layer runs without it, it is dropped. So the experts the policy
keeps are the same as without prefetch, and a wrong guess costs only its read.

A read goes: ``reserve`` a slot (evicting a victim), write its bytes (any thread), ``commit``.
The per-layer remap (expert -> slot) lives on the host; its device copy is rebuilt on the model's
thread when it changed.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Hashable

import mlx.core as mx
import numpy as np

from .guess_value import DecayedRate
from .pools import SlotPool

Key = tuple  # (layer, expert, precision)


class LayerView:
    """One layer's experts as a slice of a pool (no copy: MLX slices share the buffer, so bytes
    written into the pool show through), shaped like a pool for ``PoolProjection``."""

    def __init__(self, pool: SlotPool, base: int, count: int):
        self.tensors = pool.tensors
        self.arrays = {name: a[base:base + count] for name, a in pool.arrays.items()}
        mx.eval(list(self.arrays.values()))


class PoolSlots:
    """Bookkeeping of one pool: which key holds each slot, free slots, last use, policy."""

    def __init__(self, pool: SlotPool, policy) -> None:
        self.pool = pool
        self.policy = policy
        # P(an expert this pool's policy evicted is needed by its layer's next call), measured
        # with ghosts: what a prefetch guess must beat to take a slot
        self.victim_reuse = DecayedRate(prior=0.1)
        self.wanted_scratch = 0  # slots asked for guests (set_scratch); ``scratch`` is what fits
        self.min_regular = 0  # slots the policy's experts keep however many guests want
        self.reset_slots()

    def reset_slots(self) -> None:
        n = self.pool.slots
        self.key_of: list[Key | None] = [None] * n
        self.free: list[int] = list(range(n - 1, -1, -1))  # pop() hands out slot 0 first
        self.last_use = np.full(n, -1, dtype=np.int64)
        self.resident = 0
        self.scratch = 0  # slots only guests may take (the policy's experts keep n - scratch)
        self.guests = 0  # slots guests hold (being read, or landed and not yet used)
        self.retired: list[int] = []  # a dropped guest's slot a pending graph may still read

    def regular_room(self) -> bool:
        """A free slot that the policy's experts may take: free slots beyond the scratch room
        that guests do not use now."""
        return len(self.free) > self.scratch - self.guests


class SlotCache:
    """Resident experts in slot pools; thread-safe (prefetch reads commit from I/O threads)."""

    def __init__(self, pools: dict[tuple[int, str], SlotPool], num_experts: dict[int, int],
                 make_policy: Callable[[], object]):
        """``pools``: (layer, precision) -> the pool serving it (layers may share one pool)."""
        self.lock = threading.RLock()
        self._slots: dict[int, PoolSlots] = {}
        self._pool_of: dict[tuple[int, str], PoolSlots] = {}
        for lp, pool in pools.items():
            if id(pool) not in self._slots:
                self._slots[id(pool)] = PoolSlots(pool, make_policy())
            self._pool_of[lp] = self._slots[id(pool)]
        self._slot_of: dict[Key, int] = {}
        self._remap = {lp: np.full(num_experts[lp[0]], -1, dtype=np.int64) for lp in pools}
        self._device_remap: dict[tuple[int, str], tuple | None] = {lp: None for lp in pools}
        self._views: dict[tuple[int, str], LayerView | None] = {}  # (absent: not known yet)
        self._per_layer: Counter = Counter()  # (layer, precision) -> resident experts
        self._pins: Counter = Counter()
        self._holds: Counter = Counter()
        self._high_resident = 0
        self._high_total = sum(num_experts[lid] for lid, precision in pools if precision == "high")
        self._ghosts: dict[tuple, set] = {}  # (layer, precision) -> evicted since its last call
        self._guests: set[Key] = set()  # landed guesses in scratch slots, not yet used
        self.epoch = 0

    # --- what is resident -----------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def keys(self) -> list[Key]:
        with self.lock:
            return list(self._slot_of)

    @property
    def pools(self) -> list[PoolSlots]:
        return list(self._slots.values())

    @property
    def policy(self):
        """The first pool's policy (the high-precision pool): names and per-sequence resets."""
        return self.pools[0].policy

    @property
    def capacity_bytes(self) -> int:
        return sum(p.pool.nbytes for p in self.pools)

    @property
    def resident_bytes(self) -> int:
        return sum(p.resident * p.pool.slot_nbytes for p in self.pools)

    def pool_for(self, layer: int, precision: str) -> SlotPool | None:
        ps = self._pool_of.get((layer, precision))
        return None if ps is None else ps.pool

    def capacity(self, layer: int, precision: str) -> int:
        """Slots of the pool serving this layer and precision."""
        ps = self._pool_of.get((layer, precision))
        return 0 if ps is None else ps.pool.slots

    def experts_served(self, layer: int, precision: str) -> int:
        """Experts of all the layers that share this layer's pool."""
        return self.experts_served_by(self._pool_of[layer, precision])

    def experts_served_by(self, ps: PoolSlots) -> int:
        return sum(len(r) for lp, r in self._remap.items() if self._pool_of[lp] is ps)

    def layer_view(self, layer: int, precision: str = "high") -> "LayerView | None":
        """When a layer's experts occupy consecutive slots in expert order (a preloaded pool),
        the pool's arrays sliced to them: the router's indices then index it directly. Made on
        the model's thread, once per layout."""
        lp = (layer, precision)
        view = self._views.get(lp, False)
        if view is False:
            with self.lock:
                remap = self._remap[lp]
                base = int(remap[0])
                ordered = base >= 0 and bool((remap == base + np.arange(len(remap))).all())
            view = LayerView(self._pool_of[lp].pool, base, len(remap)) if ordered else None
            self._views[lp] = view
        return view

    @property
    def all_high_resident(self) -> bool:
        """Every expert of every layer has a 4-bit slot: nothing can miss or be evicted."""
        return self._high_resident >= self._high_total

    def resident_in_layer(self, layer: int, precision: str = "high") -> int:
        return self._per_layer[layer, precision]

    def slot(self, key: Key) -> int | None:
        return self._slot_of.get(key)

    # --- a layer call ---------------------------------------------------------------------
    def pin_and_lookup(self, keys: list[Key]) -> list[int]:
        """Pin ``keys`` and return their slots (-1 where not resident); each resident one counts
        as a use and is stamped with the current epoch. One lock for a whole layer call."""
        with self.lock:
            self._pins.update(keys)
            slot_of = self._slot_of
            out = [slot_of.get(key, -1) for key in keys]
            hits = [key for key, s in zip(keys, out) if s >= 0]
            if hits:  # (all of one call's keys share a layer and precision: one pool)
                ps = self._pool_of[hits[0][0], hits[0][2]]
                ps.last_use[[s for s in out if s >= 0]] = self.epoch
                guests = [key for key in hits if key in self._guests] if self._guests else ()
                if guests:  # (the policy is told of these as of a miss's insert)
                    self._adopt(guests)
                    hits = [key for key in hits if key not in set(guests)]
                on_hits = getattr(ps.policy, "on_hits", None)
                if on_hits is not None:
                    on_hits(hits)
                else:
                    for key in hits:
                        ps.policy.on_hit(key)
            return out

    def stamp(self, keys: list[Key]) -> None:
        """The current epoch's graphs read these keys' slots (they may not be written until the
        epoch moves on)."""
        with self.lock:
            for key in keys:
                s = self._slot_of.get(key)
                if s is not None:
                    self._pool_of[key[0], key[2]].last_use[s] = self.epoch

    def stamp_layer(self, layer: int, precision: str = "high") -> None:
        """A lazy call may read any of the layer's slots: stamp them all (vectorized)."""
        remap = self._remap[layer, precision]
        ps = self._pool_of[layer, precision]
        with self.lock:
            ps.last_use[remap[remap >= 0]] = self.epoch

    def record_hits(self, layer: int, experts, precision: str = "high") -> None:
        """Uses seen after the fact (a lazy call's router choice, read at a later sync)."""
        ps = self._pool_of[layer, precision]
        with self.lock:
            for e in experts:
                key = (layer, int(e), precision)
                if key in self._slot_of and key not in self._guests:  # (guests: not the policy's)
                    ps.policy.on_hit(key)

    def synced(self) -> None:
        """Everything built so far has been evaluated: slots used until now may be written."""
        with self.lock:
            self.epoch += 1
            for ps in self._slots.values():
                if ps.retired:
                    ps.free.extend(ps.retired)
                    ps.retired.clear()
                self._restore_scratch(ps)

    # --- reads ----------------------------------------------------------------------------
    def reserve(self, key: Key, prefetched: bool = False, worth: float | None = None) -> int | None:
        """A slot for ``key``'s bytes: a free one, or the policy's victim among the slots no
        pinned, held or pending use protects (a demand read may take a held one when nothing
        else is left; a prefetch may not). A prefetch of ``worth`` (the measured chance that its
        guess is used) evicts only when that beats the measured chance that a victim is needed
        again (admission control). None when no slot can be had."""
        with self.lock:
            ps = self._pool_of.get((key[0], key[2]))
            if ps is None or ps.pool.slots == 0:
                return None
            if ps.regular_room():
                return ps.free.pop()
            if worth is not None and worth <= ps.victim_reuse.value:
                return None
            slot = self._evict_victim(ps, may_take_held=not prefetched)
            if slot is None and not prefetched and ps.free:
                # Every expert is protected: a demand read borrows a scratch slot (given back at
                # the next sync: _restore_scratch).
                slot = ps.free.pop()
            return slot

    def _evict_victim(self, ps: PoolSlots, may_take_held: bool) -> int | None:
        """Evict the policy's victim among the experts nothing protects (``may_take_held``: a held
        one when nothing else is left); its slot, or None when every expert is protected."""
        epoch, pins, holds, slot_of, last = self.epoch, self._pins, self._holds, self._slot_of, ps.last_use
        unused = lambda k: not pins[k] and last[slot_of[k]] < epoch  # noqa: E731
        try:
            victim = ps.policy.victim(lambda k: unused(k) and not holds[k])
        except LookupError:
            if not may_take_held:
                return None
            try:
                victim = ps.policy.victim(unused)
            except LookupError:
                return None
        self._ghosts.setdefault((victim[0], victim[2]), set()).add(victim[1])
        return self._evict(victim)

    # --- guests (prefetch guesses in scratch slots) -------------------------------------------
    def set_scratch(self, slots: int, min_regular: int) -> None:
        """Set ``slots`` of each pool aside for guests, where the pool keeps at least
        ``min_regular`` slots for its policy and cannot hold every expert it serves (a pool
        holding them all never misses: nothing to guess). Call it with no guest in the pools."""
        with self.lock:
            for ps in self._slots.values():
                ps.wanted_scratch, ps.min_regular = slots, min_regular
                ps.scratch = self.scratch_fits(ps, ps.pool.slots)

    def scratch_fits(self, ps: PoolSlots, slots: int) -> int:
        """The scratch room of ``ps`` were it ``slots`` slots large."""
        if slots >= self.experts_served_by(ps):
            return 0
        return max(0, min(ps.wanted_scratch, slots - ps.min_regular))

    def reset_pool(self, ps: PoolSlots) -> None:
        """The pool was reallocated: every slot free, the scratch room sized for its new size."""
        ps.reset_slots()
        ps.scratch = self.scratch_fits(ps, ps.pool.slots)

    def reserve_guest(self, key: Key) -> int | None:
        """A scratch slot for a guess of ``key``, or None when the scratch room is taken (a guess
        never evicts)."""
        with self.lock:
            ps = self._pool_of.get((key[0], key[2]))
            if ps is None or ps.guests >= ps.scratch or not ps.free:
                return None
            ps.guests += 1
            return ps.free.pop()

    def commit_guest(self, key: Key, slot: int) -> None:
        """A guess's bytes are in its scratch slot: it serves lookups, unknown to the policy
        (unless a copy is resident already: then the slot goes back)."""
        with self.lock:
            if key in self._slot_of:
                self.abandon_guest(key, slot)
                return
            ps = self._pool_of[key[0], key[2]]
            ps.key_of[slot] = key
            ps.last_use[slot] = -1
            ps.resident += 1
            self._guests.add(key)
            self._index(key, slot, +1)

    def abandon_guest(self, key: Key, slot: int) -> None:
        """A guess's read was cancelled or failed: its scratch slot goes back."""
        with self.lock:
            ps = self._pool_of[key[0], key[2]]
            ps.guests -= 1
            ps.free.append(slot)

    def is_guest(self, key: Key) -> bool:
        return key in self._guests

    def adopt(self, key: Key) -> None:
        """A guest that its layer uses joins the policy's experts (see ``_adopt``)."""
        with self.lock:
            if key in self._guests:
                self._adopt([key])

    def _adopt(self, keys: list[Key]) -> None:
        """Guests their layer uses join the policy's experts as a demand miss would: the policy's
        victim goes when its experts have no room, and its slot joins the scratch room."""
        for key in keys:
            ps = self._pool_of[key[0], key[2]]
            ps.guests -= 1
            self._guests.discard(key)
            ps.policy.on_insert(key)
            self._restore_scratch(ps)

    def _restore_scratch(self, ps: PoolSlots) -> None:
        """The policy's victims go until the scratch room is free again, as far as unprotected
        experts allow (the rest at a later sync): guests joined the policy's experts, or demand
        reads borrowed scratch slots."""
        while len(ps.free) < ps.scratch - ps.guests:
            slot = self._evict_victim(ps, may_take_held=True)
            if slot is None:
                return
            ps.free.append(slot)

    def drop_guest(self, key: Key) -> None:
        """A guest its layer ran without: its slot goes back to the scratch room (once no pending
        graph may read it)."""
        with self.lock:
            if key not in self._guests:
                return
            ps = self._pool_of[key[0], key[2]]
            self._guests.discard(key)
            slot = self._unindex(key)
            ps.guests -= 1
            (ps.retired if ps.last_use[slot] >= self.epoch else ps.free).append(slot)

    def score_ghosts(self, layer: int, needed, learn: bool = True) -> None:
        """Layer ``layer`` runs and needs ``needed`` (expert ids, any shape): of those evicted from it
        since its last call, count how many it needed again (``learn=False``: a prompt chunk,
        which needs nearly every expert, only clears them)."""
        if not self._ghosts:
            return
        with self.lock:
            for precision in ("high", "low"):
                ghosts = self._ghosts.pop((layer, precision), None)
                if ghosts and learn:  # (the id set is built only when there are ghosts to score)
                    needed = needed if isinstance(needed, set) else set(np.ravel(needed).tolist())
                    self._pool_of[layer, precision].victim_reuse.add(len(ghosts & needed),
                                                                      len(ghosts))

    def commit(self, key: Key, slot: int, prefetched: bool = False) -> None:
        """The bytes of ``key`` are in ``slot``: make it resident."""
        with self.lock:
            ps = self._pool_of[key[0], key[2]]
            ps.key_of[slot] = key
            # A demand read is about to be used by this epoch's graphs; a prefetched one by none.
            ps.last_use[slot] = -1 if prefetched else self.epoch
            ps.resident += 1
            self._index(key, slot, +1)
            on_prefetch = getattr(ps.policy, "on_prefetch", None) if prefetched else None
            (on_prefetch or ps.policy.on_insert)(key)

    def _index(self, key: Key, slot: int, count: int) -> None:
        """``key`` now lives in ``slot`` (remaps, per-layer counts; the policy is not told)."""
        self._slot_of[key] = slot
        self._remap[key[0], key[2]][key[1]] = slot
        self._device_remap[key[0], key[2]] = None
        self._views.pop((key[0], key[2]), None)
        self._per_layer[key[0], key[2]] += count
        self._high_resident += count * (key[2] == "high")

    def _unindex(self, key: Key) -> int:
        """``key`` leaves its slot (remaps, per-layer counts); returns the slot."""
        ps = self._pool_of[key[0], key[2]]
        slot = self._slot_of.pop(key)
        ps.key_of[slot] = None
        ps.resident -= 1
        self._remap[key[0], key[2]][key[1]] = -1
        self._device_remap[key[0], key[2]] = None
        self._views.pop((key[0], key[2]), None)
        self._per_layer[key[0], key[2]] -= 1
        self._high_resident -= key[2] == "high"
        return slot

    def abandon(self, key: Key, slot: int) -> None:
        """A reserved slot whose read failed goes back to the free list."""
        with self.lock:
            self._pool_of[key[0], key[2]].free.append(slot)

    def _evict(self, key: Key) -> int:
        slot = self._unindex(key)
        self._pool_of[key[0], key[2]].policy.on_evict(key)
        return slot

    def device_remap(self, layer: int, precision: str = "high") -> mx.array:
        """Expert id -> slot on the device (experts not resident map to slot 0: a call only
        indexes experts it made resident). Rebuilt on the model's thread when it changed."""
        return self.device_residency(layer, precision)[0]

    def device_residency(self, layer: int,
                         precision: str = "high") -> tuple[mx.array, mx.array, np.ndarray]:
        """The layer's remap on the device, which experts it holds (on the device, and on the
        host as they were when it was built): a call may start its resident experts before the
        host knows which experts it needs, and mask out the rest."""
        lp = (layer, precision)
        state = self._device_remap[lp]
        if state is None:
            with self.lock:
                host = self._remap[lp].copy()
            held = host >= 0
            state = self._device_remap[lp] = (mx.array(np.maximum(host, 0).astype(np.uint32)),
                                              mx.array(held), held)
        return state

    # --- protections ----------------------------------------------------------------------
    def pin(self, keys) -> None:
        with self.lock:
            self._pins.update(keys)

    def unpin(self, keys) -> None:
        self._count_down(self._pins, keys)

    def hold(self, keys) -> None:
        """Protect predicted experts (resident or not yet) from eviction by other predictions."""
        with self.lock:
            self._holds.update(keys)

    def release(self, keys) -> None:
        self._count_down(self._holds, keys)

    def _count_down(self, counts: Counter, keys) -> None:
        with self.lock:
            counts.subtract(keys)
            for k in keys:
                if counts[k] <= 0:
                    del counts[k]

    # --- whole cache ----------------------------------------------------------------------
    def on_layer(self, layer: int) -> None:
        for ps in self._slots.values():
            hook = getattr(ps.policy, "on_layer", None)
            if hook is not None:
                hook(layer)

    def reset_policies(self) -> None:
        with self.lock:
            for ps in self._slots.values():
                ps.policy.reset()

    def shrink_to(self, pool: PoolSlots, slots: int) -> list[Key]:
        """Evict the pool's experts its policy ranks lowest until at most ``slots`` stay;
        returns those that stay."""
        with self.lock:
            while pool.resident > slots:
                self._evict(pool.policy.victim(lambda k: True))
            return [k for k in pool.key_of if k is not None]

    def drop_guests(self, keep: set = frozenset()) -> None:
        """Every guest leaves but those in ``keep`` (the pools are about to be rebuilt, prefetch
        starts over, or a demand read needs a slot)."""
        with self.lock:
            for key in list(self._guests - keep):
                self.drop_guest(key)

    def clear(self) -> None:
        with self.lock:
            self.drop_guests()
            for key in list(self._slot_of):
                self._evict(key)
            self._views.clear()  # (a view holds its pool's old buffers)
            for ps in self._slots.values():
                self.reset_pool(ps)
