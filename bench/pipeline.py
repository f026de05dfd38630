"""Issue 13's benchmark: decode tokens/s on 1 rank against 2 pipeline ranks on this machine, at
the same total memory budget (each rank gets half), exact mode, greedy.

    python bench/pipeline.py [--model PATH] [--budget 20MB] [--max-tokens 64]
        [--simulated-storage mac-ssd] [--out bench/results/pipeline-reference.md]

Both ranks run on this machine's cores, so the 2-rank rate includes their competing for the CPU
and the localhost ring's latency; it is not what two Macs would see (README: "Several Macs").
The 1-rank run and each 2-rank run are separate processes (the page cache is warm for both).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench._path import REPO  # noqa: E402
from bench.workload import heldout_texts  # noqa: E402

WORKER = REPO / "hobbit_mlx" / "testing" / "pipeline_worker.py"


def prompt_tokens(model_dir: Path, n: int) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts, _ = heldout_texts(max_files=1)
    return list(tokenizer.encode(texts[0]))[:n]


def one_rank(model_dir: Path, budget: str, prompt: list[int], max_tokens: int,
             options: dict) -> dict:
    """The single-process run, in a child process so both sides start cold alike."""
    code = (
        "import json, sys, hobbit_mlx\n"
        "from hobbit_mlx import _with_defaults\n"
        "from hobbit_mlx.testing.pipeline_worker import timed_tokens\n"
        "a = json.loads(sys.argv[1])\n"
        "m, tok = hobbit_mlx.load(a['model'], exact=True, progress=False, memory_budget=a['budget'], **a['options'])\n"
        "_with_defaults(m, tok, a['prompt'], {'max_tokens': a['max_tokens']})\n"
        "hobbit_mlx.reset_stats(m)\n"
        "tokens, timing = timed_tokens(m, a['prompt'], a['max_tokens'])\n"
        "print(json.dumps({'tokens': tokens, 'stats': [hobbit_mlx.offload_stats(m)], **timing}, default=str))\n")
    arg = json.dumps({"model": str(model_dir), "budget": budget, "prompt": prompt,
                      "max_tokens": max_tokens, "options": options})
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                         check=True, env=_env(), stdin=subprocess.DEVNULL)
    return json.loads(out.stdout.strip().splitlines()[-1])


def two_ranks(model_dir: Path, budgets: list[str], prompt: list[int], max_tokens: int,
              options: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps([{"name": "run", "model": str(model_dir), "budgets": budgets,
                                     "prompt": prompt, "max_tokens": max_tokens,
                                     "options": options}]))
        launcher = Path(sys.executable).with_name("mlx.launch")
        subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "-p", str(_free_port()),
                        "--python", sys.executable, str(WORKER), str(spec), str(out)],
                       check=True, timeout=900, env=dict(_env(), HOBBIT_WORKER_TIMEOUT="800"),
                       stdin=subprocess.DEVNULL)  # mlx.launch forwards stdin to the ranks
        result = json.loads(out.read_text())["run"]
    if "errors" in result:
        raise SystemExit(f"the 2-rank run failed: {result['errors']}")
    return result


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@arguments.refuse_bad_input
def main(argv=None) -> int:
    from hobbit_mlx.budget import format_size, parse_size
    from hobbit_mlx.loader import REFERENCE_MODEL, resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, type=arguments.model_or_repo)
    p.add_argument("--budget", default="20MB", type=arguments.size,
                   help="total budget (2 ranks: half each)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--simulated-storage", default="mac-ssd", type=arguments.storage(),
                   help='a simulated device ("mac-ssd", "50MB/s", ...), or "none"')
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prefetch-study", action="store_true",
                   help="issue 13 item 4: with --prefetch-layers 1, 1 rank against 2 ranks at the "
                        "same total whose first layers are kept resident (the default) or not")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline-reference.md"),
                   help="the .md to write (and a .json beside it)")
    args = p.parse_args(argv)
    for flag, value, least in (("--prompt-tokens", args.prompt_tokens, 1),
                               ("--max-tokens", args.max_tokens, 2), ("--repeats", args.repeats, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, not {value}")
    out = arguments.out_dir(p, args.out, file=True)
    model_dir = resolve_model(args.model or REFERENCE_MODEL, progress=False)
    prompt = prompt_tokens(model_dir, args.prompt_tokens)
    total = parse_size(args.budget)
    options = ({"simulated_storage": args.simulated_storage}
               if args.simulated_storage not in ("", "none", "off") else {})
    rows = []
    # the comparison the issue asks for (same total), and two machines' worth of memory
    configs = [(1, [total], {}), (2, [total // 2] * 2, {}), (2, [total] * 2, {})]
    if args.prefetch_study:
        options["prefetch_layers"] = 1
        configs = [(1, [total], {}), (2, [total // 2] * 2, {}),
                   (2, [total // 2] * 2, {"keep_shallow_layers": 0})]
    for rep in range(args.repeats):
        for ranks, budgets, extra in configs:
            t0 = time.perf_counter()
            if ranks == 1:
                r = one_rank(model_dir, str(budgets[0]), prompt, args.max_tokens,
                             dict(options, **extra))
            else:
                r = two_ranks(model_dir, [str(b) for b in budgets], prompt, args.max_tokens,
                              dict(options, **extra))
            r.update(ranks=ranks, repeat=rep, run_s=time.perf_counter() - t0, options=extra)
            rows.append(r)
            print(f"{ranks} rank(s) x {format_size(budgets[0])}: {r['decode_tps']:.1f} tok/s "
                  "decode", flush=True)
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    lines = [
        "# 1 rank vs 2 pipeline ranks on one machine",
        "",
        f"Command: `{arguments.command(__file__, argv)}`",
        "",
        f"Model: {model_dir.name}; exact mode; greedy; {len(prompt)} prompt tokens, "
        f"{args.max_tokens} decoded; storage: {options.get('simulated_storage') or 'real (page cache)'}; "
        f"machine: {os.cpu_count()} CPU cores shared by both ranks. Same tokens in every run: "
        f"{same}.",
        "",
        "| ranks | budget per rank | options | decode tok/s | first token s | hit rate per rank | "
        "read per rank | read wait s per rank | recall at distance 1 per rank | "
        "peak / budget per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stats"]
        recall = [(s.get("prediction_recall_by_distance") or {}) for s in st]
        recall = [f"{100 * float(d.get('1', d.get(1, 0))):.0f}%" if d else "-" for d in recall]
        lines.append(
            f"| {r['ranks']} | {format_size(st[0]['budget_bytes'])} | "
            f"{', '.join(f'{k}={v}' for k, v in r['options'].items()) or '-'} | "
            f"{r['decode_tps']:.1f} | "
            f"{r['first_token_s']:.2f} | "
            + ", ".join(f"{100 * s['hit_rate']:.0f}%" for s in st) + " | "
            + ", ".join(format_size(s['bytes_read']) for s in st) + " | "
            + ", ".join(f"{s['read_wait_s']:.2f}" for s in st) + " | " + ", ".join(recall) + " | "
            + ", ".join(f"{s['peak_memory_bytes'] / s['budget_bytes']:.2f}" for s in st) + " |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
