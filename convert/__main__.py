"""``python -m convert SRC DST``: build a hobbit model directory from an MoE checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import time

from hobbit_mlx.cli_common import Parser
from hobbit_mlx.store import LOW_ROUNDINGS

from . import ConversionError, StoreError, UnsupportedModelError, convert, interrupt_handler

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + the signal's number (SIGINT); SIGTERM: 143


def _os_error(e: OSError, src: str, dst: str) -> str:
    """One line for an OSError: what could not be read or written, and why."""
    reason = e.strerror or str(e) or type(e).__name__
    name = e.filename
    if name is not None:
        real = os.path.realpath(os.path.expanduser(str(name)))
        source = os.path.realpath(os.path.expanduser(src))
        if os.path.exists(source) and (real == source or real.startswith(source.rstrip(os.sep) + os.sep)):
            return f"cannot read {name}: {reason}"
        if os.path.basename(str(name)) != os.path.basename(dst.rstrip(os.sep)):
            reason = f"{reason} ({name})"
    return f"cannot write {dst}: {reason}"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m convert",
        description="Convert an MoE checkpoint (mlx-lm, Hugging Face, or a hub repo id) into a "
                    "hobbit model: dense weights plus a high- and low-precision (by default "
                    "4-bit/2-bit) expert store.")
    parser.add_argument("src", help="local model directory or hub repo id")
    parser.add_argument("dst", help="output directory (written atomically; not SRC, nor a "
                                    "directory that holds SRC)")
    parser.add_argument("--bits", type=int, default=None,
                        help="high-precision expert bits: a float source's (default 4), which are "
                             "also the width of its dense weights (attention, embeddings, "
                             "lm_head), as mlx_lm.convert's --q-bits; an mlx-lm quantized source "
                             "keeps its own width, which is the only one accepted, and its dense "
                             "weights as they are")
    parser.add_argument("--low-bits", type=int, default=None,
                        help="low-precision expert bits, below --bits (default 2)")
    parser.add_argument("--low-rounding", choices=LOW_ROUNDINGS, default=LOW_ROUNDINGS[0],
                        help="the low-precision copies' groups: 'fitted' (default; scale and bias "
                             "fitted by least squares, a third less error at 2 bits) or "
                             "'nearest' (mx.quantize's grid from each group's minimum and maximum)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="quantization group size (default 64; 32, 64 or 128)")
    parser.add_argument("--copy", action="store_true",
                        help="write a page-aligned copy of the high-precision experts and dense weights even "
                             "when the source is an mlx-lm quantized checkpoint (by default the "
                             "store reads those in place, so the source must stay)")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it is a converted hobbit model, an empty directory "
                             "or a file (never a directory of other files)")
    parser.add_argument("--adapter-path", default=None,
                        help="adapters mlx_lm.lora trained for SRC (a directory with "
                             "adapter_config.json and adapters.safetensors), fused into the "
                             "converted model as mlx_lm.fuse fuses them, without loading the "
                             "whole model")
    parser.add_argument("--calibrate", action="store_true",
                        help="then quantize the 2-bit copies again against the inputs the "
                             "experts see on some text (python -m convert.calibrate DST: less "
                             "error where it counts, same bytes)")
    parser.add_argument("--calibration-text", action="append", default=[], metavar="FILE",
                        help="with --calibrate: its text (repeatable; default: Python's "
                             "standard library sources)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.calibration_text and not args.calibrate:
        parser.error("--calibration-text goes with --calibrate")
    t0 = time.perf_counter()
    # SIGTERM (kill, timeout, systemd) interrupts as Ctrl-C does: the layers done are kept
    handlers = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, interrupt_handler)
    except ValueError:  # (not the main thread: signals are not ours to handle)
        pass
    try:
        out = convert(args.src, args.dst, bits=args.bits, low_bits=args.low_bits,
                      group_size=args.group_size, force=args.force, progress=not args.quiet,
                      copy=args.copy, adapter_path=args.adapter_path,
                      low_rounding=args.low_rounding)
    except (ConversionError, StoreError, UnsupportedModelError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # convert() kept its finished layers, or removed them
        term = str(e) == "SIGTERM"
        outcome = ("" if getattr(e, "kept_partial", None) is not None
                   else "; nothing was written")
        print(f"interrupted{' (SIGTERM)' if term else ''}{outcome}", file=sys.stderr)
        return 128 + int(signal.SIGTERM) if term else EXIT_INTERRUPTED
    except OSError as e:
        if isinstance(e, FileExistsError) and e.errno is None:  # DST exists, no --force
            print(f"error: {e}", file=sys.stderr)
        else:
            print(f"error: {_os_error(e, args.src, args.dst)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    print(f"[convert] wrote {out} in {time.perf_counter() - t0:.1f}s")
    if args.calibrate:
        from .calibrate import main as calibrate

        return calibrate([str(out), *(a for f in args.calibration_text for a in ("--text", f)),
                          *(["--quiet"] if args.quiet else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
