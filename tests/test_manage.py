"""``python -m hobbit_mlx.manage``: the cache of conversions listed with what no load will read
any more (a deleted or changed source, layers of an interrupted conversion that cannot resume),
and removed on request, never under a process converting into it."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

import convert as converter
from hobbit_mlx import cli_common
from hobbit_mlx.conversion_cache import resolve_model, scan
from hobbit_mlx.manage import main
from hobbit_mlx.testing.tiny_models import make_tiny_model

LAYERS = 3


def _source(tmp_path: Path, name: str, seed: int = 0) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path / name, seed=seed,
                           config_overrides={"num_hidden_layers": LAYERS})


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(root))
    return root


def _later(path: Path) -> None:
    """``path`` modified a second later, as an edit would leave it."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _manage(argv: list[str]) -> int:
    return cli_common.run(main, argv)


def test_scan_tells_current_conversions_from_those_no_load_reads(tmp_path, cache, capsys):
    kept_src = _source(tmp_path, "kept")
    kept = resolve_model(kept_src, progress=False)
    gone_src = _source(tmp_path, "gone", seed=1)
    gone = resolve_model(gone_src, progress=False)
    edited_src = _source(tmp_path, "edited", seed=2)
    edited = resolve_model(edited_src, progress=False)
    configured_src = _source(tmp_path, "configured", seed=3)
    configured = resolve_model(configured_src, progress=False)
    shutil.rmtree(gone_src)
    _later(edited_src / "model.safetensors")  # (a load converts it again, into the same place)
    _later(configured_src / "config.json")  # (a load converts it into another place)
    mine = cache / "mymodel-0123456789ab"  # a folder of the user's own, not the cache's
    shutil.copytree(kept, mine, symlinks=True)
    (mine / ".hobbit_source.json").unlink()

    entries = {e.path: e for e in scan(cache)}
    assert set(entries) == {kept, gone, edited, configured}
    assert entries[kept].state == "current" and not entries[kept].stale
    assert entries[kept].source == str(kept_src.resolve())
    assert entries[gone].stale and entries[gone].state == "source gone (it read it in place)"
    assert entries[edited].stale and entries[edited].state == "outdated: source changed"
    assert entries[configured].stale and \
        entries[configured].state == "outdated: config.json changed"
    assert all(e.size > 0 and e.kind == "conversion" for e in entries.values())

    assert _manage([]) == 0
    out = capsys.readouterr().out
    assert kept.name in out and "3 no load will read" in out and "--prune" in out

    assert _manage(["--prune", "--yes"]) == 0
    assert "removed 3" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == \
        sorted([kept.name, mine.name])
    assert not list(cache.glob(f".{gone.name}*"))  # (its lock file went with it)
    assert resolve_model(kept_src, progress=False) == kept
    assert [e.path for e in scan(cache)] == [kept]


def test_layers_an_interrupted_conversion_kept_stay_while_they_can_resume(tmp_path, cache,
                                                                          monkeypatch, capsys):
    src = _source(tmp_path, "src")
    real = converter._convert_layer

    def interrupted(weights, li, *a, **k):
        if li == 1:
            raise KeyboardInterrupt
        return real(weights, li, *a, **k)

    monkeypatch.setattr(converter, "_convert_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(src, progress=False)
    [partial] = scan(cache)
    assert partial.kind == "partial" and not partial.stale and not partial.busy
    assert partial.state == "interrupted, resumable: 1 layer kept"
    assert partial.source == str(src.resolve())

    assert _manage(["--prune", "--yes"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert partial.path.is_dir()

    _later(src / "model.safetensors")  # (the next load would start afresh: same name, new stamp)
    [partial] = scan(cache)
    assert partial.stale and partial.state.startswith("interrupted, cannot resume")
    assert _manage(["--prune", "--yes"]) == 0
    assert list(cache.iterdir()) == []  # (the conversion's lock file too)


def test_what_a_process_converts_into_is_left_alone(tmp_path, cache, capsys):
    src = _source(tmp_path, "src")
    target = resolve_model(src, progress=False)
    shutil.rmtree(src)
    fd = os.open(cache / f".{target.name}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # (a conversion into it, running)
    try:
        [entry] = scan(cache)
        assert entry.busy and not entry.stale and entry.state == "converting now"
        assert _manage(["--delete", "--pattern", "src", "--yes"]) == 1
        assert f"left {target.name}: converting now" in \
            capsys.readouterr().out
        assert target.is_dir()
    finally:
        os.close(fd)
    assert _manage(["--prune", "--yes"]) == 0
    assert not target.exists()


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_delete_needs_a_pattern_and_asks_first(tmp_path, cache, capsys, monkeypatch):
    alpha = resolve_model(_source(tmp_path, "alpha"), progress=False)
    beta = resolve_model(_source(tmp_path, "beta", seed=1), progress=False)
    assert _manage(["--delete"]) == 2
    assert "--delete needs --pattern" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # (no terminal: no answer to wait for)
    assert _manage(["--delete", "--pattern", "alpha"]) == 2
    assert "add --yes" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert _manage(["--delete", "--pattern", "alpha"]) == 0
    assert "nothing removed" in capsys.readouterr().out and alpha.is_dir()
    monkeypatch.setattr("builtins.input", lambda question: "y")
    assert _manage(["--delete", "--pattern", "alpha"]) == 0  # (current, and removed: asked)
    assert not alpha.exists() and beta.is_dir()
    assert [e.path for e in scan(cache)] == [beta]


def test_a_complete_copy_of_a_deleted_source_stays_and_links_share_a_conversion(tmp_path, cache):
    """A float source's conversion is a whole copy: it still loads by its path when the source
    is deleted, so --prune keeps it (one read in place cannot load: it goes). A checkpoint
    loaded through a link and directly is one conversion, named after the real directory."""
    src = make_tiny_model("qwen3_moe", tmp_path / "float", quantize=False,
                          config_overrides={"num_hidden_layers": 2})
    (tmp_path / "link").symlink_to(src)
    copy = resolve_model(tmp_path / "link", progress=False)
    assert resolve_model(src, progress=False) == copy and copy.name.startswith("float-")
    shutil.rmtree(src)
    [entry] = scan(cache)
    assert not entry.stale and "a complete copy, which loads by its path" in entry.state
    assert _manage(["--prune", "--yes"]) == 0 and copy.is_dir()


def test_what_an_interrupted_swap_left_goes_whatever_its_pid(tmp_path, cache, capsys):
    """A conversion killed while swapping its model in leaves the old model (``.old-PID``) and
    the new, complete one in its partial directory; a reused pid (1 runs) does not keep them."""
    target = resolve_model(_source(tmp_path, "src"), progress=False)
    old = cache / f".{target.name}.old-1"
    shutil.copytree(target, old, symlinks=True)
    done = cache / f".{target.name}.partial-1xdone"
    shutil.copytree(target, done, symlinks=True)
    os.utime(done, (0, 0))  # (not one a process made a moment ago and has yet to lock)
    states = {e.path: e for e in scan(cache)}
    assert states[old].stale and not states[old].busy and states[old].source == str(
        (tmp_path / "src").resolve())
    assert states[done].stale and states[done].state == "interrupted while being put in place"
    assert _manage(["--prune", "--yes"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f".{target.name}.lock"])


def test_a_removal_that_fails_says_why_and_leaves_the_rest_listed(tmp_path, cache, capsys,
                                                                  monkeypatch):
    import hobbit_mlx.conversion_cache as conversion_cache

    src = _source(tmp_path, "src")
    target = resolve_model(src, progress=False)
    real = shutil.rmtree

    def refused(path, *a, **k):  # (removes the manifest's folder, then a file is refused)
        real(Path(path) / "experts")
        raise PermissionError(13, "Permission denied", str(Path(path) / "config.json"))

    monkeypatch.setattr(conversion_cache.shutil, "rmtree", refused)
    assert _manage(["--delete", "--pattern", "src", "--yes"]) == 1
    out = capsys.readouterr().out
    assert f"left {target.name}: cannot remove {target / 'config.json'}: Permission denied" in out
    assert "removed 0" in out and "0 B freed" not in out
    [entry] = scan(cache)
    assert entry.stale and entry.state.startswith("incomplete (no manifest)")


def test_a_cache_path_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "file"))
    assert _manage([]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_lock_file_removed_under_a_waiting_process_is_taken_again(tmp_path):
    """Whoever removes a lock file holds it; a process that waited on it then holds a file no
    longer there, while a later process holds the new one: it must wait for that one too."""
    import threading

    from hobbit_mlx.conversion_cache import take_lock

    path = tmp_path / ".model-0123456789ab.lock"
    first = take_lock(path)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(take_lock(path, wait_note="")))
    waiter.start()
    waiter.join(0.3)
    path.unlink()  # (as a removal does, holding it)
    later = take_lock(path)  # another process, after the removal: a new file
    assert later is not None
    os.close(first)
    waiter.join(1.0)
    assert waiter.is_alive() and not got  # (it woke holding the removed file: not the lock)
    os.close(later)
    waiter.join(10)
    assert got and os.fstat(got[0]).st_ino == os.stat(path).st_ino
    os.close(got[0])


def test_a_conversion_made_before_the_fit_is_outdated_and_made_again(tmp_path, cache, capsys):
    """A cached conversion whose 2-bit copies were rounded to the nearest level (every one made
    before the fit, whose manifest says nothing of rounding) is what no load reads any more: it
    is listed as outdated, and a load converts it again, saying why, into fitted copies."""
    import json

    from hobbit_mlx.store import load_manifest, manifest_path

    src = _source(tmp_path, "old")
    target = resolve_model(src, progress=False)
    low_file = next(f for f in load_manifest(target).files if "/low/" in f)
    fitted_low = (target / low_file).read_bytes()
    assert load_manifest(target).low_rounding == "fitted"
    assert [e.state for e in scan(cache)] == ["current"]
    converter.convert(src, target, force=True, progress=False, low_rounding="nearest")
    obj = json.loads(manifest_path(target).read_text())
    del obj["low_rounding"]  # (as a manifest written before the fit)
    manifest_path(target).write_text(json.dumps(obj))
    assert load_manifest(target).low_rounding == "nearest"
    (entry,) = scan(cache)
    assert entry.stale and entry.state == "outdated: 2-bit copies rounded by an older converter"

    capsys.readouterr()
    assert resolve_model(src, progress=True) == target
    assert "again: its 2-bit copies were rounded to the nearest level" in capsys.readouterr().out
    assert load_manifest(target).low_rounding == "fitted"
    assert (target / low_file).read_bytes() == fitted_low
    assert [e.state for e in scan(cache)] == ["current"]
    assert resolve_model(src, progress=False) == target
