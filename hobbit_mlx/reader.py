"""Reading expert records from the store: a pool of ``pread`` workers writing into pool slots.

Reads run in threads (``os.preadv`` releases the GIL), so several experts of one layer are read in
parallel and a background prefetcher can read while the model computes. The threads only move
bytes: every MLX call stays on the thread that runs the model. Each record's CRC32 is
checked the first time it is read in this process (``verify="first"``), and again once its file
has been written since, so a corrupt store fails with a clear error instead of producing garbage.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .pools import SlotPool, convert_into
from .storage import ReadCancelled, ReadTicket, SimulatedDevice, StorageModel
from .store import Manifest, PrecisionEntry, Record, StoreError, checksum_error


# macOS has no O_DIRECT: ``fcntl(fd, F_NOCACHE, 1)`` keeps what a descriptor reads out of the
# unified buffer cache (48 in <sys/fcntl.h>; Python's fcntl module names it only in recent versions).
F_NOCACHE = 48


def page_cache_bypass() -> str | None:
    """How this platform reads past the OS page cache: "O_DIRECT", "F_NOCACHE", or None."""
    if hasattr(os, "O_DIRECT"):
        return "O_DIRECT"
    if sys.platform == "darwin":
        return "F_NOCACHE"
    return None


def can_drop_page_cache() -> bool:
    """Whether a store's cached pages can be dropped without privileges (``posix_fadvise``;
    macOS has none: ``sudo purge`` drops the whole cache)."""
    return hasattr(os, "posix_fadvise")


def _close_fds(fds: list[int]) -> None:
    """Close a reader's files, emptying its list in place (what the finalizer holds)."""
    while fds:
        os.close(fds.pop())


class RecordReader:
    """Reads records of one hobbit model's expert store; thread-safe."""

    def __init__(self, model_dir: str | Path, manifest: Manifest, *, workers: int = 8,
                 verify: str = "first", direct: bool = False, storage: StorageModel | None = None,
                 parallel_runs: bool | str = "auto"):
        """``storage``: a simulated device every read also waits for (benchmarks of a Mac's SSD
        on a machine whose page cache makes reads free); None reads at the real device's speed.
        ``parallel_runs``: a slow record's runs of spans are read at once (True), one after
        another (False), or whichever this device turns out to read faster ("auto"; see
        ``_read_record`` and ``RunModeTrial``)."""
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', not {verify!r}")
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.verify = verify
        self._verified: set[tuple[int, int, int]] = set()
        self._stamps: list[tuple[int, int]] = []  # each file's (mtime, size) when verified
        self._lock = threading.Lock()
        self._fds: list[int] = []
        # A model dropped without close() still closes its files (one per store file: a process
        # loading model after model ran out of descriptors after ~200 loads)
        weakref.finalize(self, _close_fds, self._fds)
        # ``direct``: reads bypass the page cache, by O_DIRECT (aligned reads, see _read_span)
        # or, on macOS, F_NOCACHE; ``self.bypass`` says which one this platform gave (None: none).
        self.bypass = page_cache_bypass() if direct else None
        self.direct = self.bypass == "O_DIRECT"
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        for rel in manifest.files:
            path = self.model_dir / rel
            try:
                self._fds.append(os.open(path, flags))
                self._stamps.append(_stamp(self._fds[-1]))
                if self.bypass == "F_NOCACHE":
                    import fcntl
                    fcntl.fcntl(self._fds[-1], getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
            except OSError as e:
                self.close()
                raise StoreError(f"{path}: cannot open expert store file ({e.strerror})") from None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hobbit-io")
        # Prefetch reads queue apart, so a read the compute waits for never waits behind them.
        self._background_workers = max(1, workers // 2)
        self.background_pool = ThreadPoolExecutor(max_workers=self._background_workers,
                                                  thread_name_prefix="hobbit-prefetch")
        # A record's later runs of spans, read beside its first (a pool of their own: a read
        # waits for them, so they must never queue behind reads).
        if parallel_runs not in (True, False, "auto"):
            raise ValueError(f"parallel_runs must be True, False or 'auto', not {parallel_runs!r}")
        self.parallel_runs = parallel_runs
        self.run_mode_trial = RunModeTrial()
        self.run_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hobbit-run")
        self.runs_per_record = _runs_per_record(manifest)
        self.bytes_read = 0
        self.read_seconds = 1e-3  # moving average of one read_into, until measured
        self._byte_seconds = 1e-9  # moving average of storage's seconds per byte, until measured
        # storage's busy stretch (reads in flight > 0): its start, reads still in it, bytes done
        self._busy_start, self._busy_reads, self._busy_bytes, self._busy_done = 0.0, 0, 0, 0
        self.device = SimulatedDevice(storage) if storage is not None else None
        self._background_inflight = 0

    def close(self) -> None:
        for name in ("background_pool", "pool", "run_pool"):
            if getattr(self, name, None) is not None:
                getattr(self, name).shutdown(wait=True)
                setattr(self, name, None)
        _close_fds(self._fds)

    def drop_page_cache(self) -> bool:
        """Ask the OS to forget the store's cached pages, for cold-storage measurements. False
        where it cannot (macOS: only ``sudo purge``, for the whole cache): the pages cached
        before then still read warm, so a cold measurement must say so."""
        if not can_drop_page_cache():
            return False
        for fd in self._fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True

    def _read_span(self, file_idx: int, offset: int, length: int) -> np.ndarray:
        # O_DIRECT needs an aligned buffer, offset and length: a span that does not start on a
        # 4 KiB boundary (a record inside a source checkpoint) is read from the boundary below.
        lead = offset % 4096 if self.direct else 0
        want = (lead + length + 4095) // 4096 * 4096 if self.direct else length
        buf = _aligned_empty(want) if self.direct else np.empty(length, dtype=np.uint8)
        view = memoryview(buf)
        fd = self._fds[file_idx]
        got = 0
        while got < lead + length:
            n = self._pread(file_idx, fd, [view[got:want]], offset - lead + got)
            if n <= 0:
                raise self._truncated(file_idx, offset - lead + got, offset, length)
            got += n
        return buf[lead:lead + length]

    def read_bytes(self, record: Record) -> list[np.ndarray]:
        """Read every span of a record, checking CRCs as configured."""
        out = []
        for span, crc in zip(record.spans, record.crc32):
            if self.device is not None:
                self.device.transfer(span[2])
            buf = self._read_span(*span)
            self._check(span, crc, [buf])
            out.append(buf)
        with self._lock:
            self.bytes_read += record.nbytes
        return out

    def read_into(self, entry: PrecisionEntry, expert: int, pool: "SlotPool", slot: int,
                  background: bool = False, ticket: ReadTicket | None = None) -> int:
        """Read one expert straight into a pool slot's memory; returns the bytes read.

        ``background``: a prefetch read: behind demand reads on a simulated device, and, once its
        ``ticket`` is cancelled, stopped there before its bytes are written (``ReadCancelled``).

        Bytes whose stored and resident dtypes agree are read into the slot itself, with one
        ``preadv`` per run of spans that lie back to back in one file; the rest go through a scratch buffer and are converted with numpy. Only bytes
        move here: no MLX call runs on a reader thread (MLX streams are thread-local).
        """
        record = entry.records[expert]
        t0 = time.perf_counter()
        with self._lock:
            if self._busy_reads == 0:
                self._busy_start, self._busy_bytes, self._busy_done = t0, 0, 0
            self._busy_reads += 1
        try:
            self._read_record(record, pool, slot, background, ticket)
        except BaseException:
            with self._lock:
                self._busy_reads -= 1
            raise
        with self._lock:
            self.bytes_read += record.nbytes
            # how long one read takes lately: decides whether compute waits on reads at all
            now = time.perf_counter()
            self.read_seconds += 0.1 * (now - t0 - self.read_seconds)
            self._busy_reads -= 1
            self._busy_bytes += record.nbytes
            self._busy_done += 1
            if self._busy_reads == 0 or self._busy_done >= BUSY_WINDOW_READS:
                # bytes over the time storage was busy: reads that overlap share that time, so
                # a batch read in parallel does not count each read's wait as its own cost
                per_byte = (now - self._busy_start) / max(1, self._busy_bytes)
                self._byte_seconds += 0.1 * (per_byte - self._byte_seconds)
                self._busy_start, self._busy_bytes, self._busy_done = now, 0, 0
        return record.nbytes

    def _read_record(self, record, pool: "SlotPool", slot: int, background: bool,
                     ticket: ReadTicket | None) -> None:
        """The bytes of one record into its slot (``read_into`` times and counts around it).

        Spans that follow each other in one file are read with one ``preadv``: one command to
        the device. A record read in place from a downloaded checkpoint has several (an expert's
        rows of each stacked tensor: 9 for a SwitchGLU's weights, scales and biases); one after
        another, each command would wait out the device's latency in turn, so once reads are
        slow enough that a thread hand-off is cheap beside them they may go out together: as
        ``parallel_runs`` says, or as the demand reads of its trial measured (``RunModeTrial``;
        a prefetch read, slowed by demand reads going first, does not take part)."""
        if self.device is None and ticket is not None and ticket.cancelled and not ticket.urgent:
            raise ReadCancelled()
        runs = adjacent_runs(record.spans)
        slow = len(runs) > 1 and self.read_seconds >= PARALLEL_RUNS_MIN_S
        mode = self.runs_together()
        trying = slow and mode is None and not background
        together = slow and (self.run_mode_trial.pick() if trying else bool(mode))
        t0 = time.perf_counter() if trying else 0.0
        if together:
            others = [self.run_pool.submit(self._read_run, record, run, pool, slot, background,
                                           ticket) for run in runs[1:]]
            try:
                self._read_run(record, runs[0], pool, slot, background, ticket)
            finally:
                errors = [f.exception() for f in others]  # (all land before the slot goes back)
            for error in errors:
                if error is not None:
                    raise error
        else:
            for i, run in enumerate(runs):
                try:
                    self._read_run(record, run, pool, slot, background, ticket)
                except ReadCancelled:
                    if self.device is not None:  # (the runs not sent were never delivered)
                        self.device.count_cancelled(sum(record.spans[j][2] for later in runs[i + 1:]
                                                        for j in later))
                    raise
        if trying:
            self.run_mode_trial.record(together, (time.perf_counter() - t0) / record.nbytes)

    def runs_together(self) -> bool | None:
        """Whether a slow record sends its runs at once: as ``parallel_runs`` says, or as the
        trial chose (None: "auto" and still trying both)."""
        return self.run_mode_trial.choice if self.parallel_runs == "auto" else self.parallel_runs

    def _read_run(self, record, run: list[int], pool: "SlotPool", slot: int, background: bool,
                  ticket: ReadTicket | None) -> None:
        """One run of a record's spans (back to back in one file) into the slot: one command."""
        file_idx, offset = record.spans[run[0]][:2]
        total = sum(record.spans[i][2] for i in run)
        if self.device is not None:
            self.device.transfer(total, demand=not background, ticket=ticket)
        per_span, pieces = [], []
        for span_idx in run:
            mine, converts = self._slot_pieces(pool, slot, span_idx, record.spans[span_idx][2])
            per_span.append((span_idx, mine, converts))
            pieces += mine
        if self.direct:  # O_DIRECT wants an aligned buffer: read there, then copy out
            buf = self._read_span(file_idx, offset, total)
            at = 0
            for p in pieces:
                p[:] = buf[at:at + len(p)]
                at += len(p)
        else:
            self._preadv(file_idx, offset, total, pieces)
        for span_idx, mine, converts in per_span:
            self._check(record.spans[span_idx], record.crc32[span_idx], mine)
            for conv, src, dst in converts:
                if conv is None:
                    dst[:] = src
                else:
                    convert_into(conv, src, dst)

    def _slot_pieces(self, pool: "SlotPool", slot: int, span_idx: int,
                     length: int) -> tuple[list[np.ndarray], list[tuple]]:
        """The buffers one span is read into (slot memory, or scratch for gaps and conversions),
        and the conversions that then move scratch bytes into the slot."""
        pieces, converts = [], []
        for name, nbytes, conv in pool.read_plan(span_idx, length):
            if name is None:  # a gap between tensors
                pieces.append(np.empty(nbytes, dtype=np.uint8))
            elif conv is None and not self.direct:
                pieces.append(pool.slot_bytes(name, slot))
            else:  # through a scratch buffer (converted, or O_DIRECT's aligned read)
                scratch = np.empty(nbytes, dtype=np.uint8)
                pieces.append(scratch)
                converts.append((conv, scratch, pool.slot_bytes(name, slot)))
        return pieces, converts

    def _preadv(self, file_idx: int, offset: int, length: int, pieces: list[np.ndarray]) -> None:
        fd = self._fds[file_idx]
        views = [memoryview(p) for p in pieces]
        got = 0
        while got < length:
            n = self._pread(file_idx, fd, views[:IOV_BATCH], offset + got)
            if n <= 0:
                raise self._truncated(file_idx, offset + got, offset, length)
            got += n
            while views and n >= len(views[0]):  # drop the buffers filled, trim the next one
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def _truncated(self, file_idx: int, at: int, offset: int, length: int) -> StoreError:
        path = self.model_dir / self.manifest.files[file_idx]
        return StoreError(f"{path}: unexpected end of file at byte {at} (record needs "
                          f"{offset}..{offset + length}); the store is truncated")

    def _pread(self, file_idx: int, fd: int, buffers: list, offset: int) -> int:
        """``os.preadv``; an I/O error names the store file and the byte it failed at."""
        try:
            return getattr(os, "preadv", _pread_first)(fd, buffers, offset)
        except OSError as e:
            path = self.model_dir / self.manifest.files[file_idx]
            raise StoreError(f"{path}: reading byte {offset} failed ({e.strerror or e}); the "
                             "expert store's device may be failing") from e

    def _check(self, span: tuple, crc: int, pieces: list[np.ndarray]) -> None:
        if self.verify == "never" or (self.verify == "first" and span in self._verified
                                      and not self._changed(span[0])):
            return
        value = 0
        for p in pieces:
            value = zlib.crc32(p, value)
        if value != crc:
            raise checksum_error(self.model_dir, self.manifest, span)
        with self._lock:
            self._verified.add(span)

    def _changed(self, file_idx: int) -> bool:
        """Whether a file was written since its spans were verified (one ``fstat``, beside a
        read): its spans are then checked again. A store copied over in place, or an in-place
        source checkpoint rewritten, gave garbage where a span verified once was read again."""
        stamp = _stamp(self._fds[file_idx])
        if stamp == self._stamps[file_idx]:
            return False
        with self._lock:
            self._stamps[file_idx] = stamp
            self._verified = {s for s in self._verified if s[0] != file_idx}
        return True

    def submit_into(self, entry: PrecisionEntry, expert: int, pool: "SlotPool", slot: int,
                    background: bool = False, ticket: ReadTicket | None = None) -> Future:
        """``read_into`` on a worker thread; ``background`` (prefetch) reads use their own queue."""
        if not background:
            return self.pool.submit(self.read_into, entry, expert, pool, slot)
        with self._lock:
            self._background_inflight += 1
        fut = self.background_pool.submit(self.read_into, entry, expert, pool, slot, True, ticket)
        fut.add_done_callback(self._background_done)
        return fut

    def _background_done(self, _fut: Future) -> None:
        with self._lock:
            self._background_inflight -= 1

    def seconds_per_byte(self) -> float:
        """What one more byte costs the device: 1 / bandwidth when simulated, else measured
        (lately: bytes read over the time reads were in flight, overlapping reads sharing it)."""
        if self.device is not None:
            return 1.0 / self.device.model.bandwidth
        return self._byte_seconds

    def latency_seconds(self, reads: int) -> float:
        """The wait before the first byte that ``reads`` parallel reads add beyond their bytes:
        the simulated device's latency once per queue-depth batch of commands (a record read in
        place is one command per run of spans); a real device's latency is already inside its
        measured seconds per byte."""
        if self.device is None or reads <= 0:
            return 0.0
        model = self.device.model
        together = bool(self.runs_together())  # (until the trial decides: in turn)
        commands = reads * (self.runs_per_record if together else 1)
        batches = -(-commands // model.queue_depth)
        if not together:  # each record's runs wait out the latency in turn
            batches *= self.runs_per_record
        return model.latency * batches

    def backlog_seconds(self) -> float:
        """How long the reads already queued keep storage busy: the simulated device's booked
        time, else the prefetch reads in flight x the measured time of one read per thread."""
        if self.device is not None:
            return self.device.backlog_seconds()
        return self._background_inflight * self.read_seconds / self._background_workers


IOV_BATCH = 512  # buffers per preadv call (the OS allows at least 1024)

# A record's runs are read at once only when one read takes this long: each thread hand-off
# costs ~30 us on a busy CPU, which doubled a 2.5 MB record's read from a warm page cache (0.3 ms;
# bench/inplace_read.py), and bought nothing read cold from this machine's disk (~2 ms).
PARALLEL_RUNS_MIN_S = 1e-3
BUSY_WINDOW_READS = 16  # storage never idle (a long prompt, prefetch): measure every this many reads


def _stamp(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_mtime_ns, st.st_size


def _pread_first(fd: int, buffers: list, offset: int) -> int:
    """``preadv`` where the Python build has none: the first buffer only (a short read: the
    caller reads on from where it stopped), through one copy."""
    data = os.pread(fd, buffers[0].nbytes, offset)
    buffers[0].cast("B")[:len(data)] = data
    return len(data)


def adjacent_runs(spans) -> list[list[int]]:
    """Span indices grouped into runs that lie back to back in one file, in record order."""
    runs: list[list[int]] = []
    end = None
    for i, (file_idx, offset, length) in enumerate(spans):
        if runs and end == (file_idx, offset):
            runs[-1].append(i)
        else:
            runs.append([i])
        end = (file_idx, offset + length)
    return runs


def _aligned_empty(length: int, align: int = 4096) -> np.ndarray:
    """A uint8 buffer whose address is a multiple of ``align`` (for O_DIRECT)."""
    raw = np.empty(length + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + length]


class RunModeTrial:
    """Whether a slow record's runs go out at once or in turn, measured on this device: the first
    ``2 * trials`` slow reads alternate between the two, then the one with the lower mean
    seconds per byte is kept. Sending them at once saves the latency of every command but the
    first on an SSD that serves commands in parallel; the thread hand-offs cost more where
    latency is small (this machine's disk, a warm page cache: ``bench/inplace_read.py``)."""

    def __init__(self, trials: int = 16) -> None:
        self.trials = trials
        self.choice: bool | None = None  # None: still trying both
        self._lock = threading.Lock()
        self._picked = 0
        self._sums = {True: [0.0, 0], False: [0.0, 0]}

    def pick(self) -> bool:
        with self._lock:
            if self.choice is not None:
                return self.choice
            self._picked += 1
            return self._picked % 2 == 1

    def record(self, together: bool, seconds_per_byte: float) -> None:
        with self._lock:
            if self.choice is not None:
                return
            total = self._sums[together]
            total[0] += seconds_per_byte
            total[1] += 1
            if min(n for _, n in self._sums.values()) >= self.trials:
                mean = {mode: s / n for mode, (s, n) in self._sums.items()}
                self.choice = mean[True] < mean[False]

    def measured(self) -> dict:
        """Mean seconds per byte of each mode so far, and the choice (for stats and tests)."""
        with self._lock:
            return {"together": self._mean(True), "in_turn": self._mean(False),
                    "choice": self.choice}

    def _mean(self, mode: bool) -> float | None:
        s, n = self._sums[mode]
        return s / n if n else None


def _runs_per_record(manifest: Manifest) -> int:
    """Commands one record read takes: runs of back-to-back spans in the first layer's 4-bit
    records (1 in our own copies; one per stacked tensor in a checkpoint read in place)."""
    if not manifest.layers:
        return 1
    records = manifest.layers[0].precisions["high"].records
    return max((len(adjacent_runs(r.spans)) for r in records[:8]), default=1)
