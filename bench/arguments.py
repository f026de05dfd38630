"""Refusing an argument a bench script cannot use: before any work, with one ``error:`` line on
stderr and exit status 2 (argparse's convention, as ``replay.py`` answers a bad trace).

- argument types for argparse's ``type=`` (a bad value is argparse's own ``error:`` line):
  ``residencies``/``residency`` (fractions in [0, 1]; 0 = every expert read on demand),
  ``positive``, ``sizes``/``size`` (memory budgets such as ``24MB``), ``storage(...)`` (a
  ``hobbit_mlx.storage`` spec or one of the names given), ``model_dir`` (a directory that
  exists), ``model_or_repo`` (that, or a hub id such as ``org/name``);
- ``out_dir(parser, path)``: ``--out``'s directory made and checked writable at startup, so
  that a long run does not end in a write error;
- ``command(__file__, argv)``: the command line a report records, as the README gives it;
- ``refuse_bad_input``: decorates a script's ``main``: what the library raises on what it was
  given (``BudgetError``: a budget below the model's minimum; ``ConversionError``,
  ``StoreError``; ``ValueError``: an option it refuses) ends the run with one ``error:`` line and
  exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import sys
from pathlib import Path

Bad = argparse.ArgumentTypeError


def _items(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Bad(f"{what} {text!r} is not a number") from None


def residencies(text: str) -> list[float]:
    """Comma-separated expert residencies, each in [0, 1]."""
    out = [_number(x, "residency") for x in _items(text)]
    if not out:
        raise Bad("no residency given")
    for r in out:
        if not 0.0 <= r <= 1.0:
            raise Bad(f"a residency is a fraction of the experts in [0, 1], not {r:g}")
    return out


def counts(text: str) -> list[int]:
    """Comma-separated whole numbers, each at least 1 (batch sizes, repetitions)."""
    try:
        out = [int(x) for x in _items(text)]
    except ValueError:
        raise Bad(f"{text!r} is not a list of whole numbers") from None
    if not out or min(out) < 1:
        raise Bad(f"each count is at least 1, not {text!r}")
    return out


def _one(many, what: str):
    """A type for one value of what ``many`` reads as a comma-separated list."""
    def check(text: str):
        out = many(text)
        if len(out) != 1:
            raise Bad(f"one {what}, not {text!r}")
        return out[0]
    check.__name__ = what.replace(" ", "_")
    return check


def command(script: str, argv: list[str] | None) -> str:
    """The command that ran, as the README gives it (``python bench/<script> ...`` from the
    repository's top, whatever the working directory was: a cwd-relative path says nothing once
    the report is committed), with every argument, quoted for a shell."""
    args = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join([f"bench/{Path(script).name}", *args])


def positive(text: str) -> float:
    x = _number(text, "value")
    if not x > 0:
        raise Bad(f"must be above 0, not {text}")
    return x


def sizes(text: str) -> list[str]:
    """Comma-separated memory sizes (``hobbit_mlx.budget.parse_size``), each above 0; kept as
    written (the reports show them so)."""
    from hobbit_mlx.budget import parse_size

    out = _items(text)
    for x in out:
        try:
            n = parse_size(x)
        except ValueError as e:
            raise Bad(str(e)) from None
        if n <= 0:
            raise Bad(f"a memory size must be above 0, not {x!r}")
    return out


residency = _one(residencies, "residency")
size = _one(sizes, "memory size")
count = _one(counts, "count")


def storage(*names: str):
    """A type: one of ``names`` (such as "mac-like", "warm") or a ``hobbit_mlx.storage`` spec."""
    def check(text: str) -> str:
        if text in names:
            return text
        from hobbit_mlx.storage import parse_storage

        try:
            parse_storage(text)
        except ValueError as e:
            raise Bad(str(e) + (f" (or {', '.join(names)})" if names else "")) from None
        return text
    check.__name__ = "storage"
    return check


def model_dir(text: str) -> str:
    if not Path(text).expanduser().exists():
        raise Bad(f"{text}: no such model directory")
    return text


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_or_repo(text: str) -> str:
    """A model directory that exists, or what looks like a hub id (``org/name``)."""
    if Path(text).expanduser().exists() or _REPO_ID.fullmatch(text):
        return text
    raise Bad(f"{text}: no such model directory (nor a hub id such as org/name)")


def out_dir(parser: argparse.ArgumentParser, path, *, file: bool = False) -> Path:
    """``path`` (``file``: its parent) made and checked writable now; else ``parser.error``."""
    path = Path(path).expanduser()
    folder = path.parent if file else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {path}: cannot make {folder}: {e.strerror or e}")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out {path}: {folder} is not writable")
    if file and path.is_dir():
        parser.error(f"--out {path} is a directory; it takes a file name")
    return path


def _library_errors() -> tuple:
    from convert import ConversionError
    from hobbit_mlx.store import StoreError

    return (ValueError, ConversionError, StoreError)  # (BudgetError is a ValueError)


def refuse_bad_input(main):
    """``main(argv)`` with the library's refusals as one ``error:`` line and exit status 2."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except Exception as e:
            if not isinstance(e, _library_errors()):
                raise
            prog = Path(main.__code__.co_filename).name
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(2) from None
    return run
