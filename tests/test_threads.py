"""Two threads generating on one model: generations run one at a time (a lock on the model's
runtime, held across ``stream_generate``'s yields), each with exactly the text a lone generation
gives; a thread that did not load the model can generate (MLX streams are per thread)."""

from __future__ import annotations

import threading

import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of

PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "The quick brown fox jumps over"]
OPTIONS = dict(expert_residency=0.25, exact=True, prefetch_layers=1, prefetch_cost_aware=False,
               progress=False)


@pytest.fixture()
def model_and_lone(deep_models):
    """A model with tiny pools and prefetch on, and each prompt's text from a lone generation."""
    model, tok = hobbit_mlx.load(deep_models("mixtral"), **OPTIONS)
    lone = [hobbit_mlx.generate(model, tok, p, max_tokens=16) for p in PROMPTS]
    assert lone[0] != lone[1]
    return model, tok, lone


def _in_thread(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def _streamed(model, tok, prompt) -> str:
    return "".join(r.text for r in hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=16))


def test_two_threads_generating_at_once_each_get_the_lone_text(model_and_lone):
    model, tok, lone = model_and_lone
    start = threading.Barrier(2)
    texts: dict = {0: [], 1: []}
    errors: list = []

    def work(i):
        try:
            start.wait()
            for _ in range(2):  # generate and stream_generate, each thread in turn
                texts[i].append(hobbit_mlx.generate(model, tok, PROMPTS[i], max_tokens=16))
                texts[i].append(_streamed(model, tok, PROMPTS[i]))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [_in_thread(lambda i=i: work(i)) for i in (0, 1)]
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a generation deadlocked"
    assert not errors, errors
    assert texts == {0: [lone[0]] * 4, 1: [lone[1]] * 4}
    stats = hobbit_mlx.offload_stats(model)
    assert stats["expert_requests"] == (stats["hits_high"] + stats["hits_low"] + stats["misses_high"]
                                        + stats["misses_low"] + stats["skipped"])
    assert not runtime_of(model).cache._pins


def test_an_open_stream_holds_the_model_until_it_is_closed(model_and_lone):
    model, tok, lone = model_and_lone
    stream = hobbit_mlx.stream_generate(model, tok, PROMPTS[0], max_tokens=16)
    first = next(stream).text
    # the same thread cannot wait for its own open stream
    with pytest.raises(RuntimeError, match="still running in this thread"):
        hobbit_mlx.generate(model, tok, PROMPTS[1], max_tokens=16)
    other: list = []
    waiter = _in_thread(lambda: other.append(hobbit_mlx.generate(model, tok, PROMPTS[1],
                                                                 max_tokens=16)))
    # the stream goes on while the other thread waits, and gives the lone text
    rest = "".join(r.text for r in stream)
    assert first + rest == lone[0]
    waiter.join(120)
    assert other == [lone[1]]

    # a stream closed early lets go of the model, in this thread or another
    stream = hobbit_mlx.stream_generate(model, tok, PROMPTS[1], max_tokens=16)
    next(stream)
    stream.close()
    assert hobbit_mlx.generate(model, tok, PROMPTS[0], max_tokens=16) == lone[0]
    stream = hobbit_mlx.stream_generate(model, tok, PROMPTS[1], max_tokens=16)
    next(stream)
    del stream  # closed by the garbage collector
    other.clear()
    _in_thread(lambda: other.append(_streamed(model, tok, PROMPTS[1]))).join(120)
    assert other == [lone[1]]


def test_a_failed_generation_lets_go_of_the_model(model_and_lone, monkeypatch):
    model, tok, lone = model_and_lone
    rt = runtime_of(model)
    new_sequence = rt.new_sequence

    def fails(*args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(rt, "new_sequence", fails)
    with pytest.raises(OSError, match="injected"):
        hobbit_mlx.generate(model, tok, PROMPTS[0], max_tokens=16)
    with pytest.raises(OSError, match="injected"):
        next(hobbit_mlx.stream_generate(model, tok, PROMPTS[0], max_tokens=16))
    monkeypatch.setattr(rt, "new_sequence", new_sequence)
    out: list = []
    _in_thread(lambda: out.append(hobbit_mlx.generate(model, tok, PROMPTS[0], max_tokens=16))).join(120)
    assert out == [lone[0]]
