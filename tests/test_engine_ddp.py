"""``torchrun`` with 2 CPU processes (gloo): trains, ranks agree after every step, only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import sact

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from torch.utils.data import Dataset
    import sact, sact.engine.train, sact.io.files
    from sact.engine import TrainConfig, main

    torch.set_num_threads(1)
    rank, out = int(os.environ["RANK"]), sys.argv[1]
    writes = []
    real = sact.io.files.atomic_write_bytes
    def spy(path, data):
        writes.append(str(path))
        return real(path, data)
    # record every file this rank writes: every module that imported the one writer
    users = [m for name, m in list(sys.modules.items()) if name.startswith("sact") and getattr(m, "atomic_write_bytes", None) is real]
    assert len(users) >= 4, [m.__name__ for m in users]
    for module in users:
        module.atomic_write_bytes = spy

    class Patterns(Dataset):
        classes = ["a", "b", "c", "d"]
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.labels = torch.arange(n) % 4
            self.images = torch.rand(n, 1, 16, 16, generator=g)
            for i, k in enumerate(self.labels):
                self.images[i, 0, 4 * int(k):4 * int(k) + 4] += 1.0
        def __len__(self):
            return len(self.labels)
        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    hashes, first_labels = [], []
    def on_step(step, net):
        # parameters; BatchNorm running statistics are per-rank between steps and DDP
        # broadcasts rank 0's at every forward (checkpoints hold rank 0's)
        blob = b"".join(p.detach().numpy().tobytes() for p in net.parameters())
        hashes.append(hashlib.sha256(blob).hexdigest())

    cfg = TrainConfig(model="resnet20_cifar", mode="sact", model_kwargs={"base_channels": 4}, batch_size=4,
                      eval_batch_size=8, steps=6, lr=0.05, out_dir=out, checkpoint_every=2, tensorboard=True,
                      log_every=1, image_every=3, progress=False, device="cpu")
    metrics = main(cfg, train_set=Patterns(24), eval_set=Patterns(10), step_callback=on_step)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # the test's own record
        json.dump({"hashes": hashes, "writes": writes, "num_images": metrics["num_images"],
                   "top1": metrics["top1"]}, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert len(r0["hashes"]) == 6
    assert r0["hashes"] == r1["hashes"], "ranks disagree on the weights after some step"
    assert len(set(r0["hashes"])) == 6, "weights must change at every step"
    assert r1["writes"] == [], f"rank 1 wrote {r1['writes']}"
    written = {os.path.basename(p) for p in r0["writes"]}
    assert {"model.safetensors", "model.json", "train_state.safetensors", "metrics.json", "config.yaml"} <= written
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    # evaluation is sharded over the ranks and summed: every image counted once
    assert r0["num_images"] == r1["num_images"] == 10 and r0["top1"] == r1["top1"]
    model = sact.load_checkpoint(out / "model")
    assert model.checkpoint_meta["step"] == 6
