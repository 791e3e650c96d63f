"""Continuous evaluation (``sact eval --watch``): checkpoints appearing while the watcher runs,
half-written files never evaluated, one metrics file per step never overwritten, clean stops."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import sact
from sact.cli import main as cli
from sact.engine.watch import watch_checkpoints
from helpers import tiny_fashion_mnist
from test_engine_eval import _halting_model

torch.set_num_threads(1)


def _model(seed: int):
    torch.manual_seed(seed)
    return sact.create_model("resnet20_cifar", mode="sact", base_channels=4, in_chans=1, num_classes=4)


def _score(model) -> float:
    return float(model.fc.weight.detach().double().sum())


def _evaluate(calls):
    def evaluate(path):
        model = sact.load_checkpoint(path)  # every check, the data hash included
        calls.append(model.checkpoint_meta["step"])
        return {"score": _score(model)}, model.checkpoint_meta
    return evaluate


class Log:
    """The watcher's log lines, with a wait for a line containing some text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(text in x for x in self.lines) >= count, timeout), self.lines


def put(path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step, so the watcher sees each state whole."""
    tmp = path.with_name("staging.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_checkpoints_appearing_while_watching(tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    models = {step: _model(step) for step in (1, 2, 3)}
    log, calls, errors = Log(), [], []

    def trainer():  # plays a training run, waiting for the watcher to look at each state
        try:
            sact.save_checkpoint(models[1], run / "model", meta={"step": 1})
            log.wait_for("step 1:")
            blob = sact.save_checkpoint(models[2], tmp_path / "staged" / "model", meta={"step": 2}).read_bytes()
            put(run / "model.safetensors", blob[: len(blob) // 2])  # a copy cut short
            log.wait_for("retried when the file changes", 1)
            broken = bytearray(blob)
            broken[-10:] = b"\x00" * 10  # full length, the last bytes not yet written
            put(run / "model.safetensors", bytes(broken))
            log.wait_for("retried when the file changes", 2)
            sact.save_checkpoint(models[2], run / "model", meta={"step": 2})  # complete, by atomic rename
            log.wait_for("step 2:")
            sact.save_checkpoint(models[3], run / "model", meta={"step": 3})
            log.wait_for("step 3:")
            sact.save_checkpoint(models[3], run / "model", meta={"step": 3, "metrics": {"x": 1}})  # the final re-save
            log.wait_for("exists; not evaluated again")
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    run.mkdir()
    thread = threading.Thread(target=trainer)
    thread.start()
    start = time.monotonic()
    written = watch_checkpoints(run, _evaluate(calls), out_dir=out, poll_s=0.02, timeout_s=2.0, log=log)
    thread.join()
    assert not errors, errors
    assert time.monotonic() - start < 30 and "no new checkpoint for 2 s; stopping" in log.lines[-2]
    assert [p.name for p in written] == [f"metrics_step{s:09d}.json" for s in (1, 2, 3)]
    assert calls == [1, 2, 3], "a half-written file was evaluated"
    refused = [x for x in log.lines if "retried when the file changes" in x]
    assert "not a safetensors file" in refused[0] or "malformed" in refused[0]  # the header's offsets
    assert "does not match the hash in its header" in refused[1]  # the data hash
    for step, path in zip((1, 2, 3), written):
        assert json.loads(path.read_text()) == {"step": step, "score": _score(models[step])}
    # a restarted watcher continues: nothing is evaluated again, nothing overwritten
    before = {p: p.read_bytes() for p in written}
    assert watch_checkpoints(run, _evaluate(calls), out_dir=out, poll_s=0.02, timeout_s=0.2, log=Log()) == []
    assert calls == [1, 2, 3] and all(p.read_bytes() == b for p, b in before.items())


def test_ctrl_c_stops_cleanly_without_a_partial_file(tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    sact.save_checkpoint(_model(1), run / "model", meta={"step": 7})
    seen = []

    def evaluate(path):
        seen.append(path)
        raise KeyboardInterrupt  # Ctrl-C in the middle of an evaluation

    log = Log()
    assert watch_checkpoints(run, evaluate, out_dir=out, poll_s=0.01, log=log) == []
    assert len(seen) == 1 and "interrupted" in " ".join(log.lines)
    assert not out.exists()  # nothing half-written, not even an empty folder
    with pytest.raises(sact.errors.InputError, match="poll"):
        watch_checkpoints(run, evaluate, out_dir=out, poll_s=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(sact.errors.InputError, match="is a file"):
        watch_checkpoints(tmp_path / "file", evaluate, out_dir=out, poll_s=1)


def test_sact_eval_watch_writes_what_sact_eval_writes(tmp_path, capsys):
    data_dir = tiny_fashion_mnist(tmp_path / "fmnist")
    cfg = sact.engine.TrainConfig(model="resnet20_cifar", model_kwargs={"base_channels": 4}, eval_samples=6,
                                  clutter={"canvas_size": 16, "num_clutter": 2})
    sact.save_checkpoint(_halting_model(), tmp_path / "run" / "model", meta={"tau": 0.02, "step": 40,
                                                                             "config": cfg.to_dict()})
    common = ["--data-dir", str(data_dir), "--batch-size", "4", "--no-progress"]
    assert cli(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "one.json"), *common]) == 0
    assert cli(["eval", "--watch", str(tmp_path / "run"), "--poll", "0.05", "--watch-timeout", "0.5", *common]) == 0
    got = json.loads((tmp_path / "run" / "eval" / "metrics_step000000040.json").read_text())
    want = json.loads((tmp_path / "one.json").read_text())
    assert got["step"] == 40
    for k in ("num_images", "top1", "loss", "flops_mean", "flops_std", "ponder_cost_mean", "stages"):
        assert got[k] == want[k], k
    capsys.readouterr()
    for bad, words in ((["eval", str(tmp_path / "run"), "--watch", str(tmp_path / "run")], "exactly one"),
                       (["eval"], "exactly one"),
                       (["eval", "--watch", str(tmp_path / "run"), "--poll", "-1"], "--poll"),
                       (["eval", str(tmp_path / "run"), "--watch-timeout", "5"], "needs --watch")):
        assert cli(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("sact eval: ") and words in err and len(err.strip().splitlines()) == 1, err
