"""Loader for the CAT2000 eye-fixation dataset (Borji & Itti, 2015).

Expected layout (that of CAT2000's ``trainSet`` folder)::

    ROOT/Stimuli/<category>/<n>.jpg          stimulus image
    ROOT/FIXATIONMAPS/<category>/<n>.jpg     blurred fixation density (grey)
    ROOT/FIXATIONLOCS/<category>/<n>.mat     binary fixation locations

The ``.mat`` file holds one 2-D matrix (``fixLocs`` in the real data; any
file with exactly one 2-D numeric/logical variable is accepted). MATLAB v7.3
files (HDF5) are read with ``h5py`` and transposed back to row-major
``[H, W]``. Stimuli and fixation maps may be ``.jpg``, ``.jpeg`` or ``.png``.
Only files directly inside each category folder are used (sub-folders such as
``Output`` are ignored).

Scanning (:class:`CAT2000` construction) checks the folders and that every
stimulus has its fixation map and locations file. The maps are loaded lazily
when an item's :attr:`CAT2000Item.fixation_map` / :attr:`CAT2000Item.fixation_locs`
is first read (CAT2000's 1920x1080 maps take 16 MB each as float64), and
their sizes are checked against the stimulus then.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CAT2000", "CAT2000Item", "CAT2000Subset", "first_per_category", "load_fixation_locs", "load_fixation_map"]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_SUBDIRS = ("Stimuli", "FIXATIONMAPS", "FIXATIONLOCS")


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _find_with_ext(folder: Path, stem: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def load_fixation_map(path: str | Path) -> np.ndarray:
    """Reads a fixation density image as grey values in ``[0, 1]``.

    Args:
        path: Image file (any mode PIL reads; colour is converted to grey).

    Returns:
        ``float64`` map ``[H, W]`` with values in ``[0, 1]`` (``uint8 / 255``;
        16-bit images are scaled by 65535).
    """
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64) / 65535.0
        else:
            a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    return np.clip(a, 0.0, 1.0)


def _pick_2d(variables: dict[str, np.ndarray], path: Path) -> np.ndarray:
    if "fixLocs" in variables and np.asarray(variables["fixLocs"]).ndim == 2:
        return np.asarray(variables["fixLocs"])
    cands = {
        k: np.asarray(v)
        for k, v in variables.items()
        if not k.startswith("__")
        and isinstance(v, np.ndarray)
        and v.ndim == 2
        and (np.issubdtype(v.dtype, np.number) or v.dtype == bool)
    }
    if len(cands) != 1:
        raise ValueError(
            f"{path}: expected one 2-D matrix (e.g. 'fixLocs'), found "
            f"{sorted(cands) if cands else 'none'} among variables "
            f"{sorted(k for k in variables if not k.startswith('__'))}"
        )
    return next(iter(cands.values()))


def _load_mat_v73(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dev dependency
        raise ImportError(f"{path} is a MATLAB v7.3 (HDF5) file; reading it needs h5py") from e
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for k, v in f.items():
            if isinstance(v, h5py.Dataset) and not k.startswith("#"):
                a = np.asarray(v[()])
                out[k] = a.T if a.ndim == 2 else a  # MATLAB is column-major
    return out


def load_fixation_locs(path: str | Path) -> np.ndarray:
    """Reads a binary fixation-location matrix from a ``.mat`` file.

    Args:
        path: MATLAB file (v4-v7 via :func:`scipy.io.loadmat`, v7.3 via
            ``h5py``) holding ``fixLocs`` or exactly one 2-D matrix.

    Returns:
        ``bool`` map ``[H, W]``, ``True`` at fixated pixels.

    Raises:
        ValueError: If the file is not a MATLAB/HDF5 file, has no single
            2-D matrix, or the matrix has NaNs.
    """
    from scipy.io import loadmat

    path = Path(path)
    try:
        variables = loadmat(path)
    except NotImplementedError:  # "Please use HDF reader for matlab v7.3 files"
        variables = _load_mat_v73(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several types here
        with open(path, "rb") as fh:
            head = fh.read(4104)  # signature at 0, 512, 1024, 2048 or 4096
        if b"\x89HDF\r\n\x1a\n" in head:  # HDF5 without the MATLAB header
            variables = _load_mat_v73(path)
        else:
            raise ValueError(f"{path} is not a readable MATLAB file: {e}") from e
    m = _pick_2d(variables, path)
    if m.dtype != bool and np.any(np.isnan(m.astype(np.float64))):
        raise ValueError(f"{path}: fixation locations contain NaN")
    return m != 0


@dataclass(frozen=True)
class CAT2000Item:
    """One CAT2000 image with lazily loaded, size-checked fixation data.

    Attributes:
        category: Category folder name, e.g. ``"Action"``.
        name: File stem, e.g. ``"001"``.
        stimulus_path: The stimulus image.
        fixation_map_path: The fixation density image.
        fixation_locs_path: The ``.mat`` fixation locations.
    """

    category: str
    name: str
    stimulus_path: Path
    fixation_map_path: Path
    fixation_locs_path: Path

    @property
    def id(self) -> str:
        """``"<category>/<name>"``."""
        return f"{self.category}/{self.name}"

    @functools.cached_property
    def size(self) -> tuple[int, int]:
        """Stimulus ``(H, W)`` (read from the image header)."""
        with Image.open(self.stimulus_path) as im:
            w, h = im.size
        return h, w

    def _check(self, what: str, shape: tuple[int, ...], path: Path) -> None:
        if tuple(shape) != self.size:
            raise ValueError(
                f"{what} {path} has size {tuple(shape)} (H, W) but stimulus "
                f"{self.stimulus_path} has size {self.size}"
            )

    @functools.cached_property
    def fixation_map(self) -> np.ndarray:
        """Fixation density ``float64 [H, W]`` in ``[0, 1]`` (loaded on first use).

        Raises:
            ValueError: If its size differs from the stimulus.
        """
        m = load_fixation_map(self.fixation_map_path)
        self._check("fixation map", m.shape, self.fixation_map_path)
        return m

    @functools.cached_property
    def fixation_locs(self) -> np.ndarray:
        """Fixated pixels ``bool [H, W]`` (loaded on first use).

        Raises:
            ValueError: If its size differs from the stimulus.
        """
        m = load_fixation_locs(self.fixation_locs_path)
        self._check("fixation locations", m.shape, self.fixation_locs_path)
        return m

    def load_stimulus(self) -> np.ndarray:
        """Reads the stimulus.

        Returns:
            ``uint8`` RGB image ``[H, W, 3]``.
        """
        with Image.open(self.stimulus_path) as im:
            return np.asarray(im.convert("RGB"))


class CAT2000(Sequence[CAT2000Item]):
    """The images of a CAT2000-layout folder, sorted by category then name.

    Items are created on access (nothing is cached), so iterating twice reads
    the files twice but memory stays at one item.

    Args:
        root: Folder containing ``Stimuli``, ``FIXATIONMAPS`` and
            ``FIXATIONLOCS`` (CAT2000's ``trainSet``).
        categories: Category folder names to keep (in this order), or
            ``None`` for all categories, sorted by name.

    Raises:
        FileNotFoundError: If ``root`` or one of its three sub-folders is
            missing, a category folder is missing in ``FIXATIONMAPS`` or
            ``FIXATIONLOCS``, or a stimulus has no fixation map / locations
            file (the message names the stimulus and the missing path).
        ValueError: If ``categories`` names an unknown category, or a
            selected category has no stimulus.
    """

    def __init__(self, root: str | Path, *, categories: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"CAT2000 root {self.root} is not a directory")
        for sub in _SUBDIRS:
            if not (self.root / sub).is_dir():
                hint = ""
                if (self.root / "trainSet").is_dir():
                    hint = f" (did you mean {self.root / 'trainSet'}?)"
                raise FileNotFoundError(
                    f"CAT2000 root {self.root} has no {sub}/ folder; expected "
                    f"{', '.join(s + '/' for s in _SUBDIRS)}{hint}"
                )
        stim_dir = self.root / "Stimuli"
        available = sorted(
            (p.name for p in stim_dir.iterdir() if p.is_dir()), key=_natural_key
        )
        if categories is None:
            chosen = available
        else:
            if isinstance(categories, str):
                categories = [categories]
            chosen = list(categories)
            unknown = [c for c in chosen if c not in available]
            if unknown:
                raise ValueError(f"unknown categories {unknown}; available in {stim_dir}: {available}")
        if not chosen:
            raise ValueError(f"no category folders in {stim_dir}")
        items: list[CAT2000Item] = []
        for cat in chosen:
            for sub in _SUBDIRS[1:]:
                if not (self.root / sub / cat).is_dir():
                    raise FileNotFoundError(
                        f"category {cat!r} is in {stim_dir} but {self.root / sub / cat} is missing"
                    )
            stimuli = sorted(
                (
                    p
                    for p in (stim_dir / cat).iterdir()
                    if p.is_file() and p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith(".")
                ),
                key=lambda p: _natural_key(p.name),
            )
            if not stimuli:
                raise ValueError(f"category folder {stim_dir / cat} has no stimulus images")
            for stim in stimuli:
                fmap = _find_with_ext(self.root / "FIXATIONMAPS" / cat, stim.stem, _IMAGE_EXTS)
                if fmap is None:
                    raise FileNotFoundError(
                        f"stimulus {stim} has no fixation map: expected "
                        f"{self.root / 'FIXATIONMAPS' / cat / (stim.stem + '.jpg')} (or .jpeg/.png)"
                    )
                locs = _find_with_ext(self.root / "FIXATIONLOCS" / cat, stim.stem, (".mat",))
                if locs is None:
                    raise FileNotFoundError(
                        f"stimulus {stim} has no fixation locations: expected "
                        f"{self.root / 'FIXATIONLOCS' / cat / (stim.stem + '.mat')}"
                    )
                items.append(CAT2000Item(cat, stim.stem, stim, fmap, locs))
        self.categories: list[str] = chosen
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self._items[index]
        # A fresh item each time: its cached maps are freed with it.
        return CAT2000Item(
            rec.category, rec.name, rec.stimulus_path, rec.fixation_map_path, rec.fixation_locs_path
        )

    def __iter__(self) -> Iterator[CAT2000Item]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"CAT2000(root={str(self.root)!r}, categories={len(self.categories)}, images={len(self)})"


class CAT2000Subset(Sequence[CAT2000Item]):
    """A selection of a :class:`CAT2000` (``indices``) that hands out fresh items (their cached maps are freed with them).

    A real ``Sequence``: ``evaluate_dataset`` would otherwise materialise the items as a
    list, and each item caches its full-resolution maps (32 MB for a CAT2000 image).
    """

    def __init__(self, dataset: CAT2000, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[self.indices[i]]


def first_per_category(dataset: CAT2000, limit: int | None) -> CAT2000Subset:
    """The first ``limit`` images of each category of ``dataset`` (all with ``None``)."""
    indices = list(range(len(dataset)))
    if limit is not None:
        # Items are sorted by category, so the first N per category keep every category.
        seen: dict[str, int] = {}
        kept = []
        for i in indices:
            cat = dataset[i].category
            if seen.get(cat, 0) < limit:
                seen[cat] = seen.get(cat, 0) + 1
                kept.append(i)
        indices = kept
    return CAT2000Subset(dataset, indices)
