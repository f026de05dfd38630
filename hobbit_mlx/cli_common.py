"""What the command-line tools (``python -m hobbit_mlx.generate``, ``.chat``, ...) share.

Running a main with one-line errors: bad input (a missing model directory, a corrupt store, a
budget that is too small, a size that cannot be read) ends the program with one ``error: ...``
line on stderr and exit status 2. Also mlx-lm's sampler and logits processors built from the
flags, the prompt's text and result files. The flags and their checks are in ``cli_flags``,
loading in ``cli_load``, the report in ``cli_report``; those import ``CLIError`` from here, and
this module imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .budget import BudgetError

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad input found by the command line tools; printed as one ``error:`` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose own errors (a flag it does not know, ``--temp abc``, a missing
    argument) are one ``error:`` line and exit status 2 as all other bad input is, where argparse
    prints its whole usage block first; ``--help`` prints it. Run as an installed command
    (``hobbit_mlx.generate``), its usage names that command rather than ``python -m ...``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        command = Path(sys.argv[0]).name
        if command.startswith("hobbit_mlx."):
            self.prog = command

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def make_sampler(args: argparse.Namespace, tokenizer):
    from mlx_lm.sample_utils import make_sampler as _make_sampler

    return _make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids))


def make_logits_processors(args: argparse.Namespace):
    from mlx_lm.sample_utils import make_logits_processors as _make

    from .layer_major import looking_back

    return looking_back(_make(repetition_penalty=args.repetition_penalty,
                              repetition_context_size=args.repetition_context_size),
                        args.repetition_context_size)


def seed(args: argparse.Namespace) -> None:
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)


def use_default_template(tokenizer) -> None:
    """mlx-lm's ``--use-default-chat-template``: the tokenizer's default when it has none."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    if getattr(tok, "chat_template", None) is None:
        default = getattr(tok, "default_chat_template", None)
        if default is not None:
            tok.chat_template = default
            with contextlib.suppress(AttributeError):
                tokenizer.has_chat_template = True


# ---------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------


def error_line(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"error: {text}", file=sys.stderr, flush=True)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and turn bad input into one ``error:`` line with exit status 2. A pipeline
    rank ends here, its output flushed, without the interpreter's teardown
    (``pipeline.join.JOINED``)."""
    from .pipeline import join

    try:
        code = _run(main, argv)
    except BaseException:
        if not join.JOINED:
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if join.JOINED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code if isinstance(code, int) else 1)
    return code


def _run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    from .pipeline import PipelineError
    from .store import StoreError

    # a warning is one line, as an error is (not the file, line and source of its warn call)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        return main(argv)
    except (CLIError, StoreError, BudgetError, PipelineError) as e:
        # bad input; a checksum mismatch, a context beyond the budget; ranks that disagree
        # (stores, split) or one that failed to load
        _pipeline_error_line(str(e))
        return EXIT_BAD_INPUT
    except RuntimeError as e:
        if "[ring]" not in str(e) and "[distributed]" not in str(e):
            raise
        error_line(f"lost the connection to another pipeline rank ({e}); did a rank exit?")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return stdout_closed()
    except OSError as e:  # a full disk or a failing device under the output (> /dev/full)
        if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
        error_line(f"cannot write {e.filename or 'the output'}: {e.strerror}")
        if e.filename is None:
            stdout_closed()  # (what is left to flush goes nowhere, not into a second error)
        return 1


def _pipeline_error_line(message: str) -> None:
    """``error_line``; a pipeline rank that failed before the ranks agreed on the model first
    tells the others, which wait for it there (they then say "rank N failed to load")."""
    from .pipeline import fail_start

    rank = fail_start(" ".join(message.split()))
    error_line(message if rank is None else f"rank {rank}: {message}")


def stdout_closed() -> int:
    """Exit status 0 for output piped into ``head``: what is left to flush goes nowhere (else
    Python's flush at exit reports the closed pipe once more)."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# ---------------------------------------------------------------------------------------------
# Prompt text
# ---------------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Text the tokenizer takes: bytes that are not UTF-8 (a terminal, a pipe or argv give them
    to Python as lone surrogates, and the tokenizer failed on them) become U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # (a surrogate that does not stand for a byte)
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file in the same directory + os.replace."""
    path = Path(path).expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def check_writable_file(path: str | Path | None, flag: str) -> None:
    """Refuse before the work a result file that cannot be written where it is named (an
    existing directory, say), rather than after it."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; name a file")
    above = next((p for p in path.parents if p.exists()), None)  # (missing ones are made)
    if above is not None and not above.is_dir():
        raise CLIError(f"{flag} {path}: {above} is a file, not a directory")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
