"""Storage that misbehaves on chosen reads, for tests: ``preadv`` calls of the expert store that
fail with EIO or stall until released, and prefetch reads held until their layer decides on them.

Faults are injected where the reader meets the operating system (``hobbit_mlx.reader.os``), so the
runtime's own error handling runs; each read is named by what it reads, ``(layer, expert,
precision)``, and whether a prefetch thread reads it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Callable

from .. import reader as reader_module


class StoreFaults:
    """Replace ``os`` in the reader module (use with pytest's ``monkeypatch``):
    ``fail(rule)`` makes every read ``rule(key, prefetch)`` accepts raise EIO; ``stall(rule)``
    blocks them until ``release()``. ``reads`` lists ``(key, prefetch)`` of every read seen."""

    def __init__(self, monkeypatch, rt) -> None:
        self._rt = rt
        self._spans: dict[tuple[int, int], tuple] = {}  # (fd, offset) -> (layer, expert, precision)
        fds = rt.reader._fds
        for layer in rt.manifest.layers:
            for precision, entry in layer.precisions.items():
                for expert, record in enumerate(entry.records):
                    for file_idx, offset, _ in record.spans:
                        self._spans[fds[file_idx], offset] = (layer.layer, expert, precision)
        self._fail: Callable | None = None
        self._fail_times: int | None = None
        self._lock = threading.Lock()
        self._stall: Callable | None = None
        self._released = threading.Event()
        self.stalled = threading.Event()  # set once a read is stalled
        self.reads: list[tuple] = []
        self.failed: list[tuple] = []
        monkeypatch.setattr(reader_module, "os", self)

    def __getattr__(self, name):  # everything but preadv is the real os
        return getattr(os, name)

    def fail(self, rule: Callable[[tuple, bool], bool] | None, times: int | None = None) -> None:
        """Reads ``rule`` accepts fail (the first ``times`` of them; None: all)."""
        with self._lock:
            self._fail, self._fail_times, self.failed = rule, times, []

    def stall(self, rule: Callable[[tuple, bool], bool] | None) -> None:
        self._released.clear()
        self._stall = rule

    def release(self) -> None:
        self._released.set()

    def preadv(self, fd, buffers, offset):
        key = self._spans.get((fd, offset))
        prefetch = threading.current_thread().name.startswith("hobbit-prefetch")
        if key is not None:
            with self._lock:
                self.reads.append((key, prefetch))
                fails = self._fail is not None and self._fail(key, prefetch) and (
                    self._fail_times is None or len(self.failed) < self._fail_times)
                if fails:
                    self.failed.append((key, prefetch))
            if self._stall is not None and self._stall(key, prefetch):
                self.stalled.set()
                self._released.wait(timeout=60)
            if fails:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.preadv(fd, buffers, offset)


def hold_prefetch_reads(rt, timeout: float = 30.0) -> list:
    """Every prefetch read waits, before it reads, until the layer it was issued for decides on
    it: promoted (the layer needs it and waits: a hit on a read in flight) or cancelled (the layer
    ran without it), or until the model's thread waits for every read in flight (a chunk that
    needs the slots prefetch holds). So the in-flight branch of a fetch is taken on every used
    prefetch, on any machine. Returns a list that collects reads that waited ``timeout`` in vain."""
    from ..storage import ReadCancelled

    read_into = rt.reader.read_into
    wait_idle = rt.prefetcher.wait_idle
    draining = threading.Event()
    timed_out = []

    def drain():
        draining.set()
        try:
            wait_idle()
        finally:
            draining.clear()

    def held(entry, expert, pool, slot, background=False, ticket=None):
        if background and ticket is not None:
            end = time.monotonic() + timeout
            while not (ticket.urgent or ticket.cancelled or draining.is_set()):
                if time.monotonic() > end:
                    timed_out.append(expert)
                    break
                time.sleep(0.0005)
            if ticket.cancelled and not ticket.urgent:
                raise ReadCancelled()
        return read_into(entry, expert, pool, slot, background, ticket)

    rt.reader.read_into = held
    rt.prefetcher.wait_idle = drain
    return timed_out
