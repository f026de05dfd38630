"""``python -m convert SRC DST``: build a hobbit model directory from an MoE checkpoint."""

from __future__ import annotations

import argparse
import sys
import time

from . import ConversionError, StoreError, UnsupportedModelError, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an MoE checkpoint (mlx-lm, Hugging Face, or a hub repo id) into a "
                    "hobbit model: dense weights plus a 4-bit/2-bit expert store.")
    parser.add_argument("src", help="local model directory or hub repo id")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--bits", type=int, default=4, help="high-precision expert bits (default 4)")
    parser.add_argument("--low-bits", type=int, default=2, help="low-precision expert bits (default 2)")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    parser.add_argument("--copy", action="store_true",
                        help="write a page-aligned copy of the 4-bit experts and dense weights even "
                             "when the source is an mlx-lm quantized checkpoint (by default the "
                             "store reads those in place, so the source must stay)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.dst, bits=args.bits, low_bits=args.low_bits,
                      group_size=args.group_size, force=args.force, progress=not args.quiet,
                      copy=args.copy)
    except (ConversionError, StoreError, UnsupportedModelError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[convert] wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
