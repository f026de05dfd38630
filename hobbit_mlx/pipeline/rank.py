"""One rank's place in the pipeline: ``Pipeline``, through which the loader builds the model.

Its own module because it holds what a rank knows and does while it loads and runs (its split
and layers, its share of the store, the agreements and barrier between the ranks, the
watchdog), on top of the gathers (``gather``), the group (``join``) and the stages it patches
into the decoder (``stages``); ``pipeline_of``, the model's pipeline, and ``gather_stats``,
every rank's statistics.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..store import LayerEntry, Manifest, PrecisionEntry, Record
from . import join  # (its state, read where it lives: join.LOAD_TIMEOUT_S, join._UNSTARTED)
from .errors import PipelineError
from .gather import gather_json, settle, store_digest
from .join import DEFAULT_TIMEOUT_S
from .split import check_split, layer_range, proportional_split
from .stages import (DECODER_PATHS, PASSED_ON, PassThrough, _cache_twins, _see_local_caches,
                     _stage, _takes_split, decoder_of)

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
        group = join.resolve_group(group)
        if group.size() < 2:
            raise PipelineError("a pipeline needs a group of at least 2 ranks (start the ranks "
                                "with mlx.launch -n 2 ...)")
        join._UNSTARTED.clear()  # (a failure from here on is agreed below, or in load())
        pipe = cls(group, split)
        # a rank that dies closes its connection and the others fail at once; one that hangs
        # (or whose machine went away) would keep them waiting: until load() ends, the watchdog
        # ends them (load() sends it to sleep again; the CLIs then wake it for generation)
        pipe.watchdog(join.LOAD_TIMEOUT_S, "while loading")
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


# --- per-rank statistics -------------------------------------------------------------------

def pipeline_of(model: nn.Module) -> Pipeline | None:
    return getattr(model, "_hobbit_pipeline", None)


def gather_stats(model: nn.Module) -> list[dict]:
    """``offload_stats`` of every rank, in rank order (a collective: every rank must call it).
    Without a pipeline, a one-element list."""
    from ..loader import offload_stats

    own = offload_stats(model)
    pipe = pipeline_of(model)
    if pipe is None:
        return [own]
    own["pipeline"] = pipe.describe()
    return gather_json(pipe.group, own)
