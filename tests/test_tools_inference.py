"""``sact.predict`` and ``sact predict``: top-k classes, FLOPs and ponder cost of image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sact
from sact.cli import main
from sact.data import ImageFolderDataset, Preprocess
from sact.errors import InputError
from sact.tools.inference import checkpoint_class_names, find_images
from tests.helpers import error_line

CLASSES = [f"class {i}" for i in range(10)]
# resized to 32x32 like training, so images of any size share a batch
PRE = Preprocess(kind="standardize", in_chans=3, image_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = sact.create_model("resnet20_cifar", base_channels=4)
    with torch.no_grad():  # spread the halting so that images differ in FLOPs
        for stage in model.stages:
            for branch in stage.halting:
                branch.local_conv.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    sact.save_checkpoint(model, path, meta={"preprocess": PRE.to_dict(), "classes": CLASSES})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """``folder/{a.png, b.jpg, sub/c.png}`` of different sizes, plus files that are not images."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (32, 32), "b.jpg": (24, 40), "sub/c.png": (48, 36)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes((folder / "a.png").read_bytes())
    return folder


@pytest.fixture
def pure_pytorch_sparse():
    """The sparse engine's pure-PyTorch kernels (no native build in these tests)."""
    from sact.sparse import native

    prev = native.set_enabled(False)
    yield
    native.set_enabled(prev)


def _cli(*args):
    return main(["predict", *map(str, args), "--device", "cpu", "--no-progress"])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_probabilities_flops_and_ponder_are_the_models_on_the_training_input(checkpoint, images):
    model = sact.load_checkpoint(checkpoint)
    files = [images / "a.png", images / "b.jpg", images / "sub" / "c.png"]
    model.train()
    preds = sact.predict(model, files, topk=3, batch_size=2)
    assert model.training  # mode restored

    # the input training and `sact eval` build for these files
    data = ImageFolderDataset([(str(f), 0) for f in files], CLASSES, transform=PRE)
    x = torch.stack([data[i][0] for i in range(len(files))])
    with torch.no_grad():
        out = model.eval()(x)
    probs = out.logits.softmax(dim=1)
    assert [p.image for p in preds] == [str(f) for f in files]
    for b, p in enumerate(preds):
        assert len(p.topk) == 3
        got = [prob for _, _, prob in p.topk]
        assert got == sorted(got, reverse=True)
        assert [i for i, _, _ in p.topk] == probs[b].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor(got), probs[b].topk(3).values)
        assert [name for _, name, _ in p.topk] == [CLASSES[i] for i, _, _ in p.topk]
        assert p.flops == int(out.flops[b]) and p.ponder_cost == pytest.approx(float(out.ponder_cost[b]), rel=1e-5)
        assert p.input_size == (32, 32)
    assert len({p.flops for p in preds}) > 1  # the FLOPs really are per image


def test_tensors_of_different_sizes_and_pil_images(checkpoint, images):
    model = sact.load_checkpoint(checkpoint)
    xs = [torch.randn(3, 32, 32), torch.randn(3, 24, 40), torch.randn(3, 24, 40)]
    preds = sact.predict(model, xs, topk=20, class_names=list("abcdefghij"))
    assert [p.image for p in preds] == [0, 1, 2]
    assert [p.input_size for p in preds] == [(32, 32), (24, 40), (24, 40)]
    for x, p in zip(xs, preds):
        with torch.no_grad():
            out = model(x[None])
        assert len(p.topk) == 10  # at most the number of classes
        assert p.topk[0][:2] == (int(out.logits.argmax()), "abcdefghij"[int(out.logits.argmax())])
        assert p.flops == int(out.flops[0])
    assert sact.predict(model, torch.stack(xs[1:]), topk=1)[1].flops == preds[2].flops  # a batch tensor
    pil = Image.open(images / "b.jpg")
    assert sact.predict(model, pil)[0].to_dict()["topk"] == sact.predict(model, images / "b.jpg")[0].to_dict()["topk"]
    with pytest.raises(ValueError, match="topk"):
        sact.predict(model, xs, topk=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        sact.predict(model, [torch.randn(1, 32, 32)])


def test_dense_and_sparse_give_the_same_classes_and_flops(checkpoint, images, tmp_path, capsys, pure_pytorch_sparse,
                                                          monkeypatch):
    import sact.sparse

    wrapped = []
    monkeypatch.setattr(sact.sparse, "to_sparse", lambda m: wrapped.append(sact.to_sparse(m)) or wrapped[-1])
    assert _cli(images, "--checkpoint", checkpoint, "--out", tmp_path / "dense.jsonl") == 0
    assert not wrapped
    assert _cli(images, "--checkpoint", checkpoint, "--out", tmp_path / "sparse.jsonl", "--sparse") == 0
    assert len(wrapped) == 1  # the predictions came from the sparse engine
    dense, sparse = _jsonl(tmp_path / "dense.jsonl"), _jsonl(tmp_path / "sparse.jsonl")
    assert [r["flops"] for r in dense] == [r["flops"] for r in sparse]
    assert [[t["class"] for t in r["topk"]] for r in dense] == [[t["class"] for t in r["topk"]] for r in sparse]


def test_cli_folder_and_glob_table_and_jsonl(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert _cli(images, "--checkpoint", checkpoint, "--topk", "2", "--out", out) == 0
    table = capsys.readouterr().out.splitlines()
    records = _jsonl(out)
    expected = [str(images / "a.png"), str(images / "b.jpg"), str(images / "sub" / "c.png")]  # sorted, no .hidden
    assert [r["image"] for r in records] == expected
    for r in records:
        assert set(r) == {"image", "topk", "flops", "ponder_cost", "input_size"}
        assert len(r["topk"]) == 2 and r["topk"][0]["name"] in CLASSES
        assert 0 < r["topk"][1]["probability"] <= r["topk"][0]["probability"] <= 1
    assert table[0].split() == ["image", "class", "prob", "MFLOPs", "ponder"]
    assert len(table) == 1 + 2 * len(records)  # a row per image, a line per further class
    first = records[0]
    assert table[1].startswith(first["image"]) and f"{first['flops'] / 1e6:.2f}" in table[1]
    assert first["topk"][1]["name"] in table[2] and not table[2].startswith(first["image"])

    assert _cli(f"{images}/*.png", f"{images}/*.jpg", images / "a.png", "--checkpoint", checkpoint, "--topk", "1") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [str(images / "a.png"), str(images / "b.jpg")]  # a.png once


def test_existing_out_is_refused_unless_overwrite(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    out.write_text("mine\n")
    assert _cli(images / "a.png", "--checkpoint", checkpoint, "--out", out) == 2
    assert "already exists" in error_line(capsys.readouterr().err, "predict")
    assert out.read_text() == "mine\n"
    assert _cli(images / "a.png", "--checkpoint", checkpoint, "--out", out, "--overwrite") == 0
    assert len(_jsonl(out)) == 1


@pytest.mark.parametrize("bad, message", [("notes.txt", "cannot read image"), ("missing.png", "no such file"),
                                          ("*.gif", "no file matches"), ("sub/nothing*", "no file matches")])
def test_bad_inputs_give_one_line_and_exit_2(checkpoint, images, tmp_path, capsys, bad, message):
    out = tmp_path / "p.jsonl"
    assert _cli(images / "a.png", images / bad, "--checkpoint", checkpoint, "--out", out) == 2
    assert message in error_line(capsys.readouterr().err, "predict")
    assert not out.exists()


def test_bad_checkpoint_and_empty_folder(images, tmp_path, capsys):
    assert _cli(images / "a.png", "--checkpoint", images / "a.png") == 2
    assert "cannot load checkpoint" in error_line(capsys.readouterr().err, "predict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image found"):
        find_images([tmp_path / "empty"])


def test_class_names_follow_the_label_offset():
    model = sact.create_model("resnet20_cifar", base_channels=4, num_classes=4)
    assert checkpoint_class_names(model) is None
    model.checkpoint_meta = {"classes": ["x", "y", "z"], "config": {"label_offset": 1}}
    assert checkpoint_class_names(model) == [None, "x", "y", "z"]
    names = {i: name for i, name, _ in sact.predict(model, torch.randn(3, 16, 16), topk=4)[0].topk}
    assert names == {0: None, 1: "x", 2: "y", 3: "z"}
