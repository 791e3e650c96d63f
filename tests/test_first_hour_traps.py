"""Small traps of the first hour (issue 21, item 5): a one-class or empty-class folder
dataset is refused, `sact plot` says when its files come from different datasets,
`sact eval RUN` writes next to the checkpoint (not into the current folder), and
`sact.data` resolves after a plain `import sact`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sact
from sact.cli import main
from sact.data import ImageNetFolder, class_folder_splits
from sact.errors import DataError
from sact.tools.plots import curve_families, load_metrics

from helpers import TRAIN_FLAGS, error_line, snapshot, tiny_fashion_mnist


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")


# --------------------------------------------------------------------------- folder datasets
def test_one_class_folder_is_refused(tmp_path, capsys):
    _images(tmp_path / "one" / "cat", 4)
    with pytest.raises(DataError, match=r"found 1 class in .*one \(cat\); classification needs at least 2"):
        class_folder_splits(tmp_path / "one", val_fraction=0.5)
    _images(tmp_path / "split" / "train" / "cat", 2)
    _images(tmp_path / "split" / "val" / "cat", 2)
    with pytest.raises(DataError, match="found 1 class"):
        class_folder_splits(tmp_path / "split")
    with pytest.raises(DataError, match="found 1 class"):
        class_folder_splits(tmp_path / "split", need_train=False)  # evaluation of val/ alone too
    with pytest.raises(DataError, match="found 1 class"):
        ImageNetFolder(tmp_path / "split", split="train")
    # the command: one line, exit 2, and no run folder left behind
    out = tmp_path / "run"
    assert main(["train", *TRAIN_FLAGS, "--dataset", "folder", "--data-dir", str(tmp_path / "one"),
                 "--val-fraction", "0.5", "--set", "image_size=8", "--out", str(out)]) == 2
    assert "classification needs at least 2" in error_line(capsys.readouterr().err, "train")
    assert not out.exists()


def test_empty_class_folder_is_refused_where_it_defines_a_class(tmp_path):
    root = tmp_path / "pets"
    _images(root / "train" / "cat", 2)
    _images(root / "train" / "dog", 2)
    (root / "train" / "eel").mkdir()
    (root / "train" / "eel" / "notes.txt").write_text("not an image")
    _images(root / "val" / "cat", 1)
    _images(root / "val" / "dog", 1)
    with pytest.raises(DataError, match=r"1 class folder\(s\) without images: .*train/eel"):
        class_folder_splits(root)
    with pytest.raises(DataError, match="eel"):
        class_folder_splits(root / "train", val_fraction=0.5)  # one tree: the same
    with pytest.raises(FileNotFoundError, match="eel"):  # torchvision's ImageFolder refuses it as well
        ImageNetFolder(root, split="train")
    _images(root / "train" / "eel", 2)
    (root / "val" / "eel").mkdir()  # a class without validation images is fine: train/ defines the classes
    classes, train, val = class_folder_splits(root)
    assert classes == ["cat", "dog", "eel"] and len(train) == 6 and sorted(c for _, c in val) == [0, 1]


# --------------------------------------------------------------------------- sact plot
def _metrics(tmp_path, name, dataset, top1):
    doc = {"model": "resnet20_cifar", "mode": "sact", "tau": 0.01, "top1": top1, "flops_mean": 4e7,
           "flops_std": 1e6, "stages": [{"ponder_cost_mean": 3.0, "ponder_cost_std": 0.5, "num_units_mean": 2.5}]}
    if dataset is not None:
        doc["dataset"] = dataset
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_plot_of_different_datasets_warns_and_draws_separate_curves(tmp_path, capsys):
    a = _metrics(tmp_path, "a", "cifar10", 0.9)
    b = _metrics(tmp_path, "b", "cluttered", 0.7)
    c = _metrics(tmp_path, "c", "cifar10", 0.85)
    assert main(["plot", str(a), str(b), str(c), "--out", str(tmp_path / "p")]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "datasets" in ln]
    assert len(err) == 1 and err[0].startswith("sact plot: warning: the files come from 2 datasets")
    assert f"cifar10: {a}, {c}" in err[0] and f"cluttered: {b}" in err[0]
    metrics = [load_metrics(p)[0] for p in (a, b, c)]
    assert sorted(curve_families(metrics)) == ["resnet20_cifar (sact, cifar10)", "resnet20_cifar (sact, cluttered)"]
    # one dataset: one curve, no warning
    assert sorted(curve_families([metrics[0], metrics[2]])) == ["resnet20_cifar (sact)"]
    assert main(["plot", str(a), str(c), "--out", str(tmp_path / "q")]) == 0
    assert "datasets" not in capsys.readouterr().err


def test_plot_takes_the_dataset_of_a_train_folder_from_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(
        {"top1": 0.5, "flops_mean": 4e7, "flops_std": 1e6, "stages": []}))  # what sact train writes: no model/dataset
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4), run / "model",
                         meta={"tau": 0.01, "config": {"dataset": "cifar10"}})
    other = _metrics(tmp_path, "b", None, 0.7)  # a file without a dataset counts as "unknown"
    assert main(["plot", str(run / "metrics.json"), str(other), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert f"cifar10: {run / 'metrics.json'}; unknown: {other}" in err


# --------------------------------------------------------------------------- sact eval without --out
def test_eval_without_out_writes_next_to_the_checkpoint(tmp_path, monkeypatch, capsys):
    fm = tiny_fashion_mnist(tmp_path / "fm")
    run = tmp_path / "run"
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), f"{run}/",
                         meta={"config": {"dataset": "cluttered", "eval_samples": 4,
                                          "clutter": {"canvas_size": 32, "num_clutter": 2}}})
    (run / "metrics.json").write_text('{"top1": 0.5}')  # the training's own metrics: never touched
    before = snapshot(run)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["eval", str(run), "--data-dir", str(fm), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "-> " + str(run / "model.eval.json") in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    metrics = json.loads((run / "model.eval.json").read_text())
    assert metrics["num_images"] == 4 and metrics["dataset"] == "cluttered"
    assert {k: v for k, v in snapshot(run).items() if k != "model.eval.json"} == before
    # a second evaluation does not replace the first without --overwrite
    assert main(args) == 2
    assert "model.eval.json already exists; pass --overwrite" in error_line(capsys.readouterr().err, "eval")
    # NAME.safetensors -> NAME.eval.json
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck")
    assert main(["eval", str(tmp_path / "ck.safetensors"), "--data-dir", str(fm), "--num-samples", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "ck.eval.json").is_file()


# --------------------------------------------------------------------------- import sact
def test_plain_import_resolves_sact_data():
    """docs/export.md uses ``sact.data.Preprocess`` after ``import sact`` (a fresh interpreter)."""
    code = ("import sact; p = sact.data.Preprocess(kind='unit', in_chans=1); "
            "print(type(p).__name__, sact.export.DEFAULT_OPSET)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Preprocess", "18"]
