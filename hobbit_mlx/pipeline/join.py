"""Starting and joining the distributed group, and telling its ranks of a rank that failed
before they met.

Its own module because it owns the process-wide state of joining: ``JOINED``, ``_UNSTARTED`` and
the timeouts ``LOAD_TIMEOUT_S`` and ``INIT_STAGGER_S``. Everyone reads and sets them here, as
``join.LOAD_TIMEOUT_S`` and so on (the package does not re-export them: a copy of a bool or a
float taken at import would not see a later assignment).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import PipelineError
from .gather import gather_json

DEFAULT_TIMEOUT_S = 300.0
# How long a rank waits for the others while the pipeline loads (``Pipeline.start`` to the end of
# ``load``) before it exits with an error; the CLIs set it from --pipeline-timeout.
LOAD_TIMEOUT_S = DEFAULT_TIMEOUT_S

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
