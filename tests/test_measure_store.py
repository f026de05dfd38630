"""The activations load() measures are kept on disk for the next process (they take most of a
load's time): read back instead of measured again, written whole, and measured again when the
kept file is unreadable or the options that shape them change."""

from __future__ import annotations

import os

import pytest

import hobbit_mlx
from hobbit_mlx import measure
from hobbit_mlx.loader import runtime_of


def _plan(dst, **kw):
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False, **kw)
    rt = runtime_of(model)
    rt.close()
    return rt.plan


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    """A new process's view: nothing measured in memory, an empty cache directory."""
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "_MEASURED", {})
    return tmp_path / "measured"


def _measuring_fails(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(measure, "activation_ladder", fail)
    monkeypatch.setattr(measure, "context_activation", fail)


def test_the_next_process_reads_what_one_measured(tiny_factory, fresh, monkeypatch):
    _, dst = tiny_factory("qwen3_moe")
    first = _plan(dst)
    kept = list(fresh.glob("*.json"))
    assert len(kept) == 2 and not list(fresh.glob("*.tmp"))  # (the ladder, the context's growth)
    monkeypatch.setattr(measure, "_MEASURED", {})  # the next process
    _measuring_fails(monkeypatch)
    assert _plan(dst) == first
    with pytest.raises(AssertionError, match="measured again"):  # another chunk size: measured
        _plan(dst, prefill_step_size=128)


def test_another_chunk_size_measures_only_its_ladder(tiny_factory, fresh, monkeypatch):
    """The growth with the context does not depend on the chunk size (its probes are 16- and
    64-token calls whatever the step), and is most of a measurement: a load with another
    ``prefill_step_size`` reads it back and measures only its ladder."""
    _, dst = tiny_factory("qwen3_moe")
    first = _plan(dst)
    monkeypatch.setattr(measure, "_MEASURED", {})  # the next process
    ladders, real_ladder = [], measure.activation_ladder
    _measuring_fails(monkeypatch)
    monkeypatch.setattr(measure, "activation_ladder",
                        lambda model, step: ladders.append(step) or real_ladder(model, step))
    other = _plan(dst, prefill_step_size=128)
    assert ladders == [128] and len(list(fresh.glob("*.json"))) == 3
    assert other.context_activation == first.context_activation  # the same growth, read back


def test_a_copy_of_the_model_reuses_the_measurement(tiny_factory, fresh, monkeypatch, tmp_path):
    """What is measured depends on the model's shapes, not on its weights' values nor its path:
    another conversion of the same checkpoint is not measured again; another model is."""
    from convert import convert

    src, dst = tiny_factory("qwen3_moe")
    first = _plan(dst)
    monkeypatch.setattr(measure, "_MEASURED", {})  # the next process
    _measuring_fails(monkeypatch)
    copy = convert(src, tmp_path / "copy", copy=True, progress=False)
    assert _plan(copy).chunk_tokens == first.chunk_tokens
    _, other = tiny_factory("olmoe")
    with pytest.raises(AssertionError, match="measured again"):
        _plan(other)


def test_a_load_says_when_it_measures(tiny_factory, fresh, monkeypatch, capsys):
    """The measurement is most of a first load's time (seconds on a large model) after the
    conversion's progress bar: a load that measures says so, one that reads it back does not."""
    _, dst = tiny_factory("qwen3_moe")
    for measures in (True, False):
        model, _ = hobbit_mlx.load(dst, expert_residency=0.5)
        runtime_of(model).close()
        assert ("measuring the memory" in capsys.readouterr().out) == measures
        monkeypatch.setattr(measure, "_MEASURED", {})  # the next process


def test_an_unreadable_kept_file_is_measured_again(tiny_factory, fresh, monkeypatch):
    _, dst = tiny_factory("qwen3_moe")
    first = _plan(dst)
    kept = sorted(fresh.glob("*.json"))
    for path in kept:
        path.write_text(path.read_text()[:12])  # cut short
    monkeypatch.setattr(measure, "_MEASURED", {})
    assert _plan(dst).chunk_tokens == first.chunk_tokens
    read = [measure._read_measured(p, kind) for p in kept for kind in ("ladder", "context")]
    assert sum(r is not None for r in read) == 2  # each written whole again


def test_a_cache_directory_that_cannot_be_written_only_costs_the_measurement(tiny_factory, fresh):
    _, dst = tiny_factory("qwen3_moe")
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_text("a file where the directory would go")
    with pytest.warns(UserWarning, match="cannot keep the measured activations there") as said:
        assert _plan(dst).budget_bytes > 0
    assert str(fresh) in str(said[0].message)  # (which directory, so that it can be fixed)


def test_only_the_newest_measurements_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "KEPT_MEASUREMENTS", 3)
    for i in range(5):
        measure._write_measured(tmp_path / f"{i}.json", "context", (0.0, 1.0, 2.0))
        os.utime(tmp_path / f"{i}.json", (i, i))
    measure._prune(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["2.json", "3.json", "4.json"]


def test_the_context_growth_allows_for_peaks_that_come_out_low(monkeypatch):
    """The growth with the context is a difference of two measured peaks; in one process both
    context runs came out a few percent low, the fit reserved 148 KB less than another
    process's, and a prompt chunk went over its budget. Here every peak with a context comes out
    4% of the call's activations low: the reserve still covers the true peak."""
    from hobbit_mlx import measure

    base = {n: 70_000 * n for n in measure.CONTEXT_PROBES}  # a call's own activations

    def true_growth(n: int, c: int) -> float:
        return 50_000 + 1_000 * n + 2.0 * n * c

    def raw(model, n, context=0, kv_quant=None, next_token=False):
        if not context:
            return base[n]
        return int(base[n] + true_growth(n, context) - 0.04 * base[n])  # (a low run)

    monkeypatch.setattr(measure, "_raw_activation", raw)
    per_pair, constant, per_token = measure.context_activation(model=None)
    for n in measure.CONTEXT_PROBES:
        for c in (64, 192, 1000, 4032):
            reserved = constant + n * (per_token + c * per_pair)
            assert reserved >= true_growth(n, c), (n, c)
