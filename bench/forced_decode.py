#!/usr/bin/env python3
"""Configurations compared on the same tokens: teacher-forced decoding under simulated storage.

    python bench/forced_decode.py [--model PATH] [--residencies 0.5,0.25,0.125]
        [--configs lru,exact-default,default] [--config NAME='{"t1": 0.5}' ...]
        [--prompt-tokens 64] [--tokens 256] [--pieces 2] [--storage mac-like|warm|SPEC]
        [--out bench/results] [--name NAME]

The harness decodes greedily, so a lossy configuration writes other text than an exact one, and
its routing (and with it what it reads) follows that text. Here every configuration decodes the
same held-out text one token at a time (each step is fed the true next token, as a chat reply
would be fed its tokens), so bytes read and time per token compare like for like, and the
likelihood of each next token is scored as the model decodes it: decode-mode perplexity, the
quality a user gets from the lossy techniques, which a one-pass prefill does not measure.

Per configuration and residency: decode tokens/s, time per token against exact LRU (x lru) and
against mlx-lm with the whole model resident (x mlx-lm, same loop, same process), bytes read per
token (and of them by prefetch guesses; guesses used / read per token), misses per token (4-bit /
2-bit), skipped requests, decode perplexity (ppl x: against mlx-lm's), top-1 agreement with mlx-lm
and the mean KL divergence of each next-token distribution from mlx-lm's. Storage: ``mac-like`` (default; reading one token's
top-k experts takes 12x mlx-lm's resident decode step, measured first in this process), ``warm``
(no simulation) or a ``hobbit_mlx.storage`` spec such as ``50MB/s``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench import arguments  # noqa: E402
from bench.harness import CONFIGS  # noqa: E402
from bench.harness_runs import topk_bytes_per_token  # noqa: E402
from bench.workload import heldout_texts, resolve_model_paths  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def text_pieces(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` held-out pieces of ``length`` tokens, one validation text each."""
    texts, _ = heldout_texts(max_files=max(4, 2 * count))
    pieces = [t for t in (list(tokenizer.encode(x))[:length] for x in texts) if len(t) == length]
    if len(pieces) < count:
        raise SystemExit(f"only {len(pieces)} held-out texts have {length} tokens")
    return pieces[:count]


def forced_decode(model, piece: list[int], prompt_tokens: int, *, before_prompt=None,
                  reference: dict | None = None, keep_dist: bool = False) -> dict:
    """Prefill ``prompt_tokens`` of ``piece``, then decode the rest one true token at a time.
    Returns decode seconds, and per decoded position the log-likelihood of the next token and
    the argmax; with ``keep_dist``, the next-token distribution too (``dist``: its probabilities
    and their sum times their logs, kept on the device); with ``reference`` (a ``keep_dist``
    run's return on the same piece), the KL divergence of this run's next-token distribution
    from the reference's at each position (``kl``)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if before_prompt is not None:
        before_prompt(len(piece))
    logits = model(mx.array(piece[:prompt_tokens])[None], cache=cache)[:, -1]
    mx.eval(logits)
    lls, tops, dists, kls = [], [], [], []
    t0 = time.perf_counter()
    for i in range(prompt_tokens, len(piece)):
        logp = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0].astype(mx.float32)
        lls.append(logp[piece[i]])
        tops.append(mx.argmax(logp))
        step = [lls[-1], tops[-1]]
        if keep_dist:
            p = mx.exp(logp)
            dists.append((p, (p * logp).sum()))
            step += dists[-1]
        if reference is not None:  # KL(reference || this) = sum p_ref log p_ref - sum p_ref log p
            p_ref, neg_entropy = reference["dist"][i - prompt_tokens]
            kls.append(neg_entropy - (p_ref * logp).sum())
            step.append(kls[-1])
        logits = model(mx.array([[piece[i]]]), cache=cache)[:, -1]
        mx.async_eval(logits, *step)
    mx.eval(logits)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": len(piece) - prompt_tokens,
            "ll": np.array([x.item() for x in lls]), "top": np.array([x.item() for x in tops]),
            "dist": dists, "kl": np.array([x.item() for x in kls]) if kls else None}


def run_pieces(model, pieces, prompt_tokens, before_prompt=None, references=None,
               keep_dist: bool = False) -> dict:
    """Each piece decoded (``references``: a ``keep_dist`` run's per-piece returns, for KL)."""
    runs = [forced_decode(model, p, prompt_tokens, before_prompt=before_prompt,
                          reference=None if references is None else references[i],
                          keep_dist=keep_dist)
            for i, p in enumerate(pieces)]
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    return {"seconds": seconds, "tokens": tokens, "tps": tokens / seconds,
            "ll": np.concatenate([r["ll"] for r in runs]),
            "top": np.concatenate([r["top"] for r in runs]), "pieces": runs,
            "kl": None if references is None else np.concatenate([r["kl"] for r in runs])}


def run_hobbit(paths, kwargs: dict, residency: float, storage, pieces, prompt_tokens,
               references=None) -> dict:
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    model, _ = hobbit_mlx.load(str(paths.hobbit), expert_residency=residency, progress=False,
                               simulated_storage=storage, **kwargs)
    rt = runtime_of(model)
    try:
        def before_prompt(n):
            rt.new_sequence(0, prompt_tokens, n - prompt_tokens)
        run_pieces(model, [pieces[0][:prompt_tokens + 8]], prompt_tokens, before_prompt)  # warm-up
        rt.wait_idle()
        before = dict(vars(rt.stats))
        out = run_pieces(model, pieces, prompt_tokens, before_prompt, references)
        rt.settle()
        rt.count_deferred()
        rt.wait_idle()
        after = vars(rt.stats)
    finally:
        rt.close()
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))
         and k in before}
    n = out["tokens"]
    out["per_token"] = {"bytes": d["bytes_read"] / n, "misses_high": d["misses_high"] / n,
                        "misses_low": d["misses_low"] / n, "skipped": d["skipped"] / n,
                        "requests": d["expert_requests"] / n,
                        "prefetch_bytes": d["prefetch_bytes"] / n,
                        "prefetch_issued": d["prefetch_issued"] / n,
                        "prefetch_used": d["prefetch_used"] / n}
    return out


def decode_models(models: dict, args, out_dir: Path, name: str) -> dict[str, dict]:
    """This script run on each of ``models`` ({label: hobbit model dir}) with the same
    arguments (``args``: residencies, configs, config, tokens, pieces, prompt_tokens), into
    ``<name>-<label>.md``: {label: its results (the .json)}."""
    results = {}
    for label, model in models.items():
        main(["--model", str(model), "--residencies", ",".join(map(str, args.residencies)),
              "--configs", args.configs, "--tokens", str(args.tokens),
              "--pieces", str(args.pieces), "--prompt-tokens", str(args.prompt_tokens),
              *(a for spec in args.config for a in ("--config", spec)),
              "--out", str(out_dir), "--name", f"{name}-{label}"])
        results[label] = json.loads((out_dir / f"{name}-{label}.json").read_text())
    return results


def side_by_side(results: dict[str, dict], first: str, second: str) -> list[str]:
    """A markdown table of two ``decode_models`` runs, row by row: KL (and its ratio),
    perplexity, top-1 agreement, bytes and 2-bit misses per token, as ``first / second``."""
    lines = [f"| config | residency | KL vs mlx-lm (nats): {first} / {second} | ppl x mlx-lm | "
             "top-1 agree | KiB/token | 2-bit misses / token |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(results[first]["rows"], results[second]["rows"]):
        ratio = f"{b['kl'] / a['kl']:.2f}x" if a['kl'] else "n/a"  # (an exact row: 0)
        lines.append(f"| {a['config']} | {a['residency']:.1%} | {a['kl']:.4f} / {b['kl']:.4f} "
                     f"({ratio}) | {a['ppl_x']:.3f} / {b['ppl_x']:.3f} | "
                     f"{a['top1_agree']:.3f} / {b['top1_agree']:.3f} | "
                     f"{a['bytes'] / 1024:.0f} / {b['bytes'] / 1024:.0f} | "
                     f"{a['misses_low']:.2f} / {b['misses_low']:.2f} |")
    return lines


def write_results(out_dir: Path, name: str, rows: list[dict], *, runs: int, head: list[str],
                  configs: list, json_extra: dict) -> str:
    """``<name>.md`` and ``.json`` with the rows so far, each written whole (a temporary file,
    renamed): a long run cut short keeps what it measured. Returns the markdown."""
    lines = list(head)
    if len(rows) < runs:
        lines.append(f"- **partial**: {len(rows)} of {runs} runs measured so far")
    lines += ["", "| config | residency | tok/s | x lru | x mlx-lm | KiB/token | of which guesses | "
              "guesses used / read | 4-bit misses | 2-bit misses | skipped | ppl x | top-1 agree | "
              "KL vs mlx-lm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['residency']:.1%} | {r['tps']:.3g} | "
                     f"{'n/a' if r['x_lru'] is None else format(r['x_lru'], '.2f')} | "
                     f"{r['x_mlx_lm']:.2f} | {r['bytes'] / 1024:.0f} | "
                     f"{r['prefetch_bytes'] / 1024:.0f} | {_guesses(r)} | {r['misses_high']:.2f} | "
                     f"{r['misses_low']:.2f} | {r['skipped']:.2f} | {r['ppl_x']:.3f} | "
                     f"{r['top1_agree']:.3f} | {_kl(r)} |")
    lines += ["", "Guesses used / read: prefetch guesses per decoded token (n/a: nothing "
              "prefetched). KL vs mlx-lm: the mean KL divergence of each next-token distribution "
              "from mlx-lm's at the same position, in nats (0: the same distributions; unlike "
              "perplexity, a lossy run cannot come out ahead on it by chance).", "", "Configurations: " + "; ".join(f"**{n}** `{json.dumps(k)}`" for n, k in configs)]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in ((out_dir / f"{name}.md", text),
                       (out_dir / f"{name}.json",
                        json.dumps({"rows": rows, **json_extra, "configs": dict(configs),
                                    "complete": len(rows) == runs}, indent=1))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(data)
        tmp.replace(path)
    return text


def _kl(r: dict) -> str:
    """Mean KL divergence of the run's next-token distributions from mlx-lm's, in nats
    (rows recorded before it was measured have none)."""
    return "n/a" if r.get("kl") is None else f"{r['kl']:.4f}"


def _guesses(r: dict) -> str:
    """Prefetch guesses used / read per token; n/a when nothing was prefetched."""
    if not r["prefetch_issued"]:
        return "n/a"
    return f"{r['prefetch_used']:.2f} / {r['prefetch_issued']:.2f}"


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, type=arguments.model_dir)
    ap.add_argument("--residencies", default="0.5,0.25,0.125", type=arguments.residencies)
    ap.add_argument("--configs", default="lru,exact-default,default",
                    help="harness configurations (bench/harness.py CONFIGS)")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=JSON: an extra configuration (hobbit_mlx.load options)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded per piece")
    ap.add_argument("--pieces", type=int, default=2)
    ap.add_argument("--storage", default="mac-like", type=arguments.storage("mac-like", "warm"),
                    help="mac-like, warm or a simulated device such as 50MB/s")
    ap.add_argument("--ratio", type=arguments.positive, default=None,
                    help="mac-like read/compute ratio (default 12)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    import mlx_lm

    from hobbit_mlx.loader import compute_dtype
    from hobbit_mlx.storage import MAC_READ_RATIO, mac_like, parse_storage

    if args.ratio is not None and args.storage != "mac-like":
        ap.error("--ratio goes with --storage mac-like")
    for flag, value in (("--tokens", args.tokens), ("--prompt-tokens", args.prompt_tokens),
                        ("--pieces", args.pieces)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, not {value}")
    known = dict(CONFIGS)
    want = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in want if c not in known]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {list(known)}")
    configs = [(c, known[c]) for c in want]
    for spec in args.config:
        name, _, text = spec.partition("=")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as e:
            ap.error(f"--config {spec!r}: NAME=JSON, and the JSON does not read ({e})")
        if not name or not isinstance(options, dict):
            ap.error(f"--config {spec!r}: NAME=JSON, the JSON an object of hobbit_mlx.load options")
        configs.append((name, options))
    if not configs:
        ap.error("no configuration to run (--configs, --config)")
    residencies = args.residencies
    out_dir = arguments.out_dir(ap, args.out)
    paths = resolve_model_paths(args.model)
    base, tokenizer = mlx_lm.load(str(paths.src))
    if compute_dtype() is not None:
        base.set_dtype(compute_dtype())
    pieces = text_pieces(tokenizer, args.pieces, args.prompt_tokens + args.tokens)
    run_pieces(base, [pieces[0][:args.prompt_tokens + 8]], args.prompt_tokens)  # warm-up
    ref = run_pieces(base, pieces, args.prompt_tokens, keep_dist=True)
    ref_ppl = math.exp(-ref["ll"].mean())
    if args.storage == "mac-like":
        ratio = MAC_READ_RATIO if args.ratio is None else args.ratio
        storage = mac_like(topk_bytes_per_token(paths.hobbit), 1.0 / ref["tps"], ratio=ratio)
    else:
        storage = parse_storage(None if args.storage == "warm" else args.storage)
    print(f"mlx-lm: {ref['tps']:.1f} tok/s, decode ppl {ref_ppl:.3f}; storage "
          f"{storage.describe() if storage else 'warm page cache'}", file=sys.stderr)

    stem = args.name or f"forced-{paths.name}-{args.storage}".replace("/", "-")
    head = [f"# Teacher-forced decode: {paths.name}, {args.storage} storage", "",
            f"Command: `{arguments.command(__file__, argv)}`", "",
            f"- {len(pieces)} held-out piece(s): {args.prompt_tokens}-token prompt, then "
            f"{args.tokens} tokens decoded one at a time, each fed the true next token",
            f"- mlx-lm, whole model resident: {ref['tps']:.3g} tok/s, decode perplexity "
            f"{ref_ppl:.3f}",
            f"- storage: {storage.describe() if storage else 'warm page cache (no simulation)'}"]
    json_extra = {"mlx_lm_tps": ref["tps"], "mlx_lm_ppl": ref_ppl,
                  "storage": storage.describe() if storage else None}
    rows, text = [], ""
    for residency in residencies:
        lru_tps = None
        for name, kwargs in configs:
            out = run_hobbit(paths, kwargs, residency, storage, pieces, args.prompt_tokens,
                             ref["pieces"])
            ppl = math.exp(-out["ll"].mean())
            row = {"config": name, "residency": residency, "tps": out["tps"],
                   "x_mlx_lm": out["tps"] / ref["tps"], "ppl": ppl, "ppl_x": ppl / ref_ppl,
                   "top1_agree": float((out["top"] == ref["top"]).mean()),
                   "kl": float(out["kl"].mean()), **out["per_token"]}
            if name == "lru":
                lru_tps = out["tps"]
            row["x_lru"] = out["tps"] / lru_tps if lru_tps else None
            rows.append(row)
            print(f"{name:>24} {residency:>5}: {out['tps']:6.1f} tok/s  x lru "
                  f"{row['x_lru'] or float('nan'):.2f}  KiB/token {row['bytes'] / 1024:6.0f}  "
                  f"(prefetch {row['prefetch_bytes'] / 1024:4.0f}, used / read "
                  f"{_guesses(row)})  "
                  f"ppl x {row['ppl_x']:.3f}  top-1 {row['top1_agree']:.3f}  "
                  f"KL {row['kl']:.4f}", file=sys.stderr)
            text = write_results(out_dir, stem, rows,
                                 runs=len(residencies) * len(configs), head=head,
                                 configs=configs, json_extra=json_extra)

    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
