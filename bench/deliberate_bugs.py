"""The deliberate bugs of issue 15's audit, each put into a scratch copy of the repository in
turn, with the tests that must catch it (not run by CI): one table row per bug.

    nice python bench/deliberate_bugs.py [--bugs N,...] [--check]

Each bug is a line of the code replaced by a broken one. A line that is no longer in the code (the
code moved on) is a row saying the pattern is stale, the other bugs are still tried, and the
script exits with status 1 at the end; so does a bug its tests do not catch. ``--check`` only
checks that every pattern still matches the code (no copy, no tests run).
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench.mutation import REPO, _copy_repo  # noqa: E402

BUGS = [
 ("the cache evicts pinned experts", "hobbit_mlx/cache.py",
  "unused = lambda k: not pins[k] and last[slot_of[k]] < epoch", "unused = lambda k: last[slot_of[k]] < epoch",
  ["tests/test_pins_e2e.py"]),
 ("the reader skips the CRC check", "hobbit_mlx/reader.py",
  "        if value != crc:\n", "        if False:\n",
  ["tests/test_store.py", "tests/test_reader_modes.py"]),
 ("exact mode uses 2-bit copies", "hobbit_mlx/options.py",
  "mixed = (not self.exact) if self.mixed_precision is None", "mixed = True if self.mixed_precision is None",
  ["tests/test_exact.py"]),
 ("off-by-one in the capacity check", "hobbit_mlx/cache.py",
  "self.free: list[int] = list(range(n - 1, -1, -1))", "self.free: list[int] = list(range(n, -1, -1))",
  ["tests/test_cache_properties.py", "tests/test_exact.py"]),
 ("the KV cache is not reserved in the budget", "hobbit_mlx/budget.py",
  "        full = kv_bytes_for(tokens, self.kv_bytes_per_token, self.kv_layer_bytes_per_token)\n",
  "        full = 0\n",
  ["tests/test_budget_scale.py"]),
 ("mixed mode serves important experts from a resident 2-bit copy", "hobbit_mlx/offload.py",
  "        high = set(flat[level == HIGH].tolist())\n",
  "        high = {e for e in flat[level == HIGH].tolist() if not rt.has_or_reading(lid, e, 'low')}\n",
  ["tests/test_precision_served.py"]),
 ("hits on reads still in flight are not counted", "hobbit_mlx/fetch.py",
  "rt._count(precision, len(self.keys) - demand, demand)", "rt._count(precision, len(self.keys) - len(self.pending), demand)",
  ["tests/test_counters.py"]),
 ("close() returns without waiting for the reader threads", "hobbit_mlx/reader.py",
  "getattr(self, name).shutdown(wait=True)", "getattr(self, name).shutdown(wait=False)",
  ["tests/test_shutdown.py"]),
]


def stale(root: Path = REPO, bugs=BUGS) -> list[str]:
    """The bugs whose line is not in ``root``'s code exactly once (the code moved on)."""
    return [name for name, rel, old, _new, _tests in bugs
            if not (root / rel).is_file() or (root / rel).read_text().count(old) != 1]


def run(root: Path, bugs=BUGS) -> int:
    """Each bug put into ``root`` (a scratch copy) in turn, its tests run; one row per bug.
    Returns 0 when every bug was put in and caught."""
    failed = 0
    for name, rel, old, new, tests in bugs:
        path = root / rel
        src = path.read_text() if path.is_file() else ""
        if src.count(old) != 1:
            failed += 1
            print(f"| {name} | pattern not found (stale: {rel} has it {src.count(old)} times, "
                  f"not once) | {', '.join(tests)} | | {old.strip()[:150]}", flush=True)
            continue
        path.write_text(src.replace(old, new))
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "-x", *tests], cwd=root, capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(root)})
        finally:
            path.write_text(src)
        lines = result.stdout.splitlines()
        last = [l for l in lines if l.strip()][-1:]
        first_fail = [l for l in lines if l.startswith("FAILED") or l.startswith("E  ")][:2]
        failed += result.returncode != 1
        print(f"| {name} | {'caught' if result.returncode == 1 else 'NOT caught (rc %d)' % result.returncode} | "
              f"{', '.join(tests)} | {last[0] if last else ''} | {' / '.join(x.strip()[:150] for x in first_fail)}", flush=True)
    return 0 if failed == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="bugs: " + "; ".join(f"{i}: {b[0]}" for i, b in enumerate(BUGS)))
    ap.add_argument("--bugs", default=None, help="comma-separated numbers of the bugs to try "
                    "(default: all; numbers below)")
    ap.add_argument("--check", action="store_true",
                    help="only check that every bug's line is still in the code; run nothing")
    a = ap.parse_args(argv)
    bugs = BUGS
    if a.bugs is not None:
        picked = [x.strip() for x in a.bugs.split(",") if x.strip()]
        if not picked or not all(x.isdigit() and int(x) < len(BUGS) for x in picked):
            ap.error(f"--bugs takes numbers 0..{len(BUGS) - 1}, comma-separated, not {a.bugs!r}")
        bugs = [BUGS[int(x)] for x in picked]
    if a.check:
        gone = stale(REPO, bugs)
        for name in gone:
            print(f"stale: {name}")
        print(f"{len(bugs) - len(gone)} of {len(bugs)} patterns match the code")
        return 1 if gone else 0
    with tempfile.TemporaryDirectory(prefix="deliberate-bugs-") as tmp:
        _copy_repo(Path(tmp))
        return run(Path(tmp), bugs)


if __name__ == "__main__":
    sys.exit(main())
