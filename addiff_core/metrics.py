"""Dose-prediction metrics: pure numpy functions, no I/O, no global state.

Conventions used throughout
---------------------------
* Arrays are numpy in SimpleITK order ``(z, y, x)``; ``spacing`` is SimpleITK order ``(x, y, z)``
  in mm (so ``spacing[::-1]`` matches the array axes). Doses are in Gy, masks are boolean (any
  array is cast with ``!= 0``).
* The dose-volume primitives (``D_x``, ``D_0.1cc``, ``Dmax``, ``Dmean``, ``V_x`` as a fraction,
  DVH points and curves; ``nan`` for an empty structure) live in :mod:`addiff_core.dvh` with
  their conventions (OpenKBP's), and are re-exported here.
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

from .constraints import TARGET, constraints_for_plan, evaluate_constraint
from .contract import MIN_STRUCTURE_VOXELS
from .dvh import as_mask, d_cc, dmax, structure_doses
from .gamma import gamma_pass_rate

if TYPE_CHECKING:  # pragma: no cover
    from addiff_core.case_io import Plan

ISODOSE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Default isodose levels for Dice, as fractions of the (highest) prescription."""

OPENKBP_TARGET_POINTS: tuple[int, ...] = (99, 95, 1)
"""OpenKBP DVH-score points for targets (``D99``, ``D95``, ``D1``); OARs use D_0.1cc and mean."""

BODY_NAMES = frozenset({"Body", "BODY", "body", "External", "EXTERNAL"})


# -- helpers ---------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} does not match ref shape {ref.shape}")
    return pred, ref


# -- voxel-wise errors -----------------------------------------------------------------------------
def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error in Gy over ``mask`` (all voxels if None); nan for an empty mask."""
    pred, ref = _check_pair(pred, ref)
    m = as_mask(mask, ref.shape)
    n = int(m.sum())
    if n == 0:
        return math.nan
    return float(np.abs(pred[m] - ref[m]).sum() / n)


def mae_normalised(pred: np.ndarray, ref: np.ndarray, rx: float, mask: np.ndarray | None = None) -> float:
    """MAE as a fraction of the prescription ``rx`` (Gy): ``mae / rx`` (0.02 = 2 % of Rx)."""
    if not rx > 0:
        raise ValueError(f"prescription must be positive, got {rx!r}")
    return mae(pred, ref, mask) / float(rx)


def sample_uncertainty(mean: np.ndarray, std: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None,
                       k: float = 2.0) -> dict[str, float]:
    """How well a sampled prediction's voxel-wise std tells where its mean is wrong.

    Args:
        mean, std, ref: (z, y, x) in Gy; mask: the voxels scored (None: all).
        k: the coverage interval is ``mean +- k std`` (ends included).

    Returns:
        ``spearman`` (rho between std and ``|mean - ref|``; nan for < 2 voxels or a constant),
        ``mean_std_gy``, ``coverage`` (fraction of voxels within the interval); nan if empty.

    Raises:
        ValueError: arrays of different shapes.
    """
    from scipy.stats import spearmanr

    mean, ref = _check_pair(mean, ref)
    std, _ = _check_pair(std, ref)
    m = as_mask(mask, ref.shape)
    s, err = std[m], np.abs(mean[m] - ref[m])
    if s.size == 0:
        return {"spearman": math.nan, "mean_std_gy": math.nan, "coverage": math.nan}
    ranked = s.size >= 2 and np.ptp(s) > 0 and np.ptp(err) > 0  # spearmanr warns and gives nan otherwise
    return {"spearman": float(spearmanr(s, err).statistic) if ranked else math.nan,
            "mean_std_gy": float(s.mean()),
            "coverage": float(np.mean(err <= k * s))}


# -- OpenKBP scores (patient level; cohorts and sites combine them below) --------------------------
def openkbp_dose_score(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray | None) -> float:
    """OpenKBP dose score of one patient as the official code computes it (Gy): ``sum |pred - ref|``
    over ALL voxels / the number of possible-dose-mask voxels (None: every voxel; nan if empty).
    It does not mask: the pipeline zeroes predictions outside the mask first
    (:func:`addiff_core.regions.zero_outside`), so the score is then the MAE inside it."""
    pred, ref = _check_pair(pred, ref)
    n = int(as_mask(possible_dose_mask, ref.shape).sum())
    return float(np.abs(pred - ref).sum() / n) if n else math.nan


def openkbp_dvh_errors(pred: np.ndarray, ref: np.ndarray, structures: Mapping[str, np.ndarray],
                       voxel_volume_cc: float, target_names: Iterable[str], signed: bool = False) -> dict[str, float]:
    """DVH-point errors ``|point(pred) - point(ref)|`` (Gy) of one patient, OpenKBP style: targets
    ``D99``/``D95``/``D1``, OARs ``D_0.1cc``/``mean``, whole structures (not clipped to the mask).

    Args:
        pred, ref: doses (z, y, x) in Gy.
        structures: name -> mask; empty structures are skipped.
        voxel_volume_cc: one voxel's volume in cm^3.
        target_names: the structures scored as targets.
        signed: ``point(pred) - point(ref)`` instead (negative where the prediction is colder).

    Returns:
        ``{"<structure>/<point>": error}``, e.g. ``"PTV70/D95"``, ``"SpinalCord/D_0.1cc"``.
    """
    pred, ref = _check_pair(pred, ref)
    targets = set(target_names)
    out: dict[str, float] = {}
    for name, m in structures.items():
        mm = as_mask(m, ref.shape)
        p, r = pred[mm], ref[mm]
        if r.size == 0:
            continue
        if name in targets:
            q = [100.0 - x for x in OPENKBP_TARGET_POINTS]
            err = np.percentile(p, q) - np.percentile(r, q)
            out.update({f"{name}/D{x}": float(e) for x, e in zip(OPENKBP_TARGET_POINTS, err)})
        else:
            ones = np.ones(r.shape, bool)
            out[f"{name}/D_0.1cc"] = d_cc(p, ones, 0.1, voxel_volume_cc) - d_cc(r, ones, 0.1, voxel_volume_cc)
            out[f"{name}/mean"] = float(p.mean() - r.mean())
    return out if signed else {k: abs(v) for k, v in out.items()}


def openkbp_dvh_score(pred: np.ndarray, ref: np.ndarray, structures: Mapping[str, np.ndarray],
                      voxel_volume_cc: float, target_names: Iterable[str]) -> float:
    """OpenKBP DVH score of one patient: the mean of :func:`openkbp_dvh_errors` (same arguments; Gy);
    nan if every structure is empty."""
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
    """OpenKBP DVH score of a cohort (Gy) from one :func:`openkbp_dvh_errors` mapping per patient:
    ONE mean over every finite cell, as OpenKBP's ``nanmean``, not a mean of per-patient means
    (patients have different numbers of structures). nan when there is no cell."""
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
    """All-sites value of each of ``keys`` from per-site cohort rows: weighted by ``row[cases_key]``,
    except ``openkbp_dvh_score`` (by ``dvh_cells``, one mean over all cells; by cases for rows
    written before ``dvh_cells`` existed) and ``dvh_cells`` (summed). nan if no site has a value."""
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


# -- target quality --------------------------------------------------------------------------------
def homogeneity_index(dose: np.ndarray, target: np.ndarray) -> float:
    """ICRU 83 homogeneity index ``(D2 - D98) / D50`` of the target (0 = perfectly uniform)."""
    d = structure_doses(dose, target)
    if d.size == 0:
        return math.nan
    d98, d50, d2 = np.percentile(d, [2.0, 50.0, 98.0])
    return float((d2 - d98) / d50) if d50 > 0 else math.nan


def conformity_index_rtog(dose: np.ndarray, target: np.ndarray, rx: float) -> float:
    """RTOG conformity index: volume receiving ``>= rx`` (whole array) / target volume."""
    dose = np.asarray(dose)
    tv = int(as_mask(target, dose.shape).sum())
    if tv == 0:
        return math.nan
    return float(np.count_nonzero(dose >= rx) / tv)


def paddick_ci(dose: np.ndarray, target: np.ndarray, rx: float) -> float:
    """Paddick conformity index ``TV_PIV^2 / (TV * PIV)`` (1 = perfect; 0 if no voxel >= rx).

    TV: target volume, PIV: prescription isodose volume (voxels ``>= rx`` anywhere), TV_PIV: the
    part of the target inside the prescription isodose.
    """
    dose = np.asarray(dose)
    t = as_mask(target, dose.shape)
    piv_mask = dose >= rx
    tv, piv = int(t.sum()), int(piv_mask.sum())
    if tv == 0:
        return math.nan
    if piv == 0:
        return 0.0
    tv_piv = int(np.count_nonzero(piv_mask & t))
    return float(tv_piv * tv_piv / (tv * piv))


# -- isodose overlap and OAR error -----------------------------------------------------------------
def isodose_dice(pred: np.ndarray, ref: np.ndarray, rx: float, levels: Sequence[float] = ISODOSE_LEVELS,
                 mask: np.ndarray | None = None) -> dict[float, float]:
    """Dice of ``{pred >= L * rx}`` and ``{ref >= L * rx}`` per level ``L`` in ``levels``.

    Args:
        pred, ref: (z, y, x) in Gy; rx: prescription (Gy); levels: fractions of ``rx``.
        mask: the voxels compared (None: all).

    Returns:
        level -> Dice (1.0 when both isodose volumes are empty).
    """
    pred, ref = _check_pair(pred, ref)
    m = as_mask(mask, ref.shape)
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
    """Mean of :func:`isodose_dice` (same arguments) over ``levels``."""
    return float(np.mean(list(isodose_dice(pred, ref, rx, levels, mask).values())))


def oar_dmax_error(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """``|Dmax(pred) - Dmax(ref)|`` in the structure (Gy); nan when empty."""
    return abs(dmax(pred, mask) - dmax(ref, mask))


# -- constraints and the one-stop summary ----------------------------------------------------------
def constraint_compliance(dose: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan) -> dict[str, Any]:
    """Clinical-constraint compliance of ``dose`` for ``plan`` (see :mod:`addiff_core.constraints`).

    A constraint is applicable when its structure is in ``masks`` with more than
    ``MIN_STRUCTURE_VOXELS`` voxels (``"__target__"`` is the highest-prescription target).
    Returns ``{"fraction_met": float (nan if none applicable), "n_applicable": int, "n_met": int,
    "details": [{"label", "key", "structure", "kind", "threshold_gy", "limit", "value", "met"}]}``;
    details list the applicable constraints only.
    """
    dose = np.asarray(dose)
    details: list[dict[str, Any]] = []
    primary = plan.targets[0] if plan.prescriptions else None
    for c in constraints_for_plan(plan):
        name = primary if c.structure == TARGET else c.structure
        if name is None or name not in masks:
            continue
        m = as_mask(masks[name], dose.shape)
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
    """Every metric of a predicted dose against the reference (plain floats).

    Args:
        pred, ref: doses (z, y, x) in Gy; ``pred`` is scored as given (the pipeline zeroes it
            outside the region first, as OpenKBP's does).
        masks: structure -> mask; ``plan.prescriptions`` names the targets, a body mask
            (``Body``/``External``) is not DVH-scored.
        plan: prescriptions and tumour site (the constraints).
        spacing: (x, y, z) mm.
        eval_mask: the evaluation region for MAE, dose score, isodose Dice and gamma (None: all).
        gamma: False skips the gamma pass rate (nan).

    Returns:
        ``mae_gy``, ``mae_pct_rx``, ``openkbp_dose_score``, ``openkbp_dvh_score``, ``dvh_cells``
        (its weight in a cohort: :func:`cohort_means`), ``hi_*``, ``ci_rtog_*``, ``paddick_ci_*``
        (``*`` = pred/ref, of the highest-Rx target), ``mean_isodose_dice`` (10..100 % Rx),
        ``spinal_cord_dmax_err_gy``, ``gamma_pass_rate`` (%, 3 %/2 mm global, 10 % cutoff),
        ``constraint_compliance_pred``/``_ref``; nan where not applicable.
    """
    pred, ref = _check_pair(pred, ref)
    rx = float(plan.max_prescription)
    vv = float(np.prod([float(s) for s in spacing])) / 1000.0
    bool_masks = {k: as_mask(v, ref.shape) for k, v in masks.items()}
    scored = {k: v for k, v in bool_masks.items() if k not in BODY_NAMES and v.any()}
    em = None if eval_mask is None else as_mask(eval_mask, ref.shape)
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
