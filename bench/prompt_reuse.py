#!/usr/bin/env python3
"""What the server's prompt cache buys in a conversation that is sent again each turn.

    python bench/prompt_reuse.py [--model PATH] [--techniques exact|default] [--residency 0.5]
        [--turns 6] [--max-tokens 32] [--storage mac-like|warm] [--read-ratio 12]
        [--back-to-back] [--out bench/results] [--name NAME]

A chat client (an agent, a chat UI) resends the whole conversation on every turn: turn i's prompt
is the chat template over [system, user 1, assistant 1, ..., user i], where each assistant
message is the reply the server gave. The server (``hobbit_mlx.server.worker.Worker``) keeps the
last request's KV cache (``hobbit_mlx.prompt_cache.PromptCache``) and prefills only the part of
the next prompt that the cache does not already hold. Under offloading a prefill chunk reads the
experts its tokens route to, so what is not prefilled is also not read.

This runs the same fixed conversation (a short coding session, ``USER_MESSAGES``) through two
in-process ``Worker``s of the same model, one with ``reuse_prompt=True`` and one with
``reuse_prompt=False``, greedy, on the same (simulated) storage. By default the two take turns
(turn i on one, then on the other, the order swapped each turn, so drift on a shared machine
hits both alike); ``--back-to-back`` runs one whole conversation, closes that model, then the
other (half the memory: one model loaded at a time). Each conversation's history carries its own
replies, as a client's would; in exact mode they should be the same in both.

Per turn and setting: prompt tokens, tokens reused from the cache (the request's
``cached_tokens``), time to first token (submit to the first streamed token: queueing is nil, so
this is the prefill and the first step), the request's wall time, expert bytes read (the
request's ``bytes_read``, and the runtime's counter when the first token arrived: the
prefill's reads and the first decode step's) and tokens generated. Totals and reuse / no-reuse
ratios, and how many turns' replies were the same token for token. Storage: ``mac-like`` (default: every read waits
for a simulated device on which one token's top-k 4-bit experts take ``--read-ratio`` (12) x
mlx-lm's measured resident time per decoded token, as ``harness.py --storage mac-like``) or
``warm`` (the page cache, no simulation). Writes ``<out>/<name>.md`` (the command first) and
``<name>.json``; default name ``prompt-reuse-<model>-<storage>[-default]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import queue
import sys
import time

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench.harness_report import write_results  # noqa: E402
from bench.harness_runs import mac_like_storage  # noqa: E402
from bench.workload import RESULTS, resolve_model_paths  # noqa: E402

SYSTEM = "You are a careful Python programmer. Answer with short, working code."

# The user's side of the conversation: a short coding session, each turn building on the last
# (some carry code or a traceback, as an agent's tool results would).
USER_MESSAGES = [
    "Write a function parse_config(path) that reads an INI file with configparser and returns "
    "a dict that maps each section name to a dict of its options.",
    "If the file does not exist, return an empty dict and log a warning with the logging "
    "module instead of raising.",
    "This is how I call it:\n\n```python\nimport sys\n\nfrom config import parse_config\n\n\n"
    "def main(argv):\n    cfg = parse_config(argv[1])\n    for section, values in cfg.items():\n"
    "        print(section, len(values))\n    return 0\n\n\nif __name__ == \"__main__\":\n"
    "    sys.exit(main(sys.argv))\n```\n\nWhy does it crash when I run it without an argument?",
    "Add a unittest test case for the missing-file case that uses "
    "tempfile.TemporaryDirectory, and one that checks the warning with assertLogs.",
    "The test fails with this traceback:\n\n```\nTraceback (most recent call last):\n"
    "  File \"test_config.py\", line 14, in test_missing_file\n"
    "    with self.assertLogs(\"config\", level=\"WARNING\"):\n"
    "AssertionError: no logs of level WARNING or higher triggered on config\n```\n\n"
    "What is wrong?",
    "Rename parse_config to load_config everywhere, add type hints, and keep the old name "
    "as a deprecated alias that warns with warnings.warn.",
    "Now let load_config take a list of paths and merge them, later files overriding "
    "earlier ones, like ConfigParser.read does.",
    "Write a docstring for load_config in the style of the standard library.",
    "Show the complete module once more, with the tests in a separate file.",
    "Thanks. Last question: how would I make the options typed, so that port is an int and "
    "debug a bool?",
]

TECHNIQUES = {"exact": {"exact": True}, "default": {}}  # hobbit_mlx.load options
SETTINGS = [("no_reuse", False), ("reuse", True)]  # (key, Worker's reuse_prompt)
MB = 2 ** 20


class Conversation:
    """One setting: a ``Worker`` (reuse on or off) and the conversation it has been sent."""

    def __init__(self, key: str, reuse: bool, load, template, keep=None):
        from hobbit_mlx.server.worker import Worker

        self.key, self.reuse, self.template = key, reuse, template
        self.worker = Worker(load, f"prompt-reuse-{key}", reuse_prompt=reuse, keep=keep)
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.rows: list[dict] = []
        self.replies: list[list[int]] = []

    def start(self) -> None:
        from hobbit_mlx.loader import runtime_of

        self.worker.start()
        self.stats = runtime_of(self.worker.model).stats  # (zeroed in place per request)
        # A first request outside the conversation (its first token differs from the chat
        # template's, so no reuse carries over): the first generation's one-time costs.
        warm = list(self.worker.tokenizer.encode("def warm_up(x):\n    return"))
        self._request(warm, 4)

    def _request(self, prompt: list[int], max_tokens: int) -> dict:
        from hobbit_mlx.server.params import Generation, Sampling
        from hobbit_mlx.server.worker import Failed, Finished, Job

        events: queue.Queue = queue.Queue()
        job = Job(list(prompt), Generation(max_tokens=max_tokens, sampling=Sampling()),
                  max_tokens, events.put, label=f"prompt-reuse {self.key}")
        t0 = time.perf_counter()
        self.worker.submit(job)
        first, early, texts, tokens = None, None, [], []
        while not isinstance(event := events.get(timeout=3600), (Finished, Failed)):
            if first is None:
                first = time.perf_counter() - t0
                # read from this thread while the generation goes on: mlx-lm has run the
                # second step's layer calls before it yields the first token, so this is the
                # prefill's reads and the first decode step's
                early = self.stats.bytes_read
            texts.append(event.text)
            tokens.append(event.token)
        wall = time.perf_counter() - t0
        if isinstance(event, Failed):
            raise RuntimeError(f"{self.key}: the request failed: {event.error.message}")
        return {"ttft_s": first, "wall_s": wall, "early_bytes": early, "texts": texts,
                "tokens": tokens,
                "stats": event.stats, "finish_reason": event.finish_reason}

    def turn(self, i: int, max_tokens: int) -> dict:
        """Send the conversation with user message ``i`` at its end; the reply joins it."""
        return self.turn_with(self.messages, USER_MESSAGES[i], max_tokens, turn=i + 1)

    def turn_with(self, messages: list, user: str, max_tokens: int, **about) -> dict:
        """Send ``messages`` with ``user`` at their end; the reply joins them. The row (first
        ``about``) is kept in ``rows``, the reply's tokens in ``replies``."""
        from hobbit_mlx.server.prompts import chat_tokens
        from hobbit_mlx.server.replies import Reply, joined, split_reply

        messages.append({"role": "user", "content": user})
        prompt = chat_tokens(self.worker.tokenizer, messages, self.template)
        r = self._request(prompt, max_tokens)
        # the reply's text as an OpenAI client gets it back (what it sends next turn)
        reply = joined(split_reply(Reply(self.worker.tokenizer, prompt), r["texts"]), "text")
        messages.append({"role": "assistant", "content": reply})
        s = r["stats"]
        row = {**about, "prompt_tokens": len(prompt), "cached_tokens": s["cached_tokens"],
               "cached_from_disk": s.get("cached_from_disk", 0),
               "prefilled_tokens": len(prompt) - s["cached_tokens"],
               "ttft_s": r["ttft_s"], "wall_s": r["wall_s"], "bytes_read": s["bytes_read"],
               "bytes_read_by_first_token": r["early_bytes"],
               "generated_tokens": s["generation_tokens"], "prompt_tps": s["prompt_tps"],
               "generation_tps": s["generation_tps"], "served_rate": s["served_rate"],
               "finish_reason": r["finish_reason"], "reply": reply}
        self.rows.append(row)
        self.replies.append(r["tokens"])
        return row

    def stop(self) -> None:
        self.worker.stop()
        self.worker.model = None  # (back to back: the next model loads into the memory freed)
        gc.collect()


def totals(rows: list[dict]) -> dict:
    return {"prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "cached_tokens": sum(r["cached_tokens"] for r in rows),
            "prefilled_tokens": sum(r["prefilled_tokens"] for r in rows),
            "ttft_s": sum(r["ttft_s"] or 0.0 for r in rows),
            "wall_s": sum(r["wall_s"] for r in rows),
            "bytes_read": sum(r["bytes_read"] for r in rows),
            "bytes_read_by_first_token": sum(r["bytes_read_by_first_token"] or 0 for r in rows),
            "generated_tokens": sum(r["generated_tokens"] for r in rows)}


TOTAL_ROWS = [("prompt tokens sent", "prompt_tokens", "{:.0f}"),
              ("prompt tokens prefilled", "prefilled_tokens", "{:.0f}"),
              ("time to first token, s (prefill)", "ttft_s", "{:.2f}"),
              ("expert bytes read by the first token, MiB", "bytes_read_by_first_token",
               "{:.1f}"),
              ("expert bytes read in all, MiB", "bytes_read", "{:.1f}"),
              ("request wall time, s", "wall_s", "{:.2f}"),
              ("tokens generated", "generated_tokens", "{:.0f}")]


def markdown(result: dict) -> str:
    m, t = result["meta"], result["totals"]
    lines = [f"# Prompt reuse: {m['model']['name']}, {m['techniques']} techniques, "
             f"{m['storage']} storage", "",
             f"Command: `{m['command']}`", "",
             f"- model: `{m['model']['src']}` ({m['model']['routing']} routing); "
             f"`hobbit_mlx.load` options `{json.dumps(m['load_options'])}`, "
             f"expert residency {m['residency']:.0%}",
             f"- storage: {m['storage_detail']}",
             f"- conversation: {m['turns']} turns, a system message and one user message per "
             f"turn (`USER_MESSAGES`), each turn's prompt the chat template over everything so "
             f"far with the server's own replies; greedy, at most {m['max_tokens']} tokens per "
             f"reply",
             f"- order: {m['order']}",
             f"- replies identical in both settings: **{result['identical_turns']} of "
             f"{m['turns']}** turns",
             f"- machine: {m['machine']}; {m['date']}; {m['wall_s']:.0f} s in all", "",
             "## Totals", "",
             "| | no reuse | reuse | reuse / no reuse |", "|---|---|---|---|"]
    for label, key, fmt in TOTAL_ROWS:
        a, b = t["no_reuse"][key], t["reuse"][key]
        scale = MB if key.startswith("bytes_read") else 1
        ratio = f"{b / a:.3f}" if a else "n/a"
        lines.append(f"| {label} | {fmt.format(a / scale)} | {fmt.format(b / scale)} | {ratio} |")
    lines += ["", "## Per turn", "",
              "| turn | prompt tokens | reused (reuse) | TTFT s: no reuse | reuse | "
              "wall s: no reuse | reuse | KiB read by the first token: no reuse | reuse | "
              "KiB read in all: no reuse | reuse | generated: no reuse | reuse | same reply |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, b, same in zip(result["runs"]["no_reuse"], result["runs"]["reuse"],
                          result["same_reply"]):
        prompt = (str(a["prompt_tokens"]) if a["prompt_tokens"] == b["prompt_tokens"]
                  else f"{a['prompt_tokens']} / {b['prompt_tokens']}")
        lines.append(f"| {a['turn']} | {prompt} | {b['cached_tokens']} | {a['ttft_s']:.2f} | "
                     f"{b['ttft_s']:.2f} | {a['wall_s']:.2f} | {b['wall_s']:.2f} | "
                     f"{(a['bytes_read_by_first_token'] or 0) / 1024:.0f} | "
                     f"{(b['bytes_read_by_first_token'] or 0) / 1024:.0f} | "
                     f"{a['bytes_read'] / 1024:.0f} | {b['bytes_read'] / 1024:.0f} | "
                     f"{a['generated_tokens']} | {b['generated_tokens']} | "
                     f"{'yes' if same else 'no'} |")
    lines += ["", "Prompt tokens: one number when both settings sent the same prompt (no reuse / "
              "reuse otherwise: the histories differ once a reply did). TTFT: from submitting "
              "the request to its first streamed token (the prefill and the first decode step). "
              "KiB read by the first token: the runtime's byte counter when the first token "
              "arrived (mlx-lm runs the second step's layer calls before it yields the first "
              "token, so the prefill's reads and the first decode step's); in all: the "
              "request's `bytes_read` (prefill and decode)."]
    return "\n".join(lines) + "\n"


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The model, techniques, residency and storage of a conversation benchmark (this one and
    kept_prompts.py); ``check_run_args`` checks them."""
    ap.add_argument("--model", default=None, type=arguments.model_dir,
                    help="mlx-lm checkpoint or hobbit model directory (default: the bundled "
                         "reference model)")
    ap.add_argument("--techniques", choices=sorted(TECHNIQUES), default="exact",
                    help="exact (default: exact=True, replies should match) or default "
                         "(hobbit_mlx.load's defaults, lossy techniques on)")
    ap.add_argument("--residency", type=arguments.residency, default=0.5,
                    help="expert residency in [0, 1] (default 0.5)")
    ap.add_argument("--storage", choices=["mac-like", "warm"], default="mac-like")
    ap.add_argument("--read-ratio", type=arguments.positive, default=None,
                    help="mac-like: one token's top-k expert reads / mlx-lm's resident time per "
                         "token (default 12)")


def check_run_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.read_ratio is not None and a.storage != "mac-like":
        ap.error("--read-ratio goes with --storage mac-like")


@arguments.refuse_bad_input
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--turns", type=int, default=6,
                    help=f"conversation turns, 1..{len(USER_MESSAGES)} (default 6)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per reply at most")
    ap.add_argument("--back-to-back", action="store_true",
                    help="run one setting's whole conversation, then the other's (one model "
                         "loaded at a time) instead of taking turns")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    if not 1 <= a.turns <= len(USER_MESSAGES):
        ap.error(f"--turns must be 1..{len(USER_MESSAGES)}")
    if a.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    check_run_args(ap, a)
    out = arguments.out_dir(ap, a.out)

    import mlx.core as mx
    import mlx_lm.utils

    import hobbit_mlx
    from bench.harness_report import _machine
    from hobbit_mlx.server.prompts import Template, chat_tokens

    t_start = time.perf_counter()
    paths = resolve_model_paths(a.model)
    template = Template()
    storage, storage_detail = None, "warm page cache (no simulation)"
    calibration = None
    if a.storage == "mac-like":
        tok = mlx_lm.utils.load_tokenizer(paths.src)
        first = chat_tokens(tok, [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": USER_MESSAGES[0]}], template)
        storage, calibration, storage_detail = mac_like_storage(paths, first, a.read_ratio)
        print(f"[prompt-reuse] {storage_detail}", file=sys.stderr)
    options = dict(TECHNIQUES[a.techniques], expert_residency=a.residency,
                   simulated_storage=storage)

    def load():
        return hobbit_mlx.load(str(paths.hobbit), progress=False, **options)

    convs = {key: Conversation(key, reuse, load, template) for key, reuse in SETTINGS}

    def log(c: Conversation, row: dict) -> None:
        print(f"[prompt-reuse] turn {row['turn']} {c.key:>8}: {row['prompt_tokens']} prompt "
              f"tokens ({row['cached_tokens']} cached), TTFT {row['ttft_s']:.2f} s, wall "
              f"{row['wall_s']:.2f} s, read {row['bytes_read'] / MB:.2f} MiB, "
              f"{row['generated_tokens']} generated", file=sys.stderr)

    try:
        if a.back_to_back:
            order = "back to back: the whole conversation without reuse, then with reuse"
            for c in convs.values():
                c.start()
                try:
                    for i in range(a.turns):
                        log(c, c.turn(i, a.max_tokens))
                finally:
                    c.stop()
        else:
            order = ("taking turns: both models loaded, each turn run on one then the other, "
                     "the order swapped every turn")
            for c in convs.values():
                c.start()
            for i in range(a.turns):
                keys = [k for k, _ in SETTINGS]
                for key in keys if i % 2 == 0 else keys[::-1]:
                    log(convs[key], convs[key].turn(i, a.max_tokens))
    finally:
        for c in convs.values():
            if c.worker.thread.is_alive():
                c.stop()

    off, on = convs["no_reuse"], convs["reuse"]
    same = [x == y for x, y in zip(off.replies, on.replies)]
    tot = {key: totals(convs[key].rows) for key, _ in SETTINGS}
    tot["ratio"] = {k: (tot["reuse"][k] / tot["no_reuse"][k] if tot["no_reuse"][k] else None)
                    for k in tot["reuse"]}
    name = a.name or (f"prompt-reuse-{paths.name}-{a.storage}"
                      + ("" if a.techniques == "exact" else f"-{a.techniques}"))
    result = {
        "meta": {"command": arguments.command(__file__, argv),
                 "model": paths.as_dict(), "techniques": a.techniques,
                 "load_options": {k: v for k, v in options.items() if k != "simulated_storage"},
                 "residency": a.residency, "turns": a.turns, "max_tokens": a.max_tokens,
                 "storage": a.storage, "storage_detail": storage_detail,
                 "calibration": calibration, "order": order, "system": SYSTEM,
                 "user_messages": USER_MESSAGES[:a.turns], "machine": _machine(),
                 "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "wall_s": time.perf_counter() - t_start},
        "runs": {key: convs[key].rows for key, _ in SETTINGS},
        "replies": {key: convs[key].replies for key, _ in SETTINGS},
        "same_reply": same, "identical_turns": sum(same), "totals": tot,
    }
    text = markdown(result)
    write_results(out, name, result, text)
    print(text)
    print(f"[prompt-reuse] wrote {out / name}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
