"""Two threads generating on one model at once (as a server might) must each get the output
they would get alone."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

import hobbit_mlx

PROMPTS = ("def f():", "class A:")


@pytest.mark.xfail(reason="known bug (issue 15 report): concurrent generations on one model share "
                          "the runtime's per-call state and pools and can corrupt each other's "
                          "output; callers must serialize generations for now", strict=False)
def test_two_threads_generating_on_one_model_get_their_own_outputs(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    want = {p: hobbit_mlx.generate(model, tok, p, max_tokens=24) for p in PROMPTS}
    for _ in range(3):
        out: dict = {}

        def run(prompt):
            with mx.stream(mx.new_stream(mx.default_device())):
                out[prompt] = hobbit_mlx.generate(model, tok, prompt, max_tokens=24)

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert out == want
