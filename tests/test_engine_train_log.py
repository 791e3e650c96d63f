"""Training shows how it goes (issue 21, item 2): running means of loss, top-1, ponder cost,
FLOPs ratio and lr every ``log_every`` steps (bar, TensorBoard, or a line on stderr without a
bar), and ``sact train`` ends with the paths it wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sact.cli import main
from sact.engine import main as train_main
from sact.classification import ClassificationTask
from sact.engine.train import TrainLog, format_logs
from helpers import TRAIN_FLAGS, tiny_fashion_mnist
from test_engine_train import Patterns, read_events, tiny_config


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def test_format_logs_shows_the_known_values_in_order():
    values = {"lr": 0.05, "accuracy": 0.5625, "loss": 1.23456, "flops_ratio": 0.612, "ponder_cost": 3.4149,
              "cross_entropy": 1.1}
    assert format_logs(values) == {"loss": "1.235", "top1": "56.2%", "ponder": "3.41", "flops": "61.2%", "lr": "0.05"}
    assert format_logs({"loss": 2.0, "backbone_flops": 1e9}) == {"loss": "2.000"}  # only what a task reports


def test_train_log_reports_means_since_the_last_report(capsys):
    run = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]), step=2, total_steps=4, writer=None)
    log = TrainLog(vanilla_flops=200, lines=True)
    losses, flops = [1.0, 3.0, 10.0], [100.0, 150.0, 60.0]
    for loss, f in zip(losses[:2], flops[:2]):
        log.add({"loss": torch.tensor(loss), "flops": torch.tensor(f)})
    assert log.means() == pytest.approx({"loss": 2.0, "flops": 125.0, "flops_ratio": 125.0 / 200})
    log.report(run)
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 2/4  loss 2.000  flops 62.5%  lr 0.1  ") and line.endswith(" it/s")
    log.add({"loss": torch.tensor(losses[2]), "flops": torch.tensor(flops[2])})  # a new window
    assert log.means() == pytest.approx({"loss": 10.0, "flops": 60.0, "flops_ratio": 0.3})


def test_train_log_without_lines_prints_nothing(capsys):
    run = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]), step=1, total_steps=1, writer=None)
    log = TrainLog()
    log.add({"loss": torch.tensor(1.0)})
    log.report(run)
    assert capsys.readouterr().err == ""


def test_logged_values_are_running_means_of_each_window(tmp_path, monkeypatch, capsys):
    losses = []
    step = ClassificationTask.step

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        losses.append(float(out.loss.detach()))
        return out

    monkeypatch.setattr(ClassificationTask, "step", recording)
    cfg = tiny_config(tmp_path, mode="vanilla", steps=5, tensorboard=True, log_every=2, image_every=0)
    train_main(cfg, train_set=Patterns(48), eval_set=Patterns(16))
    tags = read_events(tmp_path / "run" / "tb")
    windows = [(2, losses[0:2]), (4, losses[2:4])]  # every 2 steps (step 5 is not reported)
    assert [s for s, _ in tags["train/loss"]] == [s for s, _ in windows]
    for (_, value), (_, window) in zip(tags["train/loss"], windows):
        assert float(value) == pytest.approx(sum(window) / len(window), rel=1e-5)
    # a vanilla network costs exactly the vanilla FLOPs at the trained image size
    assert [float(v) for _, v in tags["train/flops_ratio"]] == pytest.approx([1.0] * 2, rel=1e-6)
    # progress=False: one line per report on stderr, with the same means
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/5", "4/5"]
    for line, (_, window) in zip(lines, windows):
        assert f"loss {sum(window) / len(window):.3f}" in line
        assert re.search(r"  top1 \d+\.\d%  ponder \S+  flops 100\.0%  lr \S+  \d+\.\d it/s$", line), line


def test_sact_train_reports_progress_and_the_files_it_wrote(tmp_path, capsys, fmnist):
    out = tmp_path / "run"
    flags = [*TRAIN_FLAGS, "--steps", "4", "--log-every", "2", "--no-progress"]
    assert main(["train", "--out", str(out), "--data-dir", str(fmnist), *flags]) == 0
    captured = capsys.readouterr()
    assert "top1" in json.loads(captured.out)  # stdout stays the metrics JSON
    err = captured.err.splitlines()
    assert [ln.split()[1] for ln in err if ln.startswith("step ")] == ["2/4", "4/4"]
    written = [Path(ln.split()[1]) for ln in err if ln.startswith("wrote ")]
    assert {p.name for p in written} == {"model.safetensors", "metrics.json", "train_state.safetensors"}
    assert all(p.parent == out and p.is_file() for p in written)
