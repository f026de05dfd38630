"""One rank of a pipeline check, started by ``mlx.launch`` (tests and bench).

    mlx.launch -n 2 --backend ring --python PYTHON pipeline_worker.py SPEC.json OUT.json

SPEC is a list of cases ``{"name", "model": path or [path per rank], "budgets": [per rank],
"split", "exact", "prompt": [token ids], "max_tokens", "options", "rank_options": {rank: {...}},
"lockstep", "cli"}``; every rank runs them
in order (``cli``: loaded as the command-line tools load, their errors as they print them). Rank 0 writes OUT: per case the greedy tokens, every rank's stats (with the store files it
read) and the error, if any, each rank raised. A failed case leaves the ranks connected, so the
next case runs.

    mlx.launch ... pipeline_worker.py --per-rank MODULE ARG...

runs ``python -m MODULE`` with the arguments, each ``A|B`` given as A to rank 0 and B to rank 1
(ranks started with different flags).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path


def _log_reads(files_read: set) -> None:
    """Record which store files the reader touches (every read goes through these two)."""
    from hobbit_mlx.reader import RecordReader

    preadv, read_span = RecordReader._preadv, RecordReader._read_span

    def _preadv(self, file_idx, *args):
        files_read.add(self.manifest.files[file_idx])
        return preadv(self, file_idx, *args)

    def _read_span(self, file_idx, *args):
        files_read.add(self.manifest.files[file_idx])
        return read_span(self, file_idx, *args)

    RecordReader._preadv, RecordReader._read_span = _preadv, _read_span


def run_case(case: dict, group, files_read: set) -> dict:
    import hobbit_mlx
    from hobbit_mlx.pipeline import gather_stats, gather_json

    rank = group.rank()
    model_dir = case["model"][rank] if isinstance(case["model"], list) else case["model"]
    budgets = case.get("budgets")
    options = dict(case.get("options") or {})
    if budgets is not None:
        options["memory_budget"] = budgets[rank]
    if case.get("split"):
        options["pipeline_split"] = tuple(case["split"])
    options.update((case.get("rank_options") or {}).get(str(rank), {}))
    files_read.clear()
    if case.get("cli"):
        return cli_load(model_dir, options, group)
    try:
        model, tokenizer = hobbit_mlx.load(model_dir, pipeline=group,
                                           exact=options.pop("exact", case.get("exact", True)),
                                           progress=False, **options)
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors = gather_json(group, f"{type(e).__name__}: {e}")
        return {"errors": errors}
    gather_json(group, None)  # the same collectives as a failed load
    if case.get("die_rank") is not None:  # a rank that dies: the others must fail, not hang
        if rank == case["die_rank"]:
            os._exit(0)
        t0 = time.perf_counter()
        try:
            hobbit_mlx.generate(model, tokenizer, case["prompt"], max_tokens=case["max_tokens"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            return {"dead": True, "error": f"{type(e).__name__}: {e}",
                    "after_s": time.perf_counter() - t0}
        return {"dead": True, "error": None}
    if case.get("lockstep"):
        return lockstep_tokens(model, tokenizer, case, group)
    hobbit_mlx.reset_stats(model)
    from hobbit_mlx import _with_defaults

    _with_defaults(model, tokenizer, case["prompt"], {"max_tokens": case["max_tokens"]})
    tokens, timing = timed_tokens(model, case["prompt"], case["max_tokens"])
    stats = gather_stats(model)
    own = {"files_read": sorted(files_read),
           "modules": [l.module_path for l in hobbit_mlx.runtime_of(model).manifest.layers]}
    extra = gather_json(group, own)
    for s, e in zip(stats, extra):
        s.update(e)
    from hobbit_mlx.pipeline import pipeline_of

    pipeline_of(model).barrier()
    hobbit_mlx.runtime_of(model).close()
    return {"tokens": tokens, "stats": stats, **timing}


def cli_load(model_dir: str, options: dict, group) -> dict:
    """Load as ``python -m hobbit_mlx.generate --pipeline`` does, the group just joined (a rank
    may fail before the ranks meet in ``Pipeline.start``); every rank's error line."""
    import contextlib
    import importlib
    import io

    from hobbit_mlx import cli_common as cli, cli_flags, pipeline
    from hobbit_mlx.cli_load import load_model  # (this function's own name is cli_load)
    from hobbit_mlx.pipeline import join

    generate = importlib.import_module("hobbit_mlx.generate")  # (the package's is a function)

    join._UNSTARTED[:] = [group]  # (as init_group leaves it)
    flags = ["--model", model_dir, "--pipeline", "--exact", "--quiet-report",
             "--memory-budget", str(options.get("memory_budget", "2MB"))]

    def main(_argv) -> int:
        args = generate.setup_arg_parser().parse_args(flags)
        args.pipeline_group = group
        cli_flags.check_args(args)
        model, _, _ = load_model(args)
        pipeline.pipeline_of(model).barrier()
        return 0

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli._run(main, None)
    lines = [l for l in err.getvalue().splitlines() if l.startswith("error:")]
    return {"errors": pipeline.gather_json(group, [code, lines])}


def lockstep_tokens(model, tokenizer, case: dict, group) -> dict:
    """Greedy tokens through ``Lockstep.generate`` (as generate, chat and the server run a
    pipeline), the end of sequence banned, and each rank's room for the reply."""
    import mlx.core as mx

    import hobbit_mlx
    from hobbit_mlx.pipeline import Lockstep, gather_json, pipeline_of

    rooms = gather_json(group, hobbit_mlx.runtime_of(model).plan.longest_context
                        - len(case["prompt"]))
    eos = mx.array(sorted(tokenizer.eos_token_ids))
    lock = Lockstep(pipeline_of(model))
    tokens = [r.token for r in lock.generate(
        model, tokenizer, case["prompt"], case["max_tokens"],
        logits_processors=[lambda _, logits: logits.at[:, eos].add(-1e9)])]
    pipeline_of(model).barrier()
    hobbit_mlx.runtime_of(model).close()
    return {"tokens": tokens, "rooms": rooms}


def timed_tokens(model, prompt: list[int], max_tokens: int) -> tuple[list[int], dict]:
    """Greedy tokens, the time to the first one and the decode rate after it."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    tokens, stamps = [], []
    t0 = time.perf_counter()
    for (tok, _), _ in zip(generate_step(mx.array(prompt), model, sampler=make_sampler(0.0)),
                           range(max_tokens)):
        tokens.append(int(tok))
        stamps.append(time.perf_counter())
    decode_s = stamps[-1] - stamps[0]
    return tokens, {"first_token_s": stamps[0] - t0, "decode_s": decode_s,
                    "decode_tps": (len(stamps) - 1) / decode_s if decode_s > 0 else None}


def per_rank(argv: list[str]) -> None:
    """``python -m argv[0] argv[1:]``, each ``A|B`` argument A on rank 0 and B on rank 1."""
    import runpy

    rank = int(os.environ.get("MLX_RANK", "0"))
    sys.argv = [argv[0]] + [a.split("|")[rank] if "|" in a else a for a in argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def main(argv: list[str]) -> int:
    import mlx.core as mx

    if argv[0] == "--per-rank":
        per_rank(argv[1:])
        return 0

    spec, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    timeout = float(os.environ.get("HOBBIT_WORKER_TIMEOUT", "0"))
    if timeout:  # a hung rank prints where it hangs and exits instead of hanging its caller
        faulthandler.dump_traceback_later(timeout, exit=True)
    from hobbit_mlx.pipeline import init_group

    group = init_group("ring")
    out.with_name(out.name + ".started").touch()  # the ring backend could start
    files_read: set = set()
    _log_reads(files_read)
    results = {}
    for case in spec:
        results[case["name"]] = run_case(case, group, files_read)
        if results[case["name"]].get("dead"):  # the group is gone: report and stop
            out.write_text(json.dumps(results, default=str))
            return 0
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    if group.rank() == 0:
        out.write_text(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
