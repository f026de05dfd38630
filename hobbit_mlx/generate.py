"""Generate text with an MoE model whose experts stream from storage under a memory budget.

    python -m hobbit_mlx.generate --model PATH --prompt "Why is the sky blue?" \\
        --max-tokens 200 --memory-budget 6GB [--stats-json stats.json]

The flags mirror ``mlx_lm.generate`` (``--prompt -`` reads stdin; ``--temp``, ``--top-p``,
``--min-p``, ``--top-k``, ``--seed``, chat template handling, ...) plus the loading flags of
``hobbit_mlx.load``. The text streams to stdout; a report (speed, peak memory against the budget,
expert cache hits, bytes read from storage) follows on stderr after a separator line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from typing import Sequence

from . import cache_prompt
from . import cli_common as cli, cli_flags, cli_load, cli_report
from .pipeline import Lockstep, pipeline_of

# ``import hobbit_mlx.generate`` makes Python bind this module to the package attribute
# ``hobbit_mlx.generate``, where the API function of the same name lives. Keep that name callable:
# calling this module calls the function.
_api_generate = getattr(sys.modules[__package__], "generate", None)
if not isinstance(_api_generate, types.FunctionType):
    _api_generate = None


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``hobbit_mlx.generate(model, tokenizer, prompt, ...)``: see the package's ``generate``."""
        if _api_generate is None:
            raise TypeError("module 'hobbit_mlx.generate' is not callable")
        return _api_generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.generate",
        description="Generate text with an MoE model larger than memory: experts stream from "
                    "storage under one memory budget.")
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT,
                        help="Message to be processed by the model ('-' reads from stdin).")
    parser.add_argument("--prefill-response", default=None,
                        help="Prefill response to be used for the chat template.")
    parser.add_argument("--prompt-cache-file", default=None, metavar="FILE",
                        help="A prompt's KV cache saved by python -m hobbit_mlx.cache_prompt (or "
                             "mlx-lm's): the prompt given here continues it.")
    cli_flags.add_model_args(parser)
    cli_flags.add_sampling_args(parser, default_max_tokens=DEFAULT_MAX_TOKENS)
    cli_flags.add_template_args(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--stats-json", metavar="PATH", default=None,
                   help="Write the offload statistics and timings of the run to PATH as JSON.")
    g.add_argument("--verbose", type=cli_flags.str2bool, default=True,
                   help="'False' or 'F' prints only the response (no report), like mlx-lm.")
    g.add_argument("--quiet-report", action="store_true",
                   help="Do not print the speed / memory / expert cache report.")
    return parser


def build_prompt(args: argparse.Namespace, tokenizer, continues: bool = False) -> list[int]:
    """The prompt tokens, with the chat template applied the way mlx-lm's CLI does.
    ``continues``: after a saved prompt cache, whose user message is left open (as mlx-lm's):
    the rendered prompt from this message's text on."""
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":
        prompt = sys.stdin.read()
    prompt = cli.clean_text(prompt)
    if args.use_default_chat_template:
        cli.use_default_template(tokenizer)
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = []
        if args.system_prompt is not None:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        render = lambda: tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, continue_final_message=has_prefill,
            add_generation_prompt=not has_prefill, **args.chat_template_kwargs)
        try:
            prompt = render()
            if continues:  # (a marker in the message says where its text starts)
                text, messages[-1 if not has_prefill else -2]["content"] = prompt, "<query>"
                prompt = text[render().index("<query>"):]
        except Exception as e:  # a template error is bad input (e.g. a role it refuses)
            raise cli.CLIError(f"the chat template failed: {type(e).__name__}: {e}") from None
    # (no BOS in the middle of a sequence that continues a cache)
    tokens = tokenizer.encode(prompt, add_special_tokens=not (use_chat_template or continues))
    if len(tokens) == 0:
        raise cli.CLIError("the prompt is empty after tokenization")
    return list(tokens)


def _context_ends_unlimited(args, pipe, last) -> bool:
    """Whether a context outgrowing the budget ends this generation as its length limit: asked
    for with ``--max-tokens -1`` (no limit), after some text, on one process (the ranks of a
    pipeline end together, by the error)."""
    return args.max_tokens < 0 and pipe is None and last is not None


def _break_line(out, last) -> None:
    """An error's line starts on a line of its own, after generated text."""
    if last is not None:
        out.write("\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    import hobbit_mlx

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pipeline", False) and args.prompt == "-":
        raise cli.CLIError("--prompt - with --pipeline: mlx.launch never closes the ranks' "
                           "standard input, so it would never end; pass the text itself "
                           "(--prompt \"$(cat FILE)\")")
    cli_load.join_pipeline(args)
    cli_flags.check_args(args)
    cli.check_writable_file(args.stats_json, "--stats-json")
    saved = cache_prompt.read(args) if args.prompt_cache_file else None
    quiet = args.quiet_report or not args.verbose
    args.quiet_report = quiet

    model, tokenizer, load_s = cli_load.load_model(args)
    cli.seed(args)  # after the load, which draws random numbers (as mlx-lm's does not)
    pipe = pipeline_of(model)
    printer = pipe is None or pipe.rank == 0
    out = sys.stdout if printer else open(os.devnull, "w")
    lock = None
    if pipe is not None:  # rank 0 prints; a rank that stops answering ends every rank
        pipe.watchdog(args.pipeline_timeout)
        lock = Lockstep(pipe)
        lock.shared_seed(args.seed)  # every rank samples the same token
        lock.follow_args(args)  # with rank 0's sampling settings
    sampler = cli.make_sampler(args, tokenizer)
    processors = cli.make_logits_processors(args)
    if pipe is None:
        window = {"max_kv_size": args.max_kv_size} if args.max_kv_size else {}
        if saved is not None:
            cache_prompt.check_layers(saved, model, args.prompt_cache_file)
            window = {"prompt_cache": saved}
        steps = hobbit_mlx.stream_generate(model, tokenizer,
                                           build_prompt(args, tokenizer, saved is not None),
                                           max_tokens=args.max_tokens, sampler=sampler,
                                           logits_processors=processors, **window)
    else:
        # rank 0's prompt and max_tokens on every rank (a rank started with others followed
        # them and printed wrong text), the budgets and prompt chunks agreed (Lockstep)
        job = lock.broadcast(pipe.agreed(lambda: {"prompt": build_prompt(args, tokenizer),
                                                  "max_tokens": args.max_tokens}
                                         if printer else None, what="cannot build the prompt"))
        steps = lock.generate(model, tokenizer, job["prompt"], job["max_tokens"],
                              sampler=sampler, logits_processors=processors)

    hobbit_mlx.reset_stats(model)
    last = None
    t0 = time.perf_counter()
    full_context = None  # the budget's context ended a --max-tokens -1 generation
    try:
        for response in steps:
            out.write(response.text)
            out.flush()
            last = response
            if pipe is not None:
                pipe.progress()
    except hobbit_mlx.ContextBudgetError as e:
        if not _context_ends_unlimited(args, pipe, last):
            _break_line(out, last)
            raise
        full_context = e  # (--max-tokens -1: until the end of text or of the budget's context)
    except BaseException as e:
        _break_line(out, last)
        if saved is not None and last is None and isinstance(e, ValueError) and "shape" in str(e):
            raise cli.CLIError(cache_prompt.misfit(args.prompt_cache_file, e)) from None
        raise
    wall_s = time.perf_counter() - t0
    out.write("\n")
    out.flush()
    if full_context is not None:
        print(f"[hobbit_mlx] stopped after {last.generation_tokens} tokens: {full_context}",
              file=sys.stderr, flush=True)

    stats = cli_report.gather_ranks(model, cli_report.run_stats(model, last, wall_s, load_s))
    if pipe is not None:
        pipe.barrier()  # no rank exits while another still evaluates (mlx-lm looks a token ahead)
        if not printer:
            return 0
    options = cli_flags.technique_options(args)
    options["policy"] = stats["policy"]  # as resolved by load() (its default depends on prefetch)
    precision = hobbit_mlx.runtime_of(model).precision  # (as load() resolved them)
    for name in ("mixed_precision", "skip", "big_little"):
        options[name] = getattr(precision, name)
    stats.update(model=str(getattr(hobbit_mlx.runtime_of(model), "model_dir", args.model)),
                 **options, max_tokens=args.max_tokens, max_context=args.max_context,
                 kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                 quantized_kv_start=args.quantized_kv_start)
    if args.stats_json:
        cli.write_json_atomic(args.stats_json, stats)
    if not quiet:
        cli_report.print_report(stats)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
