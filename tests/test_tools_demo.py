"""``sact demo``: the report of a tiny run, and the inside/outside-the-box statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sact
from sact.tools.demo import DemoSettings, ponder_box_stats, run_demo
from sact.tools.export import default_image_size
from helpers import tiny_fashion_mnist

torch.set_num_threads(1)


def test_ponder_box_stats_by_hand():
    ponder = torch.full((2, 8, 8), 3.0)
    units = torch.full((2, 8, 8), 3)  # 3 stages: floor 3, no extra anywhere ...
    ponder[0, 2:4, 2:6] = 6.0  # ... except inside image 0's box
    units[0, 2:4, 2:6] = 5
    boxes = torch.tensor([[2.0, 2.0, 6.0, 4.0], [0.0, 0.0, 4.0, 8.0]])  # (x0, y0, x1, y1)
    s = ponder_box_stats(units, ponder, boxes, num_stages=3)
    assert s["ponder_inside"] == pytest.approx((6.0 + 3.0) / 2)
    assert s["ponder_outside"] == pytest.approx(3.0)
    assert s["ponder_ratio"] == pytest.approx(1.5)
    assert s["extra_share_inside"] == pytest.approx(1.0)
    assert s["box_area_share"] == pytest.approx((8 / 64 + 32 / 64) / 2)
    flat = ponder_box_stats(torch.full((1, 4, 4), 3), torch.full((1, 4, 4), 3.0), torch.tensor([[0.0, 0, 2, 2]]), 3)
    assert flat["ponder_ratio"] == pytest.approx(1.0) and np.isnan(flat["extra_share_inside"])


def test_tiny_demo_writes_the_report(tmp_path):
    data_dir = tiny_fashion_mnist(tmp_path / "fmnist", n_train=60, n_test=30)
    settings = DemoSettings(base_channels=4, pretrain_steps=3, finetune_steps=3, batch_size=8, train_samples=32,
                            eval_samples=16, canvas_size=48, num_maps=2, threads=1)
    out = tmp_path / "report"
    results = run_demo(settings, out, data_dir=str(data_dir), progress=False, command="test")
    for name in ("report.md", "results.json", "table.png", "accuracy_vs_flops.png", "ponder_maps.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "vanilla_init").exists() and not list(out.glob("*/train_state.pt"))
    saved = json.loads((out / "results.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == ["vanilla", "act", "sact"]
    rows = {r["mode"]: r for r in saved["rows"]}
    assert rows["vanilla"]["relative_flops"] == 1.0 and rows["vanilla"]["flops_std"] == 0.0
    assert rows["act"]["box_ponder_ratio"] == pytest.approx(1.0, abs=1e-5), "ACT ponder is constant over the image"
    for mode in ("vanilla", "act", "sact"):
        model = sact.load_checkpoint(out / mode / "model")
        assert model.mode == mode and model.in_chans == 1
        assert model.checkpoint_meta["metrics"]["top1"] == pytest.approx(rows[mode]["top1"])
        assert model.checkpoint_meta["preprocess"]["kind"] == "unit"
        # the size it was trained at (sact export's default) and the histograms sact plot draws
        assert model.checkpoint_meta["input_size"] == [1, 48, 48]
        assert default_image_size(model) == 48
        metrics = json.loads((out / mode / "metrics.json").read_text())
        for i, stage in enumerate(metrics["stages"]):  # 16 test canvases, stages at 48, 24, 12 px
            assert len(stage["num_units_hist"]) == 3 and sum(stage["num_units_hist"]) == 16 * (48 >> i) ** 2
    # ACT / SACT started from the vanilla weights at the branch point, then trained on
    act = sact.load_checkpoint(out / "act" / "model")
    assert act.checkpoint_meta["config"]["init"].endswith("vanilla_init/model")
    md = (out / "report.md").read_text()
    assert "| SACT ResNet |" in md and "ponder_maps.png" in md
    assert results["rows"][2]["top1"] == rows["sact"]["top1"]


def test_ponder_maps_figure_has_no_empty_band_under_the_title(tmp_path):
    from PIL import Image

    from sact.tools import demo_report

    class Test:  # what the report reads of the cached test set
        images = torch.rand(3, 1, 48, 48)
        labels = torch.tensor([0, 1, 2])
        boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]] * 3)

    models = {m: sact.create_model("resnet20_cifar", mode=m, in_chans=1, base_channels=4).eval()
              for m in ("vanilla", "act", "sact")}
    demo_report._ponder_maps(models, Test(), tmp_path / "p.png", 3)
    a = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    blank = (a > 250).all(1)  # rows that are all white
    first_ink = int(np.argmin(blank))  # the title
    below_title = blank[first_ink:]
    band = int(np.argmin(below_title[np.argmax(below_title):]))  # white rows between the title and the panels
    assert band < 0.02 * a.shape[0], f"{band} empty rows under the title of a {a.shape[0]}-row figure"
