"""``python -m hobbit_mlx.server``: one real server process on the bundled reference model under a
small budget (experts stream: about half the expert requests miss), driven by the official
``openai`` and ``anthropic`` clients. Exact mode, so that greedy text is mlx-lm's whatever the
cache holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hobbit_mlx.loader import REFERENCE_MODEL
from hobbit_mlx.testing import LazyModule, child_env

REPO = Path(__file__).resolve().parents[1]
MODEL = "hobbit_mlx/reference_model"
BUDGET = "16MB"
CODE = "def parse(text):\n    "  # greedy text runs to max_tokens (no early end of sequence)

anthropic, openai = LazyModule("anthropic"), LazyModule("openai")  # (imported when used)

pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").is_file(),
                                reason="reference model not bundled")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path
        self.v1 = f"{url}/v1"

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, path: str, body=None, method: str | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stats(self) -> dict:
        status, body = self.request("/v1/stats")
        assert status == 200
        return body


def _wait_for_url(proc: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + 600  # a safety net for a hung start, not a speed check
    while time.monotonic() < deadline:
        m = re.search(r"serving .* at (http://\S+)", log_path.read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"the server did not start:\n{log_path.read_text()}")


def _wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the server never answered /health")


@contextlib.contextmanager
def _serving(root: Path, store: Path, *flags: str):
    """A server process on ``store`` (exact, 32 tokens at most, every read's checksum checked),
    stopped on exit; the servers after the first read back its measurements."""
    env = child_env()
    log_path = root / f"server{len(list(root.glob('server*.log')))}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hobbit_mlx.server", "--model", str(store),
             "--served-model-name", MODEL, "--port", "0", "--memory-budget", BUDGET,
             "--exact", "--verify", "always", "--max-tokens", "32", *flags],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        url = _wait_for_url(proc, log_path)
        _wait_healthy(url)
        yield Server(proc, url, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server on a copy of the bundled reference model, checking every expert read's
    checksum so that a corrupted store fails the request that reads it."""
    from convert import convert

    root = tmp_path_factory.mktemp("server")
    # a store of its own (not reading the bundled checkpoint in place), so that corrupting the
    # store's files for a fault test leaves the bundled model alone
    store = convert(REFERENCE_MODEL, root / "reference-copy", copy=True, progress=False)
    with _serving(root, store) as running:
        running.store = store
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def chat(client, content: str, stream: bool = False, **kw) -> str:
    kw = dict(dict(max_tokens=16, temperature=0), **kw)
    messages = [{"role": "user", "content": content}]
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, **kw) \
            .choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def complete(client, prompt: str, **kw) -> str:
    kw = dict(dict(max_tokens=16, temperature=0), **kw)
    return client.completions.create(model=MODEL, prompt=prompt, **kw).choices[0].text


# --- endpoints ------------------------------------------------------------------------------


def test_health_models_and_stats(server, client):
    assert server.request("/health") == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    complete(client, "def add(a, b):")
    s = server.stats()
    assert s["model"] == MODEL and s["requests_served"] >= 1 and s["busy"] is False
    assert s["budget_bytes"] == 16 * 10**6 and 0 < s["peak_memory_bytes"] <= s["budget_bytes"]
    assert s["bytes_read"] > 0 and 0 < s["served_rate"] < 1  # experts streamed, some resident
    assert s["generation_tokens"] >= 16 and s["generation_tps"] > 0
    assert s["context_limit_tokens"] > 0 and s["options"]["exact"] is True
    last = s["last_request"]
    assert last["outcome"] == "served" and last["generation_tokens"] == 16
    assert last["bytes_read"] > 0 and last["served_rate"] is not None


def test_completion_is_mlx_lm_greedy_text(client):
    """Served in exact mode with half the experts streamed, the text is mlx-lm's."""
    import mlx.core as mx
    import mlx_lm

    ref, tokenizer = mlx_lm.load(str(REFERENCE_MODEL))
    ref.set_dtype(mx.float32)
    expected = mlx_lm.generate(ref, tokenizer, CODE, max_tokens=24)
    response = client.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0)
    # (mlx-lm drops the first token's leading space, which a completion keeps: a test below)
    assert response.choices[0].text in (expected, " " + expected)
    assert response.usage.prompt_tokens == len(tokenizer.encode(CODE))
    assert response.usage.completion_tokens >= 1


def test_chat_and_streaming_equal_non_streaming(client):
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You write Python."},
                               {"role": "user", "content": "def fibonacci(n):"}],
        max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You write Python."},
                               {"role": "user", "content": "def fibonacci(n):"}],
        max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=CODE, max_tokens=20, temperature=0, stream=True))
    assert streamed == complete(client, CODE, max_tokens=20)


def test_sampling_fields(client):
    seeded = [complete(client, CODE, temperature=0.9, top_p=0.95, seed=7, max_tokens=12)
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed samples the same text
    greedy = complete(client, CODE, max_tokens=24)
    stop = greedy[len(greedy) // 2:][:3]  # a stop sequence the greedy text contains
    stopped = client.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == greedy[:greedy.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # more than the budget's context is cut to it, as mlx-lm's server takes it (agents ask 32k)
    big = client.completions.create(model=MODEL, prompt=CODE, max_tokens=10**9, temperature=0,
                                    stop=[stop])
    assert big.choices[0].text == stopped.choices[0].text
    # a top-k of the whole vocabulary or more keeps every token (mlx-lm's sampler refuses it)
    assert isinstance(complete(client, CODE, temperature=0.7, max_tokens=4,
                               extra_body=dict(top_k=10**6)), str)
    # mlx-lm's own fields, through extra_body as clients send them
    text = complete(client, CODE, temperature=0.7, extra_body=dict(
        top_k=20, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=0.5, xtc_probability=0.1, xtc_threshold=0.2, logit_bias={"5": -5}))
    assert isinstance(text, str)
    lp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                        max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob for c in content)  # greedy: the top one
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, stream=True))
    # (the role chunk and the last carry no tokens: null, as OpenAI writes them, not [])
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None
    streamed = [c for chunk in chunks for c in (chunk.choices[0].logprobs or
                                                 type("N", (), {"content": []})).content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_a_continued_text_keeps_its_first_tokens_leading_space(client):
    """mlx-lm's detokenizer drops the leading space of a text's first token: right for a new
    chat turn, wrong where the reply continues the prompt (a completion, an assistant prefill)."""
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3,
                                     temperature=0, logprobs=1)
    choice = done.choices[0]
    assert choice.text == "".join(choice.logprobs.tokens)
    assert choice.logprobs.text_offset == [0, *np.cumsum([len(t) for t in
                                                          choice.logprobs.tokens])[:-1]]
    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                              max_tokens=3, temperature=0, logprobs=1,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    offsets = [o for c in streamed if c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert offsets == choice.logprobs.text_offset
    assert choice.text.startswith(" ")  # (what makes this a test: the model's first token)


def test_unsupported_output_constraints_are_refused(server):
    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in [({"messages": hi, "response_format": {"type": "json_object"}},
                         "response_format"),
                        ({"messages": hi, "tools": [tool], "tool_choice": "required"},
                         "tool_choice")]:
        status, error = server.request("/v1/chat/completions", dict(body, max_tokens=2))
        assert status == 400 and error["error"]["param"] == param, error
    status, _ = server.request("/v1/chat/completions",
                               {"messages": hi, "max_tokens": 2, "tools": [tool],
                                "response_format": {"type": "text"}})
    assert status == 200
    status, error = server.request("/v1/messages", {
        "messages": hi, "max_tokens": 2, "tool_choice": {"type": "any"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    assert status == 400 and "tool_choice" in error["error"]["message"]


def test_anthropic_tools_reach_the_chat_template_as_functions():
    from hobbit_mlx.server.prompts import anthropic_tools

    body = {"tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}]}
    assert anthropic_tools(body) == [{"type": "function", "function": {
        "name": "weather", "description": "d", "parameters": {"type": "object"}}}]
    assert anthropic_tools(dict(body, tool_choice={"type": "none"})) is None


def test_a_prompt_that_extends_the_last_one_prefills_only_the_rest(server, client):
    """The last request's KV cache is kept: a prompt that begins with the last one's tokens (a
    conversation sent again with a turn more) prefills only the new ones. In exact mode the
    text is still mlx-lm's greedy text for the whole prompt."""
    import mlx.core as mx
    import mlx_lm

    ref, tokenizer = mlx_lm.load(str(REFERENCE_MODEL))
    ref.set_dtype(mx.float32)
    first = "class Queue:\n    def __init__(self):\n"
    reply = client.completions.create(model=MODEL, prompt=first, max_tokens=12, temperature=0)
    second = first + reply.choices[0].text + "\n\ndef main():\n"
    again = client.completions.create(model=MODEL, prompt=second, max_tokens=16, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert len(tokenizer.encode(first)) - 1 <= cached < again.usage.prompt_tokens
    expected = mlx_lm.generate(ref, tokenizer, second, max_tokens=16)
    assert again.choices[0].text in (expected, " " + expected)
    stats = server.stats()
    assert stats["last_request"]["cached_tokens"] == cached
    assert stats["cached_tokens"] >= cached  # (all requests')
    # a prompt that shares only its start: the cache is trimmed back to what the two share
    third = first + "        self.items = []\n"
    trimmed = client.completions.create(model=MODEL, prompt=third, max_tokens=16, temperature=0)
    assert trimmed.usage.prompt_tokens_details.cached_tokens < len(tokenizer.encode(third))
    expected = mlx_lm.generate(ref, tokenizer, third, max_tokens=16)
    assert trimmed.choices[0].text in (expected, " " + expected)


def test_conversations_taking_turns_resume_from_prompt_caches_kept_on_disk(server, tmp_path):
    """Two conversations with the same start take turns: the cache in memory holds one, and
    each switch writes it to ``--prompt-cache-dir`` and reads the other's back, so every turn
    after the first two prefills only its new tokens, with mlx-lm's text. The files are
    deleted when the server stops; the directory, the user's, stays."""
    import mlx.core as mx
    import mlx_lm

    ref, tokenizer = mlx_lm.load(str(REFERENCE_MODEL))
    ref.set_dtype(mx.float32)
    kept = tmp_path / "kept"
    kept.mkdir()
    start = "# Review the code below; name each bug, its line and the fix.\n" * 3
    texts = {"a": start + "def mean(xs):\n    return sum(xs) / len(xs)\n",
             "b": start + "class Stack:\n    def pop(self):\n        return self.items.pop(0)\n"}
    with _serving(tmp_path, server.store, "--prompt-cache-dir", str(kept),
                  "--prompt-cache-size", "2") as running:
        client = openai.OpenAI(base_url=running.v1, api_key="unused", max_retries=0, timeout=300)
        for turn in range(3):
            for name in "ab":
                before = len(tokenizer.encode(texts[name]))
                reply = client.completions.create(model=MODEL, prompt=texts[name],
                                                  max_tokens=8, temperature=0)
                expected = mlx_lm.generate(ref, tokenizer, texts[name], max_tokens=8)
                assert reply.choices[0].text in (expected, " " + expected)
                cached = reply.usage.prompt_tokens_details.cached_tokens
                if turn:  # its own history back, from disk
                    assert cached >= before - 12, (turn, name, cached, before)
                    assert running.stats()["last_request"]["cached_from_disk"] == cached
                texts[name] += reply.choices[0].text + f"\n# and line {turn + 2}?\n"
                assert len(list(kept.glob("*.safetensors"))) <= 2
        files = running.stats()["prompt_cache_files"]
        assert files["read"] == 4 and files["read_failures"] == files["write_failures"] == 0
        assert files["directory"] == str(kept) and "read from disk" in running.log()
    assert kept.is_dir() and not list(kept.iterdir())


def test_concurrent_greedy_requests_give_the_text_of_one_alone(client):
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range("]
    alone = [chat(client, p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda ps: chat(client, ps[0], stream=ps[1]),
                                 zip(prompts, (False, True, False, True))))
    assert together == alone


def test_anthropic_messages(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0,
                                 timeout=300)
    kw = dict(model=MODEL, max_tokens=16, system="You write Python.",
              messages=[{"role": "user", "content": "def fibonacci(n):"}],
              extra_body={"temperature": 0, "top_p": 1.0, "top_k": 0})  # not in newer clients
    message = claude.messages.create(**kw)
    assert message.role == "assistant" and message.type == "message"
    text = message.content[0].text
    assert text and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens >= 1
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta")
        final = stream.get_final_message()
    assert streamed == text and final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    # the same prompt again: all of it but its last token comes from the kept KV cache
    prompt_tokens = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert final.usage.cache_read_input_tokens == prompt_tokens - 1
    assert final.usage.input_tokens == 1
    start = next(e for e in events if e.type == "message_start")  # (clients read it there)
    assert start.message.usage.cache_read_input_tokens == prompt_tokens - 1
    stop = text[len(text) // 2:][:2]
    stopped = claude.messages.create(**dict(kw, stop_sequences=[stop]))
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[:text.index(stop)]
    count = claude.messages.count_tokens(model=MODEL, system="You write Python.",
                                         messages=kw["messages"])
    assert count.input_tokens == prompt_tokens
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(**dict(kw, model="claude-opus"))
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(**dict(kw, messages=[]))
    assert "messages" in e.value.message


# --- bad input, limits, disconnects, faults ---------------------------------------------------


def test_bad_requests_get_json_4xx_errors_and_the_server_goes_on(server, client):
    hi = [{"role": "user", "content": "hi"}]
    chat_cases = [
        (b"{not json", 400, None), (b"[1, 2]", 400, None), (b"", 400, None),
        ({"messages": hi, "max_tokens": "5"}, 400, "max_tokens"),
        ({"messages": hi, "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": hi, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": hi, "logit_bias": {"99999999": 100}}, 400, "logit_bias"),  # (crashed)
        ({"messages": hi, "logit_bias": {"-1": 1}}, 400, "logit_bias"),
        ({"messages": hi, "logit_bias": {"5": "-inf"}}, 400, "logit_bias"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": Infinity}}',
         400, "logit_bias"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
         400, "temperature"),
        ({"messages": hi, "seed": -1}, 400, "seed"), ({"messages": hi, "seed": 2**70}, 400, "seed"),
        ({"messages": hi, "temperature": "hot"}, 400, "temperature"),
        ({"messages": hi, "top_p": 2}, 400, "top_p"),
        ({"messages": hi, "stop": 5}, 400, "stop"),
        ({"messages": hi, "seed": 1.5}, 400, "seed"),
        ({"messages": hi, "stream": "yes"}, 400, "stream"),
        ({"messages": hi, "n": 2}, 400, "n"),
        ({"messages": hi, "model": "gpt-4o"}, 404, "model"),
        ({"messages": []}, 400, "messages"), ({}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages"),
        # (these were a 500 from the tokenizer, which clients retry; or silently ignored)
        (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
         b'"function": {"name": "f", "parameters": {"properties": {"\\ud800": {}}}}}]}',
         400, "tools"),
        ({"messages": hi, "functions": [{"name": "f", "parameters": {}}],
          "function_call": {"name": "f"}}, 400, "functions"),
        ({"messages": hi, "modalities": ["text", "audio"]}, 400, "modalities"),
        ({"messages": hi, "top_logprobs": 2}, 400, "top_logprobs"),
        ({"messages": hi, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"messages": hi, "temperature": 2.5}, 400, "temperature"),
    ]
    for body, status, param in chat_cases:
        got, error = server.request("/v1/chat/completions", body)
        assert got == status, (body, got, error)
        assert set(error) == {"error"} and error["error"]["message"], error
        given = error["error"]["param"]
        assert (given.split("[")[0] if given else None) == param, (body, error)
    for path, body, status in [("/v1/completions", {"prompt": 5}, 400),
                               ("/v1/completions", {"prompt": [10**9]}, 400),
                               ("/v1/completions", {"prompt": ["a", "b"]}, 400),
                               ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400),
                               ("/v1/no-such-endpoint", {}, 404)]:
        got, error = server.request(path, body)
        assert got == status and error["error"]["message"], (path, body, got, error)
    got, error = server.request("/v1/chat/completions", method="GET")
    assert got == 405 and error["error"]["message"]
    got, error = server.request("/v1/messages", {"messages": hi, "max_tokens": 4,
                                                 "temperature": 1.5})  # (Anthropic's range: 0-1)
    assert got == 400 and "temperature" in error["error"]["message"]
    got, error = server.request("/v1/messages", {"messages": hi})  # max_tokens is required
    assert got == 400 and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and "max_tokens" in \
        error["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=2)
    # a penalty's window past the context is the whole context (past 2^31 it was a 500)
    assert chat(client, "def hello():", max_tokens=4, extra_body={
        "repetition_penalty": 1.1, "repetition_context_size": 10**12})
    got, error = server.request("/v1/chat/completions", b"null")
    assert got == 400 and "not null" in error["error"]["message"]
    assert chat(client, "def hello():", max_tokens=4)  # still serving
    assert server.request("/health")[0] == 200


def test_a_prompt_longer_than_the_budget_allows_is_refused_up_front(server, client):
    before = server.stats()
    limit = before["context_limit_tokens"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x = 1\n" * limit, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert f"at most {limit} tokens" in e.value.message and "budget" in e.value.message
    after = server.stats()
    assert after["requests_refused"] == before["requests_refused"] + 1
    assert after["requests_served"] == before["requests_served"]  # nothing was generated
    assert after["prompt_tokens"] == before["prompt_tokens"]


def test_client_disconnect_stops_generation_and_the_queue_moves_on(server, client):
    before = server.stats()["requests_cancelled"]
    stream = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=1000,
                                       temperature=0, stream=True)
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()
    assert complete(client, "def add(a, b):", max_tokens=4)  # queued behind it, then served
    assert server.stats()["requests_cancelled"] == before + 1
    line = [l for l in server.log().splitlines() if re.search(r" 499 cmpl-\w+ cancelled: ", l)][-1]
    generated = int(re.search(r"\+ (\d+) generated tokens", line).group(1))
    assert 3 <= generated < 1000, line


@contextlib.contextmanager
def corrupted_store(server):
    """Every expert record's bytes flipped in place (same size: a read never sees a short
    file), then restored. The server checks every read's checksum (``--verify always``)."""
    from hobbit_mlx.store import STORE_DIR, manifest_path

    model_dir = Path(server.stats()["model_dir"])
    files = [f for f in (model_dir / STORE_DIR).rglob("*")
             if f.is_file() and f != manifest_path(model_dir)]
    saved = {f: f.read_bytes() for f in files}
    try:
        for f, data in saved.items():  # keep the headers, flip the expert bytes
            bad = bytearray(data)
            for i in range(len(bad) // 2, len(bad), 61):
                bad[i] ^= 0xFF
            with open(f, "r+b") as out:
                out.write(bytes(bad))
        yield
    finally:
        for f, data in saved.items():
            with open(f, "r+b") as out:
                out.write(data)


def test_expert_store_failure_is_a_5xx_for_that_request_only(server, client):
    prompt = "def fibonacci(n):\n    "
    expected = complete(client, prompt, max_tokens=12)
    failed = server.stats()["requests_failed"]
    with corrupted_store(server):
        for stream in (False, True):  # fails in the prefill: an error status, no stream
            with pytest.raises(openai.InternalServerError) as e:
                response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                                     temperature=0, stream=stream)
                list(response) if stream else None
            assert "checksum mismatch" in e.value.message
            assert e.value.body["code"] == "expert_store_error"
    assert server.stats()["requests_failed"] == failed + 2
    assert complete(client, prompt, max_tokens=12) == expected  # served, and still exact
    assert server.request("/health")[0] == 200


def test_expert_store_failure_mid_stream_ends_the_stream_with_an_error_event(server, client):
    failed = server.stats()["requests_failed"]
    chunks = iter(client.completions.create(model=MODEL, prompt="import os\n", max_tokens=1000,
                                            temperature=0, stream=True))
    next(chunks), next(chunks)  # streaming: the status was 200
    with corrupted_store(server), pytest.raises(openai.APIError) as e:
        for _ in chunks:
            pass
    assert "checksum mismatch" in e.value.message
    assert e.value.body["code"] == "expert_store_error"
    assert server.stats()["requests_failed"] == failed + 1
    assert complete(client, "def add(a, b):", max_tokens=4)


def test_shutdown_answers_waiting_and_running_requests_with_a_json_503(server, tmp_path):
    """SIGTERM (or Ctrl-C) while a reply streams and another request waits: the waiting one gets a JSON 503
    at once, the streaming one an error event after the grace period (not uvicorn's plain-text
    500, or a stream cut without an event), and the server exits 0 (not 143: uvicorn raises the
    signal again once it has stopped)."""
    import signal

    with _serving(tmp_path, server.store) as running:
        own = openai.OpenAI(base_url=running.v1, api_key="unused", max_retries=0, timeout=120)
        chunks = iter(own.completions.create(model=MODEL, prompt="import os\n", max_tokens=1000,
                                             temperature=0, stream=True))
        next(chunks)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(running.request, "/v1/completions",
                                  {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 4})
            deadline = time.monotonic() + 60
            while running.stats()["requests_queued"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            running.proc.send_signal(signal.SIGTERM)  # (what a service manager sends)
            status, body = waiting.result(timeout=60)
        assert status == 503 and "shutting down" in body["error"]["message"], body
        with pytest.raises(openai.APIError) as e:
            for _ in chunks:
                pass
        assert "shutting down" in e.value.message and "after" in e.value.message
        assert running.proc.wait(timeout=60) == 0
    assert "Traceback" not in running.log()


def test_one_log_line_per_request(server, client):
    chat(client, "def log_me():", max_tokens=5)
    lines = [l for l in server.log().splitlines() if "POST /v1/chat/completions 200 chatcmpl-" in l]
    assert lines
    last = lines[-1]
    assert "+ 5 generated tokens" in last and "tok/s" in last
    for needle in ("served ", "read ", "peak ", " of 15.26 MiB"):
        assert needle in last, last


def test_openai_client_example(server):
    p = subprocess.run([sys.executable, str(REPO / "examples" / "server_openai_client.py"),
                        "--base-url", server.v1, "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    for needle in (f"model: {MODEL}", "chat: ", "streamed: ", "completion: ", "server: "):
        assert needle in p.stdout, p.stdout


# --- in-process: the generation thread, flags, stop sequences ---------------------------------


def test_generation_runs_off_the_main_thread(tiny_factory):
    """The worker loads and generates on its own thread (MLX streams are thread-local); the
    text equals what the main thread generates with the same model."""
    import hobbit_mlx
    from hobbit_mlx.server.params import Generation, Sampling
    from hobbit_mlx.server.worker import Failed, Finished, Job, Worker

    _, model_dir = tiny_factory("qwen3_moe")
    threads = []

    def load():
        threads.append(threading.current_thread())
        return hobbit_mlx.load(model_dir, expert_residency=0.5, exact=True, progress=False)

    worker = Worker(load, "tiny")
    worker.start()
    try:
        events: queue.Queue = queue.Queue()
        prompt = worker.tokenizer.encode("hello world")
        worker.submit(Job(prompt, Generation(max_tokens=8, sampling=Sampling()), 8, events.put))
        pieces = []
        while not isinstance(event := events.get(timeout=300), (Finished, Failed)):
            pieces.append(event.text)
        assert isinstance(event, Finished) and event.stats["generation_tokens"] >= 1
        assert threads == [worker.thread] and worker.thread is not threading.main_thread()
        expected = hobbit_mlx.generate(worker.model, worker.tokenizer, prompt, max_tokens=8)
        assert "".join(pieces) == expected
    finally:
        worker.stop()


def test_no_prompt_cache_prefills_every_prompt_whole(tiny_factory):
    """``--no-prompt-cache``: the same prompt twice is prefilled whole both times (with the
    cache, the second time runs only its last token), with the same text."""
    import hobbit_mlx
    from hobbit_mlx.server.cli import setup_arg_parser
    from hobbit_mlx.server.params import Generation, Sampling
    from hobbit_mlx.server.worker import Failed, Finished, Job, Worker

    assert setup_arg_parser().parse_args(["--no-prompt-cache"]).no_prompt_cache
    _, model_dir = tiny_factory("qwen3_moe")
    for reuse in (False, True):
        worker = Worker(lambda: hobbit_mlx.load(model_dir, expert_residency=0.5, exact=True,
                                                progress=False), "tiny", reuse_prompt=reuse)
        worker.start()
        try:
            prompt = worker.tokenizer.encode("hello world, once more")
            runs = []
            for _ in range(2):
                events: queue.Queue = queue.Queue()
                worker.submit(Job(prompt, Generation(max_tokens=6, sampling=Sampling()), 6,
                                  events.put))
                texts = []
                while not isinstance(event := events.get(timeout=300), (Finished, Failed)):
                    texts.append(event.text)
                assert isinstance(event, Finished), event
                runs.append(("".join(texts), event.stats["cached_tokens"]))
        finally:
            worker.stop()
        assert runs[0][0] == runs[1][0] and runs[0][1] == 0
        assert runs[1][1] == (len(prompt) - 1 if reuse else 0)


def test_bad_flags_and_a_taken_port(capsys, tiny_factory, tmp_path):
    import socket

    from hobbit_mlx import cli_common
    from hobbit_mlx.server.cli import main

    _, model_dir = tiny_factory("qwen3_moe")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [(["--port", "70000"], "--port"),
                 (["--memory-budget", "lots"], "--memory-budget"),
                 (["--chat-template-args", "[1"], "--chat-template-config"),
                 (["--port", str(taken.getsockname()[1])], "cannot listen"),
                 (["--port", "0", "--memory-budget", "1KB"], "needs at least"),
                 (["--prompt-cache-size", "-1"], "--prompt-cache-size must be 0 or more"),
                 (["--prompt-cache-bytes", "lots"], "--prompt-cache-bytes lots"),
                 (["--prompt-cache-dir", str(tmp_path / "none")], "no such directory"),
                 (["--prompt-cache-dir", __file__], "not a directory"),
                 (["--max-kv-size", "64"], "--max-kv-size does not run in the server"),
                 (["--prompt-cache-bytes", "0"], "--prompt-cache-bytes must be more than 0"),
                 (["--prompt-cache-dir", ""], "--prompt-cache-dir is empty"),
                 (["--decode-concurrency", "32"], "--decode-concurrency 32: requests are "
                                                  "served one at a time"),
                 (["--prompt-concurrency", "8"], "--prompt-concurrency 8: requests are")]
        for argv, needle in cases:
            assert cli_common.run(main, ["--model", str(model_dir), *argv]) == 2, argv
            err = capsys.readouterr().err
            errors = [l for l in err.splitlines() if l.startswith("error: ")]
            assert len(errors) == 1 and needle in errors[0], err
    # mlx_lm.server's flags at 1 (what is done here) are accepted
    from hobbit_mlx.server.cli import check_server_args, setup_arg_parser
    args = setup_arg_parser().parse_args(["--model", str(model_dir), "--decode-concurrency", "1",
                                          "--prompt-concurrency", "1"])
    check_server_args(args)


def test_a_failed_load_exits_with_status_2(tiny_factory):
    """The model loads on the generation thread; when that fails the process ends with one
    error line and status 2 (it aborted with status 134 as it freed what the thread made)."""
    _, model_dir = tiny_factory("qwen3_moe")  # head dimension 16: its KV cannot be quantized
    p = subprocess.run([sys.executable, "-m", "hobbit_mlx.server", "--model", str(model_dir),
                        "--port", "0", "--kv-bits", "4"], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2, p.stderr
    assert [l for l in p.stderr.splitlines() if l.startswith("error: ")] == \
        [l for l in p.stderr.splitlines() if l.strip()], p.stderr
    assert "head dimension 16" in p.stderr


def test_a_failed_compiled_sampler_leaves_no_broken_random_state():
    """mlx-lm's compiled top-k carries MLX's random state; raising while it is traced leaves a
    placeholder there that fails every later unseeded sample, unless the worker reseeds."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from hobbit_mlx.server.worker import _fresh_random_state

    logits = mx.zeros((1, 8))
    with pytest.raises(ValueError):
        make_sampler(0.7, top_k=8)(logits)
    try:
        mx.eval(make_sampler(0.7)(logits))
        broke = False
    except RuntimeError:
        broke = True
    _fresh_random_state()
    mx.eval(make_sampler(0.7)(logits))  # samples again
    if not broke:
        pytest.skip("this mlx-lm leaves the random state intact after the failure")


def test_stop_matcher_holds_back_what_may_start_a_stop_sequence():
    from hobbit_mlx.server.stops import StopMatcher

    m = StopMatcher(["###", "\n\n"])
    assert m.feed("abc#") == ("abc", False)
    assert m.feed("#") == ("", False)
    assert m.feed("x") == ("##x", False)
    assert m.feed("y\n") == ("y", False)
    assert m.feed("\nz") == ("", True) and m.matched == "\n\n"
    m = StopMatcher(["END"])
    assert m.feed("the E") == ("the ", False)
    assert m.flush() == "E"
    assert StopMatcher([]).feed("E") == ("E", False)


def test_speculative_server_gives_the_plain_servers_text(server, client, tmp_path):
    """``--speculative`` on the server (drafts from the resident experts, one verify pass per
    draft): greedy replies equal the plain exact server's."""
    want = chat(client, CODE, max_tokens=20)
    with _serving(tmp_path, server.store, "--speculative", "2", "--speculative-fixed") as spec:
        other = openai.OpenAI(base_url=spec.v1, api_key="unused", max_retries=0, timeout=300)
        assert chat(other, CODE, max_tokens=20) == want and want
        assert chat(other, CODE, max_tokens=20, stream=True) == want


def test_the_models_own_context_caps_the_served_context(tmp_path):
    """A model made for 48 tokens is served 48 tokens of context even where the budget holds
    thousands, and a longer prompt is refused naming the model's context, not the budget."""
    import hobbit_mlx
    from convert import convert
    from hobbit_mlx.architectures import trained_context
    from hobbit_mlx.server.dispatch import Dispatcher
    from hobbit_mlx.server.errors import ApiError
    from hobbit_mlx.server.params import Defaults, Generation, Sampling
    from hobbit_mlx.server.prompts import Template
    from hobbit_mlx.server.worker import Worker
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    assert trained_context({"max_position_embeddings": 40960}) == 40960
    assert trained_context({"max_position_embeddings": 40960, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}) == 131072
    assert trained_context({"max_position_embeddings": 8192, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0}}) == 8192
    assert trained_context({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert trained_context({"hidden_size": 8}) is None

    src = make_tiny_model("qwen3_moe", tmp_path / "mlx",
                          config_overrides={"max_position_embeddings": 48})
    model_dir = convert(src, tmp_path / "hobbit", progress=False)
    worker = Worker(lambda: hobbit_mlx.load(model_dir, expert_residency=0.5, exact=True,
                                            progress=False), "tiny")
    worker.start()
    try:
        assert worker.context_limit == 48 and worker.context_set_by == "model"
        d = Dispatcher(worker, Template(), Defaults(), set())
        gen = Generation(max_tokens=100, sampling=Sampling())
        assert d.room(list(range(40)), gen, "prompt") == 8
        with pytest.raises(ApiError) as e:
            d.room(list(range(48)), gen, "prompt")
        assert "the model's context holds at most 48 tokens" in str(e.value)
        # a text that cannot fit whatever its tokens is refused untokenized (megabytes took
        # half a minute to tokenize, and every other request waited)
        from hobbit_mlx.server.prompts import completion_tokens

        def not_tokenized(*_a, **_k):
            raise AssertionError("tokenized")

        big = {"prompt": "x = 1\n" * 100_000}
        with pytest.raises(ApiError, match=r"at least \d+ tokens \(600000 characters\)"):
            asyncio.run(d.tokenize(not_tokenized, big, param="prompt"))
        fits = asyncio.run(d.tokenize(completion_tokens, {"prompt": "x = 1\n"}, param="prompt"))
        assert 0 < len(fits) < 48
    finally:
        worker.stop()


def test_a_stream_opens_before_its_first_token(monkeypatch):
    """A streamed request waiting in the queue or prefilling a long prompt sent nothing, not
    even its headers (20 s for a 1,400-token history; the openai SDK's create(stream=True)
    blocked): it now opens after a moment with SSE comments, then streams as before; a failure
    that comes later is an error event."""
    import asyncio

    from hobbit_mlx.server import dispatch
    from hobbit_mlx.server.errors import ApiError
    from hobbit_mlx.server.openai_api import CompletionFormat
    from hobbit_mlx.server.params import Generation, Sampling
    from hobbit_mlx.server.worker import Failed, Finished, Piece

    monkeypatch.setattr(dispatch, "STREAM_OPENS_AFTER_S", 0.01)
    monkeypatch.setattr(dispatch, "KEEPALIVE_S", 0.01)

    class Worker:  # the generation thread, held back until the test says
        context_limit, model_id = 1000, "m"
        jobs: list = []

        def submit(self, job):
            self.jobs.append(job)

    class Request:  # a client that stays
        method, url = "POST", type("U", (), {"path": "/v1/completions"})()

        async def receive(self):
            await asyncio.sleep(3600)

    async def scenario(events):
        d = dispatch.Dispatcher.__new__(dispatch.Dispatcher)
        d.worker = Worker()
        gen = Generation(max_tokens=4, sampling=Sampling(), stream=True)
        response = await d.run(Request(), [1, 2, 3], gen, CompletionFormat("m", gen), "prompt")
        assert response.media_type == "text/event-stream"  # (answered: no token yet)
        body = response.body_iterator
        chunks = [await body.__anext__(), await body.__anext__()]
        assert chunks == [": keepalive\n\n"] * 2
        job = d.worker.jobs[-1]
        for event in events:
            job.emit(event)
        async for chunk in body:
            chunks.append(chunk)
        return "".join(chunks)

    text = asyncio.run(scenario([Piece("hi", 5), Finished("length", None, None)]))
    assert '"text": "hi"' in text and text.rstrip().endswith("data: [DONE]")
    text = asyncio.run(scenario([Failed(ApiError(500, "the expert store failed"))]))
    assert "the expert store failed" in text
