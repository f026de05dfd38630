"""Reading a request body's generation fields: types and ranges checked, server defaults filled in.

Every field mlx-lm's server accepts is read here (OpenAI's ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``, ``logit_bias``, ``logprobs`` and mlx-lm's ``top_k``, ``min_p``,
``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``xtc_*``), so that a request
that would run on ``mlx_lm.server`` runs here. A wrong type or range is a 400 that names the field.
Unknown fields are ignored, as the OpenAI API's clients send many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, bad_request

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2 ** 64 - 1  # mx.random.seed takes an unsigned 64-bit integer


@dataclass
class Sampling:
    """Arguments of mlx-lm's ``make_sampler`` and ``make_logits_processors``, and the seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    presence_context_size: int = 20
    frequency_penalty: float | None = None
    frequency_context_size: int = 20
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


@dataclass
class Defaults(Sampling):
    """What a request gets for a field it leaves out (the server's flags)."""

    max_tokens: int = 512


@dataclass
class Generation:
    """One request's generation settings, whatever API it came through."""

    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    continues: bool = False  # the reply continues the prompt's text (a completion, a prefill)


class Fields:
    """Typed reads of a JSON object's fields; every failure is a 400 naming the field."""

    def __init__(self, body: dict[str, Any]):
        self.body = body

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def number(self, name: str, default: float | None, lo: float | None = None,
               hi: float | None = None) -> float | None:
        value = self.body.get(name)
        if value is None:
            return default
        value = _finite(value, name)
        self._range(name, value, lo, hi)
        return value

    def integer(self, name: str, default: int | None, lo: int | None = None,
                hi: int | None = None, hi_reason: str = "") -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{name} must be an integer, not {_kind(value)}", name)
        self._range(name, value, lo, hi, hi_reason)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"{name} must be true or false, not {_kind(value)}", name)
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_request(f"{name} must be a string, not {_kind(value)}", name)
        return value

    def object(self, name: str) -> dict | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad_request(f"{name} must be an object, not {_kind(value)}", name)
        return value

    def strings(self, name: str) -> list[str]:
        """A string or a list of strings (``stop``), as a list of non-empty strings."""
        value = self.body.get(name)
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad_request(f"{name} must be a string or a list of strings", name)
        if len(values) > MAX_STOP_SEQUENCES:
            raise bad_request(f"{name} has {len(values)} sequences; at most "
                              f"{MAX_STOP_SEQUENCES} are allowed", name)
        return [v for v in values if v]

    @staticmethod
    def _range(name, value, lo, hi, hi_reason: str = "") -> None:
        if lo is not None and value < lo:
            raise bad_request(f"{name} must be at least {lo}, not {value}", name)
        if hi is not None and value > hi:
            raise bad_request(f"{name} must be at most {hi}{hi_reason}, not {value}", name)


def _finite(value: Any, name: str) -> float:
    """A JSON number that is finite (Python's JSON reader also takes NaN and Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name} must be a number, not {_kind(value)}", name)
    if not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number, not {value}", name)
    return float(value)


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)


def max_tokens_field(f: Fields, names: tuple[str, ...], default: int | None,
                     context_limit: int) -> int:
    """The first of ``names`` the body has (OpenAI's ``max_completion_tokens`` replaces
    ``max_tokens``), at least 1; more than the context the memory budget holds is cut to it
    (as mlx-lm's server takes it: agents ask for tens of thousands)."""
    for name in names:
        if f.present(name):
            return min(f.integer(name, None, lo=1), context_limit)
    if default is None:
        raise bad_request(f"{names[0]} is required", names[0])
    return context_limit if default < 0 else min(default, context_limit)  # -1: no limit


def logit_bias_field(f: Fields, vocab_size: int) -> dict[int, float] | None:
    """``logit_bias``: token ids (JSON keys) inside the vocabulary, mapped to numbers in OpenAI's
    -100..100 (mlx-lm adds them to the logits unchecked: an id outside writes outside the
    array)."""
    bias = f.object("logit_bias")
    if bias is None:
        return None
    out = {}
    for k, v in bias.items():
        try:
            token = int(k)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, not {k!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias has token id {token}, outside the vocabulary "
                              f"(0..{vocab_size - 1})", "logit_bias")
        value = out[token] = _finite(v, f"logit_bias[{k!r}]")
        if not -100 <= value <= 100:  # (OpenAI's range; more overflows float16 logits)
            raise bad_request(f"logit_bias values must be between -100 and 100, not {value}",
                              "logit_bias")
    return out


def sampling_fields(f: Fields, d: Defaults, vocab_size: int, context_limit: int,
                    max_temperature: float) -> Sampling:
    """mlx-lm's sampling and logits-processor fields. A penalty's window longer than the context
    is the whole context (mlx-lm slices the tokens with it: past 2^31 it failed, a 500). The
    temperature stays within the API's range (OpenAI's 0-2, Anthropic's 0-1)."""
    top_k = f.integer("top_k", d.top_k, lo=0)

    def window(name: str, default: int) -> int:
        return min(f.integer(name, default, lo=0), context_limit)

    return Sampling(
        temperature=f.number("temperature", d.temperature, lo=0, hi=max_temperature),
        top_p=f.number("top_p", d.top_p, lo=0, hi=1),
        top_k=top_k if top_k < vocab_size else 0,  # (keeping every token is no top-k at all)
        min_p=f.number("min_p", d.min_p, lo=0, hi=1),
        min_tokens_to_keep=d.min_tokens_to_keep,
        xtc_probability=f.number("xtc_probability", d.xtc_probability, lo=0, hi=1),
        xtc_threshold=f.number("xtc_threshold", d.xtc_threshold, lo=0, hi=0.5),
        repetition_penalty=f.number("repetition_penalty", d.repetition_penalty, lo=0) or None,
        repetition_context_size=window("repetition_context_size", d.repetition_context_size),
        presence_penalty=f.number("presence_penalty", None, lo=-2, hi=2) or None,
        presence_context_size=window("presence_context_size", 20),
        frequency_penalty=f.number("frequency_penalty", None, lo=-2, hi=2) or None,
        frequency_context_size=window("frequency_context_size", 20),
        logit_bias=logit_bias_field(f, vocab_size),
        seed=f.integer("seed", d.seed, lo=0, hi=MAX_SEED),
    )


def openai_generation(body: dict, d: Defaults, context_limit: int, vocab_size: int, *,
                      chat: bool) -> Generation:
    """The generation settings of a ``/v1/chat/completions`` or ``/v1/completions`` body."""
    f = Fields(body)
    for legacy, now in (("functions", "tools"), ("function_call", "tool_choice")):
        if f.present(legacy):  # (ignored, a forced call silently did not happen)
            raise bad_request(f"{legacy} is OpenAI's deprecated form of {now}: send {now}",
                              legacy)
    modalities = f.strings("modalities")
    if modalities and modalities != ["text"]:
        raise bad_request(f"modalities {modalities} are not served: this server writes text",
                          "modalities")
    if f.integer("n", 1, lo=1) != 1:
        raise bad_request("n must be 1: this server generates one choice per request", "n")
    if not chat and f.integer("best_of", 1, lo=1) != 1:
        raise bad_request("best_of must be 1: this server generates one choice per request",
                          "best_of")
    fmt = f.object("response_format") or {}
    if fmt.get("type", "text") != "text":
        raise bad_request(f"response_format of type {fmt.get('type')!r} is not supported: this "
                          "server does not constrain the output (ask for JSON in the prompt)",
                          "response_format")
    stream = f.boolean("stream", False)
    options = f.object("stream_options") or {}
    if options and not stream:
        raise bad_request("stream_options are only for a streamed request (stream: true)",
                          "stream_options")
    include_usage = Fields(options).boolean("include_usage", False)
    if chat:
        logprobs = f.boolean("logprobs", False)
        top = f.integer("top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    else:  # the legacy completions API: logprobs is the number of top tokens
        top = f.integer("logprobs", None, lo=0, hi=5)
        logprobs = top is not None
        top = top or 0
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    return Generation(max_tokens=max_tokens_field(f, names, d.max_tokens, context_limit),
                      sampling=sampling_fields(f, d, vocab_size, context_limit, 2.0),
                      stop=f.strings("stop"),
                      stream=stream, include_usage=include_usage, logprobs=logprobs,
                      top_logprobs=top)


def anthropic_generation(body: dict, d: Defaults, context_limit: int,
                         vocab_size: int) -> Generation:
    """The generation settings of a ``/v1/messages`` body (``max_tokens`` is required there)."""
    f = Fields(body)
    return Generation(max_tokens=max_tokens_field(f, ("max_tokens",), None, context_limit),
                      sampling=sampling_fields(f, d, vocab_size, context_limit, 1.0),
                      stop=f.strings("stop_sequences"),
                      stream=f.boolean("stream", False))


def check_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def check_model(body: dict, names: set[str], served: str) -> None:
    """A request names the served model, or none; any other name is a 404."""
    model = Fields(body).string("model")
    if model is not None and model not in names:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {served!r}",
                       param="model", code="model_not_found")
