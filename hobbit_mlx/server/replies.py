"""A chat reply split into its text, its reasoning and its tool calls, as mlx-lm's server does.

The tokenizer knows its model's markers (mlx-lm infers them from the chat template and the
vocabulary: ``<think>``/``</think>``, ``<tool_call>``/``</tool_call>`` and the parser of what is
between). mlx-lm's ``TextStateMachine`` reads the decoded text as it streams, strips the markers
and says which state each piece is in: "normal" (the answer), "reasoning" or "tool". What is
built here on top of it, for both APIs:

- A call's text is held until its end marker arrives (or the reply ends), then parsed with the
  tokenizer's ``tool_parser``: a stream sends each call whole. A call that does not parse (the
  reply was cut by ``max_tokens`` inside it, or the model wrote invalid JSON) comes back as text,
  markers included, so nothing the model wrote is lost and the client sees why no call came.
- Tool calls are parsed only when the request gave tools (and the tokenizer has a tool parser);
  without, a call's markup stays in the text, as it did before. Reasoning is split whenever the
  tokenizer has thinking markers (mlx-lm's server does so for every chat request).
- The whitespace right after a marker (``</think>\\n\\n``, ``</tool_call>\\n``) is dropped: chat
  templates write it around the blocks, and it would otherwise be an answer of blank lines.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine

log = logging.getLogger("hobbit_mlx.server")


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict
    given_id: str | None = None  # an id the model's format carries (few do)
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def id(self, prefix: str) -> str:
        """The call's id in an API's style (``call_...``, ``toolu_...``)."""
        return self.given_id or f"{prefix}{self.key}"


@dataclass
class Part:
    """A piece of a reply: ``text`` (the answer), ``reasoning``, or a ``call``."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


TOOL_STATES = ("tool", "tool_in_reasoning")


def _machine(tokenizer, parse_tools: bool) -> TextStateMachine:
    """mlx-lm's state machine for this tokenizer, except that a call written inside the
    reasoning returns to the reasoning when it ends (mlx-lm's goes on in "normal", so the
    reasoning's rest and its end marker became the answer). Tokenizers with a response format
    of their own keep mlx-lm's machine as it is."""
    plain = tokenizer.has_thinking and parse_tools and tokenizer.tool_call_end and \
        not tokenizer.structural_markers and not tokenizer.response_transitions
    if not plain:
        return make_text_state_machine(tokenizer if parse_tools else _WithoutTools(tokenizer))
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    return TextStateMachine({
        "normal": [(tokenizer.think_start, "reasoning"), (start, "tool")],
        "reasoning": [(tokenizer.think_end, "normal"), (start, "tool_in_reasoning")],
        "tool": [(end, "normal")],
        "tool_in_reasoning": [(end, "reasoning")]})


class _WithoutTools:
    """The tokenizer as ``make_text_state_machine`` sees it for a request without tools: the
    same machine mlx-lm builds, less the tool transitions, so that call markup stays text in
    whatever state it is written (a call in the reasoning stays reasoning)."""

    has_tool_calling = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def initial_state(tokenizer, prompt: list[int]) -> str:
    """The state the reply starts in, as mlx-lm's server picks it: "reasoning" when the prompt
    ends inside a think block (templates that open it for the model, or a prefill that does),
    else "normal"; a template's own response format may name another."""
    state = "normal"
    if tokenizer.has_thinking:
        if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            state = "reasoning"
    return tokenizer.response_initial_state or state


def parses_tools(tokenizer, tools: list | None) -> bool:
    """Whether a request's tool calls are parsed: it gave tools, and the tokenizer has a parser
    (a model without one gets the tools only if its template shows them, and anything it
    writes as a call comes back as text; logged)."""
    if not tools:
        return False
    if not tokenizer.has_tool_calling:
        log.warning("the request has tools, but this model's chat template has no tool-call "
                    "format mlx-lm knows: its template may not show them to the model, and "
                    "calls are not parsed")
        return False
    return True


class Reply:
    """Feed the reply's text as it is generated; get back its parts, in order."""

    def __init__(self, tokenizer, prompt: list[int], tools: list | None = None):
        self.tools = tools
        self.parse_tools = parses_tools(tokenizer, tools)
        machine = _machine(tokenizer, self.parse_tools)
        self._state = initial_state(tokenizer, prompt)
        self._sm = machine.make_state(self._state)
        self._parser = tokenizer.tool_parser if self.parse_tools else None
        self._markers = (tokenizer.tool_call_start or "", tokenizer.tool_call_end or "") \
            if self.parse_tools else ("", "")
        self._call = ""  # the text of the call being written
        self._trim = self._state != "normal"  # drop the whitespace after a marker
        self.calls = 0  # calls parsed so far

    @property
    def made_call(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list[Part]:
        if not text:
            return []
        self._sm, segments = TextStateMachine.split(self._sm, text)
        return self._take(segments)

    def finish(self) -> list[Part]:
        """The end of the reply: text held back as a possible marker, and a call left open
        (parsed if it can be: some formats have no end marker; else its raw text)."""
        self._sm, held, state = TextStateMachine.flush(self._sm)
        parts = self._take([(state, held)])
        if self._state in TOOL_STATES and self.parse_tools:
            parts += self._end_call(closed=False)
        return parts

    def _take(self, segments: list[tuple[str | None, str]]) -> list[Part]:
        parts: list[Part] = []
        for state, text in segments:
            if state != self._state:
                if self._state in TOOL_STATES and self.parse_tools:
                    parts += self._end_call(closed=True)
                self._state, self._trim = state, True
            if state in TOOL_STATES and self.parse_tools:
                self._call += text
            elif state in ("normal", "tool"):  # ("tool" here: a template's own format)
                self._add(parts, "text", text)
            elif state == "reasoning":
                self._add(parts, "reasoning", text)
            # any other state (a template's headers) is markup, as mlx-lm drops it
        return parts

    def _add(self, parts: list[Part], kind: str, text: str) -> None:
        if self._trim:
            text = text.lstrip()
        if text:
            self._trim = False
            parts.append(Part(kind, text))

    def _end_call(self, closed: bool) -> list[Part]:
        raw, self._call = self._call, ""
        calls = self._parse(raw)
        if calls:
            self.calls += len(calls)
            return [Part("call", call=c) for c in calls]
        start, end = self._markers
        self._trim = False
        kind = "reasoning" if self._state == "tool_in_reasoning" else "text"
        return [Part(kind, start + raw + (end if closed else ""))]

    def _parse(self, raw: str) -> list[ToolCall] | None:
        """The calls in one call's text, or None (logged) when it does not parse into calls
        with a name and an object of arguments."""
        try:
            parsed = self._parser(raw, self.tools)
            parsed = parsed if isinstance(parsed, list) else [parsed]
            calls = [_call(p) for p in parsed]
            if calls and all(c is not None for c in calls):
                return calls
            problem = "no function name or arguments that are not an object"
        except Exception as e:  # noqa: BLE001 - any parser's failure: the text is kept
            problem = f"{type(e).__name__}: {e}"
        log.warning("a tool call did not parse (%s); it is returned as text: %.200r",
                    problem, raw)
        return None


def _call(parsed: Any) -> ToolCall | None:
    """A parser's call (``{"name": ..., "arguments": ...}``) checked; arguments given as a JSON
    string are read."""
    if not isinstance(parsed, dict):
        return None
    name, args = parsed.get("name"), parsed.get("arguments")
    if args is None or args == "":
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    given = parsed.get("id")
    return ToolCall(name, args, given if isinstance(given, str) and given else None)


def split_reply(reply: Reply, texts: list[str]) -> list[Part]:
    """A whole reply's parts (the non-streamed responses)."""
    parts = [p for t in texts for p in reply.feed(t)]
    return parts + reply.finish()


def joined(parts: list[Part], kind: str) -> str:
    return "".join(p.text for p in parts if p.kind == kind)
