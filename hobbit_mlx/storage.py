"""Simulated storage: one shared device with a bandwidth, a per-read latency and a queue depth.

Benchmarks and tests run on machines whose page cache makes every read nearly free, while our
users run models larger than memory from a Mac's SSD, where reads are the bottleneck. Every
``pread`` of the store can therefore pass through a ``SimulatedDevice``, which makes the calling
reader thread wait as long as the modelled device would take:

* **bandwidth**: bytes leave the device one after another at ``bandwidth`` bytes/s, whichever
  thread asked for them, so parallel reads share it (one timeline of when the device is busy);
* **latency**: each read waits ``latency`` seconds before its first byte; up to ``queue_depth``
  reads wait out their latency at the same time (an SSD's command queue). A read is one command:
  the reader sends one per run of back-to-back spans, so an expert read in place from a
  checkpoint (one span per stacked tensor) pays it once per tensor;
* **demand first**: a read the model waits for (a demand miss) goes ahead of prefetch reads. A
  prefetch read moves in chunks and books the next chunk only when the device is idle and no
  demand read waits, so a demand read waits behind at most one prefetch chunk (as long as a Mac's
  SSD takes to move 64 KiB, ``StorageModel.chunk_bytes``); a prefetch read
  can be cancelled until its last chunk is booked (its layer ran without it), and is promoted to
  a demand read's priority when a layer waits for it.

The ``mac-like`` setting used by the benchmarks keeps a Mac's ratio of storage to compute: on an
M-series Mac, Qwen3-30B-A3B 4-bit needs about 48 layers x 8 experts x 2.6 MB = 1 GB of experts per
token, ~140 ms at ~7 GB/s, against ~12 ms of resident compute per token: reading one token's top-k
experts costs **12x** a resident decode step. ``mac_like`` sets the bandwidth that gives the same
ratio for any model and machine: one token's top-k expert bytes / (12 x resident seconds/token).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

MAC_READ_RATIO = 12.0  # reading a token's top-k experts / one resident decode step, on a Mac
MAC_SSD_BANDWIDTH = 7e9  # bytes/s: an M-series internal SSD, large sequential reads
MAC_SSD_LATENCY = 80e-6  # seconds: one NVMe read's latency
CHUNK_BYTES = 64 * 1024  # a prefetch read yields to demand reads at this grain on a Mac's SSD:
CHUNK_SECONDS = CHUNK_BYTES / MAC_SSD_BANDWIDTH  # ~9 us, the wait it costs a demand read there
MIN_CHUNK_BYTES = 4096  # (a slower simulated device keeps that wait, down to one page)


class ReadCancelled(Exception):
    """A prefetch read was cancelled before it finished (its layer ran without it)."""


@dataclass(frozen=True)
class StorageModel:
    """What a simulated device does: ``bandwidth`` bytes/s, ``latency`` s per read, at most
    ``queue_depth`` reads waiting out their latency at once."""

    bandwidth: float
    latency: float = 0.0
    queue_depth: int = 8

    def __post_init__(self):
        if not 0 < self.bandwidth < float("inf"):
            raise ValueError(f"storage bandwidth must be above 0 bytes/s (got {self.bandwidth})")
        if self.latency < 0:
            raise ValueError(f"storage latency must be 0 or more seconds (got {self.latency})")
        if self.queue_depth < 1:
            raise ValueError(f"storage queue depth must be at least 1 (got {self.queue_depth})")

    def seconds(self, nbytes: int) -> float:
        """How long one read of ``nbytes`` takes on an idle device."""
        return self.latency + nbytes / self.bandwidth

    @property
    def chunk_bytes(self) -> int:
        """The grain at which a prefetch read yields to demand reads: what takes the device as
        long as a Mac's SSD takes to move 64 KiB. A fixed 64 KiB on a device slowed to keep a
        small model's ratio of reads to compute would hold a demand read back for milliseconds
        (a whole expert of the reference model), where an SSD interleaves the two."""
        return max(MIN_CHUNK_BYTES, int(self.bandwidth * CHUNK_SECONDS))

    def describe(self) -> str:
        return (f"{self.bandwidth / 1e6:.1f} MB/s, {self.latency * 1e6:.0f} us per command, "
                f"queue depth {self.queue_depth}")


def mac_like(topk_bytes_per_token: int, resident_seconds_per_token: float, *,
             ratio: float = MAC_READ_RATIO, latency: float = 0.0, queue_depth: int = 8) -> StorageModel:
    """The device on which reading one token's top-k experts takes ``ratio`` x one resident decode
    step, as on a Mac running a model larger than its memory (see the module docstring)."""
    if resident_seconds_per_token <= 0 or topk_bytes_per_token <= 0:
        raise ValueError("mac_like needs a positive top-k byte count and resident time per token")
    return StorageModel(bandwidth=topk_bytes_per_token / (ratio * resident_seconds_per_token),
                        latency=latency, queue_depth=queue_depth)


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


MAX_LATENCY = 1.0  # s: a read's latency past this is a typo (100s for 100us), not a device
_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?"  # 50, 1.5, .5, 1e3, 1e-4


def parse_storage(spec: "str | StorageModel | None") -> StorageModel | None:
    """``None``/"" (no simulation), a ``StorageModel``, or ``"BANDWIDTH[,latency=T][,depth=N]"``
    where BANDWIDTH is ``50MB/s``, ``1e3MB/s``, ... or ``mac-ssd`` (7 GB/s, 80 us, which the
    settings after it may change: ``mac-ssd,depth=2``) and T is ``80us``, ``0.1ms`` or seconds
    (``1e-4``)."""
    if spec is None or isinstance(spec, StorageModel):
        return spec
    text = spec.strip().lower()
    if text in ("", "none", "off"):
        return None
    parts = [p.strip() for p in text.split(",")]
    if parts[0] == "mac-ssd":
        bandwidth, latency = MAC_SSD_BANDWIDTH, MAC_SSD_LATENCY
    else:
        m = re.fullmatch(rf"({_NUMBER})\s*([kmg]i?)?b(?:/s)?", parts[0])
        if not m:
            raise ValueError(f"storage {spec!r}: expected a bandwidth such as '50MB/s' or "
                             "'mac-ssd' first")
        bandwidth, latency = float(m.group(1)) * _UNITS[m.group(2) or ""], 0.0
    depth = 8
    keys = [p.partition("=")[0] for p in parts[1:]]
    if len(set(keys)) < len(keys):
        raise ValueError(f"storage {spec!r}: a setting given twice")
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key == "latency":
            lm = re.fullmatch(rf"({_NUMBER})\s*(us|ms|s)?", value)
            if not lm:
                raise ValueError(f"storage {spec!r}: a latency such as 'latency=80us', '0.1ms' "
                                 f"or '1e-4' (seconds), not {value!r}")
            latency = float(lm.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[lm.group(2)]
            if latency > MAX_LATENCY:
                raise ValueError(f"storage {spec!r}: a latency of {latency:g} s per read is no "
                                 f"device's (at most {MAX_LATENCY:g} s; did you mean us or ms?)")
        elif key == "depth":
            if not re.fullmatch(r"[0-9]+", value):
                raise ValueError(f"storage {spec!r}: a queue depth such as 'depth=8', not {value!r}")
            depth = int(value)
        else:
            raise ValueError(f"storage {spec!r}: unknown setting {key!r} (latency, depth)")
    return StorageModel(bandwidth, latency, depth)


class ReadTicket:
    """A prefetch read's handle: ``cancel()`` when its layer ran without it, ``promote()`` when a
    layer now waits for it (it then goes at a demand read's priority)."""

    __slots__ = ("cancelled", "urgent")

    def __init__(self) -> None:
        self.cancelled = False
        self.urgent = False

    def cancel(self) -> None:
        self.cancelled = True

    def promote(self) -> None:
        self.urgent = True


class SimulatedDevice:
    """The shared device: ``transfer`` blocks the calling reader thread for as long as the
    modelled device takes to deliver the bytes, with demand reads ahead of prefetch reads."""

    def __init__(self, model: StorageModel, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self._clock, self._sleep = clock, sleep
        self._cond = threading.Condition()
        self._busy_until = 0.0  # when the bytes scheduled so far have all left the device
        self._demand_waiting = 0
        self._queue = threading.Semaphore(model.queue_depth)
        self.busy_seconds = 0.0  # time the device spent moving bytes
        self.demand_bytes = 0
        self.prefetch_bytes = 0
        self.cancelled_bytes = 0  # bytes of prefetch reads never delivered

    def transfer(self, nbytes: int, *, demand: bool = True, ticket: ReadTicket | None = None) -> None:
        """Wait until ``nbytes`` have been delivered. A prefetch read (``demand=False``) raises
        ``ReadCancelled`` when its ``ticket`` is cancelled before its last chunk was scheduled."""
        with self._queue:
            if demand:
                with self._cond:
                    self._demand_waiting += 1
            try:
                if self.model.latency:
                    self._sleep(self.model.latency)
                left = nbytes
                while left > 0:
                    n = left if demand else min(left, self.model.chunk_bytes)
                    self._wait_until(self._schedule(n, demand, ticket, left))
                    left -= n
            finally:
                if demand:
                    with self._cond:
                        self._demand_waiting -= 1
                        self._cond.notify_all()

    def _schedule(self, n: int, demand: bool, ticket: ReadTicket | None, left: int) -> float:
        """Book ``n`` bytes on the device's timeline; returns when they are delivered."""
        with self._cond:
            while not demand:  # a prefetch chunk waits for an idle device, demand reads first
                urgent = ticket is not None and ticket.urgent
                if ticket is not None and ticket.cancelled and not urgent:
                    self.cancelled_bytes += left
                    raise ReadCancelled()
                wait = self._busy_until - self._clock()
                if urgent or (not self._demand_waiting and wait <= 0):
                    break
                self._cond.wait(min(max(wait, 1e-4), 5e-4))
            start = max(self._clock(), self._busy_until)
            self._busy_until = start + n / self.model.bandwidth
            self.busy_seconds += n / self.model.bandwidth
            if demand:
                self.demand_bytes += n
            else:
                self.prefetch_bytes += n
            return self._busy_until

    def count_cancelled(self, nbytes: int) -> None:
        """Bytes of a cancelled prefetch read that were never sent to the device (the later
        commands of a record whose first one was cancelled)."""
        with self._cond:
            self.cancelled_bytes += nbytes

    def _wait_until(self, t: float) -> None:
        wait = t - self._clock()
        if wait > 0:
            self._sleep(wait)

    def backlog_seconds(self) -> float:
        """How long bytes already scheduled keep the device busy from now."""
        with self._cond:
            return max(0.0, self._busy_until - self._clock())
