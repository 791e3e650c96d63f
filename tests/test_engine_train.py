"""Training loop: loss goes down, exact resume, non-finite loss, warm start, optimiser groups."""

from __future__ import annotations

import math
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import sact
from sact.checkpoint import CheckpointError
from sact.errors import InputError
from sact.engine import NonFiniteLossError, TrainConfig, main, param_groups, warm_start
from sact.engine.optim import lr_factor
from sact.engine.state import STATE_FILE, load_train_state

torch.set_num_threads(1)


class Patterns(Dataset):
    """Learnable tiny images: class k brightens row band k of a 16x16 canvas, plus noise.

    With ``augment`` the noise is drawn from torch's global RNG at access time (as
    augmentations do), so exact resume also needs the RNG state restored.
    """

    def __init__(self, n: int = 48, *, augment: bool = False, classes: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.images = torch.rand(n, 1, 16, 16, generator=g) * 0.3
        for i, k in enumerate(self.labels):
            self.images[i, 0, 4 * int(k) : 4 * int(k) + 4] += 0.7
        self.augment, self.poisoned = augment, False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.augment:
            x = x + 0.05 * torch.rand_like(x)
        if self.poisoned:
            x = torch.full_like(x, float("nan"))
        return x, int(self.labels[i])


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(model="resnet20_cifar", mode="sact", model_kwargs={"base_channels": 4, "num_classes": 4, "in_chans": 1},
                tau=0.01, batch_size=8, eval_batch_size=16, steps=8, lr=0.05, out_dir=str(tmp_path / "run"),
                tensorboard=False, progress=False, device="cpu", amp="none", eval_samples=16, train_samples=16)
    base.update(kw)
    return TrainConfig(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_few_steps_lower_the_loss(tmp_path):
    data = Patterns(32)
    cfg = tiny_config(tmp_path, steps=24, lr=0.05)
    first = {}

    def record(step, net):  # loss on the fixed set after the first update
        if step == 1:
            first["metrics"] = sact.engine.evaluate(net, [(data.images, data.labels)])

    final = main(cfg, train_set=data, eval_set=data, step_callback=record)
    assert final["loss"] < 0.7 * first["metrics"]["loss"], (first["metrics"]["loss"], final["loss"])
    assert final["top1"] > first["metrics"]["top1"]
    model = sact.load_checkpoint(tmp_path / "run" / "model")
    meta = model.checkpoint_meta
    assert meta["tau"] == 0.01 and meta["step"] == 24 and meta["config"]["steps"] == 24
    assert meta["metrics"]["top1"] == final["top1"] and "preprocess" in meta and meta["classes"] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("mode", ["sact", "vanilla"])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, mode):
    # 40 images / batch 8 = 5 steps per epoch; the interruption at step 3 is mid-epoch and
    # the run crosses an epoch boundary afterwards.
    straight = main(tiny_config(tmp_path / "a", mode=mode, steps=8, checkpoint_every=3), train_set=Patterns(40, augment=True),
                    eval_set=Patterns(16))
    ref = weights(sact.load_checkpoint(tmp_path / "a" / "run" / "model"))

    class Killed(Exception):
        pass

    def kill(step, net):
        if step == 4:  # step 3 was saved, step 4 is lost as in a killed process
            raise Killed

    cfg = tiny_config(tmp_path / "b", mode=mode, steps=8, checkpoint_every=3)
    with pytest.raises(Killed):
        main(cfg, train_set=Patterns(40, augment=True), eval_set=Patterns(16), step_callback=kill)
    assert load_train_state(tmp_path / "b" / "run" / STATE_FILE)["step"] == 3
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    resumed = main(cfg.replace(resume=True), train_set=Patterns(40, augment=True), eval_set=Patterns(16))
    got = weights(sact.load_checkpoint(tmp_path / "b" / "run" / "model"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert resumed["loss"] == straight["loss"]


def test_memory_format_channels_last_trains_the_same_model(tmp_path):
    """``memory_format``: ``auto`` trains channels-last on the CPU (weights and images), and
    gives the NCHW run's weights up to float rounding; a bad value is a config error."""
    seen = {}

    def look(step, net):
        if step == 1:
            conv = net.stages[0].units[1].conv1.weight
            seen["cl"] = conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    runs = {}
    for fmt in ("auto", "contiguous"):
        cfg = tiny_config(tmp_path / fmt, steps=6, memory_format=fmt)
        runs[fmt] = main(cfg, train_set=Patterns(32), eval_set=Patterns(16), step_callback=look if fmt == "auto" else None)
    assert seen["cl"], "auto on the CPU trains channels-last"
    a = weights(sact.load_checkpoint(tmp_path / "auto" / "run" / "model"))
    b = weights(sact.load_checkpoint(tmp_path / "contiguous" / "run" / "model"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4), k
    assert runs["auto"]["loss"] == pytest.approx(runs["contiguous"]["loss"], rel=1e-3)
    with pytest.raises(sact.engine.config.ConfigError, match="memory_format"):
        tiny_config(tmp_path, memory_format="nhwc")


def test_resume_refuses_another_model(tmp_path):
    main(tiny_config(tmp_path, steps=2), train_set=Patterns(16), eval_set=Patterns(16))
    cfg = tiny_config(tmp_path, steps=4, resume=True, model_kwargs={"base_channels": 6, "num_classes": 4, "in_chans": 1})
    with pytest.raises(InputError, match="model_kwargs"):
        main(cfg, train_set=Patterns(16), eval_set=Patterns(16))
    (tmp_path / "run" / STATE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        main(tiny_config(tmp_path, steps=4, resume=True), train_set=Patterns(16), eval_set=Patterns(16))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    data = Patterns(32)
    saved = {}

    def poison(step, net):
        if step == 2:
            saved["w"] = weights(net)
        if step == 3:
            data.poisoned = True  # every later batch is NaN

    cfg = tiny_config(tmp_path, steps=10, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 4 of 10.*step 2\)"):
        main(cfg, train_set=data, eval_set=Patterns(16), step_callback=poison)
    on_disk = weights(sact.load_checkpoint(tmp_path / "run" / "model"))
    for k, v in saved["w"].items():
        assert torch.equal(on_disk[k], v), k
    state = load_train_state(tmp_path / "run" / STATE_FILE)
    assert state["step"] == 2
    assert not list((tmp_path / "run").glob(".*.tmp")), "no temporary files left behind"


def test_weight_decay_only_on_kernels():
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4)
    decay, rest = param_groups(model, 0.1)
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == kernels
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith(".weight") for n in map(names.get, map(id, decay["params"])))
    assert any(".halting." in names[id(p)] for p in decay["params"]), "halting convolutions are decayed too"
    # one SGD step with zero gradients: only kernels shrink, by lr * wd
    before = weights(model)
    opt = torch.optim.SGD([decay, rest], lr=1.0, momentum=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * 0.9 if id(p) in kernels else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_halting_lr_multiplier_groups():
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4)
    groups = param_groups(model, 0.1, lr=0.5, halting_lr_mult=20.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    for g in groups:
        halting = {".halting." in names[id(p)] for p in g["params"]}
        assert len(halting) == 1, "a group mixes halting and backbone parameters"
        assert g["lr"] == (10.0 if halting.pop() else 0.5)
    opt = sact.engine.build_optimizer(model, TrainConfig(lr=0.5, halting_lr_mult=20.0))
    sched = sact.engine.build_scheduler(opt, total_steps=10, steps_per_epoch=5, config=TrainConfig(schedule="piecewise", boundaries=[0.5]))
    for _ in range(5):
        opt.step()
        sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.05, 1.0])


def test_learning_rate_schedules():
    cifar = TrainConfig(schedule="piecewise", steps=100000)
    f = [lr_factor(s, total_steps=100000, steps_per_epoch=390, config=cifar) for s in (0, 59999, 60000, 75000, 90000, 99999)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.001])
    short = [lr_factor(s, total_steps=1000, steps_per_epoch=10, config=cifar) for s in (599, 600, 750, 900)]
    assert short == pytest.approx([1, 0.1, 0.01, 0.001])
    imagenet = TrainConfig(schedule="staircase", decay_epochs=30, steps=0, epochs=90)
    g = [lr_factor(e * 100, total_steps=9000, steps_per_epoch=100, config=imagenet) for e in (0, 29, 30, 60, 89)]
    assert g == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    warm = TrainConfig(schedule="constant", warmup_steps=4)
    assert [lr_factor(s, total_steps=10, steps_per_epoch=5, config=warm) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
    cos = TrainConfig(schedule="cosine", warmup_steps=4)  # linear warm-up, then cosine over the remaining 8 steps
    got = [lr_factor(s, total_steps=12, steps_per_epoch=5, config=cos) for s in range(12)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert lr_factor(0, total_steps=8, steps_per_epoch=5, config=TrainConfig(schedule="cosine")) == 1.0


def test_warm_start_from_checkpoint_keeps_halting_fresh(tmp_path):
    src = sact.create_model("resnet20_cifar", mode="vanilla", base_channels=4)
    for p in src.parameters():
        p.data.normal_()
    sact.save_checkpoint(src, tmp_path / "van")
    dst = sact.create_model("resnet20_cifar", mode="sact", base_channels=4)
    fresh = weights(dst)
    assert "halting" in warm_start(dst, tmp_path / "van")
    got = weights(dst)
    for k, v in got.items():
        if ".halting." in k:
            assert torch.equal(v, fresh[k]), k
        else:
            assert torch.equal(v, src.state_dict()[k]), k
    # same mode: halting branches come from the checkpoint too
    sact.save_checkpoint(dst, tmp_path / "sa")
    again = sact.create_model("resnet20_cifar", mode="sact", base_channels=4)
    warm_start(again, tmp_path / "sa")
    assert all(torch.equal(v, got[k]) for k, v in weights(again).items())


def test_warm_start_errors(tmp_path):
    sact.save_checkpoint(sact.create_model("resnet20_cifar", mode="vanilla", base_channels=4), tmp_path / "narrow")
    wide = sact.create_model("resnet20_cifar", mode="sact", base_channels=8)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        warm_start(wide, tmp_path / "narrow")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        warm_start(wide, tmp_path / "bad.safetensors")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="tv.pth does not fit resnet20_cifar: .*missing"):
        warm_start(wide, tmp_path / "tv.pth")


def test_warm_start_from_torchvision_file(tmp_path):
    import torchvision

    tv = torchvision.models.resnet50(weights=None)
    torch.save({"model": tv.state_dict()}, tmp_path / "r50.pth")  # torchvision references layout
    model = sact.create_model("resnet50", mode="sact", num_classes=7)
    fresh = weights(model)
    warm_start(model, tmp_path / "r50.pth")
    got = weights(model)
    assert torch.equal(got["conv1.weight"], tv.conv1.weight)
    assert torch.equal(got["layer3.2.conv2.weight"], tv.layer3[2].conv2.weight)
    assert torch.equal(got["fc.weight"], fresh["fc.weight"]), "a classifier of another size is skipped"
    assert all(torch.equal(got[k], fresh[k]) for k in got if ".halting." in k)


def read_events(folder) -> dict[str, list]:
    """TensorBoard tag -> [(step, value kind)] of the event files in ``folder`` (TensorFlow never loaded)."""
    import sys
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    tags: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, tensor_util.make_ndarray(v.tensor)))
    return tags


def test_tensorboard_holds_the_reference_summaries(tmp_path):
    data = Patterns(32)
    cfg = tiny_config(tmp_path, steps=4, tensorboard=True, log_every=2, image_every=2, eval_every=2)
    main(cfg, train_set=data, eval_set=Patterns(16))
    tags = read_events(tmp_path / "run" / "tb")
    assert [step for step, _ in tags["num_units_maps"]] == [2, 4] == [step for step, _ in tags["ponder_maps"]]
    for stage in (1, 2, 3):  # the reference's per-block summaries
        for name in ("ponder_cost_mean", "ponder_cost_std_positions", "num_units_std_positions", "flops_mean"):
            assert [step for step, _ in tags[f"eval/stage{stage}/{name}"]] == [2, 4], name
    final = sact.load_checkpoint(tmp_path / "run" / "model").checkpoint_meta["metrics"]
    assert float(tags["eval/stage2/flops_std"][-1][1]) == pytest.approx(final["stages"][1]["flops_std"], rel=1e-6)
    assert {"train/loss", "train/cross_entropy", "train/accuracy", "train/ponder_cost", "train/lr"} <= set(tags)
