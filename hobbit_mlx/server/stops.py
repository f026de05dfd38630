"""Stop sequences over streamed text: text is released only once it cannot start a stop sequence.

A stop sequence may span several tokens, so the end of what was generated is held back while it
could still be the start of one; when one completes, the text before it is the reply.
"""

from __future__ import annotations


class StopMatcher:
    """Feed generated text piece by piece; get back what may be sent, and whether to stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text not released yet: it may be the start of a stop sequence
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop sequence completed)."""
        if not self.stops:
            return text, False
        self.held += text
        hits = [(self.held.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, self.matched = min(hits)
            out, self.held = self.held[:at], ""
            return out, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        """What is held back, when generation ends without a stop sequence."""
        out, self.held = self.held, ""
        return out

    def _partial(self, stop: str) -> int:
        """The length of the longest end of the held text that begins ``stop``."""
        for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:n]):
                return n
        return 0
