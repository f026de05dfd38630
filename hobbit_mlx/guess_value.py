"""What a prefetch guess is worth, from what the runtime measures as it runs.

A guess saves a stall only if its layer uses it; it costs the stall of re-reading the expert it
evicts (if that one is needed again) and device time that a demand read may wait behind. So the
prefetcher reads guesses only in the storage time left free while the layers before theirs
compute, and a guess takes a slot only when

    P(guess used by its layer's next call) > P(victim needed by its layer's next call).

Both probabilities are measured: guesses per (distance, rank among the predictions) against what
the router then chose, and victims by remembering each evicted expert until its layer's next call
(a "ghost").
"""

from __future__ import annotations

RANK_BUCKETS = 4  # ranks 0..k-1, k..2k-1, 2k..3k-1, the rest


class DecayedRate:
    """A success rate over recent trials (older ones fade by ``decay`` per update), starting from
    ``prior`` as if ``weight`` trials had been seen."""

    __slots__ = ("hits", "total", "decay")

    def __init__(self, prior: float, weight: float = 4.0, decay: float = 0.98):
        self.hits, self.total, self.decay = prior * weight, weight, decay

    def add(self, hits: float, total: float) -> None:
        self.hits = self.hits * self.decay + hits
        self.total = self.total * self.decay + total

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total > 0 else 0.0


class GuessValue:
    """P(a predicted expert is used by its layer's next call), per (distance, rank bucket): a
    prediction ranked among the first top-k is used far more often than one in a wider guess's
    tail."""

    def __init__(self, top_k: int):
        self.top_k = max(1, top_k)
        self._rates: dict[tuple[int, int], DecayedRate] = {}

    def bucket(self, rank: int) -> int:
        return min(rank // self.top_k, RANK_BUCKETS - 1)

    def probability(self, distance: int, bucket: int) -> float:
        rate = self._rates.get((distance, bucket))
        return rate.value if rate is not None else _prior(bucket)

    def observe(self, distance: int, buckets: dict[int, int], used: set) -> None:
        """A layer ran: ``buckets`` (expert -> rank bucket) were predicted for it at ``distance``,
        and it used ``used``."""
        tally: dict[int, list[int]] = {}
        for expert, bucket in buckets.items():
            t = tally.setdefault(bucket, [0, 0])
            t[0] += expert in used
            t[1] += 1
        for bucket, (hits, total) in tally.items():
            key = (distance, bucket)
            if key not in self._rates:
                self._rates[key] = DecayedRate(_prior(bucket))
            self._rates[key].add(hits, total)


def _prior(bucket: int) -> float:
    return 0.6 if bucket == 0 else 0.2  # until measured: top-k guesses are usually right
