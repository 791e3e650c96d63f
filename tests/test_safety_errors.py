"""Every bad input gets one clear line and the documented exit code, never a traceback
(issue 18, items 9-10 and the minor ones): config types, checkpoint headers, folder
datasets with unreadable or huge images, a mistyped data folder, COCO paths, devices,
TF garbage, unknown flags, internal errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sact
import sact.data
from sact.cli import main
from helpers import error_line, tiny_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.mark.parametrize("text, field, value", [
    ("steps: 1e3", "steps", "1000.0"),
    ("steps: 10.5", "steps", "10.5"),
    ("lr: true", "lr", "True"),
    ('lr: "abc"', "lr", "'abc'"),
    ("boundaries: 0.5", "boundaries", "0.5"),
    ("batch_size: 2.5", "batch_size", "2.5"),
])
def test_config_values_of_the_wrong_type(tmp_path, capsys, text, field, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert f"{field}={value} (expected " in line


def test_all_bad_fields_are_reported_at_once(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 10.5\nlr: true\nboundaries: 0.5\nbatch_size: 2.5\ntau: -1\nlr_typo: 3\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    assert "lr_typo" in error_line(capsys.readouterr().err, "train")  # unknown keys first
    cfg.write_text("steps: 10.5\nlr: true\nboundaries: 0.5\nbatch_size: 2.5\ntau: -1\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    for part in ("steps=10.5 (expected an int)", "lr=True (expected a finite number)",
                 "boundaries=0.5 (expected a list", "batch_size=2.5 (expected an int)", "tau=-1.0 (must be >= 0)"):
        assert part in line, part
    # YAML 1.2 numbers: 1e-3 is a float, as users write it
    cfg.write_text("lr: 1e-3\nsteps: 5\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 0
    assert "lr: 0.001" in capsys.readouterr().out
    assert main(["train", "--set", "model_kwargs={base_channels: 8192}", "--print-config"]) == 2
    assert "base_channels=8192" in error_line(capsys.readouterr().err, "train")


def _forge(path, model, *, kwargs=None, name=None):
    """Rewrite a saved checkpoint's header to ask for another model (hashes kept consistent)."""
    import hashlib

    from safetensors.torch import load_file, save

    weights = sact.save_checkpoint(model, path)
    sidecar = weights.with_suffix(".json")
    doc = json.loads(sidecar.read_text())
    if kwargs is not None:
        doc["model"]["kwargs"] = kwargs
    if name is not None:
        doc["model"]["name"] = name
    header = {k: doc[k] for k in ("format", "version", "model", "meta", "data_sha256")}
    blob = save(load_file(weights), metadata={"sact": json.dumps(header, sort_keys=True)})
    weights.write_bytes(blob)
    sidecar.write_text(json.dumps({**header, "weights_sha256": hashlib.sha256(blob).hexdigest()}))


def test_forged_headers_are_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    import sact.models.registry

    built = []
    real = sact.models.registry.build_model  # every model is built through it

    def spy(name, **kwargs):
        device = str(torch.get_default_device())
        built.append((name, kwargs, device))
        if device != "meta":  # (never build a forged giant for real, even in a failing run)
            raise AssertionError(f"model {name} {kwargs} built for real before validation")
        return real(name, **kwargs)

    small = sact.create_model("resnet20_cifar", base_channels=4)
    monkeypatch.setattr(sact.models.registry, "build_model", spy)
    cases = [
        ({"mode": "sact", "base_channels": 8192}, None, "base_channels=8192 (expected an int in [2, 1024])"),
        ({"mode": "sact", "num_classes": "10"}, None, "num_classes='10' (expected an int"),
        ({"mode": "sact", "eps": 5.0}, None, "eps=5.0"),
        ({"mode": "turbo"}, None, "mode='turbo'"),
        ({"mode": "sact", "layers": [100]}, None, "layers"),
        ({"mode": "sact"}, "resnet9000", "unknown model 'resnet9000'"),
    ]
    for i, (kwargs, name, message) in enumerate(cases):
        _forge(tmp_path / f"f{i}", small, kwargs=kwargs, name=name)
        with pytest.raises(sact.CheckpointError, match=re.escape(message)):
            sact.load_checkpoint(tmp_path / f"f{i}")
    assert built == [], "a model was built from a header that was never validated"
    # valid arguments, tensors of another architecture: found from the header, on the meta device only
    _forge(tmp_path / "wide", small, kwargs={"mode": "sact", "base_channels": 16})
    with pytest.raises(sact.CheckpointError, match="does not fit model resnet20_cifar.*wrong dtype/shape"):
        sact.load_checkpoint(tmp_path / "wide")
    assert built and all(device == "meta" for _, _, device in built)


def test_eval_of_a_forged_checkpoint_exits_2(tmp_path, capsys):
    _forge(tmp_path / "f", sact.create_model("resnet20_cifar", base_channels=4), kwargs={"in_chans": 100})
    assert main(["eval", str(tmp_path / "f"), "--out", str(tmp_path / "m.json")]) == 2
    assert "in_chans=100 (expected an int in [1, 64])" in error_line(capsys.readouterr().err, "eval")


def _imagenet_folder(root, corrupt=(), huge=()):
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(("n01", "n02")):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{j}.JPEG")
    for rel in corrupt:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 3])  # truncated JPEG
    for rel in huge:
        Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(root / rel, format="JPEG")
    return root


@pytest.fixture
def imagenet_checkpoint(tmp_path):
    model = sact.create_model("resnet20_cifar", base_channels=4, num_classes=2)
    sact.save_checkpoint(model, tmp_path / "ck", meta={"config": {"dataset": "imagenet", "image_size": 32}})
    return tmp_path / "ck"


def test_unreadable_images_are_skipped_with_their_names_or_stop_under_strict(tmp_path, capsys, imagenet_checkpoint):
    root = _imagenet_folder(tmp_path / "inet", corrupt=["val/n01/1.JPEG"], huge=["val/n02/2.JPEG"])
    args = ["eval", str(imagenet_checkpoint), "--data-dir", str(root), "--no-progress", "--max-pixels", "100000"]
    assert main([*args, "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(root / "val" / "n01" / "1.JPEG") in err
    assert str(root / "val" / "n02" / "2.JPEG") in err and "--max-pixels 120000" in err
    assert "2 unreadable image(s) were skipped" in err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 4 and metrics["skipped_images"] == 2
    assert main([*args, "--out", str(tmp_path / "s.json"), "--strict"]) == 2
    line = error_line(capsys.readouterr().err, "eval")
    assert str(root / "val" / "n01" / "1.JPEG") in line and not (tmp_path / "s.json").exists()


def test_training_on_a_folder_with_a_corrupt_image_finishes(tmp_path, capsys):
    root = _imagenet_folder(tmp_path / "inet", corrupt=["val/n02/0.JPEG"])
    import shutil

    shutil.copytree(root / "val", root / "train")
    rc = main(["train", "--dataset", "imagenet", "--data-dir", str(root), "--out", str(tmp_path / "run"),
               "--model", "resnet20_cifar", "--set", "model_kwargs={base_channels: 4}", "--set", "image_size=32",
               "--steps", "2", "--batch-size", "3", "--device", "cpu", "--no-tensorboard", "--set", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err and str(root / "train" / "n02" / "0.JPEG") in err


def test_pixel_cap_for_ponder_maps(tmp_path, capsys):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4), tmp_path / "ck")
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "big.png")
    rc = main(["ponder-map", str(tmp_path / "big.png"), "--checkpoint", str(tmp_path / "ck"), "--out",
               str(tmp_path / "o"), "--device", "cpu", "--max-pixels", "50000"])
    err = capsys.readouterr().err
    assert rc == 1 and "200 = 60,000 pixels, above the cap of 50,000" in err and "--max-pixels 60000" in err
    assert main(["ponder-map", str(tmp_path / "big.png"), "--checkpoint", str(tmp_path / "ck"), "--out",
                 str(tmp_path / "o2"), "--device", "cpu", "--max-pixels", "60000"]) == 0


def test_a_mistyped_data_dir_is_an_error(tmp_path, capsys, fmnist):
    config = {"dataset": "cluttered", "eval_samples": 4, "clutter": {"canvas_size": 32, "num_clutter": 2}}
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck",
                         meta={"config": config})
    typo = str(fmnist) + "_typo"
    assert main(["eval", str(tmp_path / "ck"), "--data-dir", typo, "--out", str(tmp_path / "m.json")]) == 2
    line = error_line(capsys.readouterr().err, "eval")
    assert typo in line and "does not exist" in line and not (tmp_path / "m.json").exists()


def test_coco_file_names_may_not_leave_the_image_folder(tmp_path):
    from sact.detection.coco import CocoFormatError, load_coco_json

    for bad in ("../secret.png", "/etc/passwd", "a/../../b.png", "C:\\x.png", ""):
        doc = {"images": [{"id": 1, "file_name": bad, "width": 4, "height": 4}], "annotations": [],
               "categories": [{"id": 1}]}
        (tmp_path / "a.json").write_text(json.dumps(doc))
        with pytest.raises(CocoFormatError, match="file_name"):
            load_coco_json(tmp_path / "a.json")
    doc["images"][0]["file_name"] = "sub/ok.png"
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert load_coco_json(tmp_path / "a.json")["images"][0]["file_name"] == "sub/ok.png"


def test_bogus_device_exits_2(tmp_path, capsys, fmnist):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", base_channels=4, in_chans=1), tmp_path / "ck")
    assert main(["eval", str(tmp_path / "ck"), "--data-dir", str(fmnist), "--out", str(tmp_path / "m.json"),
                 "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in error_line(capsys.readouterr().err, "eval")
    assert main(["train", "--device", "bogus", "--print-config"]) == 2
    assert "device='bogus'" in error_line(capsys.readouterr().err, "train")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    assert main(["ponder-map", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "ck"), "--out",
                 str(tmp_path / "o"), "--device", "cuda:99"]) == 2
    error_line(capsys.readouterr().err, "ponder-map")


def test_convert_tf_on_garbage(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    (tmp_path / "model.ckpt.index").write_bytes(b"garbage" * 10)
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"garbage")
    rc = main(["convert-tf", str(tmp_path / "model.ckpt"), "--model", "resnet20_cifar", "--mode", "sact",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("sact convert-tf: ")]  # TF logs its own start-up lines
    assert rc == 2 and len(line) == 1 and "not a readable TensorFlow checkpoint" in line[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_flag_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "ck", "--bogus-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: sact eval" in err and "unrecognized arguments: --bogus-flag" in err
    with pytest.raises(SystemExit) as e:
        main(["detect", "train", "--out", "x", "--bogus-flag"])
    assert e.value.code == 2 and "usage: sact detect train" in capsys.readouterr().err


def test_internal_errors_are_one_line_with_a_debug_hint(monkeypatch, capsys, tmp_path):
    import sact.commands.models as models

    def broken(args):
        raise KeyError("bug")

    monkeypatch.setattr(models, "run", broken)
    monkeypatch.delenv("SACT_DEBUG", raising=False)
    assert main(["models"]) == 1
    line = error_line(capsys.readouterr().err, "models")
    assert "internal error" in line and "SACT_DEBUG=1" in line
    monkeypatch.setenv("SACT_DEBUG", "1")
    with pytest.raises(KeyError, match="bug"):
        main(["models"])


def test_exit_codes_of_the_error_classes():
    from sact.cli import exit_code
    from sact.engine import NonFiniteLossError
    from sact.errors import DataError, InputError, RunFailure

    assert [exit_code(e) for e in (InputError("x"), DataError("x"), sact.CheckpointError("x"), ValueError("x"),
                                   FileNotFoundError("x"))] == [2] * 5
    assert [exit_code(e) for e in (RunFailure("x"), NonFiniteLossError("x"), RuntimeError("x"))] == [1] * 3


def test_forged_detector_headers_are_refused_before_building(tmp_path):
    from safetensors.torch import load_file, save_file

    from sact.detection import build_detector, load_detector, save_detector

    model = sact.create_model("resnet20_cifar", in_chans=1, base_channels=4)
    det = build_detector(model, num_classes=3, out_channels=16, min_size=64, max_size=64, representation_size=32)
    weights = save_detector(det, tmp_path / "det")
    assert load_detector(tmp_path / "det").detector_config == det.detector_config
    tensors = load_file(weights)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    # (values small enough that code without these checks fails cheaply instead of allocating)
    for change, message in (({"model": {"name": "resnet20_cifar", "kwargs": {"in_chans": 100}}}, "in_chans=100"),
                            ({"detector": {**det.detector_config, "out_channels": {"a": 1}}}, "out_channels=")):
        doc = {**json.loads(meta["sact"]), **change}
        save_file(tensors, weights, metadata={**meta, "sact": json.dumps(doc)})
        with pytest.raises(sact.CheckpointError, match=message):
            load_detector(tmp_path / "det")
