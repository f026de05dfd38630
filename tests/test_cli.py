"""The command line tools: ``python -m hobbit_mlx.generate`` and ``python -m hobbit_mlx.chat``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hobbit_mlx.testing import child_env

REPO = Path(__file__).resolve().parents[1]
REPORT_LINES = ("Prompt:", "Generation:", "Peak memory:", "hit rate", "Read from storage:")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny qwen3_moe model, converted once for this module."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("cli")
    src = make_tiny_model("qwen3_moe", root / "mlx")
    return Path(convert(src, root / "hobbit", progress=False))


@pytest.fixture(scope="module")
def env():
    return child_env()


def run(env, module, *args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", f"hobbit_mlx.{module}", *map(str, args)],
                          input=stdin, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def assert_bad_input(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_generate_streams_and_reports(model_dir, env):
    p = run(env, "generate", "--model", model_dir, "--prompt", "def hello(x):", "--max-tokens", 8,
            "--expert-residency", 0.5, "--exact", "--temp", 0.7, "--seed", 0)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout.endswith("\n")  # the streamed text (random weights: it may be anything)
    generated = re.search(r"Generation: (\d+) tokens", p.stderr)
    assert generated and int(generated.group(1)) >= 1, p.stderr
    for line in REPORT_LINES:
        assert line in p.stderr, p.stderr
    assert "4-bit hits" in p.stderr and "2-bit hits" in p.stderr and "misses" in p.stderr
    assert "per generated token" in p.stderr


def test_generate_stats_json(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sub" / "stats.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("The quick brown fox jumps over the lazy dog."))
    p = _in_process(capsys, [
        "--model", model_dir, "--prompt", "-", "--max-tokens", 6, "--expert-residency", 0.5,
        "--policy", "lru", "--max-context", 512, "--prefill-step-size", 4, "--io-workers", 2,
        "--ignore-chat-template", "--top-k", 5, "--temp", 1.0, "--seed", 1, "--stats-json", out,
        "--quiet-report", "--prefetch-width", 1.5, "--keep-shallow-layers", 1,
        "--prefill-low-precision", 0.3, "--prefetch-recall", 0.9, "--prefetch-layers", 1])
    assert p.returncode == 0, p.stderr
    assert "Generation:" not in p.stderr  # --quiet-report
    stats = json.loads(out.read_text())
    for key in ("expert_requests", "hits_high", "hits_low", "misses_high", "misses_low",
                "skipped", "bytes_read", "prefetch_issued", "prefetch_used",
                "resident_expert_bytes", "peak_memory_bytes", "budget_bytes", "hit_rate",
                "prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "wall_s"):
        assert key in stats, key
    assert stats["resident_expert_bytes"] <= stats["expert_cache_bytes"] < stats["budget_bytes"]
    assert stats["generation_tokens"] >= 1 and stats["prompt_tokens"] > 5
    assert stats["expert_requests"] > 0 and stats["bytes_read"] > 0
    assert stats["misses_high"] > 0 and stats["host_syncs"] > 0  # half the experts: calls miss
    assert stats["exact"] is False and stats["prefetch_layers"] == 1  # lossy techniques on by default
    assert stats["prefetch_width"] == 1.5 and stats["keep_shallow_layers"] == 1
    assert stats["prefetch_recall"] == 0.9 and isinstance(stats["prefetch_widths"], dict)
    assert stats["policy"] == "lru+shallow1"
    assert stats["mixed_precision"] is stats["skip"] is True  # resolved
    assert stats["big_little"] is False  # (it said True, re-deriving an old default)
    assert stats["misses_low"] > 0  # the prefill rule read 2-bit copies
    assert [f.name for f in out.parent.iterdir()] == ["stats.json"]  # no temporary file left


def test_a_seed_samples_what_mlx_lm_samples_on_the_loaded_model(model_dir, capsys):
    """--seed is set once the model is loaded (the load draws random numbers), so the sampled
    text is mlx-lm's generate after mx.random.seed on the loaded model."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    import hobbit_mlx

    p = _in_process(capsys, ["--model", model_dir, "--prompt", "def hello(x):", "--max-tokens",
                             12, "--expert-residency", 0.5, "--exact", "--temp", 0.8, "--seed", 3,
                             "--ignore-chat-template", "--quiet-report"])
    assert p.returncode == 0, p.stderr
    model, tok = hobbit_mlx.load(model_dir, expert_residency=0.5, exact=True, progress=False)
    mx.random.seed(3)
    expected = mlx_lm.generate(model, tok, "def hello(x):", max_tokens=12, sampler=make_sampler(0.8))
    assert p.stdout == expected + "\n"


def _in_process(capsys, argv, command: str = "generate") -> subprocess.CompletedProcess:
    """``python -m hobbit_mlx.<command> argv`` run in this process as its ``python -m`` entry
    runs it (a process costs ~2 s of imports): for what a command says and does, where its
    process is not what is tested (each command keeps one test of its own process)."""
    import importlib

    from hobbit_mlx import cli_common

    main = importlib.import_module(f"hobbit_mlx.{command}").main
    code = cli_common.run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def test_result_and_draft_paths_are_checked_with_clear_errors(model_dir, tmp_path, capsys):
    p = _in_process(capsys, ["--model", model_dir, "--prompt", "hi", "--max-tokens", 2,
                             "--stats-json", tmp_path])
    assert_bad_input(p, "--stats-json", "directory")
    assert "Generation:" not in p.stderr  # refused before the work
    (tmp_path / "afile").write_text("")
    p = _in_process(capsys, ["--model", model_dir, "--prompt", "hi", "--max-tokens", 2,
                             "--stats-json", tmp_path / "afile" / "stats.json"])
    assert_bad_input(p, "--stats-json", "afile is a file, not a directory")
    assert "Generation:" not in p.stderr  # (it failed after the generation, "File exists")
    p = _in_process(capsys, ["--model", model_dir, "--prompt", "hi", "--max-tokens", 2,
                             "--draft-model", tmp_path / "missing"])
    assert_bad_input(p, "draft model", "no such directory")


def test_generate_with_a_budget_that_holds_every_expert(model_dir, tmp_path, capsys):
    """--memory-budget is the budget; when the pools hold every expert they are read at load,
    and generating reads nothing and never waits on the host."""
    from hobbit_mlx.store import load_manifest

    out = tmp_path / "stats.json"
    p = _in_process(capsys, ["--model", model_dir, "--prompt", "hello there", "--max-tokens", 4,
                             "--memory-budget", "2GB", "--stats-json", out, "--quiet-report"])
    assert p.returncode == 0, p.stderr
    stats = json.loads(out.read_text())
    manifest = load_manifest(model_dir)
    assert stats["budget_bytes"] == 2 * 10**9
    assert stats["resident_experts"] == sum(l.num_experts for l in manifest.layers)
    assert stats["expert_requests"] > 0 and stats["hits_high"] == stats["expert_requests"]
    assert stats["bytes_read"] == 0 and stats["misses_high"] == stats["misses_low"] == 0
    assert stats["host_syncs"] == 0


def test_budget_too_small(model_dir, capsys):
    import re

    import hobbit_mlx

    fp = hobbit_mlx.footprint(model_dir)
    for minimum, flags in ((fp["minimum_budget_bytes"], ()),
                           (fp["minimum_budget_bytes_exact"], ("--exact", "--prefetch-layers", 0))):
        p = _in_process(capsys, ["--model", model_dir, "--memory-budget", "1KB", "--max-tokens", 2,
                                 *flags])
        line = assert_bad_input(p)
        stated = int(re.search(r"needs at least .*?\((\d+) bytes\)", line).group(1))
        assert stated == minimum, line
        assert "dense weights" in line and "KV cache" in line and "top-k experts" in line


def test_bad_input(model_dir, env, tmp_path, capsys):
    assert_bad_input(run(env, "generate", "--model", tmp_path / "missing", "--max-tokens", 2),
                     "not found", "missing")
    bad = tmp_path / "bad_manifest"
    shutil.copytree(model_dir, bad)
    from hobbit_mlx.store import manifest_path

    manifest_path(bad).write_text("{not json")
    assert_bad_input(_in_process(capsys, ["--model", bad, "--max-tokens", 2]), "manifest")


def test_bad_flags_in_process(model_dir, capsys):
    """Flags checked before loading anything: one error line, status 2 (run in-process: fast)."""
    generate, chat = "generate", "chat"
    cases = [(generate, ["--memory-budget", "12 bananas"], "12 bananas"),
             (generate, ["--memory-budget", "0"], "--memory-budget"),
             (chat, ["--expert-residency", "1.5"], "--expert-residency"),
             (generate, ["--max-tokens", "0"], "--max-tokens"),
             (generate, ["--chat-template-config", "[1"], "--chat-template-config"),
             (generate, ["--prefetch-width", "0"], "--prefetch-width"),
             (generate, ["--prefill-low-precision", "2"], "--prefill-low-precision"),
             (generate, ["--exact", "--prefill-low-precision", "0.2"], "--exact"),
             (generate, ["--exact", "--t1", "0.5", "--upgrade-after", "2"],
              "--t1, --upgrade-after"),
             (chat, ["--exact", "--prefetch-low-precision"], "--prefetch-low-precision"),
             (generate, ["--num-draft-tokens", "0", "--draft-model", "x"],
              "--num-draft-tokens"),
             (chat, ["--model", "no-such-model-dir"], "not found"),
             # (pipeline flags refused before joining: a lone process would wait for its peers)
             (generate, ["--memory-budget", "48GB,24GB"], "needs --pipeline"),
             (generate, ["--pipeline", "--pipeline-timeout", "0"], "--pipeline-timeout"),
             (chat, ["--pipeline", "--pipeline-timeout", "-5"], "--pipeline-timeout"),
             (generate, ["--pipeline", "--prompt", "-"], "--prompt -")]
    for command, argv, needle in cases:
        p = _in_process(capsys, ["--model", model_dir, *argv], command)
        err = p.stderr
        assert p.returncode == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_corrupt_expert_bytes(model_dir, tmp_path, capsys):
    from hobbit_mlx.store import STORE_DIR, manifest_path

    bad = tmp_path / "corrupt"
    shutil.copytree(model_dir, bad)
    files = [f for f in (bad / STORE_DIR).rglob("*") if f.is_file() and f != manifest_path(bad)]
    assert files
    for f in files:  # keep the header, flip the expert bytes
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 2, len(data), 61):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    p = _in_process(capsys, ["--model", bad, "--expert-residency", 0, "--max-tokens", 4,
                             "--prompt", "hello world, hello world"])
    assert_bad_input(p, "checksum mismatch", str(bad / STORE_DIR))


def _minimum(model_dir, monkeypatch) -> int:
    """The minimum budget as the CLI's process will state it: measured here into the cache
    directory it reads, this process's (measured again there, it may come out some percent
    higher)."""
    import hobbit_mlx
    from hobbit_mlx import measure

    monkeypatch.setattr(measure, "_MEASURED", {})  # (kept in this process: written there too)
    return hobbit_mlx.footprint(model_dir)["minimum_budget_bytes"]


def test_generate_with_a_rotating_cache_runs_past_the_context_the_budget_holds(model_dir, env,
                                                                              monkeypatch, capsys):
    """--max-kv-size (mlx-lm's rotating cache): the budget plans its window, so a reply far past
    the whole context the budget holds (256 tokens here) runs."""

    budget = int(_minimum(model_dir, monkeypatch) * 1.1)
    p = run(env, "generate", "--model", model_dir, "--memory-budget", budget, "--max-tokens", 600,
            "--max-kv-size", 64, "--prompt", "hello")
    assert p.returncode == 0, p.stderr
    generated = re.search(r"Generation: (\d+) tokens", p.stderr)
    assert generated and int(generated.group(1)) > 300, p.stderr
    p = _in_process(capsys, ["--model", model_dir, "--max-kv-size", 64, "--speculative", 2])
    assert_bad_input(p, "--max-kv-size")


def test_generate_without_a_token_limit_ends_where_the_budget_holds_no_more_context(
        model_dir, env, monkeypatch, capsys):
    """--max-tokens -1 (mlx-lm's no limit) runs until the end of text or of the context the
    budget holds, where it stops with a note and its report, exit 0; a limit the budget cannot
    reach still ends in the error that says what budget would."""
    budget = int(_minimum(model_dir, monkeypatch) * 1.1)
    p = run(env, "generate", "--model", model_dir, "--memory-budget", budget, "--max-tokens", -1,
            "--prompt", "hello", "--exact")  # (the same text every run: it does not end first)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "error:" not in p.stderr, p.stderr
    stopped = re.search(r"\[hobbit_mlx\] stopped after (\d+) tokens: the context reached", p.stderr)
    generated = re.search(r"Generation: (\d+) tokens", p.stderr)
    assert stopped and generated and stopped.group(1) == generated.group(1), p.stderr
    assert p.stdout.endswith("\n") and not p.stdout.endswith("\n\n")
    p = _in_process(capsys, ["--model", model_dir, "--memory-budget", budget, "--max-tokens", 5000,
                             "--prompt", "hello", "--exact"])
    assert_bad_input(p, "the context reached", "may reach")


def test_a_warning_is_one_line(model_dir, env):
    """A command's warnings read as its errors do: one ``warning:`` line, not Python's file,
    line and source of the warn call."""
    p = run(env, "generate", "--model", model_dir, "--memory-budget", "100000GB", "--max-tokens", 2,
            "--prompt", "hello", "--quiet-report")
    assert p.returncode == 0, p.stderr
    warned = [l for l in p.stderr.splitlines() if l.startswith("warning: memory budget")]
    assert len(warned) == 1 and "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr


def test_chat_piped(model_dir, env):
    p = run(env, "chat", "--model", model_dir, "--memory-budget", "2GB", "--max-tokens", 6,
            "--system-prompt", "You are tiny.", stdin="hello\nh\nhow are you?\ns\nr\nhi\nq\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout.startswith(">> hello\n")
    assert "commands:" in p.stdout and "[conversation reset]" in p.stdout
    assert "Experts:" in p.stdout  # the `s` command
    turns = [l for l in p.stderr.splitlines() if l.startswith("[") and "tokens/s" in l]
    assert len(turns) == 3, p.stderr
    assert "cached)" in turns[1]  # the second turn reused the first turn's KV cache


def test_chat_turn_stopped_by_the_budget_still_counts(model_dir, env, monkeypatch):
    """A reply that outgrows the budget's context stops with a message; what it read and
    generated joins the session's totals ('s')."""

    # (a margin over the minimum the chat process reads: this one's measurements)
    budget = int(_minimum(model_dir, monkeypatch) * 1.1)
    p = run(env, "chat", "--model", model_dir, "--memory-budget", budget, "--max-tokens", 5000,
            "--quiet-report", stdin="hello\nagain\ns\nq\n")
    assert p.returncode == 0, p.stderr
    assert "the next turn drops the oldest turns to fit" in p.stderr, p.stderr
    # the next turn runs (each failed at once, refused before its reply): it drops the turn
    # that outgrew the budget, or needs not where that reply's text takes fewer tokens once
    # rendered again (random weights); it may outgrow the budget in its turn
    assert "was not kept" not in p.stderr, p.stderr
    assert "\n>> again\n" in p.stdout  # (the stopped reply's line ended on stdout too)
    requests = re.search(r"Experts: (\d+) requests", p.stdout)
    generated = re.search(r"Generation: (\d+) tokens", p.stdout)
    assert requests and int(requests.group(1)) > 0, p.stdout
    assert generated and int(generated.group(1)) > 0, p.stdout


def test_chat_speculative_replies_equal_plain_ones(model_dir, capsys, monkeypatch):
    """Speculative decoding in the chat (drafts, verify passes and trims on the conversation's
    own KV cache, turn after turn) gives the replies of plain exact decoding."""
    args = ["--model", model_dir, "--exact", "--expert-residency", 0.3, "--max-tokens", 12,
            "--quiet-report"]
    replies = []
    for extra in ([], ["--speculative", 2, "--speculative-fixed"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\nq\n"))
        replies.append(_in_process(capsys, args + extra, "chat"))
    plain, spec = replies
    assert plain.returncode == spec.returncode == 0, plain.stderr + spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count(">> ") >= 3


def test_chat_eof_ends_cleanly(model_dir, env):
    p = run(env, "chat", "--model", model_dir, "--expert-residency", 1, "--max-tokens", 3,
            "--quiet-report", stdin="hello")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(">> hello\n") and p.stdout.rstrip().endswith(">>")
    assert "tokens/s" not in p.stderr  # --quiet-report


def test_chat_cache_reuse_matches_fresh_prefill(model_dir):
    """Each turn's greedy reply equals generating from the whole conversation without a cache."""
    import hobbit_mlx
    from hobbit_mlx import chat, cli_common, cli_flags, cli_load

    args = chat.setup_arg_parser().parse_args(["--model", str(model_dir), "--expert-residency",
                                               "1", "--max-tokens", "5"])
    cli_flags.check_args(args)
    model, tokenizer, _ = cli_load.load_model(args)
    conv = chat.Conversation(model, tokenizer, args)
    sampler = cli_common.make_sampler(args, tokenizer)
    for query in ("hello there", "and then?", "ok"):
        full, feed = conv.prepare(query)
        assert full[len(full) - len(feed):] == feed
        got = [r for r in hobbit_mlx.stream_generate(model, tokenizer, feed, max_tokens=5,
                                                     sampler=sampler, prompt_cache=conv.cache)]
        ref = [r.token for r in hobbit_mlx.stream_generate(model, tokenizer, full, max_tokens=5,
                                                           sampler=sampler)]
        assert [r.token for r in got] == ref
        conv.finish(query, full, "".join(r.text for r in got), [r.token for r in got])
        assert len(conv.cached) > 0


def test_chat_with_a_rotating_cache_feeds_only_the_new_turn_once_past_its_window():
    """--max-kv-size: once the window has rotated the cache cannot be trimmed back to where the
    template renders the last reply otherwise than it was generated (here: kept with a word
    more); it goes on from the new user turn (as mlx-lm's chat), where it prefilled the whole
    conversation again."""
    import hobbit_mlx
    from hobbit_mlx import chat, cli_common, cli_flags, cli_load

    args = chat.setup_arg_parser().parse_args(["--memory-budget", "12MB", "--max-kv-size", "48",
                                               "--max-tokens", "12"])
    cli_flags.check_args(args)
    model, tokenizer, _ = cli_load.load_model(args)
    conv = chat.Conversation(model, tokenizer, args)
    sampler = cli_common.make_sampler(args, tokenizer)
    fed = []
    for query in ("write a function that adds two numbers", "now one that subtracts them",
                  "and one that multiplies", "and divides"):
        full, feed = conv.prepare(query)
        fed.append((len(full), len(feed), tokenizer.decode(feed)))
        got = list(hobbit_mlx.stream_generate(model, tokenizer, feed, max_tokens=12,
                                              sampler=sampler, prompt_cache=conv.cache))
        reply = "Sure. " + "".join(r.text for r in got)  # (the template renders it otherwise)
        conv.finish(query, full, reply, [r.token for r in got])
    assert conv.cache[0].offset > 48  # (past the window)
    for n_full, n_feed, text in fed[2:]:  # (before, the window had not rotated: trimmed)
        assert n_feed < n_full / 2 and text.startswith("<|im_start|>user"), fed
    assert len(conv.cached) == conv.cache[0].offset  # nothing fed twice, nothing reset


def _chat_session(model_dir, *flags):
    from hobbit_mlx import chat, cli_common, cli_flags, cli_load

    args = chat.setup_arg_parser().parse_args(["--model", str(model_dir), *flags])
    cli_flags.check_args(args)
    model, tokenizer, _ = cli_load.load_model(args)
    return chat.Conversation(model, tokenizer, args), cli_common.make_sampler(args, tokenizer)


def _turn(conv, sampler, query: str, stopped: bool = False) -> list[int]:
    import hobbit_mlx

    full, feed = conv.prepare(query)
    got = list(hobbit_mlx.stream_generate(conv.model, conv.tokenizer, feed, max_tokens=4,
                                          sampler=sampler, prompt_cache=conv.cache))
    conv.finish(query, full, "".join(r.text for r in got), [r.token for r in got])
    if stopped:  # as Ctrl-C or the budget leave it
        conv.invalidate()
    return full + [r.token for r in got]


def test_chat_without_a_template_keeps_its_history_when_a_turn_is_stopped(model_dir):
    """Without a chat template the conversation was the cache's tokens: a turn stopped by
    Ctrl-C or the budget emptied it, and the next turn silently ran without the history. Old
    turns are dropped whole when the conversation outgrows the budget's context."""
    conv, sampler = _chat_session(model_dir, "--expert-residency", "1")
    conv.tokenizer.has_chat_template = False  # (as mlx-lm sets it for a model without one)
    first = _turn(conv, sampler, "hello there", stopped=True)
    full, feed = conv.prepare("and then?")
    assert full[:len(first)] == first and feed == full  # the history, prefilled again
    second = _turn(conv, sampler, "and then?")
    assert conv.fit("ok", limit=len(second), reply_room=4) == 1
    full, _ = conv.prepare("ok")
    assert full[:len(second) - len(first)] == second[len(first):]


def test_chat_turn_stopped_by_ctrl_c_keeps_the_history_in_the_cache(model_dir):
    """A reply stopped part way (Ctrl-C) keeps the cache's earlier turns: the next turn
    prefills the stopped turn and its own, not the whole conversation again (the cache was
    emptied), with the reply a fresh prefill gives."""
    import hobbit_mlx

    conv, sampler = _chat_session(model_dir, "--expert-residency", "1")
    first = _turn(conv, sampler, "hello there")
    full, feed = conv.prepare("tell me more, at length")
    steps = hobbit_mlx.stream_generate(conv.model, conv.tokenizer, feed, max_tokens=8,
                                       sampler=sampler, prompt_cache=conv.cache)
    got = [next(steps), next(steps)]
    steps.close()  # (Ctrl-C)
    conv.finish("tell me more, at length", full, "".join(r.text for r in got),
                [r.token for r in got], whole=False)
    full, feed = conv.prepare("ok")
    assert len(full) - len(feed) >= len(first) - 8  # the first turn, as the template renders it
    got = [r.token for r in hobbit_mlx.stream_generate(conv.model, conv.tokenizer, feed,
                                                       max_tokens=4, sampler=sampler,
                                                       prompt_cache=conv.cache)]
    assert got == [r.token for r in hobbit_mlx.stream_generate(
        conv.model, conv.tokenizer, full, max_tokens=4, sampler=sampler)]


def test_chat_fit_drops_the_oldest_exchanges_and_keeps_the_system_prompt(model_dir):
    conv, sampler = _chat_session(model_dir, "--expert-residency", "1",
                                  "--system-prompt", "You are tiny.")
    for query in ("one", "two", "three"):
        _turn(conv, sampler, query)
    before = len(conv.prepare("four")[0])
    limit = before - 1
    dropped = conv.fit("four", limit=limit, reply_room=0)
    kept = [m["content"] for m in conv.messages if m["role"] != "assistant"]
    assert kept == ["You are tiny.", *["one", "two", "three"][dropped:]] and dropped >= 1
    # a quarter of the context left free: the next turns fit without dropping (and prefilling
    # the whole history) again
    assert len(conv.prepare("four")[0]) <= limit - limit // 4 or kept == ["You are tiny."]
    assert conv.fit("four", limit=limit, reply_room=0) == 0
    assert conv.fit("four", limit=10 ** 6, reply_room=0) == 0
    # a message that does not fit even alone drops nothing (the turn is refused, history kept)
    kept = list(conv.messages)
    assert conv.fit("four " * 200, limit=100, reply_room=0) == 0 and conv.messages == kept


def test_chat_report_sums_every_counter_over_the_turns(model_dir):
    """'s' reported some lines (big-little, prefetch rates) from the last turn only."""
    import hobbit_mlx
    from hobbit_mlx import chat

    conv, sampler = _chat_session(model_dir, "--expert-residency", "0.5", "--big-little")
    tally = chat.Tally(conv.model)
    assert tally.report()["peak_memory_bytes"] > 0  # before any turn: what the model holds
    routed = 0
    for query in ("one two three", "four five"):
        hobbit_mlx.reset_stats(conv.model)
        _turn(conv, sampler, query)
        turn = hobbit_mlx.offload_stats(conv.model)
        routed += turn["routed_tokens"]
        tally.add(turn)
    report = tally.report()
    assert report["routed_tokens"] == routed > 0
    served = report["hits_high"] + report["hits_low"]
    assert report["hit_rate"] == served / (served + report["misses_high"] + report["misses_low"])


def test_clean_text_replaces_bytes_that_are_not_utf8():
    from hobbit_mlx.cli_common import clean_text

    raw = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # (stdin, argv)
    assert clean_text(raw) == "caf\ufffd au lait"
    assert clean_text("caf\u00e9 \ud800") == "caf\u00e9 ?"


def test_importing_the_cli_keeps_the_generate_function(model_dir):
    """``import hobbit_mlx.generate`` rebinds the package attribute; it must stay callable."""
    import importlib

    import hobbit_mlx

    import mlx_lm

    importlib.import_module("hobbit_mlx.generate")
    assert callable(hobbit_mlx.generate)
    model, tokenizer = hobbit_mlx.load(model_dir, expert_residency=1.0, progress=False)
    text = hobbit_mlx.generate(model, tokenizer, "hello", max_tokens=3)
    assert text == mlx_lm.generate(model, tokenizer, "hello", max_tokens=3)  # greedy: the same


def test_report_and_json_helpers(tmp_path):
    from hobbit_mlx import cli_common, cli_flags, cli_report

    s = dict(prompt_tokens=10, prompt_tps=100.0, generation_tokens=4, generation_tps=8.0,
             peak_memory_bytes=3 * 2**20, budget_bytes=6 * 2**20, expert_requests=20, hits_high=12,
             hits_low=3, misses_high=4, misses_low=1, skipped=0, hit_rate=0.75,
             bytes_read=4 * 2**20, wall_s=1.5)
    text = "\n".join(cli_report.format_report(s))
    assert "3.00 MiB of 6.00 MiB budget (50%)" in text
    assert "4-bit hits 12, 2-bit hits 3, misses 5" in text
    assert "4.00 MiB, 1.00 MiB per generated token" in text
    out = tmp_path / "s.json"
    cli_common.write_json_atomic(out, s)
    assert json.loads(out.read_text()) == s
    args = cli_common.argparse.Namespace(exact=True, mixed_precision=True, big_little=False, skip=False,
                                         t1=0.6, t2=0.9, prefetch_layers=1)
    with pytest.raises(cli_common.CLIError, match="--exact cannot"):
        cli_flags.technique_options(args)


def test_an_unreadable_expert_store_is_one_error_line(tmp_path, monkeypatch):
    """An experts/ directory the user may not read (chmod 000): pathlib raises where it asks
    whether the manifest is there; that was a traceback before load's own error handling."""
    import errno

    from hobbit_mlx import cli_common, cli_load, store

    (tmp_path / store.STORE_DIR).mkdir()
    manifest = str(tmp_path / store.STORE_DIR / "manifest.json")

    def denied(model_dir):
        raise PermissionError(errno.EACCES, "Permission denied", manifest)

    monkeypatch.setattr(store, "is_hobbit_model", denied)
    with pytest.raises(cli_common.CLIError, match=f"{manifest}: permission denied"):
        cli_load._check_model_path(str(tmp_path))


def test_a_refusal_at_load_is_said_without_its_exception_type():
    """hobbit_mlx's refusals are ValueErrors whose message says why: "cannot load MODEL:
    ValueError: ..." read as a crash."""
    from hobbit_mlx.cli_load import _describe_load_error

    assert _describe_load_error("m", ValueError("exact=True cannot be combined with skip")) == \
        "cannot load m: exact=True cannot be combined with skip"
    assert _describe_load_error(None, RuntimeError("x")) == \
        "cannot load the bundled reference model: RuntimeError: x"


def test_chat_fit_drops_only_what_the_turn_needs_when_no_room_can_be_spared(model_dir):
    """A long reply room (``--max-tokens -1``: the whole context) leaves no quarter to spare:
    dropping down to three quarters dropped every turn where one was enough."""
    conv, sampler = _chat_session(model_dir, "--expert-residency", "1")
    for query in ("one", "two", "three"):
        _turn(conv, sampler, query)
    full = len(conv.prepare("four")[0])
    room = 3 * full  # (the query alone and this room fill more than three quarters of the limit)
    assert conv.fit("four", limit=4 * full - 1, reply_room=room) == 1
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["two", "three"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_output_to_a_full_device_is_one_line(model_dir, env):
    """``> /dev/full`` (a full disk under the output): one error line and status 1, where a
    traceback ended it."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "hobbit_mlx.generate", "--model", str(model_dir),
                            "--prompt", "def f(x):", "--max-tokens", "4", "--quiet-report"],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                           timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        "error: cannot write the output: No space left on device"
