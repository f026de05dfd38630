"""Tool calls and reasoning in the server's replies, and tool use in the history a client sends.

The server runs in this process (the worker thread, the Starlette app, the official ``openai``
and ``anthropic`` clients over Starlette's test transport) on a tiny model, with the reference
model's tokenizer given a Qwen3-style chat template (``<tool_call>``, ``tool_call.name``: mlx-lm
infers its ``json_tools`` parser) and ``<think>``/``</think>`` as tokens (mlx-lm then splits
reasoning). A model's own text is not what these tests need, so the generation is scripted:
``hobbit_mlx.stream_generate`` is replaced by one that yields the script's tokens, decoded by
the tokenizer's streaming detokenizer as mlx-lm's ``stream_generate`` does (so markers arrive
split across tokens), ending with end of sequence or, at ``max_tokens``, with "length".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hobbit_mlx.loader import REFERENCE_MODEL
from hobbit_mlx.testing import LazyModule

pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "tokenizer.json").is_file(),
                                reason="reference model not bundled")

anthropic, openai = LazyModule("anthropic"), LazyModule("openai")  # (imported when used)

TEMPLATE = """\
{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" %}<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
{%- if tool_call.arguments is not mapping %}{{ raise_exception("not an object") }}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response name="{{ message.name }}" id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if open_think is defined and open_think %}<think>
{% elif enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLAUDE_WEATHER = {"name": "get_weather", "description": "The weather in a city",
                  "input_schema": WEATHER["function"]["parameters"]}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice, \\"FR\\""}}\n'
         '</tool_call>')
THINK = "<think>\nThe user wants the weather.\n</think>\n\n"


def _tool_tokenizer_dir(root: Path) -> Path:
    """The reference tokenizer with the template above and ``<think>``/``</think>`` added as
    tokens (mlx-lm's ``has_thinking`` wants them in the vocabulary)."""
    out = root / "tokenizer"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_MODEL / name, out / name)
    spec = json.loads((out / "tokenizer.json").read_text())
    n = len(spec["model"]["vocab"])
    for i, token in enumerate(("<think>", "</think>")):
        spec["added_tokens"].append({"id": n + i, "content": token, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": False})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


class Script:
    """What the scripted generation writes next, and the prompts it was given."""

    def __init__(self):
        self.text = ""
        self.prompts: list[list[int]] = []

    def stream_generate(self, model, tokenizer, prompt, max_tokens=256, **_):
        """mlx-lm's ``stream_generate``'s text and finish reasons, over the script's tokens."""
        import mlx.core as mx
        from mlx_lm.generate import GenerationResponse

        self.prompts.append(list(prompt))
        eos = next(iter(tokenizer.eos_token_ids))
        tokens = list(tokenizer.encode(self.text, add_special_tokens=False)) + [eos]
        detok = tokenizer.detokenizer
        detok.reset()
        logprobs = mx.full((len(tokenizer),), -8.0)

        def response(token, n, finish):
            return GenerationResponse(detok.last_segment, token, logprobs, False, len(prompt),
                                      100.0, n, 100.0, 0.0, finish)

        for n, token in enumerate(tokens, 1):
            if token == eos:
                break
            detok.add_token(token)
            if n == max_tokens:
                break
            yield response(token, n, None)
        detok.finalize()
        yield response(token, n, "stop" if token == eos else "length")


@pytest.fixture(scope="module")
def served(tiny_factory, tmp_path_factory):
    """The app on a tiny model with the tool-calling tokenizer, its generation scripted."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from starlette.testclient import TestClient

    import hobbit_mlx
    from hobbit_mlx.server.app import create_app
    from hobbit_mlx.server.dispatch import Dispatcher
    from hobbit_mlx.server.params import Defaults
    from hobbit_mlx.server.prompts import Template
    from hobbit_mlx.server.worker import Worker

    _, model_dir = tiny_factory("qwen3_moe")
    tokenizer = load_tokenizer(_tool_tokenizer_dir(tmp_path_factory.mktemp("tools")))
    assert tokenizer.has_tool_calling and tokenizer.has_thinking
    script = Script()

    def load():
        model, _ = hobbit_mlx.load(model_dir, exact=True, progress=False)
        return model, tokenizer

    worker = Worker(load, "tiny")
    worker.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hobbit_mlx, "stream_generate", script.stream_generate)
        app = create_app(Dispatcher(worker, Template(), Defaults(max_tokens=200), set()))
        with TestClient(app) as http:
            script.http = http
            script.tokenizer = tokenizer
            script.openai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused",
                                          http_client=http, max_retries=0)
            script.claude = anthropic.Anthropic(base_url="http://testserver", api_key="unused",
                                                http_client=http, max_retries=0)
            yield script
    worker.stop()


def _chat(s: Script, text: str, stream: bool = False, **kw):
    s.text = text
    kw = dict(dict(model="tiny", messages=HI, max_tokens=200), **kw)
    out = s.openai.chat.completions.create(stream=stream, **kw)
    return list(out) if stream else out.choices[0]


def _claude(s: Script, text: str, **kw):
    s.text = text
    kw = dict(dict(model="tiny", messages=HI, max_tokens=200, tools=[CLAUDE_WEATHER]), **kw)
    return s.claude.messages.create(**kw)


# --- OpenAI -----------------------------------------------------------------------------------


def test_openai_tool_call(served):
    choice = _chat(served, CALL, tools=[WEATHER])
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # (no other text: null, as OpenAI has it)
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    choice = _chat(served, f"Let me look.\n{CALL}\n{CALL2}", tools=[WEATHER])
    assert choice.message.content == "Let me look.\n"
    assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == \
        ["Paris", 'Nice, "FR"']
    assert len({c.id for c in choice.message.tool_calls}) == 2


def test_openai_tool_calls_stream_each_call_whole_once_it_ends(served):
    chunks = _chat(served, f"Let me look.\n{CALL}\nand{CALL2}", stream=True, tools=[WEATHER],
                   stream_options={"include_usage": True})
    events = []  # ("text", ...) and ("call", index, name, arguments), in order
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        if d.content:
            events.append(("text", d.content))
        for call in d.tool_calls or ():
            assert call.id.startswith("call_") and call.type == "function"
            events.append(("call", call.index, call.function.name,
                           json.loads(call.function.arguments)))
    calls = [e for e in events if e[0] == "call"]
    assert calls == [("call", 0, "get_weather", {"city": "Paris"}),
                     ("call", 1, "get_weather", {"city": 'Nice, "FR"'})]
    first, second = events.index(calls[0]), events.index(calls[1])
    assert "".join(e[1] for e in events[:first]) == "Let me look.\n"
    assert "".join(e[1] for e in events[first + 1:second]) == "and"  # (the call came first)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_without_tools_a_call_stays_text(served):
    for kw in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        choice = _chat(served, f"Sure.\n{CALL}", **kw)
        assert choice.message.content == f"Sure.\n{CALL}" and not choice.message.tool_calls
        assert choice.finish_reason == "stop"
        chunks = _chat(served, f"Sure.\n{CALL}", stream=True, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"Sure.\n{CALL}"


def test_reasoning_is_split_from_the_content(served):
    choice = _chat(served, f"{THINK}It is sunny.", tools=[WEATHER])
    assert choice.message.content == "It is sunny."
    message = choice.message.to_dict()
    assert message["reasoning"] == "The user wants the weather.\n"
    assert "reasoning_content" not in message  # (mlx-lm's server fills ``reasoning`` alone)
    chunks = _chat(served, f"{THINK}It is sunny.", stream=True)
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    assert "".join(d.to_dict().get("reasoning") or "" for d in deltas) == \
        "The user wants the weather.\n"

    # reasoning, then a call: no blank content between them
    choice = _chat(served, THINK + CALL, tools=[WEATHER])
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    assert choice.message.to_dict()["reasoning"] == "The user wants the weather.\n"

    # a prompt that ends inside a think block: the reply starts in the reasoning
    body = {"chat_template_kwargs": {"open_think": True}}
    choice = _chat(served, "Hmm.\n</think>\n\nSunny.", extra_body=body)
    assert served.tokenizer.decode(served.prompts[-1]).endswith("<think>\n")
    assert choice.message.content == "Sunny." and choice.message.to_dict()["reasoning"] == "Hmm.\n"
    # ... and one whose think block the template closed (thinking off) does not
    body = {"chat_template_kwargs": {"enable_thinking": False}}
    choice = _chat(served, "Hmm. Sunny.", extra_body=body)
    assert choice.message.content == "Hmm. Sunny." and "reasoning" not in choice.message.to_dict()


def test_a_call_that_does_not_parse_comes_back_as_text(served):
    # cut by max_tokens inside the call's JSON
    n = len(served.tokenizer.encode('Ok <tool_call>\n{"name": "get_weather", "argu',
                                    add_special_tokens=False))
    choice = _chat(served, "Ok " + CALL, tools=[WEATHER], max_tokens=n)
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("Ok <tool_call>\n{\"name\": \"get_weather\"")
    assert ("Ok " + CALL).startswith(choice.message.content)
    chunks = _chat(served, "Ok " + CALL, stream=True, tools=[WEATHER], max_tokens=n)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    message = _claude(served, "Ok " + CALL, max_tokens=n)
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == choice.message.content

    # invalid JSON, and a call without a name: the text, markers and all
    for bad in ('<tool_call>\n{"name": "get_weather", "arguments": {city}}\n</tool_call>',
                '<tool_call>\n{"arguments": {}}\n</tool_call>'):
        choice = _chat(served, f"{bad}\nDone.", tools=[WEATHER])
        assert choice.message.content == f"{bad}Done." and choice.finish_reason == "stop"
    # the server goes on
    assert _chat(served, CALL, tools=[WEATHER]).finish_reason == "tool_calls"


def test_calls_with_stop_sequences_and_logprobs(served):
    choice = _chat(served, f"{CALL}\nSTOP and more", tools=[WEATHER], stop=["STOP"],
                   logprobs=True)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    n = len(served.tokenizer.encode(f"{CALL}\nSTOP", add_special_tokens=False))
    assert len(choice.logprobs.content) == n  # every token's, up to the stop sequence
    chunks = _chat(served, f"{CALL}\nSTOP and more", stream=True, tools=[WEATHER],
                   stop=["STOP"], logprobs=True)
    assert sum(len(c.choices[0].logprobs.content) for c in chunks
               if c.choices[0].logprobs) == n
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- Anthropic --------------------------------------------------------------------------------


def test_anthropic_tool_use_and_thinking_blocks(served):
    message = _claude(served, f"{THINK}Let me look.\n{CALL}")
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, use = message.content
    assert thinking.thinking == "The user wants the weather.\n"
    assert text.text == "Let me look.\n"
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"

    served.text = f"{THINK}Let me look.\n{CALL}\n{CALL2}"
    kw = dict(model="tiny", messages=HI, max_tokens=200, tools=[CLAUDE_WEATHER])
    with served.claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert [b.input for b in final.content[2:]] == [{"city": "Paris"}, {"city": 'Nice, "FR"'}]
    assert final.content[0].thinking == "The user wants the weather.\n"
    assert final.content[1].text == "Let me look.\n" and final.stop_reason == "tool_use"
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use"]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas.count("input_json_delta") == 2 and "thinking_delta" in deltas
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert stops == [0, 1, 2, 3]

    plain = _claude(served, "Just text.", tools=None)
    assert [b.type for b in plain.content] == ["text"] and plain.stop_reason == "end_turn"
    assert _claude(served, CALL, tools=None).content[0].text == CALL  # no tools: text


def test_anthropic_thinking_switches_the_templates_thinking(served):
    """Anthropic's ``thinking`` reaches the template as ``enable_thinking`` (it was ignored)."""
    def prompt_after(**kw) -> str:
        _claude(served, "Sunny.", tools=None, **kw)
        return served.tokenizer.decode(served.prompts[-1])

    assert prompt_after(thinking={"type": "disabled"}).endswith("<think>\n\n</think>\n\n")
    assert "</think>" not in prompt_after(thinking={"type": "enabled", "budget_tokens": 1024})
    assert "</think>" not in prompt_after()
    # the request's own chat_template_kwargs win
    assert "</think>" not in prompt_after(thinking={"type": "disabled"}, extra_body={
        "chat_template_kwargs": {"enable_thinking": True}})
    r = served.http.post("/v1/messages", json={"messages": HI, "max_tokens": 4,
                                               "thinking": {"type": "sometimes"}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("thinking.type")


def test_count_tokens_counts_a_text_past_the_context(served):
    """The refusal of a text too long to fit, before tokenizing, is for prompts to run; a count
    is not refused (agents count to decide when to compact)."""
    d = served.http.app.state.dispatcher
    text = "x" * (2 * d.worker.max_token_chars * d.context_limit + 10)
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}
    counted = served.http.post("/v1/messages/count_tokens", json=body)
    assert counted.status_code == 200 and counted.json()["input_tokens"] > d.context_limit
    assert served.http.post("/v1/messages", json=body).status_code == 400


def test_anthropic_stop_sequence_only_when_it_ended_the_reply(served):
    message = _claude(served, f"{CALL}\nEND and more", stop_sequences=["END"])
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    message = _claude(served, "Just text END and more", stop_sequences=["END"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "END"


# --- history ----------------------------------------------------------------------------------


def test_tool_use_history_reaches_the_template(served):
    """The template raises unless a call's arguments are an object; the prompt shows them."""
    history = HI + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    choice = _chat(served, "It is sunny.", messages=history, tools=[WEATHER])
    assert choice.message.content == "It is sunny."
    prompt = served.tokenizer.decode(served.prompts[-1])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    # (the tool message's name filled in from the call it answers)
    assert '<tool_response name="get_weather" id="call_1">\nsunny\n</tool_response>' in prompt

    # the reply's own message sent back (as README's example does)
    message = _chat(served, THINK + CALL, tools=[WEATHER]).message
    history = HI + [message.to_dict(), {"role": "tool", "content": "rain",
                                        "tool_call_id": message.tool_calls[0].id}]
    assert _chat(served, "Rain.", messages=history, tools=[WEATHER]).message.content == "Rain."
    prompt = served.tokenizer.decode(served.prompts[-1])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt and "rain" in prompt

    claude_history = HI + [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Weather.", "signature": "abc"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And tomorrow?"}]}]
    message = _claude(served, "Rain.", messages=claude_history)
    assert message.content[0].text == "Rain."
    prompt = served.tokenizer.decode(served.prompts[-1])
    assert ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            in prompt) and "Weather." not in prompt
    assert ('<tool_response name="get_weather" id="toolu_1">\nsunny\n</tool_response><|im_end|>'
            '\n<|im_start|>user\nAnd tomorrow?') in prompt
    # the reply's own blocks sent back
    reply = _claude(served, THINK + CALL)
    results = [{"type": "tool_result", "tool_use_id": reply.content[1].id, "content": "rain"}]
    history = HI + [{"role": "assistant", "content": [b.to_dict() for b in reply.content]},
                    {"role": "user", "content": results}]
    assert _claude(served, "Rain.", messages=history).content[0].text == "Rain."
    assert f'id="{reply.content[1].id}">\nrain' in served.tokenizer.decode(served.prompts[-1])

    count = served.claude.messages.count_tokens(model="tiny", messages=claude_history,
                                                tools=[CLAUDE_WEATHER])
    assert count.input_tokens == message.usage.input_tokens


def test_bad_tool_history_is_a_400_naming_the_field(served):
    def call(fn):
        return HI + [{"role": "assistant", "content": None,
                      "tool_calls": [{"id": "c", "type": "function", "function": fn}]}]

    fn = "messages[1].tool_calls[0].function"
    for messages, field in [
            (call({"arguments": "{}"}), f"{fn}.name"),
            (call({"name": "f", "arguments": "{city"}), f"{fn}.arguments"),  # not JSON
            (call({"name": "f", "arguments": "[1]"}), f"{fn}.arguments"),  # not an object
            (HI + [{"role": "assistant", "tool_calls": "x"}], "messages[1].tool_calls")]:
        r = served.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
        assert r.status_code == 400, r.json()
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"], error

    for content, field in [
            ([{"type": "tool_result", "content": "sunny"}], "messages[0].content[0].tool_use_id"),
            ([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "messages[0].content[0]"),
            ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}],
             "messages[0].content[0].content")]:
        r = served.http.post("/v1/messages", json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert field in r.json()["error"]["message"], r.json()
    r = served.http.post("/v1/messages", json={"max_tokens": 4, "messages": HI + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "input": {}}]}]})
    assert r.status_code == 400 and "messages[1].content[0].name" in r.json()["error"]["message"]

    # tools themselves: each is checked and named (they failed in the template, or passed)
    for tools in ([1], [{"type": "function"}], [{"type": "function", "function": {"name": ""}}]):
        r = served.http.post("/v1/chat/completions", json={"messages": HI, "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.json()
        assert "tools[0] must be a function tool" in r.json()["error"]["message"]
    for tool, needle in (({"name": "x"}, "must have a name and an input_schema"),
                         ({"type": "web_search_20250305", "name": "web_search"}, "server tool")):
        r = served.http.post("/v1/messages", json={"messages": HI, "max_tokens": 4,
                                                   "tools": [tool]})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.json()


# --- the splitting itself ---------------------------------------------------------------------


def test_a_call_inside_the_reasoning_returns_to_it(served):
    """A call written before ``</think>``: parsed, and the rest of the reasoning stays reasoning
    (the end marker and the thought after the call became the answer)."""
    from hobbit_mlx.server.replies import Reply, split_reply

    prompt = served.tokenizer.encode("x")
    text = f"<think>\nmaybe {CALL} then done\n</think>\n\nNo call."
    parts = split_reply(Reply(served.tokenizer, prompt, [WEATHER]), [text])
    assert [(p.kind, p.text) for p in parts if p.kind != "call"] == [
        ("reasoning", "maybe "), ("reasoning", "then done\n"), ("text", "No call.")]
    assert [p.call.name for p in parts if p.kind == "call"] == ["get_weather"]
    broken = split_reply(Reply(served.tokenizer, prompt, [WEATHER]),
                         ["<think>\nmaybe <tool_call>{oops</tool_call> hm</think>Answer."])
    assert [(p.kind, p.text) for p in broken] == [
        ("reasoning", "maybe "), ("reasoning", "<tool_call>{oops</tool_call>"),
        ("reasoning", "hm"), ("text", "Answer.")]


def test_a_reply_splits_the_same_whatever_its_pieces(served):
    """Markers cut anywhere (one character at a time) give the same parts as whole text."""
    from hobbit_mlx.server.replies import Reply, split_reply

    text = f"{THINK}Let me look.\n{CALL}\nand {CALL2} done <tool_"
    prompt = served.tokenizer.encode("x")

    def parts(pieces):
        got = split_reply(Reply(served.tokenizer, prompt, [WEATHER]), pieces)
        return [(p.kind, p.text, p.call and (p.call.name, p.call.arguments)) for p in got]

    def merged(ps):
        out = []
        for p in ps:
            if out and p[0] != "call" and out[-1][0] == p[0]:
                out[-1] = (p[0], out[-1][1] + p[1], None)
            else:
                out.append(p)
        return out

    whole = merged(parts([text]))
    assert whole == [("reasoning", "The user wants the weather.\n", None),
                     ("text", "Let me look.\n", None),
                     ("call", "", ("get_weather", {"city": "Paris"})),
                     ("text", "and ", None),
                     ("call", "", ("get_weather", {"city": 'Nice, "FR"'})),
                     ("text", "done <tool_", None)]
    assert merged(parts(list(text))) == whole
