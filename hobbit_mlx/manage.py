"""What the cache of conversions holds, and removing what no load will read.

    python -m hobbit_mlx.manage                      # list it (--scan)
    python -m hobbit_mlx.manage --prune              # remove outdated conversions and leftovers
    python -m hobbit_mlx.manage --delete --pattern Qwen3

``load``, ``generate``, ``chat`` and the server convert an unconverted checkpoint once into the
cache (``$HOBBIT_MLX_CACHE``): its 2-bit experts, and for a float checkpoint a whole quantized
copy, GBs each. A conversion outlives its source (deleted, moved, its config edited, adapters
trained again), and an interrupted one keeps its finished layers; this is how they go, as
``mlx_lm.manage`` does for the Hugging Face cache. A process converting into the cache now is
never disturbed: what it holds is left, and said so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from convert import _tree_bytes
from mlx_lm.manage import tabulate

from . import cli_common as cli
from .budget import format_size
from .conversion_cache import MEASURED_DIR, CacheEntry, cache_root, remove, remove_unused_locks, scan


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.manage",
        description="List the models hobbit_mlx converted into its cache (HOBBIT_MLX_CACHE, "
                    f"now {cache_root()}) and remove them.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--scan", action="store_true", help="List the cache (the default).")
    what.add_argument("--prune", action="store_true",
                      help="Remove what no load will read: conversions whose source changed (a "
                           "load of it converts again) or whose source they read in place is "
                           "gone, and what interrupted conversions left that cannot resume. "
                           "Current conversions, complete copies of a deleted source and "
                           "resumable layers stay.")
    what.add_argument("--delete", action="store_true",
                      help="Remove the conversions --pattern matches (and what interrupted "
                           "conversions of them kept), current or not.")
    parser.add_argument("--pattern", default=None,
                        help="Only entries whose name or source contains this text.")
    parser.add_argument("--yes", "-y", action="store_true",
                        help="Remove without asking.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.delete and not args.pattern:
        raise cli.CLIError("--delete needs --pattern (the text the conversions to remove have "
                           "in their name or source); --prune removes what no load reads")
    if args.pattern == "":
        raise cli.CLIError("--pattern is empty: it would match everything")
    root = cache_root()
    try:
        found = scan(root)
    except NotADirectoryError as e:
        raise cli.CLIError(str(e)) from None
    entries = [e for e in found if args.pattern is None or
               args.pattern in e.path.name or args.pattern in e.source]
    if not (args.prune or args.delete):
        return _print_scan(root, entries, args.pattern)
    chosen = [e for e in entries if e.stale or args.delete]
    if not chosen:
        print(f"nothing to remove in {root}" +
              (f" matching {args.pattern!r}" if args.pattern else ""))
        remove_unused_locks(root)  # (empty files: said nothing of)
        return 0
    print(_table(chosen))
    busy = [e for e in chosen if e.busy]
    chosen = [e for e in chosen if not e.busy]
    for e in busy:
        print(f"left {e.path.name}: {e.state}")
    if chosen and not _confirmed(f"Remove {len(chosen)} of these "
                                 f"({format_size(sum(e.size for e in chosen))})?", args.yes):
        print("nothing removed")
        return 0
    failed = 0
    freed = 0
    for e in chosen:
        reason = remove(e)
        left = _tree_bytes(e.path) if e.path.exists() else 0
        freed += max(0, e.size - left)
        if reason is not None:
            failed += 1
            print(f"left {e.path.name}: {reason}")
    print(f"removed {len(chosen) - failed}, {format_size(freed)} freed")
    remove_unused_locks(root)
    return 1 if busy or failed else 0


def _print_scan(root, entries: list[CacheEntry], pattern: str | None) -> int:
    if not entries:
        print(f"no conversions in {root}" + (f" matching {pattern!r}" if pattern else ""))
    else:
        print(_table(entries))
        stale = [e for e in entries if e.stale]
        print(f"\n{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
              f"{format_size(sum(e.size for e in entries))} in {root}"
              + (f"; {len(stale)} no load will read ({format_size(sum(e.size for e in stale))}):"
                 " python -m hobbit_mlx.manage --prune" if stale else ""))
    measured = root / MEASURED_DIR
    if measured.is_dir() and pattern is None:
        print(f"measured activations: {format_size(_tree_bytes(measured))} in {measured} "
              "(kept small by the loader)")
    return 0


def _table(entries: list[CacheEntry]) -> str:
    """The entries as mlx-lm's ``manage`` shows the Hugging Face cache."""
    rows = [[e.path.name, e.kind, f"{format_size(e.size):>10}", e.state,
             e.source + (f" + adapters {e.adapter}" if e.adapter else "")] for e in entries]
    return tabulate(rows, ["NAME", "KIND", "SIZE", "STATE", "SOURCE"])


def _confirmed(question: str, yes: bool) -> bool:
    """``yes``, or the user's answer; with no terminal to ask on, an error naming ``--yes``."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise cli.CLIError("not removing without a terminal to confirm on: add --yes")
    try:
        answer = input(f"{question} [y/N] ").strip().lower()
    except EOFError:
        return False
    return answer in ("y", "yes")


if __name__ == "__main__":
    sys.exit(cli.run(main))
