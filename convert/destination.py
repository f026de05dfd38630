"""The output side: the checks on DST (not the source, not a directory of other files, a parent
that can be one), the partial directories conversions write into (taken over, resumed or
removed), SIGINT and SIGTERM held while DST is swapped, and the final install."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from hobbit_mlx.store import STORE_DIR, is_hobbit_model

from .errors import ConversionError
from .resume import (RESUME_DIR, ConversionProgress, PartialClaim, layers_kept, process_running,
                     read_progress, try_lock)


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (not what a link points to); best effort."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_symlink() or path.exists():
            path.unlink()
    except OSError:
        pass


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed); best effort."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


_LEFT_BEHIND = re.compile(r"\.(partial|old)-(\d+)(x[^/]*)?$")
YOUNG_PARTIAL_S = 60  # a partial with no layer recorded yet may be one being made: left alone


def _partial_pid(d: Path, dst: Path) -> int | None:
    """The process a conversion's temporary directory (or replaced DST) names, or None."""
    m = _LEFT_BEHIND.fullmatch(d.name[len(dst.name) + 1:])
    return int(m.group(2)) if m else None


def _take_over_partials(dst: Path, stamp: dict, num_layers: int,
                        claim: PartialClaim) -> ConversionProgress | None:
    """What conversions into ``dst`` that no longer run left behind (partial directories no
    process holds locked; a replaced DST whose process ended): a partial of this very
    conversion (same source, options and code; see ``convert/resume.py``) is resumed in place
    (its progress; it and its lock go into ``claim`` at once); anything else is removed, saying
    so. A partial another process is converting into is left, saying so."""
    progress = None
    held = claim.locks
    for d in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*-*")):
        pid = _partial_pid(d, dst)
        if pid is None:
            continue
        if ".partial-" not in d.name:  # (a replaced DST, while its conversion swaps it in)
            if pid != os.getpid() and process_running(pid):
                continue
            lock = None
        else:
            try:
                lock = try_lock(d, pid)
            except OSError:  # (gone since the listing)
                continue
            if lock is None:
                print(f"[convert] left {d} alone: another conversion into {dst} is running "
                      f"(pid {pid}); this one starts afresh", file=sys.stderr)
                continue
            held.append(lock)
        if progress is None and lock is not None and (progress := read_progress(d, stamp)):
            claim.path = d
            for leftover in d.iterdir():  # what came after the layers is made again
                if leftover.name not in (STORE_DIR, RESUME_DIR):
                    _remove(leftover)
            print(f"[convert] resuming an interrupted conversion into {dst}: "
                  f"{len(progress.layers)} of {num_layers} layers were done ({d.name})",
                  file=sys.stderr)
            continue
        try:
            if lock is not None and not layers_kept(d) and _age_s(d) < YOUNG_PARTIAL_S and \
                    process_running(pid):
                continue  # (made a moment ago by a process that has not locked it yet)
            size = _tree_bytes(d) if d.is_dir() and not d.is_symlink() else 0
            _remove(d)
        finally:
            if lock is not None:
                held.remove(lock)
                os.close(lock)
        what = (f"the partial output of an interrupted conversion (pid {pid})"
                if ".partial-" in d.name else
                f"the old model an interrupted conversion (pid {pid}) was replacing")
        print(f"[convert] removed {d} ({size / 2**20:.1f} MiB), {what}", file=sys.stderr)
    return progress


def _age_s(path: Path) -> float:
    """Seconds since ``path`` last changed (infinite once it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _new_partial(dst: Path, claim: PartialClaim) -> Path:
    """A new partial directory for this conversion, under a name no other process has (a pid
    can repeat across containers sharing a volume), locked (both into ``claim``)."""
    claim.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}x",
                                       dir=dst.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(claim.path, 0o777 & ~umask)  # (mkdtemp's 0700: the model its owner's alone)
    lock = try_lock(claim.path)
    if lock is not None:
        claim.locks.append(lock)
    return claim.path


def _keep_for_resume(e: BaseException, tmp: Path, num_layers: int) -> bool:
    """Whether a conversion stopped by ``e`` keeps its finished layers for the next one: when
    it was interrupted (Ctrl-C, SIGTERM) or could not read or write (a full disk, say), and
    some layers are recorded done. Says where they are; ``e.kept_partial`` names the directory."""
    kept = layers_kept(tmp)
    if not isinstance(e, (KeyboardInterrupt, OSError)) or not kept:
        return False
    e.kept_partial = tmp
    print(f"[convert] kept {kept} of {num_layers} converted layers in {tmp}: the same command "
          "resumes from there (delete it to start over)", file=sys.stderr)
    return True


def interrupt_handler(signum, frame):
    """SIGINT's and SIGTERM's handler in ``python -m convert``: both interrupt a conversion
    (the layers it finished are kept for the next one) with KeyboardInterrupt. A signal that
    comes once the new model is in place does not: the conversion finishes (see
    ``_signals_held``)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_held(note: str | None = None):
    """SIGINT and SIGTERM wait until the block ends (steps that must not stop halfway: swapping
    DST, removing a directory); yields the list of those that came. Only the main thread
    receives signals (elsewhere this holds nothing)."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def hold(signum, frame):
        if note and not pending:
            print(note, file=sys.stderr, flush=True)
        pending.append(signum)

    old = {}
    try:
        with contextlib.suppress(ValueError):  # (a subinterpreter: signals are not its own)
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, hold)
        yield pending
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _deliver(pending: list[int]) -> None:
    """Signals held while DST was replaced, once it was: ``python -m convert``'s own handler
    (which would interrupt the conversion) is skipped, the conversion being complete; any other
    runs now (a library caller's Ctrl-C is a KeyboardInterrupt after all; SIGTERM at its default
    action ends the process, the new model complete)."""
    for sig in dict.fromkeys(pending):
        handler = signal.getsignal(sig)
        if handler is interrupt_handler or handler in (signal.SIG_IGN, None):
            continue
        if callable(handler):
            handler(sig, None)
        else:
            signal.raise_signal(sig)


def _what_is(dst: Path) -> str:
    if dst.is_symlink():
        return "a symbolic link"
    if not dst.is_dir():
        return "a file"
    if is_hobbit_model(dst):
        return "a converted hobbit model"
    return "an empty directory" if not any(dst.iterdir()) else "a directory"


def _replaceable(dst: Path) -> bool:
    """What ``force`` may replace: a converted hobbit model, an empty directory, a file or a
    link (not what it points to); never a directory of other things (the folder meant to hold
    the model, say, which replacing would delete)."""
    return _what_is(dst) != "a directory"


def _check_dst(dst: Path, force: bool, src: str | Path, late: bool = False) -> None:
    """Refuse a DST that exists (without ``force``), or that ``force`` must not replace;
    ``late``: it appeared while converting (another conversion into it, say)."""
    if not (dst.exists() or dst.is_symlink()):
        return
    what = _what_is(dst)
    if not _replaceable(dst):
        name = Path(str(src).rstrip("/")).name or "model"
        raise ConversionError(
            f"{dst} is a directory of other files, not a converted hobbit model: the converter "
            f"does not replace it (not even with --force); give a new directory for the model, "
            f"e.g. {dst / name}")
    if not force:
        if late:
            raise FileExistsError(f"{dst} appeared while converting ({what}; another conversion "
                                  "into it?): nothing was written; pass --force to replace it")
        raise FileExistsError(f"{dst} already exists ({what}); pass --force to replace it")


def _real(path: str | Path) -> Path:
    """``path`` absolute, with ``~`` and every symlink resolved (also when it does not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _check_not_source(src_dir: Path, dst: Path, by_reference: bool | None = None) -> None:
    """Refuse a DST that is the source, contains it, or holds a file the source's files link to:
    replacing DST (``--force``) would delete the source (and a store by reference reads it)."""
    d, s = _real(dst), _real(src_dir)
    if _same(d, s):
        raise ConversionError(f"{dst} is the source checkpoint itself ({s}); converting into it "
                              "would replace the source: write the converted model to another directory")
    if any(_same(d, parent) for parent in s.parents):
        raise ConversionError(f"{dst} contains the source checkpoint {s}; replacing it would delete "
                              "the source: write the converted model to another directory")
    try:
        files = [f for f in Path(src_dir).iterdir()]
    except OSError:
        return
    for f in files:
        r = _real(f)
        if _same(r, d) or any(_same(d, parent) for parent in r.parents):
            reads = (" (and the converted model would read it in place)" if by_reference
                     else "")
            raise ConversionError(f"{dst} holds {r}, a file of the source checkpoint {src_dir} "
                                  f"({f.name} links to it); replacing {dst} would delete it{reads}: "
                                  "write the converted model to another directory")


def _same(a: Path, b: Path) -> bool:
    """One file or directory: the same path, or (on a case-insensitive disk, macOS's default,
    where ``~/Models`` is ``~/models``) the same inode."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist)
        return False


def _check_parent(dst: Path) -> None:
    """A clear error when DST cannot be a directory: a file where one of its parents should be."""
    for anc in (dst.parent, *dst.parent.parents):
        if anc.is_dir():
            return
        if anc.exists() or anc.is_symlink():
            what = "a broken symlink" if not anc.exists() else "a file"
            raise ConversionError(f"cannot write {dst}: {anc} is {what}, not a directory")


def _install(tmp: Path, dst: Path, force: bool, src: str | Path) -> None:
    """Put the finished ``tmp`` at ``dst``: without ``force`` only where nothing is (also when
    something appeared there since the conversion began), with it replacing only what ``force``
    may replace. Runs with SIGINT and SIGTERM held: once the new model is in place, removing
    the old one finishes."""
    if dst.exists() or dst.is_symlink():
        _check_dst(dst, force, src, late=True)  # (it may have appeared meanwhile)
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        _remove(old)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)  # put back what was there
            raise
        _remove(old)
        return
    try:
        os.mkdir(dst)  # claims DST, or fails if another conversion wrote it since the check above
    except FileExistsError:
        _check_dst(dst, force, src, late=True)  # (refuses; with force, replaces what it may)
        return _install(tmp, dst, force, src)
    try:
        os.rename(tmp, dst)  # (onto the empty directory just made)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise
