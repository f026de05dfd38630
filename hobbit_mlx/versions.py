"""The oldest mlx and mlx-lm this runtime is tested with, checked at import.

hobbit_mlx patches mlx-lm's MoE modules and reads its KV caches' internals, which change between
releases: mlx-lm 0.28-0.31 fail inside the first load with an error that names neither package
("'NoneType' object has no attribute 'shape'", an empty KV cache's state), 0.32.0 builds phimoe
differently from 0.32.2, and mlx-lm 0.32.2 passes ``gather_qmm`` a ``global_scale`` that mlx 0.32.2
lacks (mlx-lm declares its mlx floor on macOS only); mlx 0.32.3 quantizes at 2-8 bits, where the
converter and its tests offer 0.32.4's 1-bit experts too. pip enforces pyproject.toml's floors (the
same numbers; a test holds them equal) at install, but not after: an environment where mlx-lm was
downgraded later, or hobbit_mlx installed with ``--no-deps``, gets one line naming what to upgrade
instead.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

# the floors CI runs the version-sensitive tests on (.ci/run, the floors step: .venv-ci-floor)
MINIMUM = {"mlx": "0.32.4", "mlx-lm": "0.32.2"}


def _older(version: str, floor: str) -> bool:
    """PEP 440's order (a release candidate of the floor is older than it); a version string
    it cannot read (a local build's) is not judged."""
    try:
        return Version(version) < Version(floor)
    except InvalidVersion:
        return False


def too_old(installed: dict[str, str | None]) -> list[str]:
    """What of ``installed`` (package -> version, None where not found) is older than
    ``MINIMUM``, as "name version (needs >= floor)"."""
    return [f"{name} {installed[name]} (needs >= {floor})" for name, floor in MINIMUM.items()
            if installed.get(name) is not None and _older(installed[name], floor)]


def running_a_command() -> bool:
    """Whether this process is one of hobbit_mlx's commands (``python -m hobbit_mlx.X``,
    ``python -m convert``, an installed ``hobbit_mlx.X``), whose bad input is one ``error:``
    line and exit status 2; not a program that imports hobbit_mlx."""
    argv = getattr(sys, "orig_argv", sys.argv)  # (sys.argv[0] is "-m" while -m imports)
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1].split(".")[0] in ("hobbit_mlx", "convert")
    return Path(sys.argv[0]).name.startswith("hobbit_mlx.")


def check_installed() -> None:
    """Raise ImportError naming the packages to upgrade when mlx or mlx-lm is older than the
    floor (in a command: one error line, exit status 2, before any of its code runs). A package
    without metadata (a source checkout on the path) is not judged."""
    installed: dict[str, str | None] = {}
    for name in MINIMUM:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    old = too_old(installed)
    if old:
        names = " ".join(n for n in MINIMUM if any(o.startswith(n + " ") for o in old))
        message = (f"hobbit_mlx needs newer packages: {', '.join(old)}; "
                   f"run: pip install -U {names}")
        if running_a_command():
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2)
        raise ImportError(message)
