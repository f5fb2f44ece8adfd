"""The two searches behind :mod:`addiff_core.gamma`: lattice edges, then fine interpolated lines.

Arrays are ``(z, y, x)``; everything here works in array-axis order and in units of the DTA
(distances) and of the dose criterion ``dD`` (doses), so ``g^2 = distance^2 + dose^2``.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

INTERP_FRACTION = 10       # fine lines every dta / INTERP_FRACTION mm (as pymedphys' interp_fraction)
_BLOCK = 1 << 19           # voxels x lines per vectorised block (bounds memory: ~4 MB per array)
_LINES_PER_CHUNK = 32


class GammaGrid:
    """The evaluated reference voxels and the NaN-padded evaluated dose, flat (shared by both searches)."""

    def __init__(self, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dose_pct: float,
                 dta_mm: float, global_norm: bool, search_mm: float, sel: np.ndarray) -> None:
        nd = ref.ndim
        if len(spacing) != nd:
            raise ValueError(f"spacing has {len(spacing)} values for a {nd}-D array")
        self.h = np.asarray(spacing, dtype=np.float64)[::-1]  # array-axis order
        if np.any(self.h <= 0) or dta_mm <= 0 or dose_pct <= 0:
            raise ValueError("spacing, dta_mm and dose_pct must be positive")
        ref_max = float(ref.max()) if ref.size else 0.0
        self.empty = ref_max <= 0 or not sel.any()
        if self.empty:
            return
        self.pred, self.dta, self.search = pred, float(dta_mm), float(search_mm)
        self.shape = np.asarray(ref.shape)
        self.hs = self.h / dta_mm                       # grid step in units of DTA
        # search half-width in whole voxels per axis (no further than the array reaches)
        self.n = np.minimum(np.floor(search_mm / self.h + 1e-9), np.asarray(ref.shape) - 1).astype(int)
        self.pad = self.n + 1
        pp = np.pad(pred, [(int(p), int(p)) for p in self.pad], mode="constant", constant_values=np.nan)
        self.strides = np.array([int(np.prod(pp.shape[k + 1:])) for k in range(nd)], dtype=np.int64)
        self.pflat = pp.ravel()
        coords = np.nonzero(sel)
        self.coords = coords
        self.flat_out = np.ravel_multi_index(coords, ref.shape)
        self.pos = sum((c.astype(np.int64) + int(p)) * s for c, p, s in zip(coords, self.pad, self.strides))
        r = ref[coords]
        dd = (dose_pct / 100.0) * (np.full(r.shape, ref_max) if global_norm else np.maximum(r, 1e-12 * ref_max))
        self.inv_dd = 1.0 / dd
        self.rn = r * self.inv_dd                       # reference dose in units of dD


def edge_search(g: GammaGrid, thr2: float | None) -> np.ndarray:
    """Squared gamma minimised over the point itself and the lattice edges (exact, closed form).

    On a lattice edge the trilinear dose is linear, so ``g^2`` is a quadratic in the edge
    parameter. The result is an upper bound on the minimum over the whole sphere; voxels whose
    value drops to ``thr2`` are left alone from then on (their value is only <= ``thr2``).
    """
    nd, n, pad, hs, strides, pos = len(g.h), g.n, g.pad, g.hs, g.strides, g.pos
    best = (g.pflat[pos] * g.inv_dd - g.rn) ** 2      # the point itself (no interpolation)
    best[np.isnan(best)] = np.inf
    active = np.arange(best.size) if thr2 is None else np.flatnonzero(best > thr2)
    r2_search = (g.search / g.dta) ** 2
    # Lines along axis k at a fixed perpendicular grid offset, nearest first; on each line the
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
        idx, w, rna, cur = pos[active], g.inv_dd[active], g.rn[active], best[active]
        v0 = g.pflat[idx + (off + segs[0] * sk)] * w
        for j in segs:
            v1 = g.pflat[idx + (off + (j + 1) * sk)] * w
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
    return best




def _fine_lines(g: GammaGrid) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lines along the coarsest axis ``k`` through the ball, every ``dta / INTERP_FRACTION`` mm.

    Returns ``(k, perp2, offsets, weights, rho, cells)`` sorted by ``perp2`` (squared perpendicular
    distance, DTA units): the dose on a line at a lattice plane ``j`` along ``k`` is
    ``sum_c weights[c] * pred[voxel + offsets[c] + j * stride_k]`` (multilinear in the other
    axes; the same weights for every voxel, as reference voxels sit on the lattice), and the line
    runs over ``|x_k| <= rho`` (grid units along ``k``), inside the column of lattice cells whose
    lower corner is at ``cells`` (grid units along the other axes).
    """
    nd = len(g.h)
    k = int(np.argmax(g.h))
    others = [a for a in range(nd) if a != k]
    step = g.dta / INTERP_FRACTION
    axes = []
    for a in others:   # beyond the array the dose is unknown: no lines there
        m = int(math.floor(min(g.search, (g.shape[a] - 1) * g.h[a]) / step + 1e-9))
        axes.append(np.arange(-m, m + 1) * step)
    off_mm = np.stack([x.ravel() for x in np.meshgrid(*axes, indexing="ij")], axis=1)
    d2 = np.sum(off_mm ** 2, axis=1)
    keep = d2 <= g.search ** 2 * (1 + 1e-12)
    off_mm, d2 = off_mm[keep], d2[keep]
    order = np.argsort(d2, kind="stable")
    off_mm, d2 = off_mm[order], d2[order]
    offs = np.zeros((1, len(d2)), np.int64)
    wts = np.ones((1, len(d2)))
    cells = np.zeros((len(d2), len(others)), np.int64)
    for col, a in enumerate(others):
        u = off_mm[:, col] / g.h[a]
        f = np.floor(u + 1e-9)
        fr = np.where(u - f < 1e-9, 0.0, u - f)
        cells[:, col] = f
        # a zero weight keeps the lower index: the upper one may be NaN padding (0 * NaN = NaN)
        lo_off, hi_off = f * g.strides[a], (f + (fr > 0)) * g.strides[a]
        offs = np.concatenate([offs + lo_off.astype(np.int64), offs + hi_off.astype(np.int64)])
        wts = np.concatenate([wts * (1 - fr), wts * fr])
    rho = np.minimum(np.sqrt(np.maximum(g.search ** 2 - d2, 0.0)) / g.h[k], g.shape[k] - 1)
    return k, d2 / g.dta ** 2, offs, wts, rho, cells


def _column_may_improve(g: GammaGrid, vox: np.ndarray, k: int, cell: np.ndarray, r_max: float,
                        perp2_min: float, thr2: float | None, best: np.ndarray) -> np.ndarray:
    """Mask of ``vox``: voxels for which a column of cells can still lower ``best`` (or reach
    ``thr2``). Interpolation never leaves the range of the cells' corner values, so ``g^2`` in the
    column is at least ``perp2_min`` plus the squared dose gap between that range and ``D_ref``."""
    others = [a for a in range(len(g.h)) if a != k]
    perp = [sum(int(c + b) * int(g.strides[a]) for c, b, a in zip(cell, bits, others))
            for bits in itertools.product((0, 1), repeat=len(others))]
    sk = int(g.strides[k])
    offs = np.array([p + j * sk for p in perp for j in range(int(math.floor(-r_max)), int(math.ceil(r_max)) + 1)])
    vals = g.pflat[g.pos[vox][:, None] + offs]
    hi, lo = np.fmax.reduce(vals, axis=1), np.fmin.reduce(vals, axis=1)
    w, rn = g.inv_dd[vox], g.rn[vox]
    gap = np.maximum(np.maximum(rn - hi * w, lo * w - rn), 0.0)
    bound = gap * gap + perp2_min               # NaN (no known corner) compares False: dropped
    keep = bound < best[vox]
    return keep if thr2 is None else keep & (bound <= thr2)


def _lines_block(g: GammaGrid, vox: np.ndarray, k: int, lines: tuple[np.ndarray, ...],
                 cur: np.ndarray) -> np.ndarray:
    """Minimum of ``cur`` and ``g^2`` over the given lines for the voxels ``vox`` (closed form per
    segment between lattice planes along ``k``, where the dose is linear)."""
    perp2, offs, wts, rho = lines
    idx, w, rna = g.pos[vox][:, None], g.inv_dd[vox][:, None], g.rn[vox][:, None]
    a_geo, sk = g.hs[k] ** 2, int(g.strides[k])

    def knot(j: int) -> np.ndarray:
        v = sum(wts[c] * g.pflat[idx + (offs[c] + j * sk)] for c in range(len(offs)))
        return v * w

    r_max = float(rho.max())
    j0, j1 = int(math.floor(-r_max)), int(math.ceil(r_max))
    v0 = knot(j0)
    for j in range(j0, j1):
        v1 = knot(j + 1)
        d0, d1 = v0 - rna, v1 - v0
        lo, hi = np.maximum(-rho - j, 0.0), np.minimum(rho - j, 1.0)   # the part of [j, j+1] in the ball
        t = np.minimum(np.maximum(-(j * a_geo + d0 * d1) / (a_geo + d1 * d1), lo), hi)
        g2 = perp2 + (j + t) ** 2 * a_geo + (d0 + t * d1) ** 2
        g2[:, lo > hi] = np.inf
        np.fmin(cur, np.fmin.reduce(g2, axis=1), out=cur)
        v0 = v1
    return cur


def fine_search(g: GammaGrid, best: np.ndarray, thr2: float | None) -> None:
    """Lower ``best`` (``g^2`` per voxel, in place) by the minimum over fine lines in the ball.

    Lines are taken column of cells by column (nearest first), and only for voxels that can still
    change: above ``thr2`` (a pass rate: a voxel leaves once it passes), not excluded by the
    column's dose bound (:func:`_column_may_improve`), and with ``best`` above the perpendicular
    distance of the next lines (sorted: none can do better).
    """
    active = np.arange(best.size) if thr2 is None else np.flatnonzero(best > thr2)
    if active.size == 0:
        return
    k, perp2, offs, wts, rho, cells = _fine_lines(g)
    _, group = np.unique(cells, axis=0, return_inverse=True)
    group = group.reshape(-1)
    first = {}
    for i, gi in enumerate(group):      # lines are sorted by perp2: the first is the nearest
        first.setdefault(int(gi), i)
    for gi in sorted(first, key=first.get):
        li = np.flatnonzero(group == gi)
        cand = active[best[active] > perp2[li[0]]]
        if cand.size:
            cand = cand[_column_may_improve(g, cand, k, cells[li[0]], float(rho[li].max()), float(perp2[li[0]]),
                                            thr2, best)]
        for c0 in range(0, li.size, _LINES_PER_CHUNK):
            sel = li[c0:c0 + _LINES_PER_CHUNK]
            cand = cand[best[cand] > perp2[sel[0]]]
            if cand.size == 0:
                break
            lines = (perp2[sel], offs[:, sel], wts[:, sel], rho[sel])
            block = max(1, _BLOCK // sel.size)
            for b0 in range(0, cand.size, block):
                vox = cand[b0:b0 + block]
                best[vox] = _lines_block(g, vox, k, lines, best[vox])
            if thr2 is not None:
                cand = cand[best[cand] > thr2]
        if thr2 is not None:
            active = active[best[active] > thr2]
            if active.size == 0:
                return
