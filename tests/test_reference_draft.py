"""The bundled trained draft of the reference model (``hobbit_mlx/reference_draft``): a small mlx-lm
checkpoint that loads beside the offloaded reference model, leaves greedy output unchanged, and
drafts far better than an untrained draft (whose acceptance stays near 0)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import hobbit_mlx
from hobbit_mlx.loader import REFERENCE_MODEL, runtime_of
from hobbit_mlx.speculative import AdaptiveK

DRAFT = REFERENCE_MODEL.parent / "reference_draft"
# held out: the opening of xml/dom/pulldom.py, a validation file (reference/val_files.txt), cut
# mid-line (a prompt ending in a newline ends in a token seen only at the end of a file)
PROMPT = ('import xml.sax\nimport xml.sax.handler\n\nSTART_ELEMENT = "START_ELEMENT"\n'
          'END_ELEMENT = "END_ELEMENT"\nCOMMENT = "COMMENT"\n'
          'START_DOCUMENT = "START_DOCUMENT"\nEND_DOCUMENT = "END_DOCUMENT"\n'
          'PROCESSING_INSTRUCTION = "PROCESSING_INSTRUCTION"\n'
          'IGNORABLE_WHITESPACE = "IGNORABLE_WHITESPACE"\nCHARACTERS = "CHARACTERS"\n\n'
          'class PullDOM(xml.sax.ContentHandler):\n    _locator = None\n    document = None\n\n'
          '    def __init__(self, documentFactory=None):')
TOKENS, K = 32, 2
MIN_ACCEPTANCE = 0.2  # measured 0.39 on this prompt (0.41 over 8 held-out prompts); untrained: 0.0

pytestmark = pytest.mark.skipif(not (DRAFT / "config.json").is_file(),
                                reason="reference draft not bundled")


@pytest.fixture(scope="module")
def with_draft():
    model, tok = hobbit_mlx.load(REFERENCE_MODEL, expert_residency=0.5, exact=True,
                                 draft_model=str(DRAFT), progress=False)
    yield model, tok
    runtime_of(model).close()


def test_reference_draft_is_a_small_dense_4bit_checkpoint():
    config = json.loads((DRAFT / "config.json").read_text())
    reference = json.loads((REFERENCE_MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["quantization"]["bits"] == 4
    assert config["vocab_size"] == reference["vocab_size"]
    scales = [a for k, a in mx.load(str(DRAFT / "model.safetensors")).items() if k.endswith(".scales")]
    assert scales and all(a.dtype == mx.float32 for a in scales)  # (bf16: ~8x slower on the CPU)
    assert sum(f.stat().st_size for f in DRAFT.iterdir() if f.is_file()) < 3_000_000


def test_greedy_with_the_trained_draft_is_exact_and_mostly_accepted(with_draft):
    model, tok = with_draft
    rt = runtime_of(model)
    assert rt.draft_model is not None and rt.draft_bytes > 0
    plain = [r.token for r in hobbit_mlx.stream_generate(model, tok, PROMPT, max_tokens=TOKENS,
                                                         speculative=False)]
    drafted = list(hobbit_mlx.stream_generate(model, tok, PROMPT, max_tokens=TOKENS, speculative=K))
    assert [r.token for r in drafted] == plain and len(plain) == TOKENS  # (no eos in the way)
    stats = rt.speculative_stats
    assert stats.drafted > 0 and stats.accepted / stats.drafted > MIN_ACCEPTANCE


class LongPlainRuns(AdaptiveK):
    """Runs of 40 plain passes, then 5 drafted: the draft then catches up on 40 tokens."""

    def next_k(self, limit: int) -> int:
        self._scripted = getattr(self, "_scripted", -1) + 1
        return min(self.max_k if self._scripted % 45 >= 40 else 0, limit)


def test_an_adaptive_draft_stays_inside_the_budget():
    """After a run of plain passes the draft catches up on the tokens it has not seen, in calls
    no longer than the target's planned chunk: one call of up to 65 tokens took the peak to 1.08x
    a 10 MB budget. Every draft call is recorded, and the peak is MLX's own."""
    budget = 10_000_000
    mx.clear_cache()
    others = mx.get_active_memory()  # (another test's model may still be alive)
    model, tok = hobbit_mlx.load(REFERENCE_MODEL, memory_budget=budget, exact=True,
                                 draft_model=str(DRAFT), speculative=2, progress=False)
    rt = runtime_of(model)
    # long runs of plain passes, as the adaptive length chooses them where drafting does not pay
    # (left to timing, a faster machine drafted nearly every pass and the test saw no catch-up)
    rt.speculative_controller = LongPlainRuns(2, drafter=id(rt.draft_model))
    calls, call = [], type(rt.draft_model).__call__
    type(rt.draft_model).__call__ = lambda self, x, *a, **kw: calls.append(x.shape[1]) or \
        call(self, x, *a, **kw)
    try:
        mx.reset_peak_memory()
        hobbit_mlx.generate(model, tok, "def fibonacci(n):", max_tokens=200)
        peak = mx.get_peak_memory()
    finally:
        type(rt.draft_model).__call__ = call
    stats = rt.speculative_stats
    assert stats.drafted > 0 and stats.plain_passes > 20  # long runs of plain passes
    assert max(calls) <= rt.plan.chunk_tokens < 64
    assert peak - others <= budget
    rt.close()
