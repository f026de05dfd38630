"""The deliberate bugs of issue 15's audit, each put into a scratch copy of the repository in
turn, with the tests that must catch it (not run by CI). Prints one table row per bug:

    nice python bench/deliberate_bugs.py
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation import _copy_repo  # noqa: E402

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
  "        return kv_bytes_for(tokens, self.kv_bytes_per_token, self.kv_layer_bytes_per_token)\n",
  "        return 0\n",
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


def main(root: Path) -> None:
    for name, rel, old, new, tests in BUGS:
        path = root / rel
        src = path.read_text()
        assert src.count(old) == 1, (name, old)
        path.write_text(src.replace(old, new))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                             cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
        path.write_text(src)
        last = [l for l in run.stdout.splitlines() if l.strip()][-1:]
        first_fail = [l for l in run.stdout.splitlines() if l.startswith("FAILED") or l.startswith("E  ")][:2]
        print(f"| {name} | {'caught' if run.returncode == 1 else 'NOT caught (rc %d)' % run.returncode} | "
              f"{', '.join(tests)} | {last[0] if last else ''} | {' / '.join(x.strip()[:150] for x in first_fail)}", flush=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="deliberate-bugs-") as tmp:
        _copy_repo(Path(tmp))
        main(Path(tmp))
