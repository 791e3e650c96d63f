"""Nothing the user had is lost: run folders, demo folders, galleries, stale temporary
files, non-finite weights never saved (issue 18, items 4-8 and 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import sact
import sact.data
from sact.cli import main
from helpers import TRAIN_FLAGS, error_line, snapshot, tiny_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def _train(out, fmnist, *extra):
    return main(["train", "--out", str(out), "--data-dir", str(fmnist), *TRAIN_FLAGS, *extra])


def test_train_never_replaces_a_run(tmp_path, capsys, fmnist):
    out = tmp_path / "run"
    assert _train(out, fmnist) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert _train(out, fmnist) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "previous run" in line and "--overwrite" in line and "--resume" in line
    assert snapshot(out) == before
    # --overwrite replaces the run's own files, nothing else
    assert _train(out, fmnist, "--overwrite", "--seed", "3") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sact.load_checkpoint(out).checkpoint_meta["config"]["seed"] == 3


def test_resume_without_state_is_an_error(tmp_path, capsys, fmnist):
    out = tmp_path / "run"
    assert _train(out, fmnist) == 0
    capsys.readouterr()
    (out / "train_state.safetensors").unlink()  # e.g. a run folder copied without its state
    before = snapshot(out)
    assert _train(out, fmnist, "--resume", "--steps", "4") == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "no training state" in line and snapshot(out) == before
    assert _train(tmp_path / "never", fmnist, "--resume") == 2
    assert not (tmp_path / "never").exists()


def test_resume_refuses_changed_settings_listing_each(tmp_path, capsys, fmnist):
    out = tmp_path / "run"
    assert _train(out, fmnist) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert _train(out, fmnist, "--resume", "--steps", "4", "--lr", "0.5", "--tau", "0.2") == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "lr: 0.1 -> 0.5" in line and "tau: 0.01 -> 0.2" in line and "steps" not in line.split("(only")[0]
    assert snapshot(out) == before
    # steps (and the other listed fields) may change: the run goes on
    assert _train(out, fmnist, "--resume", "--steps", "4", "--threads", "1") == 0
    assert sact.load_checkpoint(out).checkpoint_meta["step"] == 4


def test_forged_resume_states_are_clear_errors(tmp_path, capsys, fmnist):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert _train(out, fmnist) == 0
    capsys.readouterr()
    path = out / "train_state.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated (a copy cut short)
    assert _train(out, fmnist, "--resume", "--steps", "4") == 2
    assert "train_state.safetensors" in error_line(capsys.readouterr().err, "train")
    path.write_bytes(good)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["state"])
    doc["scheduler"]["optimizer"] = "gone"  # would replace the scheduler's optimizer attribute
    save_file(tensors, path, metadata={**meta, "state": json.dumps(doc)})
    assert _train(out, fmnist, "--resume", "--steps", "4") == 2
    assert "scheduler" in error_line(capsys.readouterr().err, "train")
    save_file(tensors, path, metadata={"format": "something-else"})
    assert _train(out, fmnist, "--resume", "--steps", "4") == 2
    assert "not an sact training state" in error_line(capsys.readouterr().err, "train")


def test_weights_that_become_non_finite_are_never_saved(tmp_path):
    from test_engine_train import Patterns, tiny_config, weights

    saved = {}

    def blow_up(step, net):
        if step == 2:
            saved["w"] = weights(net)
        if step == 3:  # the update of step 4 (a save step) makes the weights infinite
            for g in opt_holder["opt"].param_groups:
                g["lr"] = float("inf")

    opt_holder = {}
    real = sact.engine.train.build_optimizer

    def spy(model, config):
        opt_holder["opt"] = real(model, config)
        return opt_holder["opt"]

    cfg = tiny_config(tmp_path, steps=6, checkpoint_every=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sact.engine.train, "build_optimizer", spy)
        with pytest.raises(sact.engine.NonFiniteLossError, match=r"non-finite weights.*after step 4 of 6.*step 2\)"):
            sact.engine.main(cfg, train_set=Patterns(32), eval_set=Patterns(16), step_callback=blow_up)
    on_disk = sact.load_checkpoint(tmp_path / "run" / "model")  # finite, so it loads
    for k, v in saved["w"].items():
        assert torch.equal(on_disk.state_dict()[k], v), k


def test_non_finite_checkpoints_are_refused_and_metrics_stay_json(tmp_path, capsys, fmnist):
    model = sact.create_model("resnet20_cifar", base_channels=4, in_chans=1)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    sact.save_checkpoint(model, tmp_path / "nan")
    with pytest.raises(sact.CheckpointError, match="non-finite"):
        sact.load_checkpoint(tmp_path / "nan")
    assert sact.load_checkpoint(tmp_path / "nan", allow_non_finite=True).fc.weight.isnan().any()
    assert main(["eval", str(tmp_path / "nan"), "--data-dir", str(fmnist), "--out", str(tmp_path / "m.json")]) == 2
    assert "non-finite" in error_line(capsys.readouterr().err, "eval")
    # finite weights whose outputs are NaN (a negative BN variance): metrics.json holds null, never NaN
    model = sact.create_model("resnet20_cifar", base_channels=4, in_chans=1)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(-1.0)
    config = {"dataset": "cluttered", "eval_samples": 4, "clutter": {"canvas_size": 32, "num_clutter": 2}}
    sact.save_checkpoint(model, tmp_path / "negvar", meta={"config": config, "tau": 0.01})
    assert main(["eval", str(tmp_path / "negvar"), "--data-dir", str(fmnist), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0

    def reject(name):
        raise ValueError(f"bare {name} in metrics.json")

    metrics = json.loads((tmp_path / "m.json").read_text(), parse_constant=reject)
    assert metrics["loss"] is None and metrics["num_images"] == 4


def _demo_settings():
    from sact.tools.demo import DemoSettings

    return DemoSettings(base_channels=4, pretrain_steps=1, finetune_steps=1, batch_size=8, train_samples=16,
                        eval_samples=8, canvas_size=32, num_maps=2, threads=1)


def test_demo_writes_only_its_files_and_refuses_an_earlier_demo(tmp_path, capsys, fmnist):
    from sact.tools.demo import run_demo

    out = tmp_path / "report"
    (out / "vanilla").mkdir(parents=True)
    (out / "notes.md").write_text("mine")
    (out / "vanilla" / "keep.txt").write_text("mine too")
    run_demo(_demo_settings(), out, data_dir=str(fmnist), progress=False)
    first = snapshot(out)
    assert first["notes.md"] and first["vanilla/keep.txt"]
    with pytest.raises(ValueError, match="earlier demo"):
        run_demo(_demo_settings(), out, data_dir=str(fmnist), progress=False)
    assert snapshot(out) == first
    # a bare second run (as `sact demo` in the repository root) refuses at once
    rc = main(["demo", "--out", str(out), "--data-dir", str(fmnist), "--quick", "--no-progress"])
    line = error_line(capsys.readouterr().err, "demo")
    assert rc == 2 and "earlier demo" in line and "--overwrite" in line and snapshot(out) == first
    run_demo(_demo_settings(), out, data_dir=str(fmnist), progress=False, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "vanilla" / "keep.txt").read_text() == "mine too"
    assert (out / "report.md").exists() and not (out / "vanilla_init").exists()


def _image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def test_two_ponder_map_runs_never_mix_one_gallery(tmp_path, capsys):
    model = sact.create_model("resnet20_cifar", base_channels=4)
    sact.save_checkpoint(model, tmp_path / "a")
    sact.save_checkpoint(model, tmp_path / "b")
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.png")
    out = tmp_path / "maps"
    args = ["--out", str(out), "--device", "cpu"]
    assert main(["ponder-map", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    first = snapshot(out)
    assert main(["ponder-map", str(tmp_path / "y.png"), "--checkpoint", str(tmp_path / "b"), *args]) == 2
    assert "earlier ponder-map gallery" in error_line(capsys.readouterr().err, "ponder-map")
    assert snapshot(out) == first
    # a run in progress (its lock, held by a live process) is refused too
    lock = out / ".sact-ponder-map.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        import re

        host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]
        lock.write_text(f"{host} {sleeper.pid}\n")
        assert main(["ponder-map", str(tmp_path / "y.png"), "--checkpoint", str(tmp_path / "b"), *args,
                     "--overwrite"]) == 2
        assert "being written by another" in error_line(capsys.readouterr().err, "ponder-map")
        assert snapshot(out) == {**first, ".sact-ponder-map.lock": snapshot(out)[".sact-ponder-map.lock"]}
    finally:
        sleeper.kill()
        sleeper.wait()
    # the lock's process is gone: stale, taken over; --overwrite replaces the first gallery
    assert main(["ponder-map", str(tmp_path / "y.png"), "--checkpoint", str(tmp_path / "b"), *args,
                 "--overwrite"]) == 0
    html = (out / "index.html").read_text()
    assert str(tmp_path / "b") in html and "x_ponder" not in html and not (out / "x_ponder.npy").exists()
    assert not lock.exists()


def test_out_clashing_with_a_file_is_found_before_any_work(tmp_path, capsys, fmnist):
    clash = tmp_path / "taken"
    clash.write_text("a file")
    assert _train(clash, fmnist) == 2
    assert "is an existing file" in error_line(capsys.readouterr().err, "train")
    model = sact.create_model("resnet20_cifar", base_channels=4, in_chans=1)
    sact.save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "folder.json").mkdir()
    calls = []
    with pytest.MonkeyPatch.context() as mp:  # no evaluation may start
        mp.setattr(sys.modules["sact.classification.evaluate"], "evaluate", lambda *a, **k: calls.append(1))
        assert main(["eval", str(tmp_path / "ck"), "--data-dir", str(fmnist), "--out", str(tmp_path / "folder.json")]) == 2
        assert "existing folder" in error_line(capsys.readouterr().err, "eval")
        assert main(["eval", str(tmp_path / "ck"), "--data-dir", str(fmnist), "--out", str(clash)]) == 2
        assert "already exists" in error_line(capsys.readouterr().err, "eval")
    assert calls == [] and clash.read_text() == "a file"
    assert main(["ponder-map", str(clash), "--checkpoint", str(tmp_path / "ck"), "--out", str(clash)]) == 2
    assert "is an existing file" in error_line(capsys.readouterr().err, "ponder-map")


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import sact.io.files
    def hang(*args):  # the data is in the temporary file; the rename never happens
        print("writing", flush=True)
        time.sleep(60)
    os.replace = hang
    sact.io.files.atomic_write_bytes(sys.argv[1], b"new contents")
""")


def test_a_kill_mid_write_leaves_the_file_and_its_temp_is_cleaned_next_start(tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    target = folder / "accuracy_vs_flops.png"
    target.write_bytes(b"old contents")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and f".{proc.pid}." in temps[0].name and target.read_bytes() == b"old contents"
    live = folder / temps[0].name.replace(f".{proc.pid}.", f".{os.getpid()}.")  # a live writer's file stays
    live.write_bytes(b"in progress")
    (folder / ".notes.tmp").write_text("not ours")  # nor is anything else removed
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"model": "m", "mode": "sact", "tau": 0.01, "top1": 0.5, "flops_mean": 1e6,
                                   "flops_std": 0.0, "stages": []}))
    assert main(["plot", str(metrics), "--out", str(folder), "--overwrite"]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert temps[0].name not in names and live.name in names and ".notes.tmp" in names
