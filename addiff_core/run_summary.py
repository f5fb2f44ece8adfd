"""What ran, in words: aggregation, central and per-site DP, and the warnings a reader must not
miss (a robust strategy that protects nothing, a model worse than predicting no dose). Pure
functions of the run config (as ``run.json`` stores it) and the final rows, so the console, the
final table and the report say the same thing. No Flower here.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from .site_table import is_overall

ZERO_DOSE_KEY = "mae_zero_dose_gy"  # held-out MAE of predicting 0 Gy everywhere (SiteTask.evaluate adds it)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _g(v: Any) -> str:
    f = _num(v)
    return "n/a" if f is None else f"{f:g}"


# -- robust strategies: how many sites they cut ----------------------------------------------------
def trimmed_per_end(beta: float, n_sites: int) -> int:
    """Sites Flower's FedTrimmedAvg cuts at each end: ``int(beta * n)`` (scipy's trim_mean rule)."""
    return int(float(beta) * int(n_sites))


def smallest_trimming_federation(beta: float) -> int | None:
    """The fewest sites with which ``trim-beta`` cuts at least one site per end (None: beta 0)."""
    if float(beta) <= 0:
        return None
    n = 1
    while trimmed_per_end(beta, n) < 1:
        n += 1
    return n


def trim_beta_for(n_sites: int) -> float | None:
    """The smallest trim-beta (2 decimals) that cuts one site per end with ``n_sites`` sites;
    None when no allowed beta (< 0.5) does (fewer than 3 sites)."""
    if n_sites < 3:
        return None
    beta = math.ceil(100 / n_sites) / 100
    return beta if beta < 0.5 and trimmed_per_end(beta, n_sites) >= 1 else None


def robustness_warning(rc: Mapping[str, Any], n_sites: int | None) -> str | None:
    """A warning when the configured robust strategy protects nothing with ``n_sites`` updates
    per round: FedTrimmedAvg cutting no site, FedMedian of fewer than 3 sites."""
    strategy = str(rc.get("strategy", "fedavg"))
    if not n_sites:
        return None
    if strategy == "fedtrimmedavg":
        beta = _num(rc.get("trim-beta", 0.2)) or 0.0
        if trimmed_per_end(beta, n_sites) == 0:
            need = smallest_trimming_federation(beta)
            alt = trim_beta_for(n_sites)
            return (f"fedtrimmedavg with trim-beta {beta:g} trims no site with {n_sites} site(s) (Flower cuts "
                    f"int({beta:g} x {n_sites}) = 0 per end): the result is the unweighted mean of every update "
                    "(FedAvg with equal weights), with no robustness. "
                    + (f"trim-beta {beta:g} cuts a site from {need} sites on; " if need else "")
                    + (f"with {n_sites} sites use trim-beta {alt:g} (cuts 1 per end)" if alt else
                       f"no trim-beta cuts a site with {n_sites} site(s)")
                    + ", or fedmedian.")
    if strategy == "fedmedian" and n_sites < 3:
        return (f"fedmedian with {n_sites} site(s) is the mean of the updates: no robustness (it needs at "
                "least 3 sites; it tolerates fewer than half of them being bad).")
    return None


# -- what ran --------------------------------------------------------------------------------------
def central_dp_on(rc: Mapping[str, Any]) -> bool:
    return (_num(rc.get("central-dp-noise")) or 0.0) > 0


def strategy_text(rc: Mapping[str, Any], n_sites: int | None = None) -> str:
    """'fedprox (proximal-mu 0.01)', 'fedtrimmedavg (trim-beta 0.2: cuts 0 of 3 sites per end)', ..."""
    s = str(rc.get("strategy", "fedavg"))
    if s == "fedavg":
        return ("fedavg (uniform weights, as central DP needs)" if central_dp_on(rc)
                else "fedavg (weighted by training cases)")
    if s == "fedprox":
        return f"fedprox (proximal-mu {_g(rc.get('proximal-mu'))}; weighted by training cases)"
    if s == "fedadam":
        return ("fedadam (" + ", ".join(f"{k.split('-', 1)[1]} {_g(rc.get(k))}" for k in
                                        ("fedadam-eta", "fedadam-beta-1", "fedadam-beta-2", "fedadam-tau")) + ")")
    if s == "fedmedian":
        return "fedmedian (element-wise median of the updates)"
    if s == "fedtrimmedavg":
        beta = _num(rc.get("trim-beta", 0.2)) or 0.0
        cut = f": cuts {trimmed_per_end(beta, n_sites)} of {n_sites} site(s) per end" if n_sites else ""
        return f"fedtrimmedavg (trim-beta {beta:g}{cut})"
    return s


def central_dp_text(rc: Mapping[str, Any], epsilon: float | None = None, rounds: int | None = None) -> str:
    if not central_dp_on(rc):
        return "off"
    eps = _num(epsilon)
    return (f"on (client level): noise multiplier {_g(rc.get('central-dp-noise'))}, clip {_g(rc.get('central-dp-clip'))}, "
            f"delta {_g(rc.get('central-dp-delta'))}"
            + (f", epsilon {eps:.3g}" + (f" after {rounds} round(s)" if rounds else "") if eps is not None else ""))


def secure_aggregation_text(rc: Mapping[str, Any]) -> str | None:
    """The secure-aggregation line's text when the run config turns it on (None when off)."""
    if rc.get("secure-aggregation") is not True:
        return None
    threshold = _num(rc.get("secagg-threshold")) or 0
    levels = _num(rc.get("secagg-quantization"))
    return ("on (Flower SecAgg+: the server unmasks only the weighted sum of the sites' updates; "
            f"clip {_g(rc.get('secagg-clip'))}, {int(levels) if levels else 'n/a'} quantization levels, "
            f"threshold {'a majority' if threshold == 0 else _g(threshold)} of the sites)")


def site_dp_text(privacy: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-site DP-SGD from ``site -> {dp_enabled, epsilon (spent), delta, target_epsilon (budget)}``."""
    if not privacy:
        return "unknown (no site reported)"
    on = {s: p for s, p in sorted(privacy.items()) if _num(p.get("dp_enabled"))}
    off = sorted(s for s in privacy if s not in on)
    if not on:
        return "off at every site"
    parts = [s + (f" epsilon {_g(p.get('epsilon'))}" if _num(p.get("epsilon")) is not None else "")
             + (f" (delta {_g(p.get('delta'))})" if _num(p.get("delta")) else "")
             + (f" (budget epsilon {_g(p.get('target_epsilon'))})" if _num(p.get("target_epsilon")) else "")
             for s, p in on.items()]
    return "on at " + ", ".join(parts) + (f"; off at {', '.join(off)}" if off else "")


def privacy_of_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    return {str(r["site"]): {k: r.get(k) for k in ("dp_enabled", "epsilon", "delta")}
            for r in rows if r.get("site") and not is_overall(r)
            and r.get("dp_enabled") is not None}


def run_lines(rc: Mapping[str, Any], *, n_sites: int | None = None, central_epsilon: float | None = None,
              rounds: int | None = None, privacy: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The lines the console header, final table and report show: aggregation, central DP,
    secure aggregation (when on), per-site DP (when known), and the robustness warning.

    Args:
        rc: the run config; n_sites: sites in the federation (None: unknown).
        central_epsilon, rounds: central DP's epsilon so far and over how many rounds.
        privacy: site -> its DP report (:func:`site_dp_text`); None leaves the line out.
    """
    lines = [f"Aggregation: {strategy_text(rc, n_sites)}",
             f"Central DP: {central_dp_text(rc, central_epsilon, rounds)}"]
    secure = secure_aggregation_text(rc)
    if secure:
        lines.append(f"Secure aggregation: {secure}")
    if privacy is not None:
        lines.append(f"Per-site DP (DP-SGD): {site_dp_text(privacy)}")
    w = robustness_warning(rc, n_sites)
    if w:
        lines.append("WARNING: " + w)
    return lines


# -- a final model worse than no prediction --------------------------------------------------------
def worse_than_zero_dose(rows: Iterable[Mapping[str, Any]], rc: Mapping[str, Any] | None = None) -> list[str]:
    """One warning per site whose held-out MAE exceeds the MAE of predicting 0 Gy everywhere
    (``rc``: the run config, for a hint when central DP noise is the likely cause)."""
    hint = ("; central DP noise too large for this number of sites? see docs/PRIVACY.md"
            if rc is not None and central_dp_on(rc) else "")
    out = []
    for r in rows:
        site = str(r.get("site", "?"))
        if is_overall(r):
            continue
        m, z = _num(r.get("mae_gy")), _num(r.get(ZERO_DOSE_KEY))
        if m is not None and z is not None and m > z:
            out.append(f"WARNING: at {site} the final model is worse than predicting 0 Gy everywhere: held-out MAE "
                       f"{m:.2f} Gy against {z:.2f} Gy for zero dose: the model is unusable{hint}")
    return out
