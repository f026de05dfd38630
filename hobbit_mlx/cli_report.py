"""The report the command-line tools print after a generation.

Its own module because it only reads and formats statistics, apart from running, loading and
the flags: the run's ``offload_stats`` with mlx-lm's timings, every pipeline rank's stats, and
the lines printed under ``SEPARATOR`` (speed, memory against the budget, expert cache, storage
reads, prefetch, speculation, pipeline ranks).
"""

from __future__ import annotations

import sys

from .budget import format_size

SEPARATOR = "=========="


def run_stats(model, response, wall_s: float, load_s: float | None = None) -> dict:
    """``offload_stats`` plus the generation's timings (from mlx-lm's last response)."""
    from . import offload_stats

    s = offload_stats(model)
    gen = response.generation_tokens if response is not None else 0
    s.update(
        prompt_tokens=response.prompt_tokens if response is not None else 0,
        prompt_tps=float(response.prompt_tps) if response is not None else 0.0,
        generation_tokens=gen,
        generation_tps=float(response.generation_tps) if response is not None else 0.0,
        finish_reason=response.finish_reason if response is not None else None,
        wall_s=wall_s,
        bytes_read_per_token=(s["bytes_read"] / gen) if gen else 0.0,
    )
    if load_s is not None:
        s["load_s"] = load_s
    spec = getattr(getattr(model, "_hobbit", None), "speculative_stats", None)
    if spec is not None:
        s["speculation"] = spec.summary()
    return s


def gather_ranks(model, stats: dict) -> dict:
    """With a pipeline, every rank's stats under ``ranks`` (a collective: all ranks call it)."""
    from .pipeline import gather_json, pipeline_of

    pipe = pipeline_of(model)
    if pipe is None:
        return stats
    stats["pipeline"] = pipe.describe()
    stats["ranks"] = gather_json(pipe.group, stats)
    return stats


def format_rank(s: dict) -> str:
    """One line per pipeline rank: its layers, memory against its budget, hits and reads."""
    p = s["pipeline"]
    budget = s.get("budget_bytes") or 0
    peak = s.get("peak_memory_bytes", 0)
    share = f" ({100.0 * peak / budget:.0f}%)" if budget else ""
    return (f"Rank {p['rank']}: layers {p['layers'][0]}-{p['layers'][1] - 1}, peak "
            f"{format_size(peak)} of {format_size(budget)}{share}, hit rate "
            f"{100.0 * s.get('hit_rate', 0.0):.1f}%, read {format_size(s.get('bytes_read', 0))}")


def format_report(s: dict) -> list[str]:
    lines = [
        f"Prompt: {s['prompt_tokens']} tokens, {s['prompt_tps']:.3f} tokens-per-sec",
        f"Generation: {s['generation_tokens']} tokens, {s['generation_tps']:.3f} tokens-per-sec",
    ]
    budget = s.get("budget_bytes") or 0
    peak = s.get("peak_memory_bytes", 0)
    mem = f"Peak memory: {format_size(peak)}"
    if budget:
        mem += f" of {format_size(budget)} budget ({100.0 * peak / budget:.0f}%)"
    if "expert_cache_bytes" in s:
        mem += (f"; expert cache {format_size(s.get('resident_expert_bytes', 0))} resident of "
                f"{format_size(s['expert_cache_bytes'])}")
    lines.append(mem)
    misses = s.get("misses_high", 0) + s.get("misses_low", 0)
    experts = (f"Experts: {s.get('expert_requests', 0)} requests, hit rate "
               f"{100.0 * s.get('hit_rate', 0.0):.1f}% (4-bit hits {s.get('hits_high', 0)}, "
               f"2-bit hits {s.get('hits_low', 0)}, misses {misses}")
    if s.get("misses_low"):
        experts += f" [4-bit {s.get('misses_high', 0)}, 2-bit {s['misses_low']}]"
    if s.get("skipped"):
        experts += f", skipped {s['skipped']}"
    lines.append(experts + ")" + (f"; cache policy {s['policy']}" if s.get("policy") else ""))
    per_tok = (f", {format_size(s['bytes_read'] / s['generation_tokens'])} per generated token"
               if s.get("generation_tokens") else "")
    span_reads = {"together": "; an expert's spans read together",
                  "in turn": "; an expert's spans read in turn",
                  "trying": "; still timing whether an expert's spans read faster together"}.get(
        s.get("span_reads"), "") if s.get("bytes_read") else ""
    lines.append(f"Read from storage: {format_size(s.get('bytes_read', 0))}{per_tok}{span_reads}")
    if s.get("prefetch_issued") or s.get("prediction_total"):
        precision = s.get("prefetch_precision")
        recall = s.get("prediction_recall")
        lines.append(f"Prefetch: {s.get('prefetch_issued', 0)} reads issued, {s.get('prefetch_used', 0)} used"
                     + (f" (precision {100.0 * precision:.0f}%)" if precision is not None else "")
                     + (f"; next-layer prediction recall {100.0 * recall:.0f}%" if recall is not None else ""))
        by_distance = s.get("prediction_recall_by_distance") or {}
        if len(by_distance) > 1:
            lines.append("Prediction recall by distance: " + ", ".join(
                f"{d} layer{'s' if int(d) > 1 else ''} ahead {100.0 * r:.0f}%" for d, r in by_distance.items()))
        widths = s.get("prefetch_widths")
        if isinstance(widths, dict) and widths:
            lines.append("Adaptive prediction width (experts per token): " + ", ".join(
                f"layer {layer} {w}" for layer, w in widths.items()))
    sp = s.get("speculation")
    if sp:
        rate = sp.get("acceptance_rate")
        lines.append(
            f"Speculative: {sp['drafted']} drafted, {sp['accepted']} accepted"
            + (f" ({100.0 * rate:.0f}%)" if rate is not None else "")
            + f", {sp['passes']} passes ({sp['plain_passes']} without drafts), "
            f"{sp['reads_per_token']:.1f} expert reads per token; draft {sp['draft_s']:.2f} s, "
            f"verify {sp['verify_s']:.2f} s, of which waiting for reads {sp['read_s']:.2f} s")
    if s.get("little_token_share") is not None:
        lines.append(f"Big-little: {100.0 * s['little_token_share']:.0f}% of routed tokens ran top-k/2")
    wall = f"Wall time: {s.get('wall_s', 0.0):.2f} s"
    if s.get("load_s") is not None:
        wall += f" (load {s['load_s']:.2f} s)"
    lines.append(wall)
    if s.get("ranks"):
        lines.append(f"Pipeline: {len(s['ranks'])} ranks ({s['pipeline']['kind']} split "
                     f"{s['pipeline']['split']}); the lines above are rank {s['pipeline']['rank']}'s")
        lines.extend(format_rank(r) for r in s["ranks"])
    return lines


def print_report(s: dict, file=None) -> None:
    file = file or sys.stderr
    print(SEPARATOR, file=file)
    for line in format_report(s):
        print(line, file=file)
    file.flush()
