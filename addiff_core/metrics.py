"""Dose-prediction metrics: pure numpy functions, no I/O, no global state.

Conventions used throughout
---------------------------
* Arrays are numpy in SimpleITK order ``(z, y, x)``; ``spacing`` is SimpleITK order ``(x, y, z)``
  in mm (so ``spacing[::-1]`` matches the array axes). Doses are in Gy, masks are boolean (any
  array is cast with ``!= 0``).
* ``D_x`` (``dose_at_volume_pct``) is the dose received by at least ``x`` % of a structure: the
  ``(100 - x)``-th percentile of the structure's voxel doses, ``numpy.percentile`` with its default
  linear interpolation. D95 is the 5th percentile, D2 the 98th. This is the OpenKBP convention.
* ``D_0.1cc``: the percentile ``100 - n / N * 100`` where ``n = max(1, round(0.1 cc / voxel
  volume))`` and ``N`` is the number of structure voxels (OpenKBP's definition; clipped at 0 when
  the structure is smaller than 0.1 cc).
* ``V_x`` is a *fraction* (0..1) of the structure receiving ``>= x`` Gy.
* DVH functions return ``nan`` for an empty structure instead of raising.
* The gamma pass rate is a *percentage* (0..100); every other ratio here is a fraction.
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from addiff_core.case_io import Plan

ISODOSE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Default isodose levels for Dice, as fractions of the (highest) prescription."""

DVH_PERCENT_POINTS: tuple[int, ...] = (99, 98, 95, 50, 2, 1)
"""The ``D_x`` points reported by :func:`dvh_points`."""

OPENKBP_TARGET_POINTS: tuple[int, ...] = (99, 95, 1)
"""OpenKBP DVH-score points for targets (``D99``, ``D95``, ``D1``); OARs use D_0.1cc and mean."""

MIN_STRUCTURE_VOXELS = 5
"""A structure is "present" (for constraints and cord Dmax) when it has more voxels than this."""

BODY_NAMES = frozenset({"Body", "BODY", "body", "External", "EXTERNAL"})

_GAMMA_TOL = 1e-9  # floating-point slack on the gamma <= 1 pass criterion


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match dose shape {shape}")
    return m if m.dtype == bool else m != 0


def _structure_doses(dose: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1-D float64 array of the dose in the structure's voxels."""
    dose = np.asarray(dose)
    return np.asarray(dose[_as_mask(mask, dose.shape)], dtype=np.float64)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} does not match ref shape {ref.shape}")
    return pred, ref


# --------------------------------------------------------------------------------------------
# voxel-wise errors
# --------------------------------------------------------------------------------------------
def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error in Gy over ``mask`` (all voxels if None); nan for an empty mask."""
    pred, ref = _check_pair(pred, ref)
    m = _as_mask(mask, ref.shape)
    n = int(m.sum())
    if n == 0:
        return math.nan
    return float(np.abs(pred[m] - ref[m]).sum() / n)


def mae_normalised(pred: np.ndarray, ref: np.ndarray, rx: float, mask: np.ndarray | None = None) -> float:
    """MAE as a fraction of the prescription ``rx`` (Gy): ``mae / rx`` (0.02 = 2 % of Rx)."""
    if not rx > 0:
        raise ValueError(f"prescription must be positive, got {rx!r}")
    return mae(pred, ref, mask) / float(rx)


# --------------------------------------------------------------------------------------------
# DVH points
# --------------------------------------------------------------------------------------------
def dose_at_volume_pct(dose: np.ndarray, mask: np.ndarray, pct: float) -> float:
    """``D_pct``: the dose received by at least ``pct`` % of the structure, in Gy.

    Equals ``numpy.percentile(dose[mask], 100 - pct)`` with linear interpolation (D95 = 5th
    percentile, D2 = 98th percentile). ``nan`` for an empty structure.
    """
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"volume percentage must be in [0, 100], got {pct!r}")
    d = _structure_doses(dose, mask)
    if d.size == 0:
        return math.nan
    return float(np.percentile(d, 100.0 - pct))


def d_cc(dose: np.ndarray, mask: np.ndarray, cc: float, voxel_volume_cc: float) -> float:
    """``D_cc``: the minimum dose to the hottest ``cc`` cm^3 of the structure (OpenKBP convention).

    ``n = max(1, round(cc / voxel_volume_cc))`` voxels; the value is the percentile
    ``100 - n / N * 100`` (clipped to 0) of the ``N`` structure voxel doses, linear
    interpolation. ``nan`` for an empty structure.
    """
    if not voxel_volume_cc > 0 or not cc > 0:
        raise ValueError("cc and voxel_volume_cc must be positive")
    d = _structure_doses(dose, mask)
    if d.size == 0:
        return math.nan
    n = max(1.0, float(np.round(cc / voxel_volume_cc)))
    return float(np.percentile(d, max(0.0, 100.0 - n / d.size * 100.0)))


def dmax(dose: np.ndarray, mask: np.ndarray) -> float:
    """Maximum voxel dose in the structure (Gy); nan when empty."""
    d = _structure_doses(dose, mask)
    return float(d.max()) if d.size else math.nan


def dmean(dose: np.ndarray, mask: np.ndarray) -> float:
    """Mean voxel dose in the structure (Gy); nan when empty."""
    d = _structure_doses(dose, mask)
    return float(d.mean()) if d.size else math.nan


def v_x(dose: np.ndarray, mask: np.ndarray, x_gy: float) -> float:
    """``V_x``: fraction (0..1) of the structure's voxels receiving ``>= x_gy``; nan when empty."""
    d = _structure_doses(dose, mask)
    return float(np.count_nonzero(d >= x_gy) / d.size) if d.size else math.nan


def _vx_key(x_gy: float) -> str:
    return f"V{float(x_gy):g}Gy"


def dvh_points(dose: np.ndarray, mask: np.ndarray, voxel_volume_cc: float, is_target: bool,
               v_x_gy: Sequence[float] = ()) -> dict[str, float]:
    """The usual DVH points of one structure, in Gy.

    Keys: ``D99, D98, D95, D50, D2, D1`` (see :func:`dose_at_volume_pct`), ``Dmean``, ``D_0.1cc``
    (:func:`d_cc`), ``Dmax``. For an OAR (``is_target=False``) also ``V{x}Gy`` (a fraction) for
    each ``x`` in ``v_x_gy``, e.g. ``V20Gy``; targets ignore ``v_x_gy``. All nan if empty.
    """
    d = _structure_doses(dose, mask)
    out: dict[str, float] = {}
    if d.size == 0:
        keys = [f"D{p}" for p in DVH_PERCENT_POINTS] + ["Dmean", "D_0.1cc", "Dmax"]
        keys += [] if is_target else [_vx_key(x) for x in v_x_gy]
        return {k: math.nan for k in keys}
    pcts = np.percentile(d, [100.0 - p for p in DVH_PERCENT_POINTS])
    out.update({f"D{p}": float(v) for p, v in zip(DVH_PERCENT_POINTS, pcts)})
    out["Dmean"] = float(d.mean())
    out["D_0.1cc"] = d_cc(d, np.ones(d.shape, bool), 0.1, voxel_volume_cc)
    out["Dmax"] = float(d.max())
    if not is_target:
        for x in v_x_gy:
            out[_vx_key(x)] = float(np.count_nonzero(d >= x) / d.size)
    return out


def dvh_curve(dose: np.ndarray, mask: np.ndarray, bins: int | np.ndarray = 200) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH: ``(dose_axis, volume_fraction)`` with ``volume_fraction[i]`` the fraction
    of the structure receiving ``>= dose_axis[i]``.

    ``bins`` is either the number of equally spaced dose points from 0 to the structure's Dmax
    (inclusive) or an explicit increasing dose axis in Gy (pass the same axis for prediction and
    reference to compare curves). An empty structure gives a volume fraction of zeros.
    """
    d = np.sort(_structure_doses(dose, mask))
    if np.ndim(bins) == 0:
        nb = int(bins)
        if nb < 2:
            raise ValueError("bins must be >= 2 (or an explicit dose axis)")
        axis = np.linspace(0.0, float(d[-1]) if d.size else 0.0, nb)
    else:
        axis = np.asarray(bins, dtype=np.float64)
        if axis.ndim != 1 or np.any(np.diff(axis) < 0):
            raise ValueError("an explicit dose axis must be 1-D and non-decreasing")
    if d.size == 0:
        return axis, np.zeros_like(axis)
    frac = (d.size - np.searchsorted(d, axis, side="left")) / d.size
    return axis, frac.astype(np.float64)


# --------------------------------------------------------------------------------------------
# OpenKBP scores (patient level; the mean over patients is the caller's)
# --------------------------------------------------------------------------------------------
def openkbp_dose_score(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """OpenKBP dose score of one patient: ``sum |pred - ref|`` over the possible-dose mask
    divided by the number of mask voxels (Gy)."""
    return mae(pred, ref, possible_dose_mask)


def openkbp_dvh_errors(pred: np.ndarray, ref: np.ndarray, structures: Mapping[str, np.ndarray],
                       voxel_volume_cc: float, target_names: Iterable[str]) -> dict[str, float]:
    """Absolute DVH-point errors ``|point(pred) - point(ref)|`` (Gy) of one patient, OpenKBP style.

    Structures named in ``target_names`` are targets (points ``D99``, ``D95``, ``D1``); all others
    are OARs (``D_0.1cc`` and ``mean``). Keys are ``"<structure>/<point>"``, e.g.
    ``"PTV70/D95"``, ``"SpinalCord/D_0.1cc"``, ``"SpinalCord/mean"``. As in OpenKBP, the whole
    structure is used (it is not clipped to the possible-dose mask); empty structures are skipped.
    """
    pred, ref = _check_pair(pred, ref)
    targets = set(target_names)
    out: dict[str, float] = {}
    for name, m in structures.items():
        mm = _as_mask(m, ref.shape)
        p, r = pred[mm], ref[mm]
        if r.size == 0:
            continue
        if name in targets:
            q = [100.0 - x for x in OPENKBP_TARGET_POINTS]
            err = np.abs(np.percentile(p, q) - np.percentile(r, q))
            out.update({f"{name}/D{x}": float(e) for x, e in zip(OPENKBP_TARGET_POINTS, err)})
        else:
            ones = np.ones(r.shape, bool)
            out[f"{name}/D_0.1cc"] = abs(d_cc(p, ones, 0.1, voxel_volume_cc) - d_cc(r, ones, 0.1, voxel_volume_cc))
            out[f"{name}/mean"] = float(abs(p.mean() - r.mean()))
    return out


def openkbp_dvh_score(pred: np.ndarray, ref: np.ndarray, structures: Mapping[str, np.ndarray],
                      voxel_volume_cc: float, target_names: Iterable[str]) -> float:
    """OpenKBP DVH score of one patient: the mean of :func:`openkbp_dvh_errors` (Gy); nan if no
    structure is non-empty."""
    errs = openkbp_dvh_errors(pred, ref, structures, voxel_volume_cc, target_names)
    return float(np.mean(list(errs.values()))) if errs else math.nan


# --------------------------------------------------------------------------------------------
# target quality
# --------------------------------------------------------------------------------------------
def homogeneity_index(dose: np.ndarray, target: np.ndarray) -> float:
    """ICRU 83 homogeneity index ``(D2 - D98) / D50`` of the target (0 = perfectly uniform)."""
    d = _structure_doses(dose, target)
    if d.size == 0:
        return math.nan
    d98, d50, d2 = np.percentile(d, [2.0, 50.0, 98.0])
    return float((d2 - d98) / d50) if d50 > 0 else math.nan


def conformity_index_rtog(dose: np.ndarray, target: np.ndarray, rx: float) -> float:
    """RTOG conformity index: volume receiving ``>= rx`` (whole array) / target volume."""
    dose = np.asarray(dose)
    tv = int(_as_mask(target, dose.shape).sum())
    if tv == 0:
        return math.nan
    return float(np.count_nonzero(dose >= rx) / tv)


def paddick_ci(dose: np.ndarray, target: np.ndarray, rx: float) -> float:
    """Paddick conformity index ``TV_PIV^2 / (TV * PIV)`` (1 = perfect; 0 if no voxel >= rx).

    TV: target volume, PIV: prescription isodose volume (voxels ``>= rx`` anywhere), TV_PIV: the
    part of the target inside the prescription isodose.
    """
    dose = np.asarray(dose)
    t = _as_mask(target, dose.shape)
    piv_mask = dose >= rx
    tv, piv = int(t.sum()), int(piv_mask.sum())
    if tv == 0:
        return math.nan
    if piv == 0:
        return 0.0
    tv_piv = int(np.count_nonzero(piv_mask & t))
    return float(tv_piv * tv_piv / (tv * piv))


# --------------------------------------------------------------------------------------------
# isodose overlap and OAR error
# --------------------------------------------------------------------------------------------
def isodose_dice(pred: np.ndarray, ref: np.ndarray, rx: float, levels: Sequence[float] = ISODOSE_LEVELS,
                 mask: np.ndarray | None = None) -> dict[float, float]:
    """Dice of ``{pred >= L * rx}`` and ``{ref >= L * rx}`` (within ``mask``) for each level ``L``
    (a fraction of the prescription). Dice is 1.0 when both isodose volumes are empty."""
    pred, ref = _check_pair(pred, ref)
    m = _as_mask(mask, ref.shape)
    p, r = pred[m], ref[m]
    out: dict[float, float] = {}
    for lv in levels:
        thr = float(lv) * float(rx)
        a, b = p >= thr, r >= thr
        na, nb = int(a.sum()), int(b.sum())
        out[float(lv)] = 1.0 if na + nb == 0 else float(2.0 * np.count_nonzero(a & b) / (na + nb))
    return out


def mean_isodose_dice(pred: np.ndarray, ref: np.ndarray, rx: float, levels: Sequence[float] = ISODOSE_LEVELS,
                      mask: np.ndarray | None = None) -> float:
    """Mean of :func:`isodose_dice` over ``levels``."""
    return float(np.mean(list(isodose_dice(pred, ref, rx, levels, mask).values())))


def oar_dmax_error(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """``|Dmax(pred) - Dmax(ref)|`` in the structure (Gy); nan when empty."""
    return abs(dmax(pred, mask) - dmax(ref, mask))


# --------------------------------------------------------------------------------------------
# gamma (AAPM TG-218)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# constraints and the one-stop summary
# --------------------------------------------------------------------------------------------
def constraint_compliance(dose: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan) -> dict[str, Any]:
    """Clinical-constraint compliance of ``dose`` for ``plan`` (see :mod:`addiff_core.constraints`).

    A constraint is applicable when its structure is in ``masks`` with more than
    ``MIN_STRUCTURE_VOXELS`` voxels (``"__target__"`` is the highest-prescription target).
    Returns ``{"fraction_met": float (nan if none applicable), "n_applicable": int, "n_met": int,
    "details": [{"label", "key", "structure", "kind", "threshold_gy", "limit", "value", "met"}]}``;
    details list the applicable constraints only.
    """
    from addiff_core.constraints import TARGET, constraints_for_plan, evaluate_constraint

    dose = np.asarray(dose)
    details: list[dict[str, Any]] = []
    primary = plan.targets[0] if plan.prescriptions else None
    for c in constraints_for_plan(plan):
        name = primary if c.structure == TARGET else c.structure
        if name is None or name not in masks:
            continue
        m = _as_mask(masks[name], dose.shape)
        if int(m.sum()) <= MIN_STRUCTURE_VOXELS:
            continue
        value, met = evaluate_constraint(dose, m, c)
        details.append({"label": c.label, "key": c.key, "structure": name, "kind": c.kind,
                        "threshold_gy": c.threshold_gy, "limit": c.limit, "value": value, "met": bool(met)})
    n_met = sum(d["met"] for d in details)
    return {"fraction_met": n_met / len(details) if details else math.nan,
            "n_applicable": len(details), "n_met": n_met, "details": details}


def case_metrics(pred: np.ndarray, ref: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan,
                 spacing: Sequence[float], eval_mask: np.ndarray | None, gamma: bool = True) -> dict[str, float]:
    """One-stop summary of a predicted dose against the reference (all values plain floats).

    ``masks`` maps structure names to boolean arrays; names in ``plan.prescriptions`` are targets,
    the rest OARs; a body mask (``Body``/``External``) is ignored for DVH scoring. ``eval_mask``
    is the evaluation region (possible-dose mask or body; None = every voxel) used for MAE, the
    dose score, isodose Dice and gamma. Keys:

    ``mae_gy``, ``mae_pct_rx`` (100 * MAE / highest Rx), ``openkbp_dose_score``,
    ``openkbp_dvh_score``, ``hi_pred``, ``hi_ref``, ``ci_rtog_pred``, ``ci_rtog_ref``,
    ``paddick_ci_pred``, ``paddick_ci_ref`` (primary = highest-Rx target; nan if absent),
    ``mean_isodose_dice`` (10..100 % Rx), ``spinal_cord_dmax_err_gy`` (nan without a SpinalCord
    of > 5 voxels), ``gamma_pass_rate`` (percent, 3 %/2 mm global, 10 % cutoff),
    ``constraint_compliance_pred``, ``constraint_compliance_ref`` (fractions; nan if none apply).
    """
    pred, ref = _check_pair(pred, ref)
    rx = float(plan.max_prescription)
    vv = float(np.prod([float(s) for s in spacing])) / 1000.0
    bool_masks = {k: _as_mask(v, ref.shape) for k, v in masks.items()}
    scored = {k: v for k, v in bool_masks.items() if k not in BODY_NAMES and v.any()}
    em = None if eval_mask is None else _as_mask(eval_mask, ref.shape)
    out: dict[str, float] = {}
    out["mae_gy"] = mae(pred, ref, em)
    out["mae_pct_rx"] = 100.0 * out["mae_gy"] / rx
    out["openkbp_dose_score"] = openkbp_dose_score(pred, ref, em)
    out["openkbp_dvh_score"] = openkbp_dvh_score(pred, ref, scored, vv, plan.prescriptions.keys())
    primary = plan.targets[0]
    tmask = bool_masks.get(primary)
    has_t = tmask is not None and bool(tmask.any())
    for tag, d in (("pred", pred), ("ref", ref)):
        out[f"hi_{tag}"] = homogeneity_index(d, tmask) if has_t else math.nan
        out[f"ci_rtog_{tag}"] = conformity_index_rtog(d, tmask, rx) if has_t else math.nan
        out[f"paddick_ci_{tag}"] = paddick_ci(d, tmask, rx) if has_t else math.nan
    out["mean_isodose_dice"] = mean_isodose_dice(pred, ref, rx, ISODOSE_LEVELS, em)
    cord = bool_masks.get("SpinalCord")
    out["spinal_cord_dmax_err_gy"] = (oar_dmax_error(pred, ref, cord)
                                      if cord is not None and int(cord.sum()) > MIN_STRUCTURE_VOXELS else math.nan)
    out["gamma_pass_rate"] = (gamma_pass_rate(ref, pred, spacing, 3.0, 2.0, 10.0, True, None, em) if gamma
                              else float("nan"))
    out["constraint_compliance_pred"] = constraint_compliance(pred, bool_masks, plan)["fraction_met"]
    out["constraint_compliance_ref"] = constraint_compliance(ref, bool_masks, plan)["fraction_met"]
    return {k: float(v) for k, v in out.items()}
