"""The generation thread: the one thread that runs MLX. It loads the model, then serves the
queued requests one at a time, in the order they came.

MLX streams are thread-local (since MLX 0.31.2): a stream made on one thread fails on another
with "There is no Stream(..) in current thread", on the CPU backend too. So the model is loaded
here, every generation runs here (mlx-lm's generation stream is one per thread), and so do the
statistics, which evaluate router outputs. HTTP handlers only queue jobs and read the events a
job emits. One request at a time is also what keeps a greedy request's text independent of the
others: the expert pools, the budget plan and the per-sequence policy state belong to one
sequence at a time.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import random
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from ..budget import BudgetError, ContextBudgetError
from ..layer_major import looking_back
from ..pipeline import Lockstep, PipelineError, pipeline_of
from ..prompt_cache import PromptCache
from ..store import StoreError
from .errors import ApiError
from .kept_prompts import KeepSettings, KeptPrompts
from .params import Generation
from .stops import StopMatcher
from .tally import Tally, describe, request_stats

log = logging.getLogger("hobbit_mlx.server")


@dataclass
class Piece:
    """One generated token and the text it releases (empty while a stop sequence may begin)."""

    text: str
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    token_text: str | None = None


@dataclass
class Finished:
    """Generation ended: ``stop`` (end of sequence or a stop sequence), ``length`` or
    ``cancelled`` (the client went away)."""

    finish_reason: str
    stop_sequence: str | None
    stats: dict | None


@dataclass
class Failed:
    """Generation failed; the request ends with this error (the server goes on)."""

    error: ApiError
    stats: dict | None = None


Event = Piece | Finished | Failed


@dataclass
class Job:
    """One request's generation: its prompt, settings, and where its events go."""

    prompt: list[int]
    generation: Generation
    max_tokens: int
    emit: Callable[[Event], None]
    label: str = ""  # for the log line: "POST /v1/chat/completions"
    name: str = ""  # the response's id
    cached_tokens: int = 0  # of the prompt, reused from the previous request's KV cache
    cached_from_disk: int = 0  # of those, read back from a prompt cache kept on disk
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # stopped because the server is shutting down (answered with a 503)

    def cancel(self) -> None:
        self.cancelled.set()


class _PipelineBroken(Exception):
    """A pipeline generation failed after its forward calls began (see Worker.on_dead)."""


class _Cancelled(Exception):
    """Raised from mlx-lm's prompt-progress callback to stop a prefill nobody waits for."""


def _own_stream() -> dict:
    """This thread's default stream, passed to mlx-lm's generation (as ``mlx_lm.server`` does),
    so that the stream generation runs on is the one this thread owns. An older mlx-lm takes no
    ``stream`` and uses its own module stream."""
    import inspect

    import mlx.core as mx
    import mlx_lm

    if "stream" not in inspect.signature(mlx_lm.stream_generate).parameters:
        return {}
    return {"stream": mx.default_stream(mx.default_device())}


def context_limit(rt) -> tuple[int, str]:
    """The longest context (prompt + generated tokens) served, and what sets it: the memory
    budget (beside a prefill chunk of the smallest measured size: a longer context would fail
    part way) or the model's own context (beyond it a model's text degrades)."""
    held = rt.plan.longest_context
    if rt.trained_context is not None and rt.trained_context < held:
        return rt.trained_context, "model"
    return held, "budget"


def _fresh_random_state() -> None:
    """After a failed generation: mlx-lm's compiled samplers carry MLX's random state through
    ``mx.compile``, and one that raises part way leaves a placeholder there, which would fail
    every later sampled request that brings no seed of its own."""
    import mlx.core as mx

    mx.random.seed(random.randrange(2 ** 63))


def _json_logprob(value: float) -> float:
    """A log probability JSON can carry: OpenAI's -9999.0 for a token the sampler ruled out
    (-inf; NaN would not parse on the client)."""
    return float(value) if math.isfinite(value) else -9999.0


def vocab_size(model, tokenizer) -> int:
    """Token ids both the tokenizer and the model's logits have."""
    logits = getattr(getattr(model, "args", None), "vocab_size", None)
    return min(len(tokenizer), logits) if isinstance(logits, int) else len(tokenizer)


def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token as written in it (one per byte for byte-level
    BPE, so at least the text it stands for); 0 when the tokenizer does not list its vocabulary."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=0)
    except (AttributeError, TypeError):
        return 0


def api_error(e: BaseException) -> ApiError:
    """The HTTP error for a failure during generation."""
    if isinstance(e, ContextBudgetError) or "ContextBudgetError" in getattr(e, "error_types", ()):
        # (the latter: another pipeline rank's context outgrew its budget)
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, StoreError):
        return ApiError(500, f"expert store error: {e}", code="expert_store_error")
    if isinstance(e, OSError):
        return ApiError(500, f"expert store I/O error: {e}", code="expert_store_error")
    if isinstance(e, BudgetError):
        return ApiError(500, f"memory budget: {e}", code="memory_budget")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error")


def _shutdown_error(job: Job, generated: int) -> ApiError:
    done = f" after {generated} generated tokens" if generated else " before it started"
    return ApiError(503, f"the server is shutting down: the request was stopped{done}",
                    code="unavailable")


class Worker:
    """Owns the model; ``load`` runs on its thread and returns ``(model, tokenizer)``."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], model_id: str,
                 reuse_prompt: bool = True, keep: KeepSettings | None = None):
        self._load = load
        # the last request's KV cache, kept for the next one that shares its prefix, and
        # earlier ones on disk (``keep``; not with a pipeline, whose ranks must feed alike)
        self.reuse_prompt, self.keep = reuse_prompt, keep
        self._kept: PromptCache | KeptPrompts | None = None
        self.model_id = model_id
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="hobbit-generation", daemon=True)
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.busy = False
        self.model = self.tokenizer = None
        self.context_limit, self.context_set_by = 0, "budget"
        self.vocab_size = 0  # token ids a request may name (logit_bias)
        self.max_token_chars = 0  # characters of the vocabulary's longest token (0: unknown)
        self.model_dir = None
        self.tally: Tally | None = None
        # with a pipeline (--pipeline): rank 0 serves and tells the other ranks what to generate
        self.lock = None
        self.heartbeat_s = 10.0  # rank 0 idle: how often it tells the others it is alive
        self.on_dead: Callable[[], None] | None = None  # the pipeline broke: stop serving
        self.closing = False  # shutting down: no new job; the queued and running ones get 503
        self._submitting = threading.Lock()
        self.current: Job | None = None

    # --- called from other threads -----------------------------------------------------------
    def start(self) -> None:
        """Start the thread and wait until the model is loaded; a load error is raised here."""
        self.thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        with self._submitting:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="unavailable")
            if not self.alive:
                raise ApiError(503, "the generation thread is not running", code="unavailable")
            self.jobs.put(job)

    def close_soon(self, grace_s: float) -> None:
        """The server is shutting down: the queued requests are answered now with a 503, the
        one generating gets ``grace_s`` to finish and is then stopped with a 503 (its client
        gets a JSON error or a stream's error event, not a dropped connection or a plain-text
        500 when the HTTP server gives up waiting)."""
        with self._submitting:  # (a job queued after this would wait behind the sentinel)
            self.closing = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._stop_for_shutdown(job)
                job.emit(Failed(_shutdown_error(job, 0)))
        self.jobs.put(None)  # the thread ends after the current job
        current = self.current
        if current is not None and grace_s <= 0:
            self._stop_for_shutdown(current)
        elif current is not None:
            timer = threading.Timer(grace_s, self._stop_for_shutdown, (current,))
            timer.daemon = True
            timer.start()

    @staticmethod
    def _stop_for_shutdown(job: Job) -> None:
        if not job.cancelled.is_set():
            job.shutdown = True
            job.cancel()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Answer the queued jobs with a 503, stop the current one, end the thread."""
        if not self.closing:
            self.close_soon(0.0)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _least_context(self, pipe) -> None:
        """Every rank's context limit, the least served (a collective, on this thread): a
        request that fits rank 0 but not another rank would fail that rank part way, and a
        rank that fails alone breaks the pipeline."""
        from ..pipeline import gather_json

        limits = gather_json(pipe.group, self.context_limit)
        pipe.progress()
        rank = min(range(len(limits)), key=lambda r: limits[r])
        if limits[rank] < self.context_limit:
            self.context_limit, self.context_set_by = limits[rank], f"budget of rank {rank}"

    # --- the generation thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            from ..loader import offload_stats, runtime_of

            self.model, self.tokenizer = self._load()
            rt = self._runtime = runtime_of(self.model)
            self.model_dir = rt.model_dir
            self.context_limit, self.context_set_by = context_limit(rt)
            self.vocab_size = vocab_size(self.model, self.tokenizer)
            self.max_token_chars = longest_token_chars(self.tokenizer)
            self._special = list(self.tokenizer.encode("\n")) + list(self.tokenizer.eos_token_ids)
            self._stream = _own_stream()
            pipe = pipeline_of(self.model)
            if pipe is not None:
                self.lock = Lockstep(pipe)
                self._least_context(pipe)
            self.tally = Tally(self.model_id, offload_stats(self.model)["budget_bytes"],
                               self.context_limit)
            if self.reuse_prompt and self.keep is not None and self.keep.max_entries > 0 \
                    and pipe is None:
                self._kept = KeptPrompts.of_model(self.model, self.keep)
                self.tally.kept_prompts = self._kept.stats()
                log.info("prompt caches: up to %d earlier ones kept in %s", self.keep.max_entries,
                         self._kept.directory)
            elif self.reuse_prompt:
                self._kept = PromptCache(self.model)
        except BaseException as e:  # reported by start()
            self.error = e
        if self.error is not None:
            # What the failed load made is freed here, on the thread that made it (its
            # traceback's frames held it: the process's memory, outside any later budget) ...
            traceback.clear_frames(self.error.__traceback__)
            gc.collect()
            self._ready.set()
            # ... and the thread stays (parked, a daemon) until the process exits: MLX objects
            # made on it, freed at exit after the thread had ended, abort the process
            # ("terminate called without an active exception", status 134).
            threading.Event().wait()
        self._ready.set()
        if self.lock is not None and not self.lock.leader:
            try:
                self._follow()
            except BaseException as e:  # the thread's owner raises it
                self.error = e
            rt.reader.close()
            return
        try:
            self._serve_queue(rt)
        finally:
            if isinstance(self._kept, KeptPrompts):
                self._kept.close()

    def _serve_queue(self, rt) -> None:
        while (job := self._next_job()) is not None:
            self.busy, self.current = True, job
            try:
                if self.closing:  # (taken from the queue as it was being emptied)
                    self._stop_for_shutdown(job)
                self._serve(job)
            except _PipelineBroken as e:  # the ranks' collectives no longer pair up
                return self._broken(e.__cause__ or e)
            except BaseException as e:  # a bug here must not end the thread
                _fresh_random_state()
                log.exception("generation thread: unexpected error")
                job.emit(Failed(api_error(e)))
            finally:
                self.busy, self.current = False, None
        if self.lock is not None and self.error is None:  # the other ranks end too
            try:
                self.lock.broadcast({"op": "exit"})
                self.lock.pipe.barrier()
            except (PipelineError, RuntimeError) as e:  # (a rank already gone)
                log.warning("a pipeline rank did not hear the server stop: %s", e)
        rt.reader.close()

    def _broken(self, error: BaseException) -> None:
        """The ranks' collectives no longer pair up (a rank died): stop serving, in one line."""
        self.error = error
        log.error("the pipeline broke; stopping the server: %s", error)
        if self.on_dead is not None:
            self.on_dead()

    def _next_job(self) -> Job | None:
        """The next job; with a pipeline, an idle rank 0 tells the others now and then that it
        is alive (their watchdog ends them when no word comes). None once that fails: a rank
        died while the server was idle (it was a traceback in this thread)."""
        while True:
            try:
                return self.jobs.get(timeout=self.heartbeat_s if self.lock is not None else None)
            except queue.Empty:
                try:
                    self.lock.broadcast({"op": "idle"})
                except (PipelineError, RuntimeError) as e:
                    self._broken(e)
                    return None

    def _follow(self) -> None:
        """A pipeline rank other than 0: run the generations rank 0 sends until it ends."""
        import hobbit_mlx

        from .params import Sampling

        while (msg := self.lock.broadcast())["op"] != "exit":
            if msg["op"] != "generate":
                continue
            s = Sampling(**msg["sampling"])
            if s.logit_bias:
                s.logit_bias = {int(k): v for k, v in s.logit_bias.items()}  # (JSON keys)
            hobbit_mlx.reset_stats(self.model)  # as rank 0 does
            sampler, processors = self._sampling(s)
            feed, cache = self._feed(msg["prompt"])
            generated, last = [], None
            try:
                for last in self.lock.generate(self.model, self.tokenizer, feed,
                                               max_tokens=msg["max_tokens"], sampler=sampler,
                                               logits_processors=processors, **cache,
                                               **self._stream):
                    generated.append(last.token)
            except Exception:  # noqa: BLE001 - refused on every rank before any forward call
                if self.lock.started:
                    raise
            self._keep(generated, last is not None and last.finish_reason is not None)
        self.lock.pipe.barrier()

    def _serve(self, job: Job) -> None:
        import hobbit_mlx

        if job.cancelled.is_set():  # the client left while the job waited in the queue
            self._end(job, Finished("cancelled", None, None))
            return
        gen, s = job.generation, job.generation.sampling
        hobbit_mlx.reset_stats(self.model)
        if self.lock is not None:  # the other ranks generate the same (same seed too)
            if s.seed is None:
                s = replace(s, seed=random.randrange(2 ** 31))
            self.lock.broadcast({"op": "generate", "prompt": list(job.prompt),
                                 "max_tokens": job.max_tokens, "sampling": asdict(s)})
        sampler, processors = self._sampling(s)
        feed, cache = self._feed(job.prompt)
        job.cached_tokens = len(job.prompt) - len(feed)
        if isinstance(self._kept, KeptPrompts):
            job.cached_from_disk = min(self._kept.last_read_tokens, job.cached_tokens)
            self.tally.kept_prompts = self._kept.stats()
        stops = StopMatcher(gen.stop)
        finish, last, n = None, None, 0
        generated: list[int] = []
        space = [] if gen.continues else None  # the reply's tokens until its first text
        t0 = time.perf_counter()

        def progress(_done: int, _total: int) -> None:
            if job.cancelled.is_set():
                raise _Cancelled()

        if self.lock is None:
            steps = hobbit_mlx.stream_generate(
                self.model, self.tokenizer, feed, max_tokens=job.max_tokens,
                sampler=sampler, logits_processors=processors,
                prompt_progress_callback=progress, **cache, **self._stream)
        else:  # every rank runs it; rank 0 decides after each step whether all go on
            steps = self.lock.generate(
                self.model, self.tokenizer, feed, max_tokens=job.max_tokens,
                sampler=sampler, logits_processors=processors,
                keep_going=lambda: not job.cancelled.is_set(), **cache, **self._stream)
        try:
            for r in steps:
                n, last = n + 1, r
                if n == 1 and isinstance(self._kept, KeptPrompts) and r.prompt_tps > 0:
                    self._kept.cost.record(len(feed), r.prompt_tokens / r.prompt_tps,
                                           self._runtime.stats.bytes_read)  # (and a step's)
                generated.append(r.token)
                text = r.text
                if space is not None:  # (its first text may have lost its leading space)
                    space.append(r.token)
                    if text:
                        text, space = self._leading_space(job.prompt, space, text), None
                text, stopped = stops.feed(text)
                if r.finish_reason is not None and not stopped:
                    text += stops.flush()
                job.emit(self._piece(text, r, gen))
                if stopped:
                    finish = "stop"
                elif r.finish_reason is not None:
                    finish = r.finish_reason
                elif job.cancelled.is_set():
                    finish = "cancelled"
                if finish is not None:
                    break
        except _Cancelled:
            finish = "cancelled"
        except Exception as e:
            _fresh_random_state()
            self._keep(generated, False)
            error = api_error(e)
            if error.status >= 500 and error.code == "internal_error":
                log.exception("generation failed")
            self._end(job, Failed(error, self._stats(job, last, n, t0)))
            if self.lock is not None and self.lock.started:
                # the ranks may be part way through different collectives: no way on
                raise _PipelineBroken() from e
            return
        finally:
            steps.close()
        if finish is None and job.cancelled.is_set():
            finish = "cancelled"  # (a pipeline stops a cancelled prompt without a token)
        # A pipeline's other ranks see only whether the generation ended by itself: every rank
        # keeps its cache by that same rule, so that all feed the next prompt alike.
        ended = last is not None and last.finish_reason is not None
        self._keep(generated, ended if self.lock is not None
                   else finish in ("stop", "length"))
        self._end(job, Finished(finish or "length", stops.matched, self._stats(job, last, n, t0)))

    def _feed(self, prompt: list[int]) -> tuple[list[int], dict]:
        """The part of ``prompt`` to run, and the ``prompt_cache`` keyword that holds the rest
        (the last request's keys and values, trimmed to what the two share)."""
        if self._kept is None:
            return prompt, {}
        return self._kept.feed(list(prompt)), {"prompt_cache": self._kept.cache}

    def _keep(self, generated: list[int], whole: bool) -> None:
        """Keep the cache for the next request: all it holds where the generation ended in a
        known state (``whole``); what it held before this request where it was cancelled or
        failed (it may have left a half-run step)."""
        if self._kept is None:
            return
        if whole:
            self._kept.finish(generated)
        else:
            self._kept.abandon()

    def _end(self, job: Job, end: Finished | Failed) -> None:
        """Count the request, write its log line, and tell its handler (in that order, so the
        line is written before the client has its answer)."""
        stats = end.stats
        if job.shutdown and isinstance(end, Finished) and end.finish_reason == "cancelled":
            end = Failed(_shutdown_error(job, stats["generation_tokens"] if stats else 0), stats)
        if isinstance(end, Failed):
            self.tally.record("failed", stats, id=job.id, error=end.error.message)
            head = f"{job.label} {end.error.status} {job.name} {end.error.type}: {end.error.message}"
        else:
            cancelled = end.finish_reason == "cancelled"
            self.tally.record("cancelled" if cancelled else "served", stats, id=job.id,
                              finish_reason=end.finish_reason)
            status = 499 if cancelled else 200  # (nginx's "client closed request")
            head = f"{job.label} {status} {job.name} {end.finish_reason}"
        log.info("%s%s", head, f": {describe(stats)}" if stats else "")
        job.emit(end)

    def _sampling(self, s):
        import mlx.core as mx
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(s.temperature, s.top_p, s.min_p, s.min_tokens_to_keep,
                               top_k=s.top_k, xtc_probability=s.xtc_probability,
                               xtc_threshold=s.xtc_threshold, xtc_special_tokens=self._special)
        penalties = {}
        if s.presence_penalty:
            penalties.update(presence_penalty=s.presence_penalty,
                             presence_context_size=s.presence_context_size)
        if s.frequency_penalty:
            penalties.update(frequency_penalty=s.frequency_penalty,
                             frequency_context_size=s.frequency_context_size)
        processors = make_logits_processors(s.logit_bias, s.repetition_penalty,
                                            s.repetition_context_size, **penalties)
        looks_back = max([s.repetition_context_size if s.repetition_penalty else 0,
                          s.presence_context_size if s.presence_penalty else 0,
                          s.frequency_context_size if s.frequency_penalty else 0])
        return sampler, looking_back(processors, looks_back)  # (long prompts: layer_major.py)

    def _leading_space(self, prompt: list[int], ids: list[int], text: str) -> str:
        """The first text of a reply that continues the prompt, with the leading space mlx-lm's
        streaming detokenizer drops from the start of every text (right for a new chat turn,
        not for a continuation: "Once upon a" + "time"). Decoded in the prompt's context, the
        reply's tokens so far (``ids``) say whether there was one."""
        context = list(prompt[-8:])
        base = self.tokenizer.decode(context)
        whole = self.tokenizer.decode(context + ids)
        return " " + text if whole.startswith(base) and whole[len(base):] == " " + text else text

    def _piece(self, text: str, r, gen: Generation) -> Piece:
        if not gen.logprobs:
            return Piece(text, r.token)
        import mlx.core as mx

        lp = r.logprobs
        top = None
        if gen.top_logprobs:
            k = min(gen.top_logprobs, lp.shape[-1])
            ids = mx.argpartition(-lp, kth=k - 1)[:k]
            pairs = sorted(zip(ids.tolist(), lp[ids].tolist()), key=lambda p: -p[1])
            top = [(self.tokenizer.decode([i]), _json_logprob(v)) for i, v in pairs]
        return Piece(text, r.token, _json_logprob(lp[r.token].item()), top,
                     self.tokenizer.decode([r.token]))

    def _stats(self, job: Job, last, n: int, t0: float) -> dict | None:
        import hobbit_mlx

        try:
            offload = hobbit_mlx.offload_stats(self.model)
        except Exception:  # the statistics must not turn one failure into another
            log.exception("offload statistics failed")
            return None
        return request_stats(offload, prompt_tokens=len(job.prompt), generation_tokens=n,
                             cached_tokens=job.cached_tokens,
                             cached_from_disk=job.cached_from_disk,
                             prompt_tps=float(last.prompt_tps) if last is not None else 0.0,
                             generation_tps=float(last.generation_tps) if last is not None else 0.0,
                             wall_s=time.perf_counter() - t0)
