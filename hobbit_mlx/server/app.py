"""The HTTP application: routes, JSON errors, CORS, and the small GET endpoints
(``/health``, ``/v1/models``, ``/v1/stats``).

Every error is JSON in the shape of the API the path belongs to (Anthropic's for
``/v1/messages``, OpenAI's elsewhere), unknown paths and methods included, so that a client
always gets a message it can show.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import anthropic_api, openai_api
from .dispatch import Dispatcher
from .errors import ApiError

log = logging.getLogger("hobbit_mlx.server")

Endpoint = Callable[[Request], Awaitable[Response]]


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    body = error.anthropic_body() if _is_anthropic(request) else error.openai_body()
    return JSONResponse(body, status_code=error.status)


def guarded(endpoint: Endpoint) -> Endpoint:
    """Bad input becomes a 4xx JSON error, a bug a 500 JSON error; the server goes on."""

    async def wrapper(request: Request) -> Response:
        d: Dispatcher = request.app.state.dispatcher
        try:
            return await endpoint(request)
        except ApiError as e:
            d.refused(request, e)
            return _error_response(request, e)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
            d.refused(request, error)
            return _error_response(request, error)

    wrapper.__name__ = endpoint.__name__
    return wrapper


def _model_card(d: Dispatcher) -> dict:
    return {"id": d.model_id, "object": "model", "created": int(d.worker.tally.started),
            "owned_by": "hobbit_mlx"}


async def models(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    return JSONResponse({"object": "list", "data": [_model_card(d)]})


async def model(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    name = request.path_params["name"]
    if name not in d.model_names:
        raise ApiError(404, f"model {name!r} is not served here; this server serves "
                            f"{d.model_id!r}", param="model", code="model_not_found")
    return JSONResponse(_model_card(d))


async def health(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    ok = d.worker.alive
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


async def stats(request: Request) -> Response:
    """Offload statistics over every request since the server started (and the last one)."""
    d: Dispatcher = request.app.state.dispatcher
    snapshot = d.worker.tally.snapshot(queued=d.worker.queued, busy=d.worker.busy)
    return JSONResponse(dict(snapshot, **d.info))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return _error_response(request, ApiError(exc.status_code, message))


def create_app(dispatcher: Dispatcher, allowed_origins: list[str] | None = None) -> Starlette:
    """The ASGI application serving ``dispatcher``'s model."""
    post = ["POST"]
    routes = [
        Route("/v1/chat/completions", guarded(openai_api.chat_completions), methods=post),
        Route("/chat/completions", guarded(openai_api.chat_completions), methods=post),
        Route("/v1/completions", guarded(openai_api.completions), methods=post),
        Route("/v1/messages", guarded(anthropic_api.messages), methods=post),
        Route("/v1/messages/count_tokens", guarded(anthropic_api.count_tokens), methods=post),
        Route("/v1/models", guarded(models)),
        Route("/v1/models/{name:path}", guarded(model)),
        Route("/health", health),
        Route("/v1/stats", stats),
        Route("/stats", stats),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=allowed_origins or ["*"],
                             allow_methods=["*"], allow_headers=["*"])]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error})
    app.state.dispatcher = dispatcher
    return app
