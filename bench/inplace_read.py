#!/usr/bin/env python3
"""Read throughput of a store read in place (by reference) against its page-aligned copy.

    python bench/inplace_read.py [--model MLX_CHECKPOINT] [--passes 3] [--workers 1,8]
        [--out bench/results/inplace-read]

Converts one mlx-lm 4-bit checkpoint twice (``convert`` by reference, and ``--copy``) under
``bench/results/tmp/inplace/`` (``$HOBBIT_BENCH_TMP/inplace/`` when that is set) and reads every 4-bit expert record of each store into pool
slots, the records in one shuffled order, with ``RecordReader.read_into`` (the runtime's read):
*cold* after asking the OS to drop the files' cached pages (``posix_fadvise(DONTNEED)``), *warm*
right after. A record by reference is one span per stacked tensor of the source (9 for a
SwiGLU expert), read with its spans one after another, sent at once, and as the reader's own
trial of the first slow reads decides (``parallel_runs="auto"``, the runtime's default); a copied record is one page-aligned span. Also reports each store's
growth on disk. Default model: the synthetic model of ``make_synthetic.py`` when it was built, else the
bundled reference model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench.workload import RESULTS, TMP  # noqa: E402


def disk_bytes(root: Path) -> int:
    """Allocated bytes under ``root`` as ``du`` counts them (a link counts as a link)."""
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def read_pass(model_dir: Path, workers: int, cold: bool, order_seed: int = 0,
              parallel_runs: bool | str = False) -> dict:
    """Read every high record once (shuffled) into per-thread slots; bytes, seconds, reads.
    ``parallel_runs``: a record's spans go out at once (True), in turn (False), or as the
    reader's first slow reads measure faster ("auto", the runtime's default)."""
    from hobbit_mlx.pool_plan import make_pools
    from hobbit_mlx.reader import RecordReader
    from hobbit_mlx.store import load_manifest

    manifest = load_manifest(model_dir)
    reader = RecordReader(model_dir, manifest, workers=workers, verify="never",
                          parallel_runs=parallel_runs)
    groups = make_pools(manifest, ("high",), None)
    for g in groups:
        g.pool.allocate(workers)
    pool_of = {lid: g.pool for g in groups for lid in g.layers}
    jobs = [(l, e) for l in manifest.layers for e in range(l.num_experts)]
    random.Random(order_seed).shuffle(jobs)
    if cold:
        reader.drop_page_cache()  # (main refused to start where it cannot)
    local, counter, lock = threading.local(), [0], threading.Lock()

    def one(job) -> int:
        if not hasattr(local, "slot"):
            with lock:
                local.slot, counter[0] = counter[0], counter[0] + 1
        layer, e = job
        return reader.read_into(layer.precisions["high"], e, pool_of[layer.layer], local.slot)

    t0 = time.perf_counter()
    if workers == 1:
        nbytes = sum(one(j) for j in jobs)
    else:
        with ThreadPoolExecutor(workers) as ex:
            nbytes = sum(ex.map(one, jobs))
    seconds = time.perf_counter() - t0
    chosen = reader.run_mode_trial.choice
    reader.close()
    spans = sum(len(l.precisions["high"].records[0].spans) for l in manifest.layers) / len(manifest.layers)
    return {"bytes": nbytes, "seconds": seconds, "reads": len(jobs), "spans_per_record": spans,
            "auto_chose": None if chosen is None else ("at once" if chosen else "in turn"),
            "mb_per_s": nbytes / seconds / 1e6, "reads_per_s": len(jobs) / seconds}


def default_model() -> Path:
    synthetic = TMP / "synthetic" / "mlx"
    if (synthetic / "config.json").is_file():
        return synthetic
    from hobbit_mlx.loader import REFERENCE_MODEL
    return REFERENCE_MODEL


@arguments.refuse_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=arguments.model_dir, default=None,
                        help="an mlx-lm quantized checkpoint")
    parser.add_argument("--passes", type=int, default=3, help="cold and warm passes each (median)")
    parser.add_argument("--workers", default="1,8", help="reader threads, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS / "inplace-read",
                        help="results stem: writes OUT.md and OUT.json (default: "
                             "bench/results/inplace-read)")
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, not {args.passes}")
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        worker_counts = []
    if not worker_counts or min(worker_counts) < 1:
        parser.error(f"--workers takes thread counts of 1 or more, comma-separated, not {args.workers!r}")
    arguments.out_dir(parser, args.out, file=True)
    from convert import convert
    from hobbit_mlx.reader import can_drop_page_cache
    from hobbit_mlx.store import load_manifest

    if not can_drop_page_cache():
        parser.error("its cold passes drop the store's cached pages with posix_fadvise, which "
                     "this OS lacks (macOS: only `sudo purge` drops them, for the whole cache)")

    src = (Path(args.model).expanduser() if args.model else default_model()).resolve()
    stores = {}
    for mode in ("reference", "copy"):
        dst = TMP / "inplace" / f"{src.parent.name}-{src.name}-{mode}"
        convert(src, dst, force=True, progress=False, copy=mode == "copy")
        stores[mode] = dst
    low = load_manifest(stores["reference"]).expert_bytes("low")
    high = load_manifest(stores["copy"]).expert_bytes("high")
    from bench._path import REPO
    shown = src.relative_to(REPO) if src.is_relative_to(REPO) else src
    result = {"model": str(shown), "source_bytes": disk_bytes(src), "expert_bytes_high": high,
              "expert_bytes_low": low,
              "growth_bytes": {m: disk_bytes(d) for m, d in stores.items()}, "runs": []}
    variants = [("reference", False), ("reference", True), ("reference", "auto"), ("copy", False)]
    for workers in worker_counts:
        for mode, parallel in variants:
            dst = stores[mode]
            for temp in ("cold", "warm"):
                runs = []
                for i in range(args.passes):
                    if temp == "warm":
                        read_pass(dst, workers, cold=False, order_seed=100 + i)  # warm it
                    runs.append(read_pass(dst, workers, cold=temp == "cold", order_seed=i,
                                          parallel_runs=parallel))
                runs.sort(key=lambda r: r["mb_per_s"])
                med = runs[len(runs) // 2]
                spans = "auto: " + (med["auto_chose"] or "undecided") if parallel == "auto" else \
                    "at once" if parallel and med["spans_per_record"] > 1 else "in turn"
                row = dict(med, store=mode, temperature=temp, workers=workers, span_reads=spans,
                           mb_per_s_all=[round(r["mb_per_s"], 1) for r in runs])
                result["runs"].append(row)
                print(f"{mode:9s} {spans:17s} {temp} workers={workers}: {med['mb_per_s']:8.1f} MB/s "
                      f"{med['reads_per_s']:8.0f} reads/s ({med['spans_per_record']:.0f} spans/record)",
                      flush=True)
    write(result, args.out, argv)
    return 0


def write(result: dict, out: Path, argv) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = arguments.command(__file__, argv)
    lines = ["# Expert reads: by reference vs page-aligned copy", "",
             f"`{cmd.strip()}` — model `{result['model']}`, 4-bit experts "
             f"{result['expert_bytes_high'] / 2**20:.1f} MiB, 2-bit {result['expert_bytes_low'] / 2**20:.1f} MiB.",
             "", "Disk the conversion adds (allocated blocks):", "",
             "| store | bytes | × the 2-bit experts |", "|---|---|---|"]
    for mode, n in result["growth_bytes"].items():
        lines.append(f"| {mode} | {n / 2**20:.1f} MiB | {n / result['expert_bytes_low']:.3f} |")
    lines += ["", "Every 4-bit record read once, shuffled (median of the passes; all passes in brackets):", "",
              "| store | spans/record | spans read | page cache | workers | MB/s | reads/s |",
              "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['store']} | {r['spans_per_record']:.0f} | {r.get('span_reads', 'in turn')} | "
                     f"{r['temperature']} | {r['workers']} | "
                     f"{r['mb_per_s']:.0f} {r['mb_per_s_all']} | {r['reads_per_s']:.0f} |")
    for suffix, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps(result, indent=2))):
        path = out.with_suffix(suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
