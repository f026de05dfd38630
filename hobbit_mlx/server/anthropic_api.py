"""The Anthropic Messages API (``/v1/messages``), which coding agents speak, streamed or not.

A reply is split (``replies``) into content blocks, in the order the model wrote them: ``text``,
``thinking`` (its reasoning; the ``signature`` is empty, there is none to give) and ``tool_use``
(a call: ``id``, ``name``, ``input``; then ``stop_reason`` is ``"tool_use"``). A stream is the
API's named events: ``message_start``, ``ping``, then per block ``content_block_start``,
``content_block_delta`` (``text_delta``, ``thinking_delta``, or one ``input_json_delta`` with a
call's whole input, sent once the call's end marker arrived) and ``content_block_stop``, then
``message_delta`` (stop reason, output tokens) and ``message_stop``; a failure part way is an
``error`` event. ``/v1/messages/count_tokens`` counts a request's prompt.
"""

from __future__ import annotations

import json
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .dispatch import Dispatcher, read_json, sse
from .errors import ApiError, bad_request
from .params import Fields, Generation, anthropic_generation, check_body, check_model
from .prompts import anthropic_messages, anthropic_tools, chat_tokens
from .replies import Part, Reply, split_reply
from .worker import Finished, Piece

_KINDS = {"text": "text", "reasoning": "thinking"}  # a part's kind -> its block's type


def stop_reason(end: Finished, made_call: bool = False) -> str:
    """``max_tokens`` when cut; ``tool_use`` when the reply made a call and ended by itself (the
    client is to run it), else why it ended."""
    if end.finish_reason == "length":
        return "max_tokens"
    if made_call:
        return "tool_use"
    return "stop_sequence" if end.stop_sequence is not None else "end_turn"


def stop_sequence(end: Finished, reason: str) -> str | None:
    """The stop sequence matched, where it is the reason the reply ended (only then, as the
    API sets it)."""
    return end.stop_sequence if reason == "stop_sequence" else None


def _empty_block(kind: str) -> dict:
    return {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
        else {"type": "text", "text": ""}


def content_blocks(parts: list[Part]) -> list[dict]:
    """The reply's blocks: consecutive text (or reasoning) in one block, each call a block. A
    text block of whitespace alone is left out beside other blocks (the blank lines a model
    writes around a call); a reply with no block at all is one empty text block."""
    blocks: list[dict] = []
    for part in parts:
        if part.kind == "call":
            blocks.append(tool_use(part.call))
            continue
        kind = _KINDS[part.kind]
        if not blocks or blocks[-1]["type"] != kind:
            blocks.append(_empty_block(kind))
        blocks[-1][kind] += part.text
    kept = [b for b in blocks if b["type"] != "text" or b["text"].strip()]
    return kept or blocks[:1] or [_empty_block("text")]


def tool_use(call) -> dict:
    return {"type": "tool_use", "id": call.id("toolu_"), "name": call.name,
            "input": call.arguments}


class MessagesFormat:
    def __init__(self, model: str, gen: Generation, prompt_tokens: int, reply: Reply):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model, self.gen, self.prompt_tokens = model, gen, prompt_tokens
        self.reply = reply
        self.cached_tokens = 0  # of the prompt, from the kept cache (set as a stream starts)
        self._index = -1  # the stream's last block
        self._open: str | None = None  # the type of the block open in the stream
        self._blank = ""  # blank text not sent yet (no text block open)

    def _message(self, content: list, end: Finished | None) -> dict:
        reason = stop_reason(end, self.reply.made_call) if end else None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason,
                "stop_sequence": stop_sequence(end, reason) if end else None,
                "usage": self._usage(end)}

    def _usage(self, end: Finished | None) -> dict:
        """Anthropic's counts: ``input_tokens`` are the prompt tokens run, those reused from the
        previous request's KV cache are ``cache_read_input_tokens`` (known once it has run)."""
        stats = (end.stats or {}) if end else {}
        cached = stats.get("cached_tokens", 0) if end else self.cached_tokens
        return {"input_tokens": self.prompt_tokens - cached, "cache_read_input_tokens": cached,
                "output_tokens": stats.get("generation_tokens", 0)}

    def error_body(self, error: ApiError) -> dict:
        return error.anthropic_body()

    def response(self, pieces: list[Piece], end: Finished) -> dict:
        parts = split_reply(self.reply, [p.text for p in pieces])
        return self._message(content_blocks(parts), end)

    def stream_start(self) -> list[str]:
        return [sse({"type": "message_start", "message": self._message([], None)}, "message_start"),
                sse({"type": "ping"}, "ping")]

    def stream_piece(self, piece: Piece) -> list[str]:
        return self._events(self.reply.feed(piece.text))

    def stream_end(self, end: Finished) -> list[str]:
        events = self._events(self.reply.finish())
        if self._index < 0:  # no block at all: one text block, as the response has
            events += self._start(_empty_block("text"))
            if self._blank:
                events.append(self._delta("text", self._blank))
        events += self._stop()
        reason = stop_reason(end, self.reply.made_call)
        return events + [
            sse({"type": "message_delta",
                 "delta": {"stop_reason": reason, "stop_sequence": stop_sequence(end, reason)},
                 "usage": self._usage(end)}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop")]

    # --- a stream's blocks: opened when their first part comes, closed when another begins ---
    def _events(self, parts: list[Part]) -> list[str]:
        events = []
        for part in parts:
            if part.kind == "call":
                block = tool_use(part.call)
                events += self._stop() + self._start(dict(block, input={}))
                events.append(sse({"type": "content_block_delta", "index": self._index,
                                   "delta": {"type": "input_json_delta",
                                             "partial_json": json.dumps(block["input"])}},
                                  "content_block_delta"))
                events += self._stop()
                continue
            kind, text = _KINDS[part.kind], part.text
            if kind == "text" and self._open != "text":
                # held while blank: a blank text block beside others is left out (as in
                # ``content_blocks``), kept if the reply has no other block
                self._blank += text
                if not self._blank.strip():
                    continue
                text, self._blank = self._blank, ""
            if self._open != kind:
                events += self._stop() + self._start(_empty_block(kind))
            events.append(self._delta(kind, text))
        return events

    def _start(self, block: dict) -> list[str]:
        self._index += 1
        self._open = block["type"]
        if self._open != "text":
            self._blank = ""  # (blank text before another block: left out)
        return [sse({"type": "content_block_start", "index": self._index,
                     "content_block": block}, "content_block_start")]

    def _delta(self, kind: str, text: str) -> str:
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
            else {"type": "text_delta", "text": text}
        return sse({"type": "content_block_delta", "index": self._index, "delta": delta},
                   "content_block_delta")

    def _stop(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [sse({"type": "content_block_stop", "index": self._index}, "content_block_stop")]

    def stream_error(self, error: ApiError) -> list[str]:
        return [sse(error.anthropic_body(), "error")]


def _template_kwargs(body: dict) -> dict | None:
    """``chat_template_kwargs``, with Anthropic's ``thinking`` (enabled or disabled) as the chat
    template's ``enable_thinking`` (Qwen3's and its kind's switch; a template without one
    ignores it) unless the kwargs set that themselves. ``budget_tokens`` is not enforced."""
    kwargs = Fields(body).object("chat_template_kwargs")
    thinking = Fields(body).object("thinking")
    if thinking is None:
        return kwargs
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled"):
        raise bad_request(f"thinking.type must be 'enabled' or 'disabled', not {kind!r}",
                          "thinking")
    return {"enable_thinking": kind == "enabled", **(kwargs or {})}


async def _prompt(d: Dispatcher, body: dict, counting: bool = False
                  ) -> tuple[list[int], bool, list | None]:
    """The prompt's tokens, whether the reply continues its last (assistant) message, and the
    tools (as functions). ``counting``: only counted, so a text past the context is no error."""
    messages = anthropic_messages(body)
    tools = anthropic_tools(body)
    tokens = await d.tokenize(chat_tokens, messages, d.template, tools=tools, param="messages",
                              template_kwargs=_template_kwargs(body),
                              refuse_past_context=not counting)
    return tokens, messages[-1]["role"] == "assistant", tools


async def messages(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    gen = anthropic_generation(body, d.defaults, d.context_limit, d.vocab_size)
    prompt, gen.continues, tools = await _prompt(d, body)
    fmt = MessagesFormat(d.model_id, gen, len(prompt), Reply(d.worker.tokenizer, prompt, tools))
    return await d.run(request, prompt, gen, fmt, "messages")


async def count_tokens(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    return JSONResponse({"input_tokens": len((await _prompt(d, body, counting=True))[0])})
