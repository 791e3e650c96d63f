"""The Makefile's install stamps: ``make demo`` installs only the package, ``make test``
adds the ``dev`` extra; either may come first, and a changed pyproject.toml reinstalls
(checked with ``make -n`` on a copy: nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _plan(folder: Path, target: str) -> str:
    """The commands ``make target`` would run (dry run)."""
    r = subprocess.run(["make", "-n", target], cwd=folder, capture_output=True, text=True, check=True)
    return r.stdout


def _installs(plan: str) -> set[str]:
    lines = plan.splitlines()
    return {name for name, needle in (("venv", "-m venv"), ("torch", "torch=="), ("package", "install --quiet -e .\n"),
                                       ("dev", "-e '.[dev]'")) if any(needle.strip() in ln for ln in lines)}


def _stamp(folder: Path, name: str, t: float) -> None:
    path = folder / ".venv" / name
    path.parent.mkdir(exist_ok=True)
    path.touch()
    os.utime(path, (t, t))


def test_demo_and_test_install_what_they_use_in_any_order(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    os.utime(tmp_path / "pyproject.toml", (1000, 1000))
    # a fresh machine
    assert _installs(_plan(tmp_path, "demo")) == {"venv", "torch", "package"}
    assert _installs(_plan(tmp_path, "test")) == {"venv", "torch", "package", "dev"}
    assert "sact demo" in _plan(tmp_path, "demo") and "pytest" in _plan(tmp_path, "test")
    # after `make demo`: `make test` adds only the dev extra
    _stamp(tmp_path, ".installed-base", 2000)
    assert _installs(_plan(tmp_path, "demo")) == set()
    assert _installs(_plan(tmp_path, "test")) == {"dev"}
    # after `make test` too: nothing more for either
    _stamp(tmp_path, ".installed-dev", 3000)
    assert _installs(_plan(tmp_path, "demo")) == set() and _installs(_plan(tmp_path, "test")) == set()
    # a changed pyproject.toml reinstalls the package, and the dev extra for the tests
    os.utime(tmp_path / "pyproject.toml", (4000, 4000))
    assert _installs(_plan(tmp_path, "demo")) == {"venv", "torch", "package"}
    assert _installs(_plan(tmp_path, "test")) == {"venv", "torch", "package", "dev"}
