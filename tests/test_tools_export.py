"""export_model / load_exported / ``sact export``: files, metadata, CLI and errors."""

from __future__ import annotations

import json

import pytest
import torch

import sact
from sact.cli import main
from sact.tools.export import default_image_size, export_model, load_exported, metadata_path
from test_tools_export_torch import check_matches, tiny_model

PREPROCESS = {"kind": "unit", "in_chans": 3, "image_size": 16, "central_crop": None, "mean": None, "std": None}


def test_pt2_file_roundtrip_and_metadata(tmp_path):
    model, size = tiny_model("resnet20_cifar", "sact")
    model.checkpoint_meta = {"preprocess": PREPROCESS, "classes": [str(i) for i in range(10)], "tau": 0.01}
    model.train()
    path = export_model(model, tmp_path / "m.pt2", format="torch-export", example_input=torch.randn(1, 3, size, size))
    assert model.training  # the training flag is restored
    model.eval()
    run, doc = load_exported(path, trusted=True)  # a file this test made
    assert doc == json.loads(metadata_path(path).read_text())
    assert metadata_path(path).name == "m.pt2.json"  # never NAME.json, a checkpoint sidecar's name
    assert doc["model"] == {"name": "resnet20_cifar", "kwargs": {"mode": "sact", "base_channels": 4}}
    assert doc["mode"] == "sact" and doc["input_size"] == [3, size, size] and doc["export_format"] == "torch-export"
    assert doc["preprocess"] == PREPROCESS and doc["tau"] == 0.01 and len(doc["classes"]) == 10
    check_matches(model, run, size)


def test_default_image_size():
    model, _ = tiny_model("resnet20_cifar", "act")
    assert default_image_size(model) == 32
    model.checkpoint_meta = {"preprocess": PREPROCESS}
    assert default_image_size(model) == 16
    assert default_image_size(sact.create_model("resnet50", mode="vanilla", base_width=8)) == 224


def test_export_model_rejects_bad_arguments(tmp_path):
    model, _ = tiny_model("resnet20_cifar", "sact")
    with pytest.raises(ValueError, match="'tflite'"):
        export_model(model, tmp_path / "m", format="tflite")
    with pytest.raises(ValueError, match="-3"):
        export_model(model, tmp_path / "m.pt2", format="torch-export", image_size=-3)
    with pytest.raises(ValueError, match=r"\(3, 16\)"):
        export_model(model, tmp_path / "m.pt2", format="torch-export", example_input=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="contradicts"):
        export_model(model, tmp_path / "m.pt2", format="torch-export", example_input=torch.zeros(1, 3, 8, 8),
                     image_size=16)
    with pytest.raises(ValueError, match="sact_config"):
        export_model(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.pt2", format="torch-export", image_size=8)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_end_to_end(tmp_path, capsys):
    model, size = tiny_model("resnet20_cifar", "act")
    sact.save_checkpoint(model, tmp_path / "ckpt", meta={"preprocess": PREPROCESS, "tau": 0.005})
    out = tmp_path / "deploy" / "model.pt2"
    # no --format (from the suffix), no --image-size (from the checkpoint's preprocessing)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "verify batch 3" in printed
    run, doc = load_exported(out, trusted=True)
    assert doc["input_size"] == [3, size, size] and doc["tau"] == 0.005 and doc["mode"] == "act"
    check_matches(sact.load_checkpoint(tmp_path / "ckpt"), run, size)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", "x", "--format", "tflite", "--out", str(tmp_path / "m.onnx")])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and str(missing) in err
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "m.bin")]) == 2
    assert "--format" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
