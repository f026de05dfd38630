"""Storage faults injected at the reader's ``preadv`` (EIO, or a read that stalls): one clear
error for a demand read, a retry for a prefetch read, a cache left consistent (every slot
resident, free, or nothing; no pin or hold left behind), the next generation exact once the
fault is gone, and ``close()`` that returns once a stalled read is let go."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.store import StoreError
from hobbit_mlx.testing.faults import StoreFaults

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def _consistent(rt) -> None:
    """Every slot holds the expert the cache says, or is free; nothing is pinned."""
    cache = rt.cache
    for ps in cache.pools:
        resident = [s for s, k in enumerate(ps.key_of) if k is not None]
        assert ps.resident == len(resident)
        assert sorted(resident + ps.free) == list(range(ps.pool.slots)), "a slot was lost"
        for s in resident:
            assert cache.slot(ps.key_of[s]) == s
    assert not cache._pins


@pytest.fixture()
def exact_text(deep_models):
    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 progress=False)
    return hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)


@pytest.mark.parametrize("threads", [True, False], ids=["reader-threads", "inline-reads"])
def test_eio_on_a_demand_read_is_one_clear_error_and_the_next_generation_works(
        deep_models, monkeypatch, exact_text, threads):
    import hobbit_mlx.fetch as fetch_module

    # reads in threads, or on the model's thread (as on a warm page cache)
    monkeypatch.setattr(fetch_module, "INLINE_READ_S", 0.0 if threads else float("inf"))
    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 progress=False)
    rt = runtime_of(model)
    faults = StoreFaults(monkeypatch, rt)
    layer_2 = []

    def second_read_of_layer_2(key, prefetch):  # (its call's other reads succeed)
        layer_2.append(key[0] == 2)
        return key[0] == 2 and sum(layer_2) == 2

    faults.fail(second_read_of_layer_2, times=1)
    with pytest.raises(StoreError, match=r"(experts|safetensors).*Input/output error"):
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
    assert len(faults.failed) == 1
    _consistent(rt)
    faults.fail(None)
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12) == exact_text
    _consistent(rt)
    assert not rt.cache._holds


def test_eio_on_prefetch_reads_is_retried_on_demand(deep_models, monkeypatch, exact_text):
    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 prefetch_layers=1, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    faults = StoreFaults(monkeypatch, rt)
    faults.fail(lambda key, prefetch: prefetch)  # every prefetch read fails
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12) == exact_text
    rt.wait_idle()
    assert faults.failed and all(prefetch for _, prefetch in faults.failed)
    _consistent(rt)
    assert not rt.cache._holds
    assert rt.stats.prefetch_used == 0 or rt.stats.misses_high > 0


def _held_and_failing_prefetch(deep_models, monkeypatch) -> tuple:
    """Exact mode with prefetch one layer ahead, every prefetch read held until its layer
    decides on it and then failing: (model, tokenizer, runtime, faults, reads that timed out)."""
    from hobbit_mlx.testing.faults import hold_prefetch_reads

    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 prefetch_layers=1, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    faults = StoreFaults(monkeypatch, rt)
    timed_out = hold_prefetch_reads(rt)
    faults.fail(lambda key, prefetch: prefetch)
    return model, tok, rt, faults, timed_out


def test_eio_on_a_prefetch_read_a_layer_waits_for_is_read_again_on_demand(deep_models, monkeypatch,
                                                                          exact_text):
    """The layer asks for a prefetch read still in flight (held until then), which then fails:
    the layer reads the expert itself, into a slot it makes resident (no slot lost)."""
    import hobbit_mlx.offload as offload

    model, tok, rt, faults, timed_out = _held_and_failing_prefetch(deep_models, monkeypatch)
    read_now, read_again = offload.Fetch._read_now, []

    def spy(fetch, key, slot, commit=True):
        if commit:  # (only a waited-on prefetch read that failed is read again with a commit)
            read_again.append(key)
        return read_now(fetch, key, slot, commit)

    monkeypatch.setattr(offload.Fetch, "_read_now", spy)
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12) == exact_text
    rt.wait_idle()
    assert not timed_out
    assert faults.failed and read_again  # layers waited on reads that failed, then read them
    assert rt.stats.hits_in_flight == 0  # (each counts as the miss it was)
    _consistent(rt)
    assert not rt.cache._holds
    resident = {k for ps in rt.cache.pools for k in ps.key_of if k is not None}
    assert resident == set(rt.cache.keys())


@pytest.mark.parametrize("prompt", ["Hello, how are you?", "for i in range(10):\n    print(i)\n"])
def test_a_failed_guess_is_read_again_when_later_guesses_hold_every_free_slot(deep_models,
                                                                             monkeypatch, prompt):
    """When a guess the layer waits for fails, its slot goes back, and the next layer's guesses
    (issued while this layer computes) may take it: the demand read again needs a slot, with
    this call's experts pinned in all the others. The guesses give theirs up (these prompts
    ended in PoolBudgetError: 'no slot for expert')."""
    exact, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 progress=False)
    want = hobbit_mlx.generate(exact, tok, prompt, max_tokens=12)
    model, tok, rt, faults, timed_out = _held_and_failing_prefetch(deep_models, monkeypatch)
    assert hobbit_mlx.generate(model, tok, prompt, max_tokens=12) == want
    rt.wait_idle()
    assert faults.failed and not timed_out
    _consistent(rt)
    assert not rt.cache._holds


def test_close_returns_once_a_stalled_prefetch_read_is_let_go(deep_models, monkeypatch):
    model, _ = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                               prefetch_layers=1, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    faults = StoreFaults(monkeypatch, rt)
    mx.eval(model(mx.array([[3, 5, 7, 11, 13, 17, 19, 23, 29]])))
    faults.stall(lambda key, prefetch: prefetch)
    switch = rt.layers[1]  # predict two experts of layer 1 that are not resident: read ahead
    missing = [e for e in range(switch.layer.num_experts) if (1, e, "high") not in rt.cache][:2]
    rt.prefetcher._issue(switch, 1, np.array([missing]), np.ones((1, 2), np.float32))
    assert faults.stalled.wait(10)
    done = threading.Event()
    closer = threading.Thread(target=lambda: (rt.close(), done.set()), daemon=True)
    closer.start()
    assert not done.wait(0.2), "close() returned while a read was still writing a slot"
    faults.release()
    assert done.wait(60), "close() deadlocked on a stalled read"
    # (its reader and prefetch threads; a server worker's thread may live on in this process)
    assert not [t for t in threading.enumerate()
                if t.name.startswith(("hobbit-io", "hobbit-prefetch"))]


def test_a_model_without_its_tokenizer_files_is_refused_at_load(tiny_factory, tmp_path):
    """transformers loads an empty tokenizer from a directory without its files, which turns
    every prompt into nothing: load names the missing files instead."""
    import shutil

    from convert import convert

    src, _ = tiny_factory("qwen3_moe")
    bare = tmp_path / "mlx"
    shutil.copytree(src, bare)
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt",
                                                         "chat_template.jinja"):
            f.unlink()
    dst = convert(bare, tmp_path / "hobbit", progress=False)
    with pytest.raises(StoreError, match="tokenizer"):
        hobbit_mlx.load(dst, expert_residency=0.5, progress=False)


def test_a_second_ctrl_c_ends_the_wait_for_reads_in_flight():
    """After a first Ctrl-C the fetch waits for its other demand reads so that no slot is lost;
    a second Ctrl-C ends that wait (it was swallowed: a slow device, or a simulated latency of
    100 s, could not be interrupted). Other errors of those reads are still passed over."""
    from types import SimpleNamespace

    from hobbit_mlx.fetch import Fetch

    landed = []

    def land(key, fut, slot):
        if fut == "error":
            raise OSError("a read failed")
        if fut == "interrupt":
            raise KeyboardInterrupt
        landed.append(key)

    fetch = SimpleNamespace(_land=land)
    keys = ["a", "b", "c", "d"]
    Fetch._settle(fetch, keys, [(0, "error", 1), (1, "ok", 2), (2, None, None)])
    assert landed == ["b"]  # (the failed one passed over; a prefetch read is not this fetch's)
    with pytest.raises(KeyboardInterrupt):
        Fetch._settle(fetch, keys, [(0, "interrupt", 1), (3, "ok", 4)])
    assert landed == ["b"]
