"""The Anthropic Messages API (``/v1/messages``), which coding agents speak, streamed or not.

A reply is one text content block. A stream is the API's named events: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``),
``content_block_stop``, ``message_delta`` (stop reason, output tokens) and ``message_stop``; a
failure part way is an ``error`` event. ``/v1/messages/count_tokens`` counts a request's prompt.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .dispatch import Dispatcher, read_json, sse
from .errors import ApiError
from .params import Fields, Generation, anthropic_generation, check_body, check_model
from .prompts import anthropic_messages, anthropic_tools, chat_tokens
from .worker import Finished, Piece


def stop_reason(end: Finished) -> str:
    if end.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if end.stop_sequence is not None else "end_turn"


class MessagesFormat:
    def __init__(self, model: str, gen: Generation, prompt_tokens: int):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model, self.gen, self.prompt_tokens = model, gen, prompt_tokens

    def _message(self, content: list, end: Finished | None) -> dict:
        out_tokens = (end.stats or {}).get("generation_tokens", 0) if end else 0
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason(end) if end else None,
                "stop_sequence": end.stop_sequence if end else None,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": out_tokens}}

    def error_body(self, error: ApiError) -> dict:
        return error.anthropic_body()

    def response(self, pieces: list[Piece], end: Finished) -> dict:
        return self._message([{"type": "text", "text": "".join(p.text for p in pieces)}], end)

    def stream_start(self) -> list[str]:
        return [sse({"type": "message_start", "message": self._message([], None)}, "message_start"),
                sse({"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                sse({"type": "ping"}, "ping")]

    def stream_piece(self, piece: Piece) -> list[str]:
        if not piece.text:
            return []
        return [sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": piece.text}}, "content_block_delta")]

    def stream_end(self, end: Finished) -> list[str]:
        out_tokens = (end.stats or {}).get("generation_tokens", 0)
        return [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                sse({"type": "message_delta",
                     "delta": {"stop_reason": stop_reason(end), "stop_sequence": end.stop_sequence},
                     "usage": {"output_tokens": out_tokens}}, "message_delta"),
                sse({"type": "message_stop"}, "message_stop")]

    def stream_error(self, error: ApiError) -> list[str]:
        return [sse(error.anthropic_body(), "error")]


async def _prompt(d: Dispatcher, body: dict) -> tuple[list[int], bool]:
    """The prompt's tokens, and whether the reply continues its last (assistant) message."""
    messages = anthropic_messages(body)
    tokens = await d.tokenize(chat_tokens, messages, d.template, tools=anthropic_tools(body),
                              template_kwargs=Fields(body).object("chat_template_kwargs"))
    return tokens, messages[-1]["role"] == "assistant"


async def messages(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    gen = anthropic_generation(body, d.defaults, d.context_limit, d.vocab_size)
    prompt, gen.continues = await _prompt(d, body)
    return await d.run(request, prompt, gen, MessagesFormat(d.model_id, gen, len(prompt)),
                       "messages")


async def count_tokens(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    body = check_body(await read_json(request))
    check_model(body, d.model_names, d.model_id)
    return JSONResponse({"input_tokens": len((await _prompt(d, body))[0])})
