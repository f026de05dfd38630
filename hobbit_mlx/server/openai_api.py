"""The OpenAI API: ``/v1/chat/completions`` and ``/v1/completions``, streamed or not.

The shapes follow the OpenAI API reference: ``chat.completion`` / ``chat.completion.chunk`` and
``text_completion`` objects, ``usage``, ``logprobs``; a stream is ``data:`` events ended by
``data: [DONE]``, with a final usage chunk when ``stream_options.include_usage`` is set.

A chat reply is split (``replies``): tool calls become ``message.tool_calls`` (a stream sends
each whole, in ``delta.tool_calls``, once its end marker arrives) and ``finish_reason`` is
``"tool_calls"`` when the reply made one and ended by itself; reasoning goes to ``reasoning``
(mlx-lm's field), not into ``content``. A text completion is the model's text as it is.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from .dispatch import Dispatcher, read_json, sse
from .errors import ApiError, bad_request
from .params import Fields, Generation, check_body, check_model, openai_generation
from .prompts import chat_tokens, completion_tokens, openai_messages, openai_tools
from .replies import Part, Reply, ToolCall, joined, split_reply
from .worker import Finished, Piece

FINGERPRINT = "hobbit_mlx"


def usage(end: Finished) -> dict:
    s = end.stats or {}
    prompt, completion = s.get("prompt_tokens", 0), s.get("generation_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # of the prompt, reused from the previous request's KV cache (not prefilled again)
            "prompt_tokens_details": {"cached_tokens": s.get("cached_tokens", 0)}}


def finish_reason(end: Finished, made_call: bool = False) -> str:
    """``length`` when cut; ``tool_calls`` when the reply made a call and ended by itself (end
    of sequence or a stop sequence, as mlx-lm's server counts it); else ``stop``."""
    if end.finish_reason == "length":
        return "length"
    return "tool_calls" if made_call else "stop"


def tool_call(call: ToolCall, index: int | None = None) -> dict:
    """A call in OpenAI's shape: its arguments a JSON string; ``index`` in a stream's delta."""
    out = {"id": call.id("call_"), "type": "function",
           "function": {"name": call.name,
                        "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else dict(out, index=index)


class _Base:
    object = ""
    prefix = ""

    def __init__(self, model: str, gen: Generation):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.gen = model, gen

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def error_body(self, error: ApiError) -> dict:
        return error.openai_body()

    def stream_error(self, error: ApiError) -> list[str]:
        return [sse(error.openai_body())]  # the openai client raises it as an APIError

    def _usage_chunk(self, end: Finished) -> list[str]:
        if not self.gen.include_usage:
            return []
        return [sse(dict(self.head(self.chunk_object), choices=[], usage=usage(end)))]


class ChatFormat(_Base):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(self, model: str, gen: Generation, reply: Reply):
        super().__init__(model, gen)
        self.reply = reply
        self._calls = 0  # calls streamed so far (the next one's index)

    def _logprobs(self, pieces: list[Piece]) -> dict | None:
        if not self.gen.logprobs:
            return None

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [dict(entry(p.token_text or "", p.logprob),
                                 top_logprobs=[entry(t, v) for t, v in p.top_logprobs or ()])
                            for p in pieces]}

    def response(self, pieces: list[Piece], end: Finished) -> dict:
        parts = split_reply(self.reply, [p.text for p in pieces])
        text, reasoning = joined(parts, "text"), joined(parts, "reasoning")
        calls = [tool_call(p.call) for p in parts if p.kind == "call"]
        message = {"role": "assistant", "content": text}
        if reasoning:  # (a reply that is all reasoning has no content: null, as mlx-lm says)
            message.update(reasoning=reasoning, content=text or None)
        if calls:  # (OpenAI's content is null beside calls when there is no other text)
            message.update(content=text if text.strip() else None, tool_calls=calls)
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(pieces),
                  "finish_reason": finish_reason(end, self.reply.made_call)}
        return dict(self.head("chat.completion"), choices=[choice], usage=usage(end))

    def _chunk(self, delta: dict, finish: str | None = None, pieces: list[Piece] = ()) -> str:
        """One chunk; its logprobs are those of ``pieces``, null where it carries none (the
        role chunk, the last), as OpenAI writes them."""
        choice = {"index": 0, "delta": delta,
                  "logprobs": self._logprobs(list(pieces)) if pieces else None,
                  "finish_reason": finish}
        return sse(dict(self.head(self.chunk_object), choices=[choice]))

    def _deltas(self, parts: list[Part], pieces: list[Piece] = ()) -> list[str]:
        """Chunks for the parts in order: text and reasoning together, each call in its own
        chunk; the piece's logprobs on the first (alone, with empty content, if none)."""
        chunks, delta = [], {}

        def send(d: dict) -> None:
            nonlocal pieces
            chunks.append(self._chunk(d, pieces=pieces))
            pieces = ()

        for part in parts:
            if part.kind == "call":
                if delta:
                    send(delta)
                    delta = {}
                send({"tool_calls": [tool_call(part.call, self._calls)]})
                self._calls += 1
            else:
                key = "content" if part.kind == "text" else "reasoning"
                delta[key] = delta.get(key, "") + part.text
        if delta or (pieces and self.gen.logprobs):
            send(delta or {"content": ""})
        return chunks

    def stream_start(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def stream_piece(self, piece: Piece) -> list[str]:
        return self._deltas(self.reply.feed(piece.text), [piece])

    def stream_end(self, end: Finished) -> list[str]:
        return [*self._deltas(self.reply.finish()),
                self._chunk({}, finish_reason(end, self.reply.made_call)),
                *self._usage_chunk(end), sse("[DONE]")]


class CompletionFormat(_Base):
    prefix = "cmpl"
    chunk_object = "text_completion"
    _streamed = 0  # characters of the tokens streamed so far (their ``text_offset``)

    def _logprobs(self, pieces: list[Piece], offset: int = 0) -> dict | None:
        if not self.gen.logprobs:
            return None
        offsets, at = [], offset
        for p in pieces:
            offsets.append(at)
            at += len(p.token_text or "")
        return {"tokens": [p.token_text for p in pieces],
                "token_logprobs": [p.logprob for p in pieces],
                "top_logprobs": [dict(p.top_logprobs or ()) for p in pieces]
                if self.gen.top_logprobs else None,
                "text_offset": offsets}

    def response(self, pieces: list[Piece], end: Finished) -> dict:
        choice = {"index": 0, "text": "".join(p.text for p in pieces),
                  "logprobs": self._logprobs(pieces), "finish_reason": finish_reason(end)}
        return dict(self.head("text_completion"), choices=[choice], usage=usage(end))

    def _chunk(self, text: str, finish: str | None = None, pieces: list[Piece] = (),
               offset: int = 0) -> str:
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(list(pieces), offset),
                  "finish_reason": finish}
        return sse(dict(self.head(self.chunk_object), choices=[choice]))

    def stream_start(self) -> list[str]:
        return []

    def stream_piece(self, piece: Piece) -> list[str]:
        if not piece.text and not self.gen.logprobs:
            return []
        chunk = self._chunk(piece.text, pieces=[piece], offset=self._streamed)
        self._streamed += len(piece.token_text or "")
        return [chunk]

    def stream_end(self, end: Finished) -> list[str]:
        return [self._chunk("", finish_reason(end)), *self._usage_chunk(end), sse("[DONE]")]


async def chat_completions(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    gen = openai_generation(body, d.defaults, d.context_limit, d.vocab_size, chat=True)
    messages = openai_messages(body)
    gen.continues = messages[-1]["role"] == "assistant"  # (a prefill: the reply continues it)
    tools = openai_tools(body)
    prompt = await d.tokenize(chat_tokens, messages, d.template, tools=tools, param="messages",
                              template_kwargs=Fields(body).object("chat_template_kwargs"))
    fmt = ChatFormat(d.model_id, gen, Reply(d.worker.tokenizer, prompt, tools))
    return await d.run(request, prompt, gen, fmt, "messages")


async def completions(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    gen = openai_generation(body, d.defaults, d.context_limit, d.vocab_size, chat=False)
    if Fields(body).boolean("echo", False):
        raise bad_request("echo is not supported", "echo")
    if Fields(body).string("suffix"):  # (fill-in-the-middle: the prompt alone would be wrong)
        raise bad_request("suffix is not supported: this server completes the prompt only",
                          "suffix")
    gen.continues = True
    prompt = await d.tokenize(completion_tokens, body, param="prompt")
    fmt = CompletionFormat(d.model_id, gen)
    return await d.run(request, prompt, gen, fmt, "prompt")
