"""Gamma index (AAPM TG-218): pure numpy, no I/O. Re-exported by :mod:`addiff_core.metrics`.

Arrays are numpy in SimpleITK order ``(z, y, x)``; ``spacing`` is SimpleITK order ``(x, y, z)``
in mm. The pass rate is a *percentage* (0..100).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

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

    The evaluated (``pred``) dose is interpolated linearly along the grid lines (the edges of the
    voxel lattice): for every lattice edge within ``search_mm`` of a reference voxel, the minimum
    of ``|dr|^2 / dta^2 + (D_pred(r') - D_ref(r))^2 / dD^2`` along the edge is found in closed
    form (a quadratic in the edge parameter). Exact on grid points and along axis-parallel lines.
    With ``stop_at`` set, voxels are dropped once their gamma is <= ``stop_at`` (the returned
    value is then only an upper bound <= stop_at for them), which makes pass rates fast.
    """
    ref, pred = _check_pair(ref, pred)
    nd = ref.ndim
    if len(spacing) != nd:
        raise ValueError(f"spacing has {len(spacing)} values for a {nd}-D array")
    h = np.asarray(spacing, dtype=np.float64)[::-1]  # array-axis order
    if np.any(h <= 0) or dta_mm <= 0 or dose_pct <= 0:
        raise ValueError("spacing, dta_mm and dose_pct must be positive")
    ref_max = float(ref.max()) if ref.size else 0.0
    sel = ref >= (cutoff_pct / 100.0) * ref_max
    if mask is not None:
        sel &= _as_mask(mask, ref.shape)
    if ref_max <= 0 or not sel.any():
        return np.zeros(0, np.int64), np.zeros(0)

    hs = h / dta_mm                                  # grid step in units of DTA
    # search half-width in voxels per axis (no further than the array reaches)
    n = np.minimum(np.floor(search_mm / h + 1e-9), np.asarray(ref.shape) - 1).astype(int)
    pad = n + 1
    pp = np.pad(pred, [(int(p), int(p)) for p in pad], mode="constant", constant_values=np.nan)
    strides = np.array([int(np.prod(pp.shape[k + 1:])) for k in range(nd)], dtype=np.int64)
    coords = np.nonzero(sel)
    flat_out = np.ravel_multi_index(coords, ref.shape)
    pos = sum((c.astype(np.int64) + int(p)) * s for c, p, s in zip(coords, pad, strides))
    pflat = pp.ravel()

    r = ref[coords]
    dd = (dose_pct / 100.0) * (np.full(r.shape, ref_max) if global_norm else np.maximum(r, 1e-12 * ref_max))
    inv_dd = 1.0 / dd
    rn = r * inv_dd                                  # reference dose in units of dD
    best = (pflat[pos] * inv_dd - rn) ** 2           # the point itself (no interpolation)
    best[np.isnan(best)] = np.inf
    thr2 = None if stop_at is None else stop_at * stop_at + _GAMMA_TOL
    active = np.arange(best.size) if thr2 is None else np.flatnonzero(best > thr2)
    r2_search = (search_mm / dta_mm) ** 2

    # Lines along axis k at a fixed perpendicular offset, nearest first; on each line the
    # segments [j, j+1] (grid units along k) that come within the search radius.
    lines = []
    for k in range(nd):
        others = [a for a in range(nd) if a != k]
        for perp in itertools.product(*[range(-int(n[a]), int(n[a]) + 1) for a in others]):
            perp2 = float(sum((o * hs[a]) ** 2 for o, a in zip(perp, others)))
            reach = math.sqrt(max(r2_search - perp2, 0.0))
            segs = [j for j in range(-int(pad[k]), int(pad[k]))
                    if (0.0 if j <= 0 <= j + 1 else min(abs(j), abs(j + 1)) * hs[k]) <= reach + 1e-12]
            if perp2 <= r2_search + 1e-12 and segs:
                off = int(sum(o * strides[a] for o, a in zip(perp, others)))
                lines.append((perp2, k, off, segs))
    lines.sort(key=lambda x: (x[0], x[1]))

    for perp2, k, off, segs in lines:
        if active.size == 0:
            break
        a_geo = hs[k] ** 2
        sk = int(strides[k])
        idx, w, rna, cur = pos[active], inv_dd[active], rn[active], best[active]
        v0 = pflat[idx + (off + segs[0] * sk)] * w
        for j in segs:
            v1 = pflat[idx + (off + (j + 1) * sk)] * w
            d0 = v0 - rna
            d1 = v1 - v0
            # g2(t) = perp2 + (j + t)^2 a_geo + (d0 + t d1)^2, minimised over t in [0, 1]
            t = -(j * a_geo + d0 * d1) / (a_geo + d1 * d1)
            np.clip(t, 0.0, 1.0, out=t)
            g2 = perp2 + (j + t) ** 2 * a_geo + (d0 + t * d1) ** 2
            np.fmin(cur, g2, out=cur)
            v0 = v1
            if thr2 is not None:
                keep = cur > thr2
                if not keep.all():
                    best[active] = cur
                    active, idx, w, rna, cur, v0 = (x[keep] for x in (active, idx, w, rna, cur, v0))
                    if active.size == 0:
                        break
        best[active] = cur
    return flat_out, best


def gamma_index(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float = 3.0,
                dta_mm: float = 2.0, cutoff_pct: float = 10.0, global_norm: bool = True,
                max_search_mm: float | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Gamma index map (same shape as ``ref``; nan where not evaluated).

    Same criteria as :func:`gamma_pass_rate`. The search covers lattice edges within
    ``max_search_mm`` (default ``2 * dta_mm``) of each voxel, so a value above
    ``max_search_mm / dta_mm`` is the minimum found in the search region (the true gamma is at
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
    * the predicted dose is interpolated linearly along grid lines (see ``_gamma_squared``) and
      treated as unknown outside the array. The search radius is ``max_search_mm`` (default
      ``dta_mm``: a larger radius cannot change a pass/fail decision, a smaller one can only
      lower the pass rate).

    Returns nan when no voxel is evaluated (e.g. an all-zero reference).
    """
    search = float(dta_mm) if max_search_mm is None else float(max_search_mm)
    flat, g2 = _gamma_squared(ref, pred, spacing, dose_pct, dta_mm, cutoff_pct, global_norm, search, 1.0, mask)
    if flat.size == 0:
        return math.nan
    return float(100.0 * np.count_nonzero(g2 <= 1.0 + _GAMMA_TOL) / flat.size)
