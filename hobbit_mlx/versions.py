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

import re
from importlib import metadata

# the floors CI runs the version-sensitive tests on (.ci/run, the floors step: .venv-ci-floor)
MINIMUM = {"mlx": "0.32.4", "mlx-lm": "0.32.2"}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ("0.32.0rc1" -> (0, 32, 0)); a part with a
    suffix counts as its leading digits."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def too_old(installed: dict[str, str | None]) -> list[str]:
    """What of ``installed`` (package -> version, None where not found) is older than
    ``MINIMUM``, as "name version (needs >= floor)"."""
    return [f"{name} {installed[name]} (needs >= {floor})" for name, floor in MINIMUM.items()
            if installed.get(name) is not None and release(installed[name]) < release(floor)]


def check_installed() -> None:
    """Raise ImportError naming the packages to upgrade when mlx or mlx-lm is older than the
    floor. A package without metadata (a source checkout on the path) is not judged."""
    installed: dict[str, str | None] = {}
    for name in MINIMUM:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    old = too_old(installed)
    if old:
        names = " ".join(n for n in MINIMUM if any(o.startswith(n + " ") for o in old))
        raise ImportError(f"hobbit_mlx needs newer packages: {', '.join(old)}; "
                          f"run: pip install -U {names}")
