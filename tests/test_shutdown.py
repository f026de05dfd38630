"""Shutdown: ``close()`` returns only once every reader and prefetch thread has ended, also with
a read still running, and a process that loads and closes many models keeps its thread count."""

from __future__ import annotations

import threading

import mlx.core as mx

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.faults import StoreFaults


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("hobbit-io", "hobbit-prefetch"))]


def _load_and_run(dst):
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, prefetch_layers=1,
                               prefetch_cost_aware=False, progress=False)
    mx.eval(model(mx.array([[3, 5, 7, 11, 13, 17, 19, 23, 29]])))  # readers and prefetchers run
    return runtime_of(model)


def test_close_waits_for_a_read_in_flight_and_ends_every_reader_thread(deep_models, monkeypatch):
    rt = _load_and_run(deep_models("mixtral"))
    assert _reader_threads(), "the forward started reader threads"
    faults = StoreFaults(monkeypatch, rt)
    faults.stall(lambda key, prefetch: True)
    layer = rt.manifest.layers[0]
    key = next((0, e, "high") for e in range(layer.num_experts) if (0, e, "high") not in rt.cache)
    slot = rt.cache.reserve(key)
    read = rt.reader.submit_into(layer.precisions["high"], key[1], rt.cache.pool_for(0, "high"), slot)
    assert faults.stalled.wait(10)
    threading.Timer(0.3, faults.release).start()
    rt.close()
    assert read.done(), "close() returned while a read was still writing into a pool"
    assert _reader_threads() == []


def test_loading_and_closing_twenty_models_keeps_the_thread_count(deep_models):
    dst = deep_models("mixtral")
    _load_and_run(dst).close()  # (a first load may start threads that live on: MLX's own)
    before = threading.active_count()
    for _ in range(20):
        _load_and_run(dst).close()
        assert _reader_threads() == []
    assert threading.active_count() <= before
