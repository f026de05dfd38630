"""A slot cache over tiny hand-made pools, and the read/use steps of a layer call, for testing
cache and policy behaviour without a model."""

from __future__ import annotations

from ..cache import SlotCache
from ..policies import make_policy
from ..pools import SlotPool
from ..store import PrecisionEntry, TensorLayout


def slot_cache(slots: int, policy, layers: int = 4, experts: int = 8,
               low_slots: int | None = None) -> SlotCache:
    """A cache over one pool of ``slots`` 100-byte experts shared by every layer (and, with
    ``low_slots``, a 2-bit pool of that many 50-byte experts, ranked by LRU)."""
    entry = PrecisionEntry(4, {}, [TensorLayout("w", "U8", (100,), 0, 0)], [])
    high = SlotPool(entry, slots)
    pools = {(layer, "high"): high for layer in range(layers)}
    if low_slots is not None:
        low = SlotPool(PrecisionEntry(2, {}, [TensorLayout("w", "U8", (50,), 0, 0)], []), low_slots)
        pools.update({(layer, "low"): low for layer in range(layers)})
    policies = iter([policy, make_policy("lru")])  # one per pool, the 4-bit pool's first
    return SlotCache(pools, {layer: experts for layer in range(layers)}, lambda: next(policies))


def put(cache: SlotCache, key, prefetched: bool = False) -> bool:
    """Read ``key`` into a slot (reserve, commit); then the graphs of that call have run (the
    epoch moves on, so its slot may be reused). False when no slot can be had."""
    slot = cache.reserve(key, prefetched=prefetched)
    if slot is None:
        return False
    cache.commit(key, slot, prefetched=prefetched)
    cache.synced()
    return True


def use(cache: SlotCache, key) -> bool:
    """A layer call that uses ``key`` (a hit when resident)."""
    slot = cache.pin_and_lookup([key])[0]
    cache.unpin([key])
    cache.synced()
    return slot >= 0
