"""Gamma (issue #31) against independent references: the exact continuous pass rate of analytic
Gaussian doses, and pymedphys 0.41 (the ``dev`` extra) on the demo grid, an OpenKBP patient and
a noisy pair, with the same voxels scored and the evaluation-region mask.

All comparisons use 3 %/2 mm, 10 % cutoff, global normalisation to the reference maximum unless
said otherwise; a pass rate must be within 0.5 points of the reference.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from addiff_core import gamma as G

TOL = 0.5  # percentage points


# --------------------------------------------------------------------------------------------
# analytic reference
# --------------------------------------------------------------------------------------------
def gauss_pair(shape, spacing_xyz, sigma, shift_xyz, scale, amp=60.0):
    """Reference and evaluated Gaussians sampled on a ``(z, y, x)`` grid (centre off the lattice),
    plus, per voxel, the distance to the evaluated centre and the evaluated profile f(rho)."""
    h = np.asarray(spacing_xyz, float)[::-1]
    axes = [np.arange(n) * hh for n, hh in zip(shape, h)]
    c = np.array([a[-1] / 2 for a in axes]) + np.array([0.31, -0.47, 0.23])
    ce = c + np.asarray(shift_xyz, float)[::-1]
    pts = np.meshgrid(*axes, indexing="ij")
    ref = amp * np.exp(-sum((p - cc) ** 2 for p, cc in zip(pts, c)) / (2 * sigma ** 2))
    dist = np.sqrt(sum((p - cc) ** 2 for p, cc in zip(pts, ce)))
    pred = scale * amp * np.exp(-dist ** 2 / (2 * sigma ** 2))
    return ref, pred, dist, lambda rho: scale * amp * np.exp(-rho ** 2 / (2 * sigma ** 2))


def exact_rate(ref, dist, f, global_norm=True, dose_pct=3.0, dta=2.0, cutoff=10.0, samples=2001):
    """Exact continuous pass rate for an evaluated dose ``f(|r' - c'|)`` (no grid, no interpolation).

    For a radius rho the nearest point of the sphere |r' - c'| = rho to r lies on the ray from c'
    through r, at distance |rho - d|; so gamma^2 = min over u in [-1, 1] of
    u^2 + (f(|d + u dta|) - D_ref)^2 / dD^2, minimised densely (steps of 0.001 DTA).
    """
    sel = ref >= cutoff / 100 * ref.max()
    r, d = ref[sel], dist[sel]
    dd = dose_pct / 100 * (ref.max() if global_norm else r)
    dd = np.broadcast_to(dd, r.shape)
    u = np.linspace(-1.0, 1.0, samples)
    passed = 0
    for i in range(0, r.size, 2000):
        s = slice(i, i + 2000)
        g2 = u ** 2 + ((f(np.abs(d[s, None] + dta * u)) - r[s, None]) / dd[s, None]) ** 2
        passed += np.count_nonzero(g2.min(axis=1) <= 1.0)
    return 100.0 * passed / r.size


def _obl(mm, signs=(1, 1, 1)):
    return np.asarray(signs, float) / np.sqrt(3) * mm


ISO, ANISO = ((48, 48, 48), (2.5, 2.5, 2.5)), ((48, 36, 36), (3.9, 3.9, 2.5))
ISO16 = ((56, 56, 56), (2.5, 2.5, 2.5))
ANALYTIC = [  # grid, sigma mm, shift (x, y, z) mm, dose scale, global norm
    pytest.param(ISO, 12.0, _obl(2.96), 1.0, True, id="iso-s12-oblique2.96"),
    pytest.param(ISO16, 16.0, (0.0, 2.4, 0.0), 1.01, True, id="iso-s16-y2.4-x1.01"),
    pytest.param(ISO16, 16.0, _obl(2.9), 1.0, True, id="iso-s16-oblique2.9"),
    pytest.param(ANISO, 20.0, (2.5, 0.0, 0.0), 1.02, True, id="aniso-s20-x2.5-x1.02"),
    pytest.param(ANISO, 20.0, _obl(2.35, (1, -1, 1)), 0.98, True, id="aniso-s20-oblique2.35-x0.98"),
    pytest.param(((40, 28, 28), (3.9, 3.9, 2.5)), 15.0, (2.5, 0.0, 0.0), 1.02, True, id="aniso-s15-x2.5-x1.02"),
    pytest.param(((40, 28, 28), (3.9, 3.9, 2.5)), 15.0, (0.0, 0.0, 2.2), 1.0, True, id="aniso-s15-z2.2"),
    pytest.param(ISO16, 16.0, _obl(1.5, (1, 1, -1)), 1.02, False, id="iso-s16-oblique1.5-x1.02-local"),
]


@pytest.mark.parametrize("grid, sigma, shift, scale, global_norm", ANALYTIC)
def test_pass_rate_matches_exact_analytic_rate(grid, sigma, shift, scale, global_norm):
    shape, spacing = grid
    ref, pred, dist, f = gauss_pair(shape, spacing, sigma, shift, scale)
    want = exact_rate(ref, dist, f, global_norm)
    assert 50.0 < want < 100.0 or not global_norm   # a real mix of passes and failures
    got = G.gamma_pass_rate(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm)
    assert got == pytest.approx(want, abs=TOL)


def test_gamma_index_consistent_with_pass_rate_and_sphere():
    """gamma_index (full search, 2 x DTA) passes exactly the voxels gamma_pass_rate passes, and, for
    a pure shift of 1.9 mm (pred(r + shift) = ref(r)), stays near |shift| / DTA = 0.95 everywhere:
    only the interpolation error adds to it (measured max 1.03; the edge-only search gave 1.34)."""
    (shape, spacing), shift = ISO, _obl(1.9)
    ref, pred, _, _ = gauss_pair(shape, spacing, 12.0, shift, 1.0)
    g = G.gamma_index(ref, pred, spacing)
    ok = ~np.isnan(g)
    rate = G.gamma_pass_rate(ref, pred, spacing)
    assert rate == pytest.approx(100 * np.mean(g[ok] <= 1 + 1e-9))
    assert rate > 99.5
    assert np.nanmax(g) < 1.1


# --------------------------------------------------------------------------------------------
# pymedphys (test-only dependency: pip install -e ".[dev]")
# --------------------------------------------------------------------------------------------
def pymedphys_gamma(ref, pred, spacing_xyz, mask=None, global_norm=True, interp_fraction=10):
    """pymedphys.gamma on the same grid (pass/fail: it skips a voxel once passed): interp_fraction
    10 (its default), search 1.1 x DTA, scipy's trilinear
    interpolation (no numba), the cutoff and dD relative to the full reference maximum. With a
    mask, the reference is zeroed outside it (so those voxels fall below the cutoff)."""
    import pymedphys

    h = np.asarray(spacing_xyz, float)[::-1]
    axes = tuple(np.arange(n) * hh for n, hh in zip(ref.shape, h))
    r = ref if mask is None else np.where(mask, ref, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # pymedphys' own "quiet" notice
        g = pymedphys.gamma(axes, r, axes, pred, 3.0, 2.0, 10.0, interp_fraction=interp_fraction, max_gamma=1.1,
                            local_gamma=not global_norm, global_normalisation=float(ref.max()),
                            interp_algo="scipy", skip_once_passed=True, quiet=True)
    return g


def _compare_with_pymedphys(ref, pred, spacing, mask=None, global_norm=True):
    g_pm = pymedphys_gamma(ref, pred, spacing, mask, global_norm)
    scored = ~np.isnan(g_pm)
    g = G.gamma_index(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm, mask=mask)
    np.testing.assert_array_equal(~np.isnan(g), scored)          # the same voxels scored
    want = 100.0 * np.mean(g_pm[scored] <= 1.0)
    got = G.gamma_pass_rate(ref, pred, spacing, 3.0, 2.0, 10.0, global_norm, mask=mask)
    assert got == pytest.approx(want, abs=TOL)
    return got, want


def _shifted(dose, spacing_xyz, shift_xyz, scale):
    """A copy moved by ``shift_xyz`` mm (linear interpolation) and scaled."""
    vox = np.asarray(shift_xyz, float)[::-1] / np.asarray(spacing_xyz, float)[::-1]
    return ndimage.shift(dose, vox, order=1, mode="nearest") * scale


@pytest.fixture(scope="module")
def demo_case():
    from addiff_core.synth.cases import synth_case

    _, _, dose, _, body = synth_case(np.random.default_rng(3), "head_neck", size=32)
    from addiff_core.synth.hospitals import default_spacing
    return dose.astype(np.float64), body, default_spacing("head_neck", 32)


def test_demo_grid_shifted_matches_pymedphys(demo_case):
    dose, _, spacing = demo_case
    pred = _shifted(dose, spacing, (1.5, -1.0, 1.2), 1.02)
    got, want = _compare_with_pymedphys(dose, pred, spacing)
    assert 50 < want < 100


def test_noisy_pair_matches_pymedphys(demo_case):
    dose, _, spacing = demo_case
    rng = np.random.default_rng(7)
    pred = dose * (1 + 0.03 * rng.standard_normal(dose.shape))
    got, want = _compare_with_pymedphys(dose, pred, spacing)
    assert 50 < want < 100


def test_evaluation_mask_matches_pymedphys_on_masked_reference(demo_case):
    """(c) the evaluation-region mask: scored voxels are ref >= cutoff inside the mask, the cutoff and
    dD still from the whole reference's maximum, the evaluated dose searched everywhere."""
    dose, body, spacing = demo_case
    pred = _shifted(dose, spacing, (-1.2, 1.6, 0.8), 0.98)
    region = ndimage.binary_erosion(body, iterations=3) & (np.arange(dose.shape[2]) < dose.shape[2] // 2)
    got, want = _compare_with_pymedphys(dose, pred, spacing, mask=region)
    assert np.count_nonzero(region & (dose >= 0.1 * dose.max())) < np.count_nonzero(dose >= 0.1 * dose.max())
    assert 50 < want < 100


def test_openkbp_patient_shifted_copy_matches_pymedphys(openkbp_dir):
    from addiff_core.openkbp import read_sparse_csv, read_voxel_dimensions, to_case_array

    src = openkbp_dir / "pt_3"
    if not src.is_dir():
        src = sorted(openkbp_dir.glob("pt_*"))[0]
    idx, val = read_sparse_csv(src / "dose.csv", src.name, True)
    flat = np.zeros(128 ** 3)
    flat[idx] = val
    dose = to_case_array(flat)
    row, col, sl = read_voxel_dimensions(src)
    spacing = (col, row, sl)
    # a 40 x 40 x 24 block around the maximum keeps pymedphys to seconds; the same block for both
    zc, yc, xc = np.unravel_index(np.argmax(dose), dose.shape)
    box = tuple(slice(max(c - n // 2, 0), max(c - n // 2, 0) + n) for c, n in zip((zc, yc, xc), (24, 40, 40)))
    pred = _shifted(dose, spacing, (1.5, -1.0, 1.0), 1.02)
    got, want = _compare_with_pymedphys(dose[box], pred[box], spacing)
    assert 50 < want < 100


def test_pymedphys_is_a_test_only_dependency():
    """The reference stays out of a hospital's runtime: only the ``dev`` extra names it, and no
    module of addiff_core/, client/ or server/ imports it."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any("pymedphys" in d for d in project["dependencies"])
    assert any(d.startswith("pymedphys==") for d in project["optional-dependencies"]["dev"])
    for pkg in ("addiff_core", "client", "server"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(import|from)\s+pymedphys|import_module\([^)]*pymedphys", text, re.M), f
