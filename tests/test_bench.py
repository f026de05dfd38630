"""The benchmark harness (smoke: structure, not speed) and the offline cache-policy replay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import prefetch_replay as pr  # noqa: E402
from bench import replay as rp  # noqa: E402
from bench import trace as tr  # noqa: E402


def _calls(*experts_per_call, layer=0):
    """A one-layer trace: each argument is the set of experts one (single-token) call chose."""
    return tr.from_calls([(layer, np.array([list(e)])) for e in experts_per_call])


# ---------------------------------------------------------------------------------------- replay
def test_replay_cli_refuses_bad_input_with_one_line(tmp_path, capsys):
    path = tr.save(_calls([0], [1], [2]), tmp_path / "t.npz")
    for argv in ([str(tmp_path / "missing.npz")], [str(path), "--residency", "1.5"],
                 [str(path), "--capacity", "0"], [str(path), "--policies", "lru,bogus"],
                 [str(path), "--group", "x"]):
        with pytest.raises(SystemExit) as e:
            rp.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert rp.main([str(path), "--capacity", "2", "--policies", "lru,belady"]) == 0


def _decode_trace(*routings):
    """Two layers, three decode steps per sequence: each argument is one sequence's experts
    (layer 0's, layer 1's), the same at every step."""
    calls, sequence = [], []
    for s, (first, second) in enumerate(routings):
        for _ in range(3):
            calls += [(0, np.array([first])), (1, np.array([second]))]
            sequence += [s, s]
    return tr.from_calls(calls, sequence=sequence, meta={"experts_per_layer": [4, 4]})


def test_batch_replay_merges_the_steps_of_a_batch_and_counts_what_their_union_misses():
    from bench import batch_replay as br

    same = _decode_trace(([0, 1], [2, 3]), ([0, 1], [2, 3]))
    merged = br.batched(same, 2)
    assert len(merged) == 6 and set(merged.sequence.tolist()) == {0}
    assert merged.call(1).tolist() == [[2, 3], [2, 3]] and merged.layer[:2].tolist() == [0, 1]
    # A pool of 2 experts (25% of 8): each layer's call evicts the other's, so every call
    # misses both; two sequences routed alike read them once per step for two tokens.
    rows = {r["batch"]: r for r in br.measure(same, [1, 2], [0.25], ["lru"])}
    assert rows[1]["misses_per_token"] == 2 and rows[2]["misses_per_token"] == 1
    assert rows[2]["computed_per_token"] == 1 and rows[2]["read_bound_vs_1"] == 2
    # Routed apart, a batch computes and reads each sequence's experts: no saving.
    apart = _decode_trace(([0, 1], [2, 3]), ([2, 3], [0, 1]))
    rows = {r["batch"]: r for r in br.measure(apart, [1, 2], [0.5], ["lru"])}
    assert rows[2]["computed_per_token"] == rows[1]["computed_per_token"] == 2
    assert rows[2]["read_bound_vs_1"] <= 1


def test_batch_replay_cli(tmp_path, capsys):
    from bench import batch_replay as br

    path = tr.save(_decode_trace(([0, 1], [2, 3]), ([0, 1], [2, 3])), tmp_path / "t.npz")
    assert br.main([str(path), "--batch", "1,2", "--residency", "0.25", "--policies", "lru",
                    "--json", str(tmp_path / "rows.json")]) == 0
    assert "| 25% | lru | 2 | 1.00 | 1.00 | 2.00× |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 2
    for argv in ([str(path), "--batch", "3"], [str(path), "--batch", "0"],
                 [str(path), "--residency", "2"], [str(path), "--policies", "nosuch"],
                 [str(tmp_path / "missing.npz")]):
        with pytest.raises(SystemExit) as e:
            br.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------ bad arguments, patterns
_BAD_ARGS = [
    ("harness", ["--quick", "--residencies", "abc"]),
    ("harness", ["--quick", "--residencies", "2"]),
    ("harness", ["--quick", "--budgets", "xyz"]),
    ("harness", ["--quick", "--storage", "mac-like", "--read-ratio", "0"]),
    ("harness", ["--quick", "--model", "/nonexistent"]),
    ("forced_decode", ["--configs", "nosuch"]),
    ("forced_decode", ["--residencies", "2"]),
    ("forced_decode", ["--storage", "bogus"]),
    ("hot_path", ["--model", "/nonexistent"]),
    ("hot_path", ["--residencies", "-0.5"]),
    ("prompt_reuse", ["--residency", "2"]),
    ("kept_prompts", ["--settings", "last,bogus"]),
    ("kept_prompts", ["--conversations", "9"]),
    ("sweep_thresholds", ["--model", "/nonexistent"]),
    ("kv_quant", ["--storage", "bogus"]),
    ("kv_quant", ["--budget", "1KBx"]),
    # the reference model's head dimension (40) takes no MLX group size: refused from config.json
    ("kv_quant", ["--model", "hobbit_mlx/reference_model"]),
    ("long_prompt", ["--budgets", "1KBx"]),
    ("offload_vs_mlx_lm", ["--residencies", "1,x"]),
    ("pipeline", ["--budget", "abc"]),
    ("prefetch_replay", ["--config", "nosuch"]),
    ("speculative", ["bench", "--configs", "nosuch"]),
    ("trace", ["--model", "/nonexistent"]),
    ("inplace_read", ["--model", "/nonexistent"]),
    ("make_synthetic", ["--widen-reference", "0"]),
    ("replay", ["README.md"]),
    ("victim_cost", ["--calls", "0"]),
    ("low_rounding", ["--low-bits", "7"]),
    ("low_rounding", ["--tokens", "0"]),
    ("low_rounding", ["--model", "/nonexistent"]),
    ("calibration", ["--calibration-tokens", "0"]),
    ("calibration", ["--model", "/nonexistent"]),
]


@pytest.mark.parametrize("script,argv", _BAD_ARGS, ids=[f"{s}:{' '.join(a)}" for s, a in _BAD_ARGS])
def test_bench_scripts_refuse_bad_arguments_with_one_error_line(script, argv, capsys, monkeypatch):
    """Refused before any work: exit status 2, one ``error:`` line (argparse's usage above it),
    no traceback."""
    import importlib

    monkeypatch.chdir(REPO)
    main = importlib.import_module(f"bench.{script}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and ": error: " in errors[0], err  # ("PROG: error: ...")
    assert "Traceback" not in err


def test_bench_out_is_checked_before_any_work(tmp_path, capsys):
    from bench import sweep_thresholds

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:  # --out under a file: its directory cannot be made
        sweep_thresholds.main(["--out", str(blocker / "sweep" / "sweep.md")])
    assert e.value.code == 2 and ": error: --out" in capsys.readouterr().err


def test_library_refusals_become_one_error_line(capsys):
    from bench import arguments
    from hobbit_mlx.budget import BudgetError

    def main(argv=None):
        raise BudgetError("memory budget 1000 B is too small for this model:\n it needs more")

    with pytest.raises(SystemExit) as e:
        arguments.refuse_bad_input(main)([])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == "test_bench.py: error: memory budget 1000 B is too small for this model: it needs more\n"

    def broken(argv=None):  # not a refusal of what it was given: the traceback stays
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        arguments.refuse_bad_input(broken)([])


def test_reports_record_the_command_from_the_repository_top(tmp_path, monkeypatch):
    """Whatever the working directory, a report records ``python bench/<script>`` and every
    argument, quoted (it recorded a cwd-relative path, or dropped arguments)."""
    from bench import arguments, prefetch_replay

    monkeypatch.chdir(tmp_path)
    line = arguments.command(prefetch_replay.__file__, ["--out", "my results/x", "--others", "lru"])
    assert line == "python bench/prefetch_replay.py --out 'my results/x' --others lru"
    monkeypatch.setattr("sys.argv", ["../../work/main/bench/harness.py", "--quick"])
    assert arguments.command("/elsewhere/bench/harness.py", None) == "python bench/harness.py --quick"


def test_deliberate_bugs_patterns_match_the_code(tmp_path, capsys):
    """Each planted bug's line is in the code once; a line the code no longer has is a row saying
    the pattern is stale (no test run), and the run exits 1; --help runs nothing."""
    from bench import deliberate_bugs as db

    assert db.stale() == []
    gone = [("a stale bug", "mod.py", "old line\n", "new line\n", ["tests/none.py"])]
    (tmp_path / "mod.py").write_text("other line\n")
    assert db.run(tmp_path, gone) == 1
    assert "| a stale bug | pattern not found (stale" in capsys.readouterr().out
    assert (tmp_path / "mod.py").read_text() == "other line\n"
    with pytest.raises(SystemExit) as e:
        db.main(["--help"])
    assert e.value.code == 0 and "--check" in capsys.readouterr().out
    assert db.main(["--check"]) == 0


def test_sweep_shares_add_up_to_one():
    from bench.sweep_thresholds import shares

    got = shares({"expert_requests": 10, "hits_high": 4, "hits_low": 1, "misses_high": 3,
                  "misses_low": 1, "skipped": 1})
    assert got == {"high_loads": 0.3, "low_loads": 0.1, "skipped": 0.1, "served": 0.5}
    assert sum(got.values()) == pytest.approx(1.0)


def test_scratch_directory_moves_with_the_environment(tmp_path):
    import subprocess

    code = "from bench import workload; print(workload.TMP)"
    env = {**__import__("os").environ, "HOBBIT_BENCH_TMP": str(tmp_path / "scratch")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == str((tmp_path / "scratch").resolve())


def test_routing_labels_say_random_only_when_the_marker_does():
    from bench.harness_report import routing_note

    assert routing_note("random") == " (random routing)"
    assert routing_note("unknown") == " (routing unknown)" and routing_note("trained") == ""


def test_replay_cyclic_pattern_belady_beats_lru():
    # A B C A B C A through 2 slots. LRU/FIFO: every access misses (the classic cyclic worst case).
    # Belady: t2 C evicts B (next use t4, later than A's t3); t3 A hits; t4 B evicts A (next t6,
    # later than C's t5); t5 C hits; t6 A misses -> 2 hits.
    # LFU (counts kept across evictions, ties to the least recent) misses every time as well.
    trace = _calls([0], [1], [2], [0], [1], [2], [0])
    got = {p: rp.replay(trace, p, 2) for p in ("lru", "fifo", "lfu", "belady", "runtime:lru")}
    assert {p: r["hits"] for p, r in got.items()} == {"lru": 0, "fifo": 0, "lfu": 0, "belady": 2,
                                                      "runtime:lru": 0}
    assert all(r["requests"] == 7 and r["hits"] + r["misses"] == 7 for r in got.values())
    assert got["belady"]["hit_rate"] == pytest.approx(2 / 7)


def test_replay_oracle_keeps_what_the_rest_of_the_token_and_the_next_one_request():
    # 2 slots. Token 0: L1 x, L2 c; token 1: L0 a, L1 b, L2 c; token 2: L0 z.
    # LRU: [x, c]; t1 L0 a evicts x; L1 b evicts c (the older); L2 c misses -> 0 hits.
    # Told the rest of the token: L1 b may not evict c (L2 asks for it) and evicts a; c hits.
    calls = [(1, [[0]]), (2, [[2]]), (0, [[1]]), (1, [[3]]), (2, [[2]]), (0, [[4]])]
    trace = tr.from_calls([(layer, np.array(e)) for layer, e in calls])
    hits = [rp.replay(trace, p, 2)["hits"] for p in ("lru", "oracle0:lru", "oracle1:lru")]
    assert hits == [0, 1, 1]
    steps = rp.steps_of(trace)
    rest, ahead = rp.Lookahead(rp.LRU(), steps, 0), rp.Lookahead(rp.LRU(), steps, 1)
    rest.advance(2), ahead.advance(2)  # token 1, layer 0
    assert rest.needed == {(1, 3, "high"), (2, 2, "high")}
    assert ahead.needed == rest.needed | {(0, 4, "high")}
    ahead.advance(5)  # the last step: nothing after it
    assert ahead.needed == set()


def test_replay_multi_expert_calls_pin_their_experts():
    # Calls {0,1} {2,3} {0,1} {0,2}, 3 slots, 8 requests.
    # LRU: c1 brings 2, then 3 evicts 0 (oldest, unpinned) -> [1,2,3]; c2: 1 hits, 0 evicts 2 ->
    #      [3,1,0]; c3: 0 hits, 2 evicts 3 -> 2 hits.
    # Belady: c1's 3 evicts 0 or 1 (both next used in c2); c2 hits one and its miss evicts 3 (never
    #      used again) rather than 2 (used in c3); c3 hits 0 and 2 -> 3 hits.
    trace = _calls([0, 1], [2, 3], [0, 1], [0, 2])
    lru, opt = rp.replay(trace, "lru", 3), rp.replay(trace, "belady", 3)
    assert (lru["requests"], lru["hits"], opt["hits"]) == (8, 2, 3)
    assert rp.replay(trace, "runtime:lru", 3)["hits"] == 2
    # Capacity 1 cannot hold a 2-expert call, and a call never evicts its own (pinned) experts:
    # c0 caches 0, 1 cannot be placed; c1: 2 evicts 0, 3 not placed; c2: 0 evicts 2, 1 not placed;
    # c3: 0 hits, 2 not placed -> 1 hit, 4 misses not cached.
    tiny = rp.replay(trace, "lru", 1)
    assert (tiny["hits"], tiny["not_cached"], tiny["evictions"]) == (1, 4, 2)


def test_replay_splits_calls_on_slots_like_the_runtime():
    # The slot-pool runtime: a call whose misses find no free slot (its own experts are pinned)
    # evaluates what it has and continues with the remaining misses as a new group, in which only
    # they are pinned. Calls {0,1,2,3,4} {3} {2} through 2 slots, LRU:
    # c0: group 1 reads 0, 1 (2 finds no slot); group 2 reads 2 evicting 0, 3 evicting 1; group 3
    #     reads 4 evicting 2 -> [3, 4]; c1: 3 hits -> [4, 3]; c2: 2 misses, evicts 4.
    # -> 1 hit, 6 misses, 4 evictions, everything cached.
    calls = ([0, 1, 2, 3, 4], [3], [2])  # one token per expert (top-1): c0 is a prefill chunk
    split = tr.from_calls([(0, np.array(c)[:, None]) for c in calls], meta={"fetch_group": "slots"})
    got = rp.replay(split, "lru", 2)
    assert (got["hits"], got["misses"], got["evictions"], got["not_cached"]) == (1, 6, 4, 0)
    assert rp.replay(split, "runtime:lru", 2)["hits"] == 1
    # Without splitting (hand-made traces, --group none) the misses that find no slot are not
    # cached: c0 keeps 0, 1; c1: 3 misses, evicts 0; c2: 2 misses, evicts 1 -> 0 hits.
    plain = rp.replay(split, "lru", 2, group=None)
    assert (plain["hits"], plain["misses"], plain["not_cached"]) == (0, 7, 3)
    hand_made = tr.from_calls([(0, np.array(c)[:, None]) for c in calls])
    assert rp.replay(hand_made, "lru", 2)["hits"] == 0  # no "slots" in the meta: no split
    assert rp.replay(hand_made, "lru", 2, group="slots")["hits"] == 1


def test_replay_accepts_policy_objects_and_compare_reports_gaps():
    class MRU:  # most recently used: a policy the bench does not know, plugged in as an object
        name = "mru"

        def __init__(self):
            self.order = []

        def on_insert(self, key):
            self.order.append(key)

        def on_hit(self, key):
            self.order.remove(key)
            self.order.append(key)

        def on_evict(self, key):
            self.order.remove(key)

        def victim(self, evictable):
            for key in reversed(self.order):
                if evictable(key):
                    return key
            raise LookupError

        def reset(self):
            pass

    trace = _calls([0], [1], [2], [0], [1], [2], [0])
    # MRU on A B C A B C A, 2 slots: C evicts B, A hits, B evicts A, C hits, A misses -> 2 hits.
    assert rp.replay(trace, MRU(), 2)["hits"] == 2
    rows = rp.compare(trace, [2, 3], ["lru", "belady"])
    by = {(r["capacity"], r["policy"]): r for r in rows}
    assert by[(2, "lru")]["gap_to_belady"] == pytest.approx(2 / 7)
    assert by[(3, "lru")]["hits"] == by[(3, "belady")]["hits"] == 4  # everything fits: 3 cold misses
    assert "belady hit" in rp.format_table(rows)


def _k(layer, e):
    return (layer, e, "high")


def test_prefetch_replay_lru_and_belady_by_hand():
    from hobbit_mlx.policies import make_policy

    a, b, c = _k(0, 0), _k(1, 1), _k(0, 2)
    events = [("seq",),
              ("demand", 0, [a], 1),     # miss: {a}
              ("predict", 1, [b]),       # read ahead: {a, b}, b held
              ("demand", 1, [b], 1),     # hit
              ("call_end", 1),           # b released
              ("demand", 0, [c], 1),     # miss: LRU evicts a (older); Belady evicts b (never again)
              ("demand", 0, [a], 1)]     # LRU: miss; Belady: hit
    lru = pr.replay_with_prefetch(events, make_policy("lru"), capacity=2)
    best = pr.replay_with_prefetch(events, "belady", capacity=2)
    assert (lru["hits"], lru["misses"], lru["prefetch_reads"]) == (1, 3, 1)
    assert (best["hits"], best["misses"]) == (2, 2)


def test_prefetch_replay_holds_predicted_residents():
    from hobbit_mlx.policies import make_policy

    x, y, z = _k(1, 0), _k(1, 1), _k(1, 2)
    events = [("seq",), ("demand", 1, [x], 1), ("call_end", 1), ("demand", 1, [y], 1),
              ("call_end", 1),
              ("predict", 1, [x, z]),    # x resident: held, so reading z evicts y, not the older x
              ("demand", 1, [x, z], 1), ("call_end", 1)]
    out = pr.replay_with_prefetch(events, make_policy("lru"), capacity=2)
    assert (out["hits"], out["misses"]) == (2, 2)
    uncovered = pr._demand_steps(events, uncovered_only=True)
    assert [s[3] for s in uncovered] == [[x], [y], []]  # the last demand was all predicted


def test_prefetch_replay_moves_each_release_after_its_layers_fetch():
    spied = [("call_end", 0), ("predict", 1, ["b"]), ("demand", 0, ["a"], 0),
             ("demand", 0, ["c"], 0), ("call_end", 1), ("demand", 1, ["b"], 0), ("seq",)]
    assert pr._in_runtime_order(spied) == [
        ("predict", 1, ["b"]), ("demand", 0, ["a"], 0), ("demand", 0, ["c"], 0), ("call_end", 0),
        ("demand", 1, ["b"], 0), ("call_end", 1), ("seq",)]


def test_trace_roundtrip_with_and_without_gate_weights(tmp_path):
    b = tr.TraceBuilder()
    entries = [(0, np.array([[1, 2], [3, 1]])), (1, np.array([[0, 2]]), np.array([[0.7, 0.3]]))]
    b.absorb(list(entries[:1]), sequence=0, phase=0)
    b.absorb(list(entries[1:]), sequence=0, phase=1)
    t = b.build({"num_layers": 2, "num_experts": 4})
    assert t.weights is None  # only some calls carried weights
    loaded = tr.load(tr.save(t, tmp_path / "t.npz"))
    assert loaded.layer.tolist() == [0, 1] and loaded.offsets.tolist() == [0, 2, 3]
    assert loaded.call(0).tolist() == [[1, 2], [3, 1]] and loaded.phase.tolist() == [0, 1]
    assert loaded.meta == {"num_layers": 2, "num_experts": 4}
    b2 = tr.TraceBuilder()
    b2.absorb([(0, np.array([[1, 2]]), np.array([[0.6, 0.4]]))], 0, 1)
    assert tr.load(tr.save(b2.build({}), tmp_path / "w.npz")).weights.tolist() == [
        pytest.approx([0.6, 0.4])]
    assert rp.capacity_for_residency(loaded, 0.5) == 4


# ---------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The bench's tiny random qwen3_moe (4 layers x 32 experts, top-4): (mlx-lm dir, hobbit dir)."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    from bench import workload

    root = tmp_path_factory.mktemp("bench-model")
    src = make_tiny_model(workload.TINY_ARCH, root / "mlx", quantize=True,
                          config_overrides=workload.TINY_OVERRIDES)
    workload.write_marker(src, routing="random")
    convert(src, root / "hobbit", progress=False)
    return src, root / "hobbit"


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    from bench import harness

    out = tmp_path_factory.mktemp("bench") / "out"
    assert harness.main(["--model", str(tiny_model[0]), "--quick", "--out", str(out),
                         "--name", "quick"]) == 0
    return out, json.loads((out / "quick.json").read_text())


def _small_workload(src, max_tokens=8):
    import mlx_lm.utils

    from bench.workload import make_workload

    return make_workload(mlx_lm.utils.load_tokenizer(src), n_prompts=1, prompt_tokens=32,
                         max_tokens=max_tokens, n_ppl=0)


def test_harness_quick_writes_outputs(quick_run):
    out, _ = quick_run
    for f in ("quick.md", "quick.json", "quick-speed.png", "quick-hit.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "quick.md").read_text()
    assert "python bench/harness.py" in md and "--quick" in md  # the command that made it
    assert "warm" in md and "random routing" in md
    assert (out / "quick-speed.png").read_bytes()[:4] == b"\x89PNG"


def test_harness_quick_metrics_per_configuration(quick_run):
    from bench import harness

    _, res = quick_run
    assert res["meta"]["storage"] == "warm" and res["meta"]["model"]["routing"] == "random"
    base = res["baseline"]
    assert base["prompt_tps"] > 0 and base["decode_tps"] > 0 and base["peak_memory_bytes"] > 0
    runs = [r for r in res["runs"] if "error" not in r]
    ran = {r["config"] for r in runs}
    expected = {n for n in harness.DEFAULT_CONFIGS if harness.available(dict(harness.CONFIGS)[n]) is None}
    assert expected <= ran and {"on-demand", "lru"} <= ran
    assert {r["residency"] for r in runs if r["config"] == "lru"} == set(harness.QUICK_RESIDENCIES)
    for r in runs:
        for key in ("hit_rate", "high_hit_rate", "low_hit_rate", "miss_rate", "skip_rate",
                    "decode_hit_rate", "argmax_agreement"):
            assert 0.0 <= r[key] <= 1.0, (r["config"], key, r[key])
        assert r["high_hit_rate"] + r["low_hit_rate"] + r["miss_rate"] + r["skip_rate"] == pytest.approx(1.0)
        assert r["prompt_tps"] > 0 and r["decode_tps"] > 0
        assert r["prompt_tps_ratio"] > 0 and r["decode_tps_ratio"] > 0
        assert r["bytes_per_token"] >= 0 and r["peak_memory_bytes"] > 0 and r["budget_bytes"] > 0
        assert r["ppl"] > 0 and r["generated_tokens"] == 16
        if r["prefetch_issued"] == 0:
            assert r["prefetch_precision"] is None and r["prefetch_recall"] is None
        else:
            assert 0.0 <= r["prefetch_precision"] <= 1.0 and 0.0 <= r["prefetch_recall"] <= 1.0
    on_demand = next(r for r in runs if r["config"] == "on-demand")
    assert on_demand["hit_rate"] == 0 and on_demand["bytes_read"] > 0
    for r in runs:
        if harness._is_exact_cache_only(r["kwargs"]):  # exact: same tokens and likelihoods as mlx-lm
            assert r["generation_identical"] and r["argmax_agreement"] == 1.0
            assert r["ppl"] == pytest.approx(r["ppl_baseline"], rel=1e-4)


def test_harness_quick_host_time_syncs_and_memory(quick_run):
    out, res = quick_run
    base = res["baseline"]
    assert base["python_ms_per_layer_call"] > 0 and base["python_layer_calls"] > 0
    assert res["baseline"]["pooled"]["python_ms_per_layer_call"] > 0
    runs = {(r["config"], r["residency"]): r for r in res["runs"] if "error" not in r}
    for r in runs.values():
        # decode only: (max_tokens - 1) steps timed (mlx-lm builds the first before the first
        # token is out), one call per MoE layer each
        assert r["python_layer_calls"] == 4 * 15, r["config"]
        assert r["python_ms_per_layer_call"] > 0 and r["baseline_python_ms_per_layer_call"] > 0
        assert r["python_ms_ratio"] == pytest.approx(
            r["python_ms_per_layer_call"] / r["baseline_python_ms_per_layer_call"])
        assert r["peak_vs_budget"] == pytest.approx(r["peak_memory_bytes"] / r["budget_bytes"])
        # no rebuild for KV growth here; one when reads measured cheap gave the 2-bit pool back
        given_back = len(r["pool_slots"] or []) > 1 and 0 in r["pool_slots"]
        assert 0 <= r["host_syncs_per_token"] <= 4 and r["pool_rebuilds"] <= int(given_back)
        assert r["kv_reserve_bytes"] > 0 and r["activation_reserve_bytes"] >= 0 and r["pool_slots"]
    resident = runs[("exact-resident", 1.0)]
    # every expert preloaded: nothing read, every layer call lazy (no host sync), mlx-lm's tokens
    assert resident["preloaded"] and resident["hit_rate"] == 1.0 and resident["bytes_read"] == 0
    assert resident["host_syncs_per_token"] == 0 and resident["decode_lazy_call_share"] == 1.0
    assert resident["generation_identical"] and resident["capacity_experts"] == 4 * 32
    # a quarter of the experts: every decode layer call can miss, so each syncs once
    assert runs[("lru", 0.25)]["host_syncs_per_token"] == 4
    assert runs[("lru", 0.25)]["capacity_experts"] == 32 and not runs[("lru", 0.25)]["preloaded"]
    md = (out / "quick.md").read_text()
    assert "peak/budget" in md and "py ms/call" in md and "syncs/token" in md


def test_replay_reproduces_the_runtime_when_calls_split(tiny_model):
    """A pool smaller than a prefill chunk's experts: the runtime runs the chunk in groups, and the
    replay of its trace (``fetch_group`` "slots") gives the hit rate the runtime measured."""
    import hobbit_mlx
    from bench import harness_runs

    src, store = tiny_model
    model, _ = hobbit_mlx.load(store, expert_residency=0.0625, exact=True, prefetch_layers=0,
                               policy="lru", progress=False)
    rt = hobbit_mlx.runtime_of(model)
    try:
        capacity = sum(pool.slots for pool in harness_runs.high_pools(rt))
        assert capacity == 8
        trace = tr.record(model, _small_workload(src, max_tokens=16))
        measured = hobbit_mlx.offload_stats(model)
    finally:
        rt.close()
    assert trace.meta["fetch_group"] == "slots"
    assert max(len(np.unique(trace.call(i))) for i in range(len(trace))) > capacity  # it split
    replayed = rp.replay(trace, "runtime:lru", capacity)
    assert replayed["requests"] == measured["expert_requests"]
    assert replayed["hits"] == measured["hits_high"] and replayed["not_cached"] == 0


def test_teacher_forced_trace_tags_prompt_and_decode_calls(tiny_model):
    """``trace.py --held-out``: each piece's prompt calls are tagged prefill, one call per layer
    per fed token decode, and replaying LRU gives the runtime's own hit count."""
    import hobbit_mlx
    from bench import harness_runs

    _src, store = tiny_model
    model, _ = hobbit_mlx.load(store, expert_residency=0.25, exact=True, prefetch_layers=0,
                               policy="lru", progress=False)
    rt = hobbit_mlx.runtime_of(model)
    pieces = [[3, 5, 7, 9, 11, 13, 2, 4, 6, 8], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    try:
        hobbit_mlx.reset_stats(model)
        trace = tr.record_forced(model, pieces, 6)
        measured = hobbit_mlx.offload_stats(model)
        capacity = sum(pool.slots for pool in harness_runs.high_pools(rt))
    finally:
        rt.close()
    layers = trace.num_layers
    decode = trace.phase == 1
    assert list(np.bincount(trace.sequence[decode])) == [4 * layers, 4 * layers]
    rows = np.diff(trace.offsets)
    assert (rows[decode] == 1).all() and (rows[~decode] == 6).all()
    assert list(np.bincount(trace.sequence[~decode])) == [layers, layers]
    replayed = rp.replay(trace, "runtime:lru", capacity)
    assert replayed["requests"] == measured["expert_requests"]
    assert replayed["hits"] == measured["hits_high"]


def test_prefetch_replay_records_a_live_run(tiny_model):
    import hobbit_mlx
    from bench import harness_runs
    from hobbit_mlx.offload import Fetch
    from hobbit_mlx.policies import make_policy

    src, store = tiny_model
    model, _ = hobbit_mlx.load(store, expert_residency=0.25, exact=True, prefetch_layers=1,
                               prefetch_scratch=0, policy="lru", keep_shallow_layers=0,
                               progress=False)  # (the replay models guesses in pool slots)
    rt = hobbit_mlx.runtime_of(model)
    init, pf = Fetch.__init__, rt.prefetcher
    try:
        harness_runs._warmup(model, rt.prefill_step_size)
        harness_runs.empty_pools(rt)
        hobbit_mlx.reset_stats(model)
        events = pr.record_events(model, _small_workload(src))
        measured = hobbit_mlx.offload_stats(model)
        capacity = sum(pool.slots for pool in harness_runs.high_pools(rt))
    finally:
        rt.close()
    # the spies are gone again
    assert Fetch.__init__ is init and "consume" not in vars(pf) and "_issue" not in vars(pf)
    assert "defer" not in vars(rt)
    kinds = {ev[0] for ev in events}
    assert {"seq", "demand", "predict", "call_end"} <= kinds
    # one demand key per expert request the runtime counted (fetch groups and lazy calls)
    assert sum(len(ev[2]) for ev in events if ev[0] == "demand") == measured["expert_requests"]
    # each release comes after its layer's demand
    for i, ev in enumerate(events):
        if ev[0] == "call_end":
            assert any(e[0] == "demand" and e[1] == ev[1] for e in events[:i])
    out = pr.replay_with_prefetch(events, make_policy("lru", num_layers=4), capacity)
    assert out["hits"] + out["misses"] == measured["expert_requests"]
    assert 0 < out["prefetch_reads"] and abs(out["hit_rate"] - measured["hit_rate"]) < 0.1


def test_harness_replay_reproduces_measured_lru(quick_run):
    _, res = quick_run
    assert res["replay"] and {"lru", "lfu", "fifo", "belady"} <= {r["policy"] for r in res["replay"]}
    for row in res["replay"]:
        assert 0.0 <= row["hit_rate"] <= row["belady_hit_rate"] + 1e-12
    checks = [c for c in res["replay_check"] if c["config"] == "lru"]
    assert len(checks) == 2
    for c in checks:
        assert c["replayed"] == pytest.approx(c["measured"], abs=1e-12)


def test_forced_decode_compares_configurations_on_the_same_tokens(tiny_model, tmp_path):
    """Every configuration decodes the same held-out tokens: exact offloading scores mlx-lm's
    likelihoods and argmax exactly; a lossy one reads fewer bytes than exact LRU."""
    from bench import forced_decode

    out = tmp_path / "out"
    assert forced_decode.main(["--model", str(tiny_model[0]), "--residencies", "0.25",
                               "--prompt-tokens", "8", "--tokens", "8", "--pieces", "1",
                               "--configs", "lru,default", "--config",
                               'pf={"exact": true, "prefetch_layers": 1, "prefetch_cost_aware": false}',
                               "--out", str(out), "--name", "fd"]) == 0
    res = json.loads((out / "fd.json").read_text())
    assert res["complete"] and "partial" not in (out / "fd.md").read_text()
    assert sorted(x.name for x in out.iterdir()) == ["fd.json", "fd.md"]  # no temporary left
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["lru"]["ppl_x"] == pytest.approx(1.0, abs=1e-5)
    assert rows["lru"]["top1_agree"] == 1.0 and rows["lru"]["x_lru"] == 1.0
    assert rows["lru"]["bytes"] > 0 and rows["lru"]["misses_low"] == 0
    assert rows["default"]["bytes"] < rows["lru"]["bytes"]
    # KL from mlx-lm's distributions: nil where exact, above it where lossy
    assert abs(rows["lru"]["kl"]) < 1e-5 and rows["default"]["kl"] > 1e-4
    assert rows["default"]["x_lru"] > 0 and "| default | 25.0% |" in (out / "fd.md").read_text()
    pf = rows["pf"]  # exact with prefetch: the same likelihoods; its guesses are part of the bytes
    assert pf["ppl_x"] == pytest.approx(1.0, abs=1e-5) and pf["top1_agree"] == 1.0
    assert 0 < pf["prefetch_bytes"] <= pf["bytes"] and pf["prefetch_used"] <= pf["prefetch_issued"]
    assert rows["lru"]["prefetch_issued"] == 0


def test_low_rounding_compares_the_two_roundings_on_the_same_tokens(tiny_model, tmp_path):
    """Both conversions are made and decoded; the fitted rounding loses less of the weights."""
    from bench import low_rounding

    out, work = tmp_path / "out", tmp_path / "work"
    assert low_rounding.main(["--model", str(tiny_model[0]), "--residencies", "0.25",
                              "--prompt-tokens", "8", "--tokens", "4", "--pieces", "1",
                              "--configs", "default", "--work", str(work), "--out", str(out),
                              "--name", "lr"]) == 0
    text = (out / "lr.md").read_text()
    fitted, nearest = (float(x) for x in text.split("| all | ")[1].split(" |")[:2])
    assert 0 < fitted < 0.8 * nearest
    kls = text.split("| default | 25.0% | ")[1].split(" (")[0].split(" / ")
    assert all(float(k) > 0 for k in kls)  # (the tiny model's lossy runs differ from mlx-lm)
    assert "| default | 25.0% |" in text
    for rounding in ("fitted", "nearest"):
        assert json.loads((out / f"lr-{rounding}.json").read_text())["complete"]
    low = "experts/low/layer_000.safetensors"
    assert (work / "fitted" / low).read_bytes() != (work / "nearest" / low).read_bytes()


def test_calibration_compares_fitted_and_calibrated_copies_on_the_same_tokens(tiny_model,
                                                                            tmp_path):
    """The fitted conversion and its calibrated copy are both decoded; only the low copies
    differ between them."""
    from bench import calibration

    out, work = tmp_path / "out", tmp_path / "work"
    text = tmp_path / "text.py"
    text.write_text("def double(x):\n    return x * 2\n" * 60)
    assert calibration.main(["--model", str(tiny_model[0]), "--text", str(text),
                             "--calibration-tokens", "200", "--residencies", "0.25",
                             "--prompt-tokens", "8", "--tokens", "4", "--pieces", "1",
                             "--work", str(work), "--out", str(out), "--name", "cal"]) == 0
    report = (out / "cal.md").read_text()
    assert "Calibrated on 200 tokens" in report
    for config in ("default", "mixed-only"):
        kls = report.split(f"| {config} | 25.0% | ")[1].split(" (")[0].split(" / ")
        assert all(float(k) > 0 for k in kls)
    for label in ("fitted", "calibrated"):
        assert json.loads((out / f"cal-{label}.json").read_text())["complete"]
    from hobbit_mlx.store import load_manifest

    fitted, calibrated = (load_manifest(work / m) for m in ("fitted", "calibrated"))
    assert (fitted.low_rounding, calibrated.low_rounding) == ("fitted", "calibrated")
    assert [f for f in fitted.files if "/low/" not in f] == \
        [f for f in calibrated.files if "/low/" not in f]


def test_forced_decode_keeps_the_rows_of_a_run_cut_short(tmp_path):
    """Results are rewritten after every run, so an 80-minute run stopped early keeps its rows,
    marked partial."""
    from bench.forced_decode import write_results

    row = {"config": "lru", "residency": 0.25, "tps": 0.594, "x_lru": 1.0, "x_mlx_lm": 0.15,
           "bytes": 1024.0, "prefetch_bytes": 0.0, "prefetch_used": 0.0, "prefetch_issued": 0.0,
           "misses_high": 1.0, "misses_low": 0.0, "skipped": 0.0, "ppl_x": 1.0, "top1_agree": 1.0}
    text = write_results(tmp_path, "cut", [row], runs=3, head=["# cut"], configs=[("lru", {})],
                         json_extra={})
    assert "**partial**: 1 of 3 runs" in text and "| lru | 25.0% | 0.594 |" in text
    assert "| 1 | 0 | n/a | 1.00 |" in text  # no prefetch: guesses used / read n/a, not 0.00 / 0.00
    saved = json.loads((tmp_path / "cut.json").read_text())
    assert saved["complete"] is False and saved["rows"] == [row]
    write_results(tmp_path, "cut", [row] * 3, runs=3, head=["# cut"], configs=[("lru", {})],
                  json_extra={})
    assert json.loads((tmp_path / "cut.json").read_text())["complete"] is True
    assert "partial" not in (tmp_path / "cut.md").read_text()


def test_widened_reference_computes_what_the_reference_computes(tmp_path):
    """The realistic-size model of ``make_synthetic.py --widen-reference``: experts twice as wide
    (new down-projection columns zero, old quantized groups kept), the same logits as the
    reference model, so its trained routing and tokens carry over."""
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from bench.make_synthetic import widen_reference
    from bench.workload import REFERENCE_MODEL

    out = widen_reference(tmp_path / "wide", 2, log=lambda *_: None)
    ref_config = json.loads((REFERENCE_MODEL / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 2 * ref_config["moe_intermediate_size"]
    ref, tok = mlx_load(str(REFERENCE_MODEL))
    wide, _ = mlx_load(str(out))
    inter = ref_config["moe_intermediate_size"]
    ref_mlp, wide_mlp = ref.model.layers[3].mlp.switch_mlp, wide.model.layers[3].mlp.switch_mlp
    assert mx.array_equal(wide_mlp.gate_proj.weight[:, :inter], ref_mlp.gate_proj.weight)
    assert not mx.array_equal(wide_mlp.gate_proj.weight[:, inter:], wide_mlp.gate_proj.weight[:, :inter])
    down = mx.dequantize(wide_mlp.down_proj.weight, wide_mlp.down_proj.scales,
                         wide_mlp.down_proj.biases, group_size=64, bits=4)
    assert down.shape[-1] == 2 * inter and mx.all(down[..., inter:] == 0).item()
    ids = mx.array([tok.encode("def main():\n    return sorted(items)\n")])
    assert mx.array_equal(ref(ids), wide(ids))


def test_prompt_reuse_prefills_only_what_the_last_turn_did_not(tiny_model, tmp_path):
    """``prompt_reuse.py``: the same conversation through a server worker with and without the
    prompt cache. With it, each turn after the first reuses the previous prompt and reply (all
    but what the chat template renders differently) and prefills only the rest; without, every
    prompt is prefilled whole. Exact mode: the same replies either way."""
    from bench import prompt_reuse

    out = tmp_path / "out"
    assert prompt_reuse.main(["--model", str(tiny_model[0]), "--turns", "3", "--max-tokens", "4",
                              "--out", str(out), "--name", "pr"]) == 0
    assert sorted(x.name for x in out.iterdir()) == ["pr.json", "pr.md"]
    res = json.loads((out / "pr.json").read_text())
    md = (out / "pr.md").read_text()
    assert md.startswith("# Prompt reuse") and "Command: `python bench/prompt_reuse.py" in md
    assert "| prompt tokens prefilled |" in md and "**3 of 3** turns" in md
    assert res["meta"]["storage"] == "mac-like" and res["meta"]["calibration"]["bandwidth"] > 0
    off, on = res["runs"]["no_reuse"], res["runs"]["reuse"]
    assert [r["turn"] for r in off] == [r["turn"] for r in on] == [1, 2, 3]
    assert res["same_reply"] == [True] * 3 and res["replies"]["reuse"] == res["replies"]["no_reuse"]
    assert [r["prompt_tokens"] for r in off] == [r["prompt_tokens"] for r in on]
    assert all(r["cached_tokens"] == 0 and r["prefilled_tokens"] == r["prompt_tokens"] for r in off)
    assert on[0]["cached_tokens"] == 0
    for prev, r in zip(on, on[1:]):  # the last prompt and reply, give or take a token or two
        assert prev["prompt_tokens"] < r["prompt_tokens"]
        assert prev["prompt_tokens"] - 2 <= r["cached_tokens"] \
            <= prev["prompt_tokens"] + prev["generated_tokens"]
        assert r["prefilled_tokens"] == r["prompt_tokens"] - r["cached_tokens"] >= 1
    for r in off + on:
        assert 0 < r["ttft_s"] <= r["wall_s"] and r["generated_tokens"] >= 1
        assert 0 < r["bytes_read_by_first_token"] <= r["bytes_read"]
    t = res["totals"]
    assert t["reuse"]["prefilled_tokens"] < t["no_reuse"]["prefilled_tokens"]
    assert t["ratio"]["prefilled_tokens"] == pytest.approx(
        t["reuse"]["prefilled_tokens"] / t["no_reuse"]["prefilled_tokens"])
    assert t["no_reuse"]["bytes_read"] == sum(r["bytes_read"] for r in off)


def test_kept_prompts_resumes_conversations_from_disk(tiny_model, tmp_path):
    """``kept_prompts.py``: two conversations taking turns, with the last request's cache only
    and with files on disk (each written and read only where it measures to pay: on this tiny
    model it is close, so how many is left open). Exact mode: the same replies."""
    from bench import kept_prompts

    out = tmp_path / "out"
    assert kept_prompts.main(["--model", str(tiny_model[0]), "--conversations", "2", "--turns",
                              "2", "--max-tokens", "4", "--storage", "warm", "--settings",
                              "last,kept", "--out", str(out), "--name", "kp"]) == 0
    res = json.loads((out / "kp.json").read_text())
    md = (out / "kp.md").read_text()
    assert md.startswith("# Prompt caches kept on disk") and "| reused from disk |" in md
    assert res["identical"] == {"kept": 4}
    last, kept = res["totals"]["last"], res["totals"]["kept"]
    files = res["files"]["kept"]
    assert last["cached_from_disk"] == 0 and res["files"]["last"] is None
    assert last["prompt_tokens"] == kept["prompt_tokens"]
    assert kept["from_memory"] + kept["cached_from_disk"] == kept["cached_tokens"]
    assert files["written"] + files["not_worth"] >= 2  # (each switch decided)
    assert (kept["cached_from_disk"] > 0) == (files["read"] > 0) == (kept["kv_read"] > 0)
    assert kept["prefilled_tokens"] <= last["prefilled_tokens"]
    assert [(r["conversation"], r["turn"]) for r in res["runs"]["kept"]] == \
        [(1, 1), (2, 1), (1, 2), (2, 2)]


def test_kv_quant_gives_the_kv_bytes_to_the_expert_pools(tiny_model, tmp_path):
    """``kv_quant.py``: one budget for every ``kv_bits``; a quantized KV cache takes less of it
    and the expert pools get the rest. The same text decodes through each (teacher-forced, so
    every step has the same inputs); the unquantized run is the reference of the agreement."""
    from bench import kv_quant

    out = tmp_path / "out"
    assert kv_quant.main(["--model", str(tiny_model[0]), "--prompt-tokens", "300",
                          "--max-tokens", "6", "--kv-bits", "none,8,4", "--kv-group-size", "32",
                          "--expert-share", "0.25", "--storage", "1MB/s", "--out", str(out),
                          "--name", "kq"]) == 0
    assert sorted(x.name for x in out.iterdir()) == ["kq.json", "kq.md"]
    md = (out / "kq.md").read_text()
    assert md.startswith("# A quantized KV cache") and "Command: `python bench/kv_quant.py" in md
    res = json.loads((out / "kq.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["exact", "exact kv8", "exact kv4"] and "| exact kv4 |" in md
    budget = res["meta"]["budget"]["budget_bytes"]
    assert res["meta"]["kv_share_unquantized"] == pytest.approx(
        res["meta"]["unquantized_kv_bytes"] / budget)
    full, kv8, kv4 = rows["exact"]["plan"], rows["exact kv8"]["plan"], rows["exact kv4"]["plan"]
    assert full["budget_bytes"] == kv8["budget_bytes"] == kv4["budget_bytes"] == budget
    assert full["kv_reserve_bytes"] == res["meta"]["unquantized_kv_bytes"]
    for q in (kv8, kv4):  # the KV bytes saved went to the pools
        assert q["kv_reserve_bytes"] < full["kv_reserve_bytes"]
        assert q["expert_pool_bytes"] > full["expert_pool_bytes"]
        assert q["high_slots"] > full["high_slots"] and q["resident_share"] > full["resident_share"]
    assert kv4["kv_bytes_per_token"] < kv8["kv_bytes_per_token"] < full["kv_bytes_per_token"]
    assert rows["exact"]["agreement"] == {"prefix": 1.0, "overall": 1.0, "first_difference": None}
    assert rows["exact"]["x_unquantized"] == 1.0
    for r in rows.values():
        assert len(r["top"]) == len(r["ll"]) == 6 and r["decode_tps"] > 0
        assert r["decode_requests_per_token"] == 4 * 4  # every layer's top-4, none skipped
        assert 0 <= r["decode_served"] <= 1 and 0 < r["peak_vs_budget"] <= 1.0
        assert 0 <= r["agreement"]["prefix"] <= r["agreement"]["overall"] <= 1
        # the prompt's chunks read past the simulated device (1 MB/s), the decode steps from it
        assert 0 < r["prefill_s"] < r["prefill_bytes"] / 1e6
        assert r["decode_s"] >= r["decode_bytes_per_token"] * 6 / 1e6 > 0


def _float_dtypes(model) -> set:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return {a.dtype for _, a in tree_flatten(model.parameters()) if mx.issubdtype(a.dtype, mx.floating)}


def test_hot_path_baseline_computes_in_hobbit_mlx_dtype(tiny_model, tmp_path, monkeypatch):
    """The mlx-lm baseline takes the dtype hobbit_mlx computes in (``compute_dtype``), not float32
    always: on Metal hobbit_mlx keeps the checkpoint's bf16, and a float32 baseline made "same
    tokens" say no and skewed the speed ratios. bfloat16 stands in for the GPU's choice here."""
    import mlx.core as mx
    import mlx_lm

    from bench import hot_path

    monkeypatch.setattr("hobbit_mlx.loader.compute_dtype", lambda dtype=None: mx.bfloat16)
    loaded = []
    load = mlx_lm.load
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    out = tmp_path / "out"
    assert hot_path.main(["--model", str(tiny_model[0]), "--residencies", "1", "--reps", "1",
                          "--prompt-tokens", "8", "--max-tokens", "3", "--out", str(out),
                          "--name", "t"]) == 0
    assert len(loaded) == 1 and _float_dtypes(loaded[0][0]) == {mx.bfloat16}
    res = json.loads((out / "hot-path-t.json").read_text())
    assert res["rows"][0]["same_tokens"] is True
    assert res["compute"] == "bfloat16 activations on the CPU backend"
    assert "; bfloat16 activations on the CPU backend." in (out / "hot-path-t.md").read_text()


def test_the_baseline_keeps_the_checkpoint_dtype_where_hobbit_mlx_does(tiny_model, monkeypatch):
    """``compute_dtype()`` None (Metal): the baseline computes in the checkpoint's own dtype (a
    bf16 checkpoint, as every mlx-community model is, stood in for by casting at load)."""
    import mlx.core as mx
    import mlx_lm

    from bench import harness_report, harness_runs

    def load_bf16(*a, **k):
        model, tok = load(*a, **k)
        model.set_dtype(mx.bfloat16)
        return model, tok

    monkeypatch.setattr("hobbit_mlx.loader.compute_dtype", lambda dtype=None: None)
    load = mlx_lm.load
    monkeypatch.setattr(mlx_lm, "load", load_bf16)
    model, _ = harness_runs.load_baseline(tiny_model[0])
    assert _float_dtypes(model) == {mx.bfloat16}
    assert harness_report.compute_note() == "the checkpoint's own dtype activations on the CPU backend"


def test_offload_vs_mlx_lm_reports_the_storage_and_dtype_it_got(tiny_model, tmp_path, monkeypatch,
                                                                 capsys):
    """``--cold`` where the OS gives F_NOCACHE and cannot drop cached pages (macOS, its platform
    calls stood in for here), computing in the checkpoint's dtype (Metal): the report said
    "O_DIRECT, page cache dropped" and "float32 on the CPU backend" whatever happened; it now
    states what the reader did, and warns before the runs, like bench/harness.py."""
    import fcntl
    import os

    from bench import offload_vs_mlx_lm
    from hobbit_mlx import reader

    fcntl_calls = []
    real_fcntl = fcntl.fcntl
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, *a: fcntl_calls.append(cmd) if cmd == 48
                        else real_fcntl(fd, cmd, *a))
    monkeypatch.setattr(reader, "page_cache_bypass", lambda: "F_NOCACHE")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr("hobbit_mlx.loader.compute_dtype", lambda dtype=None: None)
    out = tmp_path / "out"
    assert offload_vs_mlx_lm.main(["--model", str(tiny_model[0]), "--residencies", "0.5",
                                   "--prompts", "1", "--prompt-tokens", "8", "--max-tokens", "2",
                                   "--cold", "--out", str(out), "--name", "r"]) == 0
    assert fcntl_calls  # the reader did take the F_NOCACHE path
    err = capsys.readouterr().err
    assert "warning: this OS cannot drop one file's cached pages; run `sudo purge`" in err
    md = (out / "r.md").read_text()
    assert "O_DIRECT" not in md and "float32" not in md
    assert "storage cold: reads past the page cache (F_NOCACHE), **store pages not dropped**" in md
    assert "both sides the checkpoint's own dtype activations on the CPU backend" in md
    res = json.loads((out / "r.json").read_text())
    assert res["runs"][0]["page_cache_dropped"] is False
    assert res["meta"]["compute"] == "the checkpoint's own dtype activations on the CPU backend"


def test_the_cold_note_names_each_case():
    from bench.harness_report import cold_note

    linux = [{"direct_io": "O_DIRECT", "page_cache_dropped": True}]
    assert cold_note(linux) == ("reads past the page cache (O_DIRECT), store pages dropped "
                                "(posix_fadvise DONTNEED) before each run")
    assert "page cache (none), **store pages not dropped**" in cold_note(
        [{"direct_io": None, "page_cache_dropped": False}])
    assert cold_note([{"error": "BudgetError: too small"}]) == "cold (no run finished)"


def test_victim_cost_prints_a_row_per_resident_count_and_misses(capsys):
    from bench import victim_cost

    victim_cost.main(["--resident", "64,96", "--misses", "1,3", "--layers", "4", "--calls", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert [tuple(r.split("|")[1:3]) for r in rows] == [
        (" 64 ", " 1 "), (" 64 ", " 3 "), (" 96 ", " 1 "), (" 96 ", " 3 ")]


def test_victim_cost_end_to_end_alternates_the_two_choices(tiny_factory, capsys):
    from bench import victim_cost
    from hobbit_mlx.policies.seqfreq import SequenceFrequencyPolicy

    ours = SequenceFrequencyPolicy.victim
    _, dst = tiny_factory("qwen3_moe")
    victim_cost.main(["--model", str(dst), "--residency", "0.5", "--exact", "--reps", "1"])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    assert rows == ["prefill, 64-token chunks", "decode"]
    assert SequenceFrequencyPolicy.victim is ours  # (the runtime's own choice put back)


def test_calibration_cost_scales_the_experts_timed_to_the_layer_and_model(tmp_path, capsys):
    from bench import calibration_cost

    assert calibration_cost.main(["--shape", "3,8,128,64", "--experts", "2", "--inputs", "40",
                                  "--out", str(tmp_path), "--name", "cost"]) == 0
    report = (tmp_path / "cost.md").read_text()
    assert report == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = {line.split(" | ")[0].strip("| *"): line.split(" | ")[1:]
            for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    steps = ["sums", "factors", "gate", "up", "down"]
    assert set(steps) < set(rows)
    timed = sum(float(rows[s][0]) for s in steps)
    per_layer = float(rows["layer"][1].strip("*| "))
    assert abs(float(rows["layer"][0]) - timed) <= 0.01 * len(steps)
    # 8 / 2 experts (each side rounded: the layer's to 0.1 s, the timed sum's to 0.01 s)
    assert abs(per_layer - 4 * float(rows["layer"][0])) <= 0.05 + 4 * 0.005 + 1e-9
    minutes = float(report.split("The model's 3 layers: ")[1].split(" min")[0])
    assert abs(minutes - per_layer * 3 / 60) <= 0.05 + 0.05 * 3 / 60 + 1e-9


@pytest.mark.parametrize("args,message", [
    (["--shape", "big"], "one of qwen3-30b-a3b"),
    (["--shape", "2,8,100,64"], "multiples of 64"),
])
def test_calibration_cost_refuses_a_shape_it_cannot_time(args, message, capsys):
    from bench import calibration_cost

    with pytest.raises(SystemExit) as e:
        calibration_cost.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
