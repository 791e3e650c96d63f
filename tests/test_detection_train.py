"""Detection training on the one engine and the CLI: the loss falls, tau reaches the halting
branches, checkpoints, exact resume, non-finite losses, torchrun."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

import sact
from sact.cli import main
from sact.detection import (CocoDetection, build_detector, collate, detection_loss, evaluate, load_detector,
                            save_detector)
from sact.engine import NonFiniteLossError, TrainConfig
from sact.engine import main as train_main
from sact.engine.state import STATE_FILE, load_train_state
from test_detection_coco import write_synthetic_coco
from test_engine_train import read_events


def _detector(mode: str = "sact", frozen_bn: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = sact.create_model("resnet20_cifar", mode=mode, in_chans=1, base_channels=4)
    return build_detector(model, num_classes=3, frozen_bn=frozen_bn, out_channels=16, min_size=64, max_size=64,
                          representation_size=32, box_batch_size_per_image=32, rpn_post_nms_top_n_train=100,
                          rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_test=50, rpn_pre_nms_top_n_test=100)


def test_a_few_steps_lower_the_loss(tmp_path):
    torch.set_num_threads(1)
    images, ann = write_synthetic_coco(tmp_path, num_images=4)
    batch = collate([CocoDetection(images, ann)[i] for i in range(4)])
    det = _detector()
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.02, momentum=0.9)

    def loss_at_fixed_sampling():
        torch.manual_seed(123)  # same anchor / RoI sampling each time
        return detection_loss(det(*batch), tau=0.01)[1]

    det.train()
    before = loss_at_fixed_sampling()
    for _ in range(12):
        loss, _ = detection_loss(det(*batch), tau=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_at_fixed_sampling()
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert set(before) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "ponder_cost",
                           "ponder_loss"}


def test_ponder_term_reaches_the_halting_branches(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=2)
    batch = collate([CocoDetection(images, ann)[i] for i in range(2)])
    grads = []
    for tau in (0.0, 1.0):
        det = _detector().train()
        torch.manual_seed(5)
        out = det(*batch)
        loss, logs = detection_loss(out, tau)
        assert logs["loss"] == pytest.approx(sum(v for k, v in logs.items() if k.startswith("loss_")) + tau * logs["ponder_cost"], rel=1e-5)
        loss.backward()
        grads.append(det.backbone.body.layer2.halting[0].local_conv.weight.grad.clone())
        assert out.ponder_cost.shape == (2,) and out.backbone_flops.shape == (2,)
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="-1"):
        detection_loss(out, -1)


def test_save_load_gives_the_same_detections(tmp_path):
    det = _detector(frozen_bn=True).eval()
    for p in det.roi_heads.parameters():  # make the box head produce confident detections
        p.data.normal_(0, 0.5)
    images = [torch.rand(1, 64, 64) for _ in range(2)]
    with torch.no_grad():
        want = det(images)
    save_detector(det, tmp_path / "det", meta={"tau": 0.1})
    back = load_detector(tmp_path / "det")
    doc = json.loads((tmp_path / "det.json").read_text())
    assert back.checkpoint_meta == {"tau": 0.1} and doc["format"] == "sact-checkpoint"  # the one format
    assert doc["detector"] == det.detector_config and doc["model"] == det.backbone.body.sact_config
    with torch.no_grad():
        got = back(images)
    assert sum(len(d["boxes"]) for d in want.detections) > 0
    for a, b in zip(want.detections, got.detections):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(want.backbone_flops, got.backbone_flops)
    # a detector file of sact 0.1 (its own format, no data hash) still loads
    from safetensors.torch import save_file

    old = {"format": "sact-detector", "version": 1, "backbone": doc["model"], "detector": doc["detector"], "meta": {}}
    save_file({k: v.contiguous() for k, v in det.state_dict().items()}, tmp_path / "old" / "detector.safetensors"
              if (tmp_path / "old").mkdir() is None else None, metadata={"sact": json.dumps(old)})
    with torch.no_grad():
        legacy = load_detector(tmp_path / "old")(images)
    torch.testing.assert_close(legacy.detections[0]["boxes"], want.detections[0]["boxes"])
    blob = bytearray((tmp_path / "det.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # one flipped byte of tensor data: the header's hash refuses it
    (tmp_path / "det.safetensors").write_bytes(bytes(blob))
    with pytest.raises(sact.CheckpointError, match="corrupt|sidecar"):
        load_detector(tmp_path / "det")
    (tmp_path / "det.safetensors").write_bytes(b"garbage")
    with pytest.raises(sact.CheckpointError):
        load_detector(tmp_path / "det")


def test_train_then_eval_cli_agree(tmp_path):
    torch.set_num_threads(1)
    write_synthetic_coco(tmp_path / "data", split="train", num_images=8)
    write_synthetic_coco(tmp_path / "data", split="test", num_images=4, seed=1, empty=1)
    run = tmp_path / "run"
    args = ["detect", "train", "--data", str(tmp_path / "data"), "--width", "4", "--fpn-channels", "16",
            "--representation-size", "32", "--epochs", "1", "--batch-size", "4", "--max-steps", "2",
            "--tau", "0.05", "--out", str(run), "--rpn-proposals", "100", "50", "--device", "cpu",
            "--set", "image_every=2", "--set", "log_every=1"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
        m = json.loads((run / "metrics.json").read_text())
        assert main(["detect", "eval", "--data", str(tmp_path / "data"), "--checkpoint", str(run),
                     "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
        assert main(["detect", "eval", "--data", str(tmp_path / "data"), "--watch", str(run), "--poll", "0.05",
                     "--watch-timeout", "0.3", "--device", "cpu"]) == 0
    assert m["num_images"] == 4 and m["backbone_gflops_mean"] > 0 and m["images_per_s"] > 0 and m["step"] == 2
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "backbone_gflops_std", "ponder_cost_mean"} <= set(m)
    tags = read_events(run / "tb")
    assert [step for step, _ in tags["num_units_maps"]] == [2] and [step for step, _ in tags["ponder_maps"]] == [2]
    assert {"train/loss_classifier", "train/ponder_loss", "train/backbone_flops", "eval/AP"} <= set(tags)
    logged = {k: float(v[-1][1]) for k, v in tags.items() if k.startswith("train/")}
    assert logged["train/ponder_loss"] == pytest.approx(0.05 * logged["train/ponder_cost"], rel=1e-5)
    config = yaml.safe_load((run / "config.yaml").read_text())  # the flags, mapped onto the one config
    assert (config["task"], config["dataset"], config["steps"], config["tau"], config["rpn_proposals"],
            config["model_kwargs"]) == ("detection", "coco", 2, 0.05, [100, 50], {"in_chans": 1, "base_channels": 4})
    assert load_train_state(run / STATE_FILE)["step"] == 2  # resumable like every run
    det = load_detector(run)
    assert det.checkpoint_meta["step"] == 2 and det.checkpoint_meta["metrics"]["AP"] == m["AP"]
    assert det.checkpoint_meta["label_to_category"] == {"1": 1, "2": 7}
    with pytest.raises(sact.CheckpointError, match="detector"):  # one format, but not a classifier
        sact.load_checkpoint(run)
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    for k in ("AP", "AP50", "backbone_gflops_mean", "ponder_cost_mean"):
        assert ev[k] == pytest.approx(m[k], abs=1e-6), k
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert all(d["category_id"] in (1, 7) for d in dets)
    watched = json.loads((run / "eval" / "metrics_step000000002.json").read_text())
    assert watched["step"] == 2 and watched["metrics"]["AP"] == pytest.approx(ev["AP"], abs=1e-9)


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(task="detection", dataset="coco", data_dir=str(tmp_path / "data"), model="resnet20_cifar",
                model_kwargs={"base_channels": 4, "in_chans": 1}, fpn_channels=16, representation_size=32,
                box_batch_size=32, rpn_proposals=[100, 50], batch_size=2, eval_batch_size=4, steps=5, lr=0.02,
                tau=0.05, out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, device="cpu", amp="none",
                checkpoint_every=2)
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return {k: v.clone() for k, v in load_detector(path).state_dict().items()}


def test_resume_of_detection_training_is_bitwise_exact(tmp_path):
    # 8 images / batch 2 = 4 steps per epoch; hflip and the RPN / RoI sampling draw from the
    # global RNG, so exactness needs the RNG state restored. Killed after step 2's save, at
    # step 3 (mid-epoch), resumed across the epoch boundary to step 5.
    torch.set_num_threads(1)
    write_synthetic_coco(tmp_path / "data", split="train", num_images=8)
    write_synthetic_coco(tmp_path / "data", split="test", num_images=2, seed=1)
    straight = train_main(_config(tmp_path, out_dir=str(tmp_path / "a")))
    ref = _weights(tmp_path / "a")

    class Killed(Exception):
        pass

    def kill(step, net):
        if step == 3:
            raise Killed

    cfg = _config(tmp_path, out_dir=str(tmp_path / "b"))
    with pytest.raises(Killed):
        train_main(cfg, step_callback=kill)
    assert load_train_state(tmp_path / "b" / STATE_FILE)["step"] == 2
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    resumed = train_main(cfg.replace(resume=True))
    got = _weights(tmp_path / "b")
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert resumed["AP"] == straight["AP"] and resumed["step"] == 5
    with pytest.raises(sact.errors.InputError, match="fpn_channels"):  # settings must match on resume
        train_main(cfg.replace(resume=True, fpn_channels=8))


def test_non_finite_detection_loss_stops_before_the_update(tmp_path):
    write_synthetic_coco(tmp_path / "data", split="train", num_images=4)
    write_synthetic_coco(tmp_path / "data", split="test", num_images=2, seed=1)
    saved = {}

    def poison(step, net):
        if step == 2:
            saved["w"] = {k: v.clone() for k, v in net.state_dict().items()}
        if step == 3:  # after step 3's checks: step 4's loss is NaN
            with torch.no_grad():
                net.roi_heads.box_predictor.cls_score.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .*at step 4 of 5.*step 2\)"):
        train_main(_config(tmp_path), step_callback=poison)
    on_disk = _weights(tmp_path / "run")  # finite, so it loads
    for k, v in saved["w"].items():
        assert torch.equal(on_disk[k], v), k


def test_detection_config_fields_are_validated(tmp_path, capsys):
    with pytest.raises(sact.errors.InputError, match=r"rpn_proposals=\[5\].*hflip=1.5"):
        _config(tmp_path, rpn_proposals=[5], hflip=1.5)
    with pytest.raises(sact.errors.InputError, match="task='detection'"):
        _config(tmp_path, dataset="cluttered")
    with pytest.raises(sact.errors.InputError, match=r"return_stages=\['layer9'\] .*layer1, layer2, layer3"):
        _config(tmp_path, return_stages=["layer9"])  # checked against the model
    assert main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--box-batch-size", "0"]) == 2
    assert "box_batch_size=0" in capsys.readouterr().err
    assert main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--in-chans", "2"]) == 2
    assert "in_chans=2" in capsys.readouterr().err
    assert main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--max-steps", "0"]) == 2
    assert "--max-steps" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "task=segment"]) == 2
    assert "task='segment'" in capsys.readouterr().err
    assert main(["detect", "eval", "--data", str(tmp_path), "--checkpoint", "x", "--watch", "y"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["detect", "eval", "--data", str(tmp_path), "--watch", "y", "--poll", "0"]) == 2
    assert "--poll" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    write_synthetic_coco(tmp_path / "data", split="train", num_images=8)
    write_synthetic_coco(tmp_path / "data", split="test", num_images=3, seed=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sact.cli", "detect", "train", "--data", str(tmp_path / "data"), "--width", "4",
           "--fpn-channels", "16", "--representation-size", "32", "--epochs", "1", "--batch-size", "2",
           "--max-steps", "2", "--out", str(run), "--rpn-proposals", "100", "50", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 2
    assert metrics["num_images"] == 3  # evaluation sharded over the ranks, every image once
    assert load_detector(run).checkpoint_meta["step"] == 2


def test_sparse_engine_gives_the_dense_detections(tmp_path):
    to_sparse = pytest.importorskip("sact.sparse").__dict__.get("to_sparse")
    if to_sparse is None:
        pytest.skip("sact.sparse.to_sparse not available")
    from sact.detection import sparse_detector

    det = _detector(frozen_bn=True).eval()
    for p in det.roi_heads.parameters():
        p.data.normal_(0, 0.5)
    for stage in det.backbone.body.stages:  # halting that stops some positions early
        for branch in stage.halting:
            branch.local_conv.weight.data.normal_(0, 0.3)
            branch.local_conv.bias.data.fill_(0.3)
    images = [torch.rand(1, 64, 64) for _ in range(3)]
    with torch.no_grad():
        dense = det(images)
        sparse = sparse_detector(det, dense_above=1.0, poison=True)(images)  # always the sparse kernels
    counts = torch.cat([s.num_units.flatten() for s in dense.stages])
    assert counts.min() < counts.max()  # non-trivial masks
    torch.testing.assert_close(sparse.backbone_flops, dense.backbone_flops)
    for a, b in zip(dense.stages, sparse.stages):
        assert torch.equal(a.num_units, b.num_units)
    for a, b in zip(dense.detections, sparse.detections):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3)


def test_ponder_maps_of_a_detection_batch_cut_the_padding():
    from sact.detection.task import image_maps
    from sact.viz import summed_map

    det = _detector(frozen_bn=True).eval()
    for stage in det.backbone.body.stages:  # halting that varies over positions
        for branch in stage.halting:
            branch.local_conv.weight.data.normal_(0, 0.3)
            branch.local_conv.bias.data.fill_(0.3)
    same = [torch.rand(1, 64, 64) for _ in range(2)]
    with torch.no_grad():
        out = det(same)
    assert out.input_size == (64, 64)
    for got, want in zip(image_maps(out, [(64, 64)] * 2, field="num_units"), summed_map(out.stages, (64, 64), field="num_units")):
        assert torch.equal(got, want)  # no padding, no resize: the classifier's summed map
    mixed = [torch.rand(1, 64, 64), torch.rand(1, 32, 64)]  # not resized; the second padded to 64 x 64
    with torch.no_grad():
        out = det(mixed)
    maps = image_maps(out, [(64, 64), (32, 64)])
    assert out.image_sizes[1] == (32, 64) and out.input_size == (64, 64) and maps[1].shape == (32, 64)
    want = sum(F.interpolate(s.ponder_map[1:2, None, : s.ponder_map.shape[1] // 2], size=(32, 64), mode="nearest")
               for s in out.stages)[0, 0]  # the top half of each stage's map: the image, not the padding
    torch.testing.assert_close(maps[1], want)


def test_shipped_detection_config_is_the_detect_train_command(tmp_path, capsys):
    # the YAML for `sact train` and the flags of `sact detect train` resolve to the same config
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert main(["train", "--config", str(root / "configs" / "detection_cluttered_resnet20_sact.yaml"),
                 "--out", "runs/det_sact", "--print-config"]) == 0
    from_yaml = yaml.safe_load(capsys.readouterr().out)
    assert main(["detect", "train", "--data", "data/cfm", "--width", "8", "--epochs", "3", "--fpn-channels", "32",
                 "--representation-size", "128", "--box-batch-size", "64", "--lr", "0.01", "--tau", "0.05",
                 "--out", "runs/det_sact", "--print-config"]) == 0
    from_flags = yaml.safe_load(capsys.readouterr().out)
    assert from_yaml == from_flags
