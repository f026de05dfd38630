#!/usr/bin/env python3
"""What keeping earlier prompt caches on disk buys a server whose clients take turns.

    python bench/kept_prompts.py [--model PATH] [--techniques exact|default] [--residency 0.5]
        [--conversations 3] [--turns 4] [--max-tokens 24] [--storage mac-like|warm]
        [--read-ratio 12] [--out bench/results] [--name NAME]

An agent with subagents, or a few chat windows on one server, sends several conversations that
share a long start (the system prompt and project context) and take turns: conversation 1's
turn, then 2's, then 3's, then 1's again, each resent whole with one turn more. The server runs
one sequence at a time, and keeps the last request's KV cache in memory; a switch finds it
holding another conversation and prefills everything past the shared start again. With
``--prompt-cache-size`` (``hobbit_mlx/server/kept_prompts.py``) the cache is written to disk
before it would be cut back, and read back when its conversation returns.

Three settings, each on a fresh in-process ``Worker`` of the same model, one after another
(one model loaded at a time), greedy, same simulated storage: ``none`` (every prompt prefilled
whole: ``--no-prompt-cache``), ``last`` (the last request's cache only: ``--prompt-cache-size
0``), ``kept`` (10 files on disk: the default). The KV files' writes and reads are charged to
the same simulated device as the expert reads (demand reads: the request waits for them), so
the time includes them. Per setting: prompt tokens sent and prefilled, tokens reused from
memory and from disk, time to first token, wall time, expert bytes read, KV file bytes written
and read, and replies identical to ``none``'s (exact mode: all should be). Writes
``<out>/<name>.md`` and ``.json``; default name ``kept-prompts-<model>-<storage>[-default]``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench.harness_report import write_results  # noqa: E402
from bench.harness_runs import mac_like_storage  # noqa: E402
from bench.prompt_reuse import (MB, TECHNIQUES, Conversation, add_run_args,  # noqa: E402
                                 check_run_args)
from bench.workload import RESULTS, resolve_model_paths  # noqa: E402


def system_prompt() -> str:
    """A long shared start, as an agent's: instructions and a file of project context (the
    start of Python's own ``textwrap`` module, the same on every machine with this Python)."""
    import textwrap

    context = inspect.getsource(textwrap)[:2400]
    return ("You are a coding agent working in this repository. Answer with short, working "
            "code, and say which file you change.\n\nProject context, textwrap.py:\n\n```python\n"
            + context + "\n```\n")


TASKS = [  # each conversation's first message; later turns add FOLLOW_UPS in turn
    "Add a function that wraps text to a width but never breaks inside a URL.",
    "Write unittest tests for dedent with mixed tabs and spaces.",
    "Why does fill() drop trailing whitespace, and how would I keep it?",
    "Make shorten() accept a custom placeholder that is longer than the width.",
]
FOLLOW_UPS = ["Add type hints.", "Now handle an empty string.", "Write one more test for it.",
              "Show the final version.", "Explain the edge cases in one paragraph."]
SETTINGS = [("none", False, 0), ("last", True, 0), ("kept", True, 10)]  # (key, reuse, files)


class Setting(Conversation):
    """One setting's worker and its conversations (each a list of messages)."""

    def __init__(self, key: str, reuse: bool, files: int, load, template, n: int, system: str):
        from hobbit_mlx.server.kept_prompts import KeepSettings

        super().__init__(key, reuse, load, template, keep=KeepSettings(max_entries=files))
        self.chats = [[{"role": "system", "content": system}] for _ in range(n)]

    def start(self) -> None:
        super().start()
        from hobbit_mlx.loader import runtime_of
        from hobbit_mlx.server.kept_prompts import KeptPrompts

        kept = self.worker._kept
        device = runtime_of(self.worker.model).reader.device
        if isinstance(kept, KeptPrompts) and device is not None:
            charge_files(kept, device)


def charge_files(kept, device) -> None:
    """Make each KV file write and read wait for the simulated device, as a demand read."""
    def charged(method, counter):
        def run(*args, **kw):
            before = kept.counts[counter]
            try:
                return method(*args, **kw)
            finally:
                if kept.counts[counter] > before:
                    device.transfer(kept.counts[counter] - before)
        return run

    kept._write_live = charged(kept._write_live, "bytes_written")
    kept._read = charged(kept._read, "bytes_read")


KEYS = ["prompt_tokens", "prefilled_tokens", "cached_tokens", "cached_from_disk", "ttft_s",
        "wall_s", "bytes_read", "generated_tokens"]
ROWS = [("prompt tokens sent", "prompt_tokens", 1, "{:.0f}"),
        ("prompt tokens prefilled", "prefilled_tokens", 1, "{:.0f}"),
        ("reused from memory", "from_memory", 1, "{:.0f}"),
        ("reused from disk", "cached_from_disk", 1, "{:.0f}"),
        ("time to first token, s (sum)", "ttft_s", 1, "{:.2f}"),
        ("wall time, s (sum)", "wall_s", 1, "{:.2f}"),
        ("expert bytes read, MiB", "bytes_read", MB, "{:.1f}"),
        ("KV file bytes written, MiB", "kv_written", MB, "{:.1f}"),
        ("KV file bytes read, MiB", "kv_read", MB, "{:.1f}"),
        ("tokens generated", "generated_tokens", 1, "{:.0f}")]


def markdown(result: dict) -> str:
    m, t = result["meta"], result["totals"]
    keys = m["settings"]
    lines = [f"# Prompt caches kept on disk: {m['model']['name']}, {m['techniques']} "
             f"techniques, {m['storage']} storage", "", f"Command: `{m['command']}`", "",
             f"- `hobbit_mlx.load` options `{m['load_options']}`, expert residency "
             f"{m['residency']:.0%}; storage: {m['storage_detail']}",
             f"- {m['conversations']} conversations sharing a {m['system_tokens']}-token start "
             f"take turns, {m['turns']} turns each (every conversation's turn i, then turn i + 1),"
             f" greedy, at most {m['max_tokens']} tokens per reply",
             f"- replies identical to `{keys[0]}`'s: " + ", ".join(
                 f"{k} {n}" for k, n in result["identical"].items())
             + f" of {len(result['runs'][keys[0]])}",
             f"- machine: {m['machine']}; {m['date']}; {m['wall_s']:.0f} s in all", "",
             "| | " + " | ".join(keys) + " | kept / last |", "|---" * (len(keys) + 2) + "|"]
    for label, key, scale, fmt in ROWS:
        v = [t[k][key] / scale for k in keys]
        last, kept = t.get("last", {}).get(key), t.get("kept", {}).get(key)
        ratio = f"{kept / last:.3f}" if last and kept is not None else "n/a"
        lines.append(f"| {label} | " + " | ".join(fmt.format(x) for x in v) + f" | {ratio} |")
    lines += ["", "`none`: every prompt prefilled whole (`--no-prompt-cache`); `last`: the last "
              "request's cache in memory only (`--prompt-cache-size 0`); `kept`: up to 10 "
              "earlier caches on disk (the default). KV file bytes are charged to the simulated "
              "device (the time includes them)."]
    return "\n".join(lines) + "\n"


@arguments.refuse_bad_input
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--conversations", type=int, default=3, help=f"1..{len(TASKS)}")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--settings", default="none,last,kept",
                    help="which settings to run, in order (default: none,last,kept; replies are "
                         "compared with the first's)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    if not 1 <= a.conversations <= len(TASKS):
        ap.error(f"--conversations must be 1..{len(TASKS)}")
    if a.turns < 1 or a.max_tokens < 1:
        ap.error("--turns and --max-tokens must be at least 1")
    check_run_args(ap, a)
    known = {key: (key, reuse, files) for key, reuse, files in SETTINGS}
    chosen = a.settings.split(",")
    if not chosen or any(k not in known for k in chosen) or len(set(chosen)) < len(chosen):
        ap.error(f"--settings: some of {', '.join(known)}, each once")
    out = arguments.out_dir(ap, a.out)

    import mlx.core as mx
    import mlx_lm.utils

    import hobbit_mlx
    from bench.harness_report import _machine
    from hobbit_mlx.server.prompts import Template, chat_tokens

    t_start = time.perf_counter()
    paths = resolve_model_paths(a.model)
    template, system = Template(), system_prompt()
    tok = mlx_lm.utils.load_tokenizer(paths.src)
    first = chat_tokens(tok, [{"role": "system", "content": system},
                              {"role": "user", "content": TASKS[0]}], template)
    system_tokens = len(chat_tokens(tok, [{"role": "system", "content": system}], template))
    storage, storage_detail, calibration = None, "warm page cache (no simulation)", None
    if a.storage == "mac-like":
        # (mlx-lm's resident decode time per token, measured after a prompt of 128 tokens: the
        # whole shared start would take minutes to prefill four times on a large model)
        storage, calibration, storage_detail = mac_like_storage(paths, first[:128], a.read_ratio)
    options = dict(TECHNIQUES[a.techniques], expert_residency=a.residency,
                   simulated_storage=storage)

    def load():
        return hobbit_mlx.load(str(paths.hobbit), progress=False, **options)

    settings = {}
    for key, reuse, files in (known[k] for k in chosen):
        s = settings[key] = Setting(key, reuse, files, load, template, a.conversations, system)
        s.start()
        try:
            for i in range(a.turns):
                for c in range(a.conversations):
                    row = s.turn_with(s.chats[c], TASKS[c] if i == 0 else
                                      FOLLOW_UPS[(i - 1) % len(FOLLOW_UPS)], a.max_tokens,
                                      conversation=c + 1, turn=i + 1)
                    print(f"[kept-prompts] {key:>4} conversation {c + 1} turn {i + 1}: "
                          f"{row['prompt_tokens']} prompt tokens ({row['cached_tokens']} cached,"
                          f" {row['cached_from_disk']} from disk), TTFT {row['ttft_s']:.2f} s, "
                          f"read {row['bytes_read'] / MB:.2f} MiB", file=sys.stderr)
            kept = s.worker._kept
            s.files = kept.stats() if hasattr(kept, "stats") else None
        finally:
            s.stop()

    totals = {}
    for key, s in settings.items():
        t = {k: sum(r[k] or 0 for r in s.rows) for k in KEYS}
        t["from_memory"] = t["cached_tokens"] - t["cached_from_disk"]
        t["kv_written"] = (s.files or {}).get("bytes_written", 0)
        t["kv_read"] = (s.files or {}).get("bytes_read", 0)
        totals[key] = t
    base = settings[chosen[0]].replies
    identical = {k: sum(x == y for x, y in zip(base, settings[k].replies)) for k in chosen[1:]}
    name = a.name or (f"kept-prompts-{paths.name}-{a.storage}"
                      + ("" if a.techniques == "exact" else f"-{a.techniques}"))
    result = {
        "meta": {"command": arguments.command(__file__, argv), "model": paths.as_dict(),
                 "techniques": a.techniques, "residency": a.residency,
                 "load_options": {k: v for k, v in options.items() if k != "simulated_storage"},
                 "conversations": a.conversations, "turns": a.turns, "max_tokens": a.max_tokens,
                 "settings": chosen,
                 "system_tokens": system_tokens, "storage": a.storage,
                 "storage_detail": storage_detail, "calibration": calibration,
                 "machine": _machine(), "mlx": mx.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "wall_s": time.perf_counter() - t_start},
        "runs": {k: s.rows for k, s in settings.items()},
        "files": {k: s.files for k, s in settings.items()},
        "identical": identical, "totals": totals,
    }
    text = markdown(result)
    write_results(out, name, result, text)
    print(text)
    print(f"[kept-prompts] wrote {out / name}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
