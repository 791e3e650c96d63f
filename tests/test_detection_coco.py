"""COCO-format data and evaluation for detection: validation rules, pycocotools AP, the eval CLI.

Also holds :func:`write_synthetic_coco`, the tiny-set writer the other detection tests import.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sact.cli import main
from sact.detection import CocoDetection, CocoFormatError, coco_evaluate, load_coco_json


def write_synthetic_coco(root: Path, *, split: str = "train", num_images: int = 8, size: int = 64, seed: int = 0,
                         empty: int = 0) -> tuple[Path, Path]:
    """Images with 1-3 squares: category 1 filled, category 7 hollow (ids need not be contiguous).

    The last ``empty`` images hold no object. Returns ``(image_dir, annotation_file)``.
    """
    rng = np.random.default_rng(seed)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        img = (rng.random((size, size)) * 40).astype(np.uint8)
        n = 0 if i >= num_images - empty else int(rng.integers(1, 4))
        for _ in range(n):
            s = int(rng.integers(14, 26))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            cat = int(rng.choice([1, 7]))
            if cat == 1:
                img[y:y + s, x:x + s] = 230
            else:
                img[y:y + s, x:x + 3] = 230
                img[y:y + s, x + s - 3:x + s] = 230
                img[y:y + 3, x:x + s] = 230
                img[y + s - 3:y + s, x:x + s] = 230
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, s, s],
                         "area": s * s, "iscrowd": 0})
        name = f"{i + 1:04d}.png"
        Image.fromarray(img).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "filled"}, {"id": 7, "name": "hollow"}]}
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(json.dumps(doc))
    return image_dir, ann


def _edit(ann: Path, fn) -> Path:
    doc = json.loads(ann.read_text())
    fn(doc)
    out = ann.with_name("edited.json")
    out.write_text(json.dumps(doc))
    return out


def test_dataset_targets_match_json(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=4)
    ds = CocoDetection(images, ann, in_chans=1)
    doc = json.loads(ann.read_text())
    assert ds.num_classes == 3 and ds.label_to_category == {1: 1, 2: 7}
    image, target = ds[0]
    assert image.shape == (1, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    gt = [a for a in doc["annotations"] if a["image_id"] == target["image_id"]]
    expected = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in gt)
    assert sorted(target["boxes"].tolist()) == expected
    assert sorted(ds.label_to_category[int(lab)] for lab in target["labels"]) == sorted(a["category_id"] for a in gt)
    rgb, _ = CocoDetection(images, ann, in_chans=3)[0]
    assert rgb.shape == (3, 64, 64)


def test_hflip_moves_boxes_with_the_image(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=2)
    plain, flipped = CocoDetection(images, ann), CocoDetection(images, ann, hflip=1.0)
    (im, t), (imf, tf) = plain[0], flipped[0]
    assert np.array_equal(imf.numpy(), im.flip(-1).numpy())
    b = t["boxes"]
    assert np.allclose(tf["boxes"].numpy(), np.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], 1))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("annotations"), ["'annotations'", "top level"]),
        (lambda d: d["images"][1].pop("width"), ["images[1]", "'width'"]),
        (lambda d: d["annotations"][0].pop("bbox"), ["annotations[0]", "'bbox'"]),
        (lambda d: d["annotations"][2].update(category_id=99), ["annotations[2]", "category_id 99"]),
        (lambda d: d["annotations"][0].update(image_id=1234), ["unknown image_id 1234"]),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), ["bbox must be [x, y, w, h]"]),
        (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), ["repeats annotation id"]),
        (lambda d: d["categories"].clear(), ["'categories' is empty"]),
    ],
)
def test_malformed_json_names_file_and_field(tmp_path, edit, words):
    images, ann = write_synthetic_coco(tmp_path, num_images=4)
    bad = _edit(ann, edit)
    with pytest.raises(CocoFormatError) as err:
        CocoDetection(images, bad)
    assert str(bad) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_not_json_is_a_clear_error(tmp_path):
    p = tmp_path / "instances_x.json"
    p.write_text("{not json")
    with pytest.raises(CocoFormatError, match="cannot read COCO json"):
        load_coco_json(p)


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=3)

    def edit(d):
        d["annotations"][0]["bbox"] = [-5, 50, 20, 30]  # reaches left and bottom: clipped to [0, 50, 15, 14]
        d["annotations"][1]["bbox"] = [70, 70, 10, 10]  # entirely outside: dropped
        d["annotations"][2]["bbox"] = [10, 10, 0, 5]  # zero width: dropped
        for a in d["annotations"]:
            a.pop("area")  # defaults to w * h

    bad = _edit(ann, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_coco_json(bad)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 box(es) reach outside" in messages and "2 empty box(es)" in messages and str(bad) in messages
    by_id = {a["id"]: a for a in data["annotations"]}
    first = json.loads(ann.read_text())["annotations"]
    assert by_id[first[0]["id"]]["bbox"] == [0, 50, 15, 14] and by_id[first[0]["id"]]["area"] == 15 * 14
    assert first[1]["id"] not in by_id and first[2]["id"] not in by_id
    assert len(data["annotations"]) == len(first) - 2


def test_empty_images_kept_for_eval_and_skipped_for_training(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=6, empty=2)
    assert len(CocoDetection(images, ann)) == 6
    train = CocoDetection(images, ann, skip_empty=True)
    assert len(train) == 4 and all(len(train[i][1]["boxes"]) > 0 for i in range(4))
    _, target = CocoDetection(images, ann)[5]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_image_size_mismatch_is_reported(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=2)
    bad = _edit(ann, lambda d: d["images"][0].update(width=80))
    with pytest.raises(CocoFormatError, match="on disk"):
        CocoDetection(images, bad)[0]


def _hand_made_detections(ann: Path, seed: int = 0) -> list[dict]:
    """Ground truth jittered (some far off), random scores, wrong classes and false positives."""
    rng = np.random.default_rng(seed)
    doc = json.loads(ann.read_text())
    dets = []
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 1.5 if rng.random() < 0.7 else 6, 4)
        cat = a["category_id"] if rng.random() < 0.8 else (8 - a["category_id"])
        dets.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                     "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
    for im in doc["images"]:
        dets.append({"image_id": im["id"], "category_id": 1, "score": float(rng.random() * 0.5),
                     "bbox": [float(rng.uniform(0, 40)), float(rng.uniform(0, 40)), 12.0, 12.0]})
    return dets


def test_eval_cli_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, ann = write_synthetic_coco(tmp_path, split="test", num_images=12, seed=3)
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(json.dumps(_hand_made_detections(ann)))
    out = tmp_path / "eval"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["detect", "eval", "--data", str(tmp_path), "--detections", str(dets_file), "--out", str(out)]) == 0
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(str(dets_file)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    want = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ev.stats[:6]))
    assert 0.05 < want["AP"] < 0.95  # a non-trivial case
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v), abs=1e-12), k


def test_no_detections_give_zero_ap(tmp_path):
    images, ann = write_synthetic_coco(tmp_path, num_images=3)
    ds = CocoDetection(images, ann)
    m = coco_evaluate(ds.coco, [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in ds.coco.dataset["annotations"]]
    assert coco_evaluate(ds.coco, perfect)["AP"] == pytest.approx(1.0)


def test_make_data_writes_coco(tmp_path):
    from sact.data import find_fashion_mnist

    try:
        find_fashion_mnist()
    except Exception:  # noqa: BLE001 - any "not found" flavour
        pytest.skip("Fashion-MNIST files not installed")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["detect", "make-data", "--out", str(tmp_path), "--num-train", "3", "--num-val", "2",
                     "--canvas-size", "64"]) == 0
    train = CocoDetection(tmp_path / "images" / "train", tmp_path / "annotations" / "instances_train.json")
    val = CocoDetection(tmp_path / "images" / "test", tmp_path / "annotations" / "instances_test.json")
    assert len(train) == 3 and len(val) == 2 and train.num_classes == 11
    image, target = train[0]
    assert image.shape == (1, 64, 64) and len(target["boxes"]) >= 1


def test_bad_detections_are_reported(tmp_path, capsys):
    images, ann = write_synthetic_coco(tmp_path, split="test", num_images=2)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert main(["detect", "eval", "--data", str(tmp_path), "--detections", str(dets)]) == 2
    assert "sact detect eval:" in (err := capsys.readouterr().err) and "image_id 99" in err
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]))
    assert main(["detect", "eval", "--data", str(tmp_path), "--detections", str(dets)]) == 2
    assert "score" in capsys.readouterr().err
