"""``python -m hobbit_mlx.plan MODEL [--memory-budget SIZE] [--json]``: a model's budget, before loading it.

Reads only config.json and the safetensors headers (``hobbit_mlx.sizes``: local, or a hub id
through the cache or ``huggingface_hub``'s metadata calls, no weights) and prints the dense bytes,
the expert bytes at the high and low precisions, the KV bytes per token, the smallest budget that runs, and the
budget ``load`` would choose on this machine (or for ``--memory-budget``) with the share of the
experts it keeps resident. The split is ``hobbit_mlx.budget``'s own; only the activations of a
prefill chunk are estimated here (``load`` measures them on the model).

A converted model's experts are counted from its manifest (their real widths and bytes, as
``hobbit_mlx.footprint`` gives them); an unconverted checkpoint's as ``python -m convert`` would
store them by default (an mlx-lm quantized source's own width, else 4 bits, and 2-bit copies).

An unknown model, a model that is not an MoE, or a hub id that is not cached while the hub cannot
be reached ends with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from .architectures import trained_context
from .cli_common import Parser
from .budget import (INITIAL_CONTEXT, KV_STEP, BudgetError, BudgetPlan, format_size, parse_size, plan_budget,
                     system_memory_bytes)
from .options import LoadOptions

EXIT_BAD_INPUT = 2


def _plan(sizes, mixed_precision: bool, memory_budget, context: int = INITIAL_CONTEXT) -> BudgetPlan:
    k = sizes.experts_per_token
    return plan_budget(
        dense_bytes=sizes.dense_bytes, activation_points=sizes.activation_points,
        kv_bytes_per_token=sizes.kv_bytes_per_token, all_high_bytes=sizes.all_bytes("high"),
        min_high_bytes=sum(k * b for b in sizes.expert_slot_bytes["high"]),
        min_low_bytes=sum(k * b for b in sizes.expert_slot_bytes["low"]),
        mixed_precision=mixed_precision, memory_budget=memory_budget,
        kv_layer_bytes_per_token=sizes.kv_layer_bytes_per_token,
        context_activation=sizes.context_activation, initial_context=context,
        kv_quantized=sizes.kv_quantized, activations_measured=False)


def _widths(manifest, precision: str) -> list[int]:
    """The widths the manifest's experts hold at one precision (several for a mixed recipe)."""
    return sorted({int(q["bits"]) for layer in manifest.layers
                   for q in layer.precisions[precision].quant.values()})


def _use_manifest(sizes, manifest, compute_dtype) -> None:
    """A converted model's experts as ``load`` counts them: stored bytes from the manifest, and
    one slot per pool (layers of one layout share it) with floats cast to ``compute_dtype``."""
    from .pools import pool_signature

    itemsize = compute_dtype.size if compute_dtype is not None else None
    for precision in ("high", "low"):
        groups: dict[tuple, list[int]] = {}
        for layer in manifest.layers:
            entry = layer.precisions[precision]
            g = groups.setdefault(pool_signature(entry), [entry.resident_nbytes(itemsize), 0])
            g[1] += 1
        sizes.expert_bytes[precision] = manifest.expert_bytes(precision)
        sizes.expert_slot_bytes[precision] = [g[0] for g in groups.values()]
        sizes.expert_layers[precision] = [g[1] for g in groups.values()]


def plan_model(model: str, memory_budget: int | str | None = None,
               options: LoadOptions | None = None) -> dict:
    """What ``load(model, memory_budget=...)`` would plan, from config.json and headers only.

    Raises ``sizes.ModelNotFound``, ``UnsupportedModelError`` (not an MoE) or ``BudgetError``."""
    from convert import ConversionError, default_bits

    from .loader import compute_dtype
    from .sizes import model_sizes, read_checkpoint
    from .store import is_hobbit_model, load_manifest

    o = (options or LoadOptions()).with_overrides(memory_budget=memory_budget)
    ckpt = read_checkpoint(model)
    cdtype = compute_dtype(o.dtype)
    local = Path(str(model)).expanduser()
    converted = ckpt.where == "local" and local.is_dir() and is_hobbit_model(local)
    if converted:
        manifest = load_manifest(local, check_files=False)
        sizes = model_sizes(ckpt, compute_dtype=cdtype, prefill_step_size=o.prefill_step_size,
                            kv_quant=o.kv_quant())
        _use_manifest(sizes, manifest, cdtype)
        widths = {p: _widths(manifest, p) for p in ("high", "low")}
    else:  # as ``python -m convert`` would store it by default
        try:
            bits, low_bits = default_bits(ckpt.config)
        except ConversionError:  # a 1-bit source: no narrower copy; counted at 1 bit too
            bits = low_bits = 1
        sizes = model_sizes(ckpt, bits=bits, low_bits=low_bits, compute_dtype=cdtype,
                            prefill_step_size=o.prefill_step_size, kv_quant=o.kv_quant())
        # the widths the converter would store: a mixed-bit source's experts keep their own
        widths = {p: sizes.expert_widths.get(p) or [b]
                  for p, b in (("high", bits), ("low", low_bits))}
    mixed = o.precision().mixed_precision
    minimum = _plan(sizes, mixed, 1 << 62).minimum_bytes
    minimum_exact = _plan(sizes, False, 1 << 62).minimum_bytes
    plan = _plan(sizes, mixed, o.memory_budget, o.max_context)
    # load() plans each sequence for its own length (prompt + max_tokens): a short one leaves
    # the pools the KV reserve of the longer context asked for here
    short = _plan(sizes, mixed, o.memory_budget, KV_STEP) if o.max_context > KV_STEP else None
    total_experts = sizes.num_experts * sizes.num_moe_layers
    share_high = min(1.0, plan.high_expert_bytes / max(1, sizes.all_bytes("high")))
    share_low = min(1.0, plan.low_expert_bytes / max(1, sizes.all_bytes("low")))
    return {
        "model": str(model), "read_from": ckpt.where, "model_type": sizes.model_type,
        "converted": converted,
        "moe_layers": sizes.num_moe_layers, "experts_per_layer": sizes.num_experts,
        "experts_per_token": sizes.experts_per_token, "total_experts": total_experts,
        "dense_bytes": sizes.dense_bytes,
        # a quantized checkpoint's dense linears keep its width (norms and the like: floats)
        "dense_bits": (ckpt.config.get("quantization") or {}).get("bits"),
        # the widths of the high and low precisions: a converted model's, else those assumed
        "expert_bits_high": widths["high"], "expert_bits_low": widths["low"],
        "expert_bytes_high": sizes.expert_bytes["high"], "expert_bytes_low": sizes.expert_bytes["low"],
        "kv_bytes_per_token": sizes.kv_bytes_per_token,
        # with kv_bits: per token once quantized, and the tokens before that
        "kv_bits": o.kv_bits, "kv_bytes_per_token_quantized": sizes.kv_quantized[0]
        if sizes.kv_quantized else None, "quantized_kv_start": o.quantized_kv_start if o.kv_bits is not None else None,
        "activation_bytes_estimated": dict(sizes.activation_points),
        "context_activation_estimated": sizes.context_activation,
        "compute_dtype": sizes.compute_dtype,
        "minimum_budget_bytes": minimum, "minimum_budget_bytes_exact": minimum_exact,
        "system_memory_bytes": system_memory_bytes(),
        "budget_given": o.memory_budget is not None,
        "budget_bytes": plan.budget_bytes,
        "expert_pool_bytes_high": plan.high_expert_bytes,
        "expert_pool_bytes_low": plan.low_expert_bytes,
        "context_tokens_asked": o.max_context,
        "kv_reserve_tokens": plan.kv_tokens, "kv_reserve_bytes": plan.kv_reserve_bytes,
        "prefill_chunk_tokens": plan.chunk_tokens, "max_context_tokens": plan.max_context(),
        "model_context_tokens": trained_context(ckpt.config),
        "resident_share_high": share_high, "resident_share_low": share_low,
        "short_context_tokens": KV_STEP if short is not None else None,
        "expert_pool_bytes_high_short": short.high_expert_bytes if short is not None else None,
        "resident_share_high_short": min(1.0, short.high_expert_bytes / max(
            1, sizes.all_bytes("high"))) if short is not None else None,
    }


def _label(widths: list[int]) -> str:
    return "/".join(map(str, widths)) + "-bit"


def render(p: dict) -> str:
    size = format_size
    how = "given" if p["budget_given"] else (
        f"the default for this machine: the whole model, at most 60% of its "
        f"{size(p['system_memory_bytes'])}")
    hi, lo = _label(p["expert_bits_high"]), _label(p["expert_bits_low"])
    how_stored = ("as converted" if p["converted"] else
                  "estimated: as `python -m convert` would store them by default")
    lines = [
        f"{p['model']} ({p['model_type']}, read from {p['read_from']}): {p['moe_layers']} MoE layers "
        f"x {p['experts_per_layer']} experts, top-{p['experts_per_token']}",
        f"  dense weights            {size(p['dense_bytes'])}  (resident, " + (
            f"{p['dense_bits']}-bit quantized linears, the rest {p['compute_dtype']})"
            if p["dense_bits"] else f"{p['compute_dtype']} floats)"),
        f"  experts, {hi:<16}{size(p['expert_bytes_high'])}  ({how_stored})",
        f"  experts, {lo:<16}{size(p['expert_bytes_low'])}",
        f"  KV cache per token       {size(p['kv_bytes_per_token'])}" + (
            f" ({p['kv_bits']}-bit: {size(p['kv_bytes_per_token_quantized'])}"
            + (f" from {p['quantized_kv_start']} tokens on" if p["quantized_kv_start"] else "")
            + ")" if p["kv_bits"] else ""),
        f"  minimum budget           {size(p['minimum_budget_bytes'])}  (exact mode: "
        f"{size(p['minimum_budget_bytes_exact'])}; prefill activations estimated, load() measures them)",
        f"  budget                   {size(p['budget_bytes'])}  ({how})",
        f"    {hi + ' expert pool':<23}{size(p['expert_pool_bytes_high'])}  = "
        f"{100 * p['resident_share_high']:.1f}% of the {hi} experts resident",
        f"    {lo + ' expert pool':<23}{size(p['expert_pool_bytes_low'])}  = "
        f"{100 * p['resident_share_low']:.1f}% of the {lo} experts",
        f"    KV reserve             {size(p['kv_reserve_bytes'])} for {p['kv_reserve_tokens']} "
        f"tokens (the budget holds up to {p['max_context_tokens']}"
        + (f", not the {p['context_tokens_asked']} asked for"
           if p["max_context_tokens"] < p["context_tokens_asked"] else "")
        + (f"; the model is made for {p['model_context_tokens']}"
           if p["model_context_tokens"] is not None else "")
        + f"); prefill chunks of {p['prefill_chunk_tokens']} tokens",
    ]
    if p.get("short_context_tokens") and p["expert_pool_bytes_high_short"] > \
            p["expert_pool_bytes_high"]:
        lines.append(
            f"    (each sequence is planned for its own prompt and max_tokens: one within "
            f"{p['short_context_tokens']} tokens gets a {size(p['expert_pool_bytes_high_short'])} "
            f"{hi} pool = {100 * p['resident_share_high_short']:.1f}% resident)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog="python -m hobbit_mlx.plan",
        description="Print the memory plan of an MoE model before loading it (reads only its "
                    "config.json and safetensors headers).")
    parser.add_argument("model", help="a local model directory (mlx-lm, Hugging Face or hobbit) "
                                      "or a hub repo id")
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="plan for this budget (e.g. 10GB) instead of this machine's default")
    parser.add_argument("--exact", action="store_true",
                        help="plan for exact mode (high-precision experts only)")
    parser.add_argument("--max-context", type=int, default=INITIAL_CONTEXT, metavar="TOKENS",
                        help="plan for a context of this many tokens (default: %(default)s)")
    parser.add_argument("--kv-bits", type=int, default=None, metavar="BITS",
                        help="plan for a KV cache quantized to BITS bits (as load's kv_bits)")
    parser.add_argument("--kv-group-size", type=int, default=LoadOptions.kv_group_size,
                        metavar="N", help="its group size (default: %(default)s)")
    parser.add_argument("--quantized-kv-start", type=int, default=LoadOptions.quantized_kv_start,
                        metavar="TOKENS", help="quantized from this many tokens on (default: "
                                               "%(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    from convert import ConversionError

    from .architectures import UnsupportedModelError
    from .sizes import ModelNotFound
    from .store import StoreError

    try:
        budget = None if args.memory_budget is None else parse_size(args.memory_budget)
        if budget is not None and budget <= 0:
            raise ValueError(f"--memory-budget must be positive, not {args.memory_budget!r}")
        from .cli_common import CLIError
        from .cli_flags import check_kv_flags
        try:
            check_kv_flags(args)
        except CLIError as e:
            raise ValueError(str(e)) from None
        if args.max_context < 1:
            raise ValueError(f"--max-context must be at least 1, not {args.max_context}")
        options = LoadOptions(exact=args.exact, max_context=args.max_context, kv_bits=args.kv_bits,
                              kv_group_size=args.kv_group_size,
                              quantized_kv_start=args.quantized_kv_start)
        options.validate()
        p = plan_model(args.model, budget, options)
    except (ModelNotFound, UnsupportedModelError, BudgetError, StoreError, ConversionError,
            ValueError) as e:
        text = " ".join(str(e).split())
        print(f"error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(json.dumps(p, indent=2) if args.json else render(p), flush=True)
    except BrokenPipeError:
        from .cli_common import stdout_closed
        return stdout_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
