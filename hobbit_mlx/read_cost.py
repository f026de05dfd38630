"""How dear a read is next to a layer's compute, measured while the model runs.

Mixed precision, skip and big-little trade a little quality for fewer bytes read. They pay only
while reads are dear: under a Mac's SSD one token's top-k reads take about 12x its resident
compute, on a warm page cache about 1/20 of it, and there the lossy techniques cost speed (a
second expert run per call, a host sync per layer) and quality for nothing. ``ReadCost``
measures both sides -- the wall time of a decode layer call between host syncs, less the time
spent waiting for reads, and the reader's time per byte -- so the runtime can use the lossy
techniques only while one layer's top-k 4-bit reads would take longer than the layer computes,
and give the 2-bit pool's memory to the 4-bit pool while they cost well under it.
"""

from __future__ import annotations

from typing import Protocol

SMOOTHING = 0.2  # weight of the newest measurement in the moving average
MAX_LAYER_SECONDS = 0.1  # a gap longer than this is a pause (the user, a new prompt), not compute
CHEAP = 0.5  # reads below this share of a layer's compute make the 2-bit pool idle memory
SPIKE = 2.0  # one measurement moves the average as if it were at most this many times the average


class _Reader(Protocol):
    def seconds_per_byte(self) -> float: ...
    def latency_seconds(self, reads: int) -> float: ...


class ReadCost:
    """Measured compute per decode layer call, and whether a layer's top-k reads cost more."""

    def __init__(self, reader: _Reader, topk_bytes: int, top_k: int = 1, threshold: float = 1.0):
        self.reader = reader
        self.topk_bytes = topk_bytes  # one layer call's top-k experts at 4-bit, one token
        self.top_k = top_k  # reads in one layer call's top-k
        self.threshold = threshold
        self.layer_seconds = 0.0  # moving average; 0 until two decode syncs were seen
        self._last: tuple[float, float, int] | None = None  # (time, read wait, layer position)

    def on_sync(self, now: float, read_wait_s: float, position: int, decode: bool) -> None:
        """A synced call of the layer at ``position`` at ``now``: the layers since the last synced
        call of the same forward pass took the time between them, less what they waited for
        reads. Gaps across a token boundary (sampling, the caller's own work) and prefill calls
        (a chunk computes many tokens) are not layer compute and are not counted."""
        last = self._last
        self._last = (now, read_wait_s, position) if decode else None
        if not decode or last is None or position <= last[2]:
            return
        busy = (now - last[0] - (read_wait_s - last[1])) / (position - last[2])
        busy = min(max(busy, 0.0), MAX_LAYER_SECONDS)
        if self.layer_seconds:  # a stall (the process descheduled, a collection) counts at most
            busy = min(busy, SPIKE * self.layer_seconds)  # double: compute drifts, it does not jump
            self.layer_seconds += SMOOTHING * (busy - self.layer_seconds)
        else:
            self.layer_seconds = busy

    def read_seconds(self) -> float:
        """What reading one layer call's top-k experts in 4-bit would take, as measured lately:
        their bytes, and the device's latency before the first byte of each batch of reads."""
        return self.reader.seconds_per_byte() * self.topk_bytes + \
            self.reader.latency_seconds(self.top_k)

    def cheap(self) -> bool:
        """Reads measured well below compute (``CHEAP`` x): the 2-bit pool is not worth its
        memory. The gap to ``dear`` keeps a pool from being rebuilt back and forth."""
        return self.layer_seconds > 0.0 and self.read_seconds() < CHEAP * self.layer_seconds

    def dear(self) -> bool:
        """Reads cost more than compute (true until compute has been measured)."""
        return self.layer_seconds == 0.0 or self.read_seconds() > self.threshold * self.layer_seconds
