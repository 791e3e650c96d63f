"""A tiny synthetic dataset in the CAT2000 folder layout, for tests and demos.

The real CAT2000 cannot be downloaded at test time; this writes the same
layout with real file formats (JPEG stimuli and fixation maps written by PIL,
``fixLocs`` ``.mat`` files written by :func:`scipy.io.savemat`), so that
:class:`sact.saliency.cat2000.CAT2000` and
:func:`sact.saliency.evaluate.evaluate_dataset` can run end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat
from scipy.ndimage import gaussian_filter

__all__ = ["make_synthetic_cat2000"]


def make_synthetic_cat2000(
    root: str | Path,
    *,
    categories: Sequence[str] = ("Action", "Indoor"),
    n_per_category: int = 3,
    size: tuple[int, int] = (24, 32),
    n_fixations: int = 12,
    center_sigma_frac: float = 0.15,
    seed: int = 0,
) -> Path:
    """Writes a CAT2000-layout folder with centre-biased fixations.

    Each image gets ``n_fixations`` fixation points drawn from a Gaussian
    around the image centre (standard deviation ``center_sigma_frac`` of each
    side; duplicates merge), a fixation density map (the points blurred with
    a Gaussian of 1/16 of the width, scaled to max 255), and a random RGB
    stimulus. Images are named ``1.jpg``, ``2.jpg``, ... per category.

    Args:
        root: Output folder (created; existing files are overwritten).
        categories: Category folder names.
        n_per_category: Images per category, ``>= 1``.
        size: Image ``(H, W)``.
        n_fixations: Fixation points per image, ``>= 1``.
        center_sigma_frac: Spread of the fixations around the centre.
        seed: Random seed.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: On ``n_per_category < 1``, ``n_fixations < 1``, an empty
            ``categories`` or a non-positive ``size``.
    """
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    if n_fixations < 1:
        raise ValueError(f"n_fixations must be >= 1, got {n_fixations}")
    if not categories:
        raise ValueError("categories must not be empty")
    h, w = size
    if h < 2 or w < 2:
        raise ValueError(f"size must be at least (2, 2), got {size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cat in categories:
        for sub in ("Stimuli", "FIXATIONMAPS", "FIXATIONLOCS"):
            (root / sub / cat).mkdir(parents=True, exist_ok=True)
        for k in range(1, n_per_category + 1):
            ys = np.clip(np.rint(rng.normal((h - 1) / 2, center_sigma_frac * h, n_fixations)), 0, h - 1)
            xs = np.clip(np.rint(rng.normal((w - 1) / 2, center_sigma_frac * w, n_fixations)), 0, w - 1)
            locs = np.zeros((h, w), dtype=np.uint8)
            locs[ys.astype(int), xs.astype(int)] = 1
            dens = gaussian_filter(locs.astype(np.float64), sigma=w / 16, mode="constant")
            dens = np.rint(255 * dens / dens.max()).astype(np.uint8)
            stim = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(stim, "RGB").save(root / "Stimuli" / cat / f"{k}.jpg", quality=90)
            Image.fromarray(dens, "L").save(root / "FIXATIONMAPS" / cat / f"{k}.jpg", quality=95)
            savemat(root / "FIXATIONLOCS" / cat / f"{k}.mat", {"fixLocs": locs})
    return root
