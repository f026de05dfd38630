"""Turning a request's messages or prompt into the prompt's token ids.

Chat messages go through the tokenizer's chat template, as ``python -m hobbit_mlx.generate``
applies it; a final assistant message is continued rather than answered (the Anthropic API's
prefill). Only text content is read: an image or another content type is a 400.

Tool use reaches the template in the form chat templates read (OpenAI's, which mlx-lm's server
passes on): an assistant message's ``tool_calls`` (``{"id", "type": "function", "function":
{"name", "arguments"}}``, the arguments an object, not the JSON string the API sends) and
``tool`` messages with their ``tool_call_id``. Anthropic's ``tool_use`` and ``tool_result``
blocks are converted to that form; its ``thinking`` blocks are left out (the API itself drops
earlier turns' thinking). The model's calls in the reply are parsed in ``replies``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Template:
    """How the server applies chat templates (its flags)."""

    use_template: bool = True
    system_prompt: str | None = None
    kwargs: dict = field(default_factory=dict)


def text_of(content: Any, where: str, *, allow_none: bool = False) -> str:
    """A message's content: a string, or a list of text parts (``{"type": "text", "text": ...}``)."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    return "".join(part_text(part, f"{where}[{i}]", where) for i, part in enumerate(content))


def part_text(part: Any, at: str, param: str) -> str:
    """The text of one content part (``at`` names it); any other type is a 400."""
    if not isinstance(part, dict):
        raise bad_request(f"{at} must be an object", param)
    kind = part.get("type")
    if kind not in ("text", "input_text"):
        raise bad_request(f"{at} is of type {kind!r}; only text content is supported", param)
    if not isinstance(part.get("text"), str):
        raise bad_request(f"{at}.text must be a string", param)
    return part["text"]


def openai_messages(body: dict) -> list[dict]:
    """The ``messages`` of a chat completion request, checked, with text content, and tool
    calls with their arguments as objects."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
    names: dict[str, str] = {}  # tool call id -> the function's name (for tool messages)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with a role and content", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}",
                              "messages")
        msg = dict(m, role="system" if role == "developer" else role,
                   content=text_of(m.get("content"), f"{where}.content",
                                   allow_none=role in ("assistant", "tool")))
        msg.pop("tool_calls", None)
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = _openai_tool_calls(m["tool_calls"], f"{where}.tool_calls")
            if calls:
                msg["tool_calls"] = calls
                names.update((c["id"], c["function"]["name"]) for c in calls
                             if isinstance(c.get("id"), str))
        call_id = m.get("tool_call_id")
        if role == "tool" and call_id is not None and not isinstance(call_id, str):
            raise bad_request(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        if role == "tool" and call_id in names and not msg.get("name"):
            msg["name"] = names[call_id]  # (templates show which tool answered)
        out.append(msg)
    return out


def _openai_tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's ``tool_calls``, checked, with each call's arguments (a JSON string
    in the API) as the object templates read, as mlx-lm's server converts them."""
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be a list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise bad_request(f"{at} must be an object with a function", at)
        if call.get("type", "function") != "function":
            raise bad_request(f"{at}.type must be 'function', not {call.get('type')!r}",
                              f"{at}.type")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{at}.function.name must be a non-empty string",
                              f"{at}.function.name")
        args = arguments(fn.get("arguments"), f"{at}.function.arguments")
        out.append(dict(call, type="function", function=dict(fn, arguments=args)))
    return out


def arguments(value: Any, where: str) -> dict:
    """A call's arguments as an object: OpenAI's JSON string read (empty: none), an object
    kept; anything else is a 400 naming ``where``."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{where} is not valid JSON ({e})", where) from None
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be a JSON object", where)
    return value


def anthropic_messages(body: dict) -> list[dict]:
    """The ``system`` and ``messages`` of an Anthropic Messages request, as chat messages: an
    assistant's ``tool_use`` blocks become its ``tool_calls``, a user's ``tool_result`` blocks
    ``tool`` messages (before the text of that user message, as the API orders them)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_of(system, "system")})
    names: dict[str, str] = {}  # tool_use id -> the tool's name (for the tool messages)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with a role and content", "messages")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant', not {role!r}",
                              "messages")
        out += _anthropic_message(role, m.get("content"), f"{where}.content", names)
    return out


def _anthropic_message(role: str, content: Any, where: str, names: dict) -> list[dict]:
    """One Anthropic message as chat messages (tool messages first, for a user's results)."""
    if not isinstance(content, list):
        return [{"role": role, "content": text_of(content, where)}]
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        if kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at, names))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at, names))
        elif kind in ("tool_use", "tool_result"):
            raise bad_request(f"{at} is a {kind} block, which belongs in "
                              f"{'an assistant' if kind == 'tool_use' else 'a user'} message",
                              at)
        else:
            texts.append(part_text(block, at, where))  # (a 400 for anything but text)
    text = "".join(texts)
    if role == "assistant":
        return [dict({"role": role, "content": text}, **({"tool_calls": calls} if calls else {}))]
    return results + ([{"role": role, "content": text}] if texts or not results else [])


def _tool_use(block: dict, at: str, names: dict) -> dict:
    name, call_id = block.get("name"), block.get("id")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{at}.name must be a non-empty string", f"{at}.name")
    if call_id is not None and not isinstance(call_id, str):
        raise bad_request(f"{at}.id must be a string", f"{at}.id")
    args = arguments(block.get("input"), f"{at}.input")
    if call_id:
        names[call_id] = name
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    return dict(call, id=call_id) if call_id else call


def _tool_result(block: dict, at: str, names: dict) -> dict:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{at}.tool_use_id must be the id of the tool_use it answers",
                          f"{at}.tool_use_id")
    message = {"role": "tool", "tool_call_id": call_id,
               "content": text_of(block.get("content"), f"{at}.content", allow_none=True)}
    if call_id in names:
        message["name"] = names[call_id]
    return message


def openai_tools(body: dict) -> list | None:
    """The ``tools`` for the chat template (the model sees them, and its calls are parsed from
    the reply), None with ``tool_choice`` "none". A choice that forces a call is a 400: nothing
    here can force one."""
    tools, choice = body.get("tools") or None, body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    for i, t in enumerate(tools or ()):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or \
                not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}] must be a function tool: {{\"type\": \"function\", "
                              "\"function\": {\"name\": ..., \"parameters\": ...}}", "tools")
    if choice in (None, "auto", "none"):
        return None if choice == "none" else tools
    raise bad_request(f"tool_choice {choice!r} is not supported: this server cannot force a "
                      "tool call (tools are shown to the model; \"auto\" and \"none\" work)",
                      "tool_choice")


def anthropic_tools(body: dict) -> list | None:
    """An Anthropic request's custom ``tools``, in the function form chat templates read (and
    the reply's calls are parsed against); None with ``tool_choice`` "none"."""
    tools, choice = body.get("tools") or None, body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        if kind not in ("auto", "none"):
            raise bad_request(f"tool_choice of type {kind!r} is not supported: this server "
                              "cannot force a tool call (\"auto\" and \"none\" work)",
                              "tool_choice")
        if kind == "none":
            return None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise bad_request("tools must be a list of tool objects", "tools")
    out = []
    for i, t in enumerate(tools):
        if t.get("type") not in (None, "custom"):
            raise bad_request(f"tools[{i}] is a server tool ({t['type']!r}), which this server "
                              "does not run: only custom tools (a name and an input_schema)",
                              "tools")
        if not isinstance(t.get("name"), str) or not t["name"] or \
                not isinstance(t.get("input_schema"), dict):
            raise bad_request(f"tools[{i}] must have a name and an input_schema", "tools")
        out.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t["input_schema"]}})
    return out


def chat_tokens(tokenizer, messages: list[dict], template: Template, *,
                tools: list | None = None, template_kwargs: dict | None = None) -> list[int]:
    """The prompt of a conversation: its chat template applied (the server's system prompt
    first when the conversation has none), or plain ``role: content`` lines without one."""
    if template.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": template.system_prompt}] + messages
    prefill = messages[-1]["role"] == "assistant"
    if template.use_template and tokenizer.has_chat_template:
        kwargs = dict(template.kwargs, **(template_kwargs or {}))
        if tools:
            kwargs["tools"] = tools
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not prefill,
                continue_final_message=prefill, **kwargs)
        except Exception as e:  # the template refuses the conversation (a role, an order)
            raise bad_request(f"the chat template failed: {type(e).__name__}: {e}",
                              "messages") from None
        tokens = tokenizer.encode(text, add_special_tokens=False)
    else:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        text = "\n".join(lines) if prefill else "\n".join(lines + ["assistant: "])
        tokens = tokenizer.encode(text)
    return _non_empty(list(tokens), "messages")


def completion_tokens(tokenizer, body: dict) -> list[int]:
    """The ``prompt`` of a text completion: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _non_empty(list(tokenizer.encode(prompt)), "prompt")
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt has token id {bad[0]}, outside the vocabulary "
                              f"(0..{vocab - 1})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("prompt must be one prompt: this server completes one per request",
                          "prompt")
    raise bad_request("prompt must be a string or a list of token ids", "prompt")


def _non_empty(tokens: list[int], param: str) -> list[int]:
    if not tokens:
        raise bad_request(f"the {param} is empty after tokenization", param)
    return tokens
