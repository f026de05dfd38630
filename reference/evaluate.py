#!/usr/bin/env python3
"""Evaluate hobbit_mlx's bundled reference model with mlx-lm (CPU is fine).

Reports, into reference/REPORT.md and reference/report.json:

* validation loss (nats/token) and bits per byte on the held-out stdlib files
  (reference/val_files.txt), next to a unigram baseline (add-one smoothed token
  unigram fit on the train split);
* greedy continuations of a few Python prompts;
* routing statistics of the trained model and of a random-initialised twin (same
  config, weights drawn like the training run's init: normal(0, 0.02), norms 1,
  quantized the same way):
    - balance: entropy of the per-layer expert-usage distribution / log(E)
    - temporal overlap: share of token t's top-k experts that were also in token
      t-1's top-k (same layer); chance = k / E
    - cross-layer recall: layer l+1's router applied to layer l's gate input (the
      hidden state entering layer l's MoE block, after its post-attention norm):
      share of layer l+1's real top-k found in that predicted top-k ("+2": layer
      l+2's router on layer l's gate input).

The corpus is rebuilt from this machine's stdlib with the model's own tokenizer
(only the files listed in val_files.txt / the train split of train.py's rule);
files missing here are reported.

    python reference/evaluate.py [--model hobbit_mlx/reference_model] [--max-tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import train as T  # noqa: E402  (corpus rules and config live there)

# Prompts end mid-line (after the ':'), not with a newline: the byte-level BPE merges a
# newline with the next line's indentation, so a prompt ending in a lone "\n" token is
# out of distribution (that token only occurs at the end of a file, before EOS).
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv=None):",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "def read_config(path):\n    with open(path) as f:\n        for i, line in enumerate(f):\n"
    "            if line.startswith('#'):",
]


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- data
def bytes_to_unicode():
    """GPT-2's byte <-> printable-unicode table, used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_byte_lengths(tok) -> np.ndarray:
    inv = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tok.get_vocab(with_added_tokens=True)
    special = set(T.SPECIAL_TOKENS)
    lens = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for s, i in vocab.items():
        lens[i] = 0 if s in special else len(bytes(inv[c] for c in s))
    return lens


def encode_files(tok, stdlib: Path, rels: list[str]):
    present = [r for r in rels if (stdlib / r).is_file()]
    texts = [T.read_text(stdlib / r) for r in present]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    ids = []
    for e in encs:
        ids.append(0)
        ids.extend(e.ids)
        ids.append(1)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return np.asarray(ids, dtype=np.int64), present, nbytes


# --------------------------------------------------------------------------- routing hook
class Recorder:
    """Monkeypatches mlx-lm's Qwen3MoeSparseMoeBlock.__call__ to record, per call (one
    per layer, in layer order), the gate input and the chosen top-k experts."""

    def __init__(self):
        from mlx_lm.models import qwen3_moe

        self.cls = qwen3_moe.Qwen3MoeSparseMoeBlock
        self.orig = self.cls.__call__
        self.records = None

    def __enter__(self):
        import mlx.core as mx

        rec = self
        orig = self.orig

        def patched(block, x):
            if rec.records is not None:
                gates = block.gate(x)
                k = block.top_k
                inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
                rec.records.append((x, inds))
            return orig(block, x)

        self.cls.__call__ = patched
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.orig


def run_windows(model, wins: np.ndarray, byte_len: np.ndarray, record: int) -> dict:
    """One forward per window (wins: [n, ctx+1]); scores every target except special
    tokens (BOS/EOS, 0 bytes); records routing for the first `record` windows."""
    import mlx.core as mx
    import mlx.nn as nn

    layers = model.model.layers
    nL = len(layers)
    X = [[] for _ in range(nL)]
    I = [[] for _ in range(nL)]
    nll_sum, n_tok, n_bytes, targets = 0.0, 0, 0, []
    t0 = time.time()
    with Recorder() as rec:
        for i, w in enumerate(wins):
            x, y = w[None, :-1], w[None, 1:]
            rec.records = [] if i < record else None
            logits = model(mx.array(x.astype(np.int32))).astype(mx.float32)
            nll = nn.losses.cross_entropy(logits, mx.array(y.astype(np.int32)), reduction="none")
            mx.eval(nll, *([a for r in rec.records for a in r] if rec.records else []))
            nll = np.array(nll)
            mask = byte_len[y] > 0
            nll_sum += float(nll[mask].sum())
            n_tok += int(mask.sum())
            n_bytes += int(byte_len[y][mask].sum())
            targets.append(y[mask])
            if rec.records is not None:
                assert len(rec.records) == nL
                for l, (xx, inds) in enumerate(rec.records):
                    X[l].append(xx[0])
                    I[l].append(np.array(inds[0]))
            if (i + 1) % 16 == 0:
                log(f"[eval]   {i + 1}/{len(wins)} windows, {time.time() - t0:.0f}s")
    dt = time.time() - t0
    loss = {
        "windows": int(len(wins)),
        "ctx": int(wins.shape[1] - 1),
        "scored_tokens": n_tok,
        "scored_bytes": n_bytes,
        "loss_nats_per_token": nll_sum / n_tok,
        "bits_per_byte": nll_sum / math.log(2) / n_bytes,
        "seconds": round(dt, 1),
        "tokens_per_s": round(len(wins) * (wins.shape[1] - 1) / dt, 1),
    }
    routing = routing_stats(model, X, I) if record else None
    return {"loss": loss, "targets": np.concatenate(targets), "routing": routing}


def routing_stats(model, X, I) -> dict:
    """X[l]: list of [ctx, H] gate inputs of layer l; I[l]: list of [ctx, k] top-k indices."""
    import mlx.core as mx

    layers = model.model.layers
    E = layers[0].mlp.num_experts
    k = layers[0].mlp.top_k
    nL = len(layers)
    Is = [np.stack(I[l]) for l in range(nL)]  # [n, ctx, k]

    def overlap(a, b):  # a, b: [..., k] -> mean |a ∩ b| / k
        eq = a[..., :, None] == b[..., None, :]
        return float(eq.any(-1).sum(-1).mean() / k)

    balance, temporal, xrecall, xrecall2 = [], [], [], []
    for l in range(nL):
        counts = np.bincount(Is[l].reshape(-1), minlength=E).astype(np.float64)
        p = counts / counts.sum()
        ent = -(p[p > 0] * np.log(p[p > 0])).sum()
        balance.append(float(ent / math.log(E)))
        temporal.append(overlap(Is[l][:, 1:], Is[l][:, :-1]))
    for l in range(nL - 1):
        for ahead, store in ((1, xrecall), (2, xrecall2)):
            if l + ahead >= nL:
                continue
            gate = layers[l + ahead].mlp.gate
            preds = [np.array(mx.argpartition(gate(x), kth=-k, axis=-1)[..., -k:]) for x in X[l]]
            store.append(overlap(np.stack(preds), Is[l + ahead]))
    return {
        "tokens": int(sum(a.shape[0] for a in I[0])),
        "num_experts": E,
        "top_k": k,
        "chance_overlap": k / E,
        "balance_per_layer": balance,
        "balance_mean": float(np.mean(balance)),
        "temporal_overlap_per_layer": temporal,
        "temporal_overlap_mean": float(np.mean(temporal)),
        "next_layer_recall_per_layer": xrecall,
        "next_layer_recall_mean": float(np.mean(xrecall)),
        "two_ahead_recall_per_layer": xrecall2,
        "two_ahead_recall_mean": float(np.mean(xrecall2)) if xrecall2 else None,
    }


def make_windows(ids: np.ndarray, ctx: int, max_tokens: int) -> np.ndarray:
    """Windows of ctx+1 tokens at evenly spaced, deterministic offsets over the whole
    validation stream (so every part of the held-out set is sampled; the files differ
    a lot in difficulty), non-overlapping; max_tokens <= 0: the whole stream."""
    n_all = (ids.size - 1) // ctx
    n_win = n_all if max_tokens <= 0 else max(1, min(n_all, max_tokens // ctx))
    starts = (np.arange(n_win) * n_all // n_win) * ctx
    return np.stack([ids[s : s + ctx + 1] for s in starts])


def unigram_bpb(train_ids: np.ndarray, targets: np.ndarray, byte_len: np.ndarray, V: int) -> dict:
    real = byte_len[:V] > 0
    counts = np.bincount(train_ids, minlength=V)[:V].astype(np.float64)
    counts = np.where(real, counts + 1.0, 0.0)  # add-one over the real (non-special) tokens
    logp = np.log(counts / counts.sum(), where=counts > 0, out=np.full(V, -np.inf))
    nll = -logp[targets].sum()
    nbytes = byte_len[targets].sum()
    return {"loss_nats_per_token": float(nll / targets.size), "bits_per_byte": float(nll / math.log(2) / nbytes)}


# --------------------------------------------------------------------------- random twin
def random_twin(model_dir: Path, seed: int = 0):
    """Same config, weights drawn like transformers' init of the training run
    (normal(0, initializer_range), norm weights 1), quantized like the checkpoint."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import quantize_model

    cfg = json.loads((model_dir / "config.json").read_text())
    q = cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    args = qwen3_moe.ModelArgs.from_dict(cfg)
    m = qwen3_moe.Model(args)
    mx.random.seed(seed)
    std = cfg.get("initializer_range", 0.02)
    new = []
    for name, p in tree_flatten(m.parameters()):
        if "norm" in name:
            new.append((name, mx.ones(p.shape, dtype=mx.float32)))
        else:
            new.append((name, (mx.random.normal(p.shape) * std).astype(mx.float32)))
    m.update(tree_unflatten(new))
    if q:
        m, _ = quantize_model(m, dict(cfg), q["group_size"], q["bits"])
    mx.eval(m.parameters())
    return m


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(T.DEFAULT_EXPORT_DIR))
    ap.add_argument("--stdlib-dir", default=None)
    ap.add_argument("--max-tokens", type=int, default=32768,
                    help="validation tokens scored (a multiple of --ctx; mlx's CPU backend runs this model at "
                         "~100-200 tokens/s on 2 cores)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--route-windows", type=int, default=16, help="windows of --ctx tokens for routing stats")
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--train-metrics", default=str(HERE / "train_metrics.json"))
    ap.add_argument("--render-only", action="store_true", help="re-render REPORT.md from report.json")
    args = ap.parse_args(argv)
    if args.render_only:
        out = Path(args.out_dir)
        (out / "REPORT.md").write_text(render_md(json.loads((out / "report.json").read_text())))
        return

    import mlx.core as mx
    from mlx_lm import generate, load
    from tokenizers import Tokenizer

    t_all = time.time()
    model_dir = Path(args.model)
    stdlib = Path(args.stdlib_dir) if args.stdlib_dir else T.default_stdlib_dir()
    log(f"[eval] mlx {mx.__version__}, device {mx.default_device()}, model {model_dir}")
    model, tokenizer = load(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    V = cfg["vocab_size"]
    byte_len = token_byte_lengths(tok)[:V]

    # ---- corpus (rebuilt from this machine's stdlib)
    val_rels = [l for l in (HERE / "val_files.txt").read_text().splitlines() if l.strip()]
    all_rels = T.list_stdlib_files(stdlib)
    train_rels = [r for r in all_rels if T.split_of(r) == "train"]
    val_ids, val_present, val_bytes = encode_files(tok, stdlib, val_rels)
    train_ids, train_present, _ = encode_files(tok, stdlib, train_rels)
    assert int(byte_len[val_ids].sum()) == val_bytes, "token byte lengths do not add up to the text"
    log(f"[eval] val: {len(val_present)}/{len(val_rels)} files, {val_ids.size:,} tokens, {val_bytes:,} bytes; "
        f"train (for the unigram): {len(train_present)} files, {train_ids.size:,} tokens")

    # ---- loss / bits per byte, and routing of the trained model on the first windows
    wins = make_windows(val_ids, args.ctx, args.max_tokens)
    # routing is recorded on the first `route_windows` windows: put an evenly spread subset first
    sel = np.unique(np.linspace(0, len(wins) - 1, min(args.route_windows, len(wins))).round().astype(int))
    wins = np.concatenate([wins[sel], np.delete(wins, sel, axis=0)])
    args.route_windows = len(sel)
    log(f"[eval] scoring {len(wins)} windows of {args.ctx} tokens ...")
    r_tr = run_windows(model, wins, byte_len, record=args.route_windows)
    res = r_tr["loss"]
    res["unigram"] = unigram_bpb(train_ids, r_tr["targets"], byte_len, V)
    log(f"[eval] val loss {res['loss_nats_per_token']:.4f} nats/token, {res['bits_per_byte']:.4f} bits/byte "
        f"({res['scored_tokens']:,} tokens, {res['tokens_per_s']} tok/s); unigram {res['unigram']['bits_per_byte']:.4f} bits/byte")

    # ---- greedy continuations
    gens = []
    for p in PROMPTS:
        ids = tokenizer.encode(p)
        if not ids or ids[0] != 0:
            ids = [0] + ids
        txt = generate(model, tokenizer, prompt=ids, max_tokens=args.gen_tokens, verbose=False)
        gens.append({"prompt": p, "continuation": txt})
        log("[eval] --- prompt:\n" + p + "\033[1m" + txt + "\033[0m")

    # ---- routing of a random-initialised twin on the same windows
    twin = random_twin(model_dir)
    r_rand = run_windows(twin, wins[: args.route_windows], byte_len, record=args.route_windows)
    route_trained, route_random, twin_loss = r_tr["routing"], r_rand["routing"], r_rand["loss"]
    for name, r in (("trained", route_trained), ("random", route_random)):
        log(f"[eval] routing {name}: balance {r['balance_mean']:.3f}, temporal overlap {r['temporal_overlap_mean']:.3f} "
            f"(chance {r['chance_overlap']:.3f}), next-layer recall {r['next_layer_recall_mean']:.3f}, "
            f"+2 recall {r['two_ahead_recall_mean']:.3f}")

    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    train_metrics = None
    tm = Path(args.train_metrics)
    if tm.exists():
        tmj = json.loads(tm.read_text())
        train_metrics = {k: tmj.get(k) for k in (
            "device_name", "torch", "transformers", "experts_implementation", "steps", "tokens", "epochs",
            "train_seconds", "best_dev_loss", "best_step", "best_tokens", "batch_size", "seq_len",
            "params_total", "params_active_per_token_wo_embedding")}
    report = {
        "model_dir": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
        "checkpoint_bytes": size,
        "config": {k: cfg[k] for k in (
            "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "norm_topk_prob", "rope_theta", "tie_word_embeddings", "quantization")},
        "python": sys.version.split()[0],
        "stdlib_dir": str(stdlib),
        "val_files": len(val_rels),
        "val_files_present": len(val_present),
        "val_tokens_total": int(val_ids.size),
        "validation": res,
        "random_twin_validation_on_routing_windows": {k: twin_loss[k] for k in (
            "scored_tokens", "loss_nats_per_token", "bits_per_byte")},
        "routing": {"trained": route_trained, "random_twin": route_random},
        "generations": gens,
        "training": train_metrics,
        "eval_seconds": round(time.time() - t_all, 1),
    }
    out = Path(args.out_dir)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "REPORT.md").write_text(render_md(report))
    log(f"[eval] wrote {out / 'REPORT.md'} and report.json in {report['eval_seconds']}s")


def render_md(r: dict) -> str:
    v = r["validation"]
    rt, rr = r["routing"]["trained"], r["routing"]["random_twin"]
    c = r["config"]
    L = []
    L.append("# Reference model — evaluation report\n")
    L.append("Generated by `python reference/evaluate.py` (mlx-lm on the CPU). Do not edit by hand.\n")
    q = c["quantization"] or {}
    per_layer = sorted({f"{v['bits']}-bit" for k, v in q.items() if isinstance(v, dict)})
    qdesc = (f"{q.get('bits')}-bit {q.get('mode', 'affine')}, group {q.get('group_size')}"
             + (f" (routers: {', '.join(per_layer)})" if per_layer else "")) if q else "none"
    L.append(f"Model: `{r['model_dir']}` ({r['checkpoint_bytes'] / 1e6:.2f} MB on disk), {c['model_type']}, "
             f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_experts']} experts/layer "
             f"(top-{c['num_experts_per_tok']}, intermediate {c['moe_intermediate_size']}), vocab {c['vocab_size']}, "
             f"quantization: {qdesc}.\n")
    L.append("## Validation (held-out stdlib files, `reference/val_files.txt`)\n")
    L.append(f"{r['val_files_present']}/{r['val_files']} files present on this machine ({r['stdlib_dir']}, "
             f"Python {r['python']}), {r['val_tokens_total']:,} tokens in all; scored: {v['windows']} windows of "
             f"{v['ctx']} tokens at evenly spaced offsets over the whole validation stream ({v['scored_tokens']:,} tokens, {v['scored_bytes']:,} "
             "bytes; BOS/EOS targets not scored).\n")
    L.append("| model | loss (nats/token) | bits/byte |")
    L.append("| --- | ---: | ---: |")
    L.append(f"| reference model (4-bit, mlx-lm) | {v['loss_nats_per_token']:.4f} | {v['bits_per_byte']:.4f} |")
    L.append(f"| unigram baseline (add-one, fit on the train split) | {v['unigram']['loss_nats_per_token']:.4f} | "
             f"{v['unigram']['bits_per_byte']:.4f} |")
    tw = r["random_twin_validation_on_routing_windows"]
    L.append(f"| random-initialised twin (routing windows only, {tw['scored_tokens']:,} tokens) | {tw['loss_nats_per_token']:.4f} | "
             f"{tw['bits_per_byte']:.4f} |")
    L.append(f"\nEval speed: {v['tokens_per_s']} tokens/s ({v['seconds']} s).\n")
    L.append(f"## Routing statistics ({rt['tokens']:,} validation tokens: {rt['tokens'] // v['ctx']} of the scored "
             "windows, evenly spread)\n")
    L.append(f"k = {rt['top_k']}, E = {rt['num_experts']}; chance temporal overlap k/E = {rt['chance_overlap']:.3f}.\n")
    L.append("| statistic | trained | random twin |")
    L.append("| --- | ---: | ---: |")
    L.append(f"| expert-usage balance, entropy / log E (mean over layers) | {rt['balance_mean']:.3f} | {rr['balance_mean']:.3f} |")
    L.append(f"| temporal overlap, token t vs t-1 (mean over layers) | {rt['temporal_overlap_mean']:.3f} | {rr['temporal_overlap_mean']:.3f} |")
    L.append(f"| next-layer recall: router l+1 on gate input of l (mean) | {rt['next_layer_recall_mean']:.3f} | {rr['next_layer_recall_mean']:.3f} |")
    L.append(f"| two-ahead recall: router l+2 on gate input of l (mean) | {rt['two_ahead_recall_mean']:.3f} | {rr['two_ahead_recall_mean']:.3f} |")
    L.append("\nPer layer (trained):\n")
    L.append("| layer | balance | temporal overlap | recall of l+1 from l | recall of l+2 from l |")
    L.append("| ---: | ---: | ---: | ---: | ---: |")
    n = len(rt["balance_per_layer"])
    for l in range(n):
        nx = rt["next_layer_recall_per_layer"][l] if l < n - 1 else None
        n2 = rt["two_ahead_recall_per_layer"][l] if l < n - 2 else None
        L.append(f"| {l} | {rt['balance_per_layer'][l]:.3f} | {rt['temporal_overlap_per_layer'][l]:.3f} | "
                 f"{'' if nx is None else f'{nx:.3f}'} | {'' if n2 is None else f'{n2:.3f}'} |")
    L.append("\n## Greedy continuations (prompt, then the model's continuation)\n")
    for g in r["generations"]:
        L.append("```python")
        L.append(g["prompt"] + g["continuation"])
        L.append("```")
        L.append(f"(the model's continuation starts after `{g['prompt'].splitlines()[-1].strip()}`)\n")
    if r.get("training"):
        t = r["training"]
        L.append("## Training run (from reference/train_metrics.json)\n")
        L.append("| | |")
        L.append("| --- | --- |")
        for k, val in t.items():
            L.append(f"| {k} | {round(val, 4) if isinstance(val, float) else val} |")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
