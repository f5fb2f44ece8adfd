"""The report's cross-site section (issue #25): the matrix of ``cross_site.json`` as a table per
metric, the heat map, and per site whether personalizing and federating paid off."""
from __future__ import annotations

import logging
import math

from ..cross_site import CROSS_SITE_MD, MATRIX_METRICS, grid_of, heatmap, read_matrix, verdicts
from ..run_folder import FIGURES_DIR
from .context import ReportContext

log = logging.getLogger("addiff_core.report")
FIGURE = "cross_site_heatmap.png"


def _yes_no(v) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def _num(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def cross_site(ctx: ReportContext) -> None:
    doc = read_matrix(ctx.data.path)
    if doc is None:
        return
    ctx.doc.h(2, "Cross-site evaluation")
    ctx.doc.p("Every model on every site's held-out cases (rows: models; columns: the site whose cases were used; "
              "`-`: not evaluated there: a site's own model leaves it only if its site file shares it). "
              f"All four metrics: `{CROSS_SITE_MD}` in the run folder.")
    ctx.doc.ul([str(n) for n in doc.get("notes", [])])
    key, title = MATRIX_METRICS[0]
    models, sites, vals = grid_of(doc, key)
    where = {str(m["model"]): str(m.get("evaluated", "")) if m.get("status") == "ok" else str(m.get("status", ""))
             for m in doc.get("models", [])}
    ctx.doc.table(["model", *[f"{s}: {title}" for s in sites], "evaluated"],
                  [[m, *[_num(v) for v in row], where.get(m, "")] for m, row in zip(models, vals)])
    ctx.doc.table(["site", "global", "personalized", "local", "personalized beats global", "global beats local"],
                  [[v["site"], _num(v["global"]), _num(v["personalized"]), _num(v["local"]),
                    _yes_no(v["personalized_beats_global"]), _yes_no(v["global_beats_local"])]
                   for v in verdicts(doc, key)])
    if ctx.fig_dir is None:
        return
    try:
        heatmap(ctx.fig_dir / FIGURE, doc)
    except Exception as e:  # noqa: BLE001 - a figure never stops the report
        log.warning("report: figure %s failed: %s", FIGURE, e)
        ctx.notes.append(f"figure `{FIGURE}` failed: {type(e).__name__}: {e}")
        return
    ctx.doc.img("cross-site heat map: models x sites", f"{FIGURES_DIR}/{FIGURE}")
