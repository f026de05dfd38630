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


class LazyModule:
    """A module imported when first used: a test module that imports a large client library
    (``anthropic``: 2.6 s here) at its top makes every test process that collects it pay the
    import, whether or not it runs that module's tests."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        return getattr(importlib.import_module(self._name), attr)
