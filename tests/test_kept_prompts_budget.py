"""A prompt cache kept on disk, read back under the memory budget (its own file: the budget is
the process's, and a model another test module keeps alive would count in it)."""

from __future__ import annotations

import pytest

from hobbit_mlx.loader import REFERENCE_MODEL

pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").is_file(),
                                reason="reference model not bundled")


def test_a_file_read_back_stays_inside_the_memory_budget(tmp_path):
    """A long conversation's file read back while the pools are planned for a short one: the
    budget plans for its keys and values first (they came on top of pools grown back for
    the short conversation's context; without, 26.5 and 34 MB of 24 MB were seen)."""
    import gc

    import mlx.core as mx

    import hobbit_mlx
    from hobbit_mlx.server.kept_prompts import KeepSettings, KeptPrompts

    gc.collect()
    mx.clear_cache()
    m, tokenizer = hobbit_mlx.load(REFERENCE_MODEL, memory_budget="24MB", exact=True,
                                   progress=False)
    budget = hobbit_mlx.offload_stats(m)["budget_bytes"]
    kept = KeptPrompts.of_model(m, KeepSettings(str(tmp_path)))
    text = "".join(f"def step_{i}(state):\n    return state * {i} + {i % 7}\n" for i in range(90))
    long, short = tokenizer.encode(text), tokenizer.encode(text[:300] + "\n# and now?\n")
    assert len(long) > 1400  # (past the 1,024 tokens of KV planned for a short sequence)
    peaks = []
    for prompt in (long, short, long):
        mx.reset_peak_memory()
        out = [r.token for r in hobbit_mlx.stream_generate(m, tokenizer, kept.feed(prompt),
                                                           max_tokens=8, prompt_cache=kept.cache)]
        kept.finish(out)
        peaks.append(mx.get_peak_memory())
    assert kept.last_read_tokens > 1400  # (the long one came back from its file)
    assert max(peaks) <= budget, (peaks, budget)
    kept.close()
