"""Checkpoint round trip and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

import sact
from sact.checkpoint import CheckpointError, read_checkpoint_meta


def _model(mode="sact"):
    return sact.create_model("resnet20_cifar", mode=mode, in_chans=1, base_channels=4, num_classes=3).eval()


def test_round_trip(tmp_path):
    m = _model()
    for p in m.parameters():
        p.data.normal_()
    path = sact.save_checkpoint(m, tmp_path / "ck", meta={"tau": 0.01, "metrics": {"top1": 0.5}})
    assert path.name == "ck.safetensors" and (tmp_path / "ck.json").exists()
    for ref in (tmp_path / "ck", path, tmp_path / "ck.json"):
        m2 = sact.load_checkpoint(ref)
        x = torch.randn(2, 1, 16, 16)
        assert torch.equal(m(x).logits, m2(x).logits)
        assert m2.checkpoint_meta["tau"] == 0.01 and not m2.training
    # the weights file alone is complete (the document is in its header)
    (tmp_path / "ck.json").unlink()
    assert read_checkpoint_meta(path)["model"]["name"] == "resnet20_cifar"
    assert sact.load_checkpoint(path).sact_config["kwargs"]["num_classes"] == 3


def test_folder_and_no_tmp_files_left(tmp_path):
    sact.save_checkpoint(_model(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert sact.load_checkpoint(tmp_path).mode == "sact"


def test_trailing_slash_means_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sact.save_checkpoint(_model(), "runs/new/")  # the folder does not exist yet
    assert path.resolve() == tmp_path / "runs" / "new" / "model.safetensors" and (tmp_path / "runs/new/model.json").is_file()
    assert not (tmp_path / "runs" / "new.safetensors").exists()
    assert sact.load_checkpoint("runs/new/").mode == "sact" and sact.load_checkpoint("runs/new").mode == "sact"
    # without the slash, a name that is not a folder stays a file prefix
    assert sact.save_checkpoint(_model(), "runs/other").name == "other.safetensors"


def test_device_keyword(tmp_path):
    sact.save_checkpoint(_model(), tmp_path / "ck")
    m = sact.load_checkpoint(tmp_path / "ck", device="cpu")
    assert next(m.parameters()).device == torch.device("cpu")
    assert sact.load_checkpoint(tmp_path / "ck", map_location=torch.device("cpu"), device="cpu").mode == "sact"
    with pytest.raises(ValueError, match="differ; pass one"):
        sact.load_checkpoint(tmp_path / "ck", map_location="meta", device="cpu")


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        sact.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="sact_config"):
        sact.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
    path = sact.save_checkpoint(_model(), tmp_path / "ck")
    # truncated weights
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError):
        sact.load_checkpoint(path)
    # flipped bytes inside the tensor data (header intact) are caught from the file alone
    path = sact.save_checkpoint(_model(), tmp_path / "ck")
    (tmp_path / "ck.json").unlink()
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        sact.load_checkpoint(path)
    path = sact.save_checkpoint(_model(), tmp_path / "ck")
    # a weights file from another save next to a stale sidecar
    other = sact.save_checkpoint(_model("act"), tmp_path / "other")
    path.write_bytes(other.read_bytes())
    m = sact.load_checkpoint(path)  # the header is authoritative
    assert m.mode == "act"
    # weights that do not fit the described model
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.json").write_text(json.dumps(
        {"format": "sact-checkpoint", "version": 1, "model": {"name": "resnet20_cifar", "kwargs": {}}, "meta": {}}))
    with pytest.raises(CheckpointError, match="does not fit model resnet20_cifar"):
        sact.load_checkpoint(tmp_path / "bad")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        sact.load_checkpoint(tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an sact checkpoint"):
        sact.load_checkpoint(tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps(
        {"format": "sact-checkpoint", "version": 1, "model": {"name": "resnet9", "kwargs": {}}, "meta": {}}))
    with pytest.raises(CheckpointError, match="unknown model 'resnet9'"):
        sact.load_checkpoint(tmp_path / "bad")


def test_trained_input_size_from_new_and_older_metas():
    from sact.checkpoint import trained_input_size

    assert trained_input_size({"input_size": [1, 64, 48]}) == (1, 64, 48)
    assert trained_input_size({"preprocess": {"kind": "inception", "in_chans": 3, "image_size": 224}}) == (3, 224, 224)
    assert trained_input_size({"config": {"dataset": "cluttered", "clutter": {"canvas_size": 48}}}) == (1, 48, 48)
    assert trained_input_size({"config": {"dataset": "cluttered"}}) == (1, 64, 64)  # the canvas default
    for meta in ({}, None, {"input_size": [0, 1, 1]}, {"input_size": "big"}, {"preprocess": {"kind": "unit"}}):
        assert trained_input_size(meta) is None
