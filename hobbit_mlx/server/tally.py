"""What the server has done since it started, for the stats endpoint and the per-request log.

The generation thread records each request's offload statistics here; HTTP handlers read a
snapshot. Nothing here touches MLX, so any thread may read it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..budget import format_size


def request_stats(offload: dict, *, prompt_tokens: int, generation_tokens: int,
                  prompt_tps: float, generation_tps: float, wall_s: float,
                  cached_tokens: int = 0, cached_from_disk: int = 0) -> dict[str, Any]:
    """One request's figures, from ``offload_stats`` taken after it (reset before it)."""
    served = offload.get("hits_high", 0) + offload.get("hits_low", 0)
    demand = served + offload.get("misses_high", 0) + offload.get("misses_low", 0)
    return dict(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                cached_from_disk=cached_from_disk,
                generation_tokens=generation_tokens,
                prompt_tps=prompt_tps, generation_tps=generation_tps, wall_s=wall_s,
                expert_demand=demand, expert_served=served,
                served_rate=served / demand if demand else None,
                bytes_read=offload.get("bytes_read", 0),
                peak_memory_bytes=offload.get("peak_memory_bytes", 0),
                budget_bytes=offload.get("budget_bytes", 0),
                resident_experts=offload.get("resident_experts", 0),
                expert_cache_bytes=offload.get("expert_cache_bytes", 0))


def describe(stats: dict) -> str:
    """The figures of a request in one line: tokens, speed, served rate, reads, peak memory."""
    cached = f" ({stats['cached_tokens']} cached" + (
        ", read from disk)" if stats.get("cached_from_disk") else ")") \
        if stats.get("cached_tokens") else ""
    parts = [f"{stats['prompt_tokens']} prompt{cached} + {stats['generation_tokens']} generated tokens",
             f"{stats['generation_tps']:.1f} tok/s (prompt {stats['prompt_tps']:.1f} tok/s)"]
    rate = stats.get("served_rate")
    parts.append("served " + (f"{100 * rate:.1f}%" if rate is not None else "n/a"))
    parts.append(f"read {format_size(stats['bytes_read'])}")
    peak = f"peak {format_size(stats['peak_memory_bytes'])}"
    if stats.get("budget_bytes"):
        peak += f" of {format_size(stats['budget_bytes'])}"
    parts.append(peak)
    parts.append(f"{stats['wall_s']:.2f} s")
    return ", ".join(parts)


class Tally:
    """Counters over every request served, failed, cancelled or refused."""

    def __init__(self, model_id: str, budget_bytes: int, context_limit: int):
        self._lock = threading.Lock()
        self.started = time.time()
        self.model_id, self.budget_bytes, self.context_limit = model_id, budget_bytes, context_limit
        self.counts = dict(served=0, cancelled=0, failed=0, refused=0)
        self.totals = dict(prompt_tokens=0, cached_tokens=0, cached_from_disk=0,
                           generation_tokens=0,
                           expert_demand=0, expert_served=0, bytes_read=0, generation_s=0.0)
        self.peak = 0
        self.cache = dict(resident_experts=0, expert_cache_bytes=0)
        self.last: dict | None = None
        # the prompt caches kept on disk (KeptPrompts.stats(), set by the generation thread)
        self.kept_prompts: dict | None = None

    def record(self, outcome: str, stats: dict | None, **about) -> None:
        """A request the generation thread ran: ``outcome`` is served, cancelled or failed."""
        with self._lock:
            self.counts[outcome] += 1
            if stats is None:
                return
            for k in ("prompt_tokens", "cached_tokens", "cached_from_disk", "generation_tokens",
                      "expert_demand", "expert_served", "bytes_read"):
                self.totals[k] += stats.get(k, 0)
            if stats.get("generation_tps"):
                self.totals["generation_s"] += stats["generation_tokens"] / stats["generation_tps"]
            self.peak = max(self.peak, stats.get("peak_memory_bytes", 0))
            self.cache.update(resident_experts=stats.get("resident_experts", 0),
                              expert_cache_bytes=stats.get("expert_cache_bytes", 0))
            self.last = dict(stats, outcome=outcome, **about)

    def refused(self) -> None:
        """A request answered with an error before it reached the generation thread."""
        with self._lock:
            self.counts["refused"] += 1

    def snapshot(self, *, queued: int, busy: bool) -> dict[str, Any]:
        with self._lock:
            t = dict(self.totals)
            gen_s = t.pop("generation_s")
            demand, served = t["expert_demand"], t["expert_served"]
            return dict(
                model=self.model_id, uptime_s=time.time() - self.started,
                requests_served=self.counts["served"], requests_cancelled=self.counts["cancelled"],
                requests_failed=self.counts["failed"], requests_refused=self.counts["refused"],
                requests_queued=queued, busy=busy, **t,
                served_rate=served / demand if demand else None,
                generation_tps=t["generation_tokens"] / gen_s if gen_s else None,
                peak_memory_bytes=self.peak, budget_bytes=self.budget_bytes,
                peak_over_budget=self.peak / self.budget_bytes if self.budget_bytes else None,
                context_limit_tokens=self.context_limit, **self.cache,
                prompt_cache_files=dict(self.kept_prompts) if self.kept_prompts else None,
                last_request=dict(self.last) if self.last else None)
