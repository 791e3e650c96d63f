"""Peak resident memory of ``sact.to_sparse`` after a batch-1 and a batch-8 call, one process per model.

    python benchmarks/sparse_memory.py --models resnet50 resnet101
    PYTHONPATH=/tmp/base/src python benchmarks/sparse_memory.py   # another source tree, for comparison

Each model is measured in a fresh process (``resource.getrusage``'s ``ru_maxrss``, the peak):
after building the random-weight SACT model, then after ``to_sparse`` and one forward pass at
224 px with batch 1 and one with batch 8 (1 thread). Prints one line per model; nothing is written.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_ONE = r'''
import resource, sys, torch
torch.set_num_threads(1)
import sact
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
m = sact.create_model(sys.argv[1], mode="sact").eval()
a = rss()
s = sact.to_sparse(m)
with torch.no_grad():
    s(torch.randn(1, 3, 224, 224)); s(torch.randn(8, 3, 224, 224))
print(f"{sys.argv[1]}: weights {sum(p.numel() for p in m.parameters()) * 4 / 2**20:.0f} MiB, peak RSS after the model "
      f"{a:.0f} MiB, after to_sparse and batch 1 + batch 8 {rss():.0f} MiB", flush=True)
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet101"])
    args = p.parse_args(argv)
    for name in args.models:
        subprocess.run([sys.executable, "-c", _ONE, name], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
