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
    """``(flat indices, gamma^2)`` of the evaluated reference voxels over the ball ``search_mm``:
    exact along lattice edges (``edge_search``), then closed-form lines (``fine_search``). With
    ``stop_at``, a voxel stops once gamma <= stop_at (then only an upper bound) or is proven above."""
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
    """Gamma map (``ref``'s shape, nan where not evaluated): :func:`gamma_pass_rate`'s arguments and
    search without early exit over the ball ``max_search_mm`` (default ``2 * dta_mm``); a value
    above ``max_search_mm / dta_mm`` is the ball's minimum (the true gamma is at least that)."""
    search = 2.0 * dta_mm if max_search_mm is None else float(max_search_mm)
    flat, g2 = _gamma_squared(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, search, None, mask)
    out = np.full(np.shape(ref), np.nan)
    out.ravel()[flat] = np.sqrt(g2)
    return out


def gamma_pass_rate(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float = 3.0,
                    dta_mm: float = 2.0, cutoff_pct: float = 10.0, global_norm: bool = True,
                    max_search_mm: float | None = None, mask: np.ndarray | None = None) -> float:
    """Gamma pass rate in percent (AAPM TG-218); reference first.

    ``gamma(r) = min sqrt(|r' - r|^2 / dta^2 + (D_pred(r') - D_ref(r))^2 / dD^2)`` over the ball
    ``max_search_mm`` (default ``dta_mm``: larger cannot change a pass), ``D_pred`` trilinear as
    pymedphys (accuracy: BENCHMARKS.md, "Gamma: interpolated search (issue #31)").

    Args:
        ref, pred: doses of any dimensionality ((z, y, x)); spacing: mm, reversed ((x, y, z)).
        dose_pct: dD as % of the reference maximum, or of the local dose if not ``global_norm``.
        dta_mm: distance criterion; cutoff_pct: evaluate voxels >= this % of the reference max.
        mask: evaluate only inside it (None: everywhere).

    Returns:
        the % of evaluated voxels with gamma <= 1; nan when none is evaluated.
    """
    search = float(dta_mm) if max_search_mm is None else float(max_search_mm)
    flat, g2 = _gamma_squared(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, search, 1.0, mask)
    if flat.size == 0:
        return math.nan
    return float(100.0 * np.count_nonzero(g2 <= 1.0 + _GAMMA_TOL) / flat.size)
