"""Saliency evaluation: MIT-benchmark fixation metrics, CAT2000, baselines.

SACT's ponder-cost maps, never trained for saliency, are scored as saliency
maps on eye-fixation data (Figurnov et al., CVPR 2017, Sec. 5). This package
holds the model-independent parts:

* :mod:`~sact.saliency.metrics`: AUC-Judd, AUC-Borji, shuffled AUC, NSS, CC,
  KL, SIM (MIT saliency benchmark definitions) and :func:`evaluate_all`.
* :mod:`~sact.saliency.cat2000`: the CAT2000 folder layout.
* :mod:`~sact.saliency.baselines`: centre-bias and uniform maps,
  :func:`postprocess` for coarse model maps.
* :mod:`~sact.saliency.evaluate`: :func:`evaluate_dataset`, :func:`write_report`.
* :mod:`~sact.saliency.synthetic`: a tiny CAT2000-layout folder for tests.
* :mod:`~sact.saliency.model`: saliency maps from a model's ponder maps
  (:func:`model_saliency`, :func:`model_saliency_batch`), the untrained-model
  baseline (:func:`untrained_like`), :func:`evaluate_methods`,
  :func:`write_comparison`.
* :mod:`~sact.saliency.cluttered`: the same evaluation on Cluttered
  Fashion-MNIST with object masks as ground truth (:func:`evaluate_cluttered`).
* :mod:`~sact.saliency.run`: a checkpoint and its baselines scored and
  compared, as ``sact saliency`` runs it (:func:`run_saliency`).
"""

from sact.saliency.baselines import DEFAULT_SIGMA_FRAC, center_bias, postprocess, uniform
from sact.saliency.cat2000 import (
    CAT2000,
    CAT2000Item,
    CAT2000Subset,
    first_per_category,
    load_fixation_locs,
    load_fixation_map,
)
from sact.saliency.evaluate import evaluate_dataset, write_report
from sact.saliency.metrics import (
    MATLAB_EPS,
    METRIC_INPUTS,
    METRIC_LABELS,
    METRICS,
    auc_borji,
    auc_judd,
    auc_shuffled,
    cc,
    check_metric_names,
    evaluate_all,
    kl_divergence,
    nss,
    resize_bilinear,
    similarity,
)
from sact.saliency.synthetic import make_synthetic_cat2000
from sact.saliency.model import (
    evaluate_methods,
    model_saliency,
    model_saliency_batch,
    untrained_like,
    write_comparison,
)
from sact.saliency.cluttered import (
    GROUND_TRUTHS,
    ClutteredSaliencyItem,
    cluttered_items,
    cluttered_methods,
    evaluate_cluttered,
)
from sact.saliency.run import cat2000_methods, run_saliency

__all__ = [
    "GROUND_TRUTHS",
    "CAT2000",
    "ClutteredSaliencyItem",
    "cluttered_items",
    "cluttered_methods",
    "evaluate_cluttered",
    "evaluate_methods",
    "model_saliency",
    "model_saliency_batch",
    "untrained_like",
    "write_comparison",
    "CAT2000Item",
    "CAT2000Subset",
    "cat2000_methods",
    "first_per_category",
    "run_saliency",
    "DEFAULT_SIGMA_FRAC",
    "MATLAB_EPS",
    "METRICS",
    "METRIC_INPUTS",
    "METRIC_LABELS",
    "auc_borji",
    "auc_judd",
    "auc_shuffled",
    "cc",
    "center_bias",
    "check_metric_names",
    "evaluate_all",
    "evaluate_dataset",
    "kl_divergence",
    "load_fixation_locs",
    "load_fixation_map",
    "make_synthetic_cat2000",
    "nss",
    "postprocess",
    "resize_bilinear",
    "similarity",
    "uniform",
    "write_report",
]
