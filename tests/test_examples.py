"""Every script in examples/ runs on the bundled reference model (small budget, few tokens)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hobbit_mlx.testing import child_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    return child_env(PYTHONPATH=str(REPO))


def run(env, script, *args, stdin=""):
    p = subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)],
                       input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


def test_api_budget(env):
    out = run(env, "api_budget.py", "--memory-budget", "14MB", "--max-tokens", 8)
    assert "def fibonacci(n):" in out
    assert "budget 14.0 MB" in out and "read from storage" in out


def test_stream(env):
    out = run(env, "stream.py", "--max-tokens", 8)
    assert "class Stack:" in out and "tokens/s" in out


def test_chat_loop_reads_stdin_when_not_a_tty(env):
    out = run(env, "chat_loop.py", "--max-tokens", 6, stdin="hello\n\nhow are you?\n")
    assert out.count(">> ") == 2 and ">> how are you?" in out
    assert "tokens of context" in out
    out = run(env, "chat_loop.py", "--max-tokens", 4, "--once", "hi")
    assert out.count(">> ") == 1


def test_plan_then_load(env):
    out = run(env, "plan_then_load.py", "--residency", 0.25, "--max-tokens", 6)
    assert "minimum budget" in out and "loading with" in out and "peak memory" in out
