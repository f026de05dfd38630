"""The floors on mlx and mlx-lm: one number in pyproject.toml and in the import check."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hobbit_mlx import versions

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_too_old_names_only_what_is_older_than_the_floor():
    mlx_floor, lm_floor = versions.MINIMUM["mlx"], versions.MINIMUM["mlx-lm"]
    assert versions.too_old({"mlx": mlx_floor, "mlx-lm": lm_floor}) == []
    assert versions.too_old({"mlx": "9.0", "mlx-lm": "9.0.1"}) == []
    assert versions.too_old({"mlx": None, "mlx-lm": None}) == []
    assert versions.too_old({"mlx": "9.0", "mlx-lm": "0.28.0"}) == \
        [f"mlx-lm 0.28.0 (needs >= {lm_floor})"]
    assert len(versions.too_old({"mlx": "0.29.0", "mlx-lm": "0.31.3"})) == 2
    # PEP 440's order: a release candidate of the floor is before it, a local build is not
    assert versions.too_old({"mlx": f"{mlx_floor}rc1", "mlx-lm": f"{lm_floor}+local"}) == \
        [f"mlx {mlx_floor}rc1 (needs >= {mlx_floor})"]
    assert versions.too_old({"mlx": "0.32.10", "mlx-lm": "not a version"}) == []


def test_pyproject_declares_the_same_floors():
    """pip installs by pyproject.toml, the import checks by versions.MINIMUM: they must agree."""
    text = PYPROJECT.read_text()
    deps = text[text.index("dependencies = ["):]
    deps = deps[:deps.index("]\n")]
    floors = re.findall(r'"(mlx-lm|mlx)(?:\[cpu\])?>=([0-9.]+)', deps)
    assert floors, "no mlx floors found in pyproject.toml"
    for name, floor in floors:
        assert floor == versions.MINIMUM[name], (name, floor)
    assert {n for n, _ in floors} == set(versions.MINIMUM)


def test_an_old_mlx_lm_stops_the_import_with_what_to_upgrade(tmp_path):
    """A fake mlx-lm 0.28.0 distribution ahead on the path: importing hobbit_mlx fails with one
    line naming it and the command, before mlx-lm's own modules fail somewhere inside a load."""
    dist = tmp_path / "mlx_lm-0.28.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.28.0\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "try:\n    import hobbit_mlx\nexcept ImportError as e:\n    print('ERR', e)\n"
            "else:\n    print('OK')\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("ERR hobbit_mlx needs newer packages: mlx-lm 0.28.0"), out
    assert "pip install -U mlx-lm" in out


@pytest.mark.parametrize("command", [["-m", "hobbit_mlx.generate", "--help"],
                                     ["-m", "convert", "--help"]])
def test_a_command_under_an_old_mlx_lm_says_one_line_and_exits_2(tmp_path, command):
    """As every other bad input to a command: no traceback, even for --help."""
    dist = tmp_path / "mlx_lm-0.31.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.31.3\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(PYPROJECT.parent), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [
        f"error: hobbit_mlx needs newer packages: mlx-lm 0.31.3 (needs >= "
        f"{versions.MINIMUM['mlx-lm']}); run: pip install -U mlx-lm"], p.stderr
    assert not p.stdout


@pytest.mark.parametrize("name", sorted(versions.MINIMUM))
def test_the_installed_packages_meet_the_floor(name):
    from importlib import metadata
    assert not versions._older(metadata.version(name), versions.MINIMUM[name])
