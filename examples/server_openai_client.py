"""Drive a running ``python -m hobbit_mlx.server`` with the official ``openai`` client.

This script starts nothing: start the server first, e.g. with the bundled reference model

    python -m hobbit_mlx.server --memory-budget 16MB --port 8080

and then run

    python examples/server_openai_client.py --base-url http://127.0.0.1:8080/v1

It lists the served model, asks for a chat completion, streams another one, completes a plain
prompt, and prints the server's offload statistics (served rate, bytes read, peak memory).
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1",
                        help="The server's OpenAI base URL (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="not-needed")  # the server checks no key
    model = client.models.list().data[0].id
    print(f"model: {model}")

    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    reply = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=args.max_tokens, temperature=0)
    print(f"chat: {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens, "
          f"finish: {reply.choices[0].finish_reason})")

    print("streamed: ", end="", flush=True)
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                max_tokens=args.max_tokens, temperature=0):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    completion = client.completions.create(model=model, prompt="def fibonacci(n):",
                                           max_tokens=args.max_tokens, temperature=0,
                                           stop=["\n\n"])
    print(f"completion: {completion.choices[0].text!r}")

    root = args.base_url.rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/v1/stats") as response:
        stats = json.load(response)
    rate = stats["served_rate"]
    print(f"server: {stats['requests_served']} requests served, experts served from memory "
          f"{'n/a' if rate is None else f'{rate:.1%}'}, {stats['bytes_read'] / 2**20:.1f} MiB "
          f"read, peak {stats['peak_memory_bytes'] / 2**20:.1f} MiB of a "
          f"{stats['budget_bytes'] / 2**20:.1f} MiB budget")


if __name__ == "__main__":
    main()
