"""Chat with an MoE model whose experts stream from storage under a memory budget.

    python -m hobbit_mlx.chat --model PATH --memory-budget 6GB

An mlx-lm-style REPL: type a message at the ``>>`` prompt and the reply streams back. Commands:
``q`` (or ``exit``) quits, ``r`` resets the conversation, ``h`` shows help, ``s`` prints the
offload statistics. The KV cache is kept across turns, so each turn only prefills what is new.
Reading from a pipe works too (``printf 'hello\\nq\\n' | python -m hobbit_mlx.chat ...``); end of
input ends the session.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from . import cli_common as cli

PROMPT = ">> "
HELP = ("commands: q or exit: quit   r: reset the conversation   h: this help   "
        "s: offload statistics")
_COUNTERS = ("expert_requests", "hits_high", "hits_low", "misses_high", "misses_low", "skipped",
             "bytes_read", "prefetch_issued", "prefetch_used", "layer_calls", "host_syncs",
             "read_wait_s")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hobbit_mlx.chat",
        description="Chat with an MoE model larger than memory: experts stream from storage "
                    "under one memory budget.")
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_template_args(parser, chat=True)
    cli.add_report_args(parser)
    return parser


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_offset(cache) -> int | None:
    for c in cache or ():
        off = getattr(c, "offset", None)
        if isinstance(off, int):
            return off
    return None


class Conversation:
    """Messages so far, and the prompt cache with the tokens it holds."""

    def __init__(self, model, tokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.args.system_prompt is not None:
            self.messages.append({"role": "system", "content": self.args.system_prompt})
        self._new_cache()

    def _new_cache(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds

    def _render(self, query: str) -> list[int]:
        tok = self.tokenizer
        if tok.has_chat_template:
            messages = self.messages + [{"role": "user", "content": query}]
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True,
                                               **self.args.chat_template_kwargs)
            except Exception as e:
                raise cli.CLIError(f"the chat template failed: {type(e).__name__}: {e}") from None
            return list(tok.encode(text, add_special_tokens=False))
        # No template: the conversation is plain text, one turn after the other.
        return self.cached + list(tok.encode(query + "\n", add_special_tokens=not self.cached))

    def prepare(self, query: str) -> tuple[list[int], list[int]]:
        """(all tokens of the conversation, the suffix the model still has to process)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        full = self._render(query)
        common = min(_common_prefix(self.cached, full), len(full) - 1)
        if common == len(self.cached):
            pass  # the cache is a prefix of the new prompt: feed the rest
        elif common > 0 and can_trim_prompt_cache(self.cache):
            # e.g. the template renders the last reply differently than it was generated
            trimmed = trim_prompt_cache(self.cache, len(self.cached) - common)
            if trimmed != len(self.cached) - common:
                self._new_cache()
                common = 0
            else:
                self.cached = self.cached[:common]
        else:
            self._new_cache()
            common = 0
        return full, full[common:]

    def finish(self, query: str, full: list[int], reply: str, generated: list[int]) -> None:
        self.messages.append({"role": "user", "content": query})
        self.messages.append({"role": "assistant", "content": reply})
        expected = full + generated
        offset = _cache_offset(self.cache)
        if offset is None or offset == len(expected):
            self.cached = expected
        elif offset == len(expected) - 1:
            self.cached = expected[:-1]  # the last token was sampled but not run
        else:
            self._new_cache()  # unknown state: rebuild from the messages next turn

    def invalidate(self) -> None:
        self._new_cache()


class Tally:
    """Offload statistics added up over turns (each turn resets the model's counters)."""

    def __init__(self):
        self.total = {k: 0 for k in _COUNTERS}
        self.total.update(peak_memory_bytes=0, prompt_tokens=0, generation_tokens=0, turns=0,
                          prompt_s=0.0, generation_s=0.0)

    def add(self, stats: dict) -> None:
        for k in _COUNTERS:
            self.total[k] += stats.get(k, 0)
        self.total["peak_memory_bytes"] = max(self.total["peak_memory_bytes"],
                                              stats.get("peak_memory_bytes", 0))
        self.total["turns"] += 1
        for k in ("prompt_tokens", "generation_tokens"):
            self.total[k] += stats.get(k, 0)
        if stats.get("prompt_tps"):
            self.total["prompt_s"] += stats["prompt_tokens"] / stats["prompt_tps"]
        if stats.get("generation_tps"):
            self.total["generation_s"] += stats["generation_tokens"] / stats["generation_tps"]

    def report(self, model) -> dict:
        import hobbit_mlx

        s = hobbit_mlx.offload_stats(model)  # for the current residency, budget and so on
        s.update(self.total)
        s["peak_memory_bytes"] = max(self.total["peak_memory_bytes"], s.get("peak_memory_bytes", 0))
        served = s["hits_high"] + s["hits_low"]
        s["hit_rate"] = served / s["expert_requests"] if s["expert_requests"] else 0.0
        t = self.total
        s["prompt_tps"] = t["prompt_tokens"] / t["prompt_s"] if t["prompt_s"] else 0.0
        s["generation_tps"] = t["generation_tokens"] / t["generation_s"] if t["generation_s"] else 0.0
        s["wall_s"] = t["prompt_s"] + t["generation_s"]
        return s


def _turn_summary(stats: dict, fed: int, total: int) -> str:
    reused = total - fed
    line = (f"[{stats['generation_tokens']} tokens, {stats['generation_tps']:.2f} tokens/s; "
            f"prompt {fed} new tokens" + (f" (+{reused} cached)" if reused else "") +
            f", {stats['prompt_tps']:.2f} tokens/s; expert hit rate {100 * stats['hit_rate']:.1f}%, "
            f"read {cli.format_size(stats['bytes_read'])}; peak {cli.format_size(stats['peak_memory_bytes'])}")
    if stats.get("budget_bytes"):
        line += f" of {cli.format_size(stats['budget_bytes'])}"
    return line + "]"


def _read(tty: bool) -> str | None:
    try:
        line = input(PROMPT)
    except EOFError:
        print()
        return None
    if not tty:
        print(line)  # echo piped input so the transcript reads like a session
    return line


def main(argv: Sequence[str] | None = None) -> int:
    import hobbit_mlx

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    cli.check_args(args)
    cli.seed(args)
    model, tokenizer, _ = cli.load_model(args)

    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"[hobbit_mlx] chatting with {getattr(hobbit_mlx.runtime_of(model), 'model_dir', args.model)}"
          f"; type h for help", file=sys.stderr, flush=True)

    sampler = cli.make_sampler(args, tokenizer)
    conv = Conversation(model, tokenizer, args)
    tally = Tally()
    while True:
        try:
            query = _read(tty)
        except KeyboardInterrupt:
            print()
            break
        if query is None:
            break
        command = query.strip()
        if not command:
            continue
        if command in ("q", "exit", "quit"):
            break
        if command == "r":
            conv.reset()
            print("[conversation reset]", flush=True)
            continue
        if command == "h":
            print(HELP, flush=True)
            continue
        if command == "s":
            for line in cli.format_report(tally.report(model)):
                print(line)
            sys.stdout.flush()
            continue

        full, feed = conv.prepare(query)
        hobbit_mlx.reset_stats(model)
        generated: list[int] = []
        pieces: list[str] = []
        last = None
        t0 = time.perf_counter()
        try:
            for response in hobbit_mlx.stream_generate(
                    model, tokenizer, feed, max_tokens=args.max_tokens, sampler=sampler,
                    logits_processors=cli.make_logits_processors(args),
                    prompt_cache=conv.cache):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                generated.append(response.token)
                pieces.append(response.text)
                last = response
        except KeyboardInterrupt:
            print("\n[interrupted]", flush=True)
            conv.finish(query, full, "".join(pieces), generated)
            conv.invalidate()  # the cache may hold a half-run step
            continue
        except hobbit_mlx.BudgetError as e:  # the conversation outgrew the budget
            print(f"\n[hobbit_mlx] {e}; 'r' resets the conversation", file=sys.stderr, flush=True)
            conv.finish(query, full, "".join(pieces), generated)
            conv.invalidate()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        conv.finish(query, full, "".join(pieces), generated)
        stats = cli.run_stats(model, last, time.perf_counter() - t0)
        tally.add(stats)
        if not args.quiet_report:
            print(_turn_summary(stats, len(feed), len(full)), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
