"""A quantized KV cache (mlx-lm's ``kv_bits``), counted in the memory budget.

A long context's keys and values take memory the expert pools could use: Qwen3-30B-A3B holds
~96 KiB per token in bf16, 3 GiB at 32k tokens. mlx-lm's generation quantizes each layer's cache
once it holds ``start`` tokens (``maybe_quantize_kv_cache``: the whole cache at once, after the
call that reaches it). Here it is a load option rather than a per-call one, so that the budget
plans for it: the KV reserve per token is measured on a quantized cache, and so is what a call
attending to a quantized context adds (mlx-lm's attention over quantized keys and values builds
its scores without the fused kernel).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .budget import BudgetError
from .quantizable import mlx_quantizes, supported_bits, supported_group_sizes


@dataclass(frozen=True)
class KVQuant:
    """Quantize the KV cache to ``bits`` in groups of ``group_size`` once it holds ``start``
    tokens (mlx-lm's ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``)."""

    bits: int
    group_size: int = 64
    start: int = 0

    def check(self) -> None:
        """Raise ValueError naming what this MLX cannot quantize with."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral) or \
                self.bits not in supported_bits():
            raise ValueError(f"kv_bits {self.bits!r}: MLX quantizes at "
                             f"{', '.join(map(str, supported_bits()))} bits")
        if not isinstance(self.group_size, numbers.Integral) or \
                self.group_size not in supported_group_sizes():
            raise ValueError(f"kv_group_size {self.group_size!r}: MLX quantizes in groups of "
                             f"{', '.join(map(str, supported_group_sizes()))}")
        if not mlx_quantizes(self.bits, self.group_size):
            raise ValueError(f"kv_bits {self.bits} with kv_group_size {self.group_size}: MLX "
                             "cannot quantize with this combination")
        if not isinstance(self.start, numbers.Integral) or self.start < 0:
            raise ValueError(f"quantized_kv_start is a token count, 0 or more (got {self.start!r})")

    def generate_kwargs(self) -> dict:
        """The keywords mlx-lm's generation takes for it."""
        return {"kv_bits": self.bits, "kv_group_size": self.group_size,
                "quantized_kv_start": self.start}

    def check_applied(self, cache) -> None:
        """Before a model call: a cache that should be quantized by now and is not means the
        generation does not quantize it (mlx-lm's own ``generate`` without ``kv_bits``), while
        the budget planned for quantized keys and values: it would outgrow the budget."""
        for c in cache or ():
            offset = getattr(c, "offset", 0)
            if hasattr(c, "to_quantized") and isinstance(offset, int) and 0 < offset and \
                    offset >= self.start:
                raise BudgetError(
                    f"this model was loaded with kv_bits={self.bits}, and the budget planned for "
                    f"a KV cache quantized so, but this generation does not quantize it: use "
                    f"hobbit_mlx.generate / stream_generate, or pass mlx-lm "
                    f"{', '.join(f'{k}={v}' for k, v in self.generate_kwargs().items())}")

    def quantize(self, cache: list) -> None:
        """Quantize every layer's cache that mlx-lm would (in place), whatever it holds: for
        measuring. A layer whose cache mlx-lm cannot quantize (a sliding window) is an error
        here, at load, where mlx-lm would fail part way through a generation."""
        for i, c in enumerate(cache):
            if not hasattr(c, "to_quantized"):
                continue  # (recurrent state: mlx-lm leaves it as it is)
            try:
                cache[i] = c.to_quantized(group_size=self.group_size, bits=self.bits)
            except NotImplementedError:
                raise ValueError(f"kv_bits: mlx-lm cannot quantize this model's "
                                 f"{type(c).__name__} (layer {i})") from None
            except ValueError as e:
                raise ValueError(self._why_not(c, e)) from None

    def _why_not(self, cache, error: Exception) -> str:
        """Why mlx-lm cannot quantize ``cache``, with the group sizes that would do."""
        keys = getattr(cache, "keys", None)
        dim = keys.shape[-1] if hasattr(keys, "shape") else None
        if dim is None or dim % self.group_size == 0:
            return f"kv_bits {self.bits}: this model's KV cache cannot be quantized ({error})"
        fits = [g for g in supported_group_sizes() if dim % g == 0]
        return (f"kv_group_size {self.group_size} does not divide this model's head dimension "
                f"{dim}: " + (f"kv_group_size {', '.join(map(str, fits))} would" if fits else
                              "no group size MLX quantizes with does, so its KV cache cannot be "
                              "quantized"))
