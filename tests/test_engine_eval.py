"""Evaluation metrics against hand computation; ``sact eval``; config from YAML and flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sact
from sact.checkpoint import CheckpointError
from sact.cli import main as cli
from sact.engine import TrainConfig, evaluate, load_config
from sact.engine.datasets import eval_loader
from sact.engine.distributed import DistInfo
from helpers import tiny_fashion_mnist

torch.set_num_threads(1)


def _halting_model(num_classes=10):
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4, in_chans=1, num_classes=num_classes).eval()
    with torch.no_grad():  # halting that varies over positions and images
        for stage in model.stages:
            for h in stage.halting:
                h.local_conv.weight.normal_(0, 1.0)
                h.local_conv.bias.fill_(-0.5)
    return model


@pytest.mark.parametrize("num_classes", [10, 4])
def test_metrics_match_hand_computation(num_classes):
    torch.manual_seed(1)
    model = _halting_model(num_classes)
    images = torch.rand(7, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2]) % num_classes
    batches = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, 7, 3)]  # 3 + 3 + 1
    m = evaluate(model, batches, tau=0.05)
    with torch.no_grad():
        out = model(images)
    flops = out.flops.double().numpy()
    assert flops.std() > 0, "the test needs images with different FLOPs"
    assert m["num_images"] == 7
    assert m["top1"] == pytest.approx((out.logits.argmax(1) == labels).float().mean().item())
    ce = F.cross_entropy(out.logits, labels).item()
    assert m["loss"] == pytest.approx(ce, rel=1e-5)
    assert m["total_loss"] == pytest.approx(ce + 0.05 * out.ponder_cost.mean().item(), rel=1e-5)
    assert m["flops_mean"] == pytest.approx(flops.mean()) and m["flops_std"] == pytest.approx(flops.std(), rel=1e-6)
    if num_classes > 5:
        top5 = (out.logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
        assert m["top5"] == pytest.approx(top5)
    else:
        assert "top5" not in m
    assert len(m["stages"]) == 3
    for s, so in zip(m["stages"], out.stages):
        pc = so.ponder_cost.double().numpy()
        nu = so.num_units.double().flatten(1).mean(1).numpy()
        assert s["ponder_cost_mean"] == pytest.approx(pc.mean(), rel=1e-6)
        assert s["ponder_cost_std"] == pytest.approx(pc.std(), rel=1e-4, abs=1e-6)
        assert s["num_units_mean"] == pytest.approx(nu.mean(), rel=1e-6)
        # the histogram sact plot draws: positions (over all images) that ran 1..U units
        units = so.halting_distribution.shape[1]
        expected = torch.bincount(so.num_units.reshape(-1), minlength=units + 1)[1:].tolist()
        assert s["num_units_hist"] == expected and len(expected) == units
        # the reference's per-block moments: over all positions of all images
        assert s["ponder_cost_std_positions"] == pytest.approx(so.ponder_map.double().numpy().std(), rel=1e-4, abs=1e-6)
        assert s["num_units_std_positions"] == pytest.approx(so.num_units.double().numpy().std(), rel=1e-6, abs=1e-9)
        sf = so.flops.double().numpy()
        assert s["flops_mean"] == pytest.approx(sf.mean()) and s["flops_std"] == pytest.approx(sf.std(), rel=1e-6, abs=1e-6)
    assert any(min(s["num_units_hist"]) > 0 for s in m["stages"]), "the test needs varied unit counts"
    assert sum(s["flops_mean"] for s in m["stages"]) < m["flops_mean"]  # the stem and the head are outside the stages
    # SACT halts per position: the spread over positions exceeds the spread of the image means
    assert any(s["num_units_std_positions"] > s["num_units_std"] + 1e-3 for s in m["stages"])
    assert m["images_per_s"] > 0 and m["wall_time_s"] > 0


def test_act_stage_std_is_the_same_over_positions_and_images():
    torch.manual_seed(2)
    model = sact.create_model("resnet20_cifar", mode="act", base_channels=4, in_chans=1, num_classes=4).eval()
    with torch.no_grad():
        for stage in model.stages:
            for h in stage.halting:
                h.global_conv.weight.normal_(0, 3.0)
                h.global_conv.bias.fill_(-0.3)
    images = torch.rand(6, 1, 16, 16) * torch.linspace(0.2, 3, 6)[:, None, None, None]  # different contrasts
    m = evaluate(model, [(images, torch.arange(6) % 4)])
    assert any(s["num_units_std"] > 0 for s in m["stages"]), "the test needs images that halt differently"
    for s in m["stages"]:  # an ACT map is constant over an image
        assert s["num_units_std_positions"] == pytest.approx(s["num_units_std"], rel=1e-6, abs=1e-9)


def test_eval_shards_cover_every_image_once():
    data = [(torch.zeros(1, 4, 4), i) for i in range(10)]
    seen = []
    for rank in range(3):
        for _, labels in eval_loader(data, 4, rank=rank, world_size=3):
            seen += labels.tolist()
    assert sorted(seen) == list(range(10))
    assert DistInfo().is_main and not DistInfo().enabled


def test_sact_eval_command_writes_metrics(tmp_path, capsys):
    data_dir = tiny_fashion_mnist(tmp_path / "fmnist")
    cfg = TrainConfig(model="resnet20_cifar", model_kwargs={"base_channels": 4}, data_dir=str(data_dir), eval_samples=6,
                      clutter={"canvas_size": 16, "num_clutter": 2})
    model = _halting_model()
    sact.save_checkpoint(model, tmp_path / "ck", meta={"tau": 0.02, "config": cfg.to_dict()})
    assert cli(["eval", str(tmp_path / "ck"), "--out", str(tmp_path / "m.json"), "--batch-size", "4", "--no-progress",
                "--data-dir", str(data_dir)]) == 0  # the checkpoint's own data_dir is never used
    m = json.loads((tmp_path / "m.json").read_text())
    data = sact.data.ClutteredFashionMNIST(split="test", num_samples=6, seed=1, data_dir=data_dir,
                                           config=sact.data.ClutterConfig(canvas_size=16, num_clutter=2)).stack()
    ref = evaluate(model, [(data["image"], data["label"])], tau=0.02)
    for k in ("num_images", "top1", "top5", "loss", "total_loss", "flops_mean", "flops_std", "ponder_cost_mean"):
        assert m[k] == pytest.approx(ref[k], rel=1e-5), k
    assert m["tau"] == 0.02 and m["dataset"] == "cluttered" and len(m["stages"]) == 3
    assert "top-1" in capsys.readouterr().out
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    assert cli(["eval", str(tmp_path / "broken"), "--out", str(tmp_path / "x.json")]) == 2
    assert "sact eval:" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("mode", ["sact", "act"])
def test_sact_eval_sparse_gives_the_dense_metrics(tmp_path, mode):
    """``sact eval --sparse`` runs the engine (halted positions skipped) and reports the dense
    evaluation's numbers: accuracy, loss, FLOPs, ponder cost, per-stage unit histograms."""
    data_dir = tiny_fashion_mnist(tmp_path / "fmnist")
    cfg = TrainConfig(model="resnet20_cifar", model_kwargs={"base_channels": 4}, data_dir=str(data_dir), eval_samples=6,
                      clutter={"canvas_size": 16, "num_clutter": 2})
    model = _halting_model()
    if mode == "act":
        act = sact.create_model("resnet20_cifar", mode="act", base_channels=4, in_chans=1).eval()
        act.load_state_dict(model.state_dict(), strict=False)  # same units; ACT's own (fresh) halting branches
        with torch.no_grad():
            for stage in act.stages:
                for h in stage.halting:
                    h.global_conv.weight.normal_(0, 1.0)  # per-image halting
                    h.global_conv.bias.fill_(1.0)
        model = act
    sact.save_checkpoint(model, tmp_path / "ck", meta={"tau": 0.02, "config": cfg.to_dict()})
    runs = {}
    for engine in ("dense", "sparse"):
        out = tmp_path / f"{engine}.json"
        args = ["eval", str(tmp_path / "ck"), "--out", str(out), "--batch-size", "4", "--no-progress",
                "--data-dir", str(data_dir)] + (["--sparse"] if engine == "sparse" else [])
        assert cli(args) == 0
        runs[engine] = json.loads(out.read_text())
    dense, sparse = runs["dense"], runs["sparse"]
    assert (dense["engine"], sparse["engine"]) == ("dense", "sparse")
    assert any(st["num_units_mean"] < 2.99 for st in dense["stages"])  # something halted: the engine skipped work
    for k in ("num_images", "top1", "top5", "loss", "total_loss", "flops_mean", "flops_std", "ponder_cost_mean"):
        assert sparse[k] == pytest.approx(dense[k], rel=1e-5, abs=1e-6), k
    for sd, ss in zip(dense["stages"], sparse["stages"]):
        assert ss["num_units_hist"] == sd["num_units_hist"]
        assert ss["ponder_cost_mean"] == pytest.approx(sd["ponder_cost_mean"], rel=1e-5)


def test_truncated_checkpoint_and_eval_of_wrong_input(tmp_path, capsys):
    model = _halting_model()
    path = sact.save_checkpoint(model, tmp_path / "m")
    path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(CheckpointError):
        sact.load_checkpoint(tmp_path / "m")
    assert cli(["eval", str(tmp_path / "m"), "--out", str(tmp_path / "x.json")]) == 2
    assert "sact eval:" in capsys.readouterr().err


def test_yaml_then_flags(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("model: resnet56_cifar\nlr: 0.2\ntau: 0.5\nmodel_kwargs: {base_channels: 8}\nboundaries: [0.5, 0.8]\n")
    cfg = load_config(y, {"lr": 0.3})
    assert (cfg.model, cfg.lr, cfg.tau, cfg.model_kwargs, cfg.boundaries) == ("resnet56_cifar", 0.3, 0.5, {"base_channels": 8}, [0.5, 0.8])
    assert cli(["train", "--config", str(y), "--set", "tau=0.25", "--set", "schedule=cosine", "--lr", "0.01",
                "--mode", "act", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr"], printed["tau"], printed["schedule"], printed["mode"], printed["model"]) == (0.01, 0.25, "cosine", "act", "resnet56_cifar")
    y.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(y)
    with pytest.raises(ValueError, match=r"tau=-1"):
        TrainConfig(tau=-1)
    assert cli(["train", "--mode", "fast", "--print-config"]) == 2
    assert "mode='fast'" in capsys.readouterr().err
