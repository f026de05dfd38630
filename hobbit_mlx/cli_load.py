"""Loading the model the flags name, with one-line errors.

Its own module because loading needs the flags (``cli_flags.load_options``) while the flags'
checks need ``cli_common.CLIError``: here the arrows run one way. Joining a pipeline, checking
the model path before the work, ``hobbit_mlx.load`` with conversion progress on stderr, and any
failure to load turned into a ``CLIError`` naming what failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .budget import BudgetError
from .cli_common import CLIError
from .cli_flags import load_options


def join_pipeline(args: argparse.Namespace) -> None:
    """With ``--pipeline``, join the group mlx.launch started, as early as possible (the ranks'
    start-up times then differ least; see ``pipeline.join.INIT_STAGGER_S``)."""
    if getattr(args, "pipeline", False):
        from .pipeline import join

        if not args.pipeline_timeout > 0:
            raise CLIError(f"--pipeline-timeout must be above 0 seconds, not "
                           f"{args.pipeline_timeout}")
        join.LOAD_TIMEOUT_S = args.pipeline_timeout  # (the watchdog while the ranks load)
        args.pipeline_group = join.init_group()
        if args.pipeline_group.size() < 2:
            raise CLIError("--pipeline needs at least 2 ranks: start every rank with mlx.launch "
                           "(e.g. mlx.launch -n 2 --backend ring --python $(which python) ...)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~")) or name.endswith("/") or name.count("/") > 1
            or name in (".", "..") or os.sep != "/" and os.sep in name)


def _check_model_path(model: str | None) -> None:
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model) or "/" not in model:
            raise CLIError(f"model directory not found: {model}")
        return  # "org/name": a hub repo id, converted by load
    if not path.is_dir():
        raise CLIError(f"{model} is not a directory (--model takes a model directory)")
    from .store import STORE_DIR, is_hobbit_model

    try:
        incomplete = (path / STORE_DIR).is_dir() and not is_hobbit_model(path)
    except PermissionError as e:  # (pathlib raises on EACCES where the file may exist)
        raise CLIError(f"{e.filename}: permission denied") from None
    if incomplete:
        raise CLIError(f"{path / STORE_DIR}: the expert store has no manifest; the converted "
                       f"model is incomplete or corrupt (reconvert it)")


def load_model(args: argparse.Namespace):
    """``hobbit_mlx.load`` with the parsed flags; returns (model, tokenizer, load seconds).

    Conversion progress goes to stderr so that stdout carries only the generated text. Any failure
    to load is bad input and becomes a CLIError, or stays the BudgetError it is (either: one
    line, exit status 2).
    """
    from . import load

    _check_model_path(args.model)
    tokenizer_config = {"trust_remote_code": True} if args.trust_remote_code else {}
    if getattr(args, "chat_template", None):  # the server's --chat-template
        tokenizer_config["chat_template"] = args.chat_template
    tokenizer_config = tokenizer_config or None
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model, tokenizer = load(args.model, options=load_options(args),
                                    tokenizer_config=tokenizer_config,
                                    progress=not getattr(args, "quiet_report", False))
    except (KeyboardInterrupt, CLIError, BudgetError):  # (a BudgetError is one line too; the
        raise                                            # benchmark goes on to the next budget)
    except Exception as e:  # corrupt files, unsupported models, conversion failures...
        if os.environ.get("HOBBIT_MLX_DEBUG"):
            traceback.print_exc()
        raise CLIError(_describe_load_error(args.model, e)) from None
    for tok in getattr(args, "extra_eos_token", ()) or ():
        try:
            tokenizer.add_eos_token(tok)
        except (ValueError, KeyError) as e:
            raise CLIError(f"--extra-eos-token {tok!r}: {e}") from None
    return model, tokenizer, time.perf_counter() - t0


def _describe_load_error(model: str | None, e: BaseException) -> str:
    from .architectures import UnsupportedModelError
    from .pipeline import PipelineError
    from .speculative import DraftModelError
    from .store import StoreError

    what = model if model is not None else "the bundled reference model"
    if isinstance(e, json.JSONDecodeError):
        return f"cannot load {what}: a JSON file (config.json?) is not valid JSON ({e})"
    known = (StoreError, UnsupportedModelError, OSError, DraftModelError)
    try:
        from convert import ConversionError

        known = known + (ConversionError,)
    except ImportError:
        pass
    if isinstance(e, known):
        return str(e)
    if isinstance(e, (PipelineError, ValueError)):  # (it names the rank; a refusal says why)
        return f"cannot load {what}: {e}"
    return f"cannot load {what}: {type(e).__name__}: {e}"
