"""The console commands pip installs: each is ``python -m`` of its module, under mlx-lm's naming
(``hobbit_mlx.generate`` as ``mlx_lm.generate``)."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hobbit_mlx import scripts

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _declared() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("[project.scripts]"):]
    block = block[:block.index("\n\n")]
    return dict(re.findall(r'^"([^"]+)" = "([^"]+)"$', block, flags=re.M))


def test_pyproject_declares_every_command_and_each_has_a_main():
    assert _declared() == {f"hobbit_mlx.{name}": f"hobbit_mlx.scripts:{name}"
                           for name in scripts.COMMANDS}
    for name, (module, _) in scripts.COMMANDS.items():
        assert callable(getattr(scripts, name))
        assert callable(importlib.import_module(module).main), module


def _installed(name: str) -> Path:
    path = BIN / f"hobbit_mlx.{name}"
    if not path.exists():
        pytest.fail(f"{path} is not installed: pip install -e . (again) installs the commands")
    return path


def test_the_generate_command_generates_and_bad_input_is_one_line():
    cmd = _installed("generate")
    ok = subprocess.run([str(cmd), "--prompt", "def f(x):", "--max-tokens", "4",
                         "--memory-budget", "16MB", "--ignore-chat-template"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Generation: 4 tokens" in ok.stdout + ok.stderr
    bad = subprocess.run([str(cmd), "--memory-budget", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --memory-budget must be positive, not '0'"]


@pytest.mark.parametrize("name", ["convert", "plan", "server", "chat"])
def test_each_command_answers_help(name):
    """The commands whose main is not wrapped (convert, plan) and the others alike."""
    out = subprocess.run([str(_installed(name)), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: "), out.stderr


@pytest.mark.parametrize("name,argv,needle", [
    ("generate", ["--temp", "abc"], "argument --temp: invalid float value: 'abc'"),
    ("convert", [], "the following arguments are required: src, dst"),
    ("plan", ["--bogus"], "the following arguments are required: model"),
    ("server", ["--port", "abc"], "argument --port: invalid int value: 'abc'")])
def test_argparse_errors_are_one_line_too(name, argv, needle, monkeypatch, capsys):
    """argparse's own errors printed its whole usage block (40-60 lines) before the error. Run
    in this process as the installed command runs it (its entry, its path as ``argv[0]``): a
    process costs ~2 s of imports, and the commands' processes are run above."""
    monkeypatch.setattr(sys, "argv", [str(_installed(name)), *argv])
    with pytest.raises(SystemExit) as done:
        getattr(scripts, name)()
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {needle}"), err
    assert err.rstrip().endswith(f"(see hobbit_mlx.{name} --help)"), err  # (its name)
