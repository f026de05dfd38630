"""Perplexity under the memory budget: what a configuration's lossy techniques cost on your text.

    python -m hobbit_mlx.perplexity --model PATH --memory-budget 10GB --data-path notes.txt
    python -m hobbit_mlx.perplexity --model PATH --memory-budget 10GB --data-path notes.txt --exact

As ``mlx_lm.perplexity``, but each sequence is read the way a generation reads it: its first
tokens as a prompt, in chunks, the last ``--decode-tokens`` one at a time through the KV cache,
each step fed the text's next token. The lossy techniques act on both, but a decode step routes
one token and reads as a reply does, which a one-pass perplexity never runs; the two parts are
reported apart, with the expert report of ``generate`` (hits, misses, bytes read, peak memory
against the budget). ``--exact`` gives the model's own perplexity to compare with: equal to
mlx-lm's on the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cli_common as cli, cli_flags, cli_load, cli_report
from .architectures import vocab_size
from .budget import format_size


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.perplexity",
        description="Perplexity of a model under the memory budget, on a text file or dataset, "
                    "its prompt and decode steps reported apart.")
    parser.add_argument("--data-path", required=True,
                        help="A text file; a .jsonl file or a directory of mlx-lm's LoRA data "
                             "(test.jsonl, else valid.jsonl: 'text', 'messages' or "
                             "'prompt'/'completion' records); or a Hugging Face dataset "
                             "(mlx-lm's format, downloaded as mlx_lm.perplexity does).")
    parser.add_argument("--sequence-length", type=int, default=256,
                        help="Tokens per scored sequence (the text is cut into such pieces).")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="The last tokens of each sequence, decoded one at a time as a reply "
                             "is (default: 64, at most a quarter of the sequence); 0: every "
                             "token in prompt chunks.")
    parser.add_argument("--num-samples", type=int, default=16,
                        help="Sequences to score, from the start of the data (-1: all).")
    parser.add_argument("--seed", type=int, default=123,
                        help="Seed of the records drawn from a Hugging Face dataset (as "
                             "mlx_lm.perplexity's), so that two runs score the same text.")
    parser.add_argument("--json", action="store_true",
                        help="Print the results as one JSON object on stdout.")
    cli_flags.add_model_args(parser)
    cli_flags.add_report_args(parser)
    return parser


@dataclass
class Scores:
    """Log-likelihoods of the scored tokens, by where they were computed (an array per
    sequence), and the seconds each part took."""

    prompt: list[np.ndarray] = field(default_factory=list)
    decode: list[np.ndarray] = field(default_factory=list)
    prompt_s: float = 0.0
    decode_s: float = 0.0
    prompt_bytes: int = 0  # read from storage
    decode_bytes: int = 0

    def summary(self, part: str) -> dict:
        """Perplexity, its standard error (delta method, as mlx-lm's) and tokens per second."""
        lls = {"prompt": self.prompt, "decode": self.decode,
               "all": self.prompt + self.decode}[part]
        ll = np.concatenate(lls) if lls else np.zeros(0)
        if ll.size == 0:
            return {"tokens": 0, "perplexity": None, "standard_error": None,
                    "tokens_per_s": None}
        ppl = math.exp(-float(ll.mean()))
        se = ppl * float(ll.std(ddof=1)) / math.sqrt(ll.size) if ll.size > 1 else None
        seconds = {"prompt": self.prompt_s, "decode": self.decode_s,
                   "all": self.prompt_s + self.decode_s}[part]
        return {"tokens": int(ll.size), "perplexity": ppl, "standard_error": se,
                "tokens_per_s": ll.size / seconds if seconds > 0 else 0.0}


def load_tokens(data_path: str, tokenizer, sequence_length: int, num_samples: int,
                seed: int = 123) -> np.ndarray:
    """The data as ``[sequences, sequence_length]`` tokens, in order (one document's pieces
    follow each other; a last piece shorter than a sequence is dropped)."""
    path = Path(data_path).expanduser()
    want = sequence_length * num_samples if num_samples > 0 else None
    if path.is_dir():
        found = [path / n for n in ("test.jsonl", "valid.jsonl") if (path / n).is_file()]
        if not found:
            raise cli.CLIError(f"--data-path {data_path}: a directory of mlx-lm data needs "
                               "test.jsonl or valid.jsonl")
        path = found[0]
    if path.is_file():
        tokens = (_jsonl_tokens(path, tokenizer, want) if path.suffix == ".jsonl"
                  else text_tokens(path, tokenizer, want))
    elif data_path.count("/") == 1 and not data_path.startswith((".", "/", "~")) and \
            not path.suffix:  # ("org/name": a dataset; "notes/a.txt": a file not there)
        tokens = _hub_tokens(data_path, tokenizer, sequence_length, num_samples, seed)
    else:
        raise cli.CLIError(f"--data-path {data_path}: no such file or directory")
    count = len(tokens) // sequence_length
    if count == 0:
        raise cli.CLIError(f"--data-path {data_path}: {len(tokens)} token"
                           f"{'s' if len(tokens) != 1 else ''}, fewer than one --sequence-length "
                           f"({sequence_length})")
    if num_samples > 0:
        count = min(count, num_samples)
    return np.asarray(tokens[:count * sequence_length], dtype=np.int64).reshape(count, -1)


SPARE_TOKENS = 16


def text_tokens(path: Path, tokenizer, want: int | None, flag: str = "--data-path") -> list[int]:
    """The tokens of the file's start that ``want`` needs (None: the whole file): read and
    tokenized in growing pieces, so that a large file costs what is used. ``flag``: the option
    that named the file, for the error."""
    size = 1 << 16
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(size)
                whole = not f.read(1)
        except (OSError, UnicodeDecodeError) as e:
            raise cli.CLIError(f"{flag} {path}: cannot read it as UTF-8 text "
                               f"({e})") from None
        with _quiet_tokenizer():  # (longer than the model's context: cut into sequences)
            tokens = list(tokenizer.encode(text))
        if whole or want is None:
            if not whole:
                size = os.path.getsize(path)
                continue
            return tokens
        if len(tokens) > want + SPARE_TOKENS:  # (a piece's last word may be cut short)
            return tokens[:want]
        size *= 4


@contextlib.contextmanager
def _quiet_tokenizer():
    """Without transformers' warning that a text is longer than the model's context."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _jsonl_tokens(path: Path, tokenizer, want: int | None) -> list[int]:
    """Records in mlx-lm's LoRA formats, tokenized as mlx-lm's datasets tokenize them, one after
    another until ``want`` tokens."""
    from mlx_lm.tuner.datasets import create_dataset

    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise cli.CLIError(f"{path}:{number}: not a JSON record ({e})") from None
    if not records:
        raise cli.CLIError(f"--data-path {path}: no records")
    try:
        dataset = create_dataset(records, tokenizer, types.SimpleNamespace())
    except ValueError as e:
        raise cli.CLIError(f"{path}: {' '.join(str(e).split())} (records need 'text', "
                           "'messages', or 'prompt' and 'completion')") from None
    tokens: list[int] = []
    with _quiet_tokenizer():
        for i in range(len(dataset)):
            tokens.extend(dataset.process(dataset[i])[0])
            if want is not None and len(tokens) >= want:
                break
    return tokens


def _hub_tokens(name: str, tokenizer, sequence_length: int, num_samples: int,
                seed: int) -> list[int]:
    """Records of a Hugging Face dataset, drawn as ``mlx_lm.perplexity`` draws them (seeded)."""
    from mlx_lm.perplexity import load_data

    np.random.seed(seed)
    try:
        data = load_data(tokenizer, name, num_samples, sequence_length)
    except ModuleNotFoundError as e:
        raise cli.CLIError(f"--data-path {name}: a Hugging Face dataset needs the {e.name!r} "
                           f"package (pip install {e.name})") from None
    except Exception as e:  # noqa: BLE001 - (network, a missing dataset: one line)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise cli.CLIError(f"--data-path {name}: could not load the dataset ({first})") from None
    return np.asarray(data).reshape(-1).tolist()


def _row_bytes(rt) -> int:
    """A bound on a scored token's logits: a vocabulary row in the model's dtype and its float32
    copy, at most 4 + 4 bytes an entry."""
    return vocab_size(rt.model_dir) * 8


def score_chunk(plan, row_bytes: int) -> int:
    """The longest prompt call whose logits fit what the plan reserves for its calls: the
    activations of a ``plan.chunk_tokens`` call hold those of a shorter one and its rows of
    logits (a generation's prompt calls compute none); 1 where none does, as a decoded
    token's row is planned for."""
    reserve = plan.activation_for(plan.chunk_tokens)
    fits = [n for n in range(1, plan.chunk_tokens + 1)
            if plan.activation_for(n) + n * row_bytes <= reserve]
    return fits[-1] if fits else 1


def score(model, sequences: np.ndarray, decode_tokens: int) -> Scores:
    """Each sequence's tokens scored as a generation computes them: the prompt in chunks the
    budget holds (``score_chunk``), then ``decode_tokens`` steps of one token, each fed the true
    next token."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    from . import _finish
    from .loader import runtime_of

    rt = runtime_of(model)
    kv = rt.kv_quant.generate_kwargs() if rt.kv_quant is not None else None  # (as loaded)
    row_bytes = _row_bytes(rt)
    out = Scores()
    for row in sequences.tolist():
        prompt = len(row) - decode_tokens  # (its last token is fed as the first decode step)
        rt.new_sequence(0, prompt, max(1, decode_tokens))
        step = min(rt.prefill_step_size, score_chunk(rt.plan, row_bytes))
        cache = make_prompt_cache(model)
        read = rt.stats.bytes_read
        t0 = time.perf_counter()
        chunks = []
        for start in range(0, prompt - 1, step):
            chunk = row[start:min(start + step, prompt - 1)]
            logits = model(mx.array(chunk)[None], cache=cache)[0].astype(mx.float32)
            if kv:
                maybe_quantize_kv_cache(cache, **kv)
            targets = mx.array(row[start + 1:start + 1 + len(chunk)])
            ll = -nn.losses.cross_entropy(logits, targets, reduction="none")
            mx.eval(ll)
            chunks.append(np.array(ll))
        if chunks:
            out.prompt.append(np.concatenate(chunks))
        t1 = time.perf_counter()
        out.prompt_bytes += rt.stats.bytes_read - read
        read = rt.stats.bytes_read
        lls = []
        for i in range(prompt - 1, len(row) - 1):
            logits = model(mx.array([[row[i]]]), cache=cache)[0, -1].astype(mx.float32)
            if kv:
                maybe_quantize_kv_cache(cache, **kv)
            lls.append(logits[row[i + 1]] - mx.logsumexp(logits))
            mx.async_eval(lls[-1])
        if lls:
            out.decode.append(np.array(mx.stack(lls)))
        out.decode_s += time.perf_counter() - t1
        out.prompt_s += t1 - t0
        _finish(model)
        out.decode_bytes += rt.stats.bytes_read - read
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import hobbit_mlx

    args = setup_arg_parser().parse_args(argv)
    _check_args(args)
    model, tokenizer, load_s = cli_load.load_model(args)
    sequences = load_tokens(args.data_path, tokenizer, args.sequence_length, args.num_samples,
                            args.seed)
    trained = hobbit_mlx.runtime_of(model).trained_context
    if trained and args.sequence_length > trained:
        print(f"[hobbit_mlx] --sequence-length {args.sequence_length} is past the "
              f"{trained} tokens the model was trained on: its scores there mean little",
              file=sys.stderr)
    if not args.json:
        print(f"Scoring {len(sequences)} sequences of {args.sequence_length} tokens "
              f"({args.sequence_length - args.decode_tokens} prompt, {args.decode_tokens} "
              f"decoded) from {args.data_path}", file=sys.stderr, flush=True)
    hobbit_mlx.reset_stats(model)
    t0 = time.perf_counter()
    scores = score(model, sequences, args.decode_tokens)
    wall = time.perf_counter() - t0
    result = {part: scores.summary(part) for part in ("all", "prompt", "decode")}
    result["prompt"]["bytes_read"] = scores.prompt_bytes
    result["decode"]["bytes_read"] = scores.decode_bytes
    result.update(model=args.model or "reference model", data_path=args.data_path,
                  sequences=len(sequences), sequence_length=args.sequence_length,
                  decode_tokens=args.decode_tokens)
    stats = cli_report.run_stats(model, None, wall, load_s)
    decoded = result["decode"]["tokens"]
    stats.update(prompt_tokens=result["prompt"]["tokens"], generation_tokens=decoded,
                 bytes_read_per_token=scores.decode_bytes / decoded if decoded else 0.0)
    if args.json:
        print(json.dumps({**result, "stats": stats}, default=str))
        return 0
    for part, label in (("all", "Perplexity"), ("prompt", "  prompt (in chunks)"),
                        ("decode", "  decode (one token a step)")):
        r = result[part]
        if r["tokens"]:
            se = f" ± {r['standard_error']:.3f}" if r["standard_error"] is not None else ""
            print(f"{label}: {r['perplexity']:.3f}{se} over {r['tokens']} tokens, "
                  f"{r['tokens_per_s']:.1f} tokens-per-sec")
    if not args.quiet_report:
        lines = [line for line in cli_report.format_report({**stats, "generation_tokens": 0})
                 if not line.startswith(("Prompt:", "Generation:"))]
        per_token = (f", {format_size(scores.decode_bytes / decoded)} per decoded token"
                     if decoded else "")
        at = next(i for i, line in enumerate(lines) if line.startswith("Read from storage"))
        lines.insert(at + 1, f"  of which prompt chunks {format_size(scores.prompt_bytes)}, "
                             f"decode steps {format_size(scores.decode_bytes)}{per_token}")
        print("\n".join([cli_report.SEPARATOR] + lines), file=sys.stderr)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """One line for what perplexity cannot do, or what makes no sequence."""
    if args.pipeline:
        raise cli.CLIError("--pipeline: perplexity scores in one process, not across a "
                           "pipeline's ranks (score with one machine's budget)")
    if args.draft_model is not None or args.speculative:
        raise cli.CLIError(f"{'--draft-model' if args.draft_model else '--speculative'}: "
                           "perplexity feeds the text's own tokens, so nothing is drafted (a "
                           "draft model would only take memory from the expert pools)")
    cli_flags.check_args(args)
    if args.sequence_length < 2:
        raise cli.CLIError(f"--sequence-length {args.sequence_length}: at least 2 (a token and "
                           "the next one it predicts)")
    if args.decode_tokens is None:
        args.decode_tokens = min(64, args.sequence_length // 4)
    if not 0 <= args.decode_tokens < args.sequence_length:
        raise cli.CLIError(f"--decode-tokens {args.decode_tokens}: from 0 to "
                           f"--sequence-length - 1 ({args.sequence_length - 1})")
    if args.num_samples == 0 or args.num_samples < -1:
        raise cli.CLIError(f"--num-samples {args.num_samples}: a count, or -1 for all")


if __name__ == "__main__":
    sys.exit(cli.run(main))
