"""The cache of conversions: an unconverted checkpoint (a local directory or a hub id) given to
``load`` is converted once into ``cache_root()`` and loaded from there; a later load of the same
checkpoint finds it, and converts again only when the checkpoint (or the adapters fused in)
changed. ``scan`` and ``remove`` are ``python -m hobbit_mlx.manage``'s: what the cache holds,
what no load will read any more, and removing it."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .store import (CALIBRATED_ROUNDING, LOW_ROUNDINGS, WEIGHT_INDEX, StoreError,
                    check_references, checkpoint_weight_files, file_stamp, is_hobbit_model,
                    load_manifest, reconvert_command)


def cache_root() -> Path:
    """``$HOBBIT_MLX_CACHE``; unset or empty (as most tools read an empty variable), the default
    (an empty path would be the current directory): on macOS ``~/Library/Caches/hobbit_mlx``,
    which Time Machine does not back up (conversions hold GBs of 2-bit experts), elsewhere
    ``~/.cache/hobbit_mlx``."""
    default = (Path.home() / "Library" / "Caches" if sys.platform == "darwin"
               else Path.home() / ".cache") / "hobbit_mlx"
    return Path(os.environ.get("HOBBIT_MLX_CACHE") or default)


SOURCE_STAMP = ".hobbit_source.json"  # in a cached conversion: the source files it was made from


def cache_target(path: str | Path, adapter_dir: Path | None = None) -> Path:
    """Where the cache keeps the conversion of ``path`` (a local checkpoint, or a hub id) with
    the adapters in ``adapter_dir`` fused in: named after both, and keyed (12 hex digits) by the
    checkpoint's real path and its config.json's modification time, so that a changed config
    is converted anew (``_drop_outdated`` then removes the earlier one)."""
    local = Path(path).expanduser()
    if local.exists():
        cfg = local / "config.json"
        stamp = f"{local.resolve()}:{cfg.stat().st_mtime_ns if cfg.exists() else 0}"
        name = local.resolve().name  # (one conversion, loaded through a link or not)
    else:
        stamp, name = str(path), str(path).replace("/", "--")
    if adapter_dir is not None:
        stamp += f"+{adapter_dir.resolve()}"
        name += f"+{adapter_dir.resolve().name}"
    return cache_root() / f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"


def resolve_model(path: str | Path, progress: bool = True,
                  adapter_path: str | Path | None = None) -> Path:
    """A hobbit model directory for ``path``: as is, or converted once into the cache directory
    (with ``adapter_path``'s adapters fused in)."""
    adapter_path = adapter_path or None  # ("": none, as mlx-lm reads it)
    local = Path(path).expanduser()
    if local.exists() and is_hobbit_model(local):
        if adapter_path is not None:
            _check_fused(local, adapter_path)
        return local
    from convert import ConversionError, convert, resolve_source  # (unconverted sources only)
    from convert.adapters import adapter_files, adapter_record

    adapters = [] if adapter_path is None else adapter_files(adapter_path, ConversionError)
    target = cache_target(path, adapters[0].parent if adapters else None)
    made_from = source_stamp(local) if local.exists() else _hub_stamp(str(path))
    fused = adapter_record(adapters)  # (what a conversion with them keeps of them)
    if is_hobbit_model(target) and _still_converted(target, made_from, fused):
        return target
    if not local.exists():  # a hub id: downloaded first (a failure is one line, said alone)
        resolve_source(path)
        made_from = _hub_stamp(str(path))
    try:
        with _converting(target):
            # (another process, a pipeline rank or a server, may have converted it meanwhile)
            if is_hobbit_model(target) and _still_converted(target, made_from, fused):
                return target
            if progress:  # (a cached conversion whose source changed is ours to redo)
                what = f" with the adapters of {adapter_path} fused" if adapters else ""
                again = _outdated_note(target) if is_hobbit_model(target) else ""
                print(f"[hobbit_mlx] converting {path}{what} into {target} "
                      f"{again or '(once)'}")
            _drop_outdated(target, str(local.resolve()) if local.exists() else str(path),
                           fused.get("path", ""))
            convert(path, target, force=True, progress=progress, adapter_path=adapter_path)
            if made_from is not None:
                _write_stamp(target, made_from)
    except OSError as e:  # (a full disk: say where, and which variable moves it)
        raise _cache_write_error(e, local, target) from None
    return target


@contextlib.contextmanager
def _converting(target: Path):
    """One process at a time converts into a cached ``target``; another waits for it (saying
    so), then loads what it made. Two converting at once (the ranks of a pipeline on one Mac,
    a server and a CLI) each replaced the other's model, under a load reading it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = take_lock(_lock_path(target),
                   wait_note=f"[hobbit_mlx] waiting for another process converting into {target}")
    try:
        yield
    finally:
        os.close(fd)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def take_lock(path: Path, wait_note: str | None = None) -> int | None:
    """An exclusive lock on the lock file ``path``, held by the returned descriptor: with
    ``wait_note``, waited for (the note said once), else None when another process holds it.
    Whoever removes a lock file does so holding it (a removed conversion's, an outdated one's),
    and a process that waited on it then holds a file no longer at ``path``, as a later process
    holds the new one: so a lock counts only once ``path`` still names the file locked, and is
    taken again otherwise."""
    import fcntl

    from convert.resume import try_lock

    while True:
        fd = try_lock(path)
        if fd is None:
            if wait_note is None:
                return None
            if wait_note:
                print(wait_note, file=sys.stderr, flush=True)
            wait_note = ""
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _names(path, fd):
            return fd
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is the file open at ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _drop_outdated(target: Path, source: str, adapter: str) -> None:
    """Remove what the cache holds of ``source`` (with the same adapters) besides ``target``:
    earlier conversions (its config.json changed since: another key, another name) and what
    interrupted conversions of them left, GBs no load reads any more; as ``manage --delete``
    would (``scan``'s entries, ``remove``'s locks: one a process converts into stays). What
    was left for ``target`` itself is convert's, to resume or remove."""
    for entry in scan(target.parent):
        if (entry.source, entry.adapter) != (source, adapter) or entry.busy or \
                _target_of(entry) == target:
            continue
        if remove(entry) is None:
            print(f"[hobbit_mlx] removed {entry.path} ({entry.size / 2**20:.1f} MiB), an "
                  f"earlier conversion of {source}", file=sys.stderr)


def _check_fused(model_dir: Path, adapter_path: str | Path) -> None:
    """A converted model takes adapters only if it was converted with these very ones (the
    same folder, its files unchanged): they are fused while converting, and fusing needs the
    checkpoint it was converted from."""
    from convert import ConversionError
    from convert.adapters import adapter_files, adapter_record

    adapter = adapter_record(adapter_files(adapter_path, ConversionError))
    manifest = load_manifest(model_dir, check_files=False)
    source = manifest.source or "SRC"
    if manifest.adapter.get("path") == adapter["path"]:
        if manifest.adapter == adapter:
            return
        raise ConversionError(
            f"the adapters in {adapter_path} changed since {model_dir} was converted with them: "
            f"convert again with `{reconvert_command(model_dir, manifest)}`")
    raise ConversionError(
        f"{model_dir} is a converted model, and adapters are fused while converting: load the "
        f"checkpoint it was converted from ({source}) with --adapter-path {adapter_path}, or "
        f"convert it with `python -m convert {source} DST --adapter-path {adapter_path}`")


def source_stamp(local: Path) -> dict:
    """What a conversion of a local checkpoint was made from: the size and modification time of
    its config, weight, tokenizer and template files (stats only: nothing is read)."""
    from convert import _model_files

    files = [local / "config.json", local / WEIGHT_INDEX]
    try:
        files += checkpoint_weight_files(local) + _model_files(local)
    except (StoreError, OSError):
        pass  # (the conversion says what is missing)
    try:
        return {str(f.relative_to(local)): file_stamp(f) for f in files if f.is_file()}
    except OSError:
        return {}  # (changing under us: converted again, and convert reports it)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot a hub id's cached download points to now (a newer revision downloaded
    since, by mlx-lm or huggingface-cli, moves it; no network is asked), None when the Hugging
    Face cache does not hold it."""
    from convert import MODEL_FILE_PATTERNS

    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=[*MODEL_FILE_PATTERNS, "*.safetensors"]))
    except Exception:  # noqa: BLE001 - (not cached, or not a hub id: nothing to compare)
        return None


def _hub_stamp(repo_id: str) -> dict | None:
    """``source_stamp`` of the snapshot a hub id's cached download points to now, None when the
    Hugging Face cache does not hold it."""
    snapshot = _hub_snapshot(repo_id)
    return None if snapshot is None else _snapshot_stamp(snapshot)


def _snapshot_stamp(snapshot: Path) -> dict:
    return {**source_stamp(snapshot), "revision": snapshot.name}


def _still_converted(target: Path, made_from: dict | None, adapter: dict) -> bool:
    """Whether a cached conversion is still its source's: the files it reads in place unchanged,
    and those of a local source (``made_from``) as they were when converted; the adapters fused
    in (``adapter_record``) the same. A float source's store is a copy, so nothing but this
    stamp ties it to the weights it was made from; one converted before stamps were kept is
    trusted only where its references cover the weights. One whose low copies were rounded
    as this converter no longer rounds them (before the fit, ``LOW_ROUNDINGS``) is made again:
    the cache holds what ``convert`` makes now."""
    try:
        manifest = load_manifest(target, check_files=False)
        check_references(target, manifest)
    except StoreError:
        return False
    if manifest.adapter != adapter:  # (retrained into the same folder)
        return False
    if _older_rounding(manifest):
        return False
    if made_from is None:  # (a hub id the Hugging Face cache does not hold now)
        return True
    try:
        return json.loads((target / SOURCE_STAMP).read_text()) == made_from
    except (OSError, ValueError):
        return bool(manifest.references)


def _older_rounding(manifest) -> bool:
    return manifest.low_rounding not in (LOW_ROUNDINGS[0], CALIBRATED_ROUNDING)


def _outdated_note(target: Path) -> str:
    """Why a cached conversion is made again, where the user could not guess it."""
    try:
        if _older_rounding(load_manifest(target, check_files=False)):
            return ("again: its 2-bit copies were rounded to the nearest level, and this "
                    "converter fits them (a third less error)")
    except StoreError:
        pass
    return ""


def _write_stamp(target: Path, made_from: dict) -> None:
    """Keep ``made_from`` beside the conversion, written whole (renamed into place)."""
    tmp = target / f"{SOURCE_STAMP}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(made_from))
        os.replace(tmp, target / SOURCE_STAMP)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_write_error(e: OSError, source: Path, target: Path) -> Exception:
    """A conversion into the cache that failed on an OSError, in one line naming the file and,
    for a write (a full disk, no permission), the cache directory; any other error as it is."""
    from convert import ConversionError

    reason = e.strerror or str(e) or type(e).__name__
    name = None if e.filename is None else Path(e.filename)
    if name is not None and source.exists() and _inside(name, source):
        return ConversionError(f"cannot read {name}: {reason} (converting {source})")
    disk_full = e.errno in (errno.ENOSPC, errno.EDQUOT)  # (a failed write names no file)
    if not disk_full and (name is None or not _inside(name, cache_root())):
        return e
    what = f"{target}" + (f" ({name})" if name is not None and name != target else "")
    hint = "free space there, or " if disk_full else ""
    kept = getattr(e, "kept_partial", None)
    kept = (f"; the layers converted so far are kept in {kept} (loading again resumes there; "
            "delete it to free their space)" if kept is not None else "")
    return ConversionError(f"cannot write {what}: {reason}; {hint}set HOBBIT_MLX_CACHE to "
                           f"another directory (now {cache_root()}){kept}")


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# ---------------------------------------------------------------------------------------------
# What the cache holds (``python -m hobbit_mlx.manage``)
# ---------------------------------------------------------------------------------------------

MEASURED_DIR = "measured"  # measured activations per model (``measure.measured_activations``)
_CONVERSION = re.compile(r".+-[0-9a-f]{12}")
_LEFT_BEHIND = re.compile(r"\.(?P<target>.+-[0-9a-f]{12})\.(?P<kind>partial|old)-(?P<pid>\d+)"
                          r"(x[^/]*)?")
_LOCK = re.compile(r"\.(?P<target>.+-[0-9a-f]{12})\.lock")


@dataclass
class CacheEntry:
    """One thing the cache holds: a conversion, what an interrupted conversion kept
    (``partial``), or a model an interrupted conversion was replacing (``replaced``)."""

    path: Path
    kind: str
    source: str  # the checkpoint it was converted from ("" unknown)
    adapter: str  # the adapters' folder fused in ("" none)
    size: int  # bytes of its own files (one read in place also reads its source's)
    state: str  # why it stays, or why no load will read it
    stale: bool  # no load will read it: ``--prune`` removes it
    busy: bool = False  # a process converts into it now: nothing removes it


def scan(root: Path | None = None) -> list[CacheEntry]:
    """The conversions in the cache and what interrupted conversions left there, each with its
    state. Only the cache's own names are read (``NAME-<12 hex>`` with its source stamp or its
    lock file, and convert's hidden directories of them): a folder of the user's own stays out
    of it. A cache path that is no directory is a ``NotADirectoryError``."""
    root = cache_root() if root is None else root
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} (the cache of conversions, HOBBIT_MLX_CACHE) is not "
                                 "a directory")
    if not root.exists():
        return []
    entries = []
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        if _CONVERSION.fullmatch(d.name) and ((d / SOURCE_STAMP).is_file() or
                                               _lock_path(d).is_file()):
            entries.append(_conversion(d))
        elif (m := _LEFT_BEHIND.fullmatch(d.name)) is not None:
            entries.append(_left_behind(d, m))
    return entries


def model_origin(d: Path) -> tuple[str, str]:
    """(source, adapters' folder) a model directory's manifest names; ("", "") if none."""
    try:
        manifest = load_manifest(d, check_files=False)
    except StoreError:
        return "", ""
    return manifest.source, manifest.adapter.get("path", "")


def _conversion(d: Path) -> CacheEntry:
    from convert import _tree_bytes

    size = _tree_bytes(d)
    if _held(_lock_path(d)):
        return CacheEntry(d, "conversion", *model_origin(d), size, "converting now", False, True)
    if not is_hobbit_model(d):
        return CacheEntry(d, "conversion", "", "", size,
                          "incomplete (no manifest): a load converts it again", True)
    try:
        manifest = load_manifest(d, check_files=False)
    except StoreError:
        return CacheEntry(d, "conversion", "", "", size,
                          "unreadable manifest.json: a load converts it again", True)
    source, adapter = manifest.source, manifest.adapter.get("path", "")
    state, stale = _conversion_state(d, manifest)
    return CacheEntry(d, "conversion", source, adapter, size, state, stale)


def _conversion_state(d: Path, manifest) -> tuple[str, bool]:
    """(state, stale) of the cached conversion ``d``: current when a load of its source (with
    its adapters) would read ``d`` as it is. One whose source is gone is stale when it reads
    the source in place; a complete copy (of a float source) still loads by its own path."""
    from convert import ConversionError
    from convert.adapters import adapter_files, adapter_record

    source, adapter = manifest.source, manifest.adapter.get("path", "")
    local = Path(source)
    snapshot = None if local.is_absolute() else _hub_snapshot(source)
    if (local.is_absolute() and not (local / "config.json").is_file()) or \
            (not local.is_absolute() and snapshot is None):
        where = "" if local.is_absolute() else " from the Hugging Face cache"
        if manifest.references:
            return f"source gone{where} (it read it in place)", True
        return (f"source gone{where}; a complete copy, which loads by its path "
                "(--delete removes it)"), False
    if adapter:
        try:
            if adapter_record(adapter_files(adapter, ConversionError)) != manifest.adapter:
                return "outdated: adapters trained again", True
        except ConversionError:
            return "adapters gone", True
    expected = cache_target(source, Path(adapter) if adapter else None)
    if expected.name[-12:] != d.name[-12:]:
        return "outdated: config.json changed", True
    if expected.name != d.name:
        return f"outdated: a load of it converts into {expected.name}", True
    if _older_rounding(manifest):
        return "outdated: 2-bit copies rounded by an older converter", True
    made_from = source_stamp(local) if snapshot is None else _snapshot_stamp(snapshot)
    if not _still_converted(d, made_from, manifest.adapter):
        return "outdated: source changed", True
    if manifest.low_rounding == CALIBRATED_ROUNDING:
        return "current, 2-bit copies calibrated", False
    return "current", False


def _left_behind(d: Path, m: re.Match) -> CacheEntry:
    """What an interrupted conversion into the cache left: its partial directory (the layers it
    finished, which a load of the same source resumes from) or the model it was replacing."""
    from convert import YOUNG_PARTIAL_S, _age_s, _tree_bytes
    from convert.resume import layers_kept, partial_origin, process_running

    pid = int(m["pid"])
    target = d.parent / m["target"]
    size = _tree_bytes(d)
    if m["kind"] == "old":  # (``_install`` swaps it out holding the conversion lock)
        if _held(_lock_path(target)):
            return CacheEntry(d, "replaced", *model_origin(d), size, "being replaced now", False,
                              True)
        return CacheEntry(d, "replaced", *model_origin(d), size,
                          f"replaced by a conversion interrupted (pid {pid}) before removing it",
                          True)
    kept = layers_kept(d)
    if _held(d, pid) or (not kept and _age_s(d) < YOUNG_PARTIAL_S and process_running(pid)):
        return CacheEntry(d, "partial", *(partial_origin(d) or model_origin(d)), size,
                          f"converting now (pid {pid})", False, True)
    origin = partial_origin(d)
    if origin is None:  # (its layers' record is gone: a finished model, not yet in place)
        return CacheEntry(d, "partial", *model_origin(d), size,
                          "interrupted while being put in place", True)
    if is_hobbit_model(target):
        return CacheEntry(d, "partial", *origin, size, "interrupted, converted since", True)
    if _resumable(d, target):
        return CacheEntry(d, "partial", *origin, size,
                          f"interrupted, resumable: {kept} layer{'s' if kept != 1 else ''} kept",
                          False)
    return CacheEntry(d, "partial", *origin, size,
                      "interrupted, cannot resume: its source, options or hobbit_mlx changed",
                      True)


def _resumable(partial: Path, target: Path) -> bool:
    """Whether a load of the partial's source converts into ``target`` and resumes from it:
    the conversion stamp ``convert`` resumes by (source files, config, adapters, options, the
    converting code) is what it would be now."""
    from convert import ConversionError, _source_files
    from convert.adapters import adapter_files
    from convert.resume import RESUME_DIR, STATE_NAME, conversion_stamp

    try:
        stamp = json.loads((partial / RESUME_DIR / STATE_NAME).read_text())["stamp"]
        options = stamp["options"]
        source, adapter = str(options["source"]), str(options.get("adapter", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    local = Path(source)
    src_dir = local if local.is_absolute() else _hub_snapshot(source)
    if src_dir is None or not (src_dir / "config.json").is_file():
        return False
    if cache_target(source, Path(adapter) if adapter else None).name != target.name:
        return False
    try:
        files = _source_files(src_dir) + (adapter_files(adapter, ConversionError)
                                          if adapter else [])
        config = json.loads((src_dir / "config.json").read_text())
        return conversion_stamp(files, json.dumps(config, sort_keys=True), options) == stamp
    except (OSError, ValueError, StoreError, ConversionError):
        return False


def _held(path: Path, pid: int | None = None) -> bool:
    """Whether a process holds ``path``'s lock now (a missing lock file: none)."""
    from convert.resume import try_lock

    if not path.exists():
        return False
    try:
        fd = try_lock(path, pid)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def remove(entry: CacheEntry) -> str | None:
    """Remove ``entry``; None once removed, else why not (a process converting into it now, a
    file that cannot be removed: what is left stays listed). It holds the lock a conversion
    holds meanwhile (a partial's own), so none starts into it."""
    from convert.resume import try_lock

    target = _target_of(entry)
    lock_path = entry.path if entry.kind == "partial" else _lock_path(target)
    try:
        lock = try_lock(lock_path) if entry.kind == "partial" else take_lock(lock_path)
    except FileNotFoundError:  # (a partial gone meanwhile)
        return None
    if lock is None:
        return "a process is converting into it now"
    try:
        shutil.rmtree(entry.path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"cannot remove {e.filename or entry.path}: {e.strerror or e}"
    finally:
        if entry.kind != "partial" and not target.exists():
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # (held: no process converts into it)
        os.close(lock)
    return None


def _target_of(entry: CacheEntry) -> Path:
    """The conversion ``entry`` is, or was left by."""
    m = _LEFT_BEHIND.fullmatch(entry.path.name)
    return entry.path if m is None else entry.path.parent / m["target"]


def remove_unused_locks(root: Path | None = None) -> int:
    """Remove the lock files of conversions no longer in the cache (none holds them; nor is an
    interrupted conversion of them kept); how many."""
    root = cache_root() if root is None else root
    removed = 0
    for path in root.glob(".*.lock") if root.is_dir() else ():
        m = _LOCK.fullmatch(path.name)
        if m is None or (root / m["target"]).exists() or \
                any(root.glob(f".{glob.escape(m['target'])}.partial-*")):
            continue
        try:
            lock = take_lock(path)
        except OSError:
            continue
        if lock is None:
            continue
        try:
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(lock)
    return removed
