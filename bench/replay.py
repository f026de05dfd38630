#!/usr/bin/env python3
"""Evaluate expert-cache policies offline on a routing trace, against Belady's optimum.

    python bench/replay.py TRACE.npz [--capacity 64,128 | --residency 1,0.5,0.25,0.125] \
        [--policies lru,lfu,fifo,belady,runtime:lru] [--group trace|slots|none|N] [--json OUT]

Access order: the trace's MoE layer calls in sequence; each call requests its unique experts (sorted,
as the runtime does), keyed ``(layer, expert, "high")`` like the runtime's cache. The cache holds
``capacity`` experts across all layers (one global pool, like ``hobbit_mlx``'s); ``--residency``
gives capacity as a fraction of all experts (rounded down). Mechanics mirror
``hobbit_mlx.cache.SlotCache`` (one pool): a call's experts are pinned while it runs (it never
evicts its own experts); hits are looked up first, then each miss is inserted, evicting the policy's
victim among the resident, unpinned experts while the cache is full. When no victim is left (the
call needs more experts than the pool has slots), the runtime evaluates what the call has so far and
continues with the remaining misses as a new group, in which only they are pinned: ``--group
slots``, what ``--group trace`` (default) does for traces the runtime recorded (their meta says
``"fetch_group": "slots"``), so the replayed LRU hit rate equals the one the runtime measures on the
same run. Otherwise (``--group none``, hand-made traces) a miss that cannot be placed is not cached;
``--group N`` splits each call into fixed groups of N experts (traces of older runtimes recorded a
per-layer group size, which ``trace`` follows).

Policies: ``lru``; ``lfu`` (request counts since the start of the trace, kept across evictions, ties
to the least recent); ``fifo``; ``belady`` (evict the expert whose next request is farthest in the
future: the optimum for a cache that must admit every miss, as the runtime's does);
``runtime:NAME``: the runtime's own ``hobbit_mlx.policies.make_policy(NAME)``; ``oracleT:POLICY``:
POLICY told which experts are requested before the end of this token (T = 0) or the next (T = 1),
never evicting those (``Lookahead``: what a perfect predictor of that would be worth). ``replay()`` also
accepts any object with the runtime policy interface (``on_insert``, ``on_hit``, ``on_evict``,
``victim(evictable)``, ``reset``); optional hooks it calls when present: ``on_layer(layer)`` before
each layer call, and ``reset()`` at the start of each sequence (prompt).
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable, Hashable

import numpy as np

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench.trace import Trace, load as load_trace  # noqa: E402
from hobbit_mlx.policies import forward_hooks  # noqa: E402

Key = Hashable
PRECISION = "high"


# --------------------------------------------------------------------------- reference policies
class LRU:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict = OrderedDict()

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        for key in self._order:
            if evictable(key):
                return key
        raise LookupError("no evictable expert")

    def reset(self) -> None:
        pass


class FIFO(LRU):
    name = "fifo"

    def on_hit(self, key: Key) -> None:
        pass  # insertion order only


class _HeapPolicy:
    """Evicts the resident key with the smallest priority; subclasses say what a touch records."""

    def __init__(self) -> None:
        self._stamp: dict = {}  # resident key -> priority of its live heap entry
        self._heap: list = []
        self._tick = itertools.count()

    def _push(self, key: Key, priority: tuple) -> None:
        self._stamp[key] = priority
        heapq.heappush(self._heap, (priority, key))

    def on_evict(self, key: Key) -> None:
        self._stamp.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        return _heap_victim(self._heap, self._stamp, evictable)

    def reset(self) -> None:
        pass


class LFU(_HeapPolicy):
    """Least frequently used; counts survive eviction (popularity), ties go to the least recent."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: defaultdict = defaultdict(int)

    def _touch(self, key: Key) -> None:
        self._count[key] += 1
        self._push(key, (self._count[key], next(self._tick)))

    on_insert = _touch
    on_hit = _touch


class Belady(_HeapPolicy):
    """Evict the resident expert whose next request lies farthest in the future (MIN)."""

    name = "belady"

    def __init__(self, steps: list[tuple]) -> None:
        super().__init__()
        self._uses: defaultdict = defaultdict(list)  # key -> step indices where it is requested
        for i, (_seq, _layer, _phase, keys, _call) in enumerate(steps):
            for k in keys:
                self._uses[k].append(i)
        self.now = -1

    def advance(self, step: int) -> None:
        self.now = step

    def _touch(self, key: Key) -> None:
        uses = self._uses.get(key, [])
        j = bisect.bisect_right(uses, self.now)
        nxt = uses[j] if j < len(uses) else float("inf")
        self._push(key, (-nxt, next(self._tick)))  # farthest next use pops first

    on_insert = _touch
    on_hit = _touch


class Lookahead:
    """An online policy told part of the future: its victim is never an expert requested again
    before the end of the current token (``tokens_ahead`` = 0) or of the next one (1), unless
    nothing else can go. What knowing that is worth bounds what any predictor of it can buy —
    a predictor from the hidden state (``tokens_ahead`` 0: the next layers' gates applied to the
    current hidden state) or a speculative draft (1: the next token's routing)."""

    def __init__(self, inner, steps: list[tuple], tokens_ahead: int = 0) -> None:
        self.inner, self.steps, self.tokens_ahead = inner, steps, tokens_ahead
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+oracle{tokens_ahead}"
        forward_hooks(self, inner)
        self.token = []  # token number of each step: a new one where the layer does not grow
        t, prev = 0, None
        for seq, layer, _phase, _keys, call in steps:
            if prev is not None and call != prev[2] and (seq != prev[0] or layer <= prev[1]):
                t += 1
            self.token.append(t)
            prev = (seq, layer, call)
        self.needed: set = set()

    def advance(self, step: int) -> None:
        if hasattr(self.inner, "advance"):
            self.inner.advance(step)
        last = self.token[step] + self.tokens_ahead
        self.needed = set()
        j = step + 1
        while j < len(self.steps) and self.token[j] <= last and \
                self.steps[j][0] == self.steps[step][0]:
            self.needed.update(self.steps[j][3])
            j += 1

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        try:
            return self.inner.victim(lambda k: evictable(k) and k not in self.needed)
        except LookupError:
            return self.inner.victim(evictable)


def _heap_victim(heap: list, stamp: dict, evictable: Callable[[Key], bool]) -> Key:
    """Top valid, evictable entry of a lazily invalidated heap (the entry stays for on_evict)."""
    held = []
    try:
        while heap:
            entry, key = heap[0]
            if stamp.get(key) != entry:
                heapq.heappop(heap)  # stale
                continue
            if evictable(key):
                return key
            held.append(heapq.heappop(heap))  # pinned: skip for now
        raise LookupError("no evictable expert")
    finally:
        for item in held:
            heapq.heappush(heap, item)


REFERENCE_POLICIES = {"lru": LRU, "lfu": LFU, "fifo": FIFO}
DEFAULT_POLICIES = ["lru", "lfu", "fifo", "belady"]


# --------------------------------------------------------------------------- replay
def splits_on_slots(trace: Trace, group: str | int | None = "trace") -> bool:
    """Whether a call whose misses find no slot continues in a new group (the slot-pool runtime)."""
    return group == "slots" or (group == "trace" and trace.meta.get("fetch_group") == "slots")


def steps_of(trace: Trace, group: str | int | None = "trace") -> list[tuple]:
    """The access steps: ``(sequence, layer, phase, [keys], call)``, one per fetch (group) of a call
    (one per call where groups are decided by the slots, see ``splits_on_slots``)."""
    groups = trace.meta.get("fetch_group")
    if isinstance(groups, str):
        groups = None
    out = []
    for i in range(len(trace)):
        layer = int(trace.layer[i])
        uniq = np.unique(trace.call(i))
        keys = [(layer, int(e), PRECISION) for e in uniq]
        if group == "trace" and groups:
            size = int(groups[layer]) if isinstance(groups, list) else int(groups)
        elif isinstance(group, int) and group > 0:
            size = group
        else:
            size = len(keys) or 1
        for start in range(0, len(keys), size):
            out.append((int(trace.sequence[i]), layer, int(trace.phase[i]), keys[start:start + size], i))
    return out


def make_policy(policy, steps: list[tuple], num_layers: int | None = None):
    """A fresh policy object for a name, or the object itself."""
    if not isinstance(policy, str):
        return policy
    if policy == "belady":
        return Belady(steps)
    if policy.startswith("oracle"):  # oracleT:INNER, e.g. oracle1:runtime:seqfreq
        head, _, inner = policy.partition(":")
        return Lookahead(make_policy(inner, steps, num_layers), steps, int(head[6:] or 0))
    if policy.startswith("runtime:"):
        from hobbit_mlx.policies import make_policy as runtime_policy
        name = policy.split(":", 1)[1]
        try:
            return runtime_policy(name, num_layers=num_layers)
        except TypeError:  # a runtime whose make_policy takes no options
            return runtime_policy(name)
    try:
        return REFERENCE_POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}: use {', '.join(DEFAULT_POLICIES)} or "
                         "runtime:NAME, or pass a policy object") from None


def replay(trace: Trace, policy, capacity: int, *, group: str | int | None = "trace",
           reset_per_sequence: bool = True, steps: list[tuple] | None = None) -> dict:
    """Replay ``trace`` through a cache of ``capacity`` experts managed by ``policy``.

    ``policy``: "lru", "lfu", "fifo", "belady", "runtime:NAME", or an object with the runtime's
    policy interface. Returns hits/misses overall and split by prefill/decode.
    """
    steps = steps if steps is not None else steps_of(trace, group)
    split = splits_on_slots(trace, group)
    pol = make_policy(policy, steps, trace.num_layers)
    name = policy if isinstance(policy, str) else getattr(pol, "name", type(pol).__name__)
    capacity = int(capacity)
    resident: set = set()
    pinned: set = set()
    evictable = lambda k: k in resident and k not in pinned  # noqa: E731
    hits = [0, 0]  # by phase: prefill, decode
    misses = [0, 0]
    evictions = not_cached = 0
    on_layer = getattr(pol, "on_layer", None)
    advance = getattr(pol, "advance", None)
    seq = call = None
    for i, (s, layer, phase, keys, c) in enumerate(steps):
        if s != seq:
            if seq is not None and reset_per_sequence:
                pol.reset()
            seq = s
        if advance is not None:
            advance(i)
        if on_layer is not None and c != call:
            on_layer(layer)
        call = c
        pinned = set(keys)
        missing = []
        for k in keys:
            if k in resident:
                hits[phase] += 1
                pol.on_hit(k)
            else:
                missing.append(k)
        for j, k in enumerate(missing):
            misses[phase] += 1
            if capacity < 1:
                not_cached += 1
                continue
            placed = True
            while len(resident) >= capacity:
                try:
                    v = pol.victim(evictable)
                except LookupError:
                    if split and pinned != set(missing[j:]):
                        # The runtime's next group: what ran so far is evaluated, only the
                        # remaining misses stay pinned.
                        pinned = set(missing[j:])
                        continue
                    placed = False
                    break
                resident.discard(v)
                pol.on_evict(v)
                evictions += 1
            if placed:
                resident.add(k)
                pol.on_insert(k)
            else:
                not_cached += 1
    total_h, total_m = sum(hits), sum(misses)
    req = total_h + total_m
    rate = lambda h, m: h / (h + m) if h + m else 0.0  # noqa: E731
    return {"policy": name, "capacity": capacity, "requests": req, "hits": total_h,
            "misses": total_m, "hit_rate": rate(total_h, total_m), "evictions": evictions,
            "not_cached": not_cached, "prefill_hit_rate": rate(hits[0], misses[0]),
            "decode_hit_rate": rate(hits[1], misses[1]), "decode_requests": hits[1] + misses[1]}


def total_experts(trace: Trace) -> int:
    per_layer = trace.meta.get("experts_per_layer")
    return int(sum(per_layer)) if per_layer else trace.num_layers * trace.num_experts


def capacity_for_residency(trace: Trace, residency: float) -> int:
    return int(residency * total_experts(trace) + 1e-9)


def compare(trace: Trace, capacities: list[int], policies=None, *, group="trace",
            labels: list | None = None) -> list[dict]:
    """Every policy at every capacity, with the gap to Belady (percentage points of hit rate)."""
    policies = list(policies or DEFAULT_POLICIES)
    if "belady" not in policies:
        policies.append("belady")
    steps = steps_of(trace, group)
    rows = []
    for j, cap in enumerate(capacities):
        res = {p if isinstance(p, str) else getattr(p, "name", type(p).__name__):
               replay(trace, p, cap, group=group, steps=steps) for p in policies}
        opt = res["belady"]["hit_rate"]
        for name, r in res.items():
            r["belady_hit_rate"] = opt
            r["gap_to_belady"] = opt - r["hit_rate"]
            r["fraction_of_belady"] = r["hit_rate"] / opt if opt else None
            if labels is not None:
                r["label"] = labels[j]
            rows.append(r)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per capacity, hit rate per policy, and each policy's gap to Belady."""
    caps = list(dict.fromkeys((r.get("label", ""), r["capacity"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r.get("label", ""), r["capacity"], r["policy"]): r for r in rows}
    others = [p for p in policies if p != "belady"]
    head = (["capacity (experts)"] + [f"{p} hit" for p in policies]
            + [f"{p} gap" for p in others])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, cap in caps:
        cells = [f"{cap}" + (f" ({label})" if label != "" else "")]
        cells += [f"{by[(label, cap, p)]['hit_rate']:.3f}" for p in policies]
        cells += [f"{100 * by[(label, cap, p)]['gap_to_belady']:+.1f} pp" for p in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a .npz written by bench/trace.py (or by the harness)")
    p.add_argument("--capacity", default=None, help="cache sizes in experts, comma-separated")
    p.add_argument("--residency", default="1,0.5,0.25,0.125",
                   help="cache sizes as fractions of all experts (used when --capacity is not given)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="lru,lfu,fifo,belady and/or runtime:NAME (hobbit_mlx.policies), "
                        "oracleT:POLICY (POLICY told the rest of this token, T=0, or also the next "
                        "one, T=1)")
    p.add_argument("--group", default="trace",
                   help="'trace': split calls as the runtime that recorded the trace does "
                        "(default); 'slots': a new group when a miss finds no slot; 'none': one "
                        "step per call; N: groups of N experts")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if not Path(a.trace).is_file():
        p.error(f"no trace file {a.trace} (bench/trace.py writes one)")
    try:
        trace = load_trace(a.trace)
    except (OSError, ValueError, KeyError, EOFError) as e:  # (not an .npz, or not a trace)
        p.error(f"{a.trace} is not a routing trace (an .npz that bench/trace.py writes)"
                + (f" ({e.args[0]})" if isinstance(e, KeyError) and e.args else ""))
    if a.group not in ("trace", "slots", "none") and not (a.group.isdigit() and int(a.group) > 0):
        p.error(f"--group is trace, slots, none or a positive group size, not {a.group!r}")
    group = a.group if a.group in ("trace", "slots") else (None if a.group == "none" else int(a.group))
    if a.capacity:
        try:
            caps = [int(x) for x in a.capacity.split(",") if x.strip()]
        except ValueError:
            caps = [0]
        labels = None
        if not caps or any(c < 1 for c in caps):
            p.error(f"--capacity takes cache sizes of 1 expert or more, not {a.capacity}")
    else:
        try:
            fracs = _floats(a.residency)
        except ValueError:
            fracs = [0.0]
        if not fracs or any(not 0 < r <= 1 for r in fracs):
            p.error(f"--residency takes fractions in (0, 1], not {a.residency}")
        caps = [capacity_for_residency(trace, r) for r in fracs]
        labels = [f"{100 * r:g}%" for r in fracs]
    import time
    t0 = time.perf_counter()
    try:
        rows = compare(trace, caps, [x for x in a.policies.split(",") if x], group=group,
                       labels=labels)
    except ValueError as e:  # an unknown policy name
        p.error(str(e))
    dt = time.perf_counter() - t0
    routing = trace.meta.get("routing", "unknown")
    print(f"trace {a.trace}: {trace.summary()}; {total_experts(trace)} experts; routing: {routing}"
          + (" (random routing: hit rates flatter every cache)" if routing == "random" else ""))
    print(format_table(rows))
    print(f"(replayed in {dt:.2f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"trace": str(a.trace), "meta": trace.meta, "rows": rows},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
