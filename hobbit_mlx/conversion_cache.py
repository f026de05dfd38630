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
import sys
from dataclasses import dataclass
from pathlib import Path

from .store import (WEIGHT_INDEX, StoreError, check_references, checkpoint_weight_files,
                    file_stamp, is_hobbit_model, load_manifest, reconvert_command)


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
        name = local.name
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
    name = target.name[:-13]
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
                print(f"[hobbit_mlx] converting {path}{what} into {target} (once)")
            _drop_outdated(target, name, str(local.resolve()) if local.exists() else str(path),
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
    import fcntl

    from convert.resume import try_lock

    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    fd = try_lock(path)
    if fd is None:
        print(f"[hobbit_mlx] waiting for another process converting into {target}",
              file=sys.stderr, flush=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def _drop_outdated(target: Path, name: str, source: str, adapter: str) -> None:
    """Remove the cache's earlier conversions of ``source`` (with the same adapters) that
    ``target`` replaces (its config.json changed since: another stamp, another name), and what
    interrupted conversions of them kept: GBs no load reads any more. One a process is
    converting into now (it holds its lock) stays."""
    from convert import _remove, _tree_bytes
    from convert.resume import partial_origin, try_lock

    # (only names this cache gives: NAME-<12 hex digits>, and convert's partials of them; a
    # directory of the user's own that names the same source, "mymodel-8bit", stays)
    ours = re.compile(rf"(\.?){re.escape(name)}-[0-9a-f]{{12}}(\.partial-\d+(x[^/]*)?)?")
    for d in cache_root().glob(f"*{glob.escape(name)}-*"):
        m = ours.fullmatch(d.name)
        if m is None or d.name == target.name or d.name.startswith(f".{target.name}."):
            continue  # (this conversion's own partials are convert's to resume)
        if m.group(1) and m.group(2):
            origin = partial_origin(d)
        elif not m.group(1) and not m.group(2) and (d / SOURCE_STAMP).is_file() and \
                is_hobbit_model(d):
            try:
                manifest = load_manifest(d, check_files=False)
            except StoreError:
                continue
            origin = (manifest.source, manifest.adapter.get("path", ""))
        else:
            continue
        if origin != (source, adapter):
            continue
        # a partial's own lock; a conversion's, the lock file ``_converting`` holds
        try:
            lock = try_lock(d if m.group(2) else d.parent / f".{d.name}.lock")
        except OSError:
            continue
        if lock is None:
            continue
        try:
            size = _tree_bytes(d)
            _remove(d)
            if not m.group(2):
                _remove(d.parent / f".{d.name}.lock")  # (held: no process converts into it)
        finally:
            os.close(lock)
        print(f"[hobbit_mlx] removed {d} ({size / 2**20:.1f} MiB), an earlier conversion of "
              f"{source}", file=sys.stderr)


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


def _hub_stamp(repo_id: str) -> dict | None:
    """``source_stamp`` of the snapshot a hub id's cached download points to now (a newer
    revision downloaded since, by mlx-lm or huggingface-cli, moves it; no network is asked),
    None when the Hugging Face cache does not hold it."""
    from convert import MODEL_FILE_PATTERNS

    try:
        from huggingface_hub import snapshot_download
        snapshot = snapshot_download(repo_id, local_files_only=True,
                                     allow_patterns=[*MODEL_FILE_PATTERNS, "*.safetensors"])
    except Exception:  # noqa: BLE001 - (not cached, or not a hub id: nothing to compare)
        return None
    return {**source_stamp(Path(snapshot)), "revision": Path(snapshot).name}


def _still_converted(target: Path, made_from: dict | None, adapter: dict) -> bool:
    """Whether a cached conversion is still its source's: the files it reads in place unchanged,
    and those of a local source (``made_from``) as they were when converted; the adapters fused
    in (``adapter_record``) the same. A float source's store is a copy, so nothing but this
    stamp ties it to the weights it was made from; one converted before stamps were kept is
    trusted only where its references cover the weights."""
    try:
        manifest = load_manifest(target, check_files=False)
        check_references(target, manifest)
    except StoreError:
        return False
    if manifest.adapter != adapter:  # (retrained into the same folder)
        return False
    if made_from is None:  # (a hub id the Hugging Face cache does not hold now)
        return True
    try:
        return json.loads((target / SOURCE_STAMP).read_text()) == made_from
    except (OSError, ValueError):
        return bool(manifest.references)


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
    pid: int | None = None  # (a left-behind directory's process)


def scan(root: Path | None = None) -> list[CacheEntry]:
    """The conversions in the cache and what interrupted conversions left there, each with its
    state. Only the cache's own names are read (``NAME-<12 hex>`` with its source stamp, and
    convert's hidden directories of them): a folder of the user's own stays out of it."""
    root = cache_root() if root is None else root
    if not root.is_dir():
        return []
    entries = []
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        if _CONVERSION.fullmatch(d.name) and (d / SOURCE_STAMP).is_file() and is_hobbit_model(d):
            entries.append(_conversion(d))
        elif (m := _LEFT_BEHIND.fullmatch(d.name)) is not None:
            entries.append(_left_behind(d, m))
    return entries


def _conversion(d: Path) -> CacheEntry:
    from convert import _tree_bytes

    busy = _held(d.parent / f".{d.name}.lock")
    try:
        manifest = load_manifest(d, check_files=False)
    except StoreError as e:
        return CacheEntry(d, "conversion", "", "", _tree_bytes(d),
                          f"unreadable, a load converts it again ({e})", stale=not busy, busy=busy)
    source, adapter = manifest.source, manifest.adapter.get("path", "")
    state, stale = _conversion_state(d, source, adapter, manifest.adapter)
    return CacheEntry(d, "conversion", source, adapter, _tree_bytes(d),
                      "converting now" if busy else state, stale and not busy, busy)


def _conversion_state(d: Path, source: str, adapter: str, fused: dict) -> tuple[str, bool]:
    """(state, stale) of the cached conversion ``d`` of ``source``: current when a load of
    ``source`` (with ``adapter``) would read ``d`` as it is."""
    from convert import ConversionError
    from convert.adapters import adapter_files, adapter_record

    local = Path(source)
    if local.is_absolute() and not (local / "config.json").is_file():
        return "source gone", True
    if adapter:
        try:
            if adapter_record(adapter_files(adapter, ConversionError)) != fused:
                return "outdated: adapters trained again", True
        except ConversionError:
            return "adapters gone", True
    if cache_target(source, Path(adapter) if adapter else None).name[-12:] != d.name[-12:]:
        return "outdated: config.json changed", True
    made_from = source_stamp(local) if local.is_absolute() else _hub_stamp(source)
    if not _still_converted(d, made_from, fused):
        return "outdated: source changed", True
    return "current", False


def _left_behind(d: Path, m: re.Match) -> CacheEntry:
    """What an interrupted conversion into the cache left: its partial directory (the layers it
    finished, which a load of the same source resumes from) or the model it was replacing."""
    from convert import YOUNG_PARTIAL_S, _age_s, _tree_bytes
    from convert.resume import layers_kept, partial_origin, process_running

    pid = int(m["pid"])
    target = d.parent / m["target"]
    if m["kind"] == "old":
        busy = pid != os.getpid() and process_running(pid)
        state = ("being replaced now" if busy else
                 f"replaced by a conversion interrupted (pid {pid}) before removing it")
        return CacheEntry(d, "replaced", "", "", _tree_bytes(d), state, not busy, busy, pid)
    kept = layers_kept(d)
    busy = _held(d, pid) or (not kept and _age_s(d) < YOUNG_PARTIAL_S and process_running(pid))
    source, adapter = partial_origin(d) or ("", "")
    if busy:
        state, stale = f"converting now (pid {pid})", False
    elif is_hobbit_model(target):
        state, stale = "interrupted, converted since", True
    elif source and _resumable(source, adapter, target):
        state, stale = (f"interrupted, resumable: {kept} layer{'s' if kept != 1 else ''} "
                        "kept"), False
    else:
        state, stale = "interrupted, source changed or gone", True
    return CacheEntry(d, "partial", source, adapter, _tree_bytes(d), state, stale, busy, pid)


def _resumable(source: str, adapter: str, target: Path) -> bool:
    """Whether a load of ``source`` (with ``adapter``) converts into ``target`` now."""
    local = Path(source)
    if local.is_absolute() and not (local / "config.json").is_file():
        return False
    if adapter and not Path(adapter).is_dir():
        return False
    return cache_target(source, Path(adapter) if adapter else None).name[-12:] == \
        target.name[-12:]


def _held(path: Path, pid: int | None = None) -> bool:
    """Whether a process holds ``path``'s conversion lock now (a missing lock file: none)."""
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


def remove(entry: CacheEntry) -> bool:
    """Remove ``entry`` (a conversion with its lock file); False, leaving it, when a process is
    converting into it now (it takes the lock a conversion takes, so none starts meanwhile)."""
    from convert import _remove
    from convert.resume import process_running, try_lock

    if entry.kind == "replaced":
        if entry.pid != os.getpid() and process_running(entry.pid):
            return False
        _remove(entry.path)
        return not entry.path.exists()
    lock_path = (entry.path if entry.kind == "partial" else
                 entry.path.parent / f".{entry.path.name}.lock")
    try:
        lock = try_lock(lock_path, entry.pid)
    except OSError:  # (gone meanwhile)
        return not entry.path.exists()
    if lock is None:
        return False
    try:
        _remove(entry.path)
        if entry.kind == "conversion":
            _remove(lock_path)  # (held: no process converts into it)
    finally:
        os.close(lock)
    return not entry.path.exists()


def remove_unused_locks(root: Path | None = None) -> int:
    """Remove the lock files of conversions no longer in the cache (none holds them); how many."""
    from convert.resume import try_lock

    root = cache_root() if root is None else root
    removed = 0
    for path in root.glob(".*.lock") if root.is_dir() else ():
        m = _LOCK.fullmatch(path.name)
        if m is None or (root / m["target"]).exists():
            continue
        try:
            lock = try_lock(path)
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
