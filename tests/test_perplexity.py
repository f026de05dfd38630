"""``python -m hobbit_mlx.perplexity``: a text's perplexity under the memory budget, its prompt
part in prefill chunks and its decode part one token a step; exact mode scores what mlx-lm's
model scores, and the scoring stays inside the budget."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load

import hobbit_mlx
from hobbit_mlx import cli_common
from hobbit_mlx.perplexity import load_tokens, main, score

TEXT = Path(json.__file__).parent / "decoder.py"  # (Python source: what the reference model knows)


def _run(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    code = cli_common.run(main, argv)
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 and out.out.strip() else None), out.err


def _mlx_lm_scores(src: Path, sequences: np.ndarray) -> np.ndarray:
    """Each token's log-likelihood under mlx-lm's model, the whole sequence in one call."""
    model, _ = mlx_lm_load(str(src))
    rows = []
    for row in sequences:
        logits = model(mx.array(row[:-1])[None])[0].astype(mx.float32)
        rows.append(np.array(-nn.losses.cross_entropy(logits, mx.array(row[1:]),
                                                      reduction="none")))
    return np.stack(rows)


def test_exact_scores_equal_mlx_lms_below_full_residency(tiny_factory, tmp_path):
    src, dst = tiny_factory("qwen3_moe")
    model, tokenizer = hobbit_mlx.load(dst, exact=True, expert_residency=0.5, progress=False)
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, 250, size=(2, 48))
    scores = score(model, sequences, decode_tokens=12)
    stats = hobbit_mlx.offload_stats(model)
    hobbit_mlx.runtime_of(model).close()
    assert stats["misses_high"] > 0  # (experts were read: offloading took part)
    assert [len(p) for p in scores.prompt] == [35, 35] and [len(d) for d in scores.decode] == [12, 12]
    ours = np.stack([np.concatenate([p, d]) for p, d in zip(scores.prompt, scores.decode)])
    np.testing.assert_allclose(ours, _mlx_lm_scores(src, sequences), atol=2e-4)


def test_reference_model_scores_inside_the_budget(capsys):
    """(--max-context 256: the plan's chunk is 24 tokens there, and logits reserved for a longer
    chunk took the peak over the budget)"""
    code, result, err = _run(["--data-path", str(TEXT), "--memory-budget", "16MB",
                              "--sequence-length", "96", "--decode-tokens", "16",
                              "--num-samples", "2", "--max-context", "256", "--json"], capsys)
    assert code == 0, err
    assert result["prompt"]["tokens"] == 2 * 79 and result["decode"]["tokens"] == 2 * 16
    assert result["all"]["tokens"] == 2 * 95
    assert 1.0 < result["all"]["perplexity"] < 100.0  # (trained on Python: far below 4096)
    stats = result["stats"]
    assert stats["misses_high"] > 0 and stats["peak_memory_bytes"] <= stats["budget_bytes"]


def test_data_files_in_mlx_lms_formats(tiny_factory, tmp_path):
    _, dst = tiny_factory("qwen3_moe")
    _, tokenizer = hobbit_mlx.load(dst, progress=False)
    words = " ".join(f"word{i % 37}" for i in range(400))
    (tmp_path / "plain.txt").write_text(words)
    data = tmp_path / "lora"
    data.mkdir()
    (data / "valid.jsonl").write_text("\n".join(json.dumps({"text": words[i:i + 300]})
                                                for i in range(0, 2400, 300)))
    plain = load_tokens(str(tmp_path / "plain.txt"), tokenizer, 32, 3)
    assert plain.shape == (3, 32)
    assert plain.reshape(-1).tolist() == list(tokenizer.encode(words))[:96]
    records = load_tokens(str(data), tokenizer, 32, -1)
    assert records.shape[1] == 32 and records.shape[0] >= 3


@pytest.mark.parametrize("argv,message", [
    (["--data-path", "/nonexistent/notes.txt"], "no such file or directory"),
    (["--data-path", str(TEXT), "--sequence-length", "100000"], "fewer than one --sequence-length"),
    (["--data-path", str(TEXT), "--decode-tokens", "256"], "--decode-tokens 256: from 0 to"),
    (["--data-path", str(TEXT), "--num-samples", "0"], "--num-samples 0"),
    (["--data-path", "notes/today.txt"], "no such file or directory"),
    (["--data-path", str(TEXT), "--speculative", "2"], "nothing is drafted"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    code, _, err = _run(argv + ["--memory-budget", "16MB"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_bad_jsonl_record_names_its_line(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    code, _, err = _run(["--data-path", str(bad), "--memory-budget", "16MB"], capsys)
    assert code == 2 and f"{bad}:2: not a JSON record" in err


class _Plan:
    """A budget plan's reserve for its calls: 100 KB up to 16 tokens, 10 KB a token beyond."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens

    def activation_for(self, tokens: int) -> int:
        return 100_000 + 10_000 * max(0, tokens - 16)


def test_prompt_calls_are_cut_until_their_logits_fit_the_reserve():
    from hobbit_mlx.perplexity import score_chunk

    # (a small vocabulary: a token less than the plan's chunk, whose reserve has no logits)
    assert score_chunk(_Plan(64), row_bytes=100) == 63
    # 64 tokens reserve 580 KB; n tokens of 8,000-byte rows fit while 100 KB + 10 KB (n - 16)
    # + 8 KB n stays below it: n = 35
    assert score_chunk(_Plan(64), row_bytes=8_000) == 35
    assert score_chunk(_Plan(16), row_bytes=8_000) == 1  # (no room: a decoded token's row)


def test_a_hub_dataset_is_drawn_the_same_every_run(monkeypatch, tiny_factory):
    import mlx_lm.perplexity as mlx_lm_perplexity

    def load_data(tokenizer, path, num_samples, sequence_length):  # (mlx-lm's draw, offline)
        records = np.arange(50 * sequence_length).reshape(50, sequence_length)
        return records[np.random.permutation(50)[:num_samples]]

    monkeypatch.setattr(mlx_lm_perplexity, "load_data", load_data)
    _, dst = tiny_factory("qwen3_moe")
    _, tokenizer = hobbit_mlx.load(dst, progress=False)
    first = load_tokens("some-org/some-data", tokenizer, 8, 4)
    np.random.seed(7)  # (whatever ran before)
    assert np.array_equal(load_tokens("some-org/some-data", tokenizer, 8, 4), first)
    assert not np.array_equal(load_tokens("some-org/some-data", tokenizer, 8, 4, seed=5), first)


def test_a_large_text_file_is_read_as_far_as_the_samples_need(tiny_factory, tmp_path):
    _, dst = tiny_factory("qwen3_moe")
    _, tokenizer = hobbit_mlx.load(dst, progress=False)
    text = " ".join(f"w{i % 1000}" for i in range(100_000))
    (tmp_path / "big.txt").write_text(text)
    whole = list(tokenizer.encode(text))
    assert load_tokens(str(tmp_path / "big.txt"), tokenizer, 32, 2).reshape(-1).tolist() == \
        whole[:64]
    assert load_tokens(str(tmp_path / "big.txt"), tokenizer, 32, -1).size == \
        len(whole) // 32 * 32


def test_json_has_no_nan_when_a_part_has_one_token_or_none(capsys):
    code, result, err = _run(["--data-path", str(TEXT), "--memory-budget", "16MB",
                              "--sequence-length", "8", "--decode-tokens", "1",
                              "--num-samples", "1", "--json"], capsys)
    assert code == 0, err
    assert result["decode"]["tokens"] == 1 and result["decode"]["standard_error"] is None
