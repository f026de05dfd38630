"""Generation on every rank in lockstep, rank 0 leading (chat, server, generate).

Its own module because generation has its own collectives, apart from loading: rank 0's
sampling flags, seed and decision to go on after each prompt chunk and token, the room every
rank's budget leaves, and the prompt's chunks every rank agrees on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import PipelineError
from .gather import gather_json, settle

if TYPE_CHECKING:
    from .rank import Pipeline


def agree_prefill_step(pipe: Pipeline, kwargs: dict) -> dict:
    """Every rank prefills the prompt in the same chunks (a collective: every rank must call it).
    ``_with_defaults`` caps ``prefill_step_size`` at this rank's own plan, which differs between
    ranks (their budgets and layers differ): a rank that cut the prompt into more chunks would
    run more forward calls (and progress exchanges) than the others, and the pipeline hangs. The
    smallest step of any rank fits every rank's plan."""
    steps = gather_json(pipe.group, int(kwargs["prefill_step_size"]))
    for rank, step in enumerate(steps):
        if not isinstance(step, int) or step < 1:  # (a dead peer's slot holds what it last sent)
            raise PipelineError(f"the ranks could not agree on the prompt's chunks: rank {rank} "
                                f"sent {step!r} (the connection to a peer was lost, or the ranks "
                                "are out of step)")
    kwargs["prefill_step_size"] = min(steps)
    return kwargs


class _Stopped(Exception):
    """Rank 0 ended the generation during the prompt (raised from mlx-lm's progress callback)."""


# The command-line flags that decide the tokens sampled and how many: rank 0's hold on every rank.
SAMPLING_ARGS = ("temp", "top_p", "min_p", "top_k", "min_tokens_to_keep", "xtc_probability",
                 "xtc_threshold", "repetition_penalty", "repetition_context_size", "max_tokens")


class Lockstep:
    """Rank 0 leads, the other ranks follow: every step of a generation needs the same forward
    calls on every rank, so rank 0 tells the others what to generate (``broadcast``), and after
    each token every rank learns from rank 0 whether to go on (``generate``). A rank that
    follows runs exactly the collectives rank 0 runs, in the same order."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.leader = pipe.rank == 0
        self.started = False  # the last generate() got past its agreement (errors then are fatal)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a collective; the others pass nothing)."""
        out = gather_json(self.pipe.group, obj if self.leader else None)[0]
        self.pipe.progress()
        return out

    def shared_seed(self, seed: int | None) -> int:
        """Seed every rank's random generator alike (rank 0's ``seed``, or one rank 0 draws), so
        that sampling picks the same token on every rank."""
        if self.leader and seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        seed = int(self.broadcast(seed))
        mx.random.seed(seed)
        return seed

    def follow_args(self, args: Any, names: Sequence[str] = SAMPLING_ARGS) -> None:
        """Rank 0's values of the flags ``names`` on every rank's ``args`` (a collective): a
        rank started with another --temp would sample other tokens and break the pipeline."""
        values = self.broadcast({n: getattr(args, n) for n in names if hasattr(args, n)})
        for name, value in values.items():
            setattr(args, name, value)

    def exchange(self, go_on: bool, token: int) -> bool:
        """Rank 0's ``go_on`` on every rank; every rank's token must be the same."""
        settle()
        rows = np.array(mx.distributed.all_gather(
            mx.array([[int(go_on), int(token)]], dtype=mx.int32), group=self.pipe.group,
            stream=mx.cpu))
        self.pipe.progress()
        if (rows[:, 1] != rows[0, 1]).any():
            raise PipelineError("the ranks sampled different tokens (" + ", ".join(
                f"rank {r}: {t}" for r, t in enumerate(rows[:, 1])) + "); sampling must give "
                "the same token on every rank")
        return bool(rows[0, 0])

    def generate(self, model: nn.Module, tokenizer, prompt: list[int], max_tokens: int,
                 keep_going: Callable[[], bool] | None = None, **kwargs) -> Iterator[Any]:
        """``hobbit_mlx.stream_generate`` on every rank in lockstep: its budget planning is
        agreed first (a prompt one rank cannot hold is that rank's error, raised on every rank
        before any forward call) and so are the prompt's chunks (the smallest step any rank's
        plan allows), then rank 0's ``keep_going()`` (and rank 0 closing this
        generator, or raising into it) decides after each prompt chunk and each token whether
        every rank goes on. A generation stopped during the prompt yields nothing.
        ``max_tokens`` is cut to what every rank's budget holds after the prompt: a rank whose
        context ran out part way would fail alone and break the pipeline."""
        import mlx_lm

        from .. import _with_defaults
        from ..loader import context_of, runtime_of

        self.started = False
        room = runtime_of(model).plan.longest_context - len(prompt) \
            - context_of(kwargs.get("prompt_cache"))
        least = min(gather_json(self.pipe.group, room))
        if least > 0 and (max_tokens < 0 or max_tokens > least):
            max_tokens = least
        kwargs = self.pipe.agreed(
            lambda: _with_defaults(model, tokenizer, prompt, dict(kwargs, max_tokens=max_tokens)),
            what="cannot run this prompt")
        self.started = True
        agree_prefill_step(self.pipe, kwargs)  # the same chunks on every rank

        def progress(_done: int, _total: int) -> None:
            go = not self.leader or keep_going is None or keep_going()
            if not self.exchange(go, -1):
                raise _Stopped()

        kwargs["prompt_progress_callback"] = progress
        gen = mlx_lm.stream_generate(model, tokenizer, prompt, **kwargs)
        try:
            for r in gen:
                go = False
                try:
                    yield r
                    go = r.finish_reason is None and (
                        not self.leader or keep_going is None or keep_going())
                finally:  # also when the caller closed this generator or raised into it
                    go = self.exchange(go, r.token)
                if not go:
                    break
                if r.finish_reason is not None:
                    raise PipelineError(f"rank {self.pipe.rank} ended its generation "
                                        f"({r.finish_reason}) where rank 0 went on")
        except _Stopped:
            return
        finally:
            gen.close()
            settle()
