"""An OpenAI- and Anthropic-compatible HTTP server: ``python -m hobbit_mlx.server``.

Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/v1/messages``
(Anthropic), ``/health`` and ``/v1/stats`` (offload statistics). One generation thread owns the
model and serves requests in order (``worker``); Starlette and uvicorn do the HTTP (``app``).
"""

from .cli import main

__all__ = ["main"]
