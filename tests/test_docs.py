"""Every Python block of README.md and docs/*.md runs as written.

Each ```python block is executed on its own, in a fresh interpreter, with no setup of
ours: the working directory is a scratch copy of the repository root (its top-level
entries linked, so ``configs/``, ``docs/`` ... are there, and what a block writes never
lands in the checkout) and ``src/`` comes first on the import path. A block whose first
line is ``# needs network`` is skipped unless ``SACT_DOCS_NETWORK=1``; a block that needs
an optional extra that is not installed (ONNX, TensorFlow, pycocotools) is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import linked_root

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NETWORK = "# needs network"
OPTIONAL_MODULES = ("onnx", "onnxruntime", "onnxscript", "tensorflow", "pycocotools")
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number of the opening fence, code)`` of every ```python block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = [(f, line, code) for f in DOCS for line, code in python_blocks(f)]


def run_block(code: str, workdir: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter in ``workdir`` (a linked copy of the repository root)."""
    linked_root(workdir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_blocks_are_found():
    names = {f.name for f, _, _ in BLOCKS}
    assert {"README.md", "api.md", "export.md", "sparse.md", "ponder_maps.md"} <= names
    assert len(BLOCKS) >= 12


def test_harness_runs_from_a_linked_root(tmp_path):
    r = run_block("import pathlib, sact; assert pathlib.Path('configs').is_dir(); "
                  "assert pathlib.Path(sact.__file__).is_relative_to(pathlib.Path('src').resolve()); "
                  "open('written.txt', 'w').write('x'); raise SystemExit(3)", tmp_path)
    assert r.returncode == 3, r.stderr
    assert (tmp_path / "written.txt").is_file() and not (ROOT / "written.txt").exists()


@pytest.mark.parametrize("path,line,code", BLOCKS, ids=[f"{f.name}:{line}" for f, line, _ in BLOCKS])
def test_doc_block_runs(path, line, code, tmp_path):
    if code.lstrip().startswith(NETWORK) and os.environ.get("SACT_DOCS_NETWORK") != "1":
        pytest.skip("needs network (set SACT_DOCS_NETWORK=1 to run it)")
    r = run_block(code, tmp_path)
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", r.stderr)
    if r.returncode and missing and missing.group(1).split(".")[0] in OPTIONAL_MODULES:
        pytest.skip(f"needs the optional module {missing.group(1)}")
    assert r.returncode == 0, f"{path.relative_to(ROOT)}:{line} fails as written:\n{r.stderr[-3000:]}"
