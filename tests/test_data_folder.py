"""Your own images: ``--dataset folder`` (any Pillow format, train/val or a seeded split),
preprocessing chosen to match the initial weights and stored in the checkpoint, the flags
of ``sact train`` and their validation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sact
from sact.cli import main
from sact.data import IMAGENET_MEAN, Preprocess, class_folder_splits, split_by_class
from sact.data.folder import ImageFolderDataset
from sact.engine import TrainConfig
from sact.classification.data import build_datasets, folder_preprocess
from sact.errors import DataError, InputError

from helpers import error_line

torch.set_num_threads(1)
FORMATS = (".png", ".jpg", ".bmp", ".tiff", ".webp", ".gif")  # torchvision's ImageFolder misses none of these...
ODD = (".ppm", ".tga", ".pcx")  # ... but these it skips (not in its list); Pillow reads them


def _write(folder, n, seed, exts=FORMATS + ODD):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8)).save(folder / f"im{i}{exts[i % len(exts)]}")


@pytest.fixture
def tree(tmp_path):
    """One class-folder tree (no train/ or val/): classes of 9, 9 and 5 images, plus noise."""
    root = tmp_path / "pets"
    for k, (name, n) in enumerate((("cat", 9), ("dog", 9), ("eel", 5))):
        _write(root / name, n, k)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes((root / "dog" / "im0.png").read_bytes())
    (root / ".cache").mkdir()
    return root


def test_formats_and_seeded_split(tree):
    with pytest.raises(DataError, match="--val-fraction"):
        class_folder_splits(tree)
    classes, train, val = class_folder_splits(tree, val_fraction=0.25, seed=3)
    assert classes == ["cat", "dog", "eel"]
    assert len(train) + len(val) == 23 and not {p for p, _ in train} & {p for p, _ in val}
    assert {p.rsplit(".", 1)[1] for p, _ in train + val} == {e[1:] for e in FORMATS + ODD}
    per_class = [sum(label == k for _, label in val) for k in range(3)]
    assert per_class == [2, 2, 1]  # round(0.25 n), at least one per class
    assert class_folder_splits(tree, val_fraction=0.25, seed=3) == (classes, train, val)  # fixed by the seed
    assert class_folder_splits(tree, val_fraction=0.25, seed=4)[2] != val
    # the split depends on the files, not on the order they are listed in
    assert split_by_class(list(reversed(train + val)), 0.25, 3)[1] == list(reversed(val))
    with pytest.raises(ValueError, match="1.5"):
        split_by_class(train, 1.5, 0)


def test_train_val_layout(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        _write(tmp_path / split / "a", n, 0)
        _write(tmp_path / split / "b", n, 1)
    _write(tmp_path / "train" / "c", 3, 2)  # a class without validation images is fine
    classes, train, val = class_folder_splits(tmp_path)
    assert classes == ["a", "b", "c"] and len(train) == 11 and sorted({c for _, c in val}) == [0, 1]
    with pytest.raises(DataError, match="drop it"):
        class_folder_splits(tmp_path, val_fraction=0.1)
    _write(tmp_path / "val" / "zebra", 1, 3)
    with pytest.raises(DataError, match="zebra"):
        class_folder_splits(tmp_path)
    with pytest.raises(DataError, match="train/<class>/ and val/<class>/"):
        class_folder_splits(tmp_path / "train", require_split_folders=True)


def test_items_any_mode_and_unreadable(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    deep = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")  # 16-bit greyscale
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8)).save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    samples = [(str(folder / n), 0) for n in ("deep.png", "rgba.png", "broken.png")]
    ds = ImageFolderDataset(samples, ["x"], transform=Preprocess(kind="unit", in_chans=1), label_offset=1)
    image, label = ds[0]
    assert label == 1 and image.shape == (1, 16, 16)
    np.testing.assert_allclose(image[0].numpy(), deep / 65535.0, atol=1e-6)  # scaled, not clipped at 255
    assert ds[1][0].shape == (1, 16, 16)
    with pytest.warns(UserWarning, match="broken.png"):
        assert ds[2] is None
    strict = ImageFolderDataset(samples, ["x"], transform=Preprocess(kind="unit", in_chans=1), strict=True)
    with pytest.raises(DataError, match="broken.png"):
        strict[2]


def test_preprocess_follows_the_initial_weights(tmp_path):
    def pre(**kw):
        return folder_preprocess(TrainConfig(dataset="folder", data_dir="d", val_fraction=0.1, image_size=96, **kw))

    p, why = pre()
    assert (p.kind, p.image_size, p.central_crop) == ("inception", 96, 0.875) and "default" in why
    p, why = pre(init="resnet50-0676ba61.pth")  # torchvision weights: torchvision's mean/std
    assert p.kind == "normalize" and p.mean == IMAGENET_MEAN and p.resize == "shorter" and "torchvision" in why
    # a converted reference checkpoint stores Inception [-1, 1]: fine-tuning keeps it
    model = sact.create_model("resnet20_cifar", base_channels=4)
    sact.save_checkpoint(model, tmp_path / "ref", meta={"preprocess": sact.data.imagenet_preprocess(224).to_dict()})
    p, why = pre(init=str(tmp_path / "ref"))
    assert (p.kind, p.image_size) == ("inception", 96) and "ref" in why
    sact.save_checkpoint(model, tmp_path / "tv", meta={"preprocess": sact.data.torchvision_preprocess(224).to_dict()})
    assert pre(init=str(tmp_path / "tv"))[0].kind == "normalize"
    assert pre(init="resnet50.pth", preprocess="inception")[0].kind == "inception"  # an explicit choice wins
    with pytest.raises(InputError, match="3 input channels"):
        folder_preprocess(TrainConfig(dataset="folder", preprocess="torchvision"), in_chans=1)


def test_eval_samples_default_and_subset(tree):
    cfg = TrainConfig(model="resnet20_cifar", dataset="cluttered")
    assert cfg.eval_samples is None and len(build_datasets(cfg, train=False).eval) == 2000
    cfg = TrainConfig(dataset="folder", data_dir=str(tree), val_fraction=0.5, eval_samples=4, image_size=16)
    ev = build_datasets(cfg, train=False).eval
    again = build_datasets(cfg, train=False).eval
    assert len(ev) == 4 and ev.indices == again.indices


def test_older_runs_resume_without_the_new_fields():
    saved = TrainConfig().to_dict()
    for key in ("val_fraction", "preprocess", "num_classes"):
        saved.pop(key)
    assert TrainConfig().differences(saved) == []
    assert TrainConfig(num_classes=5).differences(saved) == ["num_classes: None -> 5"]


_SMALL = ["--model", "resnet20_cifar", "--set", "model_kwargs={base_channels: 4}", "--steps", "2", "--batch-size", "4",
          "--device", "cpu", "--no-tensorboard", "--no-progress", "--image-size", "16"]


def test_train_on_a_folder_then_eval_with_the_stored_preprocessing(tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(tree), "--val-fraction", "0.25",
                 "--preprocess", "torchvision", "--halting-lr-mult", "5", "--out", str(out), *_SMALL]) == 0
    model = sact.load_checkpoint(out)
    meta = model.checkpoint_meta
    assert meta["classes"] == ["cat", "dog", "eel"] and model.sact_config["kwargs"]["num_classes"] == 3
    assert meta["input_size"] == [3, 16, 16] and meta["config"]["halting_lr_mult"] == 5.0
    pre = Preprocess.from_dict(meta["preprocess"])
    assert pre.kind == "normalize" and pre.image_size == 16
    assert "num_units_hist" in json.loads((out / "metrics.json").read_text())["stages"][0]
    # sact eval: the same held-out images, preprocessed as training did (checked by hand)
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(tree), "--out", str(tmp_path / "m.json"), "--device", "cpu",
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    _, _, val = class_folder_splits(tree, val_fraction=0.25, seed=0)
    images = torch.stack([pre(Image.open(p).convert("RGB")) for p, _ in val])
    labels = torch.tensor([label for _, label in val])
    with torch.no_grad():
        logits = model(images).logits
    assert metrics["num_images"] == len(val) == 5
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    assert [len(s["num_units_hist"]) for s in metrics["stages"]] == [3, 3, 3]
    from sact.tools.export import default_image_size

    assert default_image_size(model) == 16  # sact export's default: the size it was trained at


def test_num_classes_and_label_offset(tree, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(tree), "--val-fraction", "0.25", "--label-offset",
                 "1", "--out", str(out), *_SMALL]) == 0
    assert sact.load_checkpoint(out).sact_config["kwargs"]["num_classes"] == 4  # 3 classes + the offset
    assert main(["train", "--dataset", "folder", "--data-dir", str(tree), "--val-fraction", "0.25", "--num-classes",
                 "7", "--out", str(out), "--overwrite", *_SMALL]) == 0
    assert sact.load_checkpoint(out).sact_config["kwargs"]["num_classes"] == 7


@pytest.mark.parametrize("flags,match", [
    (["--dataset", "nope"], "one of cluttered, cifar10, imagenet, folder"),
    (["--dataset", "folder"], "needs a data folder"),
    (["--dataset", "folder", "--data-dir", "{tree}"], "--val-fraction"),
    (["--dataset", "folder", "--data-dir", "{tree}", "--val-fraction", "1.5"], "val_fraction=1.5"),
    (["--val-fraction", "0.2"], "only dataset folder is split"),
    (["--preprocess", "tf"], "one of auto, dataset, inception, torchvision"),
    (["--preprocess", "torchvision"], "has its own preprocessing"),
    (["--num-classes", "0"], "num_classes=0"),
    (["--dataset", "folder", "--data-dir", "{tree}", "--val-fraction", "0.2", "--num-classes", "2"], "too small"),
    (["--eval-samples", "0"], "eval_samples=0"),
    (["--image-size", "0"], "image_size=0"),
    (["--halting-lr-mult", "0"], "halting_lr_mult=0"),
    (["--num-classes", "3", "--set", "model_kwargs={num_classes: 4}"], "differ"),
])
def test_bad_flags_are_one_line_exit_2(flags, match, tree, tmp_path, capsys):
    flags = [f.replace("{tree}", str(tree)) for f in flags]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *flags, "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    assert code == 2
    assert match in error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_eval_flags_are_checked(tree, tmp_path, capsys):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4), tmp_path / "ck",
                         meta={"config": {"dataset": "folder", "val_fraction": 0.25, "image_size": 16}})
    base = ["eval", str(tmp_path / "ck"), "--data-dir", str(tree), "--out", str(tmp_path / "m.json"), "--no-progress"]
    for flags, match in ((["--val-fraction", "2"], "val_fraction=2"), (["--eval-samples", "0"], "eval_samples=0")):
        assert main([*base, *flags]) == 2
        assert match in error_line(capsys.readouterr().err, "eval")
    # without stored preprocessing, the folder's images get the dataset's default at the trained size
    assert main([*base, "--eval-samples", "3"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 3


def test_builtin_datasets_keep_their_preprocessing_and_say_so(tmp_path):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck",
                         meta={"preprocess": sact.data.imagenet_preprocess(64).to_dict()})
    cfg = TrainConfig(model="resnet20_cifar", dataset="cluttered", init=str(tmp_path / "ck"), train_samples=8)
    with pytest.warns(UserWarning, match="keeps its own preprocessing"):
        spec = build_datasets(cfg)
    assert spec.preprocess["kind"] == "unit" and spec.preprocess["image_size"] == 64 and spec.input_size == (1, 64, 64)


def test_eval_refuses_data_with_more_classes_than_the_model(tree, tmp_path, capsys):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, num_classes=2), tmp_path / "ck",
                         meta={"config": {"dataset": "folder", "val_fraction": 0.25, "image_size": 16}})
    assert main(["eval", str(tmp_path / "ck"), "--data-dir", str(tree), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 2
    assert "3 classes (labels up to 2) but the model" in error_line(capsys.readouterr().err, "eval")
