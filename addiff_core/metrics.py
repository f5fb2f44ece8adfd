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
* The gamma pass rate is a *percentage* (0..100); every other ratio here is a fraction. Gamma
  lives in :mod:`addiff_core.gamma` (re-exported here).
* OpenKBP scores follow the official evaluation code: :func:`openkbp_dose_score` (per patient)
  and :func:`cohort_dvh_score` (one mean over every DVH cell of a cohort); :func:`cohort_means`
  and :func:`combine_site_means` aggregate per-case and per-site results the same way.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from .gamma import gamma_index, gamma_pass_rate  # noqa: F401  (re-exported: metrics.gamma_*)

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
# OpenKBP scores (patient level; cohorts and sites combine them below)
# --------------------------------------------------------------------------------------------
def openkbp_dose_score(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray | None) -> float:
    """OpenKBP dose score of one patient, as the official evaluation code computes it (Gy):
    ``sum |pred - ref|`` over ALL voxels of the grid, divided by the number of possible-dose-mask
    voxels.

    The official pipeline multiplies every prediction by the possible-dose mask before it is saved
    and scored (here :func:`addiff_core.regions.zero_outside` does that for every prediction the
    project writes or scores). This function does not mask: dose predicted outside the mask is
    counted against the prediction, as the official evaluator counts it. For a masked prediction
    and a reference that is 0 outside the mask (OpenKBP's) the score equals the MAE inside the
    mask. ``None``: every voxel is in the mask. nan for an empty mask. The cohort score is the
    mean over patients.
    """
    pred, ref = _check_pair(pred, ref)
    n = int(_as_mask(possible_dose_mask, ref.shape).sum())
    return float(np.abs(pred - ref).sum() / n) if n else math.nan


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


DVH_SCORE_KEY = "openkbp_dvh_score"
DVH_CELLS_KEY = "dvh_cells"
"""Metric keys: the DVH score, and the number of (patient, structure, DVH point) cells behind it."""


def _finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def cohort_dvh_score(errors: Iterable[Mapping[str, float]]) -> float:
    """OpenKBP DVH score of a cohort (Gy): ONE mean over every (patient, structure, metric) cell
    that exists, as OpenKBP's ``nanmean`` over its patients x (metric, structure) table; not the
    mean of per-patient means (patients have different numbers of structures).

    ``errors``: one :func:`openkbp_dvh_errors` mapping per patient. Non-finite cells are left out
    (OpenKBP's nanmean). nan when there is no cell.
    """
    cells = [x for e in errors for x in (_finite(v) for v in e.values()) if x is not None]
    return float(np.mean(cells)) if cells else math.nan


def combine_dvh_scores(scores: Iterable[Any], cells: Iterable[Any]) -> float:
    """DVH score of the union of groups (patients or sites) from each group's DVH score and its
    number of cells: ``sum(score * cells) / sum(cells)``, which equals :func:`cohort_dvh_score`
    over all their cells. Groups without cells or without a finite score are left out; nan when
    none is left."""
    return _weighted_mean(scores, cells)


def _weighted_mean(values: Iterable[Any], weights: Iterable[Any]) -> float:
    """``sum(v * w) / sum(w)`` over the pairs with a finite value and a finite weight > 0; nan if none."""
    pairs = [(_finite(v), _finite(w)) for v, w in zip(values, weights)]
    pairs = [(v, w) for v, w in pairs if v is not None and w is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def cohort_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Cohort value of every numeric metric of per-case rows (:func:`case_metrics` outputs; other
    keys such as ``case_id`` are ignored): the mean over the cases with a finite value (nan if
    none), except ``openkbp_dvh_score``, one mean over every DVH cell of the cohort
    (:func:`combine_dvh_scores` with each case's ``dvh_cells``), and ``dvh_cells``, summed."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if any(number(r.get(k)) for r in rows)]
    out: dict[str, float] = {}
    for k in keys:
        if k == DVH_CELLS_KEY:
            out[k] = float(sum(_finite(r.get(k)) or 0.0 for r in rows))
        elif k == DVH_SCORE_KEY and all(DVH_CELLS_KEY in r for r in rows):
            out[k] = combine_dvh_scores([r.get(k) for r in rows], [r[DVH_CELLS_KEY] for r in rows])
        else:
            out[k] = _weighted_mean([r.get(k) for r in rows], [1.0] * len(rows))
    return out


def combine_site_means(rows: Sequence[Mapping[str, Any]], keys: Iterable[str],
                       cases_key: str = "cases") -> dict[str, float]:
    """The all-sites value of each of ``keys`` from per-site rows of cohort values: the mean
    weighted by each site's number of cases (``row[cases_key]``), except ``openkbp_dvh_score``,
    weighted by the site's ``dvh_cells`` (so that it is one mean over every DVH cell of all
    sites, as OpenKBP scores a cohort), and ``dvh_cells``, summed. Sites without a finite value or
    with no weight are left out (nan if none is left). Rows from before ``dvh_cells`` existed:
    the DVH score falls back to the case weights when a site with a score lacks ``dvh_cells``."""
    cases = [r.get(cases_key) for r in rows]
    out: dict[str, float] = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if k == DVH_CELLS_KEY:
            out[k] = float(sum(_finite(v) or 0.0 for v in vals))
        elif k == DVH_SCORE_KEY and all(_finite(r.get(DVH_CELLS_KEY)) is not None
                                        for r in rows if _finite(r.get(k)) is not None):
            out[k] = combine_dvh_scores(vals, [r.get(DVH_CELLS_KEY) for r in rows])
        else:
            out[k] = _weighted_mean(vals, cases)
    return out


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
    is the evaluation region (:func:`addiff_core.regions.evaluation_region`; None = every voxel)
    used for MAE, the dose score, isodose Dice and gamma. ``pred`` is scored as given: the
    pipeline zeroes it outside the region first, as OpenKBP's does (see
    :func:`openkbp_dose_score`). Keys:

    ``mae_gy``, ``mae_pct_rx`` (100 * MAE / highest Rx), ``openkbp_dose_score``,
    ``openkbp_dvh_score`` (mean of this case's DVH cells), ``dvh_cells`` (their number, the
    weight of this case in a cohort's DVH score: :func:`cohort_means`), ``hi_pred``, ``hi_ref``,
    ``ci_rtog_pred``, ``ci_rtog_ref``,
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
    errs = openkbp_dvh_errors(pred, ref, scored, vv, plan.prescriptions.keys())
    out[DVH_SCORE_KEY] = cohort_dvh_score([errs])
    out[DVH_CELLS_KEY] = float(sum(_finite(v) is not None for v in errs.values()))
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
