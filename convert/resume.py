"""An interrupted conversion resumes where it stopped.

Converting a large checkpoint takes long (tens of GB quantized twice), and a Ctrl-C, a full disk
or a killed process should not throw away the layers already written. After each MoE layer the
converter records that layer's entry (``resume/layer_NNN.json``) and then the state that entry
refers to (``resume/state.json``: the store's file list so far, the source files read in place,
the number of finished layers), each written whole and flushed to the disk before the next step.

A later conversion into the same DST adopts such a partial directory when no process holds its
lock (a running conversion holds one on its own: ``try_lock``) and its stamp matches: the
same source files (size and modification time), config.json, widths, group size, copy mode and
adapters, and the same code (hobbit_mlx, MLX, mlx-lm). It checks that every finished layer's own
files hold what their records say, then starts at the first unfinished layer. Anything else is
removed as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hobbit_mlx import store as store_module
from hobbit_mlx.store import LayerEntry, durable_sync, file_stamp

RESUME_DIR = "resume"
STATE_NAME = "state.json"


def conversion_stamp(source_files: list[Path], config_text: str, options: dict) -> dict:
    """What must be the same for a partial conversion's layers to be this conversion's: the
    source files as they are on disk, its config.json, the options, and the code that converts
    (every module of ``convert`` and ``hobbit_mlx``, MLX's and mlx-lm's versions: layers an older
    version wrote are not resumed beside a newer one's)."""
    import mlx.core as mx
    import mlx_lm

    code = hashlib.sha1(f"{mx.__version__} {getattr(mlx_lm, '__version__', '')}".encode())
    for package in (Path(__file__).parent, Path(store_module.__file__).parent):
        for module in sorted(package.rglob("*.py")):
            code.update(module.read_bytes())
    return {"files": {str(f): file_stamp(f) for f in source_files},
            "config_sha1": hashlib.sha1(config_text.encode()).hexdigest(),
            "options": options, "code_sha1": code.hexdigest()}


def try_lock(path: Path, pid: int | None = None) -> int | None:
    """An exclusive lock on ``path`` (a partial directory, or a lock file, made if missing),
    held by the returned descriptor; None when another process holds it (a conversion running
    now). An OSError opening it propagates. The lock, not the pid in a partial's name, tells a
    running conversion from a dead one: a pid may be reused, and a process that stopped
    converting (a notebook's Ctrl-C) may live on. On a file system without locks (some network
    ones) the pid decides: ``pid`` still running (another process) counts as held."""
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # (no locks here: ENOLCK, EOPNOTSUPP...)
        if pid is not None and pid != os.getpid() and process_running(pid):
            os.close(fd)
            return None
    return fd


@dataclass
class PartialClaim:
    """The partial directory a conversion owns (once it does) and the locks it holds: set the
    moment they are taken, so that an interrupt at any point leaves nothing unreleased, and
    the error path removes only a directory this conversion owns."""

    path: Path | None = None
    locks: list[int] = field(default_factory=list)

    def release(self) -> None:
        while self.locks:
            os.close(self.locks.pop())


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine, as far as it can tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def partial_origin(partial: Path) -> tuple[str, str] | None:
    """(source, adapters' folder) of the conversion ``partial`` was left by; None if unknown."""
    try:
        options = json.loads((partial / RESUME_DIR / STATE_NAME).read_text())["stamp"]["options"]
        return str(options["source"]), str(options.get("adapter", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def layers_kept(partial: Path) -> int:
    """The finished layers ``partial`` records (0: none, or no record)."""
    try:
        return int(json.loads((partial / RESUME_DIR / STATE_NAME).read_text())["layers_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass
class ConversionProgress:
    """The finished layers of a conversion and the store state they refer to."""

    stamp: dict
    files: list[str] = field(default_factory=list)  # the manifest's, so far (appended to)
    references: dict[str, dict] = field(default_factory=dict)
    layers: list[LayerEntry] = field(default_factory=list)

    def record(self, tmp: Path, entry: LayerEntry) -> None:
        """Keep ``entry`` (its files already flushed) for a later conversion to resume from."""
        self.layers.append(entry)
        folder = tmp / RESUME_DIR
        folder.mkdir(exist_ok=True)
        _write_whole(folder / f"layer_{entry.layer:03d}.json", entry.to_json())
        _write_whole(folder / STATE_NAME, {"stamp": self.stamp, "files": self.files,
                                           "references": self.references,
                                           "layers_done": len(self.layers)})

    @staticmethod
    def discard(tmp: Path) -> None:
        """The finished model needs none of it."""
        folder = tmp / RESUME_DIR
        for f in folder.glob("*.json"):
            f.unlink()
        if folder.is_dir():
            folder.rmdir()


def read_progress(partial: Path, stamp: dict) -> ConversionProgress | None:
    """What ``partial`` finished, if it was this conversion and its files are intact; else None."""
    folder = partial / RESUME_DIR
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        if state.get("stamp") != stamp:
            return None
        done = int(state["layers_done"])
        layers = [LayerEntry.from_json(json.loads((folder / f"layer_{i:03d}.json").read_text()))
                  for i in range(done)]
        progress = ConversionProgress(stamp, list(state["files"]), dict(state["references"]), layers)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if [entry.layer for entry in layers] != list(range(done)) or not _files_intact(partial, progress):
        return None
    return progress


def _files_intact(partial: Path, progress: ConversionProgress) -> bool:
    """Every span of a finished layer in a file the conversion wrote lies within that file
    (their checksums are checked when first read, as every store's are)."""
    ends: dict[int, int] = {}
    for entry in progress.layers:
        for precision in entry.precisions.values():
            for record in precision.records:
                for index, offset, length in record.spans:
                    ends[index] = max(ends.get(index, 0), offset + length)
    for index, end in ends.items():
        if index >= len(progress.files):
            return False
        name = progress.files[index]
        if name in progress.references:  # a source file: the stamp covers it
            continue
        try:
            if (partial / name).stat().st_size < end:
                return False
        except OSError:
            return False
    return True


def _write_whole(path: Path, obj: dict) -> None:
    """``obj`` as JSON at ``path``: a temporary file flushed to the disk, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
        f.flush()
        durable_sync(f.fileno())
    os.replace(tmp, path)
