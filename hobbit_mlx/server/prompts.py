"""Turning a request's messages or prompt into the prompt's token ids.

Chat messages go through the tokenizer's chat template, as ``python -m hobbit_mlx.generate``
applies it; a final assistant message is continued rather than answered (the Anthropic API's
prefill). Only text content is read: an image or another content type is a 400.
"""

from __future__ import annotations

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
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{i}] must be an object", where)
        kind = part.get("type")
        if kind not in ("text", "input_text"):
            raise bad_request(f"{where}[{i}] is of type {kind!r}; only text content is supported",
                              where)
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{i}].text must be a string", where)
        texts.append(part["text"])
    return "".join(texts)


def openai_messages(body: dict) -> list[dict]:
    """The ``messages`` of a chat completion request, checked, with text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
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
        out.append(msg)
    return out


def anthropic_messages(body: dict) -> list[dict]:
    """The ``system`` and ``messages`` of an Anthropic Messages request, as chat messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_of(system, "system")})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with a role and content", "messages")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant', not {role!r}",
                              "messages")
        out.append({"role": role, "content": text_of(m.get("content"), f"{where}.content")})
    return out


def openai_tools(body: dict) -> list | None:
    """The ``tools`` for the chat template (the model sees them; its calls come back as text,
    since there is no tool-call parsing), None with ``tool_choice`` "none". A choice that forces
    a call is a 400: nothing here can force one."""
    tools, choice = body.get("tools") or None, body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    if choice in (None, "auto", "none"):
        return None if choice == "none" else tools
    raise bad_request(f"tool_choice {choice!r} is not supported: this server cannot force a "
                      "tool call (tools are shown to the model; \"auto\" and \"none\" work)",
                      "tool_choice")


def anthropic_tools(body: dict) -> list | None:
    """An Anthropic request's custom ``tools``, in the function form chat templates read."""
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
        if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
            raise bad_request(f"tools[{i}] must have a name and an input_schema (server tools "
                              f"such as {t.get('type')!r} are not supported)", "tools")
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
