"""The speed benchmark and the engine profile (their plumbing and maths; no timing is asserted)."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sact
from sact.sparse.executors import NativeStageExecutor
from sact.cli import build_parser
from sact.data import ClutteredFashionMNIST, ClutterConfig, cluttered_preprocess
from sact.sparse import to_sparse
from sact.commands.bench import run_cli
from sact.tools.bench.bench import (
    TRAINED,
    BenchError,
    BenchOptions,
    Workload,
    efficiency,
    markdown,
    raise_failed_checks,
    ratio_summary,
    run_benchmark,
    select_workloads,
    spread,
    time_rounds,
)
from sact.errors import RunFailure
from sact.tools.bench.runtimes import gflops_per_second, max_rel_diff, openvino_units, resolve_runtimes
from sact.tools.bench.profile import StageProfiler, profile_sparse, summarize
from sact.tools.bench.workloads import WorkloadError, calibrate_radius, load_trained, object_inputs, object_model

SRC = Path(sact.__file__).resolve().parent
TINY = (("base_channels", 4),)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


# ---- maths ------------------------------------------------------------------------------


def test_spread_and_efficiency_on_known_numbers():
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == {"median": 3.0, "q25": 2.0, "q75": 4.0, "min": 1.0, "max": 5.0}
    assert spread([2.0]) == {"median": 2.0, "q25": 2.0, "q75": 2.0, "min": 2.0, "max": 2.0}
    assert efficiency(0.5, 0.5) == pytest.approx(1.0)
    assert efficiency(0.75, 0.5) == pytest.approx(0.5)
    assert efficiency(1.25, 0.5) == pytest.approx(-0.5)
    assert efficiency(0.9, 1.01) is None and efficiency(0.9, 0.996) is None  # nothing to save

    r = ratio_summary([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], 0.5)  # per-round ratios 0.5, 1.0, 1.5
    assert r["rounds"] == [0.5, 1.0, 1.5]
    assert r["ratio"]["median"] == 1.0 and r["ratio"]["min"] == 0.5 and r["ratio"]["max"] == 1.5
    assert r["e"]["median"] == pytest.approx(0.0)
    assert r["e"]["range"] == pytest.approx([-1.0, 1.0])  # low E from the high ratio
    assert r["e"]["iqr"] == pytest.approx([-0.5, 0.5])
    assert ratio_summary([1.0], [1.0], 1.0)["e"] is None
    with pytest.raises(ValueError):
        ratio_summary([1.0, 2.0], [1.0], 0.5)


def test_time_rounds_interleaves_with_a_rotating_order():
    clock, calls = FakeClock(), []

    def fn(name, dt):
        def f():
            calls.append(name)
            clock.advance(dt)
        return f

    wall, cpu = time_rounds({"a": fn("a", 1.0), "b": fn("b", 2.0), "c": fn("c", 3.0)}, warmup=1, reps=3, clock=clock)
    assert calls == list("abc" "abc" "bca" "cab")  # warm-up, then rotated rounds
    assert wall == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    assert set(cpu) == {"a", "b", "c"} and all(len(v) == 3 for v in cpu.values())


def test_calibrate_radius_bisects_and_reports_out_of_reach_targets():
    r, f = calibrate_radius(lambda r: 0.2 + r, 0.5, tol=1e-3)
    assert abs(f - 0.5) <= 1e-3 and r == pytest.approx(0.3, abs=1e-3)
    assert calibrate_radius(lambda r: 0.2 + r, 0.1) == (0.0, 0.2)  # below reach: the smallest
    assert calibrate_radius(lambda r: 0.2 + r, 2.0) == (0.75, 0.95)  # above reach: the largest


# ---- workloads --------------------------------------------------------------------------


def stage_units(stage_output) -> int:
    return stage_output.halting_distribution.shape[1]


@pytest.mark.parametrize("name, kwargs, size", [("resnet20_cifar", {"base_channels": 4}, 32),
                                                 ("resnet50_v2", {"base_width": 8, "stem_width": 8}, 64)])
def test_object_halting_follows_the_disc(name, kwargs, size):
    # The pre-activation v2 layout has signed features: the projection on the object's mean
    # feature direction must still make the disc run and the background halt.
    obj, full = object_model(name, image_size=size, **kwargs)
    x, mask = object_inputs(2, size, 0.15, in_chans=3, seed=0)
    with torch.no_grad():
        out, out_full = obj(x), full(x)
    for s, sf in zip(out.stages, out_full.stages):
        u = s.num_units.float()
        assert bool((sf.num_units == sf.num_units.max()).all())  # nothing halts in the twin
        if u.shape[-1] < 8:
            continue  # a map too coarse to hold the disc
        m = F.interpolate(mask, size=u.shape[-2:], mode="nearest")[:, 0] > 0.5
        assert u[m].mean() >= 0.9 * stage_units(s)  # the disc runs (nearly) every unit
        assert u[m].mean() > 1.5 * u[~m].mean()
        assert int(u.min()) == 1  # background stops after unit 0
    assert bool((out.flops < out_full.flops).all())


def test_select_workloads_filters():
    rows = select_workloads(models=["resnet50_v2"], batches=[8])
    assert {(w.model, w.batch) for w in rows} == {("resnet50_v2", 8)}
    assert sorted(w.flop_target or 0 for w in rows) == [0, 0.45, 0.6, 0.75]
    full = select_workloads()
    assert {w.model for w in full} == {"resnet50", "resnet101", "resnet50_v2", "resnet101_v2", "resnet32_cifar",
                                       "resnet110_cifar"}
    assert {w.batch for w in full if "cifar" in w.model} == {1, 16}
    trained = select_workloads(models=[TRAINED], trained_size=64)
    assert [(w.model, w.batch, w.halting) for w in trained] == [(TRAINED, 1, "learned"), (TRAINED, 8, "learned")]


# ---- a run ------------------------------------------------------------------------------


def test_quick_run_writes_checked_rows_and_never_overwrites(tmp_path, capsys):
    wls = [Workload("resnet20_cifar", 32, 2, None, TINY), Workload("resnet20_cifar", 32, 2, 0.5, TINY)]
    opts = dict(reps=2, warmup=0, threads=1, out=tmp_path / "res", stem="sparse_speed_t", progress=False,
                command="test")
    doc = run_benchmark(wls, options=BenchOptions(**opts))
    files = [tmp_path / "res" / "sparse_speed_t.json", tmp_path / "res" / "sparse_speed_t.md"]
    assert all(p.is_file() for p in files)
    saved = json.loads(files[0].read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    none, obj = saved["rows"]
    for r in (none, obj):
        assert r["checks"]["ok"] and r["checks"]["flops_equal"] and r["checks"]["num_units_equal"]
        assert r["checks"]["logits_max_abs_diff"] < 1e-3
        assert r["baseline"] in ("vanilla_nchw", "vanilla_cl")
        assert all(len(r["rounds_ms"][k]) == 2 and min(r["rounds_ms"][k]) > 0 for k in r["rounds_ms"])
        ratios = r["vs_vanilla"]["rounds"]
        assert ratios == pytest.approx([s / b for s, b in zip(r["rounds_ms"]["sparse"], r["rounds_ms"][r["baseline"]])])
    assert none["flop_ratio_vs_no_halt"] == pytest.approx(1.0) and none["vs_vanilla"]["e"] is None
    assert abs(obj["flop_ratio_vs_vanilla"] - 0.5) < 0.05 and obj["radius"] > 0
    assert obj["vs_vanilla"]["e"]["median"] == pytest.approx(
        (1 - obj["vs_vanilla"]["ratio"]["median"]) / (1 - obj["flop_ratio_vs_vanilla"]))
    md = files[1].read_text()
    assert "resnet20_cifar" in md and "object (0.50)" in md and "`test`" in md

    # never replace what this run did not create
    before = [p.read_bytes() for p in files]
    with pytest.raises(BenchError, match="already exist"):
        run_benchmark(wls[:1], options=BenchOptions(**opts))
    assert [p.read_bytes() for p in files] == before
    run_benchmark(wls[:1], options=BenchOptions(**opts, overwrite=True))
    assert len(json.loads(files[0].read_text())["rows"]) == 1

    # the same through the command line: one line on stderr, exit status 2
    args = build_parser().parse_args(["bench", "--quick", "--out", str(tmp_path / "res"), "--tag", "t"])
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sact bench: ") and "already exist" in err[-1]


def test_cli_rejects_bad_arguments(tmp_path, capsys, monkeypatch):
    # with a runtime missing too (as on a machine without the bench extra): still exactly one line
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    for argv in (["--models", TRAINED], ["--tag", "../x"], ["--batch", "0"], ["--reps", "0"], ["--threads", "0"],
                 ["--checkpoint", str(tmp_path / "missing"), "--models", TRAINED]):
        args = build_parser().parse_args(["bench", "--out", str(tmp_path), *argv])
        assert run_cli(args) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sact bench: "), (argv, err)
    assert not any(tmp_path.iterdir())  # nothing written


def _tiny_checkpoint(tmp_path, mode="sact"):
    model = sact.create_model("resnet20_cifar", mode=mode, base_channels=4, in_chans=1).eval()
    meta = {"preprocess": cluttered_preprocess().to_dict(),
            "config": {"dataset": "cluttered", "clutter": {"canvas_size": 32}, "data_seed": 4}}
    return sact.save_checkpoint(model, tmp_path / f"tiny_{mode}", meta=meta)


def test_trained_rows_use_the_checkpoints_own_test_canvases(tmp_path):
    trained = load_trained(_tiny_checkpoint(tmp_path), num_images=2)
    want = ClutteredFashionMNIST(split="test", num_samples=2, seed=5, config=ClutterConfig(canvas_size=32)).stack()
    assert torch.equal(trained.images, want["image"])
    doc = run_benchmark([Workload(TRAINED, 32, 2)], trained=trained,
                        options=BenchOptions(reps=1, warmup=0, threads=1, out=tmp_path / "r", progress=False))
    row = doc["rows"][0]
    assert row["halting"] == "learned" and row["checks"]["ok"] and 0.0 < row["flop_ratio_vs_no_halt"] <= 1.0
    with pytest.raises(WorkloadError, match="vanilla"):
        load_trained(_tiny_checkpoint(tmp_path, mode="vanilla"), num_images=1)
    with pytest.raises(WorkloadError, match="cannot load"):
        load_trained(tmp_path / "missing.safetensors", num_images=1)


# ---- against the runtimes ------------------------------------------------------------


def test_runtime_arithmetic_on_known_numbers():
    assert gflops_per_second(4e9, 2, 0.5) == pytest.approx(16.0)  # 8 GFLOP in half a second
    with pytest.raises(ValueError):
        gflops_per_second(1.0, 1, 0.0)
    ref = np.array([[1.0, -4.0], [2.0, 0.5]])
    assert max_rel_diff(ref, ref) == 0.0
    assert max_rel_diff(ref + np.array([[0.0, 0.02], [0.0, 0.0]]), ref) == pytest.approx(0.005)  # 0.02 / 4
    assert max_rel_diff(ref[:1], ref) == math.inf and max_rel_diff(ref * np.nan, ref) == math.inf
    # E against the best runtime: sparse 6 ms and 9 ms against 10 ms, at F = 0.5
    r = ratio_summary([0.006, 0.009], [0.010, 0.010], 0.5)
    assert r["ratio"]["median"] == pytest.approx(0.75) and r["e"]["median"] == pytest.approx(0.5)
    assert r["e"]["range"] == pytest.approx([0.2, 0.8])


def test_openvino_layers_are_summed_per_unit():
    layers = [{"layer": "node_Conv_1", "type": "Convolution", "exec": "brgconv_f32", "ms": 1.0},
              {"layer": "images_abcd_acdb_node_Conv_1", "type": "Reorder", "exec": "jit", "ms": 0.5},
              {"layer": "node_Conv_2", "type": "Convolution", "exec": "jit_1x1", "ms": 2.0},
              {"layer": "node_add_7", "type": "Add", "exec": "jit", "ms": 0.25},
              {"layer": "Multiply_5", "type": "Multiply", "exec": "jit", "ms": 0.125}]
    units = {"node_Conv_1": "stem/head", "node_Conv_2": "1.0", "node_add_7": "1.0"}
    assert openvino_units(layers, units) == {"stem/head": {"ms": 1.5, "exec": ["brgconv_f32"]},
                                             "1.0": {"ms": 2.25, "exec": ["jit_1x1"]},
                                             "other": {"ms": 0.125, "exec": []}}


def test_runtimes_are_resolved_and_a_missing_one_is_skipped_with_a_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    from sact.tools.bench import bench as bench_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    found, skipped = resolve_runtimes(["auto"])
    assert "openvino" not in found and len(skipped) == 1
    assert skipped[0].startswith("openvino is not installed") and "pip install -e '.[bench]'" in skipped[0]
    assert resolve_runtimes(["none"]) == ([], [])
    for bad in (["bogus"], ["auto", "openvino"], ["none", "onnxruntime"]):
        with pytest.raises(ValueError):
            resolve_runtimes(bad)
    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--runtimes", "bogus"])
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sact bench: --runtimes: unknown runtime")

    # through the command: the skip is one warning line, and the run goes on without that runtime
    seen = {}

    def fake_run(workloads, *, options, trained=None):
        seen["runtimes"] = options.runtimes
        return {"rows": []}

    monkeypatch.setattr(bench_module, "run_benchmark", fake_run)
    monkeypatch.setattr(bench_module, "markdown", lambda doc: "")
    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--runtimes", "openvino", "--models",
                                      "resnet32_cifar", "--no-progress"])
    assert run_cli(args) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "openvino" in ln]
    assert len(lines) == 1 and lines[0].startswith("sact bench: warning: openvino is not installed")
    assert seen["runtimes"] == ()


def _runtime_run(tmp_path, monkeypatch, runtimes, *, targets=(None,), profile=False, corrupt=False):
    """One group (tiny resnet20, batch 1) against ``runtimes``; returns the document and the export's path."""
    from sact.tools.bench import bench as bench_module
    from sact.tools.bench import runtimes as runtimes_module

    monkeypatch.setattr(runtimes_module, "WARMUP_SECONDS", 0.0)  # the warm-up by time has its own test

    exported = []
    real_export = bench_module.export_plain

    def export(model, folder, example):
        if corrupt:  # a wrong export: other weights than PyTorch runs
            model = copy.deepcopy(model)
            with torch.no_grad():
                model.fc.weight.mul_(1.5)
        exported.append(real_export(model, folder, example))
        return exported[-1]

    monkeypatch.setattr(bench_module, "export_plain", export)
    wls = [Workload("resnet20_cifar", 32, 1, t, TINY) for t in targets]
    doc = run_benchmark(wls, options=BenchOptions(reps=2, warmup=1, threads=1, out=tmp_path / "r", progress=False,
                                                  runtimes=runtimes, profile=profile))
    return doc, exported[0]


@pytest.mark.skipif(not all(importlib.util.find_spec(r) for r in ("onnxruntime", "openvino", "onnx")),
                    reason="needs onnxruntime, openvino and onnx (pip install -e '.[bench]')")
def test_runtime_rows_time_each_contender_in_its_own_process(tmp_path, monkeypatch):
    doc, onnx_file = _runtime_run(tmp_path, monkeypatch, ("onnxruntime", "openvino"), targets=(None, 0.5),
                                  profile=True)
    assert not onnx_file.exists()  # the export's temporary folder is gone
    (g,) = doc["runtime_rows"]
    assert set(doc["env"]["runtimes"]) == {"onnxruntime", "openvino"}
    c = g["contenders"]
    assert set(c) == {"torch", "sparse none", "sparse object 0.50", "onnxruntime", "openvino"}
    pids = [v["pid"] for v in c.values()]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids and g["bench_pid"] == os.getpid()
    for name, v in c.items():
        assert len(v["rounds_ms"]) == 2 and min(v["rounds_ms"]) > 0 and 3 <= v["calls"] <= 30
        sparse_flops = {"sparse none": doc["rows"][0]["flops"]["sparse"],
                        "sparse object 0.50": doc["rows"][1]["flops"]["sparse"]}
        flops = sparse_flops[name] if v["kind"] == "sparse" else g["flops_plain"]
        assert v["gflops"] == pytest.approx(flops * 1 / (v["ms"]["median"] / 1e3) / 1e9)
    assert g["best"] == min(("torch", "onnxruntime", "openvino"), key=lambda n: c[n]["ms"]["median"])
    assert all(k["ok"] and k["max_rel_diff"] < 1e-4 for k in g["output_checks"].values())
    none, obj = g["sparse"]
    assert obj["vs_best"]["rounds"] == pytest.approx(
        [s / b for s, b in zip(c["sparse object 0.50"]["rounds_ms"], c[g["best"]]["rounds_ms"])])
    assert obj["vs_best"]["e"]["median"] == pytest.approx(
        (1 - obj["vs_best"]["ratio"]["median"]) / (1 - obj["flop_ratio"]))
    # OpenVINO's layers per unit beside the engine's: every unit of the 3 stages x 3 units
    units = {u["unit"]: u for u in g["units"]}
    for s in range(1, 4):
        for n in range(3):
            assert units[f"{s}.{n}"]["openvino_ms"] > 0, (s, n)
    md = markdown(doc)
    assert "Against the runtimes" in md and any(f"vs {n} |" in md for n in ("PyTorch", "ORT", "OpenVINO"))
    assert "| resnet20_cifar | 32 | 1 | object 0.50 |" in md and "Per unit: the engine against OpenVINO" in md


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_a_wrong_export_fails_the_output_check_loudly(tmp_path, monkeypatch):
    doc, _ = _runtime_run(tmp_path, monkeypatch, ("onnxruntime",), corrupt=True)
    check = doc["runtime_rows"][0]["output_checks"]["onnxruntime"]
    assert not check["ok"] and check["max_rel_diff"] > 1e-2
    assert "**DIFFER**" in markdown(doc)
    with pytest.raises(RunFailure, match="outputs differ from PyTorch's"):
        raise_failed_checks(doc)


# ---- profile ----------------------------------------------------------------------------


class _TickingExecutor:
    """The dense execution, advancing a fake clock by a known amount in every call."""

    COST = {"start": 5.0, "unit": 3.0, "halting": 2.0, "accumulate": 1.0, "output": 0.5}

    def __init__(self, clock):
        self.clock = clock

    def start(self, stage, x):
        from sact.stage import DENSE

        self.clock.advance(self.COST["start"])
        return _TickingRun(DENSE.start(stage, x), self.clock, self.COST)


class _TickingRun:
    def __init__(self, run, clock, cost):
        self.run, self.clock, self.cost, self.compact = run, clock, cost, run.compact

    @property
    def features(self):
        return self.run.features

    def unit(self, n, where):
        self.clock.advance(self.cost["unit"])
        return self.run.unit(n, where)

    def halting(self, n, where):
        self.clock.advance(self.cost["halting"])
        return self.run.halting(n, where)

    def accumulate(self, n, weight, where):
        self.clock.advance(self.cost["accumulate"])
        return self.run.accumulate(n, weight, where)

    def output(self):
        self.clock.advance(self.cost["output"])
        return self.run.output()


def test_profile_accounts_for_every_call_exactly():
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).eval()
    clock = FakeClock()
    x = torch.randn(2, 3, 32, 32)
    with StageProfiler(model, [_TickingExecutor(clock) for _ in model.stages], clock=clock) as prof:
        with prof.forward(), torch.no_grad():
            out = model(x, executors=prof.executors)
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(out.logits, ref.logits)
    (rec,) = prof.records
    c = _TickingExecutor.COST
    for stage, s in zip(model.stages, rec.stages):
        u = stage.num_units
        assert s.start == c["start"] and sorted(s.units) == list(range(1, u))
        assert sorted(s.halting) == list(range(u - 1))
        assert sorted(s.accumulate) == list(range(u)) and s.output == c["output"]
        want = c["start"] + (u - 1) * (c["unit"] + c["halting"]) + u * c["accumulate"] + c["output"]
        assert s.timed == want and s.total == want and s.loop == 0.0  # the fake clock only moves in calls
    assert rec.total == sum(s.total for s in rec.stages) and rec.outside_stages == 0.0
    assert not any(st._forward_hooks or st._forward_pre_hooks for st in model.stages)  # hooks removed


@pytest.mark.parametrize("whole_stage", [False, True])
def test_profile_of_the_engine_adds_up_and_changes_nothing(whole_stage, monkeypatch):
    if not whole_stage:  # the CIFAR stages then run the loop with the row executor (per-unit records)
        monkeypatch.setattr(NativeStageExecutor, "run_whole", lambda self, stage, x: None)
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=8).eval()
    obj, _ = object_model("resnet20_cifar", image_size=32, base_channels=8)
    x, _ = object_inputs(2, 32, 0.15, seed=1)
    for m in (model, obj):
        plain, profiled = to_sparse(m), to_sparse(m)
        prof = profile_sparse(profiled, x, warmup=1, reps=3)
        with torch.no_grad():
            ref = plain(x)
        out = prof.output
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.flops, ref.flops)
        assert all(torch.equal(a.num_units, b.num_units) for a, b in zip(out.stages, ref.stages))
        assert len(prof.records) == 3
        for rec in prof.records:
            for stage, s in zip(m.stages, rec.stages):
                if s.whole:  # the native whole-stage executor: one timed call
                    assert not s.units and 0 < s.whole <= s.total + 1e-6
                    continue
                assert sorted(s.units) == list(range(1, stage.num_units))
                assert 0 < s.timed <= s.total + 1e-6  # timed calls fit inside the stage call
                assert all(0.0 <= f <= 1.0 for f in s.active.values())
                assert set(s.paths.values()) <= {"sparse", "dense"}
            assert sum(s.total for s in rec.stages) <= rec.total + 1e-6
        # the profile left the engine as it was
        assert "stage_executors" not in profiled.__dict__
        for ex in profiled.stage_executors():
            assert not any("run_" in k for kern in getattr(ex, "fallback", ex).unit_kernels for k in kern.__dict__)
        summary = summarize(prof)
        assert len(summary["stages"]) == 3
        if whole_stage:
            assert all(s["whole_ms"] > 0 for s in summary["stages"])
            continue
        for s in summary["stages"]:
            assert [u["unit"] for u in s["per_unit"]] == list(range(3)) and s["per_unit"][-1]["halting_ms"] is None
    if whole_stage:
        return
    # imposed object halting: later units run at a fraction of the positions, on the sparse path
    active = [f for s in prof.records[0].stages for n, f in s.active.items()]
    assert min(active) < 0.5
    assert "sparse" in {p for s in prof.records[0].stages for p in s.paths.values()}


def test_break_even_times_both_paths_of_a_kernel():
    from sact.tools.bench.break_even import break_even
    from sact.units import PreActBasicUnit

    res = break_even(PreActBasicUnit(8, 8), 8, batch=2, reps=1, fractions=(0.25, 1.0))
    assert res["kernel"] == "SparsePreActBasic" and res["batch"] == 2
    assert [round(f, 2) for f, _ in res["points"]][-1] == 1.0 and 0.0 < res["points"][0][0] < 0.5
    assert all(r > 0 for _, r in res["points"])
    b = res["break_even"]
    assert b is None or 0.0 < b <= 1.0

    class Custom(nn.Module):  # no row kernel: the dense masked fallback has no sparse path to time
        out_channels = 8

        def forward(self, x, mask=None):
            return x

    assert break_even(Custom(), 8) is None


# ---- entry points -----------------------------------------------------------------------


def test_sact_bench_cli_parses():
    args = build_parser().parse_args(["bench", "--quick", "--threads", "1", "--models", "resnet50_v2", "--profile"])
    assert args.quick and args.threads == 1 and args.models == ["resnet50_v2"] and args.profile
    assert args.out == "sact_bench"


def test_help_works_from_an_installed_copy_without_benchmarks(tmp_path):
    # A copy of the package alone (no checkout around it), run from another directory.
    site = tmp_path / "site"
    shutil.copytree(SRC, site / "sact", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    work = tmp_path / "cwd"
    work.mkdir()
    script = (
        "import runpy, sys, sact\n"
        "print('FROM', sact.__file__)\n"
        "from sact.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "sys.argv = ['bench', '--help']\n"
        "try:\n    runpy.run_module('sact.tools.bench', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
    )
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"FROM {site / 'sact'}" in res.stdout
    assert res.stdout.count("--checkpoint") >= 2 and "python -m sact.tools.bench" in res.stdout
    assert not any(work.iterdir())  # --help writes nothing


def test_the_package_never_imports_or_reads_benchmarks():
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "benchmarks" for a in node.names):
                offenders.append(f"{path}:{node.lineno} import")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "benchmarks":
                offenders.append(f"{path}:{node.lineno} from-import")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and "benchmarks" in node.value
                  and id(node) not in docstrings):
                offenders.append(f"{path}:{node.lineno} string {node.value[:40]!r}")
    assert not offenders, offenders


# ---- layout: the engine is library only, the harness lives in sact.tools.bench ----------

#: sact.sparse's aliases of the moved harness modules (they go in the next release).
ALIASES = ("bench", "profile", "workloads", "break_even")


def _absolute_imports(path: Path, package: str) -> list[str]:
    """The modules ``path`` (a module of ``package``) imports, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            names.append(".".join(base + ([node.module] if node.module else [])))
    return names


def test_the_engine_holds_no_harness():
    for path in (SRC / "sparse").glob("*.py"):
        imports = _absolute_imports(path, "sact.sparse")
        if path.stem in ALIASES:  # an alias: imports and names, no code of its own
            tree = ast.parse(path.read_text())
            assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], path
            assert "argparse" not in imports, path
            continue
        assert not [m for m in imports if m == "argparse" or m.startswith(("sact.tools", "sact.commands", "sact.cli"))
                    ], path


def test_old_paths_alias_the_moved_names_and_errors_have_the_cli_exit_code():
    import importlib

    from sact.cli import exit_code
    from sact.errors import InputError

    for name in ALIASES:
        old, new = importlib.import_module(f"sact.sparse.{name}"), importlib.import_module(f"sact.tools.bench.{name}")
        moved = [n for n in old.__all__ if n not in ("add_arguments", "run_cli", "main")]
        assert moved and all(getattr(old, n) is getattr(new, n) for n in moved), name
    for error in (BenchError, WorkloadError):
        assert issubclass(error, InputError) and exit_code(error("x")) == 2


def test_workers_warm_up_in_untimed_rounds_until_time_has_passed_and_they_are_stable(monkeypatch):
    """A fresh worker runs slower for seconds (its heap still growing): untimed interleaved rounds
    continue until WARMUP_SECONDS have passed, at least ``warmup`` of them, and every worker's last
    two rounds agree within STABLE (and with its fastest), before the timed ones."""
    import time as time_module

    from sact.tools.bench import runtimes as runtimes_module

    class Fake:
        def __init__(self, name, times=()):
            self.contender = type("C", (), {"name": name})()
            self.seconds, self.layers, self.asked, self.times = [], None, 0, list(times)

        def ask(self, *msg):
            self.asked += 1
            time_module.sleep(0.01)
            return self.times.pop(0) if self.times else 0.01

    fakes = [Fake("a"), Fake("b")]
    monkeypatch.setattr(runtimes_module, "_start", lambda contenders, threads, warmup: fakes)
    monkeypatch.setattr(runtimes_module, "_stop", lambda workers: None)
    monkeypatch.setattr(runtimes_module, "WARMUP_SECONDS", 0.3)
    t0 = time_module.perf_counter()
    workers = runtimes_module.time_workers([None, None], threads=1, rounds=3, warmup=2)
    assert time_module.perf_counter() - t0 >= 0.3
    assert [len(w.seconds) for w in workers] == [3, 3]
    untimed = [w.asked - len(w.seconds) for w in workers]
    assert untimed[0] == untimed[1] == workers[0].warmup_rounds >= 0.3 / 0.02 - 2  # rounds of two 10 ms calls
    monkeypatch.setattr(runtimes_module, "WARMUP_SECONDS", 0.0)
    fakes[:] = [Fake("a"), Fake("b")]
    runtimes_module.time_workers([None, None], threads=1, rounds=3, warmup=2)
    assert [w.asked - len(w.seconds) for w in fakes] == [2, 2]  # at least `warmup` rounds
    # a worker still speeding up keeps everyone warming up: until two rounds in a row agree
    fakes[:] = [Fake("a"), Fake("b", [0.05, 0.04, 0.03, 0.02, 0.015, 0.01])]
    runtimes_module.time_workers([None, None], threads=1, rounds=3, warmup=2)
    assert [w.warmup_rounds for w in fakes] == [7, 7]
    assert fakes[1].seconds == [0.01, 0.01, 0.01]
