"""Test helpers for hobbit_mlx (tiny offline random-weight models)."""

from __future__ import annotations

import os


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts (a CLI, a server, an example): offline,
    unbuffered, without debug output, and in this process's conversion cache (the tests'
    session cache, where a model converted and measured once is not converted or measured
    again)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("HOBBIT_MLX_DEBUG", None)
    return env
