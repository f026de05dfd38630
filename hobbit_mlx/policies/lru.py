"""Least recently used: what the exact MLX expert streamers (streamlx, omlx, mlx-vlm) do."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_hit(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        for key in self._order:  # oldest first
            if evictable(key):
                return key
        raise LookupError("no evictable expert")

    def reset(self) -> None:
        """Recency is a property of the cache contents, so it survives a new sequence."""
