"""The server's prompt caches kept on disk (``hobbit_mlx/server/kept_prompts.py``): conversations
that take turns each resume where they stopped, with the text a fresh cache gives (exact mode,
greedy), within the limits set, and a disk that fails costs only the prefill it would save."""

from __future__ import annotations

import logging

import pytest

from hobbit_mlx.loader import REFERENCE_MODEL

pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").is_file(),
                                reason="reference model not bundled")

SHARED = ("You are a careful Python reviewer. Read the code the user sends, say what it does, "
          "and point out bugs, naming the line and the fix.\n" * 3)
ASKS = {"a": "def mean(xs):\n    return sum(xs) / len(xs)\n",
        "b": "class Stack:\n    def pop(self):\n        return self.items.pop(0)\n",
        "c": "for i in range(10):\n    if i % 2:\n        print(i, 'is odd')\n    total += i\n"}



@pytest.fixture(scope="module")
def model():
    import hobbit_mlx

    return hobbit_mlx.load(REFERENCE_MODEL, expert_residency=0.5, exact=True, progress=False)


_FRESH: dict[tuple, list[int]] = {}


def _reply(model, kept, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy tokens for ``prompt`` through ``kept`` (None: a fresh cache, whose reply to a
    prompt is computed once: the tests replay the same conversations), and the tokens the feed
    saved."""
    import hobbit_mlx

    m, tokenizer = model
    key = (id(m), *prompt)
    if kept is None and key in _FRESH:
        return _FRESH[key], 0
    feed = kept.feed(prompt) if kept is not None else prompt
    cache = {"prompt_cache": kept.cache} if kept is not None else {}
    out = [r.token for r in hobbit_mlx.stream_generate(m, tokenizer, feed, max_tokens=8, **cache)]
    if kept is not None:
        kept.finish(out)
    else:
        _FRESH[key] = out
    return out, len(prompt) - len(feed)


def _conversations(model, kept, names: str, rounds: int):
    """Conversations that share a start take turns; per turn: (name, prompt tokens, tokens
    saved, tokens read from a file, reply, the reply from a fresh cache)."""
    _, tokenizer = model
    texts = {k: SHARED + ASKS[k] for k in names}
    turns = []
    for r in range(rounds):
        for k in names:
            prompt = tokenizer.encode(texts[k])
            out, saved = _reply(model, kept, prompt)
            fresh, _ = _reply(model, None, prompt)
            turns.append((k, len(prompt), saved, kept.last_read_tokens, out, fresh))
            texts[k] += tokenizer.decode(out) + f"\nAnd line {r + 2}?\n"
    return turns


def test_conversations_taking_turns_each_resume_from_disk(model, tmp_path):
    from hobbit_mlx.server.kept_prompts import KeptPrompts

    kept = KeptPrompts(model[0], tmp_path, max_entries=4)
    turns = _conversations(model, kept, "ab", rounds=3)
    assert all(out == fresh for *_, out, fresh in turns)  # the text a fresh cache gives
    shared = len(model[1].encode(SHARED))
    for name, n, saved, from_file, _, _ in turns[2:]:  # each turn after the first round
        assert from_file > shared and saved >= n - 8, (name, n, saved)  # its own history back
    assert turns[1][2] >= shared - 1 and turns[1][3] == 0  # b's first turn: the shared start
    assert kept.stats()["read"] == 4 and kept.stats()["read_failures"] == 0
    assert 1 <= len(kept.files) == len(list(tmp_path.glob("*.safetensors")))
    assert not list(tmp_path.glob(".*"))  # (no partly written file left)
    kept.close()
    assert not list(tmp_path.iterdir()) and tmp_path.is_dir()  # (the caller's directory stays)


def test_the_oldest_files_go_first_and_a_cache_over_the_bytes_is_not_written(model, tmp_path,
                                                                             caplog):
    """Three conversations taking turns need two files besides the cache in memory: with one,
    each turn finds its file gone (written over by the two others' since)."""
    from hobbit_mlx.server.kept_prompts import KeptPrompts

    for max_entries, resumed in ((1, False), (2, True)):
        kept = KeptPrompts(model[0], tmp_path, max_entries=max_entries)
        turns = _conversations(model, kept, "abc", rounds=2)
        assert len(kept.files) == max_entries == len(list(tmp_path.glob("*.safetensors")))
        assert all((t[3] > 0) == resumed for t in turns[3:]), (max_entries, turns)
        assert all(out == fresh for *_, out, fresh in turns)
        kept.close()

    caplog.set_level(logging.INFO, "hobbit_mlx.server")
    tiny = KeptPrompts(model[0], tmp_path, max_entries=4, max_bytes=1000)
    turns = _conversations(model, tiny, "ab", rounds=2)
    assert not tiny.files and not list(tmp_path.iterdir())
    assert "over --prompt-cache-bytes" in caplog.text
    assert all(t[3] == 0 for t in turns)
    tiny.close()


def test_a_reply_rendered_otherwise_writes_no_file(model, tmp_path):
    """The same conversation sent again with its last reply changed (a chat template dropping
    the reasoning) departs inside the reply: nothing to keep."""
    from hobbit_mlx.server.kept_prompts import KeptPrompts

    _, tokenizer = model
    kept = KeptPrompts(model[0], tmp_path)
    prompt = tokenizer.encode(SHARED + ASKS["a"])
    out, _ = _reply(model, kept, prompt)
    edited = prompt + tokenizer.encode(" (reply shortened)\nAnd line 2?\n")
    _reply(model, kept, edited)
    assert kept.stats()["written"] == 0
    # a prompt that departs inside the last prompt (another conversation) writes the cache
    _reply(model, kept, tokenizer.encode(SHARED + ASKS["b"]))
    assert kept.stats()["written"] == 1
    kept.close()


def test_a_failed_write_or_an_unreadable_file_costs_only_the_prefill(model, tmp_path, caplog):
    from hobbit_mlx.server.kept_prompts import KeptPrompts

    _, tokenizer = model
    gone = tmp_path / "gone"
    gone.mkdir()
    kept = KeptPrompts(model[0], gone)
    gone.rmdir()  # (the disk went away under the server)
    turns = _conversations(model, kept, "ab", rounds=2)
    assert kept.stats()["write_failures"] >= 2 and not kept.files
    assert "not kept on disk" in caplog.text
    assert all(out == fresh for *_, out, fresh in turns)

    kept = KeptPrompts(model[0], tmp_path)
    a = tokenizer.encode(SHARED + ASKS["a"])
    _reply(model, kept, a)
    _reply(model, kept, tokenizer.encode(SHARED + ASKS["b"]))
    (only,) = kept.files
    only.path.write_bytes(only.path.read_bytes()[:100])  # (cut short)
    out, saved = _reply(model, kept, a)
    # b's cache, written to make room for a's, is read back: the start they share is not lost
    assert kept.stats()["read_failures"] == 1 and kept.stats()["read"] == 1
    assert len(tokenizer.encode(SHARED)) - 2 <= saved < len(a) - 8
    assert out == _reply(model, None, a)[0]
    assert "could not be read" in caplog.text and not only.path.exists()
    kept.close()


def test_a_file_changed_on_disk_since_it_was_written_is_not_read(model, tmp_path, caplog):
    """Another program writing into a kept file (the same size: no format check sees it) made
    the server read its bytes as keys and values; now the file's stamp differs and the prompt
    is prefilled instead."""
    import os

    from hobbit_mlx.server.kept_prompts import KeptPrompts

    _, tokenizer = model
    kept = KeptPrompts(model[0], tmp_path)
    a = tokenizer.encode(SHARED + ASKS["a"])
    _reply(model, kept, a)
    _reply(model, kept, tokenizer.encode(SHARED + ASKS["b"]))
    (only,) = kept.files
    data = bytearray(only.path.read_bytes())
    data[-64:] = bytes(64)  # (the end of the last tensor zeroed, in place)
    with open(only.path, "r+b") as f:
        f.write(data)
    os.utime(only.path, ns=(only.stamp[1] + 10**9, only.stamp[1] + 10**9))
    out, _ = _reply(model, kept, a)
    assert kept.stats()["read_failures"] == 1
    assert "changed on disk since the server wrote it" in caplog.text
    assert out == _reply(model, None, a)[0] and not only.path.exists()
    kept.close()


def test_prefill_cost_saturates_and_is_scaled_by_what_prefills_took():
    from hobbit_mlx.prefill_cost import PrefillCost

    chunk, per_byte = [128], [1e-6]
    cost = PrefillCost([(64, 1000.0)] * 2, top_k=8, chunk=lambda n: chunk[0],
                       seconds_per_byte=lambda: per_byte[0])
    assert cost.seconds(10) is None and cost.saved(70, 18) is None  # nothing measured yet
    assert cost.shape(1) == pytest.approx(2 * 8 * 1000)  # one token: its top-k per layer
    assert cost.shape(64) == pytest.approx(2 * 64 * 1000, rel=1e-3)  # all of them
    assert cost.shape(256) == pytest.approx(2 * cost.shape(128))  # a chunk more reads them again
    # a prefill of 64 tokens read a quarter of that shape, and took 0.01 s per token beyond
    reads = cost.shape(64) / 4
    cost.record(64, reads * per_byte[0] + 64 * 0.01, int(reads))
    assert cost.read_bytes(64) == pytest.approx(reads, rel=1e-4)
    assert cost.seconds(64) == pytest.approx(reads * 1e-6 + 0.64, rel=1e-4)
    # 70 tokens against 18 (one chunk each): the reads of the 52 more are only of the experts 18
    # do not reach; their compute is all theirs
    assert cost.read_bytes(70) - cost.read_bytes(18) < 0.15 * cost.read_bytes(70)
    assert cost.saved(70, 18) == pytest.approx(
        (cost.read_bytes(70) - cost.read_bytes(18)) * 1e-6 + 52 * 0.01, rel=1e-3)
    per_byte[0] = 1e-3  # slower storage: the same bytes take longer, compute stays 0.01 s
    assert cost.saved(70, 18) > (cost.read_bytes(70) - cost.read_bytes(18)) * 1e-3
    chunk[0] = 16
    assert cost.shape(64) == pytest.approx(4 * cost.shape(16))  # the plan's chunk, read now


def test_a_file_is_written_and_read_only_where_it_saves_more_time_than_it_takes(model,
                                                                                tmp_path):
    """Prefills measured to take next to no time make no file worth its reads and writes: the
    conversations prefill instead, as with the cache in memory alone; measured slow, files are
    written and read as without a measure."""
    from hobbit_mlx.loader import runtime_of
    from hobbit_mlx.prefill_cost import PrefillCost
    from hobbit_mlx.server.kept_prompts import KeptPrompts

    for seconds, worth in ((1e-9, False), (1e3, True)):
        cost = PrefillCost.of_runtime(runtime_of(model[0]))
        cost.seconds_per_byte = lambda: 1e-9  # (bytes all but free: the compute decides)
        cost.record(100, seconds, 0)
        kept = KeptPrompts(model[0], tmp_path, cost=cost)
        turns = _conversations(model, kept, "ab", rounds=2)
        assert all(out == fresh for *_, out, fresh in turns)
        counts = kept.stats()
        if worth:
            assert counts["written"] >= 2 and counts["read"] == 2 and not counts["not_worth"]
        else:
            assert counts["written"] == counts["read"] == 0 and counts["not_worth"] >= 2
            assert all(t[3] == 0 for t in turns)
        kept.close()


def test_a_trimmed_cache_grows_as_a_fresh_one_does():
    """``trim`` cuts a cache's buffers back to the step (256 tokens) its tokens end in: cut to
    the tokens exactly, the next token grew them a whole step past, beyond what the budget
    plans for a context of that length (a conversation near its limit went 1.7% over)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from hobbit_mlx.prompt_cache import trim

    def grown(tokens: int) -> KVCache:  # (in prefill chunks of 64, as the plan's divide a step)
        c = KVCache()
        for n in [64] * (tokens // 64) + [tokens % 64]:
            c.update_and_fetch(mx.zeros((1, 2, n, 8)), mx.zeros((1, 2, n, 8)))
        return c

    c, fresh = grown(600), grown(300)
    assert c.keys.shape[2] == 768 and fresh.keys.shape[2] == 512
    assert trim([c], 300) == 300 and c.offset == 300 and c.keys.shape[2] == 512
    for cache in (c, fresh):
        cache.update_and_fetch(mx.ones((1, 2, 1, 8)), mx.ones((1, 2, 1, 8)))
    assert c.keys.shape[2] == fresh.keys.shape[2] == 512
    assert mx.array_equal(c.keys[..., :301, :], fresh.keys[..., :301, :])


def test_files_written_under_a_quantized_kv_cache_are_read_back(tmp_path):
    """``--kv-bits``: the caches in a file are quantized ones, where a fresh cache of the model
    starts plain; each read was refused as another model's, and every switch prefilled."""
    from convert import convert
    from hobbit_mlx.server.kept_prompts import KeepSettings, KeptPrompts
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    import hobbit_mlx

    src = make_tiny_model("qwen3_moe", tmp_path / "mlx", config_overrides={"head_dim": 32})
    store = convert(src, tmp_path / "hobbit", progress=False)
    m, tokenizer = hobbit_mlx.load(store, expert_residency=0.5, exact=True, progress=False,
                                   kv_bits=4, kv_group_size=32)
    kept = KeptPrompts.of_model(m, KeepSettings(str(tmp_path)))
    turns = _conversations((m, tokenizer), kept, "ab", rounds=2)
    assert kept.stats()["read_failures"] == 0 and kept.stats()["read"] == 2
    assert all(t[3] > 0 for t in turns[2:])
    kept.close()


def test_a_request_stopped_part_way_keeps_what_the_cache_held_before_it(model):
    """A cancelled (or failed) request's own tokens are cut off; the conversation it continued
    stays (the whole cache was dropped, and the next turn prefilled it all again)."""
    import hobbit_mlx
    from hobbit_mlx.prompt_cache import PromptCache

    m, tokenizer = model
    kept = PromptCache(m)
    first = tokenizer.encode(SHARED + ASKS["a"])
    out, _ = _reply(model, kept, first)
    held = len(kept.tokens)
    longer = first + out + tokenizer.encode("\nAnd line 2?\n" + ASKS["b"] * 4)
    steps = hobbit_mlx.stream_generate(m, tokenizer, kept.feed(longer), max_tokens=8,
                                       prompt_cache=kept.cache)
    next(steps), next(steps)
    steps.close()  # (the client went away)
    kept.abandon()
    assert len(kept.tokens) == held and kept.cache[0].offset == held
    again = longer + tokenizer.encode(" ")
    out, saved = _reply(model, kept, again)
    assert saved == held and out == _reply(model, None, again)[0]


def test_a_killed_servers_temporary_directory_is_removed_by_the_next(model):
    """A server killed (SIGKILL) leaves its temporary directory and its files; the next one to
    make its own removes those whose process has ended, and no other."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from hobbit_mlx.server.kept_prompts import OWNER, TEMP_PREFIX, KeptPrompts

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    dirs = {}
    for name, pid in (("dead", ended), ("alive", str(os.getpid())), ("nameless", None)):
        d = dirs[name] = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        (d / "prompt-0.safetensors").write_bytes(b"x")
        if pid is not None:
            (d / OWNER).write_text(pid)
    try:
        kept = KeptPrompts(model[0])
        assert not dirs["dead"].exists()
        assert dirs["alive"].is_dir() and dirs["nameless"].is_dir()
        assert (kept.directory / OWNER).read_text() == str(os.getpid())
        kept.close()
        assert not kept.directory.exists()
    finally:
        import shutil

        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
