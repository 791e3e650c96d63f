"""CAT2000 loader on tiny generated folders with real .mat and JPEG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from sact.saliency.cat2000 import CAT2000, CAT2000Item, load_fixation_locs
from sact.saliency.synthetic import make_synthetic_cat2000

H, W = 24, 32


@pytest.fixture()
def root(tmp_path):
    return make_synthetic_cat2000(tmp_path / "cat2000", n_per_category=3, size=(H, W), seed=1)


def test_loads_all_items_in_order(root):
    ds = CAT2000(root)
    assert ds.categories == ["Action", "Indoor"]
    assert len(ds) == 6
    assert [it.id for it in ds] == [f"{c}/{k}" for c in ("Action", "Indoor") for k in (1, 2, 3)]
    it = ds[4]
    assert isinstance(it, CAT2000Item)
    assert (it.category, it.name) == ("Indoor", "2")
    assert it.stimulus_path == root / "Stimuli" / "Indoor" / "2.jpg"
    assert it.size == (H, W)
    fm = it.fixation_map
    assert fm.shape == (H, W) and fm.dtype == np.float64
    assert 0.0 <= fm.min() and fm.max() <= 1.0 and fm.max() > 0.9
    locs = it.fixation_locs
    assert locs.dtype == bool and locs.shape == (H, W)
    np.testing.assert_array_equal(locs, loadmat(root / "FIXATIONLOCS" / "Indoor" / "2.mat")["fixLocs"] != 0)
    # the (JPEG-compressed) density map peaks where fixations are
    assert fm[locs].mean() > fm[~locs].mean()
    assert it.load_stimulus().shape == (H, W, 3)
    assert len(ds[1:3]) == 2


def test_natural_order_and_category_selection(tmp_path):
    root = make_synthetic_cat2000(tmp_path / "c", categories=("B", "A"), n_per_category=10, size=(8, 8))
    ds = CAT2000(root, categories=["B"])
    assert ds.categories == ["B"]
    assert [it.name for it in ds] == [str(k) for k in range(1, 11)]  # 10 after 9
    assert CAT2000(root).categories == ["A", "B"]
    with pytest.raises(ValueError, match=r"unknown categories \['C'\]"):
        CAT2000(root, categories=["C"])


def test_any_single_2d_variable_and_v73(tmp_path, root):
    locs = np.zeros((H, W), bool)
    locs[3, 5] = locs[10, 20] = True
    p = tmp_path / "other.mat"
    savemat(p, {"fixations_binary": locs})
    np.testing.assert_array_equal(load_fixation_locs(p), locs)
    savemat(p, {"a": locs, "b": locs})
    with pytest.raises(ValueError, match="expected one 2-D matrix"):
        load_fixation_locs(p)
    # MATLAB v7.3 = HDF5 with a 512-byte MATLAB header; arrays stored transposed.
    h5py = pytest.importorskip("h5py")
    p73 = tmp_path / "v73.mat"
    with h5py.File(p73, "w", userblock_size=512) as f:
        f.create_dataset("fixLocs", data=locs.T.astype(np.uint8))
    with open(p73, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    with pytest.raises(NotImplementedError):
        loadmat(p73)  # what scipy does with it
    np.testing.assert_array_equal(load_fixation_locs(p73), locs)
    # plain HDF5 (no MATLAB header)
    ph = tmp_path / "plain.mat"
    with h5py.File(ph, "w") as f:
        f.create_dataset("fixLocs", data=locs.T.astype(np.float64))
    np.testing.assert_array_equal(load_fixation_locs(ph), locs)
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match="not a readable MATLAB file"):
        load_fixation_locs(bad)


def test_missing_root_and_subfolders(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        CAT2000(tmp_path / "nope")
    (tmp_path / "empty" / "trainSet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no Stimuli/ folder.*did you mean"):
        CAT2000(tmp_path / "empty")
    (root / "FIXATIONLOCS" / "Indoor").rename(root / "FIXATIONLOCS" / "Gone")
    with pytest.raises(FileNotFoundError, match="FIXATIONLOCS/Indoor is missing"):
        CAT2000(root)


def test_missing_locs_and_map_name_both_paths(root):
    (root / "FIXATIONLOCS" / "Action" / "2.mat").unlink()
    with pytest.raises(FileNotFoundError) as e:
        CAT2000(root)
    msg = str(e.value)
    assert str(root / "Stimuli" / "Action" / "2.jpg") in msg
    assert str(root / "FIXATIONLOCS" / "Action" / "2.mat") in msg
    # the other category still loads on its own
    assert len(CAT2000(root, categories=["Indoor"])) == 3
    (root / "FIXATIONMAPS" / "Indoor" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError) as e:
        CAT2000(root, categories=["Indoor"])
    msg = str(e.value)
    assert str(root / "Stimuli" / "Indoor" / "3.jpg") in msg
    assert str(root / "FIXATIONMAPS" / "Indoor" / "3.jpg") in msg


def test_size_mismatch(root):
    savemat(root / "FIXATIONLOCS" / "Action" / "1.mat", {"fixLocs": np.eye(H + 1, W, dtype=np.uint8)})
    Image.fromarray(np.zeros((H, W - 2), np.uint8)).save(root / "FIXATIONMAPS" / "Action" / "3.jpg")
    ds = CAT2000(root)  # scanning does not read the maps
    with pytest.raises(ValueError, match=r"fixation locations .*1\.mat has size \(25, 32\).*size \(24, 32\)"):
        _ = ds[0].fixation_locs
    with pytest.raises(ValueError, match=r"fixation map .*3\.jpg has size \(24, 30\)"):
        _ = ds[2].fixation_map
    assert ds[1].fixation_locs.shape == (H, W)
