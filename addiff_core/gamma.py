"""Gamma index (AAPM TG-218): pure numpy, no I/O. Re-exported by :mod:`addiff_core.metrics`.

Arrays are numpy in SimpleITK order ``(z, y, x)``; ``spacing`` is SimpleITK order ``(x, y, z)``
in mm. The pass rate is a *percentage* (0..100).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .gamma_search import GammaGrid, edge_search, fine_search

_GAMMA_TOL = 1e-9  # floating-point slack on the gamma <= 1 pass criterion


def _check_pair(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} does not match ref shape {ref.shape}")
    return ref, pred


def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match dose shape {shape}")
    return m if m.dtype == bool else m != 0


def _gamma_squared(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float, dta_mm: float,
                   cutoff_pct: float, global_norm: bool, search_mm: float, stop_at: float | None,
                   mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Squared gamma of the evaluated reference voxels: ``(flat indices, gamma^2)``.

    ``g^2(r) = min |r' - r|^2 / dta^2 + (D_pred(r') - D_ref(r))^2 / dD^2`` over the ball
    ``|r' - r| <= search_mm``, with ``D_pred`` interpolated trilinearly (multilinearly in any
    dimension) and unknown outside the array. Two stages: the exact minimum along the lattice
    edges (:func:`~addiff_core.gamma_search.edge_search`), then, for the voxels not settled by it, lines along one axis
    every ``dta / INTERP_FRACTION`` mm across the ball, minimised in closed form along each line
    (:func:`~addiff_core.gamma_search.fine_search`). With ``stop_at`` set, a voxel is dropped once its gamma is
    <= ``stop_at`` (its value is then only an upper bound <= ``stop_at``), or once a bound on the
    dose near it proves gamma > ``stop_at``: pass rates are fast.
    """
    ref, pred = _check_pair(ref, pred)
    sel = ref >= (cutoff_pct / 100.0) * (float(ref.max()) if ref.size else 0.0)
    if mask is not None:
        sel &= _as_mask(mask, ref.shape)
    g = GammaGrid(ref, pred, spacing, dose_pct, dta_mm, global_norm, search_mm, sel)
    if g.empty:
        return np.zeros(0, np.int64), np.zeros(0)
    thr2 = None if stop_at is None else stop_at * stop_at + _GAMMA_TOL
    best = edge_search(g, thr2)
    if ref.ndim >= 2:
        fine_search(g, best, thr2)
    return g.flat_out, best


def gamma_index(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float = 3.0,
                dta_mm: float = 2.0, cutoff_pct: float = 10.0, global_norm: bool = True,
                max_search_mm: float | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Gamma index map (same shape as ``ref``; nan where not evaluated).

    Same criteria and interpolated search as :func:`gamma_pass_rate`, over the ball of radius
    ``max_search_mm`` (default ``2 * dta_mm``) around each voxel, without early exit: a value
    above ``max_search_mm / dta_mm`` is the minimum found in the ball (the true gamma is at
    least ``max_search_mm / dta_mm`` there).
    """
    search = 2.0 * dta_mm if max_search_mm is None else float(max_search_mm)
    flat, g2 = _gamma_squared(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, search, None, mask)
    out = np.full(np.shape(ref), np.nan)
    out.ravel()[flat] = np.sqrt(g2)
    return out


def gamma_pass_rate(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float = 3.0,
                    dta_mm: float = 2.0, cutoff_pct: float = 10.0, global_norm: bool = True,
                    max_search_mm: float | None = None, mask: np.ndarray | None = None) -> float:
    """Gamma pass rate in percent (AAPM TG-218). Note the argument order: reference first.

    * dose criterion ``dD``: ``dose_pct`` % of the reference maximum (global) or of the local
      reference dose (``global_norm=False``); distance criterion ``dta_mm``;
    * evaluated points: reference voxels with ``ref >= cutoff_pct`` % of the reference maximum
      (and inside ``mask`` if given); a point passes if ``gamma <= 1``;
    * ``spacing`` in SimpleITK ``(x, y, z)`` order (mm) for ``(z, y, x)`` arrays; any
      dimensionality (the spacing has one value per array axis, reversed);
    * ``gamma(r) = min sqrt(|r' - r|^2 / dta^2 + (D_pred(r') - D_ref(r))^2 / dD^2)`` over every
      point ``r'`` of the ball ``|r' - r| <= max_search_mm`` (default ``dta_mm``: a larger radius
      cannot change a pass/fail decision, a smaller one can only lower the pass rate), with
      ``D_pred`` interpolated trilinearly (as pymedphys; multilinear in any dimension) and
      unknown outside the array. Computed exactly along the lattice edges, then along lines
      every ``dta_mm / 10`` mm through the ball (closed form along each line, where the dose is
      piecewise linear): within ~0.1 point of the continuous minimum of the interpolated dose
      (issue #31; pymedphys with ``interp_fraction=10`` samples points on 0.2 mm shells).

    Returns nan when no voxel is evaluated (e.g. an all-zero reference).
    """
    search = float(dta_mm) if max_search_mm is None else float(max_search_mm)
    flat, g2 = _gamma_squared(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, search, 1.0, mask)
    if flat.size == 0:
        return math.nan
    return float(100.0 * np.count_nonzero(g2 <= 1.0 + _GAMMA_TOL) / flat.size)
