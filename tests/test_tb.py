"""TensorBoard logging must not load TensorFlow (TF then triton crashes the process)."""

from __future__ import annotations

import subprocess
import sys


def test_summary_writer_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from sact.tb import summary_writer\n"
        f"w = summary_writer({str(tmp_path)!r}); w.add_scalar('x', 1.0, 0); w.close()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorboard imported tensorflow'\n"
        "import torch._dynamo  # triton after tensorboard: crashed when TF had been loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
