"""Detection training and the CLI: the loss falls, tau reaches the halting branches, checkpoints, torchrun."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import sact
from sact.cli import main
from sact.detection import (CocoDetection, build_detector, collate, detection_loss, evaluate, load_detector,
                            save_detector)
from test_detection_coco import write_synthetic_coco


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
    assert back.checkpoint_meta == {"tau": 0.1} and json.loads((tmp_path / "det.json").read_text())["format"] == "sact-detector"
    with torch.no_grad():
        got = back(images)
    assert sum(len(d["boxes"]) for d in want.detections) > 0
    for a, b in zip(want.detections, got.detections):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(want.backbone_flops, got.backbone_flops)
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
            "--tau", "0.05", "--out", str(run), "--rpn-proposals", "100", "50"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
        doc = json.loads((run / "metrics.json").read_text())
        assert main(["detect", "eval", "--data", str(tmp_path / "data"), "--checkpoint", str(run / "detector"),
                     "--out", str(tmp_path / "eval")]) == 0
    m = doc["metrics"]
    assert m["num_images"] == 4 and m["backbone_gflops_mean"] > 0 and m["images_per_s"] > 0
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "backbone_gflops_std", "ponder_cost_mean"} <= set(m)
    assert doc["history"][0]["train"]["ponder_loss"] == pytest.approx(0.05 * doc["history"][0]["train"]["ponder_cost"])
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    for k in ("AP", "AP50", "backbone_gflops_mean", "ponder_cost_mean"):
        assert ev[k] == pytest.approx(m[k], abs=1e-6), k
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert all(d["category_id"] in (1, 7) for d in dets)


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    write_synthetic_coco(tmp_path / "data", split="train", num_images=8)
    write_synthetic_coco(tmp_path / "data", split="test", num_images=3, seed=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sact.cli", "detect", "train", "--data", str(tmp_path / "data"), "--width", "4",
           "--fpn-channels", "16", "--representation-size", "32", "--epochs", "1", "--batch-size", "2",
           "--max-steps", "2", "--out", str(run), "--rpn-proposals", "100", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["world_size"] == 2
    assert doc["metrics"]["num_images"] == 3  # the padded DistributedSampler repeat is dropped
    assert load_detector(run / "detector") is not None


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
