#!/usr/bin/env python3
"""What a quantized KV cache buys under one memory budget: a long context, decoded from SSD.

    python bench/kv_quant.py [--model PATH] [--prompt-tokens 960] [--max-tokens 32]
        [--kv-bits none,8,4] [--kv-group-size 64] [--expert-share 0.5 | --budget SIZE]
        [--techniques exact[,default]] [--storage mac-like|warm|SPEC] [--read-ratio 12]
        [--prefill-storage warm|same] [--out bench/results] [--name NAME]

``hobbit_mlx.load(..., kv_bits=8|4)`` quantizes the KV cache as mlx-lm's ``kv_bits`` does, and the
budget plans for it (``hobbit_mlx/kv_quant.py``, ``BudgetPlan.kv_bytes``): a long context's KV
then takes less of the budget and the expert pools get the rest, so fewer experts are read per
decoded token. This measures that trade on one long prompt.

- **Model**: by default a KV-heavy variant of the synthetic model, built once into
  ``bench/results/tmp/synthetic-kv`` with ``make_synthetic.py``'s builder: 4 layers, hidden 1024,
  head dim 128, 8 query and 8 KV heads (32 KiB of float32 KV per token), 64 experts of
  intermediate 512 (0.84 MiB at 4-bit; 216 MiB in all), top-8, random weights, token embeddings
  x4 (``KV_MODEL_EMBED_SCALE``: without it every token of a long context routes to the same
  experts). Why not the synthetic model itself (hidden 2048, 4 KV heads, 2.5 MiB experts): its
  16 KiB of KV per token against 720 MiB of experts weigh what Qwen3-30B-A3B's KV does at 32k
  tokens only past ~8k tokens, and this CPU prefills it at ~7 tokens/s (mlx-lm with every
  weight resident too), so a few thousand tokens per configuration take most of an hour. The
  variant holds ~9x the KV per expert byte and computes ~3x faster: a ~1k-token prompt puts
  it where Qwen3-30B-A3B is at 32k (the unquantized KV ~20% of the budget, ~17% of the expert
  bytes). ``--model`` takes another mlx-lm checkpoint or converted hobbit model (as
  ``workload.resolve_model_paths``; ``bench/results/tmp/synthetic/mlx`` is the synthetic
  model). The bundled reference model cannot be used: its head dimension (40) is divided by no
  group size MLX quantizes with.
- **Text**: ``--prompt-tokens`` + ``--max-tokens`` tokens of held-out text (the validation files
  one after another). The prompt is prefilled chunk by chunk (mlx-lm's ``generate_step`` order:
  all but its last token, the cache quantized after every call), then ``--max-tokens``
  one-token steps are **teacher-forced** (the prompt's last token, then each true next token, as
  ``forced_decode.py``): a random model's greedy text soon repeats one token, whose routing never
  changes, so nothing would be read.
- **Budget**: the same ``memory_budget`` for every configuration: ``--budget``, or what the
  unquantized plan needs for this context at least (dense weights, a 16-token call's activations
  attending to the context, the context's KV) plus ``--expert-share`` of the 4-bit experts. The
  unquantized KV's share of it is printed. Each run reports the plan
  (``runtime_of(model).plan``) for the sequence: KV reserve, activation reserve and the chunk it
  holds, expert pool bytes (4-bit + 2-bit) and the share of the 4-bit experts the pools hold.
- **Configurations**: ``kv_bits`` in ``--kv-bits`` (group ``--kv-group-size``, quantized from the
  first token, ``quantized_kv_start=0``), for each of ``--techniques``: ``exact`` (exact=True,
  no prefetch) and ``default`` (``load``'s defaults, lossy).
- **Storage**: ``mac-like`` (default): mlx-lm's decode time per token with the whole model
  resident is measured once (128-token prompt, float32 on the CPU), and one simulated device on
  which one token's top-k 4-bit experts take ``--read-ratio`` (12) x that serves every run
  (``hobbit_mlx/storage.py``), as in ``harness.py --storage mac-like``; ``warm`` (the page
  cache); or a storage spec such as ``50MB/s``. ``--prefill-storage warm`` (default) takes the
  device away (``reader.device``) while the prompt's chunks run and gives it back for the
  one-token steps: chunk by chunk a prefill reads nearly every expert per chunk, minutes per run
  at the simulated bandwidth that say nothing about decoding. ``same``: the prefill reads from
  the simulated device too.

Per run: prefill seconds (the prompt's chunks), decode tokens/s (the one-token steps: N over
their time), experts served from memory in the decode steps (hits / requests from
``offload_stats``, before and after them), KiB read per decoded token, MLX's peak memory against
the budget, and each step's argmax against the first unquantized run's (same inputs): the share
of steps before the first difference and the share equal overall (the decode perplexity of the
held-out text is in the JSON; with random weights it says nothing). Prints a table and writes
``<out>/<name>.md`` (the command first) and ``.json``; default name ``kv-quant-<model>``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench.harness_report import write_results  # noqa: E402
from bench.harness_runs import mac_like_storage  # noqa: E402
from bench.workload import RESULTS, TMP, heldout_texts, resolve_model_paths  # noqa: E402

TECHNIQUES = {"exact": {"exact": True, "prefetch_layers": 0}, "default": {}}
MIB = 2 ** 20
# The default model: the synthetic model's builder, KV-heavy (see the module docstring).
KV_MODEL = TMP / "synthetic-kv"
KV_MODEL_DIMS = dict(layers=4, experts=64, hidden=1024, moe_intermediate=512, top_k=8, vocab=512)
KV_MODEL_KV_HEADS = 8
# Its token embeddings are scaled up so that each token's own embedding weighs in the residual
# stream: with mlx-lm's random initialisation, attention over a long context (near uniform with
# random weights) adds nearly the same vector at every position, and every token then routes to
# the same experts (teacher-forced decode after a 960-token prompt: 99.5% served at 40% of the
# experts resident). x4: LRU serves 0.53 / 0.77 / 0.82 of the requests at 20 / 40 / 50% of each
# layer's experts (48 teacher-forced tokens after 480, pools starting empty), near the bundled
# reference model's trained routing (LRU 0.48 at 25%, 0.81 at 50%); x16 is near uniform.
KV_MODEL_EMBED_SCALE = 4
CALIBRATION_PROMPT = 128  # tokens of the prompt mlx-lm's resident decode time is measured on


def ensure_kv_model(log=print) -> Path:
    """The default model's mlx-lm checkpoint, built (and converted) once."""
    from bench import make_synthetic as ms

    config = ms.synthetic_config(**KV_MODEL_DIMS)
    config["num_key_value_heads"] = KV_MODEL_KV_HEADS
    stamp = {"routing": "random", "made_by": "bench/kv_quant.py", "seed": 0,
             "dims": {**KV_MODEL_DIMS, "kv_heads": KV_MODEL_KV_HEADS,
                      "embed_scale": KV_MODEL_EMBED_SCALE}, "config": config}

    def build(out: Path) -> None:
        import mlx.core as mx

        ms.build_checkpoint(out, config, seed=0, log=log)
        # the token embeddings x EMBED_SCALE (a 4-bit embedding's scales and biases: exact)
        for f in sorted(out.glob("*.safetensors")):
            weights = mx.load(str(f))
            keys = [k for k in weights if k.startswith("model.embed_tokens.")
                    and k.endswith((".scales", ".biases"))]
            if keys:
                for k in keys:
                    weights[k] = weights[k] * KV_MODEL_EMBED_SCALE
                mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})

    src, _ = ms.build_once(KV_MODEL, stamp, build, same_keys=("dims", "config", "seed"), log=log)
    return src


def long_prompt(tokenizer, n: int) -> tuple[list[int], str]:
    """``n`` tokens of held-out text: the validation files one after another (repeated if they
    run out)."""
    texts, source = heldout_texts(max_files=64)
    tokens: list[int] = []
    lists = [t for t in (list(tokenizer.encode(x)) for x in texts) if t]
    while len(tokens) < n:
        for t in lists:
            tokens.extend(t)
            if len(tokens) >= n:
                break
    return [int(t) for t in tokens[:n]], source


def derive_budget(plan, context: int, share: float) -> dict:
    """The unquantized plan's least for ``context`` (dense + a 16-token call's activations
    attending to it + its KV) plus ``share`` of the 4-bit experts."""
    chunk = plan.activation_points[0][0]
    parts = {"dense_bytes": plan.dense_bytes,
             "activation_bytes": plan.activation_for(chunk, context),
             "activation_chunk": chunk, "kv_bytes": plan.kv_bytes(context),
             "expert_bytes": int(share * plan.all_high_bytes), "expert_share": share,
             "all_high_bytes": plan.all_high_bytes}
    parts["budget_bytes"] = (parts["dense_bytes"] + parts["activation_bytes"] + parts["kv_bytes"]
                             + parts["expert_bytes"])
    return parts


def _counters(model) -> dict:
    import hobbit_mlx

    s = hobbit_mlx.offload_stats(model)
    return {k: s[k] for k in ("expert_requests", "hits_high", "hits_low", "misses_high",
                              "misses_low", "skipped", "bytes_read", "host_syncs")}


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def plan_summary(rt) -> dict:
    """The budget's split for the sequence now planned, and the share of the experts the 4-bit
    pools hold."""
    p = rt.plan
    high_pools = {id(pool): pool for layer in rt.manifest.layers
                  if (pool := rt.cache.pool_for(layer.layer, "high")) is not None}
    slots = sum(pool.slots for pool in high_pools.values())
    experts = sum(layer.num_experts for layer in rt.manifest.layers)
    return {"budget_bytes": p.budget_bytes, "dense_bytes": p.dense_bytes,
            "kv_reserve_bytes": p.kv_reserve_bytes, "kv_tokens": p.kv_tokens,
            "kv_bytes_per_token": (p.kv_quantized[0] if p.kv_quantized else p.kv_bytes_per_token),
            "activation_reserve_bytes": p.activation_reserve_bytes, "chunk_tokens": p.chunk_tokens,
            "high_expert_bytes": p.high_expert_bytes, "low_expert_bytes": p.low_expert_bytes,
            "expert_pool_bytes": p.expert_cache_bytes, "all_high_bytes": p.all_high_bytes,
            "high_slots": slots, "experts": experts, "resident_share": slots / experts}


def run_one(paths, name: str, techniques: str, kv_bits, args, budget: int, storage,
            text: list[int]) -> dict:
    """One configuration: a fresh load, the budget planned for this sequence, the prompt
    (``text[:prompt_tokens]``) prefilled chunk by chunk but for its last token (without the
    simulated device unless ``--prefill-storage same``), then ``max_tokens`` one-token steps,
    teacher-forced: the prompt's last token, then each next token of ``text``."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    n_prompt, n = args.prompt_tokens, args.max_tokens
    prompt, targets = text[:n_prompt], text[n_prompt:n_prompt + n]
    context = n_prompt + n
    options = dict(TECHNIQUES[techniques], memory_budget=budget, max_context=context,
                   kv_bits=kv_bits, kv_group_size=args.kv_group_size, quantized_kv_start=0,
                   simulated_storage=storage)
    row = {"config": name, "techniques": techniques, "kv_bits": kv_bits,
           "load_options": {k: v for k, v in options.items() if k != "simulated_storage"}}
    gc.collect()
    mx.clear_cache()
    t0 = time.perf_counter()
    model, _ = hobbit_mlx.load(str(paths.hobbit), progress=False, **options)
    rt = runtime_of(model)
    row["load_s"] = time.perf_counter() - t0
    device = rt.reader.device
    try:
        # what hobbit_mlx.stream_generate does before a generation (_with_defaults): the budget
        # planned for this prompt and the tokens after it, prefill chunks no longer than the
        # plan's, and mlx-lm's KV quantization as load() set it (generate_step's order: the
        # cache quantized after every model call once it holds quantized_kv_start tokens)
        rt.new_sequence(0, n_prompt, n)
        step = max(1, min(rt.prefill_step_size, rt.plan.chunk_tokens))
        kv = rt.kv_quant.generate_kwargs() if rt.kv_quant is not None else {}
        row["plan"] = plan_summary(rt)

        def quantize(cache) -> None:
            if kv:
                maybe_quantize_kv_cache(cache, kv["quantized_kv_start"], kv["kv_group_size"],
                                        kv["kv_bits"])

        cache = make_prompt_cache(model)
        ids = mx.array(prompt)
        before = _counters(model)
        if args.prefill_storage == "warm":
            rt.reader.device = None  # the page cache while the prompt's chunks run
        t_prefill = time.perf_counter()
        for i in range(0, n_prompt - 1, step):  # mlx-lm's generate_step: all but the last token
            model(ids[i:min(i + step, n_prompt - 1)][None], cache=cache)
            quantize(cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        prefill_s = time.perf_counter() - t_prefill
        rt.wait_idle()
        rt.reader.device = device
        mid = _counters(model)
        # decode, teacher-forced: step i is fed the true token before targets[i], and its
        # log-likelihood of targets[i] and its argmax are kept
        inputs = [prompt[-1]] + targets[:-1]
        lls, tops = [], []
        t_decode = time.perf_counter()
        logits = None
        for i, tok in enumerate(inputs):
            logits = model(mx.array([[tok]]), cache=cache)[:, -1]
            quantize(cache)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            lls.append(logp[0, targets[i]])
            tops.append(mx.argmax(logits, axis=-1)[0])
            mx.async_eval(lls[-1], tops[-1])
        mx.eval(lls, tops)
        decode_s = time.perf_counter() - t_decode
        rt.settle()
        rt.count_deferred()
        after = _counters(model)
        peak = mx.get_peak_memory()
        row["plan_after"] = plan_summary(rt)
        ll = np.array([x.item() for x in lls])
        top = [int(x.item()) for x in tops]
        del cache, logits, lls, tops
    finally:
        rt.reader.device = device
        rt.close()
        del model, rt
        gc.collect()
        mx.clear_cache()
    prefill, decode = _diff(before, mid), _diff(mid, after)
    served = decode["hits_high"] + decode["hits_low"]
    demand = served + decode["misses_high"] + decode["misses_low"]
    row.update(
        top=top, ll=ll.tolist(), ppl=float(np.exp(-ll.mean())),
        prompt_tokens=n_prompt, decode_tokens=n, prefill_step=step,
        prefill_s=prefill_s, prefill_tps=(n_prompt - 1) / prefill_s if prefill_s > 0 else None,
        decode_s=decode_s, decode_tps=n / decode_s,
        decode_served=served / demand if demand else None,
        decode_requests_per_token=decode["expert_requests"] / n,
        decode_bytes_per_token=decode["bytes_read"] / n,
        decode_misses_per_token=(decode["misses_high"] + decode["misses_low"]) / n,
        prefill_bytes=prefill["bytes_read"], bytes_read=after["bytes_read"] - before["bytes_read"],
        peak_bytes=peak, peak_vs_budget=peak / budget, decode_counters=decode)
    return row


def agreement(tokens: list[int], ref: list[int]) -> dict:
    n = min(len(tokens), len(ref))
    first = next((i for i in range(n) if tokens[i] != ref[i]), n)
    return {"prefix": first / n if n else None, "overall": sum(
        a == b for a, b in zip(tokens, ref)) / n if n else None, "first_difference": first
            if first < n else None}


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    b = m["budget"]
    lines = [f"# A quantized KV cache under one memory budget: {m['model']['name']}", "",
             f"Command: `{m['command']}`", "",
             f"- model: `{m['model']['src']}` ({m['model']['routing']} routing); KV "
             f"{m['kv_bytes_per_token'] / 1024:.1f} KiB per token unquantized "
             f"({m['kv_dtype']})",
             f"- text: {m['prompt_tokens']}-token prompt of held-out text prefilled chunk by "
             f"chunk, then {m['max_tokens']} one-token steps teacher-forced on the text after it "
             f"(context {m['context']} tokens)",
             f"- memory budget: **{b['budget_bytes'] / MIB:.1f} MiB** for every run"
             + (f" = dense {b['dense_bytes'] / MIB:.1f} + activations of a "
                f"{b['activation_chunk']}-token call attending to the context "
                f"{b['activation_bytes'] / MIB:.1f} + unquantized KV of the context "
                f"{b['kv_bytes'] / MIB:.1f} + {b['expert_share']:.0%} of the 4-bit experts "
                f"({b['all_high_bytes'] / MIB:.0f} MiB) {b['expert_bytes'] / MIB:.1f} MiB"
                if "dense_bytes" in b else " (given)")
             + f"; the unquantized KV reserve is **{m['kv_share_unquantized']:.0%}** of it",
             f"- storage: {m['storage_detail']}; prefill: {m['prefill_storage_detail']}",
             f"- machine: {m['machine']}; {m['date']}; {m['wall_s']:.0f} s in all", "",
             "| config | KV reserve MiB (of budget) | act. reserve MiB (chunk) | expert pools MiB "
             "| 4-bit experts resident | prefill s | decode tok/s | x unquantized | served "
             "(decode) | KiB read / token | peak / budget | top-1 same until | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["plan"]
        agree = r["agreement"]
        lines.append(
            f"| {r['config']} | {p['kv_reserve_bytes'] / MIB:.1f} "
            f"({p['kv_reserve_bytes'] / p['budget_bytes']:.0%}) | "
            f"{p['activation_reserve_bytes'] / MIB:.1f} ({p['chunk_tokens']}) | "
            f"{p['expert_pool_bytes'] / MIB:.1f} | {p['high_slots']}/{p['experts']} "
            f"({p['resident_share']:.1%}) | {r['prefill_s']:.1f} | "
            f"{_f(r['decode_tps'], '.3f')} | {_f(r['x_unquantized'], '.2f')} | "
            f"{_f(r['decode_served'], '.3f')} | {r['decode_bytes_per_token'] / 1024:.0f} | "
            f"{r['peak_vs_budget']:.2f} | {_f(agree['prefix'], '.0%')} | "
            f"{_f(agree['overall'], '.0%')} |")
    lines += ["", "KV reserve, activation reserve (and the prefill chunk it holds) and expert "
              "pools: `runtime_of(model).plan` for this sequence (prompt + decoded tokens). 4-bit "
              "experts resident: pool slots / experts. Prefill: the prompt's chunks (all but its "
              "last token). Decode tok/s: the one-token steps, N over their time; x unquantized: "
              "against the same techniques with `kv_bits=None`. Served: the decode steps' expert "
              "requests served from memory. Peak: MLX's peak memory over the run. Top-1 same "
              f"until / agree: each step's argmax against `{m['reference_config']}`'s on the same "
              "inputs, the share of steps before the first difference and the share equal "
              "overall."]
    return "\n".join(lines) + "\n"


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _kv_bits(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "16", "off"):
            out.append(None)
        elif part:
            out.append(int(part))
    return out


def head_dim(model: str | Path) -> int | None:
    """The attention head dimension in ``model``'s config.json (``head_dim``, else hidden size /
    heads); None when it does not say (no config, or attention whose keys are shaped otherwise)."""
    import json

    path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    if any(k in config for k in ("kv_lora_rank", "qk_rope_head_dim")):
        return None  # (multi-head latent attention: its cache is not head_dim wide)
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


@arguments.refuse_bad_input
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, type=arguments.model_dir,
                    help="mlx-lm checkpoint or hobbit model directory (default: a KV-heavy "
                         "synthetic model, built once under bench/results/tmp/synthetic-kv)")
    ap.add_argument("--prompt-tokens", type=int, default=960)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-bits", default="none,8,4", help="comma-separated: none, 8, 4, ...")
    ap.add_argument("--kv-group-size", type=int, default=64)
    ap.add_argument("--expert-share", type=float, default=0.5,
                    help="budget = the unquantized plan's least for the context + this share of "
                         "the 4-bit experts (default 0.5)")
    ap.add_argument("--budget", default=None, type=arguments.size,
                    help="a memory budget instead (e.g. 300MB)")
    ap.add_argument("--techniques", default="exact", help="exact, default or exact,default")
    ap.add_argument("--storage", default="mac-like", type=arguments.storage("mac-like", "warm"),
                    help="mac-like, warm or a spec (50MB/s)")
    ap.add_argument("--read-ratio", type=arguments.positive, default=None,
                    help="mac-like: one token's top-k expert reads / mlx-lm's resident time per "
                         "token (default 12)")
    ap.add_argument("--prefill-storage", choices=["warm", "same"], default="warm",
                    help="warm (default): the prompt's chunks read from the page cache; same: "
                         "from the simulated device too")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    techniques = [t.strip() for t in a.techniques.split(",") if t.strip()]
    if not techniques or any(t not in TECHNIQUES for t in techniques):
        ap.error(f"--techniques: a comma-separated list of {', '.join(TECHNIQUES)}")
    try:
        bits = _kv_bits(a.kv_bits)
    except ValueError:
        ap.error(f"--kv-bits: comma-separated bit widths or none, not {a.kv_bits!r}")
    if not bits:
        ap.error("--kv-bits: at least one setting")
    from hobbit_mlx.kv_quant import KVQuant

    for b in bits:
        if b is not None:
            try:
                KVQuant(b, a.kv_group_size).check()
            except ValueError as e:
                ap.error(str(e))
    if any(b is not None for b in bits) and a.model is not None:
        dim = head_dim(a.model)
        if dim is not None and dim % a.kv_group_size:
            from hobbit_mlx.quantizable import supported_group_sizes

            fits = [g for g in supported_group_sizes() if dim % g == 0]
            ap.error(f"--kv-group-size {a.kv_group_size} does not divide this model's head "
                     f"dimension {dim}: " + (f"--kv-group-size {', '.join(map(str, fits))} would"
                                            if fits else "no group size MLX quantizes with "
                                            "does, so its KV cache cannot be quantized"))
    if a.prompt_tokens < 2 or a.max_tokens < 2:
        ap.error("--prompt-tokens and --max-tokens must be at least 2")
    if not 0 < a.expert_share <= 1:
        ap.error("--expert-share is a share of the experts in (0, 1]")
    if a.read_ratio is not None and a.storage != "mac-like":
        ap.error("--read-ratio goes with --storage mac-like")
    out = arguments.out_dir(ap, a.out)

    import mlx.core as mx
    import mlx_lm.utils

    import hobbit_mlx
    from bench.harness_report import _machine
    from hobbit_mlx.budget import parse_size
    from hobbit_mlx.loader import compute_dtype, runtime_of
    from hobbit_mlx.storage import parse_storage

    t_start = time.perf_counter()
    paths = resolve_model_paths(a.model if a.model is not None else
                                ensure_kv_model(lambda *x: print(*x, file=sys.stderr)))
    tokenizer = mlx_lm.utils.load_tokenizer(paths.src)
    text, source = long_prompt(tokenizer, a.prompt_tokens + a.max_tokens)
    prompt = text[:a.prompt_tokens]
    context = len(text)

    # The budget: given, or the unquantized plan's least for this context + a share of experts.
    model, _ = hobbit_mlx.load(str(paths.hobbit), progress=False, max_context=context,
                               **TECHNIQUES[techniques[0]])
    plan = runtime_of(model).plan
    kv_per_token = plan.kv_bytes_per_token
    kv_dtype = str(compute_dtype() or "the model's dtype").replace("mlx.core.", "")
    if a.budget is not None:
        derivation = {"budget_bytes": parse_size(a.budget)}
    else:
        derivation = derive_budget(plan, context, a.expert_share)
    unquantized_kv, least = plan.kv_bytes(context), plan.minimum_bytes
    runtime_of(model).close()
    del model, plan
    gc.collect()
    mx.clear_cache()
    if a.budget is not None and None in bits and derivation["budget_bytes"] < least:
        # (before mlx-lm's calibration; a quantized KV cache may fit in a little less)
        ap.error(f"--budget {a.budget} is below the least this model runs in unquantized "
                 f"({least / MIB:.2f} MiB: dense weights, a first chunk's activations and KV, "
                 "one layer's top-k experts)")
    budget = derivation["budget_bytes"]
    print(f"[kv-quant] {paths.name}: {len(prompt)}-token prompt + {a.max_tokens} tokens; budget "
          f"{budget / MIB:.1f} MiB, the unquantized KV of the context {unquantized_kv / MIB:.1f} "
          f"MiB = {unquantized_kv / budget:.0%} of it", file=sys.stderr)

    storage, storage_detail, calibration = None, "warm page cache (no simulation)", None
    if a.storage == "mac-like":
        storage, calibration, storage_detail = mac_like_storage(
            paths, prompt[:CALIBRATION_PROMPT], a.read_ratio)
        storage_detail += f" ({CALIBRATION_PROMPT}-token prompt)"
    elif a.storage != "warm":
        storage = parse_storage(a.storage)
        storage_detail = f"simulated: {storage.describe()}"
    prefill_detail = ("the prompt's chunks read from the page cache (the simulated device "
                      "taken away until the last prompt token)" if a.prefill_storage == "warm"
                      and storage is not None else "the same storage")
    print(f"[kv-quant] {storage_detail}", file=sys.stderr)

    configs = [(t, b) for t in techniques for b in bits]
    rows = []
    for t, b in configs:
        name = t + ("" if b is None else f" kv{b}")
        row = run_one(paths, name, t, b, a, budget, storage, text)
        rows.append(row)
        p = row["plan"]
        print(f"[kv-quant] {name:>12}: KV {p['kv_reserve_bytes'] / MIB:.1f} MiB, pools "
              f"{p['expert_pool_bytes'] / MIB:.1f} MiB ({p['resident_share']:.1%} of the experts),"
              f" chunk {p['chunk_tokens']}; prefill {row['prefill_s']:.1f} s, decode "
              f"{_f(row['decode_tps'], '.3f')} tok/s, served {_f(row['decode_served'], '.3f')}, "
              f"{row['decode_bytes_per_token'] / MIB:.1f} MiB/token, peak "
              f"{row['peak_vs_budget']:.2f} of the budget", file=sys.stderr)
    ref = next((r for r in rows if r["kv_bits"] is None), rows[0])
    for r in rows:
        base = next((x for x in rows if x["techniques"] == r["techniques"]
                     and x["kv_bits"] is None), None)
        r["x_unquantized"] = (r["decode_tps"] / base["decode_tps"]
                              if base and r["decode_tps"] and base["decode_tps"] else None)
        r["agreement"] = agreement(r["top"], ref["top"])
        r["ppl_x"] = r["ppl"] / ref["ppl"]

    name = a.name or f"kv-quant-{paths.name}"
    result = {
        "meta": {"command": arguments.command(__file__, argv),
                 "model": paths.as_dict(), "prompt_tokens": len(prompt),
                 "prompt_source": source, "max_tokens": a.max_tokens, "context": context,
                 "kv_bytes_per_token": kv_per_token, "kv_dtype": kv_dtype,
                 "kv_group_size": a.kv_group_size, "budget": derivation,
                 "unquantized_kv_bytes": unquantized_kv,
                 "kv_share_unquantized": unquantized_kv / budget,
                 "storage": a.storage, "storage_detail": storage_detail,
                 "prefill_storage": a.prefill_storage, "prefill_storage_detail": prefill_detail,
                 "calibration": calibration, "reference_config": ref["config"],
                 "machine": _machine(), "mlx": mx.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "wall_s": time.perf_counter() - t_start},
        "rows": rows,
    }
    out = Path(a.out)
    text = markdown(result)
    write_results(out, name, result, text)
    print(text)
    print(f"[kv-quant] wrote {out / name}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
