"""Cross-check of the metrics against pysaliency (the field's reference library).

Skipped when pysaliency is not installed (it is not a project dependency).
pysaliency 0.2.22 needs two shims on current stacks, applied here only:
``pkg_resources`` (gone from recent setuptools; imported at module level for
resource files not used here) and ``numpy.trapz`` (removed in numpy 2.4,
aliased to ``numpy.trapezoid`` during each test).

Known, intended differences handled below:
* NSS: pysaliency standardises with ``ddof=0``, MATLAB (and we) with ``ddof=1``.
* SIM: MATLAB (and we) min-max normalise each map first, pysaliency does not;
  the maps get a zero pixel so both agree.
* AUC-Judd: pysaliency's ``general_roc(..., judd=1)`` uses the MIT thresholds
  (one per fixated value), so with distinct values it matches exactly.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from sact.saliency.metrics import auc_judd, cc, kl_divergence, nss, similarity


def _import_pysaliency():
    try:
        import pkg_resources  # noqa: F401
        fake = None
    except ImportError:
        fake = types.ModuleType("pkg_resources")
        fake.resource_string = lambda *a, **k: b""
        fake.resource_listdir = lambda *a, **k: []
        sys.modules["pkg_resources"] = fake
    try:
        import pysaliency.metrics as pm
        from pysaliency.roc import general_roc
    except Exception as e:  # noqa: BLE001 - not installed or broken
        pytest.skip(f"pysaliency not importable: {type(e).__name__}: {e}", allow_module_level=True)
    finally:
        if fake is not None and sys.modules.get("pkg_resources") is fake:
            del sys.modules["pkg_resources"]
    return pm, general_roc


pm, general_roc = _import_pysaliency()


@pytest.fixture(autouse=True)
def _numpy_trapz(monkeypatch):
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    h, w = 30 + seed, 40 + 2 * seed
    sal = rng.random((h, w)) ** 2
    sal[0, 0] = 0.0
    y, x = np.mgrid[0:h, 0:w]
    dens = np.exp(-((y - rng.uniform(0, h)) ** 2 + (x - rng.uniform(0, w)) ** 2) / (2 * 6.0**2))
    dens += 0.3 * rng.random((h, w))
    dens[-1, -1] = 0.0
    fix = rng.random((h, w)) < 0.05
    return sal, dens, fix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nss_matches_pysaliency(seed):
    sal, _, fix = _random_case(seed)
    ys, xs = np.nonzero(fix)
    ref = float(np.mean(pm.NSS(sal, xs, ys)))
    n = sal.size
    assert nss(sal, fix) == pytest.approx(ref * np.sqrt((n - 1) / n), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_judd_matches_pysaliency(seed):
    sal, _, fix = _random_case(seed)
    ref = general_roc(sal[fix], sal[~fix], judd=1)[0]
    assert auc_judd(sal, fix, jitter=False) == pytest.approx(ref, abs=1e-12)
    assert auc_judd(sal, fix, rng=seed) == pytest.approx(ref, abs=1e-6)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # pysaliency's log(0)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cc_kl_sim_match_pysaliency(seed):
    sal, dens, _ = _random_case(seed)
    assert cc(sal, dens) == pytest.approx(pm.CC(sal, dens), abs=1e-12)
    assert kl_divergence(sal, dens) == pytest.approx(pm.MIT_KLDiv(sal, dens), rel=1e-10)
    assert similarity(sal, dens) == pytest.approx(pm.SIM(sal, dens), abs=1e-12)
