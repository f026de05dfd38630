"""Prefill a long prompt once under the memory budget and save its KV cache to a file.

    python -m hobbit_mlx.cache_prompt --model PATH --prompt "$(cat report.txt)" \\
        --prompt-cache-file report.safetensors --memory-budget 6GB
    python -m hobbit_mlx.generate --prompt-cache-file report.safetensors \\
        --prompt "Summarize the report above." --memory-budget 6GB

Under offloading a prompt's prefill is the dear part: each chunk reads the experts its tokens
route to. A document asked about many times is read once. The file is mlx-lm's
(``mlx_lm.cache_prompt``'s format, ``save_prompt_cache`` with the model and tokenizer settings
in its metadata), so either tool reads what the other wrote. As in mlx-lm, with a chat template
the prompt is a user message left open, and ``generate`` appends its prompt to that message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import cli_common as cli, cli_flags, cli_load, cli_report
from .budget import format_size

SUFFIX = ".safetensors"  # (mx.load reads the format from the name)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.cache_prompt",
        description="Prefill a prompt once under the memory budget and save its KV cache for "
                    "python -m hobbit_mlx.generate --prompt-cache-file (or mlx-lm's).")
    parser.add_argument("--prompt", "-p", required=True,
                        help="The text to prefill ('-' reads from stdin).")
    parser.add_argument("--prompt-cache-file", required=True, metavar="FILE",
                        help=f"Where to save the cache (a {SUFFIX} file).")
    cli_flags.add_model_args(parser)
    g = parser.add_argument_group("cache")
    g.add_argument("--max-kv-size", type=int, default=None,
                   help="A rotating KV cache of this many tokens (mlx-lm's): the file keeps the "
                        "prompt's last tokens only.")
    g.add_argument("--extra-eos-token", type=str, default=(), nargs="+",
                   help="Tokens that end a reply besides the model's: saved in the file, so "
                        "that generate stops at them too (the first also for mlx-lm's).")
    cli_flags.add_template_args(parser)
    cli_flags.add_report_args(parser)
    return parser


def cache_file(path: str) -> Path:
    """``--prompt-cache-file``: a ``.safetensors`` name (else mlx-lm and mlx cannot read it)."""
    p = Path(path).expanduser()
    if p.suffix != SUFFIX:
        raise cli.CLIError(f"--prompt-cache-file {path}: the name must end in {SUFFIX} (mlx "
                           "reads the file's format from its name)")
    if p.is_dir() or not p.parent.is_dir():
        raise cli.CLIError(f"--prompt-cache-file {path}: " + (
            "is a directory; name a file" if p.is_dir() else f"no directory {p.parent}"))
    return p


def build_prompt(args: argparse.Namespace, tokenizer) -> list[int]:
    """The prompt's tokens: as mlx-lm's ``cache_prompt``, with a chat template a user message
    left open for the question that ``generate`` appends."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    text = cli.clean_text(text)
    if args.use_default_chat_template:
        cli.use_default_template(tokenizer)
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        tokens = tokenizer.encode(text)
    else:
        messages = [{"role": "system", "content": args.system_prompt}] \
            if args.system_prompt is not None else []
        messages.append({"role": "user", "content": text})
        try:
            tokens = tokenizer.apply_chat_template(
                messages, add_generation_prompt=False, continue_final_message=True,
                **args.chat_template_kwargs)
        except Exception as e:  # a template error is bad input (e.g. a role it refuses)
            raise cli.CLIError(f"the chat template failed: {type(e).__name__}: {e}") from None
    if len(tokens) == 0:
        raise cli.CLIError("the prompt is empty after tokenization")
    return list(tokens)


def save(path: Path, cache, metadata: dict[str, str]) -> None:
    """mlx-lm's ``save_prompt_cache`` into a temporary file beside ``path``, then renamed: an
    interrupted save leaves the old file (or none), never half of one."""
    from mlx_lm.models.cache import save_prompt_cache

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=SUFFIX, dir=path.parent)
    except OSError as e:
        raise cli.CLIError(f"cannot write in {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    try:
        save_prompt_cache(tmp, cache, metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # (mkstemp's file is the owner's only)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise cli.CLIError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def read(args: argparse.Namespace):
    """``generate --prompt-cache-file``: the saved cache, checked against the flags before the
    model loads (as mlx-lm's generate checks them). A quantized cache sets the KV quantization
    the budget plans for; the model defaults to the one the file names."""
    from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache

    path = Path(args.prompt_cache_file).expanduser()
    if getattr(args, "pipeline", False):
        raise cli.CLIError("--prompt-cache-file does not run with --pipeline (the file holds "
                           "every layer's keys and values)")
    if args.max_kv_size is not None:
        raise cli.CLIError("--max-kv-size with --prompt-cache-file: the file's cache is used as "
                           "it was saved (python -m hobbit_mlx.cache_prompt --max-kv-size)")
    if args.system_prompt is not None:
        raise cli.CLIError("--system-prompt with --prompt-cache-file: the saved prompt comes "
                           "first, so a system prompt belongs there (python -m "
                           "hobbit_mlx.cache_prompt --system-prompt)")
    if not path.is_file():
        raise cli.CLIError(f"--prompt-cache-file {path}: no such file")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:  # not a safetensors file, or not a prompt cache
        raise cli.CLIError(f"--prompt-cache-file {path} is not a prompt cache saved by "
                           f"cache_prompt ({type(e).__name__}: {e})") from None
    quantized = [c for c in cache if isinstance(c, QuantizedKVCache)]
    if quantized:
        bits, group = quantized[0].bits, quantized[0].group_size
        if args.kv_bits not in (None, bits) or (args.kv_bits is not None
                                                and args.kv_group_size != group):
            raise cli.CLIError(f"--kv-bits {args.kv_bits} --kv-group-size {args.kv_group_size} "
                               f"do not match the cache in {path} ({bits}-bit, groups of {group})")
        args.kv_bits, args.kv_group_size = bits, group
    try:  # the reply's end tokens saved with it (ours, and mlx-lm's --eos-token)
        eos = [json.loads(metadata.get("tokenizer_config") or "{}").get("eos_token")]
        eos += json.loads(metadata.get("extra_eos_tokens") or "[]")
    except (ValueError, AttributeError):
        raise cli.CLIError(f"--prompt-cache-file {path}: its metadata is not valid") from None
    args.extra_eos_token = list(dict.fromkeys([*args.extra_eos_token, *filter(None, eos)]))
    named = metadata.get("model") or None
    if args.model is None:
        args.model = named
    elif named is not None and not _same_model(args.model, named):
        raise cli.CLIError(f"--model {args.model} is not the model the prompt cache in {path} "
                           f"was made with ({named})")
    return cache


def _same_model(a: str, b: str) -> bool:
    return a == b or _weights_of(a) == _weights_of(b)


def _weights_of(name: str) -> tuple[str, str]:
    """What decides a prompt cache's keys and values: the checkpoint a model was converted from
    (a hobbit model directory names it in its manifest) and the adapter fused into it. A file
    made against a checkpoint then fits its conversion (``convert --copy``), and the other way
    round; one made against a fused conversion fits that conversion only."""
    from .conversion_cache import model_origin
    from .store import is_hobbit_model

    path = Path(name).expanduser()
    if not path.exists():
        return name, ""  # (a hub id)
    source, adapter = model_origin(path) if is_hobbit_model(path) else ("", "")
    if not source:
        return str(path.resolve()), adapter
    local = Path(source).expanduser()
    return (str(local.resolve()) if local.exists() else source), adapter


def misfit(path: str, error: Exception) -> str:
    """A cache whose keys and values the model's attention cannot take (another model of the
    same name and layer count): said, where mlx-lm ends in a traceback."""
    return (f"the prompt cache in {path} does not fit this model: its keys and values have "
            f"other shapes than this model's attention ({' '.join(str(error).split())}); make "
            "it again with python -m hobbit_mlx.cache_prompt")


def check_layers(cache, model, path: str) -> None:
    """A cache of another model's layer count (a model of the same name changed since)."""
    from mlx_lm.models.cache import make_prompt_cache

    want = len(make_prompt_cache(model))
    if len(cache) != want:
        raise cli.CLIError(f"the prompt cache in {path} has {len(cache)} layers; this model "
                           f"has {want}")


def main(argv: Sequence[str] | None = None) -> int:
    import hobbit_mlx
    from mlx_lm.models.cache import make_prompt_cache

    from .loader import REFERENCE_MODEL

    args = setup_arg_parser().parse_args(argv)
    if args.pipeline:
        raise cli.CLIError("--pipeline: a prompt cache file holds every layer's keys and "
                           "values, and a pipeline rank holds its own layers' only")
    cli_flags.check_args(args)
    path = cache_file(args.prompt_cache_file)
    model, tokenizer, load_s = cli_load.load_model(args)
    tokens = build_prompt(args, tokenizer)
    cache = make_prompt_cache(model, args.max_kv_size)

    start = time.perf_counter()
    width = 0

    def progress(done: int, total: int) -> None:
        nonlocal width
        line = f"\rProcessed {done:6d} of {total} tokens ({done / (time.perf_counter() - start):.2f} tok/s)"
        width = max(width, len(line))
        print(line.ljust(width), end="", file=sys.stderr, flush=True)

    hobbit_mlx.reset_stats(model)
    shown = not args.quiet_report and sys.stderr.isatty()  # (a log gets no carriage returns)
    for _ in hobbit_mlx.stream_generate(model, tokenizer, tokens, max_tokens=0, prompt_cache=cache,
                                        prompt_progress_callback=progress if shown else None):
        pass
    seconds = time.perf_counter() - start
    if shown:
        print(file=sys.stderr)
    tokenizer_config = {"trust_remote_code": True} if args.trust_remote_code else {}
    eos = list(args.extra_eos_token)
    if eos:
        tokenizer_config["eos_token"] = eos[0]  # (what mlx-lm's cache_prompt --eos-token saves)
    local = Path(args.model).expanduser() if args.model else REFERENCE_MODEL
    save(path, cache, {"model": str(local.resolve()) if local.exists() else args.model,
                       "tokenizer_config": json.dumps(tokenizer_config),
                       "extra_eos_tokens": json.dumps(eos), "prompt_tokens": str(len(tokens))})
    if not args.quiet_report:
        stats = cli_report.run_stats(model, None, seconds, load_s)
        stats.update(prompt_tokens=len(tokens), prompt_tps=len(tokens) / seconds)
        lines = [cli_report.SEPARATOR] + [line for line in cli_report.format_report(stats)
                                   if not line.startswith("Generation:")]  # (none here)
        print("\n".join(lines), file=sys.stderr)
        print(f"Saved {len(tokens)} prompt tokens to {path} "
              f"({format_size(path.stat().st_size)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
