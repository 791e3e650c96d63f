"""`sact saliency` end to end on a tiny generated CAT2000 folder and on tiny Cluttered
Fashion-MNIST canvases (fake Fashion-MNIST files): per-category and overall rows, the
baselines, and the model scores against a direct evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sact
from sact.cli import main
from sact.data import cluttered_preprocess
from sact.data import fashion_mnist as fm
from sact.saliency import CAT2000, evaluate_dataset, make_synthetic_cat2000
from sact.saliency.model import model_saliency

BASELINES = ["untrained_sact", "center_bias", "uniform"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = sact.create_model("resnet20_cifar", mode="sact", in_chans=1, base_channels=4)
    with torch.no_grad():  # stand-in for training: non-constant ponder maps
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    sact.save_checkpoint(model, path, meta={"preprocess": cluttered_preprocess().to_dict()})
    return str(path)


@pytest.fixture(scope="module")
def cat2000(tmp_path_factory):
    root = tmp_path_factory.mktemp("cat2000")
    return make_synthetic_cat2000(root, categories=("Action", "Indoor"), n_per_category=3, size=(24, 32))


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 8)):
        images = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):  # a bright blob of random shape per item, so masks are not empty
            r, c = rng.integers(2, 12, 2)
            images[i, r : r + 14, c : c + 12] = rng.integers(120, 256)
        fm.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        fm.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_cat2000_end_to_end(cat2000, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["saliency", "--data", str(cat2000), "--checkpoint", checkpoint, "--out", str(out),
               "--limit", "2", "--blur", "0.05", "--metrics", "auc_judd", "nss", "cc", "auc_shuffled"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["overall"]) == ["sact", *BASELINES]
    for method in summary["overall"]:
        res = json.loads((out / method / "saliency.json").read_text())
        assert {c: v["n"] for c, v in res["categories"].items()} == {"Action": 2, "Indoor": 2}
        assert res["overall"]["n"] == 4 and [r["name"] for r in res["items"]] == ["1", "2", "1", "2"]
        md = (out / method / "saliency.md").read_text()
        assert "| Action | 2 |" in md and "| Indoor | 2 |" in md and "| **overall** | 4 |" in md
    md = (out / "summary.md").read_text()
    assert "## AUC-Judd per category" in md and "| untrained_sact |" in md
    assert md in capsys.readouterr().out
    # the sact row is what evaluate_dataset gives with the model's maps
    model = sact.load_checkpoint(checkpoint)
    items = [it for it in CAT2000(cat2000) if it.name in ("1", "2")]
    direct = evaluate_dataset(
        items, lambda it: model_saliency(model, np.array(it.load_stimulus()), size=it.size, blur_sigma=0.05),
        metrics=["auc_judd", "nss", "cc", "auc_shuffled"], progress=False)
    for m in ("auc_judd", "nss", "cc", "auc_shuffled"):
        assert summary["overall"]["sact"][m] == pytest.approx(direct["overall"][m], abs=1e-9)
    assert summary["overall"]["uniform"]["auc_judd"] == pytest.approx(0.5)
    # synthetic fixations are centre-biased: the centre-bias baseline finds them
    assert summary["overall"]["center_bias"]["auc_judd"] > 0.7


def test_cat2000_selection_hands_out_fresh_items(cat2000):
    from collections.abc import Sequence

    from sact.saliency.cat2000 import CAT2000Subset

    sub = CAT2000Subset(CAT2000(cat2000), [1, 4])
    assert isinstance(sub, Sequence)  # else evaluate_dataset keeps every item (and its maps) alive
    assert [it.id for it in sub] == ["Action/2", "Indoor/2"] and sub[0] is not sub[0]


def test_cat2000_without_baselines(cat2000, checkpoint, tmp_path):
    out = tmp_path / "out"
    rc = main(["saliency", "--data", str(cat2000), "--checkpoint", checkpoint, "--out", str(out),
               "--categories", "Indoor", "--no-baselines", "--metrics", "nss", "--max-side", "16"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["overall"]) == ["sact"] and summary["overall"]["sact"]["n"] == 3
    assert not (out / "uniform").exists()


def test_cluttered_end_to_end(fashion_dir, checkpoint, tmp_path):
    out = tmp_path / "out"
    rc = main(["saliency", "--cluttered", "--checkpoint", checkpoint, "--num-images", "6", "--out", str(out),
               "--fashion-mnist-dir", str(fashion_dir), "--batch-size", "4", "--metrics", "auc_judd", "nss", "sim"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["overall"]) == ["sact", *BASELINES, "intensity"]
    sact_res = json.loads((out / "sact" / "saliency.json").read_text())
    assert sact_res["overall"]["n"] == 6 and sum(v["n"] for v in sact_res["categories"].values()) == 6
    assert set(sact_res["categories"]) <= set(sact.data.FASHION_MNIST_CLASSES)
    assert sact_res["config"]["dataset"]["ground_truth"] == "mask" and sact_res["config"]["checkpoint"] == checkpoint
    assert summary["overall"]["uniform"]["auc_judd"] == pytest.approx(0.5)
    assert summary["overall"]["intensity"]["auc_judd"] > 0.9  # objects are brighter than the clutter
    assert "| **overall** | 6 |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--blur", "-1"], "--blur"),
    (["--center-bias-weight", "2"], "--center-bias-weight"),
    (["--metrics", "emd"], "unknown metric"),
])
def test_bad_arguments_exit_2(cat2000, checkpoint, tmp_path, capsys, extra, message):
    rc = main(["saliency", "--data", str(cat2000), "--checkpoint", checkpoint, "--out", str(tmp_path), *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_missing_checkpoint_or_data_exit_2(cat2000, checkpoint, tmp_path, capsys):
    assert main(["saliency", "--data", str(cat2000), "--checkpoint", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["saliency", "--data", str(tmp_path / "none"), "--checkpoint", checkpoint,
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --data and --cluttered are exclusive
        main(["saliency", "--data", str(cat2000), "--cluttered", "--checkpoint", checkpoint, "--out", "x"])
