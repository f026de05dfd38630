"""python -m hobbit_mlx.benchmark: every trial generates all its tokens, each budget is its own
load within its budget, and a smaller budget reads what a larger one holds."""

from __future__ import annotations

import json

import pytest

from hobbit_mlx import benchmark
from hobbit_mlx.cli_common import run


def _bench(capsys, *argv) -> tuple[int, str, str]:
    code = run(benchmark.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_budgets_are_rows_of_full_length_trials(capsys):
    """Two budgets of the reference model: 28 MB holds every expert (after the warmup run
    nothing is read), 12 MB streams them. The first model is gone before the second loads (its
    weights, still referenced, took the next budget's peak past it)."""
    code, out, err = _bench(capsys, "--memory-budget", "28MB,12MB", "-p", "24", "-g", "12",
                            "-n", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == 24 and result["prompt_source"] == "Python's argparse.py"
    large, small = result["budgets"]
    assert [large["budget_bytes"], small["budget_bytes"]] == [28_000_000, 12_000_000]
    for row in (small, large):
        assert len(row["trials"]) == 2
        # (end-of-sequence tokens do not stop a trial: the reference model ends text often)
        assert all(t["generation_tokens"] == 12 for t in row["trials"])
        assert row["peak_memory_bytes"] <= row["budget_bytes"]
        assert row["generation_tps"] > 0 and row["prompt_tps"] > 0
    assert small["expert_cache_share"] < 1.0 <= large["expert_cache_share"] + 1e-9
    assert small["decode_bytes_per_token"] > 0 and small["decode_hit_rate"] < 1.0
    assert large["decode_bytes_per_token"] == 0 and large["decode_hit_rate"] == 1.0
    # a decode step's reads are counted apart from the prompt's
    for t in small["trials"]:
        steps = t["generation_tokens"] - 1
        assert t["decode_bytes_per_token"] * steps == pytest.approx(t["decode"]["bytes_read"])


def test_the_table_and_a_prompt_file(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    code, out, err = _bench(capsys, "--memory-budget", "16MB", "-p", "16", "-g", "4", "-n", "1",
                            "--prompt-file", str(text), "--exact")
    assert code == 0, err
    head, row = out.strip().splitlines()
    assert head.split()[:3] == ["budget", "expert", "cache"]
    assert row.startswith("16MB "), row  # (the budget as given)
    assert "trial 1: prompt" in err and "notes.txt" in err


@pytest.mark.parametrize("argv,message", [
    (["--memory-budget", "12MB,12MB"], "the same budget twice"),
    (["--memory-budget", "12MB,"], "an empty entry"),
    (["--memory-budget", "12XB"], "--memory-budget"),
    (["--num-trials", "0"], "--num-trials must be at least 1"),
    (["-g", "1"], "--generation-tokens must be at least 2"),  # (no decode step to time)
    (["--delay", "nan"], "--delay takes 0 to 3600 seconds"),
    (["--prompt-file", "/nonexistent/notes.txt"], "no such file"),
    (["--prompt-file", "/"], "not a file"),
    (["--prompt-file", "/dev/null"], "not a file"),
    (["--random-prompt", "--prompt-file", "x"], "choose one"),
    (["--pipeline"], "the benchmark runs in one process"),
])
def test_bad_arguments_are_one_line(capsys, argv, message):
    code, out, err = _bench(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_prompt_file_shorter_than_the_prompt_is_named(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    code, out, err = _bench(capsys, "-p", "500", "--prompt-file", str(short), "-n", "1")
    assert code == 2 and "fewer than --prompt-tokens (500)" in err and "short.txt" in err


def test_a_budget_too_small_is_named_and_the_sweep_goes_on(capsys, monkeypatch):
    """A budget below the model's minimum, first in the sweep: it fails at its load, the sweep
    goes on to the next (rows took minutes each on a large model), and the error line comes
    after the rows, exit status 2. Once a load has told the minimum, a budget below it is not
    loaded at all."""
    import hobbit_mlx.cli_load as cli_load

    loads = []
    real_load = cli_load.load_model
    monkeypatch.setattr(cli_load, "load_model",
                        lambda args: loads.append(args.memory_budget) or real_load(args))
    code, out, err = _bench(capsys, "--memory-budget", "2MB,12MB,3MB", "-p", "16", "-g", "3",
                            "-n", "1", "--json")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: 2MB: ") and "too small for this model" in last
    assert "; 3MB: below this model's minimum of " in last
    result = json.loads(out)
    assert [r["budget"] for r in result["budgets"]] == ["12MB"] and not result["complete"]
    assert loads == [2_000_000, 12_000_000]  # (3 MB: skipped on what 12 MB's load told)


def test_generation_speed_is_decode_steps_over_their_time(capsys, monkeypatch):
    """-g 2 is one decode step: its rate is one token over that step's time (mlx-lm's rate
    counts the prompt's token too: twice as high)."""
    clock = iter(range(10_000))  # each reading of the trials' clock one second later
    monkeypatch.setattr(benchmark, "_now", lambda: float(next(clock)))
    code, out, err = _bench(capsys, "-b", "16MB", "-p", "16", "-g", "2", "-n", "1", "--json")
    assert code == 0, err
    trial = json.loads(out)["budgets"][0]["trials"][0]
    assert trial["generation_tps"] == pytest.approx(1.0)  # one step, one (fake) second


@pytest.mark.parametrize("content,message", [(b"\xff\xfe def f(): pass", "cannot read it as UTF-8"),
                                             (b"", "the file is empty")])
def test_a_prompt_file_that_cannot_serve_is_refused_before_the_load(capsys, tmp_path, monkeypatch,
                                                                     content, message):
    import hobbit_mlx.cli_load as cli_load

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    monkeypatch.setattr(cli_load, "load_model", lambda args: pytest.fail("loaded the model"))
    code, out, err = _bench(capsys, "--prompt-file", str(bad))
    assert code == 2 and message in err and "bad.txt" in err
