"""Cluttered Fashion-MNIST (single and multi-object) and its COCO export."""

import json

import numpy as np
import pytest
import torch

from sact.data import (
    ClutterConfig,
    ClutteredFashionMNIST,
    MultiObjectClutteredFashionMNIST,
    detection_collate,
    write_coco,
)
from sact.data import fashion_mnist as fm

TRAIN_VALUES = [120 + 5 * i for i in range(20)]  # train item i is constant TRAIN_VALUES[i]
TEST_VALUES = [30 + 5 * i for i in range(10)]  # disjoint from the train values, all > 0.1 * 255


def write_split(folder, prefix, values, labels, blob):
    images = np.zeros((len(values), 28, 28), np.uint8)
    for i, v in enumerate(values):
        if blob:  # an 18x13 block: item has a margin, so the tight box is smaller than the paste
            images[i, 4:22, 7:20] = v
        else:
            images[i] = v
    fm.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    fm.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(labels, np.uint8))


def make_fake(folder, blob):
    folder.mkdir()
    write_split(folder, "train", TRAIN_VALUES, [i % 5 for i in range(20)], blob)  # train labels 0..4
    write_split(folder, "t10k", TEST_VALUES, [5 + i % 5 for i in range(10)], blob)  # test labels 5..9
    return folder


@pytest.fixture
def squares(tmp_path):
    return make_fake(tmp_path / "squares", blob=False)


@pytest.fixture
def blobs(tmp_path):
    return make_fake(tmp_path / "blobs", blob=True)


def tight_box(mask):
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return [cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1]


def test_sample_format(blobs):
    ds = ClutteredFashionMNIST(split="test", num_samples=7, seed=3, data_dir=blobs)
    assert len(ds) == 7
    s = ds[0]
    assert s["image"].shape == (1, 64, 64) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert isinstance(s["label"], int) and s["box"].shape == (4,) and s["box"].dtype == torch.float32
    assert s["mask"].shape == (64, 64) and s["mask"].dtype == torch.bool
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 64, 64) and batch["label"].shape == (3,)
    stacked = ds.stack([4, 1])
    assert torch.equal(stacked["image"][0], ds[4]["image"]) and torch.equal(stacked["mask"][1], ds[1]["mask"])
    assert stacked["label"].tolist() == [ds[4]["label"], ds[1]["label"]]
    with pytest.raises(IndexError):
        ds[7]
    assert torch.equal(ds[-1]["image"], ds[6]["image"])


def test_deterministic_and_order_independent(blobs):
    a = ClutteredFashionMNIST(num_samples=20, seed=5, data_dir=blobs)
    b = ClutteredFashionMNIST(num_samples=20, seed=5, data_dir=blobs)
    forward = [a[i] for i in range(20)]
    backward = {i: b[i] for i in reversed(range(20))}
    for i in range(20):
        for key in ("image", "box", "mask"):
            assert torch.equal(forward[i][key], backward[i][key])
        assert forward[i]["label"] == backward[i]["label"]
    c = ClutteredFashionMNIST(num_samples=20, seed=6, data_dir=blobs)
    assert not torch.equal(a.stack()["image"], c.stack()["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    test = ClutteredFashionMNIST(split="test", num_samples=20, seed=5, data_dir=blobs)
    assert all(test[i]["label"] >= 5 for i in range(20))


@pytest.mark.parametrize("split,values", [("train", TRAIN_VALUES), ("test", TEST_VALUES)])
def test_split_items_only_and_clutter_from_other_items(squares, split, values):
    cfg = ClutterConfig(clutter_intensity=(1.0, 1.0), num_clutter=10)  # clutter keeps item values
    ds = ClutteredFashionMNIST(split=split, num_samples=40, seed=0, config=cfg, data_dir=squares)
    allowed = np.asarray(values, np.float32) / 255
    for i in range(len(ds)):
        s = ds[i]
        assert (s["label"] < 5) == (split == "train")
        image = s["image"][0]
        object_value = image[s["mask"]].median().item()
        assert np.isclose(allowed, object_value, atol=1e-6).any()
        x0, y0, x1, y1 = (int(v) for v in s["box"])
        outside = torch.ones_like(s["mask"])
        outside[y0:y1, x0:x1] = False
        clutter = image[outside & (image > 0)].numpy()
        assert clutter.size > 0
        nearest = np.abs(clutter[:, None] - allowed[None]).min(1)
        assert nearest.max() < 1e-6  # only this split's item values
        assert not np.isclose(clutter, object_value, atol=1e-6).any()  # never the object's own item


def test_box_and_mask_match_pasted_item(blobs):
    cfg = ClutterConfig(num_clutter=0)
    ds = ClutteredFashionMNIST(num_samples=30, seed=1, config=cfg, data_dir=blobs)
    for i in range(len(ds)):
        s = ds[i]
        image, mask = s["image"][0], s["mask"]
        assert torch.equal(image > cfg.mask_threshold, mask)  # no clutter: image is the item
        assert s["box"].tolist() == tight_box(mask)
        w, h = (s["box"][2:] - s["box"][:2]).tolist()
        # An 18x13 block scaled by 0.9..1.6 (plus at most one interpolated pixel per side).
        assert 0.9 * 18 - 1 <= h <= 1.6 * 18 + 2 and 0.9 * 13 - 1 <= w <= 1.6 * 13 + 2
    cluttered = ClutteredFashionMNIST(num_samples=30, seed=1, data_dir=blobs)
    for i in range(len(ds)):
        a, b = ds[i], cluttered[i]
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["box"], b["box"])  # same draw, clutter added
        assert torch.all(b["image"] >= a["image"])  # composition is the maximum
        assert torch.equal(b["image"][0][a["mask"]], torch.maximum(a["image"], b["image"])[0][a["mask"]])


def test_scale_range(squares):
    cfg = ClutterConfig(min_scale=1.5, max_scale=1.5, num_clutter=0)
    s = ClutteredFashionMNIST(num_samples=3, config=cfg, data_dir=squares)[2]
    assert (s["box"][2:] - s["box"][:2]).tolist() == [42.0, 42.0]
    assert s["mask"].sum() == 42 * 42


def test_transform_and_validation(blobs):
    ds = ClutteredFashionMNIST(num_samples=2, data_dir=blobs, transform=lambda x: x * 2 - 1)
    assert ds[0]["image"].min() == -1
    for kwargs, bad in [({"split": "val"}, "val"), ({"num_samples": 0}, "0"), ({"seed": -1}, "-1")]:
        with pytest.raises(ValueError, match=bad):
            ClutteredFashionMNIST(data_dir=blobs, **kwargs)
    for field, value in [("min_scale", 0.0), ("clutter_intensity", (0.8, 0.2)), ("min_objects", 5)]:
        with pytest.raises(ValueError, match=field):
            ClutterConfig(**{field: value})


def test_multi_object(blobs):
    cfg = ClutterConfig(canvas_size=96, min_objects=2, max_objects=4)
    ds = MultiObjectClutteredFashionMNIST(num_samples=25, seed=2, config=cfg, data_dir=blobs)
    counts = []
    for i in range(len(ds)):
        s = ds[i]
        k = len(s["labels"])
        counts.append(k)
        assert s["image"].shape == (1, 96, 96)
        assert s["boxes"].shape == (k, 4) and s["masks"].shape == (k, 96, 96) and s["labels"].dtype == torch.int64
        for j in range(k):
            assert s["boxes"][j].tolist() == tight_box(s["masks"][j])
            assert torch.all(s["image"][0][s["masks"][j]] > cfg.mask_threshold)
            for m in range(j):
                a, b = s["boxes"][j], s["boxes"][m]
                iw = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_min(0)
                ih = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_min(0)
                inter = iw * ih
                union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
                assert inter / union <= cfg.max_iou + 1e-6
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    images, targets = detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 1, 96, 96) and set(targets[0]) == {"labels", "boxes", "masks"}
    assert torch.equal(targets[1]["boxes"], ds[1]["boxes"])


def test_write_coco(blobs, tmp_path):
    from PIL import Image

    path = write_coco(tmp_path / "coco", split="test", num_images=5, seed=4, canvas_size=80, data_dir=blobs)
    assert path == tmp_path / "coco" / "annotations" / "instances_test.json"
    coco = json.loads(path.read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert coco["categories"][9]["name"] == "Ankle boot"
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 4, 5]
    ds = MultiObjectClutteredFashionMNIST(
        split="test", num_samples=5, seed=4, config=ClutterConfig(canvas_size=80, num_clutter=12), data_dir=blobs
    )
    assert len(coco["annotations"]) == sum(len(ds[i]["labels"]) for i in range(5))
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for im in coco["images"]:
        assert (im["width"], im["height"]) == (80, 80)
        png = Image.open(tmp_path / "coco" / "images" / "test" / im["file_name"])
        assert png.mode == "L" and png.size == (80, 80)
        expected = (ds[im["id"] - 1]["image"][0].numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(png), expected)
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 80 and y + h <= 80
        assert 6 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0  # test fake labels are 5..9
        assert sum(ann["segmentation"]["counts"]) == 80 * 80 and ann["area"] > 0
    again = write_coco(tmp_path / "coco2", split="test", num_images=5, seed=4, canvas_size=80, data_dir=blobs)
    assert again.read_text() == path.read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside pycocotools with numpy 2
def test_coco_loads_in_pycocotools(blobs, tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    path = write_coco(tmp_path, split="train", num_images=4, seed=0, data_dir=blobs)
    coco = coco_module.COCO(str(path))
    ds = MultiObjectClutteredFashionMNIST(split="train", num_samples=4, seed=0, data_dir=blobs)
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        sample = ds[image_id - 1]
        assert [a["category_id"] - 1 for a in anns] == sample["labels"].tolist()
        for ann, mask, box in zip(anns, sample["masks"], sample["boxes"]):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask.numpy())
            x0, y0, x1, y1 = box.tolist()
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]


HAVE_REAL = (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()


@pytest.mark.skipif(not HAVE_REAL, reason="dataset-fashion-mnist not installed")
def test_real_data_defaults():
    torch.set_num_threads(1)
    ds = ClutteredFashionMNIST(split="test", num_samples=200, seed=0)
    batch = ds.stack()
    assert batch["image"].shape == (200, 1, 64, 64)
    assert batch["mask"].flatten(1).any(1).all()
    assert (batch["box"][:, :2] >= 0).all() and (batch["box"][:, 2:] <= 64).all()
    assert (batch["box"][:, 2:] > batch["box"][:, :2]).all()
    assert len(batch["label"].unique()) == 10
    for i in range(0, 200, 20):
        assert batch["box"][i].tolist() == tight_box(batch["mask"][i])


def test_same_samples_through_dataloader_workers(blobs):
    ds = ClutteredFashionMNIST(num_samples=8, seed=9, data_dir=blobs)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    images = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(images, ds.stack()["image"])
