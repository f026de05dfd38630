"""Mutation testing of the core (not run by CI: it takes tens of minutes on two cores).

Each target mutates one module (or some functions of one) with mutmut and runs only the fast
tests that exercise it, in a scratch copy of the repository, so the working tree is untouched:

    pip install -e ".[test,mutation]"
    nice python bench/mutation.py --targets cache,budget,precision,reader,counters \\
        --out bench/results/mutation.md

A mutant *survives* when every selected test still passes with it; the report lists each
survivor with its diff, so that it can be judged an equivalent mutant or answered by a test.
Score = (killed + timeout) / all mutants tried; mutants no selected test reaches count as
survivors. A timeout is a mutant whose tests ran past mutmut's limit (``--timeout-multiplier``
times the clean run): an endless loop, or a wait the mutant broke; the report counts them apart.

``--sample N`` tries every N-th mutant of a target (the sorted names, from the first), so a
module runs in a fraction of the time on a loaded machine; the score is then the sample's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the offload counters: a fetch's hits and misses, lazy calls counted later
COUNTER_TESTS = ["tests/test_counters.py", "tests/test_faults.py", "tests/test_pins_e2e.py",
                 "tests/test_exact.py::test_expert_groups_when_pool_is_small"]

TARGETS = {
    "budget": dict(module="hobbit_mlx/budget.py", tests=[
        "tests/test_budget_properties.py", "tests/test_budget_plan.py",
        "tests/test_store.py::test_parse_size", "tests/test_store.py::test_parse_size_rejects_garbage",
    ]),
    "cache": dict(module="hobbit_mlx/cache.py", tests=[
        "tests/test_cache_properties.py",
        "tests/test_techniques.py::test_cache_never_exceeds_capacity_and_respects_pins",
        "tests/test_techniques.py::test_shallow_policy_evicts_deep_layers_first",
        "tests/test_techniques.py::test_hobbit_policy_prefers_to_evict_the_layer_just_computed",
        "tests/test_techniques.py::test_arc_keeps_a_reused_expert_through_a_scan",
        "tests/test_prefetch.py::test_held_experts_yield_to_demand_but_not_to_other_predictions",
        "tests/test_prefetch.py::test_a_slot_a_pending_graph_reads_is_not_reused_before_the_sync",
        "tests/test_prefetch.py::test_a_prefetched_expert_counts_no_use",
        "tests/test_prefetch.py::test_a_prefetched_expert_ranks_below_one_used_once",
        # lazy calls: layer views, remaps on the device, hits told later, every expert resident
        "tests/test_counters.py::test_layers_all_resident_run_lazily_beside_layers_that_miss",
        "tests/test_exact.py::test_whole_model_resident_is_preloaded_and_never_syncs",
        "tests/test_prefetch.py::test_protected_shallow_layers_are_evicted_last",
        "tests/test_pins_e2e.py",  # a model-level test: layer views, remaps, hits recorded later
        "tests/test_exact.py::test_expert_groups_when_pool_is_small",
        # prefetch admission control: ghosts of evicted experts, a guess against a victim's worth
        "tests/test_storage_cost.py::test_ghosts_measure_how_often_a_victim_is_needed_again",
        "tests/test_storage_cost.py::test_a_guess_evicts_only_a_victim_worth_less",
    ]),
    "precision": dict(module="hobbit_mlx/precision.py", tests=[
        "tests/test_techniques.py::test_hobbit_thresholds_rank_by_gate_weight",
        "tests/test_techniques.py::test_big_little_drops_the_lower_half_of_confident_tokens_and_renormalizes",
        "tests/test_prefetch.py::test_demote_unpopular_marks_rarely_chosen_experts_low",
        "tests/test_precision_served.py",
        "tests/test_precision_rules.py",
    ]),
    "reader": dict(module="hobbit_mlx/reader.py", tests=[
        "tests/test_reader_reads.py", "tests/test_faults.py", "tests/test_shutdown.py",
        "tests/test_counters.py::test_bytes_read_are_the_bytes_the_reader_read",
        "tests/test_reader_modes.py",
        "tests/test_store.py::test_truncated_store_file",
        "tests/test_store.py::test_checksum_mismatch_names_the_file",
        "tests/test_storage.py",
        # O_DIRECT reads of spans off a 4 KiB boundary (a record inside a source checkpoint)
        "tests/test_inplace.py::test_adjacent_spans_are_read_with_one_preadv",
    ]),
    "counters": dict(module="hobbit_mlx/fetch.py", mutants=["hobbit_mlx.fetch.xǁFetchǁ*"],
                     tests=COUNTER_TESTS),
    "deferred-counters": dict(module="hobbit_mlx/runtime.py", mutants=[
        "hobbit_mlx.runtime.xǁOffloadRuntimeǁ_count__*",
        "hobbit_mlx.runtime.xǁOffloadRuntimeǁdefer__*",
        "hobbit_mlx.runtime.xǁOffloadRuntimeǁcount_deferred__*"], tests=COUNTER_TESTS),
}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if rel.startswith("bench/results/") or not (REPO / rel).is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst / rel)


def _statuses(workdir: Path, spec: dict) -> dict:
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                             cwd=workdir, capture_output=True, text=True).stdout
    status = {}
    for line in results.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    pats = [re.compile("^" + re.escape(p).replace(r"\*", ".*") + "$") for p in spec.get("mutants", [])]
    if pats:
        status = {k: v for k, v in status.items() if any(p.match(k) for p in pats)}
    return status


def _mutmut_run(name: str, workdir: Path, children: int, mutants: list) -> None:
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children),
                          *mutants], cwd=workdir, capture_output=True, text=True)
    if run.returncode not in (0, 1):
        raise RuntimeError(f"mutmut failed on {name}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def run_target(name: str, spec: dict, workdir: Path, children: int, sample: int = 1,
               timeout_multiplier: float = 15.0, only: list | None = None) -> dict:
    tests = [t for t in spec["tests"] if (REPO / t.split("::")[0]).exists()]
    (workdir / "setup.cfg").write_text(
        "[mutmut]\nsource_paths=hobbit_mlx\n"
        f"only_mutate={spec['module']}\nalso_copy=convert\n"
        f"timeout_multiplier={timeout_multiplier}\n"
        # A child forked from a process that ran MLX waits forever on its first evaluation (the
        # streams' worker threads are not forked): each mutant runs in a child of a fork server
        # that has only collected the tests (imports start no MLX thread). The constant covers a
        # fresh child's start on a loaded machine.
        "process_isolation=forkserver\ntimeout_constant=5\n"
        "pytest_add_cli_args_test_selection=\n    " + "\n    ".join(tests) + "\n"
        "pytest_add_cli_args=-p no:cacheprovider -q -x\n")
    t0 = time.time()
    if sample > 1 or only is not None:
        # generate the mutants and the test map (no mutant matches), then every N-th (or those
        # named)
        _mutmut_run(name, workdir, children, ["no.such.mutant"])
        chosen = sorted(_statuses(workdir, spec))[::sample] if only is None else sorted(only)
        _mutmut_run(name, workdir, children, chosen)
        status = {k: v for k, v in _statuses(workdir, spec).items() if k in set(chosen)}
    else:
        _mutmut_run(name, workdir, children, spec.get("mutants", []))
        status = _statuses(workdir, spec)
    survivors = {}
    for mutant, st in sorted(status.items()):
        if st != "killed":
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir,
                                  capture_output=True, text=True).stdout
            survivors[mutant] = dict(status=st, diff=diff)
    killed = sum(1 for s in status.values() if s == "killed")
    timeouts = sum(1 for s in status.values() if s == "timeout")
    return dict(module=spec["module"], tests=tests, mutants=len(status), killed=killed,
                timeout=timeouts, sample=sample, score=(killed + timeouts) / max(1, len(status)),
                seconds=round(time.time() - t0), survivors=survivors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--sample", type=int, default=1, help="try every N-th mutant (sorted names)")
    ap.add_argument("--timeout-multiplier", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/mutation.json")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="run only the survivors of the last run in --out again (after tests were "
                         "added) and update its counts; score_before keeps the first score")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.targets.split(","):
        prev = out.get(name) if args.rerun_survivors else None
        with tempfile.TemporaryDirectory(prefix=f"mutmut-{name}-") as tmp:
            _copy_repo(Path(tmp))
            r = run_target(name, TARGETS[name], Path(tmp), args.max_children, args.sample,
                           args.timeout_multiplier, only=[k for k, v in prev["survivors"].items()
                                                          if v["status"] != "timeout"] if prev else None)
        if prev:
            r = dict(prev, tests=r["tests"], killed=prev["killed"] + r["killed"],
                     timeout=prev["timeout"] + r["timeout"],
                     survivors={**{k: v for k, v in prev["survivors"].items()
                                   if v["status"] == "timeout"}, **r["survivors"]},
                     score_before=prev.get("score_before", prev["score"]),
                     seconds=(prev["seconds"] or 0) + r["seconds"])
            r["score"] = (r["killed"] + r["timeout"]) / max(1, r["mutants"])
        out[name] = r
        print(f"{name}: {r['killed']} killed + {r['timeout']} timeouts of {r['mutants']} "
              f"({r['score']:.0%}) in {r['seconds']} s", flush=True)
        with open(args.out.with_name(f"mutation-{name}-survivors.txt"), "w") as f:
            for mutant, sv in r["survivors"].items():
                f.write(f"## {mutant} ({sv['status']})\n{sv['diff'].strip()}\n\n")
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
