"""Tokens per second under one or several memory budgets, on this machine: ``mlx_lm.benchmark``
for a model whose experts stream from storage.

    python -m hobbit_mlx.benchmark --model PATH --memory-budget 8GB,12GB,16GB -p 512 -g 128

For each budget: a warmup generation, then ``--num-trials`` timed ones of the same prompt, each
generating exactly ``-g`` tokens (end-of-sequence tokens do not stop it). The expert cache carries
over from one trial to the next, as it does between a chat's turns. Reported per budget: prompt
and generation tokens/s (mean and spread over the trials), peak memory against the budget, and
what the decode steps read: the share of their expert requests served from memory and the bytes
read per generated token.

Unlike mlx-lm's benchmark the prompt is text (``--prompt-file``, else Python's own source files),
not random tokens: which experts a token routes to, and so what is read, depends on the text, and
random tokens route unlike any text a user sends. ``--random-prompt`` draws them as mlx-lm does.
"""

from __future__ import annotations

import argparse
import codecs
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from . import cli_common as cli, cli_flags, cli_load
from .budget import BudgetError, format_size, parse_size

_now = time.perf_counter  # (the trials' clock)

# counted over a trial's decode steps (after the first token), from the offload counters
_DECODE_COUNTERS = ("hits_high", "hits_low", "misses_high", "misses_low", "skipped", "bytes_read")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.benchmark",
        description="Prompt and generation tokens/s of a model under one or several memory "
                    "budgets (--memory-budget 8GB,12GB), with what each budget reads.")
    parser.add_argument("--prompt-tokens", "-p", type=int, default=512,
                        help="Length of the prompt (default: %(default)s).")
    parser.add_argument("--generation-tokens", "-g", type=int, default=128,
                        help="Tokens generated per trial (default: %(default)s).")
    parser.add_argument("--num-trials", "-n", type=int, default=3,
                        help="Timed trials per budget, after a warmup run (default: %(default)s).")
    parser.add_argument("--prompt-file", default=None, metavar="FILE",
                        help="Text whose first --prompt-tokens tokens are the prompt (default: "
                             "Python's own argparse.py and other standard library sources).")
    parser.add_argument("--random-prompt", action="store_true",
                        help="Random tokens for the prompt, as mlx_lm.benchmark draws them "
                             "(routing then differs from any text's).")
    parser.add_argument("--delay", type=float, default=0.0, metavar="S",
                        help="Seconds to wait between trials (default: %(default)s).")
    parser.add_argument("--json", action="store_true",
                        help="Print the results as one JSON object on stdout.")
    cli_flags.add_model_args(parser)
    return parser


def _check_args(args: argparse.Namespace) -> list:
    """One line for what the benchmark cannot do; returns the budgets to run (None: the
    default budget, or --expert-residency)."""
    if args.pipeline:
        raise cli.CLIError("--pipeline: the benchmark runs in one process; time a pipeline with "
                           "mlx.launch ... -m hobbit_mlx.generate, whose report gives its speed")
    for flag, value, least in (("--prompt-tokens", args.prompt_tokens, 1),
                               # (the first token comes with the prompt: decoding starts after it)
                               ("--generation-tokens", args.generation_tokens, 2),
                               ("--num-trials", args.num_trials, 1)):
        if value < least:
            raise cli.CLIError(f"{flag} must be at least {least}, not {value}")
    if not 0 <= args.delay < 3600:
        raise cli.CLIError(f"--delay takes 0 to 3600 seconds, not {args.delay}")
    if args.random_prompt and args.prompt_file:
        raise cli.CLIError("--random-prompt and --prompt-file: choose one")
    if args.prompt_file:
        _check_text_file(Path(args.prompt_file).expanduser(), args.prompt_file)
    budgets = [None] if args.memory_budget is None else str(args.memory_budget).split(",")
    sizes = []
    for budget in budgets:  # (each checked as --memory-budget is everywhere)
        args.memory_budget = budget.strip() if budget is not None else None
        if args.memory_budget == "":
            raise cli.CLIError(f"--memory-budget {','.join(budgets)}: an empty entry")
        cli_flags.check_args(args)
        sizes.append((args.memory_budget, budget.strip() if budget is not None else None))
    if len({size for size, _ in sizes}) < len(sizes):
        raise cli.CLIError("--memory-budget lists the same budget twice")
    return sizes


def _check_text_file(path: Path, given: str) -> None:
    """A prompt file that cannot serve is refused before the model loads (minutes, for a large
    one): missing, not a file, empty, unreadable, or not UTF-8 text (its start is checked)."""
    if not path.is_file():
        raise cli.CLIError(f"--prompt-file {given}: "
                           f"{'not a file' if path.exists() else 'no such file'}")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except (OSError, UnicodeDecodeError) as e:
        raise cli.CLIError(f"--prompt-file {given}: cannot read it as UTF-8 text ({e})") from None
    if not head:
        raise cli.CLIError(f"--prompt-file {given}: the file is empty")


def prompt_tokens(args: argparse.Namespace, tokenizer, model_dir: Path) -> tuple[list[int], str]:
    """The prompt's tokens and where they came from."""
    want = args.prompt_tokens
    if args.random_prompt:
        from .architectures import vocab_size

        mx.random.seed(0)  # (the same prompt on every run, as mlx-lm's)
        return mx.random.randint(0, vocab_size(model_dir), (want,)).tolist(), "random tokens"
    from .perplexity import text_tokens

    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        tokens = text_tokens(path, tokenizer, want, flag="--prompt-file")
        if len(tokens) < want:
            raise cli.CLIError(f"--prompt-file {args.prompt_file}: {len(tokens)} "
                               f"token{'s' if len(tokens) != 1 else ''}, fewer than "
                               f"--prompt-tokens ({want})")
        return tokens[:want], str(path)
    import inspect
    import tarfile
    import typing

    tokens, names = [], []
    for module in (argparse, typing, inspect, tarfile):
        path = Path(module.__file__)
        tokens += text_tokens(path, tokenizer, want - len(tokens))
        names.append(path.name)
        if len(tokens) >= want:
            return tokens[:want], "Python's " + " + ".join(names)
    raise cli.CLIError(f"--prompt-tokens {want}: Python's sources gave {len(tokens)} tokens; "
                       "give a longer --prompt-file")


def _decode_rates(decode: dict, steps: int) -> dict:
    """The share of the decode steps' expert requests served from memory, bytes read per step."""
    served = decode["hits_high"] + decode["hits_low"]
    demand = served + decode["misses_high"] + decode["misses_low"]
    return {"decode_hit_rate": served / demand if demand else None,
            "decode_bytes_per_token": decode["bytes_read"] / steps if steps else 0.0}


def _counters(model) -> dict:
    from . import offload_stats

    s = offload_stats(model)
    return {name: s[name] for name in _DECODE_COUNTERS}


def run_trial(model, tokenizer, prompt: list[int], generation_tokens: int) -> dict:
    """One generation of exactly ``generation_tokens`` tokens; its speeds, peak memory and what
    its decode steps (every token after the first) read."""
    import hobbit_mlx

    hobbit_mlx.reset_stats(model)
    first = last = None
    for response in hobbit_mlx.stream_generate(model, tokenizer, prompt,
                                               max_tokens=generation_tokens):
        if first is None:  # (the prompt's reads end with the first token)
            first = _counters(model)
            t_first = _now()
        last = response
    t_last = _now()
    end = hobbit_mlx.offload_stats(model)
    decode = {name: end[name] - first[name] for name in _DECODE_COUNTERS}
    steps = last.generation_tokens - 1
    # (decode steps over their time; mlx-lm's generation_tps counts the first token too, the
    # prompt's: 2x the rate at -g 2)
    return {"prompt_tps": float(last.prompt_tps),
            "generation_tps": steps / (t_last - t_first) if t_last > t_first else 0.0,
            "generation_tokens": last.generation_tokens,
            "peak_memory_bytes": end["peak_memory_bytes"],
            "prompt_bytes_read": first["bytes_read"], "decode": decode,
            **_decode_rates(decode, steps)}


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(trials: list[dict], stats: dict, expert_bytes: int) -> dict:
    """One budget's row: means over the trials, the peak, and the decode reads pooled."""
    decode = {name: sum(t["decode"][name] for t in trials) for name in _DECODE_COUNTERS}
    steps = sum(t["generation_tokens"] - 1 for t in trials)
    prompt_tps, prompt_sd = _spread([t["prompt_tps"] for t in trials])
    gen_tps, gen_sd = _spread([t["generation_tps"] for t in trials])
    return {"budget_bytes": stats["budget_bytes"],
            "expert_cache_bytes": stats["expert_cache_bytes"],
            "expert_cache_share": stats["expert_cache_bytes"] / expert_bytes if expert_bytes else 1.0,
            "prompt_tps": prompt_tps, "prompt_tps_std": prompt_sd,
            "generation_tps": gen_tps, "generation_tps_std": gen_sd,
            "peak_memory_bytes": max(t["peak_memory_bytes"] for t in trials),
            **_decode_rates(decode, steps),
            "decode_misses_per_token": (decode["misses_high"] + decode["misses_low"]) / steps
            if steps else 0.0,
            "policy": stats["policy"], "trials": trials}


def format_table(rows: list[dict]) -> list[str]:
    head = ["budget", "expert cache", "prompt tok/s", "generation tok/s", "peak memory",
            "decode hit rate", "read per decoded token"]
    body = []
    for r in rows:
        share = r["peak_memory_bytes"] / r["budget_bytes"]
        hit = r["decode_hit_rate"]
        body.append([r.get("budget") or format_size(r["budget_bytes"]),
                     f"{format_size(r['expert_cache_bytes'])} "
                     f"({100.0 * r['expert_cache_share']:.0f}%)",
                     f"{r['prompt_tps']:.1f} ± {r['prompt_tps_std']:.1f}",
                     f"{r['generation_tps']:.2f} ± {r['generation_tps_std']:.2f}",
                     f"{format_size(r['peak_memory_bytes'])} "
                     + (f"({100.0 * share:.0f}%)" if share <= 1 else
                        f"({100.0 * share:.1f}%: over the budget)"),
                     "-" if hit is None else f"{100.0 * hit:.1f}%",
                     format_size(r["decode_bytes_per_token"])])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]


def bench_budget(args: argparse.Namespace, prompt: list[int] | None, label: str | None,
                 log) -> tuple:
    """Load under ``args.memory_budget``, warm up, run the trials; returns (row, prompt, its
    source, the model's directory, the smallest budget that loads it with these options). The
    model is closed before it returns."""
    from . import offload_stats, runtime_of

    model, tokenizer, load_s = cli_load.load_model(args)
    rt = runtime_of(model)
    try:
        tokenizer._eos_token_ids = set()  # (every trial generates all its tokens, as mlx-lm's)
        source = None
        if prompt is None:
            prompt, source = prompt_tokens(args, tokenizer, Path(rt.model_dir))
            log(f"Model: {rt.model_dir}; prompt: {len(prompt)} tokens of {source}; "
                f"{args.generation_tokens} generated tokens; {args.num_trials} "
                f"trial{'s' if args.num_trials != 1 else ''} after a warmup run")
        label = label or format_size(offload_stats(model)["budget_bytes"])
        log(f"Budget {label}: loaded in {load_s:.1f} s; warmup run")
        run_trial(model, tokenizer, prompt, args.generation_tokens)
        trials = []
        for i in range(args.num_trials):
            time.sleep(args.delay)
            t = run_trial(model, tokenizer, prompt, args.generation_tokens)
            trials.append(t)
            log(f"Budget {label}: trial {i + 1}: prompt {t['prompt_tps']:.1f} tok/s, generation "
                f"{t['generation_tps']:.2f} tok/s, read {format_size(t['decode_bytes_per_token'])} "
                f"per token, peak {format_size(t['peak_memory_bytes'])}")
        row = summarize(trials, offload_stats(model), rt.manifest.expert_bytes("high"))
        row["budget"] = label
        return row, prompt, source, str(rt.model_dir), rt.plan.minimum_bytes
    finally:
        rt.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    budgets = _check_args(args)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows, failed, prompt, source, model_dir = [], [], None, None, None
    minimum = 0  # the model's smallest budget with these options, once a load has told it
    try:
        for size, label in budgets:
            if size is not None and parse_size(size) < minimum:
                # (known from an earlier load: this one would load for nothing)
                failed.append(f"{label}: below this model's minimum of {format_size(minimum)} "
                              f"({minimum} bytes) with these options")
                log(f"Budget {failed[-1]}; skipped")
                continue
            args.memory_budget = size
            try:
                row, prompt, new_source, model_dir, minimum = bench_budget(args, prompt, label,
                                                                           log)
            except BudgetError as e:  # too small to load, or for the prompt: the next may run
                failed.append(f"{label or 'the default budget'}: {e}")
                log(f"Budget {label or 'default'}: cannot run (the error line after the rows "
                    "says why); going on")
                continue
            finally:
                # the last model's weights go before the next loads: MLX's peak counts the process
                gc.collect()
                mx.clear_cache()
            source = source or new_source
            rows.append(row)
    finally:  # (Ctrl-C keeps the rows measured before it)
        if rows:
            result = {"model": model_dir, "prompt_source": source, "prompt_tokens": len(prompt),
                      "generation_tokens": args.generation_tokens,
                      "num_trials": args.num_trials, "options": cli_flags.technique_options(args),
                      "budgets": rows, "complete": len(rows) == len(budgets)}
            print(json.dumps(result, default=str) if args.json else
                  "\n".join(format_table(rows)), flush=True)
    if failed:  # after the rows that ran: one error line naming each budget that did not run
        raise BudgetError("; ".join(failed) if len(failed) > 1 else failed[0])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
