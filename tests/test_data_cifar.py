"""CIFAR-10 batches in torchvision's pickle format, and the reference transforms."""

import pickle

import numpy as np
import pytest
import torch

from sact.data import CIFAR10, cifar_eval_transform, cifar_train_transform, per_image_standardize


def write_cifar(root, n=4, with_meta=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": i for i in range(1, 6)} | {"test_batch": 9}
    for name, fill in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[0] = fill  # a constant first image identifies the batch
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": [fill] * n}, f)
    if with_meta:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return folder


def test_load_raw(tmp_path):
    folder = write_cifar(tmp_path)
    train = CIFAR10(tmp_path, train=True)
    test = CIFAR10(folder, train=False)  # the batches folder itself works too
    assert len(train) == 20 and len(test) == 4
    image, label = train[4]  # first image of data_batch_2
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert label == 2 and bool((image == 2).all())
    assert test[0][1] == 9 and train.classes[9] == "truck"
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][1]
    image = train[1][0]
    assert image[0, 0, 1] == raw[1] and image[1, 0, 0] == raw[1024] and image[2, 31, 31] == raw[3071]  # R,G,B planes


def test_missing_file_named(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10(tmp_path, train=True)
    assert len(CIFAR10(tmp_path, train=False)) == 4
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR10(tmp_path / "nowhere", train=False)


def test_bad_batch(tmp_path):
    folder = write_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch"):
        CIFAR10(tmp_path, train=False)


def test_standardisation_matches_tf_formula():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = cifar_eval_transform()(x)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert abs(out.mean().item()) < 1e-5 and abs(out.std(correction=0).item() - 1) < 1e-4
    xf = x.double()
    expected = (xf - xf.mean()) / max(xf.std(unbiased=False).item(), 1 / np.sqrt(3072))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    flat = per_image_standardize(torch.full((3, 4, 4), 7.0))  # std 0 -> divided by 1/sqrt(48), not nan
    assert torch.equal(flat, torch.zeros(3, 4, 4))
    batch = per_image_standardize(torch.stack([x, x.flip(-1)]).float())
    torch.testing.assert_close(batch[0], out)


def test_train_transform_crop_and_flip(tmp_path):
    write_cifar(tmp_path)
    ds = CIFAR10(tmp_path, train=True, transform=cifar_train_transform())
    image, _ = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # A ramp makes each crop offset / flip distinguishable.
    ramp = torch.arange(32, dtype=torch.uint8).mul(4).add(100).expand(3, 32, 32).clone()
    transform = cifar_train_transform()
    torch.manual_seed(0)
    outs = [transform(ramp) for _ in range(200)]
    zeros = {int((o == o.min()).all(0).all(0).sum()) for o in outs}  # zero-padded columns show up as the minimum
    assert zeros == {0, 1, 2}
    increasing = sum(bool(o[0, 16, 20] > o[0, 16, 10]) for o in outs)
    assert 60 < increasing < 140  # about half flipped
    for o in outs[:20]:
        assert abs(o.mean().item()) < 1e-5 and abs(o.std(correction=0).item() - 1) < 1e-4
