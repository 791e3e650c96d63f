"""evaluate_dataset + write_report on a generated CAT2000-layout folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sact.saliency.baselines import center_bias, uniform
from sact.saliency.cat2000 import CAT2000
from sact.saliency.evaluate import _other_fixations, evaluate_dataset, write_report
from sact.saliency.metrics import METRICS, auc_shuffled, evaluate_all, nss
from sact.saliency.synthetic import make_synthetic_cat2000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_cat2000(
        tmp_path_factory.mktemp("cat") / "trainSet",
        categories=("Action", "Indoor", "Sketch"),
        n_per_category=3,
        size=(24, 32),
        n_fixations=15,
        seed=2,
    )
    return CAT2000(root)


def _cb(item):
    return center_bias(*item.size, sigma_frac=0.2)


def test_center_bias_report(dataset, tmp_path):
    res = evaluate_dataset(dataset, _cb, progress=False)
    assert res["metrics"] == list(METRICS)
    assert len(res["items"]) == 9
    assert list(res["categories"]) == ["Action", "Indoor", "Sketch"]
    assert res["overall"]["n"] == 9
    for m in METRICS:
        vals = [r[m] for r in res["items"]]
        assert all(np.isfinite(vals)), m
        assert res["overall"][m] == pytest.approx(np.mean(vals))
        assert res["categories"]["Indoor"][m] == pytest.approx(np.mean(vals[3:6]))
    # fixations are centre-biased: the centre bias beats chance
    assert res["overall"]["auc_judd"] > 0.8
    assert res["overall"]["nss"] > 1.0
    assert res["overall"]["cc"] > 0.5
    # a per-item value is the metric itself
    it = dataset[0]
    assert res["items"][0]["nss"] == pytest.approx(nss(_cb(it), it.fixation_locs))
    assert (res["items"][0]["category"], res["items"][0]["name"]) == ("Action", "1")

    json_path, md_path = write_report(res, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert json_path.name == "saliency.json" and md_path.name == "saliency.md"
    assert set(data["categories"]) == {"Action", "Indoor", "Sketch"}
    assert data["overall"]["n"] == 9
    assert data["overall"]["auc_judd"] == pytest.approx(res["overall"]["auc_judd"])
    md = md_path.read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| category"))
    for label in ("AUC-Judd", "AUC-Borji", "sAUC", "NSS", "CC", "KL", "SIM"):
        assert label in header
    for cat in ("Action", "Indoor", "Sketch"):
        row = next(line for line in lines if line.startswith(f"| {cat} |"))
        assert f"| {res['categories'][cat]['nss']:.3f} |" in row
    overall = next(line for line in lines if line.startswith("| **overall** |"))
    assert f"| 9 | {res['overall']['auc_judd']:.3f} |" in overall


def test_uniform_is_chance_and_deterministic(dataset):
    res = evaluate_dataset(dataset, lambda it: uniform(*it.size), progress=False)
    for m, chance in (("auc_judd", 0.5), ("auc_borji", 0.5), ("auc_shuffled", 0.5), ("nss", 0.0), ("cc", 0.0)):
        assert res["overall"][m] == chance
    a = evaluate_dataset(dataset, _cb, metrics=["auc_shuffled", "auc_judd"], seed=3, progress=False)
    b = evaluate_dataset(dataset, _cb, metrics=["auc_judd", "auc_shuffled"], seed=3, progress=False)
    assert [r["auc_shuffled"] for r in a["items"]] == [r["auc_shuffled"] for r in b["items"]]
    assert a["metrics"] == ["auc_shuffled", "auc_judd"]


def test_shuffled_pool_uses_other_images_of_category(dataset):
    # With n_other=None the negatives are the union of the other images'
    # fixations in the category: recompute item 4 (Indoor/2) by hand.
    res = evaluate_dataset(dataset, _cb, metrics=["auc_shuffled"], n_other=None, progress=False)
    other = dataset[3].fixation_locs | dataset[5].fixation_locs
    it = dataset[4]
    rng = np.random.default_rng([0, 4])  # the per-item seed
    expected = evaluate_all(
        _cb(it), it.fixation_locs, it.fixation_map, other_fixations=other, metrics=["auc_shuffled"], rng=rng
    )["auc_shuffled"]
    assert res["items"][4]["auc_shuffled"] == pytest.approx(expected)
    # and that is the metric with those negatives (up to sampling noise)
    assert expected == pytest.approx(auc_shuffled(_cb(it), it.fixation_locs, other, rng=1), abs=0.05)
    assert res["config"] == {"shuffled_pool": "category", "n_other": None, "seed": 0}


def test_generic_items_lonely_category_and_errors(tmp_path):
    g = center_bias(10, 12)
    f1 = np.zeros((10, 12), bool)
    f1[5, 6] = f1[4, 4] = True
    f2 = np.zeros((20, 24), bool)
    f2[10, 12] = True
    items = [
        SimpleNamespace(fixation_locs=f1, fixation_map=g, category="a"),
        SimpleNamespace(fixation_locs=f1, fixation_map=g, category="a"),
        SimpleNamespace(fixation_locs=f2, fixation_map=center_bias(20, 24), category="b"),
    ]
    with pytest.warns(UserWarning, match="auc_shuffled is NaN for 1 image"):
        res = evaluate_dataset(iter(items), lambda it: it.fixation_map, progress=False)
    assert [r["name"] for r in res["items"]] == ["0", "1", "2"]
    assert np.isnan(res["items"][2]["auc_shuffled"]) and np.isnan(res["categories"]["b"]["auc_shuffled"])
    assert res["overall"]["auc_shuffled"] == pytest.approx(np.mean([r["auc_shuffled"] for r in res["items"][:2]]))
    json_path, md_path = write_report(res, tmp_path)
    assert json.loads(json_path.read_text())["categories"]["b"]["auc_shuffled"] is None
    assert "n/a" in md_path.read_text()
    # dataset-wide pool: other sizes are rescaled, no NaN
    res = evaluate_dataset(items, lambda it: it.fixation_map, shuffled_pool="dataset", progress=False)
    assert np.isfinite(res["items"][2]["auc_shuffled"])
    with pytest.raises(ValueError, match="item a/0: saliency contains NaN"):
        evaluate_dataset(items, lambda it: np.full((3, 3), np.nan), metrics=["nss"], progress=False)
    with pytest.raises(ValueError, match="shuffled_pool must be"):
        evaluate_dataset(items, lambda it: it.fixation_map, shuffled_pool="image")
    with pytest.raises(ValueError, match="n_other must be"):
        evaluate_dataset(items, lambda it: it.fixation_map, n_other=0)
    with pytest.raises(ValueError, match="items is empty"):
        evaluate_dataset([], lambda it: it.fixation_map)
    with pytest.raises(ValueError, match="results is missing"):
        write_report({"metrics": []}, tmp_path)


def test_other_fixations_rescaling():
    coords = np.array([[0, 0], [9, 19], [5, 10]])
    out = _other_fixations((20, 40), [(coords, (10, 20))])
    # (r + .5) * 2 -> 1, 19, 11 ; (c + .5) * 2 -> 1, 39, 21
    assert sorted(map(tuple, np.argwhere(out))) == [(1, 1), (11, 21), (19, 39)]
    same = _other_fixations((10, 20), [(coords, (10, 20))])
    assert sorted(map(tuple, np.argwhere(same))) == sorted(map(tuple, coords))
