"""Prefetch (HOBBIT, Fate): the next layers' routers applied to this layer's gate input predict
their experts, which are read into pool slots in the background while this layer computes.

Slots are reserved and experts held on the model's thread, when the prediction is made; the
reader threads only write bytes and commit the slot. Where guesses take pool slots
(``prefetch_scratch=0``), a predicted expert is *held* from the prediction until its layer has
fetched it, whether it is being read or was resident already
(LRU would otherwise evict exactly the next layer's experts to make room for the guesses).

With ``scratch`` (the default) guesses are read into scratch slots (``cache``: guests): they
evict nothing and hold nothing, so the experts the policy keeps are those it keeps without
prefetch, a used guess is adopted as its demand miss would have been inserted, and a wrong guess
costs only its read. Without it, guesses take pool slots like demand reads, and the predicted
resident experts are held until their layer runs.

With ``cost_aware`` (the default) a guess is read only when it is worth its cost
(``guess_value``): likeliest first, and only in the storage time that the layers in between
leave free while they compute. The last guess may run past that time when its measured chance
of being used times the time it saves beats the chance of it being wrong times the delay it
then adds to demand reads. Without scratch slots a guess also has to beat the measured chance
that the expert it evicts is needed again. The guesses are issued after the current layer's
demand reads, which go first on the device. Reads of guesses whose layer ran without them are
cancelled; a guess the layer waits for is promoted to a demand read's priority.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .guess_value import GuessValue
from .precision import HIGH, LOW, plan_slots
from .routing import in_float32, predictions_from, router_logits, top_predictions, untapped_call
from .storage import ReadCancelled, ReadTicket

if TYPE_CHECKING:
    from .offload import OffloadedSwitch
    from .runtime import OffloadRuntime

UNCERTAIN_GUESS = 0.5  # a guess less likely than this to be used is read in 2-bit (low_precision)


class Prefetcher:
    """Predictions for the layers ahead, their reads in flight, and what is held for them."""

    def __init__(self, rt: "OffloadRuntime", layers_ahead: int, width: int, widths=None,
                 gate_stacks: dict | None = None, low_precision: bool = False,
                 cost_aware: bool = True, scratch: bool = False):
        self.rt = rt
        self.cost_aware = cost_aware
        self.scratch = scratch  # guesses go to scratch slots (the cache's guests)
        self.value = GuessValue(rt.manifest.experts_per_token)
        self._tickets: dict[tuple, ReadTicket] = {}
        self.layers_ahead = layers_ahead
        self.width = width
        self.widths = widths  # per-layer widths that reach a target recall (else the fixed one)
        self.gate_stacks = gate_stacks or {}
        self.low_precision = low_precision
        self._lock = threading.Lock()
        self._inflight: dict[tuple, Future] = {}
        self._landed = threading.Condition(self._lock)  # a read in flight was committed or dropped
        # layer -> {key: distance}: prefetches issued for the layer's next call, held until it runs
        self._issued: dict[int, dict] = {}
        # position -> {distance: {predicted expert: rank bucket}}
        self._predicted: dict[int, dict[int, dict]] = {}
        self._held: dict[int, list] = {}  # layer -> resident experts held for its next call
        self._logits: dict[int, dict[int, np.ndarray]] = {}  # position -> {distance: logits}
        self._seconds: dict[tuple, float] = {}  # guesses in flight -> storage time they take
        self._wanted: dict[int, set] = {}  # layer -> its guesses in flight that it waits for

    def expects(self, layer: int) -> bool:
        """Predictions were made for this layer's next call (their holds wait for it)."""
        return layer in self._issued or layer in self._held

    def inflight(self, key: tuple) -> Future | None:
        with self._lock:
            return self._inflight.get(key)

    def has_or_reading(self, layer: int, expert: int, precision: str) -> bool:
        """Resident, or a prefetch is reading it now."""
        key = (layer, expert, precision)
        return key in self.rt.cache or self.inflight(key) is not None

    def predictions_after(self, position: int, gate_input: mx.array) -> list[tuple]:
        """The next layers' routers applied to this layer's gate input, lazily (the caller
        evaluates them with its own indices): [(distance, switch, router output)], skipping layers
        that are fully resident (they cannot miss)."""
        rt = self.rt
        targets = []
        for distance in range(1, self.layers_ahead + 1):
            target = position + distance
            if target >= len(rt.layers) or rt.layers[target].router is None:
                break
            switch = rt.layers[target]
            if rt.cache.resident_in_layer(switch.layer.layer) < switch.layer.num_experts:
                targets.append((distance, switch))
        if not targets:
            return []
        stack = self.gate_stacks.get(position)
        stacked = stack(gate_input) if stack is not None else None  # one matmul for all of them
        return [(d, s, in_float32(stacked[d - 1] if stacked is not None
                                  else untapped_call(s.router, gate_input))) for d, s in targets]

    def issue(self, predictions: list[tuple]) -> None:
        """Start reading the predicted experts that are not resident, nearest layer first (call
        it once the current layer's demand reads are out: they go first)."""
        for distance, switch, out in predictions:
            logits = router_logits(out) if self.widths is not None else None
            if logits is None:
                ind, weights = predictions_from(out, self.width, self.rt.scoring)
            else:  # the width this layer needs; its router's choice will say how well it did
                self._logits.setdefault(switch.position, {})[distance] = logits
                ind, weights = top_predictions(logits, self.widths.width(switch.position, distance),
                                               self.rt.scoring)
            self._issue(switch, distance, ind, weights)

    def observe_choice(self, position: int, chosen: np.ndarray) -> None:
        """A layer's router chose: score the predictions made for it (widths learn from it)."""
        if self.widths is None:
            return
        for distance, logits in self._logits.pop(position, {}).items():
            if len(logits) == len(chosen):
                self.widths.observe(position, distance, logits, chosen)

    def score(self, position: int, needed: set, learn: bool = True) -> None:
        """Count how many of the experts a layer needed were predicted for it, per distance, and
        (``learn``: a decode step, not a prompt chunk) learn what a guess of each rank is worth."""
        stats = self.rt.stats
        for distance, buckets in self._predicted.pop(position, {}).items():
            predicted = set(buckets)
            if learn:
                self.value.observe(distance, buckets, needed)
            correct, total, guessed = stats.prediction_by_distance.get(distance, (0, 0, 0))
            stats.prediction_by_distance[distance] = (
                correct + len(needed & predicted), total + len(needed), guessed + len(predicted))
            if distance == 1:
                stats.prediction_total += len(needed)
                stats.prediction_correct += len(needed & predicted)

    def _issue(self, switch: "OffloadedSwitch", distance: int, ind: np.ndarray,
               weights: np.ndarray) -> None:
        rt = self.rt
        buckets = self._buckets(ind)
        experts, precisions = self._plan(ind, weights, distance, buckets)
        lid = switch.layer.layer
        self._predicted.setdefault(switch.position, {})[distance] = buckets
        to_read = list(zip(experts.tolist(), precisions)) if self.scratch else \
            list(zip(*self._hold_resident(lid, experts, precisions)))
        per_byte = rt.reader.seconds_per_byte()
        if self.cost_aware:  # likeliest first, while storage has free time before the layer runs
            to_read.sort(key=lambda ep: buckets[ep[0]])
            idle = self._idle_seconds(distance)
        for e, precision in to_read:
            key = (lid, e, precision)
            with self._lock:  # being read, or a copy that serves it resident (the 4-bit one
                if key in self._inflight or key in rt.cache or (lid, e, "high") in rt.cache:
                    continue  # serves either; a read commits before it leaves the reads in flight)
            worth = None
            seconds = switch.layer.precisions[precision].records[e].nbytes * per_byte
            if self.cost_aware:
                worth = self.value.probability(distance, buckets[e])
                if idle <= 0 or worth * min(seconds, idle) <= (1 - worth) * max(0.0, seconds - idle):
                    break  # (the guesses after it are no likelier)
                idle -= seconds
            slot = rt.cache.reserve_guest(key) if self.scratch else \
                rt.cache.reserve(key, prefetched=True, worth=worth)
            if slot is None:  # no room that a guess may take (or none worth its victim)
                if self.scratch:
                    break
                continue
            issued = self._issued.setdefault(lid, {})
            if key not in issued:  # (issued before from farther away, but it found no room)
                # Held from now until its layer runs, so a read that lands after that call leaves
                # no stale hold behind.
                if not self.scratch:
                    rt.cache.hold([key])
                issued[key] = distance
            entry = switch.layer.precisions[precision]
            pool = rt.cache.pool_for(lid, precision)
            ticket = ReadTicket()
            with self._lock:
                fut = rt.reader.submit_into(entry, e, pool, slot, background=True, ticket=ticket)
                self._inflight[key] = fut
                self._tickets[key] = ticket
                self._seconds[key] = seconds
            rt.stats.prefetch_issued += 1
            fut.add_done_callback(lambda f, key=key, slot=slot: self._done(key, slot, f))

    def _hold_resident(self, lid: int, experts: np.ndarray, precisions: list) -> tuple[list, list]:
        """Hold the predicted experts that are resident (the 4-bit copy, or the copy planned)
        until layer ``lid`` runs, so bringing in other predictions cannot evict one only to read
        it again. Returns those still to read."""
        cache = self.rt.cache
        to_read, to_read_precisions, held = [], [], []
        with cache.lock:  # one lock for the whole prediction
            for e, precision in zip(experts.tolist(), precisions):
                high = (lid, e, "high")
                key = high if high in cache else (lid, e, precision)
                if key in cache:
                    held.append(key)
                else:
                    to_read.append(e)
                    to_read_precisions.append(precision)
            cache.hold(held)
        self._held.setdefault(lid, []).extend(held)
        return to_read, to_read_precisions

    def _buckets(self, ind: np.ndarray) -> dict[int, int]:
        """Each predicted expert's best rank over the call's tokens, as a ``GuessValue`` bucket."""
        best: dict[int, int] = {}
        for rank in range(ind.shape[-1] - 1, -1, -1):  # (best rank written last)
            bucket = self.value.bucket(rank)
            for e in ind[:, rank].tolist():
                best[e] = bucket
        return best

    def _idle_seconds(self, distance: int) -> float:
        """Storage time free until the guess's layer runs: the layers in between compute (the
        measured time of a decode layer call, less read waits; they start once the current
        layer's demand reads are in) while storage finishes the guesses already in flight. A
        guess read beyond that delays a demand read or lands too late."""
        with self._lock:
            booked = sum(self._seconds.values())
        return distance * self.rt.read_cost.layer_seconds - booked

    def _plan(self, ind: np.ndarray, weights: np.ndarray, distance: int,
              buckets: dict[int, int]) -> tuple[np.ndarray, list[str]]:
        """Predicted experts worth reading, and the copy to read. While the lossy techniques
        serve (mixed precision, skip, big-little), a guess is read as its miss would be: the
        predicted gate weights planned as the layer will plan them; a guess the plan would serve
        in 2-bit is read in 2-bit, one it would skip or drop if missing is not read. With
        ``low_precision`` (mixed precision on) every prediction that no token ranks among its
        top-k as important, or (cost-aware) one more likely wrong than right, is read in 2-bit:
        that bounds the cost of a wrong or low-value guess."""
        experts = np.unique(ind)
        rt, opts = self.rt, self.rt.precision
        as_planned = opts.needs_weights and rt.lossy_now()
        if not as_planned and not (opts.mixed_precision and self.low_precision):
            return experts, ["high"] * len(experts)
        k = min(rt.manifest.experts_per_token, ind.shape[-1])
        top_w = weights[:, :k] / weights[:, :k].sum(axis=-1, keepdims=True)
        level, _ = plan_slots(top_w, opts)
        top = ind[:, :k]
        important = set(top[level == HIGH].tolist())
        if self.low_precision and self.cost_aware:
            important = {e for e in important
                         if self.value.probability(distance, buckets[e]) >= UNCERTAIN_GUESS}
        if as_planned:  # (a guess ranked below every token's top-k would be a 2-bit miss)
            read = set(top[(level == HIGH) | (level == LOW)].tolist()) | \
                set(ind[:, k:].ravel().tolist())
            experts = np.array([e for e in experts.tolist() if e in read], dtype=experts.dtype)
        low = "low" if opts.mixed_precision else "high"
        return experts, ["high" if int(e) in important else low for e in experts]

    def _done(self, key: tuple, slot: int, fut: Future) -> None:
        """On a reader thread: the bytes are in the slot (commit it), or the read failed (the
        demand path reads it again and reports the error)."""
        rt = self.rt
        try:
            try:
                nbytes = fut.result()
            except BaseException as e:  # (a cancelled future raises CancelledError)
                nbytes = None
                if isinstance(e, ReadCancelled) or fut.cancelled():
                    with rt.stats_lock:
                        rt.stats.prefetch_cancelled += 1
            if nbytes is not None:
                with rt.stats_lock:  # the model's thread adds to the same counter
                    rt.stats.bytes_read += nbytes
                    rt.stats.prefetch_bytes += nbytes
            if not self.scratch:
                if nbytes is not None:
                    rt.cache.commit(key, slot, prefetched=True)
                else:
                    rt.cache.abandon(key, slot)
                return
            with self._lock:  # a guess its layer ran without (its cancel came too late) goes,
                ticket = self._tickets.get(key)  # unless a layer waits for it now
                live = key in self._issued.get(key[0], ()) or \
                    key in self._wanted.get(key[0], ()) or (ticket is not None and ticket.urgent)
                if nbytes is not None and live:
                    rt.cache.commit_guest(key, slot)
                else:
                    rt.cache.abandon_guest(key, slot)
        finally:  # (a layer may be waiting for this: wait_landed)
            with self._lock:
                self._inflight.pop(key, None)
                self._tickets.pop(key, None)
                self._seconds.pop(key, None)
                self._landed.notify_all()

    def wait_landed(self, key: tuple) -> None:
        """Wait until the read of ``key`` in flight is resident or dropped. Its future completes
        on the reader thread a moment before that thread commits the slot (a future's callbacks
        run after its waiters wake): a layer that saw the future done must wait for this too."""
        with self._lock:
            while key in self._inflight:
                self._landed.wait()

    def promote(self, key: tuple) -> None:
        """A layer waits for this prefetch read: it goes ahead like a demand read."""
        with self._lock:
            ticket = self._tickets.get(key)
        if ticket is not None:
            ticket.promote()

    def consume(self, layer: int, needed: set) -> list:
        """A layer is about to run: count which of its prefetches are used. Returns the keys
        whose protection the caller releases once the layer's experts are pinned by its fetch."""
        cache = self.rt.cache
        with self._lock:
            issued = self._issued.pop(layer, {})
            available = {key for key in issued if key in self._inflight or key in cache}
            unused = [(self._tickets[key], self._inflight[key]) for key in issued
                      if key[1] not in needed and key in self._tickets]
            if self.scratch:  # used guests still being read land as guests; the layer adopts them
                self._wanted[layer] = {key for key in issued
                                       if key[1] in needed and key in self._inflight}
        for ticket, fut in unused:  # its layer runs without it: stop reading (outside the lock:
            ticket.cancel()         # a future cancelled before it ran calls _done right here)
            fut.cancel()
        if self.scratch:  # the landed guesses it does not use leave their scratch slots
            for key in issued:
                if key[1] not in needed:
                    cache.drop_guest(key)
        per_distance = self.rt.stats.prefetch_by_distance
        for key, distance in issued.items():
            used = int(key[1] in needed and key in available)
            self.rt.stats.prefetch_used += used
            n_issued, n_used = per_distance.get(distance, (0, 0))
            per_distance[distance] = (n_issued + 1, n_used + used)
        if self.scratch:
            return []
        return list(issued) + self._held.pop(layer, [])

    def after_layer(self, layer: int) -> None:
        """A layer's call has fetched what it needs: a guess it was waiting for that landed
        without being used (the call took another copy of its expert) leaves."""
        if not self.scratch:
            return
        with self._lock:
            wanted = self._wanted.pop(layer, set())
        for key in wanted:
            self.rt.cache.drop_guest(key)

    def wait_idle(self) -> None:
        """Let outstanding reads finish (tests and benchmarks read stable counters)."""
        while True:
            with self._lock:
                futs = list(self._inflight.values())
            if not futs:
                return
            for f in futs:
                f.exception()
            time.sleep(0.001)

    def forget(self) -> None:
        """Drop every prediction and hold (after the pools are rebuilt)."""
        self.wait_idle()
        for layer in list(self._issued) + list(self._held):
            issued = list(self._issued.pop(layer, {}))
            self.rt.cache.release(([] if self.scratch else issued) + self._held.pop(layer, []))
        self._wanted.clear()
        self.rt.cache.drop_guests()
        self._predicted.clear()
        self._logits.clear()
