"""The shipped recipes in configs/: they load, and the two ImageNet paths feed each set of
initial weights what it expects (torchvision mean/std; the reference's Inception [-1, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sact
from sact.cli import main
from sact.data import IMAGENET_MEAN
from sact.engine import load_config
from sact.classification.data import folder_preprocess

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
torch.set_num_threads(1)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(path)
    # the task's own data: COCO-format detection data, or a classification dataset with real labels
    expected = ("coco",) if config.task == "detection" else ("cifar10", "imagenet")
    assert config.dataset in expected


def test_torchvision_path_uses_torchvision_mean_std():
    cfg = load_config(CONFIGS / "imagenet_resnet101_sact_torchvision.yaml")
    assert (cfg.model, cfg.mode, cfg.tau, cfg.label_offset) == ("resnet101", "sact", 0.005, 0)
    pre, _ = folder_preprocess(cfg)
    assert pre.kind == "normalize" and pre.mean == IMAGENET_MEAN and pre.resize == "shorter"
    assert folder_preprocess(cfg.replace(preprocess="auto"))[0] == pre  # the .pth init picks it too


def test_reference_path_trains_from_a_converted_v2_checkpoint(tmp_path):
    cfg = load_config(CONFIGS / "imagenet_resnet101_v2_sact_reference.yaml")
    assert (cfg.model, cfg.mode, cfg.tau, cfg.label_offset, cfg.num_classes) == ("resnet101_v2", "sact", 0.005, 1, 1001)
    assert cfg.schedule == "staircase" and cfg.lr == 0.05 and cfg.batch_size == 32 and cfg.label_smoothing == 0.1
    assert folder_preprocess(cfg)[0].kind == "inception"
    # the same recipe at toy size: a vanilla v2 checkpoint saved as `sact convert-tf` saves it
    # (1001 classes, Inception preprocessing), a 2-class train/val folder, one step
    init = tmp_path / "imagenet_101"
    vanilla = sact.create_model("resnet50_v2", mode="vanilla", base_width=4, stem_width=8)
    sact.save_checkpoint(vanilla, f"{init}/", meta={"preprocess": sact.data.imagenet_preprocess().to_dict(),
                                                    "label_offset": 1})
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / "in" / split / wnid).mkdir(parents=True)
            for j in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "in" / split / wnid / f"{j}.JPEG")
    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "imagenet_resnet101_v2_sact_reference.yaml"), "--model",
                 "resnet50_v2", "--set", "model_kwargs={base_width: 4, stem_width: 8}", "--set", "preprocess=auto",
                 "--data-dir", str(tmp_path / "in"), "--init", str(init), "--out", str(out), "--image-size", "32",
                 "--steps", "1", "--epochs", "0", "--batch-size", "2", "--lr", "1e-6", "--workers", "0", "--device", "cpu",
                 "--no-tensorboard", "--no-progress", "--set", "amp=none"]) == 0
    model = sact.load_checkpoint(out)
    meta = model.checkpoint_meta
    assert model.mode == "sact" and model.sact_config["kwargs"]["num_classes"] == 1001
    assert meta["preprocess"]["kind"] == "inception" and meta["preprocess"]["image_size"] == 32
    assert meta["config"]["label_offset"] == 1 and meta["input_size"] == [3, 32, 32]
    # warm-started: the backbone is the vanilla checkpoint's after one step at a tiny learning rate
    assert meta["config"]["init"] == str(init)
    for name, weight in vanilla.state_dict().items():
        if weight.is_floating_point() and "running" not in name:
            torch.testing.assert_close(model.state_dict()[name], weight, atol=1e-2, rtol=0)
