"""Hostile checkpoint headers (issue 21, hostile 1 and 6): every size a header asks for is
bounded before anything is allocated, for every model family, and deeply nested JSON is a
corrupt checkpoint (exit 2), never an internal error."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sact
import sact.models.registry
from sact import CheckpointError
from sact.cli import main
from helpers import error_line


@pytest.fixture
def only_meta_builds(monkeypatch):
    """Fails a test that builds a model anywhere but on the meta device: a forged giant is
    never allocated, even by code that lacks the checks."""
    real = sact.models.registry.build_model  # every model is built through it

    def spy(name, **kwargs):
        if str(torch.get_default_device()) != "meta":
            raise AssertionError(f"model {name} {kwargs} built for real from a forged header")
        return real(name, **kwargs)

    monkeypatch.setattr(sact.models.registry, "build_model", spy)


def _rewrite_header(weights, change):
    """Replace entries of the sact document in the safetensors header (tensors and data hash kept)."""
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    doc = {**json.loads(meta["sact"]), **change}
    save_file(load_file(weights), weights, metadata={**meta, "sact": json.dumps(doc)})


@pytest.fixture
def detector_file(tmp_path):
    from sact.detection import build_detector, save_detector

    model = sact.create_model("resnet20_cifar", in_chans=1, base_channels=4)
    det = build_detector(model, num_classes=3, out_channels=16, min_size=32, max_size=32, representation_size=32)
    return save_detector(det, tmp_path / "det"), det.detector_config


@pytest.mark.parametrize("sizes, message", [
    ({"out_channels": 5000, "representation_size": 5000}, "parameters and buffers"),  # 1.9 G elements, 7.7 GB
    ({"out_channels": 10**9, "representation_size": 10**9}, "out_channels=1000000000"),
    ({"min_size": 10**5, "max_size": 10**5}, "min_size=100000 (at most 8192)"),  # each image resized to 100000 px
])
def test_forged_detector_sizes_exit_2_before_allocating(tmp_path, capsys, detector_file, only_meta_builds, sizes,
                                                         message):
    from sact.detection import load_detector

    weights, config = detector_file
    _rewrite_header(weights, {"detector": {**config, **sizes}})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_detector(weights)
    assert main(["detect", "eval", "--checkpoint", str(weights), "--val-images", str(tmp_path),
                 "--val-ann", str(tmp_path / "none.json"), "--device", "cpu"]) == 2
    assert message in error_line(capsys.readouterr().err, "detect eval")
    assert time.perf_counter() - start < 5


def test_a_legitimate_detector_still_loads(detector_file):
    from sact.detection import load_detector

    weights, config = detector_file
    assert load_detector(weights).detector_config == config


@pytest.fixture
def classifier_file(tmp_path):
    return sact.save_checkpoint(sact.create_model("resnet110_cifar", base_channels=2), tmp_path / "m")


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "sact", "base_channels": 10**6}, "base_channels=1000000 (expected an int in [2, 1024])"),
    ({"mode": "sact", "base_channels": 1024}, "parameters and buffers"),  # within the bounds, 7.3 G elements
])
def test_forged_classifier_sizes_exit_2_before_allocating(tmp_path, capsys, classifier_file, only_meta_builds, kwargs,
                                                          message):
    weights = classifier_file
    _rewrite_header(weights, {"model": {"name": "resnet110_cifar", "kwargs": kwargs}})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        sact.load_checkpoint(weights)
    with pytest.raises(CheckpointError, match=re.escape(message)):  # pretrained= reads the stored arguments
        sact.create_model("resnet110_cifar", pretrained=weights)
    assert main(["eval", str(weights), "--out", str(tmp_path / "metrics.json")]) == 2
    assert message in error_line(capsys.readouterr().err, "eval")


def test_detection_config_sizes_are_bounded_too(only_meta_builds):
    from sact.detection.task import detector_from_config
    from sact.engine import TrainConfig
    from sact.errors import InputError

    config = TrainConfig(task="detection", dataset="coco", model="resnet20_cifar", model_kwargs={"in_chans": 1},
                         fpn_channels=4096, representation_size=65536)  # each within the config's bounds
    with pytest.raises(InputError, match="parameters and buffers"):
        detector_from_config(config, num_classes=3, image_side=32, warm_start=False)


def _deep(depth: int) -> list:
    text = "[" * depth + "]" * depth
    return text


@pytest.mark.parametrize("depth", [100_000, 150])  # the decoder gives up; it decodes, later code would not
def test_deeply_nested_json_is_a_corrupt_checkpoint(tmp_path, capsys, detector_file, depth):
    from sact.detection import load_detector

    weights = sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4), tmp_path / "m")
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    deep_doc = meta["sact"][:-1] + f', "deep": {_deep(depth)}}}'  # the sact document, one entry nested deeply
    save_file(tensors, weights, metadata={"sact": deep_doc})
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        sact.load_checkpoint(weights)
    assert main(["eval", str(weights), "--out", str(tmp_path / "metrics.json")]) == 2
    assert "corrupt checkpoint" in error_line(capsys.readouterr().err, "eval")
    det, _ = detector_file
    save_file(load_file(det), det, metadata={"sact": deep_doc})
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_detector(det)
    # the sidecar of a file without a header, and the safetensors header itself
    save_file(tensors, weights)
    (tmp_path / "m.json").write_text(deep_doc)
    with pytest.raises(CheckpointError, match="not valid JSON: JSON nested more than 100 levels"):
        sact.load_checkpoint(weights)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "deep": "@"})
    header = header.replace('"@"', _deep(depth)).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="not a readable safetensors file: JSON nested more than 100 levels"):
        sact.load_checkpoint(weights)
