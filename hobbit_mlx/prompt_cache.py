"""A prompt cache kept from one generation to the next, with the tokens it holds.

A conversation resends everything said so far on each turn. Under offloading a prompt's prefill
is the dear part (each chunk reads the experts its tokens route to), so the next prompt is fed
only from where it stops agreeing with what the cache already holds: the cache is trimmed back to
the common prefix (a chat template may render the last reply differently than it was generated)
or, where it cannot be trimmed, started afresh. The chat REPL keeps one per conversation; the
server keeps one for whichever request came last (one sequence runs at a time, so the cache it
keeps is the one the next request uses: no memory beyond the context the budget reserves).
"""

from __future__ import annotations

from typing import Any


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_offset(cache) -> int | None:
    """Tokens the cache holds: the most any layer's holds (a pipeline rank's caches of the
    layers other ranks run stay empty); None for caches that do not say."""
    offsets = [c.offset for c in cache or () if isinstance(getattr(c, "offset", None), int)]
    return max(offsets) if offsets else None


def trim(cache, n: int) -> int:
    """Trim ``n`` tokens from the caches that hold any; the number trimmed (as mlx-lm's
    ``trim_prompt_cache``, which reads it from the first layer's cache, empty on a pipeline
    rank that does not run the first layer). The buffers are cut to what is left: mlx-lm's
    trim only moves the offset, and the buffers a long sequence grew stayed allocated while the
    budget planned the next, shorter one (a server over its budget by 1.07-1.34x)."""
    full = [c for c in cache if getattr(c, "offset", 1)]
    trimmed = min([c.trim(n) for c in full] or [0])
    for c in full:
        release_past_offset(c)
    return trimmed


def release_past_offset(c) -> None:
    """Copy a key-value cache's buffers (plain or quantized) down to the tokens it holds, rounded
    up to the cache's growth step (256 tokens), and let the larger ones go. Caches of other kinds
    are left as they are. (Cut to the tokens exactly, the next token grew the buffers by a whole
    step past them: a fresh cache's buffers end on a step, which the budget plans for, and a
    trimmed conversation near its context limit went 1.7% over the budget.)"""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    offset = getattr(c, "offset", None)
    if not isinstance(offset, int) or getattr(c, "keys", None) is None:
        return
    step = getattr(c, "step", 256)
    keep = -(-offset // step) * step
    if all(a.shape[2] <= keep for _, a in tree_flatten([c.keys, c.values])):
        return
    cut = lambda a: mx.contiguous(a[..., :keep, :])  # noqa: E731 - (a copy: a view holds all)
    c.keys, c.values = tree_map(cut, c.keys), tree_map(cut, c.values)
    mx.eval(c.keys, c.values)


class PromptCache:
    """An mlx-lm prompt cache (``cache``) and the tokens whose keys and values it holds."""

    def __init__(self, model: Any, max_kv_size: int | None = None):
        self.model, self.max_kv_size = model, max_kv_size
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next prompt is fed whole."""
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model, self.max_kv_size)
        self.tokens: list[int] = []
        self._fed: list[int] = []  # what the cache holds once the prompt fed has run

    @property
    def prompt_length(self) -> int:
        """Tokens of the last prompt fed (those ``tokens`` holds before the reply)."""
        return len(self._fed)

    def feed(self, full: list[int], turn_start: int | None = None) -> list[int]:
        """The suffix of ``full`` still to be processed, with the cache trimmed (or renewed) to
        hold exactly the rest; at least one token, which the model runs to predict the next.

        ``turn_start``: where this turn's own tokens start in ``full`` (the chat's). A cache that
        cannot be trimmed back to where ``full`` departs from what it holds (a rotating cache
        past its window: the template renders the last reply otherwise than it was generated)
        goes on from there, as mlx-lm's chat goes on, rather than prefill the whole
        conversation again."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        common = min(common_prefix(self.tokens, full), len(full) - 1)
        held = self.tokens
        if common == len(self.tokens):
            pass  # the cache is a prefix of the new prompt: feed the rest
        elif common > 0 and can_trim_prompt_cache(self.cache) \
                and trim(self.cache, len(self.tokens) - common) == len(self.tokens) - common:
            held = self.tokens[:common]
        elif self.tokens and turn_start is not None and common <= turn_start < len(full):
            common = turn_start  # (the cache keeps the reply as generated: the template's
            # rendering of it is left out, and the turn follows)
        else:
            self.reset()
            held, common = [], 0
        self.tokens = held
        self._fed = held + full[common:]
        return full[common:]

    def abandon(self) -> None:
        """A generation over what ``feed`` returned stopped part way (cancelled, failed): keep
        what the cache held before it, each layer cut back from whatever of the new tokens it
        took. A cache that cannot be cut back (recurrent, rotating) starts afresh. (Layers that
        hold nothing are a pipeline rank's others': left as they are.)"""
        from mlx_lm.models.cache import can_trim_prompt_cache

        held = len(self.tokens)
        offsets = [getattr(c, "offset", None) for c in self.cache]
        if not held or not can_trim_prompt_cache(self.cache) or any(
                not isinstance(o, int) or 0 < o < held for o in offsets):
            self.reset()
            return
        for c, offset in zip(self.cache, offsets):
            if offset > held:
                c.trim(offset - held)
                release_past_offset(c)
        self._fed = list(self.tokens)

    def finish(self, generated: list[int]) -> None:
        """A generation over what ``feed`` returned ended after yielding ``generated``: the
        cache holds them all, or all but the last (mlx-lm's loop samples the last token without
        running it). Anything else is an unknown state, and the next prompt is fed whole."""
        expected = self._fed + list(generated)
        offset = cache_offset(self.cache)
        if offset is None or offset == len(expected):
            self.tokens = expected
        elif offset == len(expected) - 1:
            self.tokens = expected[:-1]
        else:
            self.reset()
