"""Errors a request can end with, and the JSON bodies the OpenAI and Anthropic APIs give them.

Clients (the ``openai`` and ``anthropic`` packages, editors, agents) read the error's message from
the body shape their API defines, so the same error is written in either shape.
"""

from __future__ import annotations

from typing import Any

# Anthropic's error types by HTTP status (its API names them; OpenAI uses its own ``type``).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class ApiError(Exception):
    """A request that ends with an HTTP error status and a one-line message."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split()) or "unknown error"
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500
                                    else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
