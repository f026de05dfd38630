"""Prompt caches kept on disk between requests, so that several conversations each resume
where they stopped.

The server runs one sequence at a time, and the budget reserves the KV cache of one: the last
request's cache (``PromptCache``) is the only one in memory. An agent or a few chat clients
alternate between conversations that share a system prompt; with one cache, each switch trims it
back to the shared start and prefills the rest of the other conversation again. Under offloading
that prefill is the dear part (each chunk reads the experts its tokens route to: for a model
larger than memory, most of them), while a conversation's keys and values are small and read
back in one sequential read: Qwen3-30B-A3B's take ~98 KB per token, 400 MB for 4,000 tokens,
about 60 ms from a Mac's SSD, against seconds of expert reads to prefill them again.

So the cache in memory is written to a file (``mlx_lm``'s ``save_prompt_cache`` format) before
it would lose tokens a later request may want back: when a prompt departs from it, or when a
kept file serves the prompt better. A file that serves a prompt best is read back into memory
and deleted (the cache in memory holds it from then on). Files take time on the same storage as
the experts: one is written (and read) only where the prefill time it saves, as ``PrefillCost``
measures it, is more (the expert reads of a prefill saturate within a few dozen tokens, so a
small model's keys and values can cost more than prefilling them again: the bundled reference
model's, under a Mac-like storage speed). The files last as long as the server:
they hold keys and values computed under this process's model and options. At most
``max_entries`` files and ``max_bytes`` bytes are kept, the oldest going first;
a write that fails (a full disk) or a file that no longer reads only costs the prefill it would
have saved, logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..prefill_cost import PrefillCost
from ..prompt_cache import PromptCache, common_prefix

log = logging.getLogger("hobbit_mlx.server")

DISK_HEADROOM = 1 << 30  # a write that would leave less free space on the disk is skipped
TEMP_PREFIX = "hobbit-mlx-prompts-"  # the temporary directories servers make
OWNER = "owner.pid"  # in each: the process it belongs to


def remove_left_over_dirs() -> None:
    """Delete the temporary directories of servers that ended without deleting theirs (killed):
    a real model's files take gigabytes. Only directories whose owner process is gone."""
    for d in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            pid = int((d / OWNER).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, left by server process %d, which has ended", d, pid)
        except (OSError, ValueError):  # (no owner file, not ours to judge, or alive elsewhere)
            continue


@dataclass(frozen=True)
class KeepSettings:
    """Where and how many prompt caches the server keeps on disk (``--prompt-cache-*``)."""

    directory: str | None = None  # None: a temporary directory, deleted at exit
    max_entries: int = 10  # 0: only the last request's cache, in memory
    max_bytes: int | None = None


@dataclass
class KeptFile:
    """One prompt cache on disk, and the tokens whose keys and values it holds."""

    path: Path
    tokens: list[int]
    nbytes: int
    trimmable: bool
    stamp: tuple[int, int, int]  # (size, mtime_ns, inode) as written: see _stamp


def _stamp(path: Path) -> tuple[int, int, int]:
    """A file's size, modification time and inode: a file rewritten, cut or replaced since the
    server wrote it shows another, and is not read (one ``stat``, where a checksum would cost
    as much CPU as reading the file)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def usable_prefix(held: list[int], prompt: list[int], trimmable: bool) -> int:
    """How many of ``prompt``'s tokens a cache holding ``held`` saves prefilling: the tokens the
    two share (at most all but the prompt's last, which the model runs to predict the next),
    if the cache can be cut back to them."""
    common = min(common_prefix(held, prompt), len(prompt) - 1)
    if common == len(held) or (trimmable and common > 0):
        return common
    return 0


def _state_bytes(cache: list[Any]) -> int:
    from mlx.utils import tree_flatten

    return sum(a.nbytes for _, a in tree_flatten([c.state for c in cache]) if hasattr(a, "nbytes"))


def _same_kind(kept: Any, fresh: Any) -> bool:
    """Whether a layer's cache read from a file can stand for a fresh one of this model: the
    same class, or a quantized key-value cache for a plain one (``--kv-bits`` quantizes them as
    the context grows)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return type(kept) is type(fresh) or (type(kept) is QuantizedKVCache
                                         and type(fresh) is KVCache)


def _trimmable(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache

    return can_trim_prompt_cache(cache)


class KeptPrompts:
    """The request's prompt cache in memory (``cache``, as ``PromptCache``'s) and earlier ones
    kept on disk in ``directory``; the worker calls ``feed``, ``finish``, ``abandon`` and
    ``reset`` as on a ``PromptCache``."""

    def __init__(self, model: Any, directory: str | os.PathLike | None = None, *,
                 max_entries: int = 10, max_bytes: int | None = None,
                 cost: PrefillCost | None = None,
                 make_room: Callable[[int], None] | None = None) -> None:
        self.live = PromptCache(model)
        self.cost = cost  # None: every file is worth its bytes
        # make_room(tokens): the memory budget planned for a KV cache of ``tokens`` before a
        # file of them is read (the pools, planned for the last sequence, give way first)
        self.make_room = make_room
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._owns_dir = directory is None
        if directory is None:
            remove_left_over_dirs()
            self.directory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            (self.directory / OWNER).write_text(str(os.getpid()))
        else:
            self.directory = Path(directory)
        self._said_over = False  # (--prompt-cache-bytes too small: said once)
        self.files: list[KeptFile] = []  # oldest first
        self.counts = dict(written=0, read=0, write_failures=0, read_failures=0,
                           bytes_written=0, bytes_read=0, not_worth=0)
        self.last_read_tokens = 0  # tokens the last ``feed`` took from a file (0: none)
        self._last_new = 0  # tokens the last ``feed`` left to prefill

    @classmethod
    def of_model(cls, model: Any, keep: KeepSettings) -> "KeptPrompts":
        """Kept prompt caches for a model loaded by ``hobbit_mlx.load``: files weighed against
        its prefills (``PrefillCost``), each read into room its budget plans first."""
        from ..loader import runtime_of

        rt = runtime_of(model)
        return cls(model, keep.directory, max_entries=keep.max_entries,
                   max_bytes=keep.max_bytes, cost=PrefillCost.of_runtime(rt),
                   make_room=lambda tokens: rt.plan_rest(tokens, 1, 0))

    @property
    def cache(self) -> list[Any]:
        return self.live.cache

    def reset(self) -> None:
        self.live.reset()

    def finish(self, generated: list[int]) -> None:
        self.live.finish(generated)

    def abandon(self) -> None:
        self.live.abandon()

    def feed(self, full: list[int]) -> list[int]:
        """The suffix of ``full`` still to run, as ``PromptCache.feed``, with the cache in memory
        first swapped for a kept file that holds more of ``full``, or written to disk where
        ``full`` departs from it inside the last request's prompt (another conversation, or an
        edited one: the one in memory may come back). A prompt that departs only inside the
        last reply continues the same conversation (a chat template renders earlier replies
        otherwise than they were generated: Qwen3's drops their reasoning), and the reply as
        generated is not asked for again. Each file is written or read only where the prefill
        time it saves outweighs its own reads and writes (``cost``)."""
        self.last_read_tokens = 0
        held = self.live.tokens
        departs = common_prefix(held, full)
        in_memory = usable_prefix(held, full, _trimmable(self.live.cache)) if held else 0
        best = max(self.files, key=lambda f: usable_prefix(f.tokens, full, f.trimmable),
                   default=None)
        from_file = usable_prefix(best.tokens, full, best.trimmable) if best else 0
        # what the conversation in memory will prefill anyway when it comes back, guessed:
        # as much as its last turn did
        rest = max(1, self._last_new)
        lost = len(held) - departs
        if from_file > in_memory and self._pays(len(full) - in_memory, len(full) - from_file,
                                                best.nbytes):
            self.files.remove(best)  # (not to be evicted by the write that makes room)
            written = None
            if not (best.trimmable and best.tokens[:len(held)] == held):
                written = self._write_live(lost, rest)
            if not self._read(best) and written is not None:  # (back to what memory held)
                self.files.remove(written)
                self._read(written)
        elif departs < self.live.prompt_length:
            self._write_live(lost, rest)  # (then cut back or renewed by the feed below)
        fed = self.live.feed(full)
        self._last_new = len(fed)
        return fed

    def _pays(self, without: int, with_: int, nbytes: float) -> bool:
        """Whether prefilling ``with_`` tokens instead of ``without`` saves more time than
        ``nbytes`` of file take on the storage (yes until a prefill was measured)."""
        saved = self.cost.saved(without, with_) if self.cost is not None else None
        return saved is None or saved > nbytes * self.cost.seconds_per_byte()

    def stats(self) -> dict[str, Any]:
        """What is kept and what keeping did, for the server's stats."""
        return dict(files=len(self.files), bytes=sum(f.nbytes for f in self.files),
                    max_files=self.max_entries, max_bytes=self.max_bytes,
                    directory=str(self.directory), **self.counts)

    def close(self) -> None:
        """Delete the kept files (and the directory, if this made it)."""
        for f in self.files:
            f.path.unlink(missing_ok=True)
        self.files.clear()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- disk ------------------------------------------------------------------------------------
    def _write_live(self, lost: int, rest: int) -> KeptFile | None:
        """Write the cache in memory to a file, unless a kept file holds its tokens and more
        (and can be cut back to them), it would not fit the limits or the disk, or the expert
        time it would save when its conversation comes back (its ``lost`` tokens prefilled
        again with the ``rest`` that comes then) is less than writing and reading it back takes. Files whose tokens it extends are dropped: it serves any prompt they serve, at
        least as far. The file kept, or None."""
        from mlx_lm.models.cache import save_prompt_cache

        tokens, cache = list(self.live.tokens), self.live.cache
        if not lost or self.max_entries <= 0 or any(
                f.trimmable and f.tokens[:len(tokens)] == tokens for f in self.files):
            return None
        nbytes, trimmable = _state_bytes(cache), _trimmable(cache)
        if not self._pays(lost + rest, rest, 2 * nbytes):
            self.counts["not_worth"] += 1
            return None
        if self.max_bytes is not None and nbytes > self.max_bytes:
            log.log(logging.DEBUG if self._said_over else logging.INFO,
                    "prompt cache of %d tokens not kept: %d bytes, over --prompt-cache-bytes",
                    len(tokens), nbytes)
            self._said_over = True
            return None
        try:
            if shutil.disk_usage(self.directory).free < nbytes + DISK_HEADROOM:
                raise OSError(f"less than {nbytes + DISK_HEADROOM} bytes free")
            path = self.directory / f"prompt-{uuid.uuid4().hex}.safetensors"
            part = path.with_name("." + path.name)  # (mx reads the format from the suffix)
            try:
                save_prompt_cache(str(part), cache)
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)
        except (OSError, RuntimeError, ValueError) as e:  # mx.save raises RuntimeError on I/O
            self.counts["write_failures"] += 1
            log.warning("prompt cache of %d tokens not kept on disk (%s): %s", len(tokens),
                        self.directory, e)
            return None
        stamp = _stamp(path)
        nbytes = stamp[0]
        self.counts["written"] += 1
        self.counts["bytes_written"] += nbytes
        if trimmable:
            for f in [f for f in self.files if f.tokens == tokens[:len(f.tokens)]]:
                self._drop(f)
        kept = KeptFile(path, tokens, nbytes, trimmable, stamp)
        self.files.append(kept)
        self._evict()
        return kept if kept in self.files else None

    def _read(self, kept: KeptFile) -> bool:
        """Replace the cache in memory by ``kept`` (taken off the list; the one in memory was
        written or given up before, so that memory never holds both), and delete its file.
        Whether it could be read (if not, the cache in memory is empty)."""
        import mlx.core as mx
        from mlx_lm.models.cache import load_prompt_cache

        self.live.reset()
        try:
            if _stamp(kept.path) != kept.stamp:
                raise ValueError("it changed on disk since the server wrote it")
            if self.make_room is not None:
                self.make_room(len(kept.tokens))
            cache = load_prompt_cache(str(kept.path))
            mx.eval([c.state for c in cache])
            if len(cache) != len(self.live.cache) or not all(
                    _same_kind(a, b) for a, b in zip(cache, self.live.cache)):
                raise ValueError("its layers' caches are not this model's")
        except Exception as e:  # noqa: BLE001 - any unreadable file: prefill instead
            self.counts["read_failures"] += 1
            log.warning("kept prompt cache %s could not be read; prefilling instead: %s",
                        kept.path, e)
            return False
        else:
            self.live.cache, self.live.tokens = cache, list(kept.tokens)
            self.counts["read"] += 1
            self.counts["bytes_read"] += kept.nbytes
            self.last_read_tokens = len(kept.tokens)
            return True
        finally:
            kept.path.unlink(missing_ok=True)

    def _drop(self, kept: KeptFile, delete: bool = True) -> None:
        self.files.remove(kept)
        if delete:
            kept.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Drop the oldest files until the count and bytes are within limits."""
        def over() -> bool:
            total = sum(f.nbytes for f in self.files)
            return len(self.files) > self.max_entries or \
                (self.max_bytes is not None and total > self.max_bytes)

        while self.files and over():
            self._drop(self.files[0])
