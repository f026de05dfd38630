"""How long prefilling some tokens again would take: the measure for keeping a prompt cache on
disk (``server/kept_prompts.py``), whose own file is written and read on the same storage as the
experts.

A prefill's time is its compute, which grows with its tokens, and its expert reads, which do not
grow so but saturate: a prefill reads the experts its tokens route to that are not resident, and
a few dozen tokens already route to most of a layer's experts (top-8 of 64: 18 tokens to 91% of
them, 70 to all). So what keeping a conversation's cache saves is ``time(tokens to prefill
without it) - time(tokens with it)``, not a rate times the tokens saved. The reads' shape is
taken from uniform routing: the distinct experts ``n`` tokens pick, ``E (1 - (1 - k/E)^n)`` per
layer, times their 4-bit bytes, once per prefill chunk (once for the whole prompt where it is
prefilled layer by layer); its scale is measured: the bytes this process's prefills read against
that shape (what is resident, the routing's skew). A byte's time is the reader's (measured, or
the simulated device's), and the compute per token is what the measured prefills took beyond
their reads. Until a prefill has been measured there is no estimate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

SAMPLES = 32  # the last prefills the estimate is measured over


@dataclass(frozen=True)
class _Prefill:
    tokens: int
    shape: float  # bytes of distinct experts, chunk by chunk (see PrefillCost.shape)
    seconds: float
    bytes_read: int


class PrefillCost:
    """``layers``: (experts, bytes of one 4-bit expert) per MoE layer; ``top_k`` experts per
    token; ``chunk(n)``: the tokens a prefill of ``n`` reads its experts once for (the plan's
    chunk, or ``n`` where it runs layer by layer); ``seconds_per_byte()``: what storage takes."""

    def __init__(self, layers: list[tuple[int, int]], top_k: int, chunk: Callable[[int], int],
                 seconds_per_byte: Callable[[], float]) -> None:
        self.layers, self.top_k, self.chunk = layers, top_k, chunk
        self.seconds_per_byte = seconds_per_byte
        self.samples: deque[_Prefill] = deque(maxlen=SAMPLES)

    @classmethod
    def of_runtime(cls, runtime) -> "PrefillCost":
        """The estimate for a loaded model's runtime: its store's layers, its plan's chunk (a
        prompt longer than it is prefilled layer by layer where that is on), its reader."""
        m = runtime.manifest
        layers = [(layer.num_experts, layer.precisions["high"].expert_nbytes)
                  for layer in m.layers]

        def chunk(n: int) -> int:
            plan, step = runtime.plan, runtime.prefill_step_size
            c = max(1, min(step, plan.chunk_tokens) if plan is not None else step)
            by_layer = runtime.layer_major_prefill and runtime.prefetcher is None
            return n if n > c and by_layer else c

        return cls(layers, m.experts_per_token, chunk, runtime.reader.seconds_per_byte)

    def shape(self, n: int) -> float:
        """Bytes of the distinct experts a prefill of ``n`` tokens routes to, chunk by chunk,
        were routing uniform and nothing resident."""
        if n <= 0:
            return 0.0
        full, rest = divmod(n, max(1, self.chunk(n)))
        return full * self._one_chunk(self.chunk(n)) + self._one_chunk(rest)

    def _one_chunk(self, n: int) -> float:
        return sum(bytes_ * e * (1 - (1 - min(self.top_k, e) / e) ** n)
                   for e, bytes_ in self.layers) if n > 0 else 0.0

    def record(self, tokens: int, seconds: float, bytes_read: int) -> None:
        """A prefill of ``tokens`` tokens took ``seconds`` and read ``bytes_read`` bytes."""
        if tokens > 0 and seconds > 0:
            self.samples.append(_Prefill(tokens, self.shape(tokens), seconds, bytes_read))

    def read_bytes(self, n: int) -> float | None:
        """Expert bytes a prefill of ``n`` tokens would read; None before any was measured."""
        shape = sum(p.shape for p in self.samples)
        if not shape:
            return None
        return self.shape(n) * sum(p.bytes_read for p in self.samples) / shape

    def seconds(self, n: int) -> float | None:
        """How long a prefill of ``n`` tokens would take; None before any was measured."""
        reads = self.read_bytes(n)
        if reads is None:
            return None
        per_byte = self.seconds_per_byte()
        compute = sum(max(0.0, p.seconds - p.bytes_read * per_byte) for p in self.samples)
        return reads * per_byte + n * compute / sum(p.tokens for p in self.samples)

    def saved(self, without: int, with_: int) -> float | None:
        """Seconds saved by prefilling ``with_`` tokens instead of ``without``."""
        a, b = self.seconds(without), self.seconds(with_)
        return None if a is None or b is None else a - b
