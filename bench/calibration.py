#!/usr/bin/env python3
"""What calibrating the low copies buys: decode quality on the same held-out tokens with the
fitted 2-bit copies and with the same copies quantized again by ``convert.calibrate``.

    python bench/calibration.py [--model SRC] [--text FILE ...] [--calibration-tokens 16384]
        [--residencies 0.5,0.25] [--tokens 256] [--pieces 4] [--prompt-tokens 64]
        [--configs default] [--config NAME=JSON ...] [--work DIR] [--out bench/results]
        [--name NAME]

The source is converted once (fitted copies, into ``--work``), copied, and the copy calibrated
on ``--text`` (default for the reference model: its dev files, read from this Python's standard
library, none of them among the held-out files scored here; else ``convert.calibrate``'s own
default). ``bench/forced_decode.py`` then decodes the same held-out tokens on both under mac-like
storage: KL divergence from mlx-lm, perplexity, top-1 agreement, bytes per token, side by side.
The extra configuration ``mixed-only`` (skip off: every unimportant miss read in 2-bit) shows
the 2-bit copies' own share. Exact configurations read no low copy and are left out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments, forced_decode  # noqa: E402
from bench.workload import REFERENCE_MODEL, RESULTS  # noqa: E402

DEV_FILES = Path(__file__).resolve().parents[1] / "reference" / "dev_files.txt"


def reference_dev_texts() -> list[str]:
    """The reference model's dev files, from this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / rel).read_text(encoding="utf-8", errors="replace")
             for rel in DEV_FILES.read_text().split() if (root / rel).is_file()]
    if not texts:
        raise ValueError(f"none of {DEV_FILES}'s files is under {root}: pass --text")
    return texts


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, type=arguments.model_dir,
                    help="an mlx-lm checkpoint (default: the bundled reference model)")
    ap.add_argument("--text", action="append", default=None, help="calibration text files")
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--residencies", default="0.5,0.25", type=arguments.residencies)
    ap.add_argument("--configs", default="default")
    ap.add_argument("--config", action="append", default=['mixed-only={"skip": false}'],
                    help="NAME=JSON: an extra configuration, as forced_decode.py takes it")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--work", default=None, help="where the two models go (kept)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    for flag, value in (("--tokens", args.tokens), ("--prompt-tokens", args.prompt_tokens),
                        ("--pieces", args.pieces), ("--calibration-tokens",
                                                    args.calibration_tokens)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, not {value}")
    out_dir = arguments.out_dir(ap, args.out)
    src = Path(args.model or REFERENCE_MODEL).expanduser()
    reference = src.resolve() == REFERENCE_MODEL.resolve()
    name = args.name or f"calibration-{'reference' if reference else src.name}"
    if args.text:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text]
        told = ", ".join(args.text)
    else:
        texts = reference_dev_texts() if reference else None
        told = f"the reference's dev files ({DEV_FILES.name})" if reference else \
            "convert.calibrate's default (the standard library)"

    from convert import convert
    from convert.calibrate import calibrate

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="calibration-"))
    fitted, calibrated = work / "fitted", work / "calibrated"
    convert(src, fitted, force=True, progress=False)
    shutil.rmtree(calibrated, ignore_errors=True)
    shutil.copytree(fitted, calibrated, symlinks=True)
    t0 = time.perf_counter()
    done = calibrate(calibrated, texts=texts, tokens=args.calibration_tokens, progress=False)
    seconds = time.perf_counter() - t0
    results = forced_decode.decode_models({"fitted": fitted, "calibrated": calibrated}, args,
                                          out_dir, name)
    lines = [f"# The low copies fitted, then calibrated: {name}", "",
             f"Command: `{arguments.command(__file__, argv)}`", "",
             f"Calibrated on {done['tokens']} tokens of {told} in {seconds:.0f} s on this "
             f"machine ({done['experts_seen']} of {done['experts']} experts saw some). "
             f"Teacher-forced decode, mac-like storage, {args.pieces} held-out pieces x "
             f"{args.tokens} tokens (`{name}-fitted.md`, `{name}-calibrated.md`):", "",
             *forced_decode.side_by_side(results, "fitted", "calibrated")]
    text = "\n".join(lines) + "\n"
    tmp = out_dir / f"{name}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / f"{name}.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
