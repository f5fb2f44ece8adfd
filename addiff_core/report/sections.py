"""The report's sections on the run's own records: run summary, training, held-out results and
comparison. Each is ``section(ctx: ReportContext) -> None`` (the list is in ``report.writer``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..run_folder import COMPARISON
from ..site_table import overall_row
from .context import ReportContext, figure
from .document import duration, fmt, mb, num, seq
from .run_data import RunData, read_json

# key columns of the held-out table: (metric key, header, kind); kind: "gy", "pct", "frac%", "num"
KEY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mae_gy", "MAE (Gy)", "gy"),
    ("mae_pct_rx", "MAE (% Rx)", "pct"),
    ("mae_zero_dose_gy", "MAE of 0 Gy (Gy)", "gy"),
    ("openkbp_dose_score", "dose score (Gy)", "gy"),
    ("openkbp_dvh_score", "DVH score (Gy)", "gy"),
    ("mean_isodose_dice", "isodose Dice", "num"),
    ("spinal_cord_dmax_err_gy", "cord Dmax err (Gy)", "gy"),
    ("gamma_pass_rate", "gamma 3%/2mm (%)", "pct"),
    ("constraint_compliance_pred", "constraints met: pred", "frac%"),
    ("constraint_compliance_ref", "constraints met: ref", "frac%"),
)
METRIC_LEGEND = (
    "MAE: mean absolute dose difference in the body / possible-dose region (lower is better); "
    "MAE of 0 Gy: the MAE of predicting no dose at all (a model above it is useless); "
    "dose score: OpenKBP dose score (sum of |pred - ref| over the whole grid / possible-dose-mask voxels, "
    "the prediction being 0 outside the case's evaluation region, as OpenKBP's; Gy); "
    "DVH score: OpenKBP DVH score (|error| of D99/D95/D1 of targets and D0.1cc/Dmean of OARs, one mean over "
    "every case, structure and point of the cohort, Gy; the all-sites row weights it by those cells); "
    "isodose Dice: mean Dice of the 10..100 % Rx isodose volumes (1 = perfect); "
    "cord Dmax err: |Dmax pred - Dmax ref| in the spinal cord; "
    "gamma: pass rate 3 %/2 mm global, 10 % cutoff (higher is better); "
    "constraints met: fraction of the clinical dose-volume constraints the predicted (pred) and the "
    "planned (ref) dose meet. n/a: not computed or not applicable.")
STAGE_WHAT = {"vae": "stage 1: the VAE (L1 reconstruction + beta KL)",
              "diffusion": "stage 2: the latent diffusion model (latent MSE + decoded-dose L1 and hinge), VAE frozen",
              "unet": "the direct-regression U-Net baseline (masked L1 + constraint hinge)"}


# -- run summary -----------------------------------------------------------------------------------
def summary(ctx: ReportContext) -> None:
    d = ctx.data
    ctx.doc.h(2, "Run summary")
    items = _run_items(d)
    items += _federated_items(d) if d.kind == "federated" else _local_items(d)
    items += _model_items(d)
    ctx.doc.ul(items)
    _sites_table(ctx)


def _run_items(d: RunData) -> list[str]:
    run = d.run
    kind = {"federated": "federated", "local": "single site (`addiff train`)"}.get(d.kind, "unknown")
    items = [f"**Run**: {kind}, status **{run.get('status', 'unknown')}**"]
    dates = [f"created {run['created']}" if run.get("created") else "",
             f"finished {run['finished']}" if run.get("finished") else ""]
    if isinstance(run.get("resumed"), list) and run["resumed"]:
        dates.append(f"resumed {len(run['resumed'])}x (last {run['resumed'][-1]})")
    if any(dates):
        items.append("**Dates**: " + ", ".join(x for x in dates if x))
    return items


def _federated_items(d: RunData) -> list[str]:
    from ..run_summary import central_dp_text, robustness_warning, site_dp_text, strategy_text, worse_than_zero_dose

    rc = d.run_config
    strategy = rc.get("strategy") or next((r.get("strategy") for r in d.round_rows if r.get("strategy")), None)
    rcs = {**rc, "strategy": strategy}
    n_sites = len(d.sites()) or None
    items = [f"**Strategy**: {strategy_text(rcs, n_sites) if strategy else 'unknown'}"]
    eps = next((num(r.get("central_dp_epsilon")) for r in reversed(d.round_rows)
                if num(r.get("central_dp_epsilon")) is not None), None)
    items.append(f"**Central DP**: {central_dp_text(rc, eps, len(d.round_rows) or None)}")
    items.append(f"**Per-site DP (DP-SGD)**: {site_dp_text(d.privacy)}")
    items += [f"**Warning**: {w}" for w in [robustness_warning(rcs, n_sites)] if w]
    items += [f"**Warning**: {w[len('WARNING: '):]}" for w in worse_than_zero_dose(d.final, rc)]
    plan = d.stage_plan()
    if plan:
        done: dict[str, int] = {}
        for r in d.round_rows:
            done[str(r.get("stage"))] = done.get(str(r.get("stage")), 0) + 1
        items.append("**Rounds**: " + ", ".join(f"{st} {done.get(st, 0)}/{n}" for st, n in plan.items())
                     + f" (total {sum(plan.values())})")
    le = num(rc.get("local-epochs"))
    items.append("**Local epochs per round**: " + (f"{int(le)}" if le else "each site file's own"))
    if rc.get("seed") is not None:
        items.append(f"**Seed**: {rc.get('seed')}")
    total = sum(num(r.get("seconds")) or 0 for r in d.round_rows)
    if d.round_rows:
        items.append(f"**Training time (rounds)**: {duration(total)}; **on the wire**: {mb(_wire(d.round_rows))}")
    return items


def _wire(round_rows: list[dict]) -> float:
    return sum((num(r.get("bytes_down")) or 0) + (num(r.get("bytes_up")) or 0) for r in round_rows)


def _local_items(d: RunData) -> list[str]:
    lm = d.local
    if not lm:
        return []
    skipped = lm.get("skipped")
    return [f"**Training**: {duration(num(lm.get('train_seconds')))}"
            + (f", {len(skipped)} case(s) skipped" if isinstance(skipped, dict) and skipped else "")]


def _model_items(d: RunData) -> list[str]:
    m, rc = d.model, d.run_config
    items = []
    if m:
        g = m.get("grid") if isinstance(m.get("grid"), dict) else {}
        sp = g.get("spacing")
        grid = f"{g.get('size', '?')}^3 voxels" + (f" at {sp} mm" if sp else " at each CT's own spacing, centred on the targets")
        s = f"**Model**: {m.get('kind', '?')}, grid {grid}"
        if m.get("kind") == "diffusion":
            s += (f", VAE channels {seq(m.get('vae_channels'))}, latent {m.get('latent_channels')} ch, "
                  f"denoiser {seq(m.get('unet_channels'))}, DDIM steps {m.get('sample_steps')}")
        else:
            s += f", channels {seq(m.get('unet_channels'))}"
        items.append(s)
        if rc.get("model-config"):
            items.append(f"**Model config file**: `{rc['model-config']}`")
    else:
        items.append("**Model**: unknown (no run.json and no readable checkpoint)")
    if num(rc.get("eval-steps")):
        items.append(f"**Evaluation**: {int(num(rc['eval-steps']))} DDIM steps"
                     + ("" if rc.get("eval-gamma", True) else ", gamma not computed"))
    return items


def _sites_table(ctx: ReportContext) -> None:
    d, doc = ctx.data, ctx.doc
    sites = d.sites()
    planned = d.planned_site_files()
    if not sites and not planned:
        doc.p("No site has reported anything yet.")
        return
    dp_any = any(p.get("dp_enabled") for p in d.privacy.values())
    headers = ["site", "training cases", "held-out cases"]
    if d.kind == "federated":
        headers += ["rounds trained", "left out (failed/rejected/refused)"]
    headers += ["DP", "epsilon spent", "delta"] if dp_any else ["DP"]
    rows = [_site_row(d, s, dp_any) for s in sites]
    if rows:
        doc.table(headers, rows)
    if dp_any:
        doc.p("DP: sample-level differential privacy (DP-SGD). Epsilon is cumulative over every round the site "
              "trained so far (as the site's own accountant reports it, for the delta shown).")
    missing = [f for f in planned if Path(f).stem not in sites]
    if planned and len(planned) > len(sites):
        doc.p(f"Planned site files: {len(planned)}; sites that reported: {len(sites)}"
              + (f" (not yet seen: {', '.join(Path(f).stem for f in missing)})" if missing else "") + ".")


def _site_row(d: RunData, s: str, dp_any: bool) -> list[str]:
    final_by = {r.get("site"): r for r in d.final}
    tr = [r for r in d.train_rows if r.get("site") == s]
    ntrain = num(tr[-1].get("num_examples")) if tr else num(d.local.get("train_cases")) if d.local else None
    nheld = num(final_by.get(s, {}).get("cases"))
    if nheld is None and d.local:
        nheld = num(d.local.get("heldout_cases"))
    row = [s, fmt(ntrain, "int"), fmt(nheld, "int")]
    if d.kind == "federated":
        row += [str(len({r.get('round') for r in tr})), str(len([r for r in d.error_rows if r.get("site") == s]))]
    p = d.privacy.get(s, {})
    row.append("on" if p.get("dp_enabled") else "off")
    if dp_any:
        row += [fmt(p.get("epsilon")) if p.get("dp_enabled") else "-", fmt(p.get("delta")) if p.get("dp_enabled") else "-"]
    return row


# -- training --------------------------------------------------------------------------------------
def training(ctx: ReportContext) -> None:
    d, doc = ctx.data, ctx.doc
    doc.h(2, "Training")
    if not d.curves:
        doc.p("No training records yet (`metrics.jsonl` / `metrics.json` has no loss values).")
        return
    stages = list(d.stage_plan()) if d.kind == "federated" else []
    stages += [s for s in d.curves if s not in stages]
    for st in stages:
        if st in d.curves:
            _stage_curves(ctx, st)
    if d.kind == "federated" and d.round_rows:
        doc.table(["stage", "rounds done", "loss, first round", "loss, last round", "on the wire", "time"],
                  [row for st in stages if (row := _stage_row(d, st))])
    if d.error_rows:
        doc.p(f"**{len(d.error_rows)} time(s) a site was left out of a round** (failed, update rejected by the "
              "server's checks, or refused to train because its privacy budget was spent):")
        doc.ul(f"round {r.get('round', '?')} ({r.get('stage', '?')}): {r.get('site', '?')} {r.get('kind')}: "
               f"{_short_reason(r.get('reason', ''))}" for r in d.error_rows[:20])
        if len(d.error_rows) > 20:
            doc.p(f"... and {len(d.error_rows) - 20} more in `metrics.jsonl`.")


def _stage_curves(ctx: ReportContext, st: str) -> None:
    d = ctx.data
    ctx.doc.h(3, f"Stage {st}")
    ctx.doc.p(f"Training loss of {STAGE_WHAT.get(st, st)}, per {d.curve_x} "
              + ("and site (the last local epoch of each round); dashed: the case-weighted mean over the sites."
                 if d.kind == "federated" else "(mean over the epoch's batches)."))
    if ctx.fig_dir is None:
        return
    curves = dict(sorted(d.curves[st].items()))
    styles = {}
    if d.agg_curves.get(st):
        curves["all sites (weighted)"] = d.agg_curves[st]
        styles["all sites (weighted)"] = {"color": "k", "ls": "--", "lw": 2.0}
    figure(ctx, f"training loss, stage {st}", f"training_{st}.png", "curves_figure", curves, d.curve_x,
           "training loss", title=f"training loss, stage {st}", logy=_wants_log(curves), styles=styles)


def _stage_row(d: RunData, st: str) -> list[str] | None:
    rr = sorted((r for r in d.round_rows if str(r.get("stage")) == st), key=lambda r: num(r.get("round")) or 0)
    if not rr:
        return None
    return [st, str(len(rr)), fmt(rr[0].get("train_loss")), fmt(rr[-1].get("train_loss")), mb(_wire(rr)),
            duration(sum(num(r.get("seconds")) or 0 for r in rr))]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _short_reason(reason: Any, limit: int = 300) -> str:
    """One line of a failure reason: ANSI colours removed; of a traceback, its last message line."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(reason)).splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("^~ ")]
    if not lines:
        return "(no reason given)"
    text = lines[-1] if len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wants_log(curves: dict[str, list[tuple[float, float]]]) -> bool:
    ys = [y for pts in curves.values() for _, y in pts if y > 0]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 30 and all(y > 0 for pts in curves.values() for _, y in pts)


# -- held-out results ------------------------------------------------------------------------------
def heldout(ctx: ReportContext) -> None:
    d, doc = ctx.data, ctx.doc
    who = "the final global model" if d.kind == "federated" else "the trained model"
    doc.h(2, "Held-out results")
    if not d.final:
        doc.p("No held-out results: `final_metrics.json` / `final_metrics.csv` are missing "
              + ("(the run has not finished its final evaluation)." if d.run.get("status") != "complete"
                 else "(the final evaluation returned nothing)."))
        return
    if d.kind == "federated":
        doc.p(f"Each site evaluated {who} on its own held-out cases (never used in training) and "
              f"returned numbers only. Source: `{d.final_source}`; all columns: `final_metrics.csv`.")
    else:
        doc.p(f"{who[0].upper() + who[1:]} on the site's held-out cases (never used in training). "
              f"Source: `{d.final_source}` (also per case).")
    keys = [k for k, _, _ in KEY_COLUMNS if any(num(r.get(k)) is not None for r in d.final) or k in ("mae_gy",)]
    dp_any = any(p.get("dp_enabled") for p in d.privacy.values())
    headers = ["site", "cases"] + [h for k, h, _ in KEY_COLUMNS if k in keys] + (["epsilon"] if dp_any else [])
    kinds = {k: kd for k, _, kd in KEY_COLUMNS}
    rows = sorted(d.final, key=lambda r: str(r.get("site")))
    out = []
    for r in rows + ([overall_row(rows, keys)] if len(rows) > 1 else []):  # the server's all-sites row
        line = [str(r.get("site", "?")), fmt(r.get("cases"), "int")] + [fmt(r.get(k), kinds[k]) for k in keys]
        if dp_any:
            p = d.privacy.get(r.get("site"), {})
            line.append(fmt(p.get("epsilon")) if p.get("dp_enabled") else "-")
        out.append(line)
    doc.table(headers, out)
    from ..run_summary import worse_than_zero_dose

    for w in worse_than_zero_dose(d.final, d.run_config):
        doc.p(f"**{w}**")
    doc.p(METRIC_LEGEND)


# -- comparison ------------------------------------------------------------------------------------
def _comparison_series(ctx: ReportContext) -> tuple[Any, str, dict[str, dict[str, float]]]:
    """(comparison.json, metric, series name -> site -> value); the run's own results first."""
    d = ctx.data
    comp = read_json(d.folder.comparison, ctx.notes)
    metric = "mae_gy"
    series: dict[str, dict[str, float]] = {}
    if isinstance(comp, dict):
        metric = str(comp.get("metric") or metric)
        raw = comp.get("series") if isinstance(comp.get("series"), dict) else {}
        for name, vals in raw.items():
            if not isinstance(vals, dict):
                continue
            s = {}
            for site, v in vals.items():
                v = v.get(metric) if isinstance(v, dict) else v
                if num(v) is not None:
                    s[str(site)] = float(num(v))
            if s:
                series[str(name)] = s
    fed_name = "federated" if d.kind == "federated" else "trained here"
    if fed_name not in series:
        own = {str(r.get("site")): float(num(r.get(metric))) for r in d.final if num(r.get(metric)) is not None}
        if own:
            series = {fed_name: own, **series}
    return comp, metric, series


def comparison(ctx: ReportContext) -> None:
    doc = ctx.doc
    comp, metric, series = _comparison_series(ctx)
    label = {"mae_gy": "MAE (Gy)"}.get(metric, metric)
    doc.h(2, "Comparison" if len(series) > 1 else f"{label} per site")
    if not series:
        doc.p(f"No {label} values to compare (no held-out results and no `{COMPARISON}`).")
        return
    if len(series) > 1:
        doc.p(f"{label} of the same held-out cases for each training setup (from `{COMPARISON}`): "
              "federated = the final global model, local = each site trained on its own cases alone, "
              "pooled = all cases in one place (what federation tries to match without moving data).")
        sites = sorted({s for v in series.values() for s in v})
        rows = [[s] + [fmt(series[n].get(s), "gy" if metric.endswith("_gy") else "num") for n in series] for s in sites]
        doc.table(["site"] + list(series), rows)
        if isinstance(comp, dict) and comp.get("note"):
            doc.p(str(comp["note"]))
    else:
        doc.p(f"Only this run's results are available; add `{COMPARISON}` to the run folder "
              "to compare with local and pooled training (format: see `addiff_core/report/__init__.py`).")
    if ctx.fig_dir is not None:
        lower_better = metric in ("mae_gy", "mae_pct_rx", "openkbp_dose_score", "openkbp_dvh_score")
        figure(ctx, f"{label} per site", "mae_per_site.png", "bar_figure", series, label,
               title=f"held-out {label} per site" + (" (lower is better)" if lower_better else ""))
