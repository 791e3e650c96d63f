"""Files someone else made never run code: resume states, CIFAR batches, a checkpoint's
data folder, ``.pt2`` exports (issue 18, items 1-3).

Each malicious file carries a harmless payload that would create a marker file if it
were unpickled; every test asserts the marker does not exist afterwards, the exit code
and the one-line message.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

import sact
import sact.data
from sact.cli import main
from helpers import TRAIN_FLAGS, Payload, error_line, malicious_pickle, snapshot, tiny_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def _cifar_folder(folder, n=4, protocol=4, labels_as="list"):
    """CIFAR-10 batches in the real format (bytes keys, uint8 [N, 3072], list labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels if labels_as == "list" else np.array(labels),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [c.encode() for c in sact.data.CIFAR10_CLASSES], b"num_cases_per_batch": n,
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_cifar_batch_runs_no_code(tmp_path, capsys, protocol):
    # the restricted reader still reads the real format (bytes keys, numpy arrays, lists)
    folder = _cifar_folder(tmp_path / "cifar-10-batches-py", protocol=protocol,
                           labels_as="array" if protocol == 5 else "list")
    ds = sact.data.CIFAR10(tmp_path, train=True)
    assert len(ds) == 20 and ds.classes == sact.data.CIFAR10_CLASSES
    raw = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
    image, label = ds[5]  # second image of data_batch_2
    assert torch.equal(image, torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32)))
    assert label == int(raw[b"labels"][1])
    # a batch naming any other callable is refused before anything runs
    folder = _cifar_folder(tmp_path / "evil" / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(malicious_pickle(marker, protocol))
    with pytest.raises(ValueError, match=r"refused to load global .*open.*not part of a CIFAR-10 batch"):
        sact.data.CIFAR10(tmp_path / "evil", train=False)
    assert not marker.exists()
    # through the CLI: exit 2, one line naming the file
    model = sact.create_model("resnet20_cifar", base_channels=4)
    sact.save_checkpoint(model, tmp_path / "ck", meta={"config": {"dataset": "cifar10"}})
    rc = main(["eval", str(tmp_path / "ck"), "--data-dir", str(tmp_path / "evil"), "--out", str(tmp_path / "m.json"),
               "--no-progress"])
    line = error_line(capsys.readouterr().err, "eval")
    assert rc == 2 and "test_batch" in line and "refused" in line
    assert not marker.exists() and not (tmp_path / "m.json").exists()


def test_corrupt_and_truncated_cifar_batches_are_clear_errors(tmp_path):
    folder = _cifar_folder(tmp_path / "cifar-10-batches-py")
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 batch"):
        sact.data.CIFAR10(tmp_path, train=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="expected uint8 data"):
        sact.data.CIFAR10(tmp_path, train=False)
    (folder / "test_batch").write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(ValueError, match="not a dict"):
        sact.data.CIFAR10(tmp_path, train=False)


def test_eval_never_opens_a_data_folder_named_by_the_checkpoint(tmp_path, capsys, fmnist, monkeypatch):
    import sact.data.fashion_mnist as fm

    marker = tmp_path / "pwned"
    evil = _cifar_folder(tmp_path / "shipped" / "cifar-10-batches-py")
    (evil / "test_batch").write_bytes(malicious_pickle(marker))
    model = sact.create_model("resnet20_cifar", base_channels=4, in_chans=1)
    config = {"dataset": "cifar10", "data_dir": str(tmp_path / "shipped"), "eval_samples": 4}
    sact.save_checkpoint(model, tmp_path / "ck", meta={"config": config})
    rc = main(["eval", str(tmp_path / "ck"), "--out", str(tmp_path / "m.json"), "--no-progress"])
    line = error_line(capsys.readouterr().err, "eval")
    assert rc == 2 and "--data-dir" in line and not marker.exists()
    # a cluttered checkpoint naming a folder: the canvases come from the system copy
    # (here a stand-in), never from the folder inside the checkpoint
    shipped = tmp_path / "shipped_fmnist"
    shipped.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (shipped / name).write_bytes(b"\x00\x00\x08\x01corrupt")  # would fail loudly if read
    monkeypatch.setattr(fm, "DEBIAN_DIR", fmnist)
    config = {"dataset": "cluttered", "data_dir": str(shipped), "eval_samples": 4,
              "clutter": {"canvas_size": 32, "num_clutter": 2}}
    sact.save_checkpoint(model, tmp_path / "ck2", meta={"config": config, "tau": 0.01})
    assert main(["eval", str(tmp_path / "ck2"), "--out", str(tmp_path / "m2.json"), "--no-progress"]) == 0
    assert '"num_images": 4' in (tmp_path / "m2.json").read_text()


def _legacy_state(path, marker):
    torch.save({"model": Payload(marker), "step": 1}, path)  # what sact <= 0.1 wrote, with a payload


def test_resume_never_unpickles_a_state(tmp_path, capsys, fmnist):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data-dir", str(fmnist), *TRAIN_FLAGS]) == 0
    capsys.readouterr()  # the run's report
    marker = tmp_path / "pwned"
    # an old-format pickle next to (or instead of) the state is never opened
    (out / "train_state.safetensors").unlink(missing_ok=True)
    _legacy_state(out / "train_state.pt", marker)
    before = snapshot(out)
    rc = main(["train", "--out", str(out), "--data-dir", str(fmnist), *TRAIN_FLAGS, "--resume"])
    line = error_line(capsys.readouterr().err, "train")
    assert rc == 2 and "train_state.pt" in line and "pickle" in line and "arbitrary code" in line
    assert not marker.exists() and snapshot(out) == before
    # a pickle under the new name is not a safetensors file: refused, not unpickled
    _legacy_state(out / "train_state.safetensors", marker)
    before = snapshot(out)
    rc = main(["train", "--out", str(out), "--data-dir", str(fmnist), *TRAIN_FLAGS, "--resume"])
    line = error_line(capsys.readouterr().err, "train")
    assert rc == 2 and "not a safetensors file" in line
    assert not marker.exists() and snapshot(out) == before


def test_state_file_holds_no_pickle(tmp_path, fmnist):
    from safetensors import safe_open

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data-dir", str(fmnist), *TRAIN_FLAGS]) == 0
    path = out / "train_state.safetensors"
    assert not (out / "train_state.pt").exists()
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file with JSON metadata
        meta = f.metadata()
        assert meta["format"] == "sact-train-state" and "model.conv" not in meta["state"]
        assert any(k.startswith("state.model.") for k in f.keys())


def test_pt2_export_needs_trusted(tmp_path):
    from sact.tools.export import load_exported

    marker = tmp_path / "pwned"
    archive = tmp_path / "model.pt2"
    with zipfile.ZipFile(archive, "w") as z:  # a .pt2 is a zip of pickles
        z.writestr("model/data.pkl", pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"arbitrary code.*trusted=True"):
        load_exported(archive)
    assert not marker.exists()
