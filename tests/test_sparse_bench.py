"""The speed benchmark's plumbing (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

import sact
from sact.cli import build_parser

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_speed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("sparse_speed_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_object_halting_gives_object_shaped_masks():
    bench = load_bench()
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).eval()
    bench.impose_object_halting(model, halt_background=True)
    x = bench.object_inputs(2, 32, 0.25)
    with torch.no_grad():
        out = model(x)
    units = out.stages[0].num_units  # [2, 32, 32]
    inside = (x.abs().sum(1) > 0)
    # background far from the disc stops after unit 0, the disc runs more units
    assert units[~inside].float().mean() < units[inside].float().mean()
    assert int(units.min()) == 1


def test_bench_row_and_markdown(tmp_path):
    bench = load_bench()
    row = bench.bench_row("resnet20_cifar", 32, 1, 0.2, warmup=0, reps=1)  # raises if FLOPs differ
    assert 0.0 < row["flop_ratio"] < 1.0
    assert row["t_sparse_ms"] > 0 and row["t_dense_ms"] > 0 and row["t_vanilla_ms"] > 0
    assert not math.isnan(row["efficiency"])
    env = bench.environment(1)
    md = bench.markdown([row], env, "cmd")
    assert "resnet20_cifar" in md and "cmd" in md


def test_sact_bench_cli_parses():
    args = build_parser().parse_args(["bench", "--quick", "--threads", "1", "--models", "resnet50"])
    assert args.quick and args.threads == 1 and args.models == ["resnet50"]


def test_checkpoint_rows(tmp_path):
    bench = load_bench()
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4, in_chans=1).eval()
    sact.save_checkpoint(model, tmp_path / "tiny", meta={"preprocess": {"image_size": 16}})
    path = bench._find_checkpoint(str(tmp_path / "tiny.safetensors"))

    class Args:
        batch = [2]
        warmup = 0
        reps = 1

    rows = bench._checkpoint_rows(path, Args)
    assert len(rows) == 1 and rows[0]["batch"] == 2 and 0.0 < rows[0]["flop_ratio"] <= 1.0
