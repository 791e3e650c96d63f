"""The halting branch's one-output-channel 3x3 convolution, forward + backward, in NCHW and
channels-last (and as nine shifted 1x1 products), median over rounds.

    python benchmarks/halting_conv_layout.py --threads 2

Why ``memory_format: auto`` trains channels-last on the CPU (docs/training.md,
"Cost of a training step").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def shifted(h, w, b):
    """The same convolution as nine shifted 1x1 products (the sparse engine's formulation)."""
    _, c, hh, ww = h.shape
    z = F.pad(F.conv2d(h, w[0].permute(1, 2, 0).reshape(9, c, 1, 1)), (1, 1, 1, 1))
    out = b.view(1, 1, 1, 1)
    for k in range(9):
        dy, dx = divmod(k, 3)
        out = out + z[:, k : k + 1, dy : dy + hh, dx : dx + ww]
    return out


def plain(h, w, b):
    return F.conv2d(h, w, b, padding=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}; ms forward + backward, median of {args.reps - 5}")
    for b_, c, s in [(64, 16, 32), (64, 32, 16), (64, 64, 8)]:  # the CIFAR ResNet stages at batch 64
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            h = torch.randn(b_, c, s, s).contiguous(memory_format=fmt).requires_grad_()
            w, b = torch.randn(1, c, 3, 3, requires_grad=True), torch.zeros(1, requires_grad=True)
            torch.testing.assert_close(shifted(h, w, b), plain(h, w, b), rtol=1e-4, atol=1e-4)
            g = torch.randn(b_, 1, s, s)
            res = {}
            for name, f in (("conv2d", plain), ("shifted 1x1", shifted)):
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f(h, w, b).backward(g)
                    ts.append(time.perf_counter() - t0)
                res[name] = 1e3 * statistics.median(ts[5:])
            cells = ", ".join(f"{k} {v:.2f}" for k, v in res.items())
            print(f"  batch {b_}, {c} ch, {s}x{s}, {'channels-last' if cl else 'NCHW'}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
