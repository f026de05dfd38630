"""The flags the command-line tools share, and their checks.

Their own module so that the parsers' argument groups (model and memory, techniques, pipeline,
sampling, chat template, report), mlx-lm's sampling defaults, everything argparse cannot check
(``check_args``) and the ``LoadOptions`` the flags set read in one place, apart from running and
loading. A bad flag raises ``cli_common.CLIError``.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .budget import parse_size
from .cli_common import CLIError

if TYPE_CHECKING:
    from .options import LoadOptions


DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_XTC_PROBABILITY = 0.0
DEFAULT_XTC_THRESHOLD = 0.1
DEFAULT_MIN_TOKENS_TO_KEEP = 1


def str2bool(value: str) -> bool:
    """mlx-lm's reading of ``--verbose``: anything but false/f (any case) is true."""
    return value.lower() not in ("false", "f", "0", "no", "n")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _policy_names() -> list[str]:
    from .policies import POLICIES

    return sorted(POLICIES)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and everything ``hobbit_mlx.load`` takes."""
    from .budget import INITIAL_CONTEXT
    from .options import (DEFAULT_PREFETCH_LAYERS, DEFAULT_PREFETCH_RECALL, DEFAULT_PREFETCH_WIDTH,
                          DEFAULT_PREFILL_STEP, DEFAULT_UPGRADE_AFTER, LoadOptions)

    g = parser.add_argument_group("model and memory")
    g.add_argument("--model", type=str, default=None,
                   help="A converted hobbit model directory, or an mlx-lm / Hugging Face "
                        "checkpoint (directory or hub repo id) that is converted once into the "
                        "cache. Without it the bundled reference model is used.")
    g.add_argument("--adapter-path", type=str, default=None,
                   help="Adapters mlx_lm.lora trained for --model's checkpoint (a directory with "
                        "adapter_config.json and adapters.safetensors): fused into its "
                        "conversion once, as mlx_lm.fuse fuses them.")
    mem = g.add_mutually_exclusive_group()
    mem.add_argument("--memory-budget", "-b", type=str, default=None, metavar="SIZE",
                     help="Ceiling for MLX's peak memory while generating, e.g. 6GB, 6GiB, "
                          "512MiB or a byte count. Default: all experts if they fit in 60%% of "
                          "the machine's memory, else as many as fit there. With --pipeline, "
                          "one per rank in rank order (48GB,24GB) or one for all.")
    mem.add_argument("--expert-residency", type=float, default=None, metavar="F",
                     help="Instead of --memory-budget: size the expert cache as a fraction "
                          "(0..1) of the model's 4-bit expert bytes.")
    t = parser.add_argument_group("techniques (each can be turned off)")
    t.add_argument("--exact", action="store_true",
                   help="Exact mode: every expert is served in 4-bit and none is skipped, so the "
                        "output equals mlx-lm's. Turns every lossy technique off.")
    t.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="HOBBIT: a miss on a low-importance expert loads its 2-bit copy "
                        "(default: on unless --exact).")
    t.add_argument("--t1", type=float, default=LoadOptions.t1,
                   help="Unimportance above which a miss loads 2-bit (default: %(default)s).")
    t.add_argument("--t2", type=float, default=LoadOptions.t2,
                   help="Unimportance above which --skip drops the expert (default: %(default)s).")
    t.add_argument("--upgrade-after", type=float, default=DEFAULT_UPGRADE_AFTER, metavar="USES",
                   help="With mixed precision, a miss reads the 4-bit copy only for an expert "
                        "chosen about USES times lately (each use counts 1 and fades by 0.9 per "
                        "call of its layer), else the 2-bit one; 0: off (default: %(default)s).")
    t.add_argument("--skip", action=argparse.BooleanOptionalAction, default=None,
                   help="HOBBIT: a miss on an expert whose unimportance exceeds --t2 is dropped, "
                        "not read (default: on unless --exact).")
    t.add_argument("--big-little", action=argparse.BooleanOptionalAction, default=None,
                   help="MoBiLE: confident tokens run only their top-k/2 experts (default: off; "
                        "at the default thresholds it drops what --skip drops).")
    t.add_argument("--little-threshold", type=float, default=0.8,
                   help="Gate mass of the top-k/2 experts that makes a token 'little' (default: %(default)s).")
    t.add_argument("--little-keeps-resident", action=argparse.BooleanOptionalAction, default=True,
                   help="Big-little drops a little token's other experts only where they would "
                        "be read; resident ones still run (default: on).")
    t.add_argument("--prefetch-layers", type=int, default=DEFAULT_PREFETCH_LAYERS, metavar="P",
                   help="Predict and read the next P layers' experts in the background; 0 turns "
                        "prefetch off (default: %(default)s).")
    t.add_argument("--prefetch-width", type=float, default=DEFAULT_PREFETCH_WIDTH, metavar="X",
                   help="Experts predicted per token for each layer ahead, as a multiple of the "
                        "model's top-k (default: %(default)s).")
    t.add_argument("--prefetch-recall", type=float, default=DEFAULT_PREFETCH_RECALL or 0.0,
                   metavar="R",
                   help="Adapt each layer's prediction width (1 to 4x top-k, starting from "
                        "--prefetch-width) so that it holds this share of the experts the router "
                        "chooses; 0 keeps the fixed width (default: %(default)s).")
    t.add_argument("--prefetch-low-precision", action="store_true",
                   help="Prefetch uncertain or unimportant predictions in 2-bit.")
    t.add_argument("--prefetch-cost-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="Read a guess only when its measured chance of use beats the expert it "
                        "evicts and the storage time it takes (default: on).")
    t.add_argument("--prefetch-scratch", type=int, default=None, metavar="N",
                   help="Slots of each expert pool set aside for guesses: a guess then evicts "
                        "nothing, and a used one joins the cache as its miss would have (default: "
                        "2 per layer ahead; 0: guesses take pool slots like demand reads).")
    t.add_argument("--adapt-to-storage", action=argparse.BooleanOptionalAction, default=True,
                   help="Use the lossy techniques (2-bit copies, --skip, big-little) only while "
                        "reading a layer's top-k experts takes longer than the layer computes, "
                        "as measured (default: on; off: always use them).")
    t.add_argument("--prefill-low-precision", type=float, default=0.0, metavar="SHARE",
                   help="Fate: in prefill, serve an expert chosen by less than SHARE of a "
                        "chunk's tokens from its 2-bit copy (default: off).")
    t.add_argument("--keep-shallow-layers", type=int, default=None, metavar="N",
                   help="Experts of the first N layers are evicted last (default where "
                        "guesses take pool slots (--prefetch-scratch 0): as many whole layers as "
                        "the cache holds, 1 to a quarter of the layers; else 0).")
    t.add_argument("--no-overlap-io", dest="overlap_io", action="store_false",
                   help="Do not start resident experts' compute before the router sync (decode) or "
                        "while misses are read (prompt chunks).")
    t.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="Self-speculative decoding: draft up to K tokens per pass from the "
                        "resident experts (no reads), verify them in one exact pass (each missing "
                        "expert read once per pass); greedy output is unchanged (default: off).")
    t.add_argument("--speculative-fixed", dest="speculative_adaptive", action="store_false",
                   help="Draft K tokens every pass instead of adapting the draft length (0..K) to "
                        "the measured acceptance and pass times.")
    t.add_argument("--draft-model", default=None, metavar="PATH",
                   help="A small mlx-lm model with the same tokenizer, held resident, drafts "
                        "instead; its weights and KV cache count inside --memory-budget. K: "
                        "--num-draft-tokens (default 3), adapted to the measured acceptance and "
                        "pass times unless --speculative-fixed.")
    t.add_argument("--num-draft-tokens", dest="speculative", type=int, default=None, metavar="K",
                   help="The same as --speculative K (mlx_lm.generate's name).")
    t.add_argument("--policy", default=None, choices=_policy_names(),
                   help="Expert cache replacement policy (default: lru where guesses take "
                        "pool slots (--prefetch-scratch 0), else seqfreq).")
    g.add_argument("--max-context", type=int, default=INITIAL_CONTEXT, metavar="TOKENS",
                   help="Tokens of KV cache reserved when a sequence starts; a longer context "
                        "takes its KV from the expert pools (default: %(default)s).")
    g.add_argument("--kv-bits", type=int, default=None, metavar="BITS",
                   help="Quantize the KV cache to BITS bits (mlx-lm's flag): a long context "
                        "then takes less of the budget, which the expert pools get. Lossy, "
                        "like mlx-lm's; the budget plans for it (default: not quantized).")
    g.add_argument("--kv-group-size", type=int, default=LoadOptions.kv_group_size, metavar="N",
                   help="Group size of the KV cache quantization (default: %(default)s).")
    g.add_argument("--quantized-kv-start", type=int, default=LoadOptions.quantized_kv_start,
                   metavar="TOKENS",
                   help="Quantize the KV cache once it holds this many tokens (default: "
                        "%(default)s, from the start: the budget holds the unquantized cache up "
                        "to here; mlx-lm's CLI waits for 5000).")
    g.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP, metavar="N",
                   help="Prompt tokens processed at a time; smaller values lower peak memory "
                        "during prefill (default: %(default)s).")
    g.add_argument("--prefill-order", default="layers", choices=("layers", "chunks"),
                   help="A prompt longer than one step passes the model a layer at a time (every "
                        "chunk through a layer first: its experts are read once) or a chunk at a "
                        "time, as mlx-lm does (each chunk reads them again) (default: %(default)s).")
    g.add_argument("--io-workers", type=int, default=8, metavar="N",
                   help="Threads reading experts from storage (default: %(default)s).")
    g.add_argument("--verify", default="first", choices=("first", "always", "never"),
                   help="Check expert checksums the first time each is read, on every read, or "
                        "never (default: %(default)s).")
    g.add_argument("--direct-io", action="store_true",
                   help="Read experts past the OS page cache (O_DIRECT; F_NOCACHE on macOS).")
    g.add_argument("--span-reads", default="auto", choices=("auto", "together", "in-turn"),
                   help="How a slow expert read in place (one span per stacked tensor) sends its "
                        "spans to storage: at once, one after another, or whichever the first "
                        "reads measure faster (default: %(default)s).")
    g.add_argument("--simulated-storage", default=None, metavar="SPEC",
                   help="Make every expert read wait as long as a modelled device would: "
                        "'mac-ssd' (7 GB/s, 80 us per command) or e.g. '50MB/s,latency=100us,depth=8' "
                        "(benchmarks on a machine whose page cache makes reads free).")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Enable trusting remote code for the tokenizer.")
    p = parser.add_argument_group("several machines (start every rank with mlx.launch)")
    p.add_argument("--pipeline", action="store_true",
                   help="Join the mx.distributed group mlx.launch started: each rank holds a block "
                        "of layers and streams its own experts under its own --memory-budget; "
                        "rank 0 prints.")
    p.add_argument("--pipeline-split", default=None, metavar="N,N,...",
                   help="Layers per rank, in rank order (rank 0 holds the last layers); default: "
                        "in proportion to each rank's memory budget.")
    p.add_argument("--pipeline-timeout", type=float, default=300.0, metavar="S",
                   help="Exit with an error when the pipeline makes no progress for S seconds "
                        "(a rank hangs or its machine went away; default: %(default)s).")


def add_sampling_args(parser: argparse.ArgumentParser, *,
                      default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """mlx-lm's sampling flags, plus its repetition penalty."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-m", type=int, default=default_max_tokens,
                   help="Maximum number of tokens to generate (default: %(default)s; -1: "
                   "until the end of text or of the context the memory budget holds).")
    g.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature.")
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Sampling top-p.")
    g.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, help="Sampling min-p.")
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="Sampling top-k.")
    g.add_argument("--min-tokens-to-keep", type=int, default=DEFAULT_MIN_TOKENS_TO_KEEP,
                   help="Minimum tokens to keep for min-p sampling.")
    g.add_argument("--xtc-probability", type=float, default=DEFAULT_XTC_PROBABILITY,
                   help="Probability of XTC sampling to happen each next token.")
    g.add_argument("--xtc-threshold", type=float, default=DEFAULT_XTC_THRESHOLD,
                   help="Threshold the probs of each next token candidate to be sampled by XTC.")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="Penalty for repeated tokens (1.0 or unset: none).")
    g.add_argument("--repetition-context-size", type=int, default=20,
                   help="Tokens the repetition penalty looks back on (default: %(default)s).")
    g.add_argument("--seed", type=int, default=None,
                   help="PRNG seed, set once the model is loaded: the sampled text is what "
                        "mlx-lm's generate gives after mx.random.seed(SEED) on a loaded model "
                        "(mlx-lm's CLI seeds before its load, which draws random numbers).")
    g.add_argument("--extra-eos-token", type=str, default=(), nargs="+",
                   help="Add tokens to the list of EOS tokens that stop generation.")
    g.add_argument("--max-kv-size", type=int, default=None,
                   help="Keep at most this many tokens of context in the KV cache (mlx-lm's "
                        "rotating cache): a generation or a conversation runs past the context "
                        "the budget holds, forgetting its oldest tokens.")


def add_template_args(parser: argparse.ArgumentParser, *, chat: bool = False) -> None:
    g = parser.add_argument_group("chat template")
    g.add_argument("--system-prompt", default=None,
                   help="System prompt to be used for the chat template.")
    if not chat:
        g.add_argument("--ignore-chat-template", action="store_true",
                       help="Use the raw prompt without the tokenizer's chat template.")
        g.add_argument("--use-default-chat-template", action="store_true",
                       help="Use the tokenizer's default chat template when it has none of its own.")
    g.add_argument("--chat-template-config", default=None,
                   help="Additional config for `apply_chat_template`: a JSON object of string "
                        "keys to values.")


def add_report_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("report")
    g.add_argument("--quiet-report", action="store_true",
                   help="Do not print the speed / memory / expert cache report.")


# ---------------------------------------------------------------------------------------------
# Checking arguments
# ---------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    """Everything argparse cannot check itself; raises CLIError."""
    group = getattr(args, "pipeline_group", None)
    if group is not None and "," in str(getattr(args, "memory_budget", None) or ""):
        budgets = str(args.memory_budget).split(",")  # one per rank: mlx.launch runs one command
        if len(budgets) != group.size():
            raise CLIError(f"--memory-budget lists {len(budgets)} budgets for {group.size()} ranks")
        args.memory_budget = budgets[group.rank()]
    elif "," in str(getattr(args, "memory_budget", None) or ""):
        raise CLIError(f"--memory-budget {args.memory_budget} lists a budget per pipeline rank, "
                       "which needs --pipeline (one process takes one budget)")
    if getattr(args, "memory_budget", None) is not None:
        try:
            size = parse_size(args.memory_budget)
        except ValueError as e:
            raise CLIError(f"--memory-budget: {e}") from None
        if size <= 0:
            raise CLIError(f"--memory-budget must be positive, not {args.memory_budget!r}")
        args.memory_budget = size
    r = getattr(args, "expert_residency", None)
    if r is not None and not 0.0 <= r <= 1.0:
        raise CLIError(f"--expert-residency must be between 0 and 1, not {r}")
    if getattr(args, "max_kv_size", None) is not None:
        if args.max_kv_size < 5:  # (mlx-lm's rotating cache keeps its first 4 tokens)
            raise CLIError(f"--max-kv-size must be at least 5, not {args.max_kv_size}")
        if getattr(args, "speculative", None) or getattr(args, "draft_model", None):
            raise CLIError("--max-kv-size does not run with speculative decoding (it rolls the "
                           "KV cache back after each pass)")
        if group is not None:
            raise CLIError("--max-kv-size does not run with --pipeline")
    for name in ("max_context", "prefill_step_size", "io_workers"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, not {v}")
    if getattr(args, "simulated_storage", None) is not None:
        from .storage import parse_storage
        try:
            parse_storage(args.simulated_storage)
        except ValueError as e:
            raise CLIError(f"--simulated-storage: {e}") from None
    split = getattr(args, "pipeline_split", None)
    if split is not None:
        try:
            args.pipeline_split = tuple(int(n) for n in str(split).split(","))
        except ValueError:
            raise CLIError(f"--pipeline-split takes layer counts like 30,18, not {split!r}") from None
        if not getattr(args, "pipeline", False) or min(args.pipeline_split) < 1:
            raise CLIError("--pipeline-split needs --pipeline and a positive count per rank")
    mt = getattr(args, "max_tokens", None)
    if mt is not None and mt == 0:
        raise CLIError("--max-tokens must be non-zero (use -1 for no limit)")
    if getattr(args, "chat_template_config", None) is not None:
        try:
            cfg = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise CLIError(f"--chat-template-config is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CLIError("--chat-template-config must be a JSON object")
        args.chat_template_kwargs = cfg
    else:
        args.chat_template_kwargs = {}


def load_options(args: argparse.Namespace) -> "LoadOptions":
    """The ``LoadOptions`` the flags set (memory, techniques, I/O)."""
    from .options import LoadOptions

    check_kv_flags(args)
    return LoadOptions(memory_budget=args.memory_budget, expert_residency=args.expert_residency,
                       max_context=args.max_context, prefill_step_size=args.prefill_step_size,
                       kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                       quantized_kv_start=args.quantized_kv_start,
                       layer_major_prefill=args.prefill_order == "layers",
                       io_workers=args.io_workers, verify=args.verify, direct_io=args.direct_io,
                       parallel_runs={"auto": "auto", "together": True,
                                      "in-turn": False}[args.span_reads],
                       simulated_storage=args.simulated_storage,
                       pipeline=(getattr(args, "pipeline_group", None) or True)
                       if getattr(args, "pipeline", False) else None,
                       pipeline_split=getattr(args, "pipeline_split", None),
                       adapter_path=args.adapter_path, **technique_options(args))


def check_kv_flags(args: argparse.Namespace) -> None:
    """--kv-group-size and --quantized-kv-start tune --kv-bits: alone they would do nothing."""
    from .options import LoadOptions

    if args.kv_bits is None:
        alone = [flag for flag, name in (("--kv-group-size", "kv_group_size"),
                                         ("--quantized-kv-start", "quantized_kv_start"))
                 if getattr(args, name) != getattr(LoadOptions, name)]
        if alone:
            raise CLIError(f"{' and '.join(alone)} {'tunes' if len(alone) == 1 else 'tune'} "
                           "the KV cache's quantization: give --kv-bits too")


def technique_options(args: argparse.Namespace) -> dict:
    """The ``LoadOptions`` fields that the technique flags set."""
    from .options import LoadOptions

    if args.exact and (args.mixed_precision or args.big_little or args.skip):
        raise CLIError("--exact cannot be combined with --mixed-precision, --big-little or --skip")
    if not 0 <= args.t1 <= args.t2 <= 1:
        raise CLIError(f"need 0 <= --t1 <= --t2 <= 1 (got {args.t1}, {args.t2})")
    if args.prefetch_layers < 0:
        raise CLIError(f"--prefetch-layers must be 0 or more, not {args.prefetch_layers}")
    if args.prefetch_width <= 0:
        raise CLIError(f"--prefetch-width must be above 0, not {args.prefetch_width}")
    if args.prefetch_scratch is not None and args.prefetch_scratch < 0:
        raise CLIError(f"--prefetch-scratch is a slot count, 0 or more, not {args.prefetch_scratch}")
    if not 0 <= args.prefetch_recall <= 1:
        raise CLIError(f"--prefetch-recall is a share in [0, 1], not {args.prefetch_recall}")
    if not 0 <= args.prefill_low_precision <= 1:
        raise CLIError(f"--prefill-low-precision is a share in [0, 1], not {args.prefill_low_precision}")
    if args.exact and args.prefill_low_precision:
        raise CLIError("--exact cannot be combined with --prefill-low-precision")
    tuned = [flag for flag, name in (("--t1", "t1"), ("--t2", "t2"), ("--upgrade-after",
                                     "upgrade_after"), ("--little-threshold", "little_threshold"),
                                     ("--prefetch-low-precision", "prefetch_low_precision"))
             if getattr(args, name) != getattr(LoadOptions, name)]
    if args.exact and tuned:  # (each tunes a lossy technique, which exact mode turns off)
        raise CLIError(f"--exact cannot be combined with {', '.join(tuned)}: it tunes a lossy "
                       "technique, and exact mode runs none")
    speculative = getattr(args, "speculative", None)
    if speculative is not None and speculative < 1:
        flag = "--num-draft-tokens" if getattr(args, "draft_model", None) else "--speculative"
        raise CLIError(f"{flag} drafts K >= 1 tokens per pass, not {speculative}")
    if speculative is not None and getattr(args, "pipeline", False):
        raise CLIError("--speculative does not run with --pipeline")
    return dict(speculative=speculative, draft_model=getattr(args, "draft_model", None),
                speculative_adaptive=getattr(args, "speculative_adaptive", True),
                exact=args.exact, mixed_precision=args.mixed_precision, t1=args.t1, t2=args.t2,
                skip=args.skip, upgrade_after=args.upgrade_after, big_little=args.big_little,
                little_threshold=args.little_threshold,
                little_keeps_resident=args.little_keeps_resident,
                prefetch_layers=args.prefetch_layers, overlap_io=args.overlap_io, policy=args.policy,
                prefetch_low_precision=args.prefetch_low_precision,
                prefetch_cost_aware=args.prefetch_cost_aware,
                prefetch_scratch=args.prefetch_scratch,
                adapt_to_storage=args.adapt_to_storage,
                prefetch_width=args.prefetch_width, prefetch_recall=args.prefetch_recall,
                prefill_low_precision=args.prefill_low_precision,
                keep_shallow_layers=args.keep_shallow_layers)
