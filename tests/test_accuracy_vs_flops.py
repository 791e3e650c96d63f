"""The accuracy-vs-FLOPs protocol's plumbing: plan, resume, aggregation math, one tiny real job."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_fashion_mnist

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_vs_flops.py"


@pytest.fixture(scope="module")
def bench():
    from sact.models import _REGISTRY

    spec = importlib.util.spec_from_file_location("accuracy_vs_flops_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    registered = set(_REGISTRY)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        for name in set(_REGISTRY) - registered:  # the script's extra depths: not for other tests
            del _REGISTRY[name]


def test_plan_jobs(bench):
    jobs = bench.plan_jobs(seeds=[0, 1, 2], depths=[1, 2, 3, 4], act_taus=[0.01, 0.1], sact_taus=[0.02],
                           adaptive_depth=3)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids)) == 3 * 4 + 3 * 2 + 3 * 1
    assert ids[:3] == ["vanilla_d3_s0", "vanilla_d3_s1", "vanilla_d3_s2"]  # the warm starts come first
    assert "act_d3_tau0.01_s2" in ids and "sact_d3_tau0.02_s0" in ids and "vanilla_d1_s1" in ids
    proto = bench.Protocol(steps=100, warm_step=40)
    act = next(j for j in jobs if j.mode == "act")
    van = next(j for j in jobs if j.mode == "vanilla")
    assert bench.train_steps(act, proto) == 60 and bench.train_steps(van, proto) == 100
    with pytest.raises(ValueError, match="depth 3"):
        bench.plan_jobs(seeds=[0], depths=[1, 2], act_taus=[0.1], sact_taus=[], adaptive_depth=3)
    with pytest.raises(ValueError, match="seeds"):
        bench.plan_jobs(seeds=[0, 0], depths=[3], act_taus=[], sact_taus=[], adaptive_depth=3)
    with pytest.raises(ValueError, match="warm_step"):
        bench.Protocol(steps=10, warm_step=10)
    assert bench.curve_steps(bench.Protocol(steps=100, warm_step=50, curve_points=4)) == [25, 50, 75, 100]


def test_t_interval(bench):
    mean, lo, hi = bench.t_interval([0.70, 0.72, 0.74])
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2) from a t table; sample std 0.02
    assert mean == pytest.approx(0.72)
    assert (lo, hi) == (pytest.approx(0.72 - half, abs=1e-6), pytest.approx(0.72 + half, abs=1e-6))
    m5, lo5, hi5 = bench.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m5 == 3.0 and hi5 - m5 == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5)  # t(0.975, 4)
    assert bench.t_interval([0.5]) == (0.5, None, None)


def _result(bench, job, proto, *, top1, flops, ratio=1.0):
    return {"job": job.id, "mode": job.mode, "depth": job.depth, "tau": job.tau, "seed": job.seed,
            "protocol": proto.to_dict(), "metrics": {"top1": top1, "flops_mean": flops, "flops_std": 0.0,
                                                     "ponder_cost_mean": 9.0, "stages": [{"num_units_mean": 3.0}]},
            "box": {"ponder_ratio": ratio, "extra_share_inside": 0.3, "box_area_share": 0.2},
            "curve": [{"step": 5, "top1": top1 - 0.1}, {"step": 10, "top1": top1}] if job.point == ("vanilla", 3, 0.0) else None,
            "cpu_s": 10.0, "wall_s": 12.0, "finished": "now", "load_start": [0, 0, 0], "load_end": [0, 0, 0]}


def test_aggregate_synthetic(bench, tmp_path):
    proto = bench.Protocol(steps=10, warm_step=5)
    jobs = bench.plan_jobs(seeds=[0, 1, 2], depths=[1, 3], act_taus=[0.1], sact_taus=[0.02], adaptive_depth=3)
    ref = 100.0
    v1 = [0.60, 0.62, 0.64]
    v3 = [0.70, 0.71, 0.72]
    sa = [0.69, 0.70, 0.74]
    results = []
    for j in jobs:
        if j.mode == "vanilla":
            top1, flops = (v1 if j.depth == 1 else v3)[j.seed], (30.0 if j.depth == 1 else 100.0)
        elif j.mode == "sact":
            top1, flops = sa[j.seed], 65.0
        else:
            continue  # the ACT jobs are not finished: partial
        results.append(_result(bench, j, proto, top1=top1, flops=flops, ratio=1.2 + 0.1 * j.seed))
    doc = bench.aggregate(results, jobs, proto, ref_flops=ref, settings={"x": 1})
    assert doc["status"]["partial"] and doc["status"]["jobs_done"] == 9 and doc["status"]["jobs_total"] == 12
    assert sorted(doc["status"]["missing"]) == ["act_d3_tau0.1_s0", "act_d3_tau0.1_s1", "act_d3_tau0.1_s2"]
    points = {(p["mode"], p["depth"]): p for p in doc["points"]}
    assert set(points) == {("vanilla", 1), ("vanilla", 3), ("sact", 3)}
    s = points[("sact", 3)]
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2] and s["rel_flops"] == pytest.approx(0.65)
    assert s["top1_mean"] == pytest.approx(np.mean(sa))
    half = 4.302653 * np.std(sa, ddof=1) / math.sqrt(3)
    assert s["top1_ci95"] == [pytest.approx(np.mean(sa) - half, abs=1e-6), pytest.approx(np.mean(sa) + half, abs=1e-6)]
    assert s["box_ponder_ratio"] == pytest.approx(1.3)
    # the same seed's vanilla curve at 65% FLOPs: half way between depth 1 (30%) and depth 3 (100%)
    interp = [v1[i] + (v3[i] - v1[i]) * (0.65 - 0.30) / 0.70 for i in range(3)]
    assert [p["vanilla_top1_at_equal_flops"] for p in s["per_seed"]] == pytest.approx(interp)
    assert s["delta_vs_vanilla_mean"] == pytest.approx(np.mean(np.array(sa) - interp))
    assert points[("vanilla", 3)]["rel_flops"] == pytest.approx(1.0) and points[("vanilla", 3)]["delta_vs_vanilla_mean"] is None
    assert s["delta_vs_act_n"] == 0 and s["delta_vs_act_mean"] is None  # no ACT curve yet
    # with the ACT runs (one tau per seed is a single point, no curve), then two ACT taus:
    # SACT at 65% lies between ACT at 50% and 80%, so it is compared with their midpoint
    act_jobs = bench.plan_jobs(seeds=[0, 1, 2], depths=[1, 3], act_taus=[0.1, 0.2], sact_taus=[0.02],
                               adaptive_depth=3)
    acts = [_result(bench, j, proto, top1=0.60 + 0.1 * (j.tau == 0.1), flops=50.0 if j.tau == 0.2 else 80.0)
            for j in act_jobs if j.mode == "act"]
    doc2 = bench.aggregate(results + acts, act_jobs, proto, ref_flops=ref, settings={"x": 1})
    s2 = next(p for p in doc2["points"] if p["mode"] == "sact")
    assert s2["delta_vs_act_n"] == 3
    assert [p["act_top1_at_equal_flops"] for p in s2["per_seed"]] == pytest.approx([0.65] * 3)
    assert s2["delta_vs_act_mean"] == pytest.approx(np.mean(sa) - 0.65)
    assert "Δ top-1 vs ACT" in bench.markdown({**doc2, "settings": _md_settings()})
    curve = doc["learning_curve"]
    assert set(curve["per_seed"]) == {"0", "1", "2"}
    assert [c["step"] for c in curve["mean"]] == [5, 10] and curve["mean"][1]["top1_mean"] == pytest.approx(np.mean(v3))


def _md_settings() -> dict:
    return {"eval_samples": 10, "flops_reference": {"model": "resnet20_cifar", "flops": 100.0}, "command": "x",
            "recipe": "r", "protocol": {"threads": 1}, "seeds": [0, 1, 2], "depths": [1, 3], "act_taus": [0.1, 0.2],
            "sact_taus": [0.02], "environment": {"torch": "t", "cpu_count": 2}, "jobs": 2}


def test_sweep_skips_finished_jobs_and_waits_for_the_warm_start(bench, tmp_path):
    proto = bench.Protocol(steps=10, warm_step=5)
    other = bench.Protocol(steps=12, warm_step=6)
    jobs = bench.plan_jobs(seeds=[0, 1], depths=[1, 3], act_taus=[], sact_taus=[0.1], adaptive_depth=3)
    run = tmp_path / "run"

    def finish(job, p=proto):
        path = bench.job_dir(run, job) / bench.RESULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_result(bench, job, p, top1=0.5, flops=1.0)))

    done = next(j for j in jobs if j.id == "vanilla_d1_s0")
    finish(done)
    stale = next(j for j in jobs if j.id == "vanilla_d1_s1")
    finish(stale, other)  # finished under another protocol: not a result of this sweep
    assert bench.read_result(run, done, proto) is not None and bench.read_result(run, stale, proto) is None
    launched = []

    class Proc:
        def __init__(self, job):
            self.job, self.polls = job, 0

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            if self.job.id == "vanilla_d3_s1":
                return 1  # crashes before its warm-start snapshot
            if self.job.mode == "vanilla" and self.job.depth == 3:
                w = bench.warm_path(run, proto, self.job.seed)
                w.parent.mkdir(parents=True, exist_ok=True)
                w.with_suffix(".safetensors").write_bytes(b"x")
                w.with_suffix(".json").write_text("{}")
            finish(self.job)
            return 0

        def terminate(self):
            pass

        def wait(self):
            return 0

    def launch(job):
        if job.mode != "vanilla":
            assert bench.warm_ready(run, proto, job.seed), f"{job.id} launched before its warm start"
        launched.append(job.id)
        return Proc(job)

    calls = []
    failed = bench.run_sweep(run, jobs, proto, workers=2, costs={j.id: 1.0 for j in jobs}, launch=launch,
                             on_done=lambda: calls.append(1), progress=False)
    assert "vanilla_d1_s0" not in launched  # finished: skipped
    assert "vanilla_d1_s1" in launched  # the stale result is rerun
    assert "sact_d3_tau0.1_s0" in launched
    assert sorted(failed) == ["sact_d3_tau0.1_s1", "vanilla_d3_s1"]  # the crash blocks its seed's SACT job
    assert "sact_d3_tau0.1_s1" not in launched and len(calls) == len(launched)
    # a second sweep runs only what is left
    launched.clear()
    bench.run_sweep(run, jobs, proto, workers=2, costs={j.id: 1.0 for j in jobs}, launch=launch, on_done=lambda: None,
                    progress=False)
    assert launched == ["vanilla_d3_s1"]


def test_tiny_jobs_end_to_end(bench, tmp_path):
    data = str(tiny_fashion_mnist(tmp_path / "fmnist", n_train=60, n_test=30))
    proto = bench.Protocol(steps=4, warm_step=2, batch_size=4, canvas_size=48, base_channels=2, eval_samples=12,
                           curve_samples=6, curve_points=2, checkpoint_every=0)
    run = tmp_path / "run"
    jobs = bench.plan_jobs(seeds=[0], depths=[1, 3], act_taus=[0.1], sact_taus=[0.1], adaptive_depth=3)
    van = bench.run_job(run, jobs[0], proto, data_dir=data)
    assert jobs[0].id == "vanilla_d3_s0" and bench.warm_ready(run, proto, 0)
    assert [p["step"] for p in van["curve"]] == [2, 4] and van["metrics"]["num_images"] == 12
    sact_job = next(j for j in jobs if j.mode == "sact")
    res = bench.run_job(run, sact_job, proto, data_dir=data)
    assert res["init"] == str(bench.warm_path(run, proto, 0)) and res["train_steps"] == 2 and res["curve"] is None
    assert bench.read_result(run, sact_job, proto)["metrics"]["top1"] == res["metrics"]["top1"]
    assert 0 < res["box"]["box_area_share"] < 1 and res["metrics"]["flops_mean"] > 0
    assert van["box"]["ponder_ratio"] == pytest.approx(1.0)  # vanilla: the same units everywhere
    results = [r for r in (bench.read_result(run, j, proto) for j in jobs) if r]
    ref = bench.vanilla_flops(proto, 3)
    assert ref == pytest.approx(van["metrics"]["flops_mean"])
    doc = bench.aggregate(results, jobs, proto, ref_flops=ref,
                          settings=bench._settings(proto, {"seeds": [0], "depths": [1, 3], "act_taus": [0.1],
                                                          "sact_taus": [0.1]}, jobs, type("A", (), {"jobs": 1})(),
                                                   ref, ["python x"]))
    out = tmp_path / "res" / "accuracy_vs_flops"
    bench.write_outputs(out, doc)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["status"]["partial"] and saved["settings"]["seeds"] == [0] and saved["settings"]["eval_samples"] == 12
    assert {p["mode"] for p in saved["points"]} == {"vanilla", "sact"}
    assert "PARTIAL" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0 and (out.parent / "accuracy_vs_flops_curve.png").stat().st_size > 0


def test_cli_rejects_bad_input(bench, capsys):
    assert bench.main(["--depths", "7", "--plan"]) == 2
    assert "depths" in capsys.readouterr().err
