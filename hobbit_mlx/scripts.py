"""The console commands pip installs (pyproject.toml's ``[project.scripts]``):
``hobbit_mlx.generate --prompt ...`` as mlx-lm's ``mlx_lm.generate``, each the same as
``python -m`` of its module (the converter's is ``hobbit_mlx.convert``, for ``python -m convert``).
A module is imported only when its command runs, so one command does not load the others."""

from __future__ import annotations

import importlib
from typing import Callable

# command -> (module with main(argv), whether main is wrapped in cli_common.run as its
# ``python -m`` entry does: one error line and exit status 2 for bad input)
COMMANDS = {
    "generate": ("hobbit_mlx.generate", True),
    "chat": ("hobbit_mlx.chat", True),
    "server": ("hobbit_mlx.server.cli", True),
    "convert": ("convert.__main__", False),
    "calibrate": ("convert.calibrate", False),
    "plan": ("hobbit_mlx.plan", False),
    "benchmark": ("hobbit_mlx.benchmark", True),
    "perplexity": ("hobbit_mlx.perplexity", True),
    "manage": ("hobbit_mlx.manage", True),
    "cache_prompt": ("hobbit_mlx.cache_prompt", True),
}


def _command(name: str) -> Callable[[], int]:
    module, wrapped = COMMANDS[name]

    def main() -> int:
        entry = importlib.import_module(module).main
        if not wrapped:
            return entry()
        from .cli_common import run
        return run(entry)

    main.__name__ = main.__qualname__ = name
    return main


generate = _command("generate")
chat = _command("chat")
server = _command("server")
convert = _command("convert")
calibrate = _command("calibrate")
plan = _command("plan")
benchmark = _command("benchmark")
perplexity = _command("perplexity")
manage = _command("manage")
cache_prompt = _command("cache_prompt")
