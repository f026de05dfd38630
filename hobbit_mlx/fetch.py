"""One layer call's experts at one precision made resident: hits at once, misses read straight
into pool slots (on the model's thread when reads take microseconds, else on the reader's
threads), prefetch reads in flight waited for instead of read again."""

from __future__ import annotations

import time

import numpy as np

from .runtime import OffloadRuntime, PoolBudgetError
from .store import LayerEntry

INLINE_READ_S = 0.1e-3  # reads faster than this run on the model's thread (no hand-off)


class Fetch:
    """One layer call's experts at one precision: resident ones at once, misses read into slots.

    Experts for which no slot can be had now (the pool is smaller than the chunk's need) are
    ``left`` for a later group."""

    def __init__(self, rt: OffloadRuntime, layer: LayerEntry, experts: np.ndarray, precision: str):
        self.rt, self.precision = rt, precision
        self.entry = layer.precisions[precision]
        self.pool = rt.cache.pool_for(layer.layer, precision)
        keys = [(layer.layer, e, precision) for e in experts.tolist()]
        slots = rt.cache.pin_and_lookup(keys)
        self.pending: list = []  # (position, future or None: read already, slot or None: prefetch)
        # Reads that take microseconds (a warm page cache) run here: handing them to a thread
        # costs more than the read.
        inline = rt.reader.read_seconds < INLINE_READ_S
        left = []
        for i, key in enumerate(keys):
            if slots[i] >= 0:
                continue
            fut = rt.prefetcher.inflight(key) if rt.prefetcher is not None else None
            if fut is not None:  # a prefetch is reading it already: wait for that read
                rt.prefetcher.promote(key)
                self.pending.append((i, fut, None))
                continue
            if rt.prefetcher is not None and key in rt.cache:
                # A prefetch landed since the lookup (it commits before it leaves the reads in
                # flight): a hit, not a second read.
                rt.cache.adopt(key)
                rt.cache.stamp([key])
                slots[i] = rt.cache.slot(key)
                continue
            slot = rt.cache.reserve(key) if not left else None
            if slot is None:
                left.append(i)
                continue
            slots[i] = slot
            if inline:
                try:
                    self._read_now(key, slot, commit=False)
                except BaseException:
                    self._settle(keys, self.pending)  # (the reads before it landed)
                    rt.cache.unpin(keys)
                    raise
                self.pending.append((i, None, slot))
            else:
                self.pending.append((i, rt.reader.submit_into(self.entry, key[1], self.pool, slot),
                                     slot))
        if left:
            taken = np.ones(len(keys), dtype=bool)
            taken[left] = False
            rt.cache.unpin([keys[i] for i in left])
            order = np.cumsum(taken) - 1  # position in the original list -> among the taken
            self.pending = [(int(order[i]), f, s) for i, f, s in self.pending]
            keys = [k for k, t in zip(keys, taken) if t]
            slots = [s for s, t in zip(slots, taken) if t]
            self.experts, self.left = experts[taken], experts[~taken]
        else:
            self.experts, self.left = experts, experts[:0]
        self.keys = keys
        self.slots = np.array(slots, dtype=np.int64)
        demand = sum(1 for p in self.pending if p[2] is not None)
        rt._count(precision, len(self.keys) - demand, demand)
        rt.stats.hits_in_flight += len(self.pending) - demand

    @property
    def waiting(self) -> np.ndarray:
        """Which experts taken were not resident when the fetch began (read, or being read)."""
        waiting = np.zeros(len(self.keys), dtype=bool)
        if self.pending:
            waiting[[p[0] for p in self.pending]] = True
        return waiting

    @property
    def reads_in_flight(self) -> int:
        """Reads of this fetch handed to threads (not read inline) and not waited for yet."""
        return sum(1 for p in self.pending if p[1] is not None)

    def finish(self) -> None:
        """Wait for the reads and make them resident; then the pins go (the slots stay stamped
        with this epoch, so nothing overwrites them before the graphs reading them ran)."""
        rt = self.rt
        if not self.pending:
            rt.cache.unpin(self.keys)
            return
        t0 = time.perf_counter()
        n = 0
        try:
            for n, (i, fut, slot) in enumerate(self.pending):
                key = self.keys[i]
                if slot is None:  # a prefetch read
                    fut.exception()
                    rt.prefetcher.wait_landed(key)  # (committed after the future completes)
                    slot = rt.cache.slot(key)
                    if slot is None:  # it failed (or was cancelled before the layer asked for
                        slot = self._demand_slot(key)  # it): read on demand, a miss after all
                        self._read_now(key, slot)
                        rt._count(self.precision, -1, 1)
                        rt.stats.hits_in_flight -= 1
                    rt.cache.adopt(key)  # (a guess in a scratch slot joins the cache)
                    self.slots[i] = slot
                    rt.cache.stamp([key])
                    continue
                self._land(key, fut, slot)
        except BaseException:
            self._settle(self.keys, self.pending[n + 1:])
            raise
        finally:
            rt.stats.read_wait_s += time.perf_counter() - t0
            rt.cache.unpin(self.keys)

    def _demand_slot(self, key: tuple) -> int:
        """A slot to read again a guess that failed. Its slot went back when it failed, and
        later layers' guesses may have taken it since (while this call's experts hold the
        rest): a demand read does not wait behind guesses, so theirs are given up."""
        rt = self.rt
        slot = rt.cache.reserve(key)
        if slot is None:
            rt.wait_idle()  # (a slot being read into cannot be taken: the guesses land first)
            rt.cache.drop_guests(keep=set(self.keys))
            slot = rt.cache.reserve(key)
        if slot is None:
            raise PoolBudgetError(f"no slot for expert {key}")
        return slot

    def _land(self, key: tuple, fut, slot: int) -> None:
        """A demand read into ``slot`` lands: its bytes are counted and the slot made resident
        (``fut`` None: read already, on this thread). If it failed, the slot goes back and the
        error is raised."""
        if fut is not None:
            try:
                nbytes = fut.result()
            except BaseException:
                self.rt.cache.abandon(key, slot)
                raise
            with self.rt.stats_lock:
                self.rt.stats.bytes_read += nbytes
        self.rt.cache.commit(key, slot)

    def _settle(self, keys: list, pending: list) -> None:
        """After a read of this fetch failed (or Ctrl-C): its other demand reads land or fail
        (their slots go back), so that no reserved slot is lost. A prefetch read's slot is the
        prefetcher's. A second Ctrl-C while it waits ends the wait (the reads in flight may be
        slow): it was swallowed, and the process could not be interrupted."""
        for i, fut, slot in pending:
            if slot is not None:
                try:
                    self._land(keys[i], fut, slot)
                except Exception:  # noqa: BLE001 - (the first error is the one raised)
                    pass

    def _read_now(self, key: tuple, slot: int, commit: bool = True) -> None:
        try:
            nbytes = self.rt.reader.read_into(self.entry, key[1], self.pool, slot)
        except BaseException:
            self.rt.cache.abandon(key, slot)
            raise
        with self.rt.stats_lock:
            self.rt.stats.bytes_read += nbytes
        if commit:
            self.rt.cache.commit(key, slot)
