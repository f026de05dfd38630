"""An interrupted conversion resumes: the layers it finished are kept (Ctrl-C, a full disk, a
killed process) and the same command converts only the rest, into the very store a conversion
without interruption writes. A partial of another source, other options or damaged files is not
resumed but removed."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convert as converter
from convert.__main__ import main as convert_main
from hobbit_mlx.store import load_manifest
from hobbit_mlx.testing.tiny_models import make_tiny_model

LAYERS = 3


@pytest.fixture
def counted(monkeypatch):
    """Counts the layers converted; ``fail_at`` (a layer index) raises ``error`` there."""
    real = converter._convert_layer
    calls = {"layers": [], "fail_at": None, "error": KeyboardInterrupt}

    def convert_layer(weights, li, *a, **k):
        if li == calls["fail_at"]:
            calls["fail_at"] = None
            raise calls["error"]
        calls["layers"].append(li)
        return real(weights, li, *a, **k)

    monkeypatch.setattr(converter, "_convert_layer", convert_layer)
    return calls


def _source(tmp_path: Path, quantize: bool = False, seed: int = 0) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path / f"src{seed}{'q' if quantize else ''}",
                           quantize=quantize, seed=seed,
                           config_overrides={"num_hidden_layers": LAYERS})


def _store(model_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """The manifest (without the source path) and the bytes of every store file."""
    manifest = json.loads((model_dir / "experts" / "manifest.json").read_text())
    files = {name: (model_dir / name).read_bytes() for name in manifest["files"]
             if not name.startswith("/")}
    return manifest, files


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _own_partial(folder: Path, name: str = "model") -> Path:
    """The partial directory this process left for ``name`` (its pid, then a unique suffix)."""
    found = list(folder.glob(f".{name}.partial-{os.getpid()}x*"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("quantize", [False, True], ids=["float-copy", "quantized-in-place"])
def test_an_interrupted_conversion_resumes_into_the_same_store(tmp_path, counted, capsys,
                                                               quantize):
    src = _source(tmp_path, quantize)
    fresh = converter.convert(src, tmp_path / "fresh", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    counted["layers"].clear()
    counted["fail_at"] = 2
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 130
    err = capsys.readouterr().err
    kept = _own_partial(out)
    assert f"kept 2 of {LAYERS} converted layers in {kept}: the same command resumes" in err
    assert err.endswith("\ninterrupted\n") and "nothing was written" not in err
    assert _partials(out) == [kept.name] and counted["layers"] == [0, 1]

    counted["layers"].clear()
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 0
    assert f"2 of {LAYERS} layers were done" in capsys.readouterr().err
    assert counted["layers"] == [2]  # only what was left
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    assert not (out / "model" / "resume").exists()
    assert _store(out / "model") == _store(fresh)


def test_a_full_disk_keeps_the_layers_done_and_a_killed_conversion_resumes(tmp_path, counted,
                                                                          capsys):
    """A write that fails (ENOSPC) keeps what was done, as an interrupt does; so does a process
    killed outright, whose directory names a pid that has ended."""
    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"], counted["error"] = 1, OSError(28, "No space left on device")
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1]
    assert f"kept 1 of {LAYERS} converted layers" in err[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    os.rename(_own_partial(out), out / f".model.partial-{dead}")  # (kill -9)
    counted["layers"].clear()
    assert converter.convert(src, out / "model", progress=False) == out / "model"
    assert counted["layers"] == [1, 2] and _partials(out) == []
    assert load_manifest(out / "model").layers[2].layer == 2


@pytest.mark.parametrize("change", ["source", "options", "damaged"])
def test_a_partial_of_another_conversion_or_with_damaged_files_is_not_resumed(
        tmp_path, counted, capsys, change):
    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    partial = _own_partial(out)
    args = {}
    if change == "source":
        src = _source(tmp_path, seed=1)  # another checkpoint at another path
    elif change == "options":
        args = {"low_bits": 3}
    else:  # a layer file cut short (a disk error, or copied while being written)
        store_file = next((partial / "experts" / "low").glob("layer_001.safetensors"))
        os.truncate(store_file, store_file.stat().st_size // 2)
    counted["layers"].clear()
    capsys.readouterr()
    converter.convert(src, out / "model", progress=False, **args)
    assert counted["layers"] == list(range(LAYERS)) and _partials(out) == []
    assert "resuming" not in capsys.readouterr().err
    fresh = converter.convert(src, tmp_path / "fresh", progress=False, **args)
    assert _store(out / "model") == _store(fresh)


def test_an_error_that_is_no_interruption_leaves_nothing(tmp_path, counted, capsys):
    """A source that cannot be converted (here: a failure in a layer) is no partial to resume:
    removed as before."""
    src = _source(tmp_path)
    counted["fail_at"], counted["error"] = 1, converter.ConversionError("bad tensor")
    assert convert_main([str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert "kept" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def _holder(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s conversion lock (a conversion running into it)."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "import fcntl, os, sys, time\n"
                             f"fd = os.open({str(folder)!r}, os.O_RDONLY)\n"
                             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                             "print('locked', flush=True)\n"
                             "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_not_the_pid_tells_a_running_conversion(tmp_path, counted, capsys):
    """A partial whose pid lives but converts no more (a reused pid; a notebook's Ctrl-C) was
    skipped without a word, converted afresh and left behind for good; one another conversion
    holds is left alone, saying so."""
    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        partial = out / f".model.partial-{alive.pid}"
        os.rename(_own_partial(out), partial)
        counted["layers"].clear()
        converter.convert(src, out / "model", progress=False)
        assert counted["layers"] == [2] and _partials(out) == []  # resumed
        counted["fail_at"] = 1
        with pytest.raises(KeyboardInterrupt):
            converter.convert(src, out / "again", progress=False)
        os.rename(_own_partial(out, "again"), out / f".again.partial-{alive.pid}")
        holder = _holder(out / f".again.partial-{alive.pid}")
        try:
            capsys.readouterr()
            counted["layers"].clear()
            converter.convert(src, out / "again", progress=False)
            assert counted["layers"] == list(range(LAYERS))  # (afresh, beside it)
            assert "another conversion into" in capsys.readouterr().err
            assert _partials(out) == [f".again.partial-{alive.pid}"]
        finally:
            holder.kill()
            holder.wait()
    finally:
        alive.kill()
        alive.wait()


def test_an_interrupt_right_after_the_take_over_keeps_the_partial(tmp_path, counted, capsys,
                                                                  monkeypatch):
    """Ctrl-C between taking a partial over and converting: it said "nothing was written" (and
    kept it); the count of kept layers is the recorded one."""
    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    real = converter._take_over_partials

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "_take_over_partials", interrupted)
    capsys.readouterr()
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"kept 2 of {LAYERS} converted layers" in err and err.endswith("\ninterrupted\n")
    assert _partials(out) == [_own_partial(out).name]


def test_the_stamp_holds_the_code_and_mlx_versions(tmp_path, monkeypatch):
    """Layers an older converter wrote were resumed beside a newer one's when the change was in
    a module the stamp did not read (convert/adapters.py, say), or in MLX or mlx-lm."""
    import mlx.core as mx

    from convert.resume import conversion_stamp

    src = _source(tmp_path)
    files = list(src.glob("*.safetensors"))
    stamp = conversion_stamp(files, "{}", {})
    assert conversion_stamp(files, "{}", {}) == stamp
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (
        b"# changed" if self.name == "adapters.py" else b""))
    assert conversion_stamp(files, "{}", {}) != stamp
    monkeypatch.setattr(Path, "read_bytes", real)
    monkeypatch.setattr(mx, "__version__", "0.0.1")
    assert conversion_stamp(files, "{}", {}) != stamp


def _open_files() -> int:
    return len(os.listdir("/dev/fd"))


def test_an_interrupt_anywhere_releases_locks_and_files(tmp_path, counted, monkeypatch):
    """Ctrl-C inside the take-over kept its lock open (the next conversion into the same DST in
    that process failed, "another conversion is running"); one mid-layer kept the layer file's
    descriptor."""
    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"] = 1
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    gc.collect()  # (garbage of earlier tests and of this interrupt, closed now, not mid-test)
    before = _open_files()
    real_read = converter.destination.read_progress

    def interrupted_read(*a, **k):
        real_read(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.destination, "read_progress", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    assert _open_files() == before
    monkeypatch.setattr(converter.destination, "read_progress", real_read)
    real_tensors = converter.experts._expert_tensors
    calls = {"n": 0}

    def interrupted_mid_layer(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # (the layer file is open)
            raise KeyboardInterrupt
        return real_tensors(*a, **k)

    monkeypatch.setattr(converter.experts, "_expert_tensors", interrupted_mid_layer)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)
    assert _open_files() == before
    monkeypatch.setattr(converter.experts, "_expert_tensors", real_tensors)
    counted["layers"].clear()
    converter.convert(src, out / "model", progress=False)
    assert counted["layers"] == [1, 2] and _partials(out) == []


def test_a_partial_another_process_holds_is_never_removed(tmp_path, counted, monkeypatch):
    """Two containers sharing a volume can run the converter under one pid: the second renamed
    its new directory onto the first's running partial, failed, and its error path removed the
    first's partial. Each conversion now has a name of its own and removes only its own."""
    src = _source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f".model.partial-{os.getpid()}"  # (another process of the same pid)
    (theirs / "experts").mkdir(parents=True)
    (theirs / "experts" / "layer.safetensors").write_bytes(b"\0" * 100)
    holder = _holder(theirs)
    try:
        counted["fail_at"], counted["error"] = 1, OSError(28, "No space left on device")
        with pytest.raises(OSError):
            converter.convert(src, out / "model", progress=False)
        assert (theirs / "experts" / "layer.safetensors").exists()
        counted["fail_at"] = None
        converter.convert(src, out / "model", progress=False)
        assert (theirs / "experts" / "layer.safetensors").exists()
        assert (out / "model" / "experts" / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_without_file_locks_the_pid_decides(tmp_path, counted, monkeypatch, capsys):
    """On a file system without flock (some network ones) every partial read as held by a
    running conversion: never resumed, never removed. The pid in its name decides there."""
    import fcntl

    src = _source(tmp_path)
    out = tmp_path / "out"
    counted["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, out / "model", progress=False)

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    os.rename(_own_partial(out), out / f".model.partial-{dead}")
    counted["layers"].clear()
    converter.convert(src, out / "model", progress=False)
    assert counted["layers"] == [2] and _partials(out) == []
