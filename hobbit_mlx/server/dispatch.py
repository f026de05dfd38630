"""Between the HTTP handlers (asyncio) and the generation thread: a request's prompt is
tokenized, checked against the context the budget holds, queued, and its events become either
one JSON response or a stream of server-sent events.

A client that disconnects cancels its job, whether it is still queued or generating (the
generation thread checks between tokens and between prefill chunks), so the queue moves on.
A request refused here is logged here; the generation thread logs every other one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any, AsyncIterator, Callable, Protocol

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..budget import format_size
from .errors import ApiError, bad_request
from .params import Defaults, Generation
from .prompts import Template
from .worker import Failed, Finished, Job, Piece, Worker

log = logging.getLogger("hobbit_mlx.server")
# A stream whose first token has not come by then opens with SSE comments (a failure before it
# is then an error event, not an HTTP status), and sends one every KEEPALIVE_S until it comes.
STREAM_OPENS_AFTER_S = 2.0
KEEPALIVE_S = 5.0


class Format(Protocol):
    """How one API writes a generation: a JSON response, or server-sent events."""

    id: str

    def error_body(self, error: ApiError) -> dict: ...
    def response(self, pieces: list[Piece], end: Finished) -> dict: ...
    def stream_start(self) -> list[str]: ...
    def stream_piece(self, piece: Piece) -> list[str]: ...
    def stream_end(self, end: Finished) -> list[str]: ...
    def stream_error(self, error: ApiError) -> list[str]: ...


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event (``event:`` line only where the API names its events)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    _check_text(body)
    return body


def _check_text(value: Any, field: str | None = None) -> None:
    """JSON may escape half a UTF-16 surrogate pair ("\\ud800"), which is no text: the
    tokenizer failed on it with a 500 (which clients retry). ``field``: the top-level field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{field or 'the request'} holds a lone UTF-16 surrogate "
                              f"({value[e.start]!a}), which is not text", field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field or key)  # (a key reaches the template too: a tool schema's)
            _check_text(item, field or key)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, field)


@contextlib.asynccontextmanager
async def watching(request: Request, job: Job):
    """Cancel ``job`` if the client disconnects while the block runs."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def _text_chars(value: Any) -> int:
    """Characters in the strings of a request's messages, tools or prompt (at least what the
    rendered prompt holds, less the template's own text)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(v) for v in value)
    return 0


class Dispatcher:
    """Shared by every endpoint: the worker, the tokenizer, the defaults of the flags."""

    def __init__(self, worker: Worker, template: Template, defaults: Defaults,
                 model_names: set[str], info: dict | None = None):
        self.worker, self.template, self.defaults = worker, template, defaults
        self.model_id = worker.model_id
        self.model_names = model_names | {worker.model_id}
        self.info = info or {}
        self._tokenizer_lock = threading.Lock()

    @property
    def context_limit(self) -> int:
        return self.worker.context_limit

    @property
    def vocab_size(self) -> int:
        return self.worker.vocab_size

    async def tokenize(self, fn: Callable[..., list[int]], *args, param: str,
                       refuse_past_context: bool = True, **kwargs) -> list[int]:
        """``fn(tokenizer, *args)`` off the event loop (long prompts take a while). A text too
        long to fit whatever its tokens is refused before it is tokenized: tokenizing megabytes
        took half a minute and a gigabyte or two, with every other request waiting on the lock.
        (A prompt only counted is not refused.)"""
        chars, longest = _text_chars((args, kwargs)), self.worker.max_token_chars
        at_least = chars // (2 * longest) if longest else 0  # (2: what a normalizer may drop)
        if refuse_past_context and at_least >= self.context_limit:
            raise self._too_long(f"at least {at_least} tokens ({chars} characters)", param)

        def run() -> list[int]:
            with self._tokenizer_lock:
                return fn(self.worker.tokenizer, *args, **kwargs)

        return await anyio.to_thread.run_sync(run)

    def room(self, prompt: list[int], gen: Generation, param: str) -> int:
        """Tokens the reply may take; a prompt that leaves none is refused before it is queued."""
        limit = self.context_limit
        if len(prompt) >= limit:
            raise self._too_long(f"{len(prompt)} tokens", param)
        return min(gen.max_tokens, limit - len(prompt))

    def _too_long(self, size: str, param: str) -> ApiError:
        budget = format_size(self.worker.tally.budget_bytes)
        holder = {"model": "the model's context", "budget": f"the memory budget of {budget}"
                  }.get(self.worker.context_set_by, f"the memory {self.worker.context_set_by}")
        return ApiError(400, f"the prompt has {size}, but {holder} holds at most "
                             f"{self.context_limit} tokens (prompt and reply together)",
                        param=param, code="context_length_exceeded")

    async def run(self, request: Request, prompt: list[int], gen: Generation, fmt: Format,
                  param: str) -> Response:
        """Queue the generation and answer with its JSON response or its event stream."""
        max_tokens = self.room(prompt, gen, param)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # called on the generation thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt, gen, max_tokens, emit, label=f"{request.method} {request.url.path}",
                  name=fmt.id)
        self.worker.submit(job)
        try:
            async with watching(request, job):
                if gen.stream:  # (a stream starts once its request has waited a moment)
                    try:
                        first = await asyncio.wait_for(events.get(), STREAM_OPENS_AFTER_S)
                    except asyncio.TimeoutError:
                        first = None
                else:
                    first = await events.get()
        except BaseException:
            job.cancel()
            raise
        if isinstance(first, Failed):
            return JSONResponse(fmt.error_body(first.error), status_code=first.error.status)
        if gen.stream:
            return StreamingResponse(self._stream(first, events, job, fmt),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces, event = [], first
        try:
            async with watching(request, job):
                while isinstance(event, Piece):
                    pieces.append(event)
                    event = await events.get()
        finally:
            job.cancel()  # a no-op once it has finished
        if isinstance(event, Failed):
            return JSONResponse(fmt.error_body(event.error), status_code=event.error.status)
        return JSONResponse(fmt.response(pieces, event))

    async def _stream(self, event, events: asyncio.Queue, job: Job,
                      fmt: Format) -> AsyncIterator[str]:
        """The events of a stream. One whose first event has not come (queued behind another
        request, or prefilling a long prompt) opens at once with SSE comments, one every
        ``KEEPALIVE_S``: a client saw nothing at all, not even the headers, for as long as the
        prompt took (20 s for 1,400 tokens), and an SDK's ``create(stream=True)`` blocked."""
        try:
            while event is None:
                try:
                    event = await asyncio.wait_for(events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
            fmt.cached_tokens = job.cached_tokens  # (known once the job has started)
            for chunk in fmt.stream_start():
                yield chunk
            while isinstance(event, Piece):
                for chunk in fmt.stream_piece(event):
                    yield chunk
                event = await events.get()
            if isinstance(event, Failed):
                for chunk in fmt.stream_error(event.error):
                    yield chunk
            elif event.finish_reason != "cancelled":
                for chunk in fmt.stream_end(event):
                    yield chunk
        finally:  # also when the client went away (the response task is cancelled)
            job.cancel()

    def refused(self, request: Request, error: ApiError) -> None:
        """A request answered with an error before it was queued: counted and logged."""
        if self.worker.tally is not None:
            self.worker.tally.refused()
        log.info("%s %s %d %s: %s", request.method, request.url.path, error.status, error.type,
                 error.message)
