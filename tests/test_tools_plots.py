"""``sact plot`` from hand-written metrics.json files (the ``sact eval`` contract)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sact.cli import main
from sact.tools.plots import MetricsError, load_metrics


def _metrics(model="resnet20_cifar", mode="sact", tau=0.01, top1=0.9, flops=4e7, hist=True):
    stages = []
    for i in range(3):
        s = {"ponder_cost_mean": 4.0 + i, "ponder_cost_std": 0.5, "num_units_mean": 2.5 + i}
        if hist:
            s["num_units_hist"] = [10, 5, 3, 1][: 3 + (i > 0)]
        stages.append(s)
    return {"model": model, "mode": mode, "tau": tau, "top1": top1, "flops_mean": flops, "flops_std": flops / 10,
            "stages": stages}


def _write(tmp_path, name, doc):
    path = tmp_path / name / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    return path


def test_plot_writes_pngs(tmp_path, capsys):
    files = [
        _write(tmp_path, "s1", _metrics(tau=0.001, top1=0.91, flops=5e7)),
        _write(tmp_path, "s2", _metrics(tau=0.01, top1=0.89, flops=4e7)),
        _write(tmp_path, "a1", _metrics(mode="act", tau=0.01, top1=0.88, flops=4.5e7, hist=False)),
        _write(tmp_path, "v", _metrics(mode="vanilla", tau=None, top1=0.92, flops=8e7)),
        _write(tmp_path, "s2again", _metrics(tau=0.01, top1=0.895, flops=4.1e7)),
    ]
    out = tmp_path / "plots"
    assert main(["plot", *map(str, files), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "a1/metrics.json: no 'num_units_hist' in stages [0, 1, 2]" in captured.err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([
        "accuracy_vs_flops.png",
        "num_units_resnet20_cifar_sact_tau0.001.png",
        "num_units_resnet20_cifar_sact_tau0.01.png",
        "num_units_resnet20_cifar_sact_tau0.01-2.png",
        "num_units_resnet20_cifar_act_tau0.01.png",
        "num_units_resnet20_cifar_vanilla_taunone.png",
    ])
    for name in pngs:
        im = Image.open(out / name)
        assert im.format == "PNG" and im.size[0] > 200
        assert np.asarray(im.convert("L")).std() > 0  # something drawn


@pytest.mark.parametrize("drop, message", [
    ("top1", "missing required key 'top1'"),
    ("tau", "missing required key 'tau'"),
    ("stages.1.num_units_mean", "missing required key 'stages[1].num_units_mean'"),
])
def test_missing_required_key_names_file_and_key(tmp_path, capsys, drop, message):
    doc = _metrics()
    if drop.startswith("stages."):
        _, i, key = drop.split(".")
        del doc["stages"][int(i)][key]
    else:
        del doc[drop]
    bad = _write(tmp_path, "bad", doc)
    good = _write(tmp_path, "good", _metrics())
    assert main(["plot", str(good), str(bad), "--out", str(tmp_path / "o")]) == 2  # bad input
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    with pytest.raises(MetricsError, match="missing required key"):
        load_metrics(bad)


def test_invalid_values_and_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(MetricsError, match="m.json: cannot read metrics"):
        load_metrics(path)
    path.write_text(json.dumps({**_metrics(), "top1": "high"}))
    with pytest.raises(MetricsError, match="'top1' must be a finite number, got 'high'"):
        load_metrics(path)
    doc = _metrics()
    doc["stages"][0]["num_units_hist"] = "oops"
    path.write_text(json.dumps(doc))
    metrics, warnings = load_metrics(path)
    assert "num_units_hist" not in metrics["stages"][0] and "not a list of counts" in warnings[0]


def test_model_given_as_sact_config(tmp_path):
    """``sact eval`` writes ``"model": model.sact_config``; the name and mode come from it."""
    doc = _metrics()
    del doc["mode"]
    doc["model"] = {"name": "resnet32_cifar", "kwargs": {"mode": "act", "base_channels": 16}}
    path = _write(tmp_path, "cfg", doc)
    metrics, _ = load_metrics(path)
    assert (metrics["model"], metrics["mode"]) == ("resnet32_cifar", "act")
    del doc["model"]["kwargs"]["mode"]
    path.write_text(json.dumps(doc))
    with pytest.raises(MetricsError, match="missing required key 'mode'"):
        load_metrics(path)


def test_missing_model_mode_tau_taken_from_sibling_checkpoint(tmp_path, capsys):
    import sact

    doc = _metrics()
    for key in ("model", "mode", "tau"):
        del doc[key]
    path = _write(tmp_path, "run", doc)  # an `sact train` folder: metrics.json + model.*
    sact.save_checkpoint(sact.create_model("resnet20_cifar", mode="act", base_channels=4), path.parent / "model",
                         meta={"tau": 0.02})
    metrics, warnings = load_metrics(path)
    assert (metrics["model"], metrics["mode"], metrics["tau"]) == ("resnet20_cifar", "act", 0.02)
    assert "model, mode, tau taken from the checkpoint" in warnings[0]
    assert main(["plot", str(path), "--out", str(tmp_path / "o")]) == 0
