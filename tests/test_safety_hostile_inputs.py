"""The remaining hostile inputs (issue 21, hostile 5 and 7): an ONNX opset the exporter
cannot write, sizes that would exhaust memory, `eval --tau nan`, empty `--out` folders
left by refused runs, and `convert-tf` errors behind TensorFlow's start-up lines. Each is
refused with one line and exit 2, before anything is allocated or written."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import sact
from sact.tools import export as E
from sact.cli import main
from sact.io.files import OutputLock

from helpers import error_line, tiny_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def ck(tmp_path):
    """A tiny greyscale checkpoint whose config evaluates 4 cluttered canvases."""
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck",
                         meta={"config": {"dataset": "cluttered", "eval_samples": 4,
                                          "clutter": {"canvas_size": 32, "num_clutter": 2}}})
    return tmp_path / "ck"


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("opset", ["1", "17", str(E.max_opset() + 1)])
def test_export_refuses_an_opset_it_cannot_write(tmp_path, capsys, ck, opset):
    out = tmp_path / "new" / "m.onnx"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out), "--opset", opset]) == 2
    line = error_line(capsys.readouterr().err, "export")
    assert f"opset must be an int from 18 to {E.max_opset()}" in line and line.endswith(f"got {opset}")
    assert not (tmp_path / "new").exists()


def test_export_never_writes_another_opset_than_asked(tmp_path, monkeypatch):
    """If the exporter falls back to another opset (it does, for a failed conversion), nothing is written."""
    import onnx

    def falls_back(*args, opset_version, **kwargs):  # what torch.onnx.export returns when a conversion fails
        proto = onnx.ModelProto()
        proto.opset_import.add(domain="", version=E.DEFAULT_OPSET)
        return SimpleNamespace(model_proto=proto)

    monkeypatch.setattr(torch.onnx, "export", falls_back)
    model = sact.create_model("resnet20_cifar", base_channels=4)
    with pytest.raises(RuntimeError, match=f"produced opset \\[18\\] instead of 19; nothing written"):
        E.export_model(model, tmp_path / "m.onnx", image_size=8, opset=19)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="got 'x'"):
        E.check_opset("x")
    assert E.check_opset(E.DEFAULT_OPSET) == 18


def test_export_image_size_is_bounded_before_allocating(tmp_path, capsys, ck):
    assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "m.onnx"), "--image-size", "100000"]) == 2
    assert f"--image-size must be from 1 to {E.MAX_IMAGE_SIZE}" in error_line(capsys.readouterr().err, "export")
    assert E.MAX_IMAGE_SIZE ** 2 <= sact.data.images.DEFAULT_MAX_PIXELS < (E.MAX_IMAGE_SIZE + 1) ** 2
    model = sact.create_model("resnet20_cifar", base_channels=4)
    with pytest.raises(ValueError, match=r"image_size must be an int from 1 to 6324 .*, got 100000"):
        E.export_model(model, tmp_path / "m.onnx", image_size=100000)
    model.checkpoint_meta = {"input_size": [3, 100000, 100000]}  # a forged training size is bounded too
    with pytest.raises(ValueError, match="got 100000"):
        E.export_program(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


# --------------------------------------------------------------------------- eval
@pytest.mark.parametrize("flags, message", [
    (["--tau", "nan"], "tau=nan (expected a finite number)"),
    (["--tau", "-1"], "tau=-1.0 (must be >= 0)"),
    (["--num-samples", "1000000000000"], "--num-samples 1000000000000: at most 10,000,000 images"),
    (["--num-samples", "1000000", "--batch-size", "1000000"], "--batch-size 1000000: a batch of 1x32x32 images takes"),
])
def test_eval_refuses_flags_train_would_refuse_or_that_exhaust_memory(tmp_path, capsys, ck, fmnist, flags, message):
    out = tmp_path / "new" / "m.json"
    assert main(["eval", str(ck), "--data-dir", str(fmnist), "--device", "cpu", "--out", str(out), *flags]) == 2
    assert message in error_line(capsys.readouterr().err, "eval")
    assert not (tmp_path / "new").exists()


def test_eval_refuses_a_checkpoints_huge_eval_samples(tmp_path, capsys, fmnist):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck",
                         meta={"config": {"dataset": "cluttered", "eval_samples": 10**12}})
    assert main(["eval", str(tmp_path / "ck"), "--data-dir", str(fmnist), "--out", str(tmp_path / "m.json")]) == 2
    assert "its eval_samples 1000000000000 (pass --num-samples)" in error_line(capsys.readouterr().err, "eval")


# --------------------------------------------------------------------------- no empty --out folder
def test_the_lock_removes_only_the_folders_it_created_and_left_empty(tmp_path):
    # (prepare_outputs, which every command uses, is tested in tests/test_io_files.py)
    with OutputLock(tmp_path / "e" / "f", "train"):
        assert (tmp_path / "e" / "f" / ".sact-train.lock").is_file()
    assert not (tmp_path / "e").exists()
    with OutputLock(tmp_path / "g", "train"):
        (tmp_path / "g" / "model.json").write_text("{}")
    assert (tmp_path / "g" / "model.json").is_file()


def test_refused_runs_leave_no_out_folder(tmp_path, capsys, ck, fmnist):
    missing = str(tmp_path / "no-such-data")
    runs = {
        "train": ["train", "--dataset", "folder", "--data-dir", missing, "--device", "cpu", "--out",
                  str(tmp_path / "o1" / "run")],
        "eval": ["eval", "--watch", str(tmp_path), "--dataset", "folder", "--data-dir", missing, "--out",
                 str(tmp_path / "o2"), "--poll", "0.05", "--watch-timeout", "5"],  # fails at the checkpoint
        "export": ["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o3" / "m.onnx")],
        "ponder-map": ["ponder-map", str(tmp_path), "--checkpoint", str(tmp_path / "nope"), "--out",
                       str(tmp_path / "o4")],
    }
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "ck.safetensors").read_bytes())
    (tmp_path / "model.json").write_bytes((tmp_path / "ck.json").read_bytes())
    for command, args in runs.items():
        assert main(args) == 2, command
        error_line(capsys.readouterr().err, command)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


# --------------------------------------------------------------------------- convert-tf
# A fresh process: TensorFlow writes its start-up lines at process level. It prints the exit
# status and whether TensorFlow was imported.
_CHILD = "import sys; from sact.cli import main; rc = main(sys.argv[1:]); print(rc, 'tensorflow' in sys.modules)"


def _sact(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet20_cifar"], "no TensorFlow checkpoint at"),
    (["--model", "resnet50"], "convert-tf supports the reference layouts"),
    (["--model", "resnet20_cifar", "--tau", "nan"], "tau must be a finite number >= 0, got nan"),
])
def test_convert_tf_checks_its_arguments_before_importing_tensorflow(tmp_path, flags, message):
    done = _sact("convert-tf", str(tmp_path / "missing"), "--mode", "sact", "--out", str(tmp_path / "out"), *flags)
    assert done.stdout.split() == ["2", "False"]
    assert message in error_line(done.stderr, "convert-tf")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow-cpu")
def test_convert_tf_error_after_tensorflow_is_one_line(tmp_path):
    (tmp_path / "bad.index").write_bytes(b"not an sstable")
    done = _sact("convert-tf", str(tmp_path / "bad"), "--model", "resnet20_cifar", "--mode", "sact",
                 "--out", str(tmp_path / "out"))
    assert done.stdout.split() == ["2", "True"]  # no start-up lines before the error
    assert "is not a readable TensorFlow checkpoint" in error_line(done.stderr, "convert-tf")
