"""Cache replacement policies behind one small interface.

A policy only ranks keys; the cache owns the bytes and the budget. Keys are
``(layer, expert, precision)`` tuples. ``victim`` picks the key to evict among those ``evictable`` accepts (resident, unpinned).
"""

from __future__ import annotations

from typing import Callable, Hashable, Protocol

Key = Hashable


class Policy(Protocol):
    name: str

    def on_insert(self, key: Key) -> None: ...
    def on_hit(self, key: Key) -> None: ...
    def on_evict(self, key: Key) -> None: ...
    def victim(self, evictable: Callable[[Key], bool]) -> Key: ...
    def reset(self) -> None: ...
    # optional: on_layer(layer) is called before each MoE layer runs


from .arc import ARCPolicy  # noqa: E402
from .hobbit import HobbitPolicy, ShallowFavoringPolicy  # noqa: E402
from .lfu import LFUPolicy  # noqa: E402
from .lru import LRUPolicy  # noqa: E402

POLICIES: dict[str, Callable[..., Policy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "hobbit": HobbitPolicy,
    "shallow": ShallowFavoringPolicy}


def make_policy(name: str, **kwargs) -> Policy:
    """Build a policy by name; options it does not take (e.g. ``num_layers``) are ignored."""
    import inspect

    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    factory = POLICIES[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})
