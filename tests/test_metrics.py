"""Metrics against hand-computed values, gamma against brute force, OpenKBP scores on real data."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from addiff_core import dvh
from addiff_core import gamma as G
from addiff_core import metrics as M
from addiff_core.case_io import Beam, Plan
from helpers.metrics import readme_dose_score
from helpers.shared_data import OPENKBP_SAMPLE

OPENKBP_DIR = OPENKBP_SAMPLE
OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_TARGETS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}


def ones(n: int) -> np.ndarray:
    return np.ones(n, bool)


# --------------------------------------------------------------------------------------------
# MAE
# --------------------------------------------------------------------------------------------
def test_mae_and_normalised():
    pred, ref = np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 1.0, 1.0, 0.0])
    assert M.mae(pred, ref) == pytest.approx((0 + 1 + 2 + 10) / 4)
    mask = np.array([True, True, True, False])
    assert M.mae(pred, ref, mask) == pytest.approx(1.0)
    assert M.mae_normalised(pred, ref, 50.0, mask) == pytest.approx(0.02)
    assert math.isnan(M.mae(pred, ref, np.zeros(4, bool)))
    with pytest.raises(ValueError):
        M.mae(pred, ref[:3])
    with pytest.raises(ValueError):
        M.mae_normalised(pred, ref, 0.0)


def test_sample_uncertainty_by_hand():
    # in the mask: |error| 0, 0.5, 1, 3 and std 0.1, 0.2, 0.6, 1.0 rank alike (rho 1); within mean +- 2 std:
    # 0 <= 0.2 yes, 0.5 <= 0.4 no, 1 <= 1.2 yes, 3 <= 2 no -> 1/2; the fifth voxel (outside) would spoil all three
    mean = np.array([1.0, 1.0, 1.0, 1.0, 50.0])
    ref = np.array([1.0, 1.5, 2.0, 4.0, 0.0])
    std = np.array([0.1, 0.2, 0.6, 1.0, 0.0])
    mask = np.array([True, True, True, True, False])
    u = M.sample_uncertainty(mean, std, ref, mask)
    assert u["spearman"] == pytest.approx(1.0)
    assert u["mean_std_gy"] == pytest.approx(1.9 / 4)
    assert u["coverage"] == pytest.approx(0.5)
    # the std ranks the errors backwards: rho -1; k widens the band: within +- 30 std all four
    # (the last at the end of its band: 3 <= 30 x 0.1)
    back = M.sample_uncertainty(mean, np.array([1.0, 0.6, 0.2, 0.1, 0.0]), ref, mask, k=30.0)
    assert back["spearman"] == pytest.approx(-1.0) and back["coverage"] == pytest.approx(1.0)
    # ties: std ranks (1.5, 1.5, 3.5, 3.5), error ranks (1, 2, 3, 4): rho = 4 / sqrt(4 * 5) = 2 / sqrt(5)
    tied = M.sample_uncertainty(mean[:4], np.array([0.0, 0.0, 1.0, 1.0]), ref[:4])
    assert tied["spearman"] == pytest.approx(2 / math.sqrt(5))
    # identical samples (std 0 everywhere): no ranking, and only the exact voxels are covered
    flat = M.sample_uncertainty(mean[:4], np.zeros(4), ref[:4])
    assert math.isnan(flat["spearman"]) and flat["mean_std_gy"] == 0.0 and flat["coverage"] == pytest.approx(0.25)
    assert all(math.isnan(v) for v in M.sample_uncertainty(mean, std, ref, np.zeros(5, bool)).values())
    with pytest.raises(ValueError):
        M.sample_uncertainty(mean, std[:3], ref)


# --------------------------------------------------------------------------------------------
# DVH points: 101 voxels with doses 0..100 Gy, so D_x = 100 - x exactly
# --------------------------------------------------------------------------------------------
@pytest.fixture
def ramp():
    dose = np.zeros((3, 101)) + 500.0     # voxels outside the structure must be ignored
    mask = np.zeros((3, 101), bool)
    dose[1] = np.arange(101.0)[::-1]
    mask[1] = True
    return dose, mask


@pytest.mark.parametrize("x", [99, 98, 95, 50, 2, 1, 0, 100, 12.5])
def test_dose_at_volume_pct_is_the_100_minus_x_percentile(ramp, x):
    assert dvh.dose_at_volume_pct(*ramp, x) == pytest.approx(100.0 - x)


def test_dose_at_volume_pct_interpolates_linearly():
    d = np.arange(10.0)  # D95 = 5th percentile of 0..9 = 0.05 * 9
    assert dvh.dose_at_volume_pct(d, ones(10), 95) == pytest.approx(0.45)
    assert dvh.dose_at_volume_pct(d, ones(10), 2) == pytest.approx(0.98 * 9)
    assert math.isnan(dvh.dose_at_volume_pct(d, np.zeros(10, bool), 50))
    with pytest.raises(ValueError):
        dvh.dose_at_volume_pct(d, ones(10), 101)


def test_d_cc_openkbp_convention(ramp):
    dose, mask = ramp
    # 0.1 cc / 0.01 cc = 10 voxels of 101: percentile 100 - 10/101*100 -> value (1 - 10/101) * 100
    assert dvh.d_cc(dose, mask, 0.1, 0.01) == pytest.approx(9100 / 101)
    # voxel bigger than 0.1 cc: at least one voxel -> percentile 100 - 1/101*100
    assert dvh.d_cc(dose, mask, 0.1, 1.0) == pytest.approx(10000 / 101)
    # rounding: 0.1 / 0.0081 = 12.3 -> 12 voxels
    assert dvh.d_cc(dose, mask, 0.1, 0.0081) == pytest.approx((1 - 12 / 101) * 100)
    # structure smaller than 0.1 cc: percentile clipped at 0 -> its minimum
    assert dvh.d_cc(np.array([3.0, 5.0]), ones(2), 0.1, 0.01) == pytest.approx(3.0)


def test_dmax_dmean_vx(ramp):
    dose, mask = ramp
    assert dvh.dmax(dose, mask) == 100.0
    assert dvh.dmean(dose, mask) == pytest.approx(50.0)
    assert dvh.v_x(dose, mask, 20.0) == pytest.approx(81 / 101)  # 20..100 Gy inclusive
    assert dvh.v_x(dose, mask, 100.5) == 0.0
    empty = np.zeros_like(mask)
    assert all(math.isnan(f(dose, empty)) for f in (dvh.dmax, dvh.dmean))
    assert math.isnan(dvh.v_x(dose, empty, 1.0))


def test_dvh_points(ramp):
    dose, mask = ramp
    p = dvh.dvh_points(dose, mask, 0.01, is_target=False, v_x_gy=(20, 45.5))
    want = {"D99": 1, "D98": 2, "D95": 5, "D50": 50, "D2": 98, "D1": 99, "Dmean": 50,
            "D_0.1cc": 9100 / 101, "Dmax": 100, "V20Gy": 81 / 101, "V45.5Gy": 55 / 101}
    assert p.keys() == want.keys()
    for k, v in want.items():
        assert p[k] == pytest.approx(v), k
    t = dvh.dvh_points(dose, mask, 0.01, is_target=True, v_x_gy=(20,))
    assert "V20Gy" not in t and t["D95"] == pytest.approx(5)
    e = dvh.dvh_points(dose, np.zeros_like(mask), 0.01, is_target=False, v_x_gy=(20,))
    assert e.keys() == want.keys() - {"V45.5Gy"} and all(math.isnan(v) for v in e.values())


def test_dvh_curve():
    dose = np.array([0.0, 1.0, 2.0, 3.0, 99.0])
    mask = np.array([True, True, True, True, False])
    axis, vol = dvh.dvh_curve(dose, mask, np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(vol, [1.0, 0.75, 0.75, 0.5, 0.25, 0.0])
    axis, vol = dvh.dvh_curve(dose, mask, 4)
    np.testing.assert_allclose(axis, [0, 1, 2, 3])
    np.testing.assert_allclose(vol, [1.0, 0.75, 0.5, 0.25])
    assert np.all(np.diff(vol) <= 0)
    _, vol = dvh.dvh_curve(dose, np.zeros(5, bool), np.array([0.0, 1.0]))
    np.testing.assert_array_equal(vol, [0.0, 0.0])


# --------------------------------------------------------------------------------------------
# OpenKBP scores on small arrays
# --------------------------------------------------------------------------------------------
def test_openkbp_scores_by_hand():
    ref = np.arange(20.0).reshape(4, 5)
    pdm = ref >= 5
    pred = ref + np.where(pdm, 2.0, 0.0)
    assert M.openkbp_dose_score(pred, ref, pdm) == pytest.approx(2.0)
    oar = np.zeros((4, 5), bool)
    oar[0] = True                           # doses 0..4: outside the pdm, error 0
    ptv = np.zeros((4, 5), bool)
    ptv[2:] = True                          # inside the pdm, error 2
    errs = M.openkbp_dvh_errors(pred, ref, {"Cord": oar, "PTV": ptv, "Empty": np.zeros((4, 5), bool)},
                                voxel_volume_cc=1.0, target_names=["PTV"])
    assert set(errs) == {"Cord/D_0.1cc", "Cord/mean", "PTV/D99", "PTV/D95", "PTV/D1"}
    assert errs["Cord/D_0.1cc"] == 0.0 and errs["Cord/mean"] == 0.0
    assert all(errs[f"PTV/{k}"] == pytest.approx(2.0) for k in ("D99", "D95", "D1"))
    score = M.openkbp_dvh_score(pred, ref, {"Cord": oar, "PTV": ptv}, 1.0, ["PTV"])
    assert score == pytest.approx((0 + 0 + 2 + 2 + 2) / 5)
    assert math.isnan(M.openkbp_dvh_score(pred, ref, {}, 1.0, []))
    cold = M.openkbp_dvh_errors(ref - np.where(ptv, 3.0, 0.0), ref, {"PTV": ptv}, 1.0, ["PTV"], signed=True)
    assert all(cold[f"PTV/{k}"] == pytest.approx(-3.0) for k in ("D99", "D95", "D1"))  # colder: negative


def test_openkbp_dose_score_counts_every_voxel_by_hand():
    """Issue #11: the official score sums over the whole grid and divides by the mask size; the
    official pipeline first multiplies the prediction by the mask (pred * mask)."""
    from addiff_core.regions import zero_outside

    ref = np.array([4.0, 0.0, 10.0, 20.0, 30.0, 0.0])   # reference dose 4 Gy outside the mask (voxel 0)
    pdm = np.array([0, 0, 1, 1, 1, 0], bool)             # 3 mask voxels
    pred = np.array([7.0, 1.0, 12.0, 20.0, 27.0, 2.0])   # dose outside the mask: 7, 1, 2
    masked = zero_outside(pred, pdm)
    np.testing.assert_array_equal(masked, [0, 0, 12, 20, 27, 0])
    # official pipeline: |0-4| + 0 + |12-10| + 0 + |27-30| + 0 = 9 over 3 mask voxels
    assert M.openkbp_dose_score(masked, ref, pdm) == pytest.approx(9.0 / 3)
    # an unmasked prediction is penalised for its dose outside: 3 + 1 + 2 + 0 + 3 + 2 = 11
    assert M.openkbp_dose_score(pred, ref, pdm) == pytest.approx(11.0 / 3)
    # the old ruler (mean inside the mask only) gave (2 + 0 + 3) / 3: not the official number
    assert M.mae(pred, ref, pdm) == pytest.approx(5.0 / 3) != M.openkbp_dose_score(masked, ref, pdm)
    assert M.openkbp_dose_score(masked, ref, pdm) == pytest.approx(readme_dose_score(pred, ref, pdm))
    assert M.openkbp_dose_score(pred, ref, None) == pytest.approx(11.0 / 6)  # no mask: every voxel
    assert math.isnan(M.openkbp_dose_score(pred, ref, np.zeros(6, bool)))


def test_openkbp_dose_score_matches_the_readme_formula_on_random_doses():
    from addiff_core.regions import zero_outside

    rng = np.random.default_rng(11)
    for shape in ((7, 9, 8), (5, 4, 6)):
        pdm = rng.random(shape) < 0.4
        ref = rng.gamma(2.0, 10.0, shape) * pdm
        ref[0, 0, 0] = 3.0                      # a little reference dose outside the mask too
        pred = rng.gamma(2.0, 10.0, shape)      # dose everywhere, also outside the mask
        got = M.openkbp_dose_score(zero_outside(pred, pdm), ref, pdm)
        assert got == pytest.approx(readme_dose_score(pred, ref, pdm), rel=1e-12)


def _dvh_patient(shape, structures, shifts):
    """ref = a ramp; pred = ref + shift on each structure's voxels (structures do not overlap)."""
    ref = np.arange(float(np.prod(shape))).reshape(shape)
    pred = ref.copy()
    for name, m in structures.items():
        pred[m] += shifts[name]
    return pred, ref


def test_cohort_dvh_score_is_one_mean_over_every_cell():
    """Patient A: PTV +1 Gy (3 cells of error 1) and Cord +4 Gy (2 cells of 4): mean 11/5 = 2.2.
    Patient B: only a Cord, exact (2 cells of 0): mean 0. OpenKBP: 11/7 over the 7 cells, not
    the mean of the patient means (2.2 + 0) / 2 = 1.1."""
    shape = (4, 5)
    ptv, cord = np.zeros(shape, bool), np.zeros(shape, bool)
    ptv[1:3] = True
    cord[3] = True
    pa, ra = _dvh_patient(shape, {"PTV": ptv, "Cord": cord}, {"PTV": 1.0, "Cord": 4.0})
    pb, rb = _dvh_patient(shape, {"Cord": cord}, {"Cord": 0.0})
    ea = M.openkbp_dvh_errors(pa, ra, {"PTV": ptv, "Cord": cord}, 1.0, ["PTV"])
    eb = M.openkbp_dvh_errors(pb, rb, {"Cord": cord}, 1.0, ["PTV"])
    assert sorted(ea.values()) == pytest.approx([1, 1, 1, 4, 4]) and list(eb.values()) == [0.0, 0.0]
    assert M.cohort_dvh_score([ea, eb]) == pytest.approx(11 / 7)
    assert M.cohort_dvh_score([ea]) == pytest.approx(M.openkbp_dvh_score(pa, ra, {"PTV": ptv, "Cord": cord}, 1.0,
                                                                          ["PTV"])) == pytest.approx(2.2)
    assert np.mean([2.2, 0.0]) == pytest.approx(1.1)  # the mean of patient means differs
    assert M.combine_dvh_scores([2.2, 0.0], [5, 2]) == pytest.approx(11 / 7)
    assert math.isnan(M.cohort_dvh_score([])) and math.isnan(M.cohort_dvh_score([{}, {"x": float("nan")}]))
    # per-case rows as training.evaluate builds them: cohort_means gives the same one mean
    rows = [{"case_id": "a", "mae_gy": 1.0, "openkbp_dvh_score": 2.2, "dvh_cells": 5.0},
            {"case_id": "b", "mae_gy": 3.0, "openkbp_dvh_score": 0.0, "dvh_cells": 2.0},
            {"case_id": "c", "mae_gy": float("nan"), "openkbp_dvh_score": float("nan"), "dvh_cells": 0.0}]
    mean = M.cohort_means(rows)
    assert set(mean) == {"mae_gy", "openkbp_dvh_score", "dvh_cells"}
    assert mean["openkbp_dvh_score"] == pytest.approx(11 / 7) and mean["dvh_cells"] == 7.0
    assert mean["mae_gy"] == pytest.approx(2.0)  # other metrics: mean over the cases with a value
    assert M.cohort_means([]) == {}


def test_sites_combine_the_dvh_score_by_cells_and_the_rest_by_cases():
    """All-sites row (server/federation.py, report.py, benches): metrics weighted by held-out
    cases, the DVH score by DVH cells (= one mean over every cell of all sites), cells summed."""
    from addiff_core.site_table import with_overall

    rows = [{"site": "a", "cases": 2, "mae_gy": 1.0, "openkbp_dvh_score": 2.2, "dvh_cells": 5.0},
            {"site": "b", "cases": 1, "mae_gy": 4.0, "openkbp_dvh_score": 0.0, "dvh_cells": 2.0}]
    out = M.combine_site_means(rows, ["mae_gy", "openkbp_dvh_score", "dvh_cells"])
    assert out["mae_gy"] == pytest.approx((2 * 1.0 + 4.0) / 3)
    assert out["openkbp_dvh_score"] == pytest.approx(11 / 7)   # case-weighted would be 4.4 / 3
    assert out["dvh_cells"] == 7.0
    overall = with_overall(rows)[-1]
    assert overall["site"].startswith("all sites") and overall["cases"] == 3
    assert overall["openkbp_dvh_score"] == pytest.approx(11 / 7) and overall["dvh_cells"] == 7.0
    # results written before dvh_cells existed: the DVH score falls back to the case weights
    old = [{k: v for k, v in r.items() if k != "dvh_cells"} for r in rows]
    assert M.combine_site_means(old, ["openkbp_dvh_score"])["openkbp_dvh_score"] == pytest.approx(4.4 / 3)
    # a site without a finite value or without cases is left out
    rows.append({"site": "c", "cases": 0, "mae_gy": 100.0, "openkbp_dvh_score": None, "dvh_cells": 0.0})
    assert M.combine_site_means(rows, ["mae_gy"])["mae_gy"] == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------
# target quality
# --------------------------------------------------------------------------------------------
def test_homogeneity_index(ramp):
    # D2 = 98, D98 = 2, D50 = 50
    assert M.homogeneity_index(*ramp) == pytest.approx(96 / 50)
    assert M.homogeneity_index(np.full(10, 60.0), ones(10)) == 0.0


def test_conformity_indices():
    dose = np.zeros(40)
    target = np.zeros(40, bool)
    target[:10] = True
    dose[5:25] = 60.0                       # PIV 20 voxels, 5 of them in the target
    assert M.conformity_index_rtog(dose, target, 60.0) == pytest.approx(2.0)
    assert M.paddick_ci(dose, target, 60.0) == pytest.approx(5 * 5 / (10 * 20))
    perfect = np.where(target, 60.0, 0.0)
    assert M.conformity_index_rtog(perfect, target, 60.0) == 1.0 and M.paddick_ci(perfect, target, 60.0) == 1.0
    assert M.paddick_ci(np.zeros(40), target, 60.0) == 0.0
    assert math.isnan(M.conformity_index_rtog(dose, np.zeros(40, bool), 60.0))


# --------------------------------------------------------------------------------------------
# isodose Dice and OAR Dmax error
# --------------------------------------------------------------------------------------------
def test_isodose_dice():
    ref = np.array([10.0, 30.0, 50.0, 70.0, 90.0])
    pred = np.array([10.0, 30.0, 50.0, 40.0, 90.0])
    d = M.isodose_dice(pred, ref, 100.0, levels=(0.2, 0.6, 0.95))
    # L=0.2: {1,2,3,4} vs {1,2,3,4}; L=0.6: ref {3,4}, pred {4} -> 2/3; L=0.95: both empty -> 1
    assert d == {0.2: 1.0, 0.6: pytest.approx(2 / 3), 0.95: 1.0}
    assert M.mean_isodose_dice(pred, ref, 100.0, levels=(0.2, 0.6, 0.95)) == pytest.approx((2 + 2 / 3) / 3)
    mask = np.array([True, True, True, False, True])
    assert M.isodose_dice(pred, ref, 100.0, levels=(0.6,), mask=mask) == {0.6: 1.0}
    assert list(M.isodose_dice(ref, ref, 100.0)) == list(M.ISODOSE_LEVELS)
    assert list(M.ISODOSE_LEVELS) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_oar_dmax_error():
    ref = np.array([1.0, 40.0, 50.0])
    pred = np.array([1.0, 44.5, 10.0])
    assert M.oar_dmax_error(pred, ref, np.array([True, True, False])) == pytest.approx(4.5)
    assert M.oar_dmax_error(pred, ref, ones(3)) == pytest.approx(5.5)


# --------------------------------------------------------------------------------------------
# gamma
# --------------------------------------------------------------------------------------------
def brute_force_gamma(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, samples=2001):
    """Upper bound: minimum over every lattice edge of the array, densely sampled (no search limit).

    The gamma of issue #31 searches the whole interpolated field, so it can only be lower."""
    h = np.asarray(spacing, float)[::-1]
    ref_max = ref.max()
    pts = np.array(list(itertools.product(*[range(s) for s in ref.shape])))
    t = np.linspace(0.0, 1.0, samples)
    ev_pos, ev_val = [], []
    for k in range(ref.ndim):
        start = pts[pts[:, k] < ref.shape[k] - 1]
        end = start.copy()
        end[:, k] += 1
        v0, v1 = pred[tuple(start.T)], pred[tuple(end.T)]
        ev_pos.append((start[:, None, :] + t[None, :, None] * (end - start)[:, None, :]).reshape(-1, ref.ndim))
        ev_val.append((v0[:, None] + t[None, :] * (v1 - v0)[:, None]).ravel())
    ev_pos = np.concatenate(ev_pos) * h
    ev_val = np.concatenate(ev_val)
    out = np.full(ref.shape, np.nan)
    for p in pts:
        r = ref[tuple(p)]
        if r < cutoff_pct / 100 * ref_max:
            continue
        dd = dose_pct / 100 * (ref_max if global_norm else r)
        g2 = ((ev_pos - p * h) ** 2).sum(1) / dta_mm ** 2 + (ev_val - r) ** 2 / dd ** 2
        out[tuple(p)] = math.sqrt(g2.min())
    return out


def dense_gamma(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, q):
    """Reference: the multilinearly interpolated ``pred`` (scipy map_coordinates, order 1) sampled on
    a lattice ``q`` times finer than the grid over the whole array (no search limit)."""
    from scipy import ndimage

    h = np.asarray(spacing, float)[::-1]
    fine = np.meshgrid(*[np.linspace(0, n - 1, (n - 1) * q + 1) for n in ref.shape], indexing="ij")
    idx = np.stack([g.ravel() for g in fine])
    ev_val = ndimage.map_coordinates(pred, idx, order=1)
    ev_pos = idx.T * h
    out = np.full(ref.shape, np.nan)
    for p in np.argwhere(ref >= cutoff_pct / 100 * ref.max()):
        r = ref[tuple(p)]
        dd = dose_pct / 100 * (ref.max() if global_norm else r)
        g2 = ((ev_pos - p * h) ** 2).sum(1) / dta_mm ** 2 + (ev_val - r) ** 2 / dd ** 2
        out[tuple(p)] = math.sqrt(g2.min())
    return out


def test_gamma_identical_is_100():
    ref = np.random.default_rng(0).random((12, 10, 8)) * 60
    assert G.gamma_pass_rate(ref, ref.copy(), (2.0, 2.0, 2.5)) == 100.0
    g = G.gamma_index(ref, ref, (2.0, 2.0, 2.5))
    assert np.nanmax(g) == 0.0


def test_gamma_uniform_offsets():
    ref = np.full((6, 7, 8), 50.0)
    assert G.gamma_pass_rate(ref, ref * 1.02, (1.0, 1.0, 1.0), dose_pct=3.0) == 100.0
    assert G.gamma_pass_rate(ref, ref * 1.05, (1.0, 1.0, 1.0), dose_pct=3.0) == 0.0
    assert G.gamma_pass_rate(ref, ref * 1.05, (1.0, 1.0, 1.0), dose_pct=5.5) == 100.0
    # gamma of a uniform 5 % offset at 3 % is exactly 5/3 (no spatial shift helps)
    np.testing.assert_allclose(G.gamma_index(ref, ref * 1.05, (1.0, 1.0, 1.0)), 5 / 3)


def test_gamma_shifted_sharp_edge():
    ref = np.zeros(30)
    ref[10:20] = 10.0
    pred = np.roll(ref, 1)                   # the 10 Gy plateau moved 1 mm
    # evaluated: the 10 plateau voxels; only voxel 10 (pred 0 there) needs the 1 mm shift
    assert G.gamma_pass_rate(ref, pred, (1.0,), 3.0, 2.0) == 100.0
    assert G.gamma_pass_rate(ref, pred, (1.0,), 3.0, 0.5) == pytest.approx(90.0)
    g = G.gamma_index(ref, pred, (1.0,), 3.0, 2.0)
    assert np.isnan(g[:10]).all() and np.isnan(g[20:]).all()
    assert 0.49 < g[10] <= 0.5 and np.all(g[11:20] == 0)
    # in 3-D along x (last array axis): spacing is (x, y, z)
    ref3 = np.broadcast_to(ref, (4, 5, 30)).copy()
    pred3 = np.roll(ref3, 1, axis=2)
    assert G.gamma_pass_rate(ref3, pred3, (1.0, 9.0, 9.0), 3.0, 2.0) == 100.0
    assert G.gamma_pass_rate(ref3, pred3, (9.0, 1.0, 1.0), 3.0, 2.0) == pytest.approx(90.0)


def test_gamma_cutoff_mask_and_local_normalisation():
    ref = np.array([100.0, 50.0, 5.0, 0.0])
    pred = np.array([100.0, 52.0, 6.0, 9.0])
    sp = (100.0,)                            # no useful neighbour within 2 mm
    # global dD = 3 Gy: 100 and 50 pass; 5 Gy < 10 % cutoff -> not evaluated
    assert G.gamma_pass_rate(ref, pred, sp) == 100.0
    assert G.gamma_pass_rate(ref, pred, sp, cutoff_pct=0.0) == pytest.approx(75.0)  # |9-0| > 3 fails
    # local dD: 3 % of 50 = 1.5 Gy < 2 Gy -> fails
    assert G.gamma_pass_rate(ref, pred, sp, global_norm=False) == pytest.approx(50.0)
    assert G.gamma_pass_rate(ref, pred, sp, mask=np.array([False, True, True, True]), global_norm=False) == 0.0
    assert math.isnan(G.gamma_pass_rate(np.zeros(5), np.ones(5), sp))


@pytest.mark.parametrize("shape, spacing, global_norm, q", [
    ((9, 8), (1.5, 1.0), True, 40),
    ((9, 8), (1.0, 1.0), False, 40),
    ((5, 4, 3), (1.0, 1.5, 2.0), True, 20),
])
def test_gamma_matches_brute_force(shape, spacing, global_norm, q):
    """gamma_index is the minimum over the whole interpolated field (issue #31): at most the
    edge-only minimum, and the dense brute force over the field within its sampling error."""
    rng = np.random.default_rng(42)
    ref = 40 + 10 * rng.random(shape)
    ref.ravel()[:3] = [2.0, 5.0, 3.0]          # some voxels below the 10 % cutoff
    pred = ref + rng.normal(0, 1.5, shape)
    samples = 1001
    edges = brute_force_gamma(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm, samples)
    want = dense_gamma(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm, q)
    got = G.gamma_index(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm, max_search_mm=100.0)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.all(got[ok] ** 2 <= edges[ok] ** 2 + 1e-9)
    # both sample a steep (noisy) field: agreement within 0.03 in gamma^2 (measured: <= 0.026 in
    # 2-D at q = 40, 0.012 in 3-D; the edge-only search is off by 0.38 in 3-D)
    slack = 0.03
    np.testing.assert_allclose(got[ok] ** 2, want[ok] ** 2, atol=slack)
    assert 0 < np.mean(want[ok] <= 1) < 1              # a mix of passes and failures
    # the pass rate (search radius = DTA, early exit) agrees away from the sampling slack
    far = np.abs(want[ok] ** 2 - 1.0) > slack
    rate = G.gamma_pass_rate(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm)
    g_rate = 100 * np.mean(got[ok] <= 1 + 1e-9)
    assert rate == pytest.approx(g_rate)
    np.testing.assert_array_equal(got[ok][far] <= 1, want[ok][far] <= 1)


def test_gamma_64_cubed_is_fast_enough():
    import time

    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:64, :64, :64]
    ref = 60 * np.exp(-((x - 32) ** 2 + (y - 32) ** 2 + (z - 32) ** 2) / (2 * 12.0 ** 2))
    pred = np.roll(ref, 1, axis=1) * (1 + 0.02 * rng.standard_normal(ref.shape))
    t0 = time.process_time()
    rate = G.gamma_pass_rate(ref, pred * 1.1, (2.0, 2.0, 2.0))   # many failures: a full search
    assert time.process_time() - t0 < 5.0
    assert 0.0 < rate < 100.0


# --------------------------------------------------------------------------------------------
# constraint compliance and case_metrics on a phantom
# --------------------------------------------------------------------------------------------
def phantom():
    shape = (16, 20, 20)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    body = ((x - 10) ** 2 + (y - 10) ** 2) < 81
    ptv = ((x - 10) ** 2 + (y - 8) ** 2 + (z - 8) ** 2) < 12
    cord = ((x - 10) ** 2 + (y - 15) ** 2) < 2
    ref = 70.0 * np.exp(-((x - 10) ** 2 + (y - 8) ** 2 + (z - 8) ** 2) / 30.0) * body
    ref[ptv] = 70.0
    masks = {"Body": body, "PTV70": ptv, "SpinalCord": cord, "Larynx": np.zeros(shape, bool)}
    plan = Plan("head_neck", {"PTV70": 70.0}, 35, "IMRT", (Beam(0.0),), {})
    return ref, masks, plan


def test_constraint_compliance():
    ref, masks, plan = phantom()
    c = M.constraint_compliance(ref, masks, plan)
    # applicable: cord Dmax (present) and PTV D95; Larynx is empty, others absent
    assert c["n_applicable"] == 2 and c["n_met"] == 2 and c["fraction_met"] == 1.0
    assert {d["key"] for d in c["details"]} == {"SpinalCord Dmax", "__target__ D95"}
    hot = ref.copy()
    hot[masks["SpinalCord"]] = 50.0
    c = M.constraint_compliance(hot, masks, plan)
    assert c["fraction_met"] == 0.5
    cord = next(d for d in c["details"] if d["key"] == "SpinalCord Dmax")
    assert cord["value"] == 50.0 and cord["met"] is False
    assert math.isnan(M.constraint_compliance(ref, {}, plan)["fraction_met"])


def test_case_metrics_identity_and_perturbation():
    ref, masks, plan = phantom()
    spacing = (2.0, 2.0, 3.0)
    m = M.case_metrics(ref, ref, masks, plan, spacing, masks["Body"])
    assert all(type(v) is float for v in m.values())
    assert m["mae_gy"] == 0 and m["openkbp_dose_score"] == 0 and m["openkbp_dvh_score"] == 0
    assert m["mean_isodose_dice"] == 1.0 and m["gamma_pass_rate"] == 100.0
    assert m["spinal_cord_dmax_err_gy"] == 0.0 and m["hi_pred"] == m["hi_ref"] == 0.0
    assert m["constraint_compliance_pred"] == m["constraint_compliance_ref"] == 1.0
    expected_keys = {"mae_gy", "mae_pct_rx", "openkbp_dose_score", "openkbp_dvh_score", "hi_pred", "hi_ref",
                     "ci_rtog_pred", "ci_rtog_ref", "paddick_ci_pred", "paddick_ci_ref", "mean_isodose_dice",
                     "spinal_cord_dmax_err_gy", "gamma_pass_rate", "constraint_compliance_pred",
                     "constraint_compliance_ref",
                     # issue #11: the case's number of DVH cells, its weight in a cohort's DVH score
                     "dvh_cells"}
    assert set(m) == expected_keys
    assert m["dvh_cells"] == 3 + 2  # PTV70: D99, D95, D1; SpinalCord: D_0.1cc, mean (Larynx empty, Body excluded)

    pred = ref + 0.7 * masks["Body"]
    m = M.case_metrics(pred, ref, masks, plan, spacing, masks["Body"])
    assert m["mae_gy"] == pytest.approx(0.7) and m["mae_pct_rx"] == pytest.approx(1.0)
    assert m["openkbp_dvh_score"] == pytest.approx(0.7)   # Body excluded, all structures inside it
    assert m["spinal_cord_dmax_err_gy"] == pytest.approx(0.7)
    assert m["gamma_pass_rate"] == 100.0

    no_cord = {k: v for k, v in masks.items() if k != "SpinalCord"}
    assert math.isnan(M.case_metrics(pred, ref, no_cord, plan, spacing, None)["spinal_cord_dmax_err_gy"])


# --------------------------------------------------------------------------------------------
# OpenKBP scores on the 24 real patients
# --------------------------------------------------------------------------------------------
def _read_indices(path: Path) -> np.ndarray:
    return np.atleast_1d(np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=np.int64))


def _read_openkbp_patient(folder: Path) -> dict:
    """Sparse patient: dose/possible-dose-mask/structure flat indices into 128^3 (C order)."""
    dose = np.atleast_2d(np.loadtxt(folder / "dose.csv", delimiter=",", skiprows=1))
    structures = {}
    for p in sorted(folder.glob("*.csv")):
        if p.stem not in ("ct", "dose", "possible_dose_mask", "voxel_dimensions"):
            structures[p.stem] = _read_indices(p)
    return {"dose_idx": dose[:, 0].astype(np.int64), "dose_val": dose[:, 1],
            "pdm": _read_indices(folder / "possible_dose_mask.csv"), "structures": structures,
            "voxel_mm": np.loadtxt(folder / "voxel_dimensions.csv")}


def _dense(idx: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(OPENKBP_SHAPE, np.float64 if values is not None else bool)
    out.ravel()[idx] = True if values is None else values
    return out


@pytest.fixture(scope="session")
def openkbp_patients() -> dict[str, dict]:
    return {p.name: _read_openkbp_patient(p) for p in sorted(OPENKBP_DIR.glob("pt_*"))}


needs_openkbp = pytest.mark.skipif(not OPENKBP_DIR.is_dir(), reason=f"OpenKBP sample not found at {OPENKBP_DIR}")


@needs_openkbp
def test_openkbp_sample_is_complete(openkbp_patients):
    assert len(openkbp_patients) == 24
    for pt in openkbp_patients.values():
        assert "PTV70" in pt["structures"] and pt["voxel_mm"].shape == (3,)


@needs_openkbp
def test_openkbp_scores_on_real_patients(openkbp_patients):
    """Per patient: ref vs ref scores 0/0; ref + 1 Gy inside the possible-dose mask scores dose 1.

    The DVH score of ref + 1 is exactly 1 only when every structure lies inside the possible-dose
    mask. In this sample cords and brainstems often extend beyond it (no dose there, pred = ref =
    0), so the error of each point equals the same percentile of the structure's 0/1 indicator
    (0 outside, 1 inside the mask) and the mean error is the inside fraction. Both the general
    identity and the clipped-structure case (score exactly 1) are checked.
    """
    partial = 0
    for name, pt in openkbp_patients.items():
        ref = _dense(pt["dose_idx"], pt["dose_val"])
        pdm = _dense(pt["pdm"])
        assert not ref[~pdm].any(), name                   # no dose outside the possible-dose mask
        vv = float(np.prod(pt["voxel_mm"])) / 1000.0
        masks = {s: _dense(i) for s, i in pt["structures"].items()}
        targets = [s for s in masks if s in OPENKBP_TARGETS]

        assert M.openkbp_dose_score(ref, ref, pdm) == 0.0
        assert M.openkbp_dvh_score(ref, ref, masks, vv, targets) == 0.0

        pred = ref + pdm
        assert abs(M.openkbp_dose_score(pred, ref, pdm) - 1.0) < 1e-12, name
        clipped = {s: m & pdm for s, m in masks.items()}
        assert abs(M.openkbp_dvh_score(pred, ref, clipped, vv, targets) - 1.0) < 1e-6, name

        errs = M.openkbp_dvh_errors(pred, ref, masks, vv, targets)
        expected = {}
        for s, m in masks.items():
            inside = np.sort(pdm[m].astype(np.float64))      # 0 outside, 1 inside the pdm
            if s in targets:
                for x in M.OPENKBP_TARGET_POINTS:
                    expected[f"{s}/D{x}"] = float(np.percentile(inside, 100 - x))
            else:
                expected[f"{s}/D_0.1cc"] = dvh.d_cc(inside, np.ones(inside.size, bool), 0.1, vv)
                expected[f"{s}/mean"] = float(inside.mean())
            partial += bool(inside.min() == 0)
        assert errs.keys() == expected.keys(), name
        for k in errs:
            assert abs(errs[k] - expected[k]) < 1e-6, (name, k)
        score = M.openkbp_dvh_score(pred, ref, masks, vv, targets)
        assert abs(score - float(np.mean(list(expected.values())))) < 1e-6
        if all(m[~pdm].sum() == 0 for m in masks.values()):
            assert abs(score - 1.0) < 1e-6, name
    assert partial > 0  # the sample does contain structures reaching outside the mask


@needs_openkbp
def test_case_metrics_on_a_real_patient(openkbp_patients):
    from scipy.ndimage import gaussian_filter

    pt = openkbp_patients["pt_11"]
    ref = _dense(pt["dose_idx"], pt["dose_val"])
    pdm = _dense(pt["pdm"])
    masks = {s: _dense(i) for s, i in pt["structures"].items()}
    rx = {s: OPENKBP_TARGETS[s] for s in masks if s in OPENKBP_TARGETS}
    plan = Plan("head_neck", rx, 35, "IMRT", tuple(Beam(float(g)) for g in range(0, 360, 40)), {})
    pred = gaussian_filter(ref, 1.0) * pdm
    m = M.case_metrics(pred, ref, masks, plan, tuple(pt["voxel_mm"]), pdm)
    # pred and ref are 0 outside the mask, so the official score (sum over the whole grid / mask
    # voxels) equals the MAE inside the mask, up to the order of the float sums
    assert 0 < m["mae_gy"] < 5 and m["openkbp_dose_score"] == pytest.approx(m["mae_gy"], rel=1e-12)
    assert m["openkbp_dose_score"] == pytest.approx(readme_dose_score(pred, ref, pdm), rel=1e-9)
    # a prediction with dose outside the mask: the official pipeline masks it first
    from addiff_core.regions import zero_outside

    spill = gaussian_filter(ref, 3.0) + 0.5
    assert M.openkbp_dose_score(zero_outside(spill, pdm), ref, pdm) == pytest.approx(
        readme_dose_score(spill, ref, pdm), rel=1e-9)
    assert M.openkbp_dose_score(spill, ref, pdm) > M.openkbp_dose_score(zero_outside(spill, pdm), ref, pdm)
    assert 0 < m["openkbp_dvh_score"] < 10
    assert 50 < m["gamma_pass_rate"] <= 100 and 0.5 < m["mean_isodose_dice"] <= 1
    assert m["spinal_cord_dmax_err_gy"] >= 0 and 0 <= m["constraint_compliance_ref"] <= 1
