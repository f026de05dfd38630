"""mlx-lm's keywords and uses that a script ported to hobbit_mlx brings: each works as in mlx-lm
within the budget, or is refused with a message (a user sweep found them crashing, ignored, or
over the budget)."""

from __future__ import annotations

import inspect
import threading

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

import hobbit_mlx
from hobbit_mlx.budget import ContextBudgetError
from hobbit_mlx.loader import runtime_of

PROMPT = "def fibonacci(n):"


def _no_eos(tokenizer):
    eos = sorted(tokenizer.eos_token_ids)

    def processor(tokens, logits):
        logits[:, eos] = -1e9
        return logits

    return processor


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    return dst


def test_a_rotating_cache_is_planned_for_its_window(tiny):
    """mlx-lm's max_kv_size keeps a window of the context: a decode far past what the budget
    holds of a whole context runs, within the budget (it stopped at the whole context's limit
    with the memory half used)."""
    budget = int(hobbit_mlx.footprint(tiny)["minimum_budget_bytes_exact"] * 1.1)
    model, tok = hobbit_mlx.load(tiny, memory_budget=budget, exact=True, progress=False)
    longest = runtime_of(model).plan.longest_context
    steps = dict(max_tokens=longest + 100, logits_processors=[_no_eos(tok)])
    n = sum(1 for _ in hobbit_mlx.stream_generate(model, tok, PROMPT, max_kv_size=64, **steps))
    assert n == longest + 100  # (counted: each response holds its logprobs)
    stats = hobbit_mlx.offload_stats(model)
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"]
    # (the scale: the whole context does not fit; last, as the error holds its KV cache)
    with pytest.raises(ContextBudgetError):
        hobbit_mlx.generate(model, tok, PROMPT, **steps)


def test_a_window_as_long_as_the_context_the_budget_holds_runs(tiny):
    """A rotating cache keeps its window less one before a call's token joins: counted as the
    full window plus the token, a window equal to the budget's context stopped at its 257th
    token, asking for a budget it did not need."""
    budget = hobbit_mlx.footprint(tiny)["minimum_budget_bytes"]
    model, tok = hobbit_mlx.load(tiny, memory_budget=budget, progress=False)
    window = runtime_of(model).plan.longest_context
    steps = dict(max_tokens=window + 40, logits_processors=[_no_eos(tok)])
    n = sum(1 for _ in hobbit_mlx.stream_generate(model, tok, PROMPT, max_kv_size=window, **steps))
    assert n == window + 40
    stats = hobbit_mlx.offload_stats(model)
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"]


def test_calls_from_a_second_thread_while_one_runs_are_refused(tiny):
    """Two threads in mlx-lm's own generate on one model crashed the process."""
    model, _ = hobbit_mlx.load(tiny, expert_residency=0.5, exact=True, progress=False)
    errors = []

    def call():
        try:
            model(mx.array([[1, 2, 3]]))
        except RuntimeError as e:
            errors.append(str(e))

    with runtime_of(model).one_caller():  # (this thread is in a call)
        t = threading.Thread(target=call)
        t.start()
        t.join()
    assert errors and "another thread" in errors[0]
    t = threading.Thread(target=call)  # once it has returned, another thread may call
    t.start()
    t.join()
    assert len(errors) == 1
    # between two steps of this thread's sequence (its KV cache alive), still refused: it was
    # the running sequence that died at its next step
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert len(errors) == 2
    model(mx.array([[4]]), cache=cache)  # (this sequence goes on)
    del cache  # the sequence is over: another thread may start one
    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert len(errors) == 2


def test_a_batch_of_sequences_is_refused(tiny):
    """mlx-lm's batch_generate ran at 1.3-2.2x the budget, which plans one sequence."""
    model, _ = hobbit_mlx.load(tiny, expert_residency=0.5, exact=True, progress=False)
    with pytest.raises(ValueError, match="2 sequences at once"):
        model(mx.array([[1, 2, 3], [4, 5, 6]]))


def test_input_embeddings_as_in_mlx_lm(tiny):
    """The model's call keeps its signature: mlx-lm reads it to allow input_embeddings."""
    model, tok = hobbit_mlx.load(tiny, expert_residency=0.5, exact=True, progress=False)
    assert "input_embeddings" in inspect.signature(model.__call__).parameters
    ids = mx.array(tok.encode(PROMPT))
    plain = hobbit_mlx.generate(model, tok, ids, max_tokens=8)
    embedded = hobbit_mlx.generate(model, tok, ids, max_tokens=8,
                                   input_embeddings=model.model.embed_tokens(ids))
    assert embedded == plain


def test_speculation_keywords(tiny):
    model, tok = hobbit_mlx.load(tiny, expert_residency=0.5, exact=True, progress=False)
    plain = hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
    # mlx-lm's num_draft_tokens sets K (it was a TypeError), 0 is off
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12, speculative=2,
                               num_draft_tokens=3) == plain
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12, speculative=0) == plain
    with pytest.raises(ValueError, match="max_kv_size"):  # (it was ignored)
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12, speculative=2, max_kv_size=64)
    calls = []
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=4, speculative=2,
                        prompt_progress_callback=lambda *a: calls.append(a))
    n = len(tok.encode(PROMPT))
    assert calls and calls[-1] == (n, n)


def test_prompt_progress_counts_the_whole_prompt_once_on_the_layer_major_path(tiny):
    """It reported the prompt but its last token, then started again at (0, 1)."""
    model, tok = hobbit_mlx.load(tiny, expert_residency=0.3, exact=True, progress=False)
    prompt = mx.array([(7 * i) % 400 + 3 for i in range(120)])
    calls = []
    hobbit_mlx.generate(model, tok, prompt, max_tokens=2, prefill_step_size=16,
                        prompt_progress_callback=lambda *a: calls.append(a))
    assert runtime_of(model).layer_major_prefill and len(calls) > 3
    assert all(total == 120 for _, total in calls), calls
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (120, 120), calls
    mlx_calls = []  # (mlx-lm's own loop on the same model: the same totals)
    mlx_lm.generate(model, tok, prompt, max_tokens=2, prefill_step_size=16,
                    prompt_progress_callback=lambda *a: mlx_calls.append(a))
    assert mlx_calls[-1] == calls[-1]


def test_a_rotating_window_within_the_kept_tokens_is_refused(tiny):
    model, tok = hobbit_mlx.load(tiny, expert_residency=0.5, exact=True, progress=False)
    with pytest.raises(ValueError, match="more than the 4 first tokens"):
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=4, max_kv_size=4)


def test_a_budget_in_bytes_may_be_a_float():
    from hobbit_mlx import LoadOptions

    LoadOptions(memory_budget=16e6).validate()  # (as before the type checks: 1.5e9 and the like)


@pytest.mark.parametrize("option, value", [
    ("prefill_step_size", 7.5), ("max_context", "1024"), ("t1", "0.4"), ("exact", "yes"),
    ("speculative_adaptive", "no"), ("tokenizer_config", "x"), ("dtype", "int8"),
    ("memory_budget", -5), ("max_context", True)])
def test_options_of_the_wrong_type_or_value_are_named(option, value):
    from hobbit_mlx import LoadOptions

    with pytest.raises(ValueError, match=option):
        LoadOptions(**{option: value}).validate()
