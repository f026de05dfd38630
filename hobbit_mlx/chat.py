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
import contextlib
import signal
import sys
import threading
import time
from typing import Sequence

from . import cli_common as cli, cli_flags, cli_load, cli_report
from .budget import format_size
from .prompt_cache import PromptCache

PROMPT = ">> "
HELP = ("commands: q or exit: quit   r: reset the conversation   h: this help   "
        "s: offload statistics")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.chat",
        description="Chat with an MoE model larger than memory: experts stream from storage "
                    "under one memory budget.")
    cli_flags.add_model_args(parser)
    cli_flags.add_sampling_args(parser)
    cli_flags.add_template_args(parser, chat=True)
    cli_flags.add_report_args(parser)
    return parser


TRIM_HEADROOM = 0.25  # of the context: what dropping old turns leaves free for the next ones


class Conversation:
    """Messages so far, and the prompt cache with the tokens it holds."""

    def __init__(self, model, tokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.args.system_prompt is not None:
            self.messages.append({"role": "system", "content": self.args.system_prompt})
        self.plain: list[list[int]] = []  # without a template: each turn's tokens, in order
        self._kept = PromptCache(self.model, self.args.max_kv_size)

    @property
    def cache(self):
        """The mlx-lm prompt cache the next turn generates with."""
        return self._kept.cache

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys and values the cache holds."""
        return self._kept.tokens

    def _render(self, query: str, history: bool = True) -> list[int]:
        """The conversation's tokens with ``query`` next (``history`` False: the system prompt
        and ``query`` alone)."""
        tok = self.tokenizer
        if tok.has_chat_template:
            kept = self.messages if history else [m for m in self.messages[:1]
                                                  if m["role"] == "system"]
            messages = kept + [{"role": "user", "content": query}]
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True,
                                               **self.args.chat_template_kwargs)
            except Exception as e:
                raise cli.CLIError(f"the chat template failed: {type(e).__name__}: {e}") from None
            return list(tok.encode(text, add_special_tokens=False))
        # No template: the conversation is plain text, one turn after the other.
        before = self._plain_tokens() if history else []
        return before + list(tok.encode(query + "\n", add_special_tokens=not before))

    def _plain_tokens(self) -> list[int]:
        return [t for turn in self.plain for t in turn]

    def fit(self, query: str, limit: int, reply_room: int) -> int:
        """Drop the oldest turns until the conversation and ``reply_room`` tokens fit the
        ``limit`` the budget holds, with a quarter of it to spare (the system prompt stays); how
        many were dropped. Without it a conversation that outgrew the budget failed on every turn
        until reset; dropping only what the turn needed made every later turn drop again, and
        each drop prefills the whole history anew (6x the time per turn). With
        ``--max-kv-size`` none is dropped: the cache forgets the oldest tokens itself."""
        if self.args.max_kv_size or len(self._render(query)) + reply_room <= limit:
            return 0
        if len(self._render(query, history=False)) >= limit:
            return 0  # no dropping makes room: the turn is refused, the history kept
        dropped = 0
        target = limit - int(TRIM_HEADROOM * limit)
        if len(self._render(query, history=False)) + reply_room > target:
            target = limit  # (no room to spare: drop only what the turn needs)
        while len(self._render(query)) + reply_room > target:
            if self.plain:
                self.plain.pop(0)
            elif len(self.messages) >= 2 and self.messages[-1]["role"] == "assistant":
                first = 1 if self.messages[0]["role"] == "system" else 0
                del self.messages[first:first + 2]  # (a user message and its reply)
            else:
                break
            dropped += 1
        return dropped

    def prepare(self, query: str) -> tuple[list[int], list[int]]:
        """(all tokens of the conversation, the suffix the model still has to process)."""
        full = self._render(query)
        return full, self.feed(full, self._turn_start(full))

    def _turn_start(self, full: list[int]) -> int | None:
        """Where the new user turn starts in ``full``: after the history as the template renders
        it. Only a rotating cache (``--max-kv-size``) needs it, once it cannot be trimmed."""
        tok = self.tokenizer
        if not self.args.max_kv_size or not tok.has_chat_template or not self.messages:
            return None
        try:
            text = tok.apply_chat_template(self.messages, tokenize=False,
                                           **self.args.chat_template_kwargs)
        except Exception:  # noqa: BLE001 - (a template that wants a user message last)
            return None
        history = list(tok.encode(text, add_special_tokens=False))
        return len(history) if full[:len(history)] == history else None

    def feed(self, full: list[int], turn_start: int | None = None) -> list[int]:
        """The suffix of ``full`` the cache does not hold yet (a pipeline rank that follows gets
        ``full`` from rank 0)."""
        return self._kept.feed(full, turn_start)

    def finish(self, query: str, full: list[int], reply: str, generated: list[int],
               whole: bool = True) -> None:
        """The turn joins the conversation. ``whole``: its generation ended by itself; else
        (Ctrl-C) the cache keeps what it held before the turn, which the next turn's prompt
        starts with (it may hold a half-run step: the turn is prefilled again, not the whole
        conversation)."""
        self.messages.append({"role": "user", "content": query})
        self.messages.append({"role": "assistant", "content": reply})
        if not self.tokenizer.has_chat_template:
            self.plain.append(list(full[len(self._plain_tokens()):]) + list(generated))
        if whole:
            self.finish_tokens(generated)
        else:
            self._kept.abandon()

    def finish_tokens(self, generated: list[int]) -> None:
        """The cache now holds the prompt fed and the generated tokens (or the last but one)."""
        self._kept.finish(generated)

    def invalidate(self) -> None:
        """The cache may hold a half-run step: the next turn rebuilds it from the messages (or
        the plain turns' tokens)."""
        self._kept.reset()


class Tally:
    """Offload statistics added up over turns (each turn resets the model's counters): the
    runtime's counters, summed, give every line of the report, rates included."""

    def __init__(self, model):
        from .runtime import OffloadStats

        self.model = model
        self.counters = OffloadStats()
        self.total = dict(peak_memory_bytes=0, prompt_tokens=0, generation_tokens=0, turns=0,
                          prompt_s=0.0, generation_s=0.0)

    def add(self, stats: dict) -> None:
        """A turn ended (``stats``: its report; the runtime still holds its counters)."""
        import hobbit_mlx

        self.counters.add(hobbit_mlx.runtime_of(self.model).stats)
        self.total["peak_memory_bytes"] = max(self.total["peak_memory_bytes"],
                                              stats.get("peak_memory_bytes", 0))
        self.total["turns"] += 1
        for k in ("prompt_tokens", "generation_tokens"):
            self.total[k] += stats.get(k, 0)
        if stats.get("prompt_tps"):
            self.total["prompt_s"] += stats["prompt_tokens"] / stats["prompt_tps"]
        if stats.get("generation_tps"):
            self.total["generation_s"] += stats["generation_tokens"] / stats["generation_tps"]

    def report(self) -> dict:
        import hobbit_mlx

        s = hobbit_mlx.offload_stats(self.model, self.counters)
        t = self.total
        # (before any turn the peak is what the model holds: its dense weights)
        peak = max(t["peak_memory_bytes"], s["peak_memory_bytes"], s["active_memory_bytes"])
        s.update(t, peak_memory_bytes=peak)
        s["prompt_tps"] = t["prompt_tokens"] / t["prompt_s"] if t["prompt_s"] else 0.0
        s["generation_tps"] = t["generation_tokens"] / t["generation_s"] if t["generation_s"] else 0.0
        s["wall_s"] = t["prompt_s"] + t["generation_s"]
        return s


def _stopped_turn_stats(model, last, t0: float) -> dict:
    """A turn stopped part way (Ctrl-C, the budget) still read and generated: its statistics
    join the session's totals ('s'), as far as the runtime can give them."""
    try:
        return cli_report.run_stats(model, last, time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - the turn's own error was already reported
        return {}


def _turn_summary(stats: dict, fed: int, total: int, window: int | None = None) -> str:
    """``window``: a rotating cache's (--max-kv-size), which holds only the last tokens."""
    reused = total - fed
    held = f"+{reused} cached" if not window or reused <= window else \
        f"+{reused} before them, of which the cache keeps {window}"
    line = (f"[{stats['generation_tokens']} tokens, {stats['generation_tps']:.2f} tokens/s; "
            f"prompt {fed} new tokens" + (f" ({held})" if reused else "") +
            f", {stats['prompt_tps']:.2f} tokens/s; expert hit rate {100 * stats['hit_rate']:.1f}%, "
            f"read {format_size(stats['bytes_read'])}; peak {format_size(stats['peak_memory_bytes'])}")
    if stats.get("budget_bytes"):
        line += f" of {format_size(stats['budget_bytes'])}"
    return line + "]"


def _read(tty: bool) -> str | None:
    try:
        line = input(PROMPT)
    except EOFError:
        print()
        return None
    line = cli.clean_text(line)
    if not tty:
        print(line)  # echo piped input so the transcript reads like a session
    return line


def _follow(lock, model, tokenizer, args: argparse.Namespace) -> int:
    """A pipeline rank other than 0: run the turns rank 0 sends, print nothing, until it ends
    the session (rank 0 reads the input and handles Ctrl-C; mlx.launch gives every rank the
    same input, which the others leave unread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conv = Conversation(model, tokenizer, args)
    sampler = cli.make_sampler(args, tokenizer)
    while True:
        with lock.pipe.waiting():
            msg = lock.broadcast()
        if msg["op"] == "exit":
            break
        if msg["op"] == "reset":
            conv.reset()
            continue
        full = msg["full"]
        generated, last = [], None
        try:
            for r in lock.generate(model, tokenizer, conv.feed(full), max_tokens=args.max_tokens,
                                   sampler=sampler, prompt_cache=conv.cache,
                                   logits_processors=cli.make_logits_processors(args)):
                generated.append(r.token)
                last = r
        except Exception:  # noqa: BLE001 - before any forward call every rank has the error
            if lock.started:
                raise
        conv.finish_tokens(generated)
        if last is None or last.finish_reason is None:
            conv.invalidate()  # stopped early or refused: as rank 0 does
    lock.pipe.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import hobbit_mlx
    from .pipeline import Lockstep, pipeline_of

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    cli_load.join_pipeline(args)
    cli_flags.check_args(args)
    model, tokenizer, _ = cli_load.load_model(args)
    cli.seed(args)  # after the load, which draws random numbers (as mlx-lm's does not)
    pipe = pipeline_of(model)
    lock = None
    if pipe is not None:  # rank 0 chats; the other ranks follow it
        pipe.watchdog(args.pipeline_timeout)
        lock = Lockstep(pipe)
        lock.shared_seed(args.seed)
        lock.follow_args(args)  # rank 0's sampling settings and max_tokens, on every rank
        if not lock.leader:
            return _follow(lock, model, tokenizer, args)

    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"[hobbit_mlx] chatting with {args.model or 'the bundled reference model'}"
          f"; type h for help", file=sys.stderr, flush=True)

    sampler = cli.make_sampler(args, tokenizer)
    conv = Conversation(model, tokenizer, args)
    tally = Tally(model)
    limit = hobbit_mlx.runtime_of(model).plan.longest_context
    while True:
        try:
            with pipe.waiting() if pipe is not None else contextlib.nullcontext():
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
            if lock is not None:
                lock.broadcast({"op": "reset"})
            print("[conversation reset]", flush=True)
            continue
        if command == "h":
            print(HELP, flush=True)
            continue
        if command == "s":
            for line in cli_report.format_report(tally.report()):
                print(line)
            sys.stdout.flush()
            continue

        room = min(args.max_tokens if args.max_tokens > 0 else limit, limit // 2)
        dropped = conv.fit(query, limit, room)
        if dropped:
            print(f"[hobbit_mlx] dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}: "
                  f"the conversation outgrew the {limit} tokens the memory budget holds",
                  file=sys.stderr, flush=True)
        full, feed = conv.prepare(query)
        hobbit_mlx.reset_stats(model)
        generated: list[int] = []
        pieces: list[str] = []
        last = None
        t0 = time.perf_counter()
        kwargs = dict(max_tokens=args.max_tokens, sampler=sampler, prompt_cache=conv.cache,
                      logits_processors=cli.make_logits_processors(args))
        if lock is not None:
            # Ctrl-C stops the turn at the next token on every rank (a KeyboardInterrupt in
            # the middle of a forward call would leave the other ranks waiting)
            interrupted = threading.Event()
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
            lock.broadcast({"op": "turn", "full": full})
            steps = lock.generate(model, tokenizer, feed,
                                  keep_going=lambda: not interrupted.is_set(), **kwargs)
        else:
            steps = hobbit_mlx.stream_generate(model, tokenizer, feed, **kwargs)
        try:
            for response in steps:
                sys.stdout.write(response.text)
                sys.stdout.flush()
                generated.append(response.token)
                pieces.append(response.text)
                last = response
        except KeyboardInterrupt:
            print("\n[interrupted]", flush=True)
            conv.finish(query, full, "".join(pieces), generated, whole=False)
            tally.add(_stopped_turn_stats(model, last, t0))
            continue
        except (hobbit_mlx.BudgetError, hobbit_mlx.PipelineError) as e:
            # the conversation outgrew the budget (of some rank)
            if lock is not None and lock.started:
                raise
            print(flush=True)  # (the partial reply's line ends on stdout too)
            if last is None:  # refused before a reply began: the message is not kept
                print(f"[hobbit_mlx] {e}; the message was not kept ('r' resets the "
                      "conversation)", file=sys.stderr, flush=True)
            else:
                print(f"[hobbit_mlx] {e}; the next turn drops the oldest turns to fit, 'r' "
                      "resets the conversation", file=sys.stderr, flush=True)
                conv.finish(query, full, "".join(pieces), generated)
            conv.invalidate()
            tally.add(_stopped_turn_stats(model, last, t0))
            continue
        finally:
            if lock is not None:
                steps.close()
                signal.signal(signal.SIGINT, previous)
        if lock is not None and (last is None or last.finish_reason is None):
            print("\n[interrupted]", flush=True)
            conv.finish(query, full, "".join(pieces), generated)
            conv.invalidate()
            tally.add(_stopped_turn_stats(model, last, t0))
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        conv.finish(query, full, "".join(pieces), generated)
        stats = cli_report.run_stats(model, last, time.perf_counter() - t0)
        tally.add(stats)
        if not args.quiet_report:
            print(_turn_summary(stats, len(feed), len(full), args.max_kv_size), file=sys.stderr,
                  flush=True)
    if lock is not None:  # the other ranks end too, after the same collectives
        lock.broadcast({"op": "exit"})
        pipe.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
