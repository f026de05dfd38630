"""Layer-pipelined offloading across processes or machines on ``mx.distributed`` (issue 13).

Each rank of a group holds a contiguous block of decoder layers: their dense weights, and a
store reader, slot pools and budget plan over their experts only. Ranks follow mlx-lm's order
(rank 0 holds the *last* layers, the last rank the first), so after the last layer rank 0's
hidden state is the output and one ``all_gather`` gives it to every rank.

* Models with mlx-lm's own ``model.model.pipeline(group, split)`` (qwen3_moe, deepseek_v2/v3,
  glm4_moe, ...) use it.
* Every other architecture gets a generic split: the layers outside the block become
  pass-throughs, the first local layer receives the hidden state from the next rank up and the
  last one sends it on, then gathers the output (as exo does).

The split is made while the model is built (before any weight is read), so a rank never reads
another rank's dense weights or expert records. Load-time failures are agreed on: a rank whose
load fails tells the others, and every rank raises an error naming it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .store import LayerEntry, Manifest, PrecisionEntry, Record, manifest_path

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DEFAULT_TIMEOUT_S = 300.0
# How long a rank waits for the others while the pipeline loads (``Pipeline.start`` to the end of
# ``load``) before it exits with an error; the CLIs set it from --pipeline-timeout.
LOAD_TIMEOUT_S = DEFAULT_TIMEOUT_S


class PipelineError(RuntimeError):
    """A pipeline rank failed, disagrees with the others or stopped answering; names the rank."""


# --- splits ------------------------------------------------------------------------------------

def proportional_split(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Layers per rank (in rank order) in proportion to ``weights`` (their memory budgets), each
    rank at least one layer; largest remainders get the layers rounding leaves over."""
    size = len(weights)
    if num_layers < size:
        raise PipelineError(f"{size} ranks cannot share {num_layers} layers (at least one each)")
    total = float(sum(weights))
    if total <= 0 or any(w <= 0 for w in weights):
        weights, total = [1.0] * size, float(size)
    exact = [(num_layers - size) * w / total for w in weights]
    split = [1 + int(e) for e in exact]
    for r in sorted(range(size), key=lambda r: (int(exact[r]) - exact[r], r))[:num_layers - sum(split)]:
        split[r] += 1
    return split


def check_split(split: Sequence[int], num_layers: int, size: int) -> list[int]:
    """An explicit split, checked: one positive count per rank summing to the layers."""
    split = [int(s) for s in split]
    if len(split) != size:
        raise PipelineError(f"pipeline split {split} has {len(split)} entries for {size} ranks")
    if any(s < 1 for s in split) or sum(split) != num_layers:
        raise PipelineError(f"pipeline split {split} must be positive and sum to the model's "
                            f"{num_layers} layers")
    return split


def layer_range(split: Sequence[int], rank: int) -> tuple[int, int]:
    """(start, end) of rank's layers: the higher ranks hold the layers before (mlx-lm's order)."""
    start = sum(split[rank + 1:])
    return start, start + split[rank]


# --- collectives on small host data ---------------------------------------------------------

def settle() -> None:
    """Wait for the model's pending work: mlx-lm evaluates the next token ahead, and its
    collectives must finish before any other collective starts, or ranks pair them differently."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


# Each rank's row of ``gather_bytes`` starts with this header: a peer that died (or failed and
# left) leaves its row holding whatever the buffer held, stale bytes or garbage, which must read
# as a lost connection, never as data (it was decoded as JSON, and the user sent after a JSON file).
_MAGIC = 0x686F6262  # "hobb"
_GATHERS = [0]  # gathers this process ran: every rank runs the same ones, so counts match


def _lost(rank: int) -> PipelineError:
    return PipelineError(f"lost the connection to pipeline rank {rank} (what it sent did not "
                         "arrive intact); did it exit or fail?")


def gather_bytes(group: mx.distributed.Group, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order (two all_gathers: a header with the length, then the
    padded bytes). A row that does not carry this gather's header, or whose bytes do not match
    their checksum, raises a ``PipelineError`` naming the lost rank."""
    settle()
    _GATHERS[0] += 1
    seq = _GATHERS[0] % (1 << 31)
    crc = zlib.crc32(data) & 0x7FFFFFFF
    heads = np.array(mx.distributed.all_gather(
        mx.array([[_MAGIC, seq, group.rank(), len(data), crc]], dtype=mx.int32), group=group,
        stream=mx.cpu)).reshape(group.size(), 5)
    for r, (magic, s, rank, n, _) in enumerate(heads.tolist()):
        if (magic, s, rank) != (_MAGIC, seq, r) or not 0 <= n < (1 << 30):
            raise _lost(r)
    lengths = [int(n) for n in heads[:, 3]]
    buf = np.zeros((1, max(lengths + [1])), dtype=np.int32)
    buf[0, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buf), group=group, stream=mx.cpu))
    out = [bytes(rows[r, :n].astype(np.uint8)) for r, n in enumerate(lengths)]
    for r, b in enumerate(out):
        if zlib.crc32(b) & 0x7FFFFFFF != int(heads[r, 4]):
            raise _lost(r)
    return out


def gather_json(group: mx.distributed.Group, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON), in rank order; a lost rank raises a ``PipelineError``."""
    rows = gather_bytes(group, json.dumps(obj, default=str).encode())
    out = []
    for r, b in enumerate(rows):
        try:
            out.append(json.loads(b))
        except ValueError:  # (UnicodeDecodeError too) intact by its checksum, yet no JSON
            raise _lost(r) from None
    return out


def store_digest(model_dir: str | Path) -> str:
    """What identifies a store across machines: its manifest and config, hashed."""
    h = hashlib.sha256(manifest_path(model_dir).read_bytes())
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    return h.hexdigest()


# --- the pipeline --------------------------------------------------------------------------

class Pipeline:
    """One rank's place in a layer pipeline, and the hooks the loader calls while building."""

    def __init__(self, group: mx.distributed.Group, split: Sequence[int] | None = None,
                 budgets: Sequence[int] | None = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.requested_split = list(split) if split is not None else None
        self.budgets = list(budgets) if budgets is not None else None
        self.split: list[int] | None = None
        self.start = self.end = 0
        self.num_layers = 0
        self.kind: str | None = None  # "mlx-lm" or "generic" once the model is split
        self.active = True  # False: run the local layers only (load-time measurements)
        self.manifest: Manifest | None = None  # this rank's share of the store
        self._model: nn.Module | None = None
        self._decoder: nn.Module | None = None  # the module that holds the layers
        self.last_progress = time.monotonic()
        self.waiting_since: float | None = None  # set while a rank waits for input (no timeout)
        self.watch_timeout: float | None = None  # None: the watchdog sleeps
        self.phase = "pipeline"  # what the watchdog's error says the ranks were doing
        self._watch: threading.Thread | None = None

    @classmethod
    def start(cls, group: Any, model_dir: str | Path, budget_bytes: int | None,
              split: Sequence[int] | None = None, options: dict | None = None) -> "Pipeline":
        """Join the group: check that every rank has the same store and the same ``options``
        (those that decide what the model computes), share the budgets (which set the split
        unless ``split`` is given)."""
        group = resolve_group(group)
        if group.size() < 2:
            raise PipelineError("a pipeline needs a group of at least 2 ranks (start the ranks "
                                "with mlx.launch -n 2 ...)")
        _UNSTARTED.clear()  # (a failure from here on is agreed below, or in load())
        pipe = cls(group, split)
        # a rank that dies closes its connection and the others fail at once; one that hangs
        # (or whose machine went away) would keep them waiting: until load() ends, the watchdog
        # ends them (load() sends it to sleep again; the CLIs then wake it for generation)
        pipe.watchdog(LOAD_TIMEOUT_S, "while loading")
        try:
            own = {"digest": store_digest(model_dir), "budget": budget_bytes or 0,
                   "dir": str(model_dir), "options": options or {}}
        except OSError as e:  # (the others must hear of it: they wait in this agreement)
            gather_json(group, {"failed": f"{type(e).__name__}: {e}"})
            pipe.watch_timeout = None
            raise _with_rank(e, pipe.rank) from e
        shared = gather_json(group, own)
        pipe.progress()
        failed = [(r, s["failed"]) for r, s in enumerate(shared) if "failed" in s]
        if failed:  # (a rank that failed before it could load: fail_start)
            pipe.watch_timeout = None
            raise PipelineError("; ".join(f"rank {r} failed to load: {m}" for r, m in failed))
        odd = [r for r, s in enumerate(shared) if s["digest"] != shared[0]["digest"]]
        if odd:
            pipe.watch_timeout = None
            raise PipelineError(
                "the ranks hold different models or expert stores (manifest and config hashes "
                "differ): " + ", ".join(f"rank {r} {s['dir']} {s['digest'][:12]}"
                                        for r, s in enumerate(shared)))
        differ = sorted({name for s in shared for name, value in s["options"].items()
                         if value != shared[0]["options"].get(name)})
        if differ:
            pipe.watch_timeout = None
            raise PipelineError(
                "the ranks were started with different options (they must compute alike): "
                + "; ".join(f"{name}: " + ", ".join(f"rank {r} {s['options'].get(name)!r}"
                                                     for r, s in enumerate(shared))
                            for name in differ))
        pipe.budgets = [s["budget"] for s in shared]
        return pipe

    # --- building the model ---------------------------------------------------------------
    def split_model(self, model: nn.Module) -> None:
        """Keep this rank's layers (before any weight is loaded): mlx-lm's own ``pipeline``
        where the model has one, the generic split otherwise."""
        arch = getattr(model, "model_type", None) or type(model).__name__
        inner = decoder_of(model)
        if inner is None:
            raise PipelineError(f"cannot pipeline {arch}: its decoder layers are not where the "
                                f"split looks for them (.layers of {', '.join(DECODER_PATHS)})")
        layers = inner.layers
        self.num_layers = len(layers)
        if self.requested_split is not None:
            self.split = check_split(self.requested_split, self.num_layers, self.size)
        else:
            self.split = proportional_split(self.num_layers, self.budgets or [1] * self.size)
        self.start, self.end = layer_range(self.split, self.rank)
        self._model, self._decoder = model, inner
        if hasattr(inner, "pipeline") and _takes_split(inner.pipeline):
            self.kind = "mlx-lm"
            inner.pipeline(self.group, self.split)
        else:
            self.kind = "generic"
            self._check_layer_groups(model, arch)
            twins = _cache_twins(model, self.start, self.end)
            self._split_generic(layers, PASSED_ON.get(arch, ()))
            _see_local_caches(inner, twins)

    def _check_layer_groups(self, model: nn.Module, arch: str) -> None:
        """Layers that share state (hunyuan's cross-layer attention shares its KV within groups
        of ``cla_share_factor`` layers) must stay on one rank: the state never crosses ranks."""
        args = getattr(model, "args", None)
        size = int(getattr(args, "cla_share_factor", 1) or 1) if getattr(args, "use_cla", False) \
            else 1
        starts = [layer_range(self.split, r)[0] for r in range(self.size)]
        if size > 1 and any(s % size for s in starts):
            raise PipelineError(
                f"cannot pipeline {arch} with the split {self.split}: its layers share their KV "
                f"cache in groups of {size} (cross-layer attention), which must not be cut "
                f"between ranks; give --pipeline-split counts that are multiples of {size}")
        # gemma4: each of the last layers takes the keys and values of an earlier layer
        sources = getattr(self._decoder, "previous_kvs", None)
        if isinstance(sources, list):
            rank_of = {i: r for r in range(self.size) for i in range(*layer_range(self.split, r))}
            cut = [j for j, src in enumerate(sources) if rank_of[j] != rank_of[src]]
            if cut:
                raise PipelineError(
                    f"cannot pipeline {arch} with the split {self.split}: layer {cut[0]} takes "
                    f"the keys and values of layer {sources[cut[0]]}, which another rank holds; "
                    "give --pipeline-split counts that keep them together")

    def _split_generic(self, layers: list, passed_on: tuple = ()) -> None:
        for i in range(len(layers)):
            if not self.start <= i < self.end:
                layers[i] = PassThrough(layers[i], passed_on)
        first, last = layers[self.start], layers[self.end - 1]
        recv_from = self.rank + 1 if self.rank < self.size - 1 else None
        send_to = self.rank - 1 if self.rank > 0 else None
        if first is last:
            _stage(first, self, recv_from=recv_from, send_to=send_to, gather=True)
        else:
            _stage(first, self, recv_from=recv_from)
            _stage(last, self, send_to=send_to, gather=True)

    def is_local_key(self, key: str) -> bool:
        m = LAYER_KEY.search(key)
        return m is None or self.start <= int(m.group(1)) < self.end

    def keep_local(self, weights: dict) -> dict:
        """The checkpoint's weights this rank holds: its layers', plus embeddings, norm, head."""
        return {k: v for k, v in weights.items() if self.is_local_key(k)}

    def local_manifest(self, manifest: Manifest) -> Manifest:
        """The store as this rank sees it: its layers only, and only the files they use (so the
        reader opens nothing else). Its MoE layers are numbered from 0 here, as the runtime
        indexes them; their module paths keep the global layer numbers."""
        layers = [l for l in manifest.layers if self.is_local_key(l.module_path + ".")]
        if not layers:
            how = (f"--pipeline-split {','.join(map(str, self.split))}"
                   if self.requested_split is not None else
                   f"the split by the ranks' budgets, {','.join(map(str, self.split))}")
            raise PipelineError(f"rank {self.rank} holds layers {self.start}-{self.end - 1} "
                                f"({how}), which have no routed experts; give it more layers "
                                "with --pipeline-split (layer counts, rank 0's first)")
        used = sorted({s[0] for l in layers for p in l.precisions.values() for r in p.records
                       for s in r.spans})
        remap = {old: new for new, old in enumerate(used)}

        def rec(r: Record) -> Record:
            return Record(tuple((remap[f], o, n) for f, o, n in r.spans), r.crc32)

        layers = [LayerEntry(i, l.module_path, l.num_experts, {
            name: PrecisionEntry(p.bits, p.quant, p.tensors, [rec(r) for r in p.records])
            for name, p in l.precisions.items()}) for i, l in enumerate(layers)]
        self.manifest = replace(manifest, files=[manifest.files[i] for i in used], layers=layers)
        return self.manifest

    @contextmanager
    def local_only(self) -> Iterator[None]:
        """Model calls run this rank's layers alone, with no communication (load() measures
        its KV bytes and activations this way, each rank on its own)."""
        inner = self._decoder if self._model is not None else None
        saved = (inner.pipeline_rank, inner.pipeline_size) if self.kind == "mlx-lm" else None
        self.active = False
        if saved:
            inner.pipeline_rank, inner.pipeline_size = 0, 1
        try:
            yield
        finally:
            self.active = True
            if saved:
                inner.pipeline_rank, inner.pipeline_size = saved

    # --- agreement, barrier, progress -------------------------------------------------------
    def agreed(self, build: Callable[[], Any], what: str = "failed to load") -> Any:
        """``build()`` on every rank; if it fails on any, every rank raises an error naming the
        rank(s) that failed (the failing rank's own error keeps its type and gains its rank; the
        others raise a ``PipelineError`` whose ``error_types`` names the failures' types)."""
        error = None
        try:
            result = build()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        msg = None if error is None else [type(error).__name__, str(error)]
        failed = [(r, m) for r, m in enumerate(gather_json(self.group, msg)) if m is not None]
        if error is not None:
            raise _with_rank(error, self.rank) from error
        if failed:
            e = PipelineError("; ".join(f"rank {r} {what}: {t}: {m}" for r, (t, m) in failed))
            e.error_types = [t for _, (t, _) in failed]
            raise e
        self.barrier()
        return result

    def barrier(self) -> None:
        """Wait for every rank (before exit, so no rank loses its peer mid-evaluation)."""
        settle()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group, stream=mx.cpu))
        self.progress()

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """The watchdog sleeps meanwhile: the ranks wait for a person's next line (chat)."""
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.progress()
            self.waiting_since = None

    def watchdog(self, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 phase: str = "") -> threading.Thread:
        """Exit this process with a one-line error when the pipeline makes no progress for
        ``timeout_s`` (a rank that hangs or whose machine went away without closing its
        connection; a rank that exits closes it and the ring backend fails at once). Called
        again, it changes the timeout (None: the watchdog sleeps)."""
        self.watch_timeout, self.phase = timeout_s, phase
        self.progress()
        # The thread holds the pipeline weakly: a pipeline (and the model it refers to) that is
        # dropped is freed, and its watchdog ends (held strongly, every model loaded in the
        # process stayed in memory, outside the next one's budget).
        me = weakref.ref(self)

        def watch() -> None:
            while (pipe := me()) is not None:
                timeout = pipe.watch_timeout
                del pipe
                time.sleep(min(1.0, (timeout or 4.0) / 4))
                pipe = me()
                if pipe is None:
                    return
                idle = time.monotonic() - pipe.last_progress
                if timeout is not None and idle > timeout and pipe.waiting_since is None \
                        and pipe.watch_timeout is not None:
                    doing = f" {pipe.phase}" if pipe.phase else ""
                    sys.stderr.write(f"hobbit_mlx: error: rank {pipe.rank}: no progress in the "
                                     f"pipeline{doing} for {idle:.0f} s (another rank died, "
                                     "failed or hangs); exiting\n")
                    sys.stderr.flush()
                    os._exit(3)
                del pipe

        if self._watch is None:
            self._watch = threading.Thread(target=watch, name="hobbit-pipeline-watchdog",
                                           daemon=True)
            self._watch.start()
        return self._watch

    def loaded(self) -> None:
        """load() is done: the watchdog sleeps until the caller wakes it (``watchdog()``)."""
        self.watch_timeout = None

    def describe(self) -> dict:
        return {"rank": self.rank, "size": self.size, "kind": self.kind, "split": self.split,
                "layers": [self.start, self.end]}


def _with_rank(error: Exception, rank: int) -> Exception:
    try:
        return type(error)(f"rank {rank}: {error}")
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return PipelineError(f"rank {rank}: {type(error).__name__}: {error}")


# Seen here (mlx 0.32.4, ring backend, loaded machine): a rank that connects before the rank it
# connects to listens retries, and then sometimes hangs in init. Higher ranks connect to lower
# ones, so each rank waits this long per rank number before it joins.
INIT_STAGGER_S = 3.0


# A group of more than one rank was joined in this process: the command-line tools then end it
# with os._exit once their output is flushed (``cli_common.run``), since the ring backend's
# threads may still be running when the interpreter tears down ("terminate called without an
# active exception", status -6, on a rank that had finished cleanly).
JOINED = False

# The group init_group joined, until its ranks meet in ``Pipeline.start``: a rank that fails
# before then (a model path it cannot find, a bad flag) tells the others there (``fail_start``);
# they would otherwise wait for it, or read its dead connection.
_UNSTARTED: list = []


def waiting_group() -> mx.distributed.Group | None:
    """The group ``init_group`` joined whose ranks have not met in ``Pipeline.start`` yet."""
    return _UNSTARTED[0] if _UNSTARTED else None


def fail_start(message: str, group: mx.distributed.Group | None = None) -> int | None:
    """Tell the other ranks, waiting in ``Pipeline.start``, that this rank failed before it
    could load (they raise "rank N failed to load: ``message``"); this rank's number, or None
    where no group waits for it. ``group``: that group, where ``init_group`` did not join it."""
    if group is None:
        if not _UNSTARTED:
            return None
        group = _UNSTARTED.pop()
    _UNSTARTED.clear()
    done = threading.Event()

    def give_up() -> None:  # (a peer that hangs elsewhere: this rank still exits)
        if not done.wait(LOAD_TIMEOUT_S):
            os._exit(2)

    threading.Thread(target=give_up, name="hobbit-pipeline-fail", daemon=True).start()
    try:
        gather_json(group, {"failed": message})
    except Exception:  # noqa: BLE001 - the others are gone already: nothing to tell
        pass
    finally:
        done.set()
    return group.rank()


def _hostfile_entries(rank: int) -> tuple[str | None, Any]:
    """mlx.launch's hostfile for the ring backend (MLX_HOSTFILE) and this rank's entry in it."""
    path = os.environ.get("MLX_HOSTFILE")
    if path is None:
        return None, None
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return path, None
    if not text:
        return path, []
    try:
        hosts = json.loads(text)
        return path, hosts[rank] if isinstance(hosts, list) and rank < len(hosts) else None
    except ValueError:
        return path, None


def _init_error(error: RuntimeError, rank: int) -> Exception:
    """``mx.distributed.init``'s error, said for the user where its cause is known."""
    path, entry = _hostfile_entries(rank)
    if "Couldn't bind" in str(error):
        where = f" on {', '.join(map(str, entry))}" if isinstance(entry, list) and entry else ""
        return PipelineError(
            f"rank {rank} cannot listen{where} ({error}): is that address this machine's? "
            "Check the rank's \"ips\" in the hostfile given to mlx.launch")
    return error


def init_group(backend: str = "any") -> mx.distributed.Group:
    """``mx.distributed.init`` for a launched rank, the lower ranks given time to listen first."""
    global JOINED
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
    if backend in ("any", "ring") and _hostfile_entries(rank)[1] == []:
        # (mlx.launch gives one rank an empty hostfile, which mx.distributed.init cannot parse)
        raise PipelineError("a pipeline (--pipeline) needs at least 2 ranks, and mlx.launch "
                            "started 1 (-n 1, or a hostfile with one host): start 2 or more "
                            "(e.g. mlx.launch -n 2 --backend ring --python $(which python) ...)")
    time.sleep(INIT_STAGGER_S * rank)
    joined = threading.Event()

    def give_up() -> None:  # (a rank whose peers never start waits in init for ever)
        if not joined.wait(LOAD_TIMEOUT_S):
            sys.stderr.write(f"hobbit_mlx: error: rank {rank}: the other pipeline ranks did not "
                             f"join within {LOAD_TIMEOUT_S:g} s; is every rank started, with the "
                             "same hostfile?\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=give_up, name="hobbit-pipeline-join", daemon=True).start()
    try:
        group = mx.distributed.init(strict=backend != "any", backend=backend)
    except RuntimeError as e:
        raise _init_error(e, rank) from None
    finally:
        joined.set()
    JOINED = JOINED or group.size() > 1
    if group.size() > 1:
        _UNSTARTED[:] = [group]
    return group


def resolve_group(group: Any) -> mx.distributed.Group:
    """A group as given, or ``init_group()`` for True / a backend name ("ring", ...)."""
    if isinstance(group, mx.distributed.Group):
        return group
    if group is True:
        return init_group()
    if isinstance(group, str):
        return init_group(group)
    raise TypeError(f"pipeline takes an mx.distributed group, True or a backend name, not {group!r}")


# --- the generic split -----------------------------------------------------------------------

# The decoder (the module whose ``layers`` the split cuts) is found at the first of these
# paths: text models keep it in ``model``; wrappers of a text model in ``language_model``.
DECODER_PATHS = ("model", "language_model.model", "language_model")

# Architectures whose layers return (hidden state, a state the next layer takes): the argument a
# layer another rank holds passes on unchanged.
PASSED_ON = {"hunyuan": ("shared_kv_states",),
             # (gemma4's KV-shared layers take another layer's keys, values and offset)
             "gemma4_text": ("shared_kv", "offset"), "gemma4": ("shared_kv", "offset")}


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module that holds ``model``'s decoder layers (a non-empty ``layers`` list)."""
    for path in DECODER_PATHS:
        m = model
        for name in path.split("."):
            m = getattr(m, name, None)
        if isinstance(m, nn.Module) and isinstance(getattr(m, "layers", None), list) \
                and m.layers:
            return m
    return None


def _takes_split(pipeline) -> bool:
    """mlx-lm's ``pipeline(group, split)``; kimi_k3's takes the group alone (its own split)."""
    try:
        return len(inspect.signature(pipeline).parameters) >= 2
    except (TypeError, ValueError):
        return False


class PassThrough(nn.Module):
    """A layer another rank holds: the hidden state passes through untouched (with the state
    arguments ``passed_on``, for layers that return them after it; ``layer`` gives their
    positions)."""

    def __init__(self, layer: nn.Module | None = None, passed_on: tuple = ()):
        super().__init__()
        self._passed: list = []  # (name, position): plain attributes, no parameters
        # The layer's own settings stay readable: hybrid models' make_cache and masks read
        # every layer's kind (jamba's is_attn, granitemoehybrid's layer_type, afmoe's
        # use_sliding, ...), which failed on a rank that does not hold the layer.
        for name, value in (vars(layer) if layer is not None else {}).items():
            if isinstance(value, (bool, int, float, str)) and not name.startswith("_"):
                object.__setattr__(self, name, value)
        if layer is not None and passed_on:
            names = list(inspect.signature(type(layer).__call__).parameters)[2:]  # (self, x)
            self._passed = [(name, names.index(name)) for name in passed_on]

    def __call__(self, x, *args, **kwargs):
        if not self._passed:
            return x
        return (x, *(kwargs[name] if name in kwargs else args[pos] if pos < len(args) else None
                     for name, pos in self._passed))


def _cache_kind(cache) -> tuple:
    subs = getattr(cache, "caches", None)
    if isinstance(subs, (list, tuple)):  # (a CacheList: its caches' kinds; their reprs hold ids)
        return type(cache), tuple(_cache_kind(c) for c in subs)
    try:
        return type(cache), repr(sorted(vars(cache).items()))
    except Exception:  # noqa: BLE001 - a kind never matched
        return (id(cache),)


def _cache_twins(model: nn.Module, start: int, end: int) -> dict[int, int]:
    """For each layer outside ``start``-``end``, a local layer whose new cache is of the same
    kind (class and settings), if any. Models build masks from particular layers' caches
    (gpt_oss: the first sliding and full layers'; llama4: layer 0's chunk position): on a rank
    those layers pass through, their caches never advance, and the masks are sized for no
    context; the twin's cache, which advanced, stands in for them."""
    from mlx_lm.models.cache import make_prompt_cache

    try:
        kinds = [_cache_kind(c) for c in make_prompt_cache(model)]
    except Exception:  # noqa: BLE001 - a model whose caches cannot be made before its weights
        return {}
    twins = {}
    for j, kind in enumerate(kinds):
        if not start <= j < end:
            twin = next((k for k in range(start, min(end, len(kinds))) if kinds[k] == kind), None)
            if twin is not None:
                twins[j] = twin
    return twins


def _see_local_caches(decoder: nn.Module, twins: dict[int, int]) -> None:
    """The decoder's calls see, in place of each passed-through layer's cache, its twin's
    (``_cache_twins``): only the decoder's own code reads them (a ``PassThrough`` ignores its
    cache), and the caller's list (trimmed, quantized, counted) is left as it is."""
    base = type(decoder)
    params = list(inspect.signature(base.__call__).parameters)
    if not twins or "cache" not in params:
        return
    pos = params.index("cache") - 1  # (without self)

    def see(cache):
        if not isinstance(cache, list):
            return cache
        return [cache[twins.get(i, i)] for i in range(len(cache))]

    def __call__(self, *args, **kwargs):
        if "cache" in kwargs:
            kwargs["cache"] = see(kwargs["cache"])
        elif len(args) > pos:
            args = (*args[:pos], see(args[pos]), *args[pos + 1:])
        return base.__call__(self, *args, **kwargs)

    decoder.__class__ = type(base.__name__, (base,), {"__call__": __call__})


def _find_cache(args: tuple, kwargs: dict):
    from mlx_lm.models.cache import _BaseCache

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, _BaseCache):
            return a
    return None


def _stage(layer: nn.Module, pipe: Pipeline, *, recv_from: int | None = None,
           send_to: int | None = None, gather: bool = False) -> None:
    """Turn ``layer`` into a pipeline stage in place (its class, not its module path, changes,
    so weights and the expert store's module paths still match)."""
    base = type(layer)

    def __call__(self, x, *args, **kwargs):
        if pipe.active and recv_from is not None:
            x = mx.distributed.recv_like(x, recv_from, group=pipe.group)
        out = base.__call__(self, x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (a pair: PASSED_ON)
        if pipe.active and gather:
            if send_to is not None:
                h = mx.distributed.send(h, send_to, group=pipe.group)
                # a prompt chunk evaluates only the caches: the send must run with them
                _run_with_cache(_find_cache(args, kwargs), h)
            h = mx.distributed.all_gather(h, group=pipe.group)[: h.shape[0]]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    layer.__class__ = type(base.__name__, (base,), {"__call__": __call__})


def _run_with_cache(cache, h: mx.array) -> bool:
    """Make ``h`` a dependency of the cache's state (an attention layer's keys, a recurrent
    layer's first state array, a list of caches' first that takes it): a rank whose last layer
    was recurrent never sent its prompt chunks, and the next rank waited for them forever."""
    if cache is None:
        return False
    if isinstance(getattr(cache, "keys", None), mx.array):
        cache.keys = mx.depends(cache.keys, h)
        return True
    if isinstance(getattr(cache, "caches", None), (list, tuple)):  # (CacheList)
        return any(_run_with_cache(c, h) for c in cache.caches)
    arrays = getattr(cache, "cache", None)  # (ArraysCache)
    for i, a in enumerate(arrays if isinstance(arrays, list) else ()):
        if isinstance(a, mx.array):
            arrays[i] = mx.depends(a, h)
            return True
    return False


def agree_prefill_step(pipe: Pipeline, kwargs: dict) -> dict:
    """Every rank prefills the prompt in the same chunks (a collective: every rank must call it).
    ``_with_defaults`` caps ``prefill_step_size`` at this rank's own plan, which differs between
    ranks (their budgets and layers differ): a rank that cut the prompt into more chunks would
    run more forward calls (and progress exchanges) than the others, and the pipeline hangs. The
    smallest step of any rank fits every rank's plan."""
    steps = gather_json(pipe.group, int(kwargs["prefill_step_size"]))
    for rank, step in enumerate(steps):
        if not isinstance(step, int) or step < 1:  # (a dead peer's slot holds what it last sent)
            raise PipelineError(f"the ranks could not agree on the prompt's chunks: rank {rank} "
                                f"sent {step!r} (the connection to a peer was lost, or the ranks "
                                "are out of step)")
    kwargs["prefill_step_size"] = min(steps)
    return kwargs


# --- per-rank statistics -------------------------------------------------------------------

def pipeline_of(model: nn.Module) -> Pipeline | None:
    return getattr(model, "_hobbit_pipeline", None)


def gather_stats(model: nn.Module) -> list[dict]:
    """``offload_stats`` of every rank, in rank order (a collective: every rank must call it).
    Without a pipeline, a one-element list."""
    from .loader import offload_stats

    own = offload_stats(model)
    pipe = pipeline_of(model)
    if pipe is None:
        return [own]
    own["pipeline"] = pipe.describe()
    return gather_json(pipe.group, own)


def pipeline_budget(options) -> int | None:
    """The budget a rank weighs its share of layers by: its memory budget, or (none given) the
    60% of RAM load() would take; None with ``expert_residency`` (an even split)."""
    from .budget import parse_size, system_memory_bytes

    if options.memory_budget is not None:
        return parse_size(options.memory_budget)
    if options.expert_residency is not None:
        return None
    return int(0.6 * system_memory_bytes())


# --- following rank 0 (chat, server) ---------------------------------------------------------

class _Stopped(Exception):
    """Rank 0 ended the generation during the prompt (raised from mlx-lm's progress callback)."""


# The command-line flags that decide the tokens sampled and how many: rank 0's hold on every rank.
SAMPLING_ARGS = ("temp", "top_p", "min_p", "top_k", "min_tokens_to_keep", "xtc_probability",
                 "xtc_threshold", "repetition_penalty", "repetition_context_size", "max_tokens")


class Lockstep:
    """Rank 0 leads, the other ranks follow: every step of a generation needs the same forward
    calls on every rank, so rank 0 tells the others what to generate (``broadcast``), and after
    each token every rank learns from rank 0 whether to go on (``generate``). A rank that
    follows runs exactly the collectives rank 0 runs, in the same order."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.leader = pipe.rank == 0
        self.started = False  # the last generate() got past its agreement (errors then are fatal)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a collective; the others pass nothing)."""
        out = gather_json(self.pipe.group, obj if self.leader else None)[0]
        self.pipe.progress()
        return out

    def shared_seed(self, seed: int | None) -> int:
        """Seed every rank's random generator alike (rank 0's ``seed``, or one rank 0 draws), so
        that sampling picks the same token on every rank."""
        if self.leader and seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        seed = int(self.broadcast(seed))
        mx.random.seed(seed)
        return seed

    def follow_args(self, args: Any, names: Sequence[str] = SAMPLING_ARGS) -> None:
        """Rank 0's values of the flags ``names`` on every rank's ``args`` (a collective): a
        rank started with another --temp would sample other tokens and break the pipeline."""
        values = self.broadcast({n: getattr(args, n) for n in names if hasattr(args, n)})
        for name, value in values.items():
            setattr(args, name, value)

    def exchange(self, go_on: bool, token: int) -> bool:
        """Rank 0's ``go_on`` on every rank; every rank's token must be the same."""
        settle()
        rows = np.array(mx.distributed.all_gather(
            mx.array([[int(go_on), int(token)]], dtype=mx.int32), group=self.pipe.group,
            stream=mx.cpu))
        self.pipe.progress()
        if (rows[:, 1] != rows[0, 1]).any():
            raise PipelineError("the ranks sampled different tokens (" + ", ".join(
                f"rank {r}: {t}" for r, t in enumerate(rows[:, 1])) + "); sampling must give "
                "the same token on every rank")
        return bool(rows[0, 0])

    def generate(self, model: nn.Module, tokenizer, prompt: list[int], max_tokens: int,
                 keep_going: Callable[[], bool] | None = None, **kwargs) -> Iterator[Any]:
        """``hobbit_mlx.stream_generate`` on every rank in lockstep: its budget planning is
        agreed first (a prompt one rank cannot hold is that rank's error, raised on every rank
        before any forward call) and so are the prompt's chunks (the smallest step any rank's
        plan allows), then rank 0's ``keep_going()`` (and rank 0 closing this
        generator, or raising into it) decides after each prompt chunk and each token whether
        every rank goes on. A generation stopped during the prompt yields nothing.
        ``max_tokens`` is cut to what every rank's budget holds after the prompt: a rank whose
        context ran out part way would fail alone and break the pipeline."""
        import mlx_lm

        from . import _with_defaults
        from .loader import context_of, runtime_of

        self.started = False
        room = runtime_of(model).plan.longest_context - len(prompt) \
            - context_of(kwargs.get("prompt_cache"))
        least = min(gather_json(self.pipe.group, room))
        if least > 0 and (max_tokens < 0 or max_tokens > least):
            max_tokens = least
        kwargs = self.pipe.agreed(
            lambda: _with_defaults(model, tokenizer, prompt, dict(kwargs, max_tokens=max_tokens)),
            what="cannot run this prompt")
        self.started = True
        agree_prefill_step(self.pipe, kwargs)  # the same chunks on every rank

        def progress(_done: int, _total: int) -> None:
            go = not self.leader or keep_going is None or keep_going()
            if not self.exchange(go, -1):
                raise _Stopped()

        kwargs["prompt_progress_callback"] = progress
        gen = mlx_lm.stream_generate(model, tokenizer, prompt, **kwargs)
        try:
            for r in gen:
                go = False
                try:
                    yield r
                    go = r.finish_reason is None and (
                        not self.leader or keep_going is None or keep_going())
                finally:  # also when the caller closed this generator or raised into it
                    go = self.exchange(go, r.token)
                if not go:
                    break
                if r.finish_reason is not None:
                    raise PipelineError(f"rank {self.pipe.rank} ended its generation "
                                        f"({r.finish_reason}) where rank 0 went on")
        except _Stopped:
            return
        finally:
            gen.close()
            settle()
